"""`mos import-lora FILE --trigger "words" --out runs/NAME`: a community LoRA as a concept the fusion accepts.

The LoRA (kohya or diffusers keys, any rank up to the wire's cap, alpha folded in) becomes an adapter whose one
concept has no tokens of its own: its handle `<NAME>` stands for the trigger words. Fusion covers the attention
projections (shared/sites.py); LoRA on other layers (feed-forward, proj_in/out, the text encoder's MLP) cannot
be fused, so it is refused unless `--attention-only` drops it, saying how much of the LoRA that was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mos.shared.commands.base import add_base_options

HELP = "turn a plain (kohya / diffusers) LoRA into a concept for fusion"


def register(sub) -> None:
    p = sub.add_parser("import-lora", help=HELP)
    p.add_argument("file", help="LoRA .safetensors (kohya lora_unet_/lora_te_ keys, or diffusers unet./text_encoder.)")
    p.add_argument("--trigger", required=True, help="the words the LoRA was trained to respond to, e.g. 'sks dog'")
    p.add_argument("--out", required=True, help="output folder (adapter.safetensors goes there), e.g. runs/NAME")
    p.add_argument("--name", default=None, help="concept handle without <> (default: the trigger, slugified)")
    p.add_argument("--attention-only", action="store_true",
                   help="drop LoRA on layers the fusion does not cover (feed-forward, proj_in/out, text MLP)")
    add_base_options(p, compute=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.formats.import_lora import import_lora, read_safetensors, slug
    from mos.shared.sd.base import load_base

    path = Path(args.file)
    tensors = read_safetensors(path)
    base = load_base(args.base, "cpu", "fp32")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    adapter, rep = import_lora(tensors, base, args.trigger, args.name or slug(args.trigger), args.attention_only,
                               {"source": path.name, "source_sha256": digest})
    out = adapter_io.save(adapter, Path(args.out) / adapter_io.FILENAME)
    c = adapter.concepts[0]
    print(f"{path.name} -> {out}: {c.handle} = {c.trigger!r}; {rep['layers']} layers, rank(s) {rep['ranks']}"
          + (f"; dropped {rep['dropped_layers']} non-attention layers ({rep['dropped_fraction']:.1%} of ‖ΔW‖²)"
             if rep["dropped_layers"] else ""))
    print(f"fuse it: mos fuse {args.out} runs/other --out fused/   or federate it: mos-client --adapter {args.out}")
    return 0
