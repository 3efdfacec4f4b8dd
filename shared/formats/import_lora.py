"""A community LoRA as a concept the fusion accepts (`mos import-lora`).

The LoRA (kohya or diffusers keys, any rank up to the wire's cap, alpha folded in) becomes an adapter whose one
concept has no tokens of its own: its handle `<NAME>` stands for the trigger words. Fusion covers the layers in
the base's input sites (shared/sd/sites.py); LoRA on other layers cannot be fused, so it is refused unless
`attention_only` drops it, saying how much of the LoRA that was.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mos.shared.federation.wire import MAX_RANK
from mos.shared.files import read_tensors
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats import conversions as lora_formats
from mos.shared.sd.concepts import NAME, Concept, check_trigger

MAX_FILE = 2 << 30


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The LoRA's tensors; a pickled .pt/.ckpt/.bin is refused (no pickle here)."""
    return read_tensors(path, MAX_FILE, "LoRA file (pickle formats .pt, .ckpt, .bin are not accepted)")[0]


def import_lora(tensors: dict[str, torch.Tensor], base, trigger: str, name: str, attention_only: bool = False,
                meta: dict | None = None) -> tuple[adapter_io.Adapter, dict]:
    """(adapter, report). The adapter's concept stands for `trigger`; its LoRA is the file's, alpha folded in."""
    from mos.shared.sd.sites import cross_attention_layers, lora_target_layers

    trigger = check_trigger(trigger)
    if not NAME.fullmatch(name):
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
