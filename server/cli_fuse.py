"""`mos fuse runs/alice runs/bob --out fused/`: gradient fusion on one machine, same stages as the server."""

from __future__ import annotations

import json
from pathlib import Path

from ..shared import adapter as adapter_io
from ..shared.base import Base, load_base
from ..shared.cli_base import add_base_options
from ..shared.sites import input_sites
from .fusion import METHODS, Fusion, run_fusion
from .local_runner import LocalRunner


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse concepts' adapters on one machine")
    p.add_argument("adapters", nargs="+", help="tuned concept folders (or adapter.safetensors files)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--one-shot", action="store_true", help="all statistics from each concept's own model, one pass")
    p.add_argument("--method", choices=METHODS, default="gradient", help="gradient fusion, or the paper's weight-"
                   "fusion baseline (LoRA deltas averaged)")
    p.add_argument("--pipeline", action="store_true", help="also write a diffusers pipeline folder (OUT/pipeline)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for spatial statistics (stage 3)")
    p.add_argument("--eps", type=float, default=None, help="ridge factor ε (λ = ε·tr(ΣG)/d)")
    add_base_options(p)
    p.set_defaults(run=run)


def fuse(adapters: list[adapter_io.Adapter], base_spec: str | Base = "tiny", one_shot: bool = False,
         method: str = "gradient", steps: int = 20, eps: float | None = None, device: str | None = None,
         dtype: str | None = None, progress: bool = True) -> adapter_io.Adapter:
    """`base_spec` may be a loaded Base (left unchanged: every stage works on its own copy)."""
    base = base_spec if isinstance(base_spec, Base) else load_base(base_spec, device, dtype)
    fusion = Fusion(base.fingerprint, input_sites(base.text_encoder, base.unet), method, eps)
    for a in adapters:  # fail before any work on a base mismatch
        if a.fingerprint != base.fingerprint:
            raise ValueError(f"concept {a.concepts[0].name if a.concepts else '?'} was tuned on base {a.fingerprint}, "
                             f"but --base {base_spec} is {base.fingerprint}")
    return run_fusion(LocalRunner(base, adapters, steps, progress), fusion, one_shot)


def write_result(result: adapter_io.Adapter, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    adapter_io.save(result, out / adapter_io.FILENAME)
    (out / "fusion.json").write_text(json.dumps(result.meta.get("fusion", {}), indent=2, default=float))


def run(args) -> int:
    adapters = [adapter_io.load(p) for p in args.adapters]
    result = fuse(adapters, args.base, args.one_shot, args.method, args.steps, args.eps, args.device, args.dtype)
    out = Path(args.out)
    write_result(result, out)
    print(f"fused {', '.join(c.handle for c in result.concepts)} ({args.method}"
          f"{', one-shot' if args.one_shot else ''}) -> {out / adapter_io.FILENAME}")
    if args.pipeline:
        from ..shared.base import load_base as fresh
        from ..shared.export import write_pipeline

        print(f"pipeline -> {write_pipeline(fresh(args.base, args.device, args.dtype), result, out / 'pipeline')}")
    return 0
