"""The server's public door: a small HTTP/1.1 reverse proxy that lets only the Fleet API through.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run | ls | stop | supernode …`) and the
Runtime API (the ServerApp) on ONE HTTP port, and guarding the Control API needs an OIDC plugin this
distribution lacks. So `mos-server` keeps the SuperLink on loopback and puts this gateway on the public
`--host/--port`: it terminates TLS with the server's certificate (when `--tls-dir` is given), forwards
`POST /v1/fleet/*` to the loopback SuperLink unchanged (node authentication signs requests in headers, so it
keeps working through the proxy) and answers everything else with 403. The operator's own `flwr` calls go to
the loopback port directly.

Sizes are refused before bodies are read: a request must declare a Content-Length (no chunked bodies) no larger
than `request_cap` (Flower moves objects in 5 MiB chunks); the objects pushed for one reply (one Fleet session)
may add up to `upload_cap()` bytes, the largest upload the base allows (written by the ServerApp, see
server_app.py) — the chunk that would pass it is refused with 413 and the rest is never sent.

Each request gets its own upstream connection (`Connection: close`), so responses need no framing beyond
reading to the end; the client side keeps its connection alive.
"""

from __future__ import annotations

import asyncio
import posixpath
import ssl
import threading
from collections import OrderedDict
from typing import Callable
from urllib.parse import urlsplit

from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

FLEET = "/v1/fleet/"
MAX_HEAD = 64 * 1024
REQUEST_CAP = 8 << 20           # one request: a 5 MiB object chunk plus its envelope
MAX_RESPONSE = 64 << 20         # what the SuperLink may answer one request with
IDLE_S = 120.0                  # a client connection with no request for this long is closed
SESSIONS_KEPT = 4096            # upload tallies remembered (oldest forgotten first)
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
       "proxy-authorization", "proxy-authenticate"}
REASONS = {403: "Forbidden", 404: "Not Found", 411: "Length Required", 413: "Content Too Large",
           400: "Bad Request", 502: "Bad Gateway"}


class Refused(Exception):
    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status, self.why = status, why


def allowed_path(target: str) -> bool:
    """A Fleet API path, with nothing that could resolve elsewhere (dot segments, escapes, a query)."""
    parts = urlsplit(target)
    path = parts.path
    if parts.scheme or parts.netloc or parts.query or "%" in path or "\\" in path:
        return False
    return path.startswith(FLEET) and posixpath.normpath(path) == path and len(path) > len(FLEET)


