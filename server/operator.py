"""The operator's side of a federated run: a Flower SuperLink, the run submitted to it, and its progress followed
until it ends. `mos-server` is this plus argument checking.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from mos.server import gateway as gw
from mos.server.settings import Settings
from mos.shared.federation import flower_procs as fp
from mos.shared.federation.tls import ensure_server_tls
from mos.shared.files import read_json, write_json
from mos.shared.runtime import say

APP_DIR = Path(__file__).resolve().parent / "flwr_app"  # the bundle `flwr run` submits
STATUS_EVERY_S = 15.0
STATUS_MISSES = 8  # consecutive failed `flwr ls` calls (each up to 60 s) before giving up
NODES = "nodes.json"    # STATE/nodes.json: node id -> registered key, read by the ServerApp (name ownership)
LIMITS = "limits.json"  # STATE/limits.json: the ServerApp's upload cap for this base, read by the gateway


def serve(settings: Settings, host: str, port: int, tls_dir: str | None, tls_names: list[str],
          keys: list[Path]) -> int:
    """Run the federated fusion until the run ends; returns the process exit status (0: every round done)."""
    state, out = Path(settings.state_dir), Path(settings.out)
    state.mkdir(parents=True, exist_ok=True)
    tls = None
    if tls_dir:
        # Clients check the name they dial: in a compose network that is the service's hostname.
        t = ensure_server_tls(tls_dir, tls_names)
        tls = fp.Tls(t.ca.resolve(), t.cert.resolve(), t.key.resolve())
        say(f"TLS on: clients need {t.ca.resolve()} (pass its folder as mos-client --tls-dir)")
    # The SuperLink (Fleet + Control + Runtime APIs on one port) listens on loopback only; the public port is
    # the gateway, which forwards the Fleet API alone (server/gateway.py): control stays the operator's.
    if fp.port_open(host, port):
        raise OSError(f"port {port} on {host} is already in use: is another mos-server running? (use --port)")
    (state / LIMITS).unlink(missing_ok=True)  # a cap from an earlier run must not apply to this one
    internal = fp.free_port("127.0.0.1")
    link = fp.start_superlink(state / "flwr" / "superlink", "127.0.0.1", internal, state / "logs" / "superlink.log",
                              tls, node_auth=bool(keys))
    try:
        door = open_gateway(host, port, internal, tls, state / LIMITS)
    except OSError:
        link.stop()
        raise
    stop_now = False

    def on_signal(signum, _frame):
        nonlocal stop_now
        stop_now = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cli_home = state / "flwr" / "cli"
        if not keys:
            (state / NODES).unlink(missing_ok=True)
        fp.write_cli_config(cli_home, f"127.0.0.1:{internal}", tls.ca if tls else None)
        if keys:
            nodes = fp.register_node_keys(cli_home, [k.resolve() for k in keys])
            write_json(state / NODES, nodes)  # node id -> key, so the ServerApp knows who owns which name
            say(f"node authentication on: {len(keys)} registered key(s) from {keys[0].parent}")
        progress = state / "progress.log"
        offset = progress.stat().st_size if progress.exists() else 0
        run_id = fp.start_run(cli_home, APP_DIR, settings.run_config())
        say(f"listening on {host}:{port}; run {run_id} started, waiting for {settings.min_clients} client(s)")
        return follow(cli_home, run_id, progress, offset, link, lambda: stop_now, out)
    finally:
        door.stop()
        link.stop()


def open_gateway(host: str, port: int, internal: int, tls: fp.Tls | None, limits: Path) -> gw.Gateway:
    """The public door: TLS with the server's certificate when there is one, the Fleet API only."""
    server_ssl = gw.server_context(str(tls.cert), str(tls.key)) if tls else None
    upstream_ssl = gw.client_context(str(tls.ca)) if tls else None
    return gw.Gateway(host, port, internal, server_ssl, upstream_ssl, upload_cap=cap_reader(limits), log=say).start()


def cap_reader(limits: Path):
    """The upload cap the ServerApp wrote for this base (0 until it did: no client has anything to send yet)."""
    seen: dict[str, object] = {"mtime": None, "cap": 0}

    def cap() -> int:
        try:
            mtime = limits.stat().st_mtime_ns
        except OSError:
            return 0
        if mtime != seen["mtime"]:
            seen["cap"], seen["mtime"] = int((read_json(limits) or {}).get("upload_cap", 0)), mtime
        return int(seen["cap"])

    return cap


def follow(cli_home: Path, run_id: int, progress: Path, offset: int, link, stopping, out: Path) -> int:
    """Print the ServerApp's progress until the run ends; its exit status decides ours.

    `flwr ls` (a new process each time) is asked when the ServerApp says it finished, and every
    STATUS_EVERY_S seconds in case it died without saying so.
    """

    last_check = time.time()
    misses = 0
    while True:
        offset, text = tail(progress, offset)
        if stopping():
            say("stopping (signal): state is kept; start mos-server again to resume")
            return 130
        if not link.alive():
            say(f"the SuperLink exited unexpectedly:\n{link.tail()}")
            return 1
        if "ServerApp finished" in text or time.time() - last_check > STATUS_EVERY_S:
            last_check = time.time()
            try:
                status, details = fp.run_status(cli_home, run_id)
                misses = 0
            except (subprocess.TimeoutExpired, RuntimeError) as e:
                # A loaded machine can make `flwr ls` slow or fail once; the run itself is unaffected.
                misses += 1
                if misses >= STATUS_MISSES:
                    say(f"cannot read the run's status ({misses} tries): {e}")
                    return 1
                say(f"run status not available yet ({e.__class__.__name__}); retrying")
                continue
            if status.startswith("finished"):
                time.sleep(0.5)
                tail(progress, offset)  # the ServerApp's last lines
                return finished(cli_home, run_id, status, details, out)
            if "ServerApp finished" in text:  # Flower records the end a moment after the app returns
                time.sleep(1.0)
                last_check = 0.0
        time.sleep(0.5)


def finished(cli_home: Path, run_id: int, status: str, details: str, out: Path) -> int:

    if status == "finished:completed":
        rounds = sorted(out.glob("round-*/adapter.safetensors"), key=lambda p: p.stat().st_mtime)
        if rounds:
            say(f"done. fused model: {rounds[-1]}")
            if (rounds[-1].parent / "preview.png").exists():
                say(f"picture: {rounds[-1].parent / 'preview.png'}")
        return 0
    say(f"the run ended as {status}: {details}")
    print(fp.run_log(cli_home, run_id)[-4000:], file=sys.stderr)
    return 1


def tail(path: Path, offset: int) -> tuple[int, str]:
    """Print the complete lines added to `path` since `offset`; returns the new offset and those lines."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset, ""
    end = data.rfind(b"\n") + 1
    text = data[:end].decode(errors="replace")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
    return offset + end, text
