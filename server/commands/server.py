"""`mos-server --rounds 1`: the operator's side of the federated fusion.

Starts a Flower SuperLink (one port for clients and for the control API), submits the app bundle with
`flwr run`, shows the ServerApp's progress, and stops everything when the run ends. Results land in
OUT/round-R/ (adapter.safetensors, fusion.json, preview.png); what was received is kept in --state-dir so a
restarted server resumes the round instead of starting over.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from mos.shared.fusion.config import RIDGE_DEFAULT, parse_ridge


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
    p.add_argument("--placement", choices=("attention", "transformer", "wide"), default=None,
                   help="layers fused (default: the base's, as tuning places LoRA: wide on tiny/world, else "
                   "attention)")
    p.add_argument("--eps", type=parse_ridge, default=RIDGE_DEFAULT, help="the solve's ridge: 'heldout': λ of "
                   "each spatial site chosen on held-out trajectories the clients also record, ε = 0.01 elsewhere; "
                   "a number fixes ε at every site (λ = ε·tr(ΣG)/d); 'gcv': λ per site by generalized "
                   "cross-validation. Default: 'heldout' on tiny and world, ε = 0.01 on other bases (as `mos fuse`)")
    p.add_argument("--kv-eps", type=float, default=None, metavar="EPS",
                   help="ridge factor of the cross-attention k/v sites (stage 2; default: the base's, 0.1 on world, "
                   "else --eps; as `mos fuse`)")
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
    from mos.server.operator import serve
    from mos.server.settings import Settings
    from mos.shared.fusion.config import FusionConfig

    keys = check(args)
    # bad values fail here, before any process starts
    eps, heldout = args.eps
    fusion = FusionConfig(args.method, args.one_shot, eps, args.sample_steps, args.sample_seed, args.guidance,
                          args.gram_dtype, args.placement, args.kv_eps, heldout)
    settings = Settings(str(Path(args.out).resolve()), str(Path(args.state_dir).resolve()), args.rounds,
                        args.min_clients, args.stage_timeout, args.base, not args.no_preview, fusion=fusion)
    tls_names = [args.host, socket.gethostname(), *args.tls_name]
    return serve(settings, args.host, args.port, args.tls_dir, tls_names, keys)


if __name__ == "__main__":
    sys.exit(main())
