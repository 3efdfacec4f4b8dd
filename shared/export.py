"""Write a fused (or single-concept) adapter as a complete diffusers pipeline folder.

The LoRA deltas are merged into the weights. A stock pipeline has one embedding per token, so each concept's
layer-wise embeddings are averaged over the cross-attention layers and added as tokens `<name_a>` `<name_b>`;
`concepts.json` maps each handle to them ("<alice>" -> "<alice_a> <alice_b>"). That average is what is lost:
the project's own sampler (`mos sample`) keeps the per-layer embeddings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .adapter import Adapter
from .base import Base


@torch.no_grad()
def merge_lora(base: Base, adapter: Adapter) -> None:
    """W += B @ A on the base's own modules (in place)."""
    models = {"text_encoder": base.text_encoder, "unet": base.unet}
    for layer, (B, A) in adapter.lora.items():
        component, _, path = layer.partition(".")
        w = models[component].get_submodule(path).weight
        w += (B.double() @ A.double()).to(w.device, w.dtype)


@torch.no_grad()
def add_tokens(base: Base, adapter: Adapter) -> dict[str, str]:
    """Add each concept's two tokens with its layer-averaged embeddings; return handle -> token text."""
    handles = {}
    for c in adapter.concepts:
        names = [f"<{t}>" for t in c.tokens]
        if base.tokenizer.add_tokens(names) != len(names):
            raise ValueError(f"tokens {names} already exist in the tokenizer")
        base.text_encoder.resize_token_embeddings(len(base.tokenizer))
        emb = base.text_encoder.get_input_embeddings().weight
        for name, vec in zip(names, c.embeddings.mean(dim=0)):
            emb[base.tokenizer.convert_tokens_to_ids(name)] = vec.to(emb.device, emb.dtype)
        handles[c.handle] = " ".join(names)
    return handles


def write_pipeline(base: Base, adapter: Adapter, out: str | Path) -> Path:
    """Merge `adapter` into `base` (a fresh base: it is modified) and save a diffusers folder atomically."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    if adapter.fingerprint != base.fingerprint:
        raise ValueError(f"adapter is for base {adapter.fingerprint}, not {base.fingerprint} ({base.spec})")
    merge_lora(base, adapter)
    handles = add_tokens(base, adapter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")}
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=DPMSolverMultistepScheduler.from_config(config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "concepts.json").write_text(json.dumps(
            {"base_fingerprint": base.fingerprint, "handles": handles,
             "note": "layer-wise embeddings averaged over the cross-attention layers; write the handle's tokens "
                     "in prompts, e.g. 'a photo of <alice_a> <alice_b>'"}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