class Gateway:
    """Serve `host:port`, forwarding Fleet API requests to `127.0.0.1:upstream_port`."""

    def __init__(self, host: str, port: int, upstream_port: int, server_ssl: ssl.SSLContext | None = None,
                 upstream_ssl: ssl.SSLContext | None = None, upload_cap: Callable[[], int] = lambda: 1 << 30,
                 request_cap: int = REQUEST_CAP, log: Callable[[str], None] = lambda _m: None):
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.server_ssl, self.upstream_ssl = server_ssl, upstream_ssl
        self.upload_cap, self.request_cap, self.log = upload_cap, request_cap, log
        self.uploaded: OrderedDict[str, int] = OrderedDict()  # Fleet session -> bytes pushed
        self.refusals: list[tuple[int, str]] = []               # (status, why), for tests and logs
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="mos-gateway", daemon=True)

    def start(self) -> "Gateway":
        """Bind (raising OSError when the port is taken) and serve from a daemon thread."""
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self._serve, self.host or None, self.port, ssl=self.server_ssl, limit=MAX_HEAD,
            ssl_handshake_timeout=30 if self.server_ssl else None))
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is None:
            return

        async def close() -> None:
            self.server.close()
            # open client connections end here too, quietly (a pending task at loop close is only noise)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # --- one client connection ------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_S)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    return await self._refuse(writer, Refused(400, "request head too large"))
                try:
                    keep = await self._one(head, reader, writer)
                except Refused as r:
                    return await self._refuse(writer, r)
                if not keep:
                    return
        except (ConnectionError, ssl.SSLError, OSError):
            return
        except asyncio.CancelledError:  # stop() ends open connections; ending normally keeps Python 3.11's
            return                      # streams from printing a traceback per connection (fixed in 3.12)
        finally:
            writer.close()

    async def _one(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        method, target, headers = parse_head(head)
        if method != "POST" or not allowed_path(target):
            raise Refused(403, f"{method} {target[:80]!r}: only the Fleet API is served on this port")
        names = {k.lower() for k, _ in headers}
        if "transfer-encoding" in names:
            raise Refused(411, "chunked request bodies are refused: send a Content-Length")
        size = content_length(headers)
        if size > self.request_cap:
            raise Refused(413, f"request body of {size} bytes is over the {self.request_cap}-byte cap")
        body = await reader.readexactly(size)
        if urlsplit(target).path == FLEET + "push-object":
            self._tally(body)
        status, resp_headers, resp_body = await self._forward(method, target, headers, body)
        keep = not any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)
        out = [f"HTTP/1.1 {status}\r\n"] + [f"{k}: {v}\r\n" for k, v in resp_headers if k.lower() not in HOP
                                            and k.lower() != "content-length"]
        out += [f"content-length: {len(resp_body)}\r\n", f"connection: {'keep-alive' if keep else 'close'}\r\n\r\n"]
        writer.write("".join(out).encode("latin-1") + resp_body)
        await writer.drain()
        return keep

    def _tally(self, body: bytes) -> None:
        """Count what one reply's objects add up to; refuse the object that passes the cap."""
        req = PushObjectRequest()
        try:
            req.ParseFromString(body)
        except Exception:  # protobuf's DecodeError
            raise Refused(400, "push-object body is not a PushObjectRequest") from None
        key = f"{req.run_id}/{req.session_id}"
        total = self.uploaded.pop(key, 0) + len(req.object_content)
        self.uploaded[key] = total
        while len(self.uploaded) > SESSIONS_KEPT:
            self.uploaded.popitem(last=False)
        cap = self.upload_cap()
        if total > cap:
            raise Refused(413, f"node {req.node.node_id}: upload of over {total} bytes in one reply is over the "
                               f"{cap}-byte cap of this base")

    async def _forward(self, method: str, target: str, headers: list[tuple[str, str]],
                       body: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        try:
            up_r, up_w = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=self.upstream_ssl,
                server_hostname="127.0.0.1" if self.upstream_ssl else None, limit=MAX_HEAD)
        except (OSError, ssl.SSLError) as e:
            raise Refused(502, f"the SuperLink is not reachable ({e})") from None
        try:
            lines = [f"{method} {target} HTTP/1.1\r\n"]
            lines += [f"{k}: {v}\r\n" for k, v in headers if k.lower() not in HOP and k.lower() != "content-length"]
            lines += [f"content-length: {len(body)}\r\n", "connection: close\r\n\r\n"]
            up_w.write("".join(lines).encode("latin-1") + body)
            await up_w.drain()
            raw = await _read_all(up_r, MAX_RESPONSE)
        finally:
            up_w.close()
        return parse_response(raw)

    async def _refuse(self, writer: asyncio.StreamWriter, r: Refused) -> None:
        """Answer and close: the body, if any, is never read."""
        self.refusals.append((r.status, r.why))
        self.log(f"gateway: refused ({r.status}): {r.why}")
        body = (r.why + "\n").encode()
        writer.write(f"HTTP/1.1 {r.status} {REASONS.get(r.status, 'Error')}\r\ncontent-type: text/plain\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass


async def _read_all(reader: asyncio.StreamReader, cap: int) -> bytes:
    buf = bytearray()
    while chunk := await reader.read(1 << 16):
        buf += chunk
        if len(buf) > cap:
            raise Refused(502, f"the SuperLink's answer is over {cap} bytes")
    return bytes(buf)


def parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    try:
        text = head.decode("latin-1")
        line, *rest = text[:-4].split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise Refused(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise Refused(400, f"unsupported protocol {version[:20]!r}")
    headers = []
    for h in rest:
        k, sep, v = h.partition(":")
        if not sep or not k or k != k.strip():
            raise Refused(400, "malformed header line")
        headers.append((k, v.strip()))
    return method, target, headers


def content_length(headers: list[tuple[str, str]]) -> int:
    values = {v for k, v in headers if k.lower() == "content-length"}
    if not values:
        raise Refused(411, "a request body needs a Content-Length")
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise Refused(400, "bad Content-Length")
    return int(next(iter(values)))


def parse_response(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line's code and reason, headers, body) of a complete HTTP/1.1 response read to EOF."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise Refused(502, "the SuperLink closed the connection without a complete answer")
    line, *rest = head.decode("latin-1").split("\r\n")
    status = line.split(" ", 1)[1] if " " in line else "502 Bad Gateway"
    headers = [(k, v.strip()) for k, _, v in (h.partition(":") for h in rest)]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = dechunk(body)
    else:
        n = [int(v) for k, v in headers if k.lower() == "content-length" and v.isdigit()]
        body = body[: n[0]] if n else body
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


def client_context(ca: str) -> ssl.SSLContext:
    """How the gateway dials the loopback SuperLink when it speaks TLS (node authentication needs it)."""
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
