"""`mos-client --concept data/alice`: one party of the federated fusion.

Tunes the concept's ED-LoRA (or reuses the cached one), starts a Flower SuperNode that joins the server, answers
every stage from this process (ClientApp processes relay here), writes the fused adapter, a merged diffusers
pipeline and a preview of its concept with the others, and exits.

Exit codes: 0 result written · 2 bad input · 3 rejected by the server (bad upload, other base, name taken) ·
4 dropped (too slow) or the round failed · 5 the server finished without this client · 6 refused at the door
(TLS or node authentication) · 7 gave up waiting (--wait).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from mos.shared.runtime import say

EXIT = {"result": 0, "rejected": 3, "dropped": 4, "finished": 5, "refused": 6, "timeout": 7}
RESTART_BACKOFF_S = (2, 5, 10, 20, 30)
REFUSAL_GRACE_S = 45  # how long a refused node keeps trying before it exits (code 6)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mos-client", description="Join a mos-server with one concept.")
    p.add_argument("--concept", default=None, help="concept folder (images, optional captions, masks, concept.toml); "
                   "not needed with --adapter")
    p.add_argument("--server", default="127.0.0.1:9092", help="the server's HOST:PORT (default 127.0.0.1:9092)")
    p.add_argument("--out", default=None, help="output folder (default mos-out/<concept name>)")
    p.add_argument("--steps", type=int, default=None, help="tuning steps (default: scaled to the data)")
    p.add_argument("--base", default="tiny", help="base model: tiny (default), tiny:SEED, a diffusers folder, …")
    p.add_argument("--adapter", default=None, help="use this tuned adapter (folder or file) instead of tuning")
    p.add_argument("--tls-dir", default=None, help="folder with the server's ca.pem: connect over TLS")
    p.add_argument("--auth-key", default=None, help="this node's ECDSA private key (OpenSSH format) whose .pub "
                   "the server registered")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--wait", type=float, default=0, help="give up after this many seconds without a result "
                   "(default 0: wait for the server as long as it takes)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the merged diffusers pipeline folder")
    args = p.parse_args(argv)
    if not args.concept and not args.adapter:
        p.error("give --concept FOLDER (tune on it) or --adapter FILE (an adapter tuned or imported before)")
    return args



def prepare_adapter(args: argparse.Namespace):
    """(adapter, data digest): the given adapter, or the concept's cached (else freshly tuned) one."""
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.sd.base import mos_home

    if args.adapter:
        adapter = adapter_io.load(args.adapter)
        say(f"using adapter {args.adapter} ({', '.join(c.handle for c in adapter.concepts) or 'no concept'})")
        return adapter, str(adapter.meta.get("data_digest", ""))
    from mos.client.tuning.edlora import TuneConfig
    from mos.client.tuning.tune import tune

    concept = Path(args.concept).resolve()
    slot = hashlib.sha256(f"{concept}\n{args.base}".encode()).hexdigest()[:12]
    folder = mos_home() / "clients" / f"{concept.name}-{slot}"
    tune(concept, folder, TuneConfig(steps=args.steps), args.base, device=args.device)
    adapter = adapter_io.load(folder)
    return adapter, str(adapter.meta.get("data_digest", ""))


def refused(log_text: str) -> str | None:
    """Why the SuperLink shut this SuperNode out, if its log says so (Flower 1.42's wording)."""
    if "Failed to activate SuperNode" in log_text or "[code: 2004]" in log_text:
        return ("node authentication failed: the server has not registered this node's public key "
                "(send it your --auth-key's .pub file)")
    low = log_text.lower()
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return ("TLS failed: the server's certificate does not verify against --tls-dir's ca.pem, or does not "
                "name the host in --server")
    return None


def wedged(log_text: str) -> bool:
    """Flower 1.42: a SuperNode that was sending a reply when the SuperLink restarted gets '401 Unauthorized'
    from the new one, tries to exit from a retry thread and deadlocks; it neither exits nor reconnects."""
    return "401 Unauthorized" in log_text or "KeyboardInterrupt" in log_text


