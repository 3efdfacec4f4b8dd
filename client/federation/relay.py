"""The hop from a ClientApp process to this node's worker (the `mos-client` process), over a Unix socket.

Flower starts a fresh ClientApp process for every message. Loading torch, the base model and the client's own
adapter in each would cost more than the work, so the ClientApp only relays: it hands the message's RecordDict
to the worker, which keeps models and caches warm, and returns the worker's reply. RecordDicts cross the socket
as Flower's own protobuf (never pickle). The socket lives in a folder only this user can open.

Frames: 4-byte big-endian header length, JSON header, then `header["size"]` body bytes.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

Handler = Callable[[str, RecordDict, dict], RecordDict]
MAX_HEADER = 1 << 20


def _send(sock: socket.socket, header: dict, body: bytes) -> None:
    head = json.dumps({**header, "size": len(body)}).encode()
    sock.sendall(struct.pack(">I", len(head)) + head)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_HEADER:
        raise ConnectionError(f"frame header of {n} bytes is too large")
    header = json.loads(_recv_exact(sock, n))
    return header, _recv_exact(sock, int(header["size"]))


def encode(rd: RecordDict) -> bytes:
    return recorddict_to_proto(rd).SerializeToString()


def decode(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def call(path: str | Path, kind: str, rd: RecordDict, meta: dict | None = None, timeout: float | None = None) -> RecordDict:
    """Send one message to the worker and wait for its reply. Worker errors come back as RuntimeError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise RuntimeError(f"this node's mos-client worker is not reachable at {path} ({e}); "
                               "the ClientApp only works beside a running mos-client") from None
        _send(s, {"kind": kind, "meta": meta or {}}, encode(rd))
        header, body = _recv(s)
    if header.get("error"):
        raise RuntimeError(header["error"])
    return decode(body)


class Server:
    """Serves a handler on a Unix socket, one message at a time (a SuperNode runs one message at a time too)."""

    def __init__(self, path: str | Path, handler: Handler):
        self.path = Path(path)
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        self.sock.bind(str(self.path))
        self.path.chmod(0o600)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._loop, name="mos-worker", daemon=True)
        self._stop = threading.Event()

    def start(self) -> "Server":
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    header, body = _recv(conn)
                    reply = self.handler(header["kind"], decode(body), header.get("meta", {}))
                    _send(conn, {}, encode(reply))
                except Exception as e:  # the reply says what went wrong; the worker keeps serving
                    try:
                        _send(conn, {"error": f"{type(e).__name__}: {e}"}, b"")
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        finally:
            self.path.unlink(missing_ok=True)
