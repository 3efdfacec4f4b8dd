"""`mos-server --rounds 1`: the operator's side of the federated fusion.

Starts a Flower SuperLink (one port for clients and for the control API), submits the app bundle with
`flwr run`, shows the ServerApp's progress, and stops everything when the run ends. Results land in
OUT/round-R/ (adapter.safetensors, fusion.json, preview.png); what was received is kept in --state-dir so a
restarted server resumes the round instead of starting over.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mos.shared.runtime import say

APP_DIR = Path(__file__).resolve().parents[1] / "flwr_app"  # the bundle `flwr run` submits
STATUS_EVERY_S = 15.0
STATUS_MISSES = 8  # consecutive failed `flwr ls` calls (each up to 60 s) before giving up


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mos-server", description="Fuse concepts from mos-client parties over Flower.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=9092, help="port for clients and control (default 9092)")
    p.add_argument("--rounds", type=int, default=1, help="fusion rounds to run (default 1)")
    p.add_argument("--min-clients", type=int, default=2, help="clients a round waits for (default 2)")
    p.add_argument("--stage-timeout", type=float, default=600.0, help="seconds a stage waits for replies before "
                   "dropping the silent clients (default 600)")
    p.add_argument("--out", default="mos-out/server", help="output folder (default mos-out/server)")
    p.add_argument("--state-dir", default="mos-state/server", help="what was received, for restarts "
                   "(default mos-state/server)")
    p.add_argument("--base", default="tiny", help="base model: tiny (default), tiny:SEED, a diffusers folder, …")
    p.add_argument("--one-shot", action="store_true", help="one exchange: every statistic from each client's own "
                   "model (cheaper, less exact)")
    p.add_argument("--method", choices=("gradient", "weight"), default="gradient",
                   help="gradient fusion (default) or the paper's weight-fusion baseline")
    p.add_argument("--gram-dtype", choices=("float32", "float64"), default="float32",
                   help="how clients send Gram matrices: float32 (default; half the bytes) or float64 (exact: the "
                   "result then equals `mos fuse` to rounding)")
    p.add_argument("--eps", type=float, default=0.01, help="ridge factor ε of the solve (λ = ε·tr(ΣG)/d; default "
                   "0.01)")
    p.add_argument("--sample-steps", type=int, default=20, help="stage 3: sampling steps clients record spatial "
                   "statistics over (default 20; as `mos fuse --steps`)")
    p.add_argument("--sample-seed", type=int, default=0, help="stage 3: sampling seed (default 0)")
    p.add_argument("--guidance", type=float, default=7.5, help="stage 3: sampling guidance (default 7.5)")
    p.add_argument("--tls-dir", default=None, help="use (or make) ca.pem + server.pem/.key here; clients need ca.pem")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="another name or address clients use to reach this server, for its certificate "
                   "(repeatable; this machine's hostname and --host are always in it)")
    p.add_argument("--auth-keys", default=None, help="folder of clients' *.pub keys: only those nodes may join")
    p.add_argument("--no-preview", action="store_true", help="skip preview.png")
    return p.parse_args(argv)



def main(argv: list[str] | None = None) -> int:
    from mos.shared.runtime import setup_environment

    setup_environment()
    args = parse(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"mos-server: error: {e}", file=sys.stderr)
        return 2


def check(args: argparse.Namespace) -> list[Path]:
    from mos.shared.sd.base import resolve

    resolve(args.base)  # a bad --base fails here, before any process starts
    if args.rounds < 1 or args.min_clients < 1 or args.stage_timeout <= 0:
        raise ValueError("--rounds and --min-clients must be >= 1 and --stage-timeout > 0")
    keys: list[Path] = []
    if args.auth_keys:
        folder = Path(args.auth_keys)
        if not folder.is_dir():
            raise FileNotFoundError(f"--auth-keys {folder}: no such folder")
        keys = sorted(folder.glob("*.pub"))
        if not keys:
            raise ValueError(f"--auth-keys {folder} holds no *.pub keys: no client could join")
    return keys


def run(args: argparse.Namespace) -> int:
    from mos.shared.federation import flower_procs as fp
    from mos.shared.federation.tls import ensure_server_tls
    from mos.server.settings import Settings
    from mos.shared.fusion.config import FusionConfig

    keys = check(args)
    state = Path(args.state_dir).resolve()
    out = Path(args.out).resolve()
    fusion = FusionConfig(args.method, args.one_shot, args.eps, args.sample_steps, args.sample_seed, args.guidance,
                          args.gram_dtype)  # bad values fail here, before any process starts
    settings = Settings(str(out), str(state), args.rounds, args.min_clients, args.stage_timeout, args.base,
                        not args.no_preview, fusion=fusion)
    state.mkdir(parents=True, exist_ok=True)
    tls = None
    if args.tls_dir:
        # Clients check the name they dial: in a compose network that is the service's hostname.
        t = ensure_server_tls(args.tls_dir, [args.host, socket.gethostname(), *args.tls_name])
        tls = fp.Tls(t.ca.resolve(), t.cert.resolve(), t.key.resolve())
        say(f"TLS on: clients need {t.ca.resolve()} (pass its folder as mos-client --tls-dir)")
    link = fp.start_superlink(state / "flwr" / "superlink", args.host, args.port, state / "logs" / "superlink.log",
                              tls, node_auth=bool(keys))
    stop_now = False

    def on_signal(signum, _frame):
        nonlocal stop_now
        stop_now = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cli_home = state / "flwr" / "cli"
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        fp.write_cli_config(cli_home, f"{local}:{args.port}", tls.ca if tls else None)
        if keys:
            fp.register_node_keys(cli_home, [k.resolve() for k in keys])
            say(f"node authentication on: {len(keys)} registered key(s) from {args.auth_keys}")
        progress = state / "progress.log"
        offset = progress.stat().st_size if progress.exists() else 0
        run_id = fp.start_run(cli_home, APP_DIR, settings.run_config())
        say(f"listening on {args.host}:{args.port}; run {run_id} started, waiting for {args.min_clients} client(s)")
        return follow(cli_home, run_id, progress, offset, link, lambda: stop_now, out)
    finally:
        link.stop()


def follow(cli_home: Path, run_id: int, progress: Path, offset: int, link, stopping, out: Path) -> int:
    """Print the ServerApp's progress until the run ends; its exit status decides ours.

    `flwr ls` (a new process each time) is asked when the ServerApp says it finished, and every
    STATUS_EVERY_S seconds in case it died without saying so.
    """
    from mos.shared.federation import flower_procs as fp

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
    from mos.shared.federation import flower_procs as fp

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


if __name__ == "__main__":
    sys.exit(main())