def main(argv: list[str] | None = None) -> int:
    from mos.shared.runtime import setup_environment

    setup_environment()
    args = parse(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mos-client: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from mos.shared.sd.base import check_same_base, load_base
    from mos.shared.runtime import limit_threads
    from mos.shared.federation.tls import check_node_key, client_root_cert
    from mos.client.federation import relay
    from mos.client.federation.worker import Worker

    if not args.adapter and not Path(args.concept).is_dir():
        raise FileNotFoundError(f"--concept {args.concept}: no such folder")
    root_cert = client_root_cert(args.tls_dir).resolve() if args.tls_dir else None
    auth_key = check_node_key(args.auth_key) if args.auth_key else None
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--server {args.server!r}: expected HOST:PORT")

    base = load_base(args.base, args.device)
    limit_threads(base)
    adapter, data_digest = prepare_adapter(args)
    if len(adapter.concepts) != 1:
        raise ValueError(f"--adapter holds {len(adapter.concepts)} concepts; a client brings exactly one")
    check_same_base(f"the adapter (--base {args.base})", adapter.fingerprint, base.fingerprint)
    name = adapter.concepts[0].name
    out = Path(args.out or Path("mos-out") / name).resolve()
    work = Path(tempfile.mkdtemp(prefix="mos-node-"))  # short path: Unix sockets allow ~100 characters
    worker = Worker(base, adapter, out, data_digest)
    server = relay.Server(work / "worker.sock", worker.handle).start()
    log = out / "logs" / "supernode.log"
    node = None
    signal.signal(signal.SIGTERM, lambda *_: worker.done.set())
    say(f"<{name}> joins {args.server}{' over TLS' if root_cert else ''} (Flower SuperNode log: {log})")
    try:
        node, code = supervise(args, worker, server.path, log, root_cert, auth_key)
        if code is not None:
            return code
        if worker.outcome is None:
            say("stopped")
            return 130
        outcome = worker.outcome
        let_reply_leave(log)
        if outcome.kind != "result":
            say(f"{outcome.kind} by the server: {outcome.reason}")
            return EXIT.get(outcome.kind, 4)
        write_outputs(args, out, name)
        return 0
    finally:
        if node is not None:
            node.stop()
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def supervise(args: argparse.Namespace, worker, socket_path: Path, log: Path, root_cert: Path | None,
              auth_key: Path | None):
    """Keep a SuperNode connected until the worker has an outcome. Returns (last SuperNode, exit code or None):
    a code when the server refuses this node past a grace period (a restarted server registers node keys a
    moment after it starts listening) or --wait expires."""
    from mos.shared.federation import flower_procs as fp

    node, restarts, started, refused_since = None, 0, time.time(), None
    while True:
        if node is not None and not node.alive():
            why = refused(node.tail(60))
            delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
            if why:
                refused_since = refused_since or time.time()
                if time.time() - refused_since > REFUSAL_GRACE_S:
                    say(f"refused by the server: {why}")
                    return node, EXIT["refused"]
                say(f"the server refused this node ({why}); trying again in {delay} s")
            else:
                refused_since = None
                say(f"lost the server (SuperNode exited {node.popen.returncode}); reconnecting in {delay} s")
            restarts += 1
            if worker.done.wait(delay):
                return node, None
        if node is None or not node.alive():
            node = fp.start_supernode(socket_path.parent / "flwr", args.server, fp.free_port(),
                                      {"mos-worker": str(socket_path)}, log, root_cert, auth_key)
        if worker.done.wait(1.0):
            return node, None
        if wedged(node.output()):
            say("the SuperNode lost its session with a restarted server and hangs; starting a new one")
            node.stop()
            continue
        why = refused(node.tail(20))
        if why:  # a SuperNode retries a certificate it cannot verify forever: give up here
            refused_since = refused_since or time.time()
            if time.time() - refused_since > REFUSAL_GRACE_S:
                say(f"refused by the server: {why}")
                return node, EXIT["refused"]
        if args.wait and time.time() - started > args.wait:
            say(f"no result after {args.wait:.0f} s: giving up")
            return node, EXIT["timeout"]


def let_reply_leave(log: Path, timeout: float = 20.0) -> None:
    """The worker answered; let the SuperNode send that answer (every message received gets one reply sent)
    before it is stopped."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            text = log.read_bytes()
        except OSError:
            return
        if text.count(b"Sent successfully") >= text.count(b"Received successfully"):
            return
        time.sleep(0.5)


def write_outputs(args: argparse.Namespace, out: Path, name: str) -> None:
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.sd.base import load_base
    from mos.shared.sampling.preview import write_preview

    result = adapter_io.load(out / adapter_io.FILENAME)
    say(f"fused adapter: {out / adapter_io.FILENAME} ({', '.join(c.handle for c in result.concepts)})")
    if not args.no_pipeline:
        from mos.shared.formats.export import write_pipeline

        say(f"merged diffusers pipeline: {write_pipeline(load_base(args.base, args.device), result, out / 'pipeline')}")
    say(f"preview of <{name}> with the others: "
        f"{write_preview(load_base(args.base, args.device), result, out / 'preview.png', first=name)}")


if __name__ == "__main__":
    sys.exit(main())
