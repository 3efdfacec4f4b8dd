"""`mos fuse runs/alice runs/bob --out fused/`: gradient fusion on one machine, same stages as the server."""

from __future__ import annotations

from pathlib import Path

from mos.shared.commands.base import add_base_options
from mos.shared.fusion.config import METHODS, RIDGE_DEFAULT, parse_ridge

HELP = "fuse concepts' adapters on one machine"


def register(sub) -> None:
    p = sub.add_parser("fuse", help=HELP)
    p.add_argument("adapters", nargs="+", metavar="PATH[:SCALE]", help="tuned concept folders (or "
                   "adapter.safetensors files); :SCALE multiplies that concept's LoRA before fusion (runs/alice:0.7; "
                   "default 1; recorded in fusion.json lora_scales)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--one-shot", action="store_true", help="all statistics from each concept's own model, one pass")
    p.add_argument("--method", choices=METHODS, default="gradient", help="gradient fusion, or the paper's weight-"
                   "fusion baseline (LoRA deltas averaged)")
    p.add_argument("--pipeline", action="store_true", help="also write a diffusers pipeline folder (OUT/pipeline)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for spatial statistics (stage 3)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the stage-3 sampling (default 0)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance of the stage-3 sampling (default 7.5)")
    p.add_argument("--placement", choices=("attention", "transformer", "wide"), default=None,
                   help="layers fused (default: the base's, as tuning places LoRA: wide on tiny/world, else attention)")
    p.add_argument("--eps", type=parse_ridge, default=RIDGE_DEFAULT, help="the solve's ridge: 'heldout': λ of "
                   "each spatial site chosen on held-out trajectories sampled beside stage 3's, ε = 0.01 elsewhere; a "
                   "number fixes ε at every site (λ = ε·tr(ΣG)/d); 'gcv': λ per site by generalized "
                   "cross-validation. Default: 'heldout' on tiny and world, ε = 0.01 on other bases. fusion.json "
                   "records each site's λ")
    p.add_argument("--kv-eps", type=float, default=None, metavar="EPS",
                   help="ridge factor of the cross-attention k/v sites (stage 2; default: the base's, 0.1 on world, "
                   "else --eps)")
    add_base_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.fusion.config import FusionConfig
    from mos.shared.fusion.local import fuse, write_result

    eps, heldout = args.eps
    config = FusionConfig(args.method, args.one_shot, eps, args.steps, args.sample_seed, args.guidance,
                          placement=args.placement, kv_eps=args.kv_eps, heldout=heldout)
    adapters = [adapter_io.load_scaled(p) for p in args.adapters]
    result = fuse(adapters, args.base, config, args.device, args.dtype)
    out = Path(args.out)
    write_result(result, out)
    print(f"fused {', '.join(c.handle for c in result.concepts)} ({args.method}"
          f"{', one-shot' if args.one_shot else ''}) -> {out / adapter_io.FILENAME}")
    if args.pipeline:
        from mos.shared.formats.export import write_pipeline
        from mos.shared.sd.base import load_base as fresh

        print(f"pipeline -> {write_pipeline(fresh(args.base, args.device, args.dtype), result, out / 'pipeline')}")
    return 0
