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
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from mos.shared.runtime import say

WAIT_S = 7200.0  # finite: a client that can never connect must say so and stop, not retry forever
EXIT = {"result": 0, "rejected": 3, "dropped": 4, "finished": 5, "refused": 6, "timeout": 7}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mos-client", description="Join a mos-server with one concept.")
    p.add_argument("--concept", default=None, help="concept folder (images, optional captions, masks, concept.toml); "
                   "not needed with --adapter")
    p.add_argument("--server", default="127.0.0.1:9092", help="the server's HOST:PORT (default 127.0.0.1:9092)")
    p.add_argument("--out", default=None, help="output folder (default mos-out/<concept name>)")
    p.add_argument("--steps", type=int, default=None, help="tuning steps (default: scaled to the data)")
    p.add_argument("--base", default="tiny", help="base model: tiny (default), tiny:SEED, a diffusers folder, …")
    p.add_argument("--adapter", default=None, help="use this tuned adapter (folder or file) instead of tuning")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="A", help="multiply this concept's LoRA by A "
                   "before it takes part (default 1), as `mos fuse PATH:A` does")
    p.add_argument("--tls-dir", default=None, help="folder with the server's ca.pem: connect over TLS")
    p.add_argument("--auth-key", default=None, help="this node's ECDSA private key (OpenSSH format) whose .pub "
                   "the server registered")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--wait", type=float, default=WAIT_S, help="give up after this many seconds without a result, "
                   f"saying why (a server that cannot be reached, TLS, key) (default {WAIT_S:.0f}; 0: no limit)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the merged diffusers pipeline folder")
    args = p.parse_args(argv)
    if not args.concept and not args.adapter:
        p.error("give --concept FOLDER (tune on it) or --adapter FILE (an adapter tuned or imported before)")
    return args



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
    from mos.client.federation import relay
    from mos.client.federation.party import prepare_adapter, write_outputs
    from mos.client.federation.supernode import let_reply_leave, supervise
    from mos.client.federation.worker import Worker
    from mos.shared.federation.tls import check_node_key, client_root_cert
    from mos.shared.runtime import limit_threads
    from mos.shared.sd.base import check_same_base, load_base

    if not args.adapter and not Path(args.concept).is_dir():
        raise FileNotFoundError(f"--concept {args.concept}: no such folder")
    root_cert = client_root_cert(args.tls_dir).resolve() if args.tls_dir else None
    auth_key = check_node_key(args.auth_key) if args.auth_key else None
    if auth_key and not root_cert:
        raise ValueError("--auth-key needs --tls-dir: Flower signs node requests only over TLS (give the folder "
                         "with the server's ca.pem)")
    if args.wait < 0:
        raise ValueError("--wait must be >= 0 (0: no limit)")
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--server {args.server!r}: expected HOST:PORT")

    base = load_base(args.base, args.device)
    limit_threads(base)
    adapter, data_digest = prepare_adapter(args.concept, args.adapter, args.base, args.steps, args.device,
                                           args.lora_scale)
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
        node, gave_up = supervise(args.server, worker.done, server.path, log, root_cert, auth_key, args.wait,
                                  on_start=worker.new_session)
        if gave_up:
            return EXIT[gave_up]
        if worker.outcome is None:
            say("stopped")
            return 130
        outcome = worker.outcome
        let_reply_leave(log)
        if outcome.kind != "result":
            say(f"{outcome.kind} by the server: {outcome.reason}")
            return EXIT.get(outcome.kind, 4)
        write_outputs(out, name, base, not args.no_pipeline)
        return 0
    finally:
        if node is not None:
            node.stop()
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
