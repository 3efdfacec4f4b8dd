"""`mos import-lora FILE --trigger "words" --out runs/NAME`: a community LoRA as a concept the fusion accepts.

The LoRA (kohya or diffusers keys, any rank up to the wire's cap, alpha folded in) becomes an adapter whose one
concept has no tokens of its own: its handle `<NAME>` stands for the trigger words. Fusion covers the attention
projections (shared/sites.py); LoRA on other layers (feed-forward, proj_in/out, the text encoder's MLP) cannot
be fused, so it is refused unless `--attention-only` drops it, saying how much of the LoRA that was.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from ..shared import adapter as adapter_io
from ..shared import lora_formats
from ..shared.cli_base import add_base_options
from ..shared.concepts import Concept, check_trigger
from ..shared.files import read_tensors
from ..shared.wire import MAX_RANK, NAME

MAX_FILE = 2 << 30


def register(sub) -> None:
    p = sub.add_parser("import-lora", help="turn a plain (kohya / diffusers) LoRA into a concept for fusion")
    p.add_argument("file", help="LoRA .safetensors (kohya lora_unet_/lora_te_ keys, or diffusers unet./text_encoder.)")
    p.add_argument("--trigger", required=True, help="the words the LoRA was trained to respond to, e.g. 'sks dog'")
    p.add_argument("--out", required=True, help="output folder (adapter.safetensors goes there), e.g. runs/NAME")
    p.add_argument("--name", default=None, help="concept handle without <> (default: the trigger, slugified)")
    p.add_argument("--attention-only", action="store_true",
                   help="drop LoRA on layers the fusion does not cover (feed-forward, proj_in/out, text MLP)")
    add_base_options(p, compute=False)
    p.set_defaults(run=run)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The LoRA's tensors; a pickled .pt/.ckpt/.bin is refused (no pickle here)."""
    return read_tensors(path, MAX_FILE, "LoRA file (pickle formats .pt, .ckpt, .bin are not accepted)")[0]


def import_lora(tensors: dict[str, torch.Tensor], base, trigger: str, name: str, attention_only: bool = False,
                meta: dict | None = None) -> tuple[adapter_io.Adapter, dict]:
    """(adapter, report). The adapter's concept stands for `trigger`; its LoRA is the file's, alpha folded in."""
    from ..shared.sites import cross_attention_layers, lora_target_layers

    trigger = check_trigger(trigger)
    if not NAME.match(name):
        raise ValueError(f"concept name {name!r}: use letters, digits, _ and - (pass --name)")
    models = {"text_encoder": base.text_encoder, "unet": base.unet}
    lora = lora_formats.read(tensors, models)
    targets = set(lora_target_layers(base.text_encoder, base.unet))
    other = sorted(set(lora) - targets)
    total = sum(float((B.double() @ A.double()).square().sum()) for B, A in lora.values())
    dropped = sum(float((lora[k][0].double() @ lora[k][1].double()).square().sum()) for k in other)
    share = dropped / total if total else 0.0
    if other and not attention_only:
        raise ValueError(f"the LoRA also changes {len(other)} layer(s) that fusion does not cover (e.g. {other[0]}), "
                         f"{share:.0%} of its ‖ΔW‖²; pass --attention-only to drop them")
    lora = {k: v for k, v in lora.items() if k in targets}
    if not lora:
        raise ValueError("no LoRA on the attention layers that fusion covers: nothing to import")
    too_big = {k: int(A.shape[0]) for k, (B, A) in lora.items() if A.shape[0] > MAX_RANK}
    if too_big:
        k = next(iter(too_big))
        raise ValueError(f"rank {too_big[k]} at {k} is over the federation's cap of {MAX_RANK}")
    n_tokens = len(base.tokenizer(trigger, add_special_tokens=False).input_ids)
    if n_tokens > 20:
        raise ValueError(f"trigger {trigger!r} is {n_tokens} tokens; keep it to a few words")
    emb = torch.zeros(len(cross_attention_layers(base.unet)), 0, base.text_encoder.config.hidden_size)
    report = {"layers": len(lora), "dropped_layers": len(other), "dropped_fraction": share,
              "ranks": sorted({int(A.shape[0]) for B, A in lora.values()}), "trigger_tokens": n_tokens}
    adapter = adapter_io.Adapter(base.fingerprint, [Concept(name, "", emb, trigger)], lora,
                                 {**(meta or {}), "imported": report})
    return adapter, report


def slug(trigger: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", trigger.strip()).strip("_-")
    return s[:64] or "concept"


def run(args) -> int:
    from ..shared.base import load_base

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
