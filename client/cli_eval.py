"""`mos eval retention fused/ runs/alice runs/bob [--also other_fused/ …] [--json]`."""

from __future__ import annotations

import json

from ..shared import adapter as adapter_io
from ..shared.cli_base import add_base_options


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure fused models")
    esub = p.add_subparsers(dest="eval_command", required=True)
    r = esub.add_parser("retention", help="per concept: ‖ε_fused − ε_own‖ / ‖ε_own − ε_base‖ along sampled "
                        "trajectories (0 = identity kept, 1 = as far off as the base)")
    r.add_argument("fused", help="fused folder (or adapter file)")
    r.add_argument("own", nargs="+", help="each concept's own tuned folder")
    r.add_argument("--also", nargs="+", default=[], metavar="FUSED", help="more fused results to compare side by side")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print {concept: {method: error}}")
    add_base_options(r)
    r.set_defaults(run=run_retention)


def label(fused: adapter_io.Adapter, path: str) -> str:
    info = fused.meta.get("fusion", {})
    return f"{info.get('method', path)}/{info.get('mode', '?')}" if info else path


def run_retention(args) -> int:
    from ..shared.base import load_base
    from .retention import retention

    base = load_base(args.base, args.device, args.dtype)
    owns = [adapter_io.load(p) for p in args.own]
    table: dict[str, dict[str, float]] = {o.concepts[0].name: {} for o in owns}
    for path in [args.fused, *args.also]:
        fused = adapter_io.load(path)
        key = label(fused, path)
        for name, err in retention(base, fused, owns, args.steps, args.seed).items():
            table[name][key] = err
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    keys = list(next(iter(table.values())))
    print(f"{'concept':<16}" + "".join(f"{k:>22}" for k in keys))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[k]:>22.4f}" for k in keys))
    return 0
