"""Fused (or single-concept) adapters for other tools: a diffusers pipeline folder, LoRA files, embeddings.

`--format diffusers` (write_pipeline): the LoRA deltas merged into the weights, each concept's two tokens added as
`<name_a>` `<name_b>`, `concepts.json` mapping each handle to them ("<alice>" -> "<alice_a> <alice_b>"); beside it,
`lora/` holds the same thing unmerged, for the original base: `pytorch_lora_weights.safetensors` (diffusers keys)
and `embeddings/<name>.safetensors`.
`--format kohya` (write_kohya): one LoRA file in the kohya / A1111 / ComfyUI convention, and a folder of
embeddings beside it.

What is lost: a stock pipeline has one embedding per token, so each concept's layer-wise embeddings (one per
cross-attention layer) are averaged over the layers. The LoRA deltas are exact. Concepts imported from a plain
LoRA have no tokens: their handle maps to their trigger words. The project's own sampler (`mos sample`) keeps
the per-layer embeddings and regions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mos.shared.files import save_tensors
from mos.shared.formats import conversions as lora_formats
from mos.shared.formats.adapter import Adapter
from mos.shared.sd.base import Base, check_same_base
from mos.shared.sd.concepts import check_name
from mos.shared.sd.lora import as_weight


@torch.no_grad()
def merge_lora(base: Base, adapter: Adapter) -> None:
    """W += B @ A on the base's own modules (in place)."""
    models = {"text_encoder": base.text_encoder, "unet": base.unet}
    for layer, (B, A) in adapter.lora.items():
        component, _, path = layer.partition(".")
        w = models[component].get_submodule(path).weight
        w += as_weight(B.double() @ A.double(), w).to(w.device, w.dtype)


@torch.no_grad()
def add_tokens(base: Base, adapter: Adapter) -> dict[str, str]:
    """Add each concept's two tokens with its layer-averaged embeddings; return handle -> token text."""
    handles = {}
    for c in adapter.concepts:
        if c.trigger:
            handles[c.handle] = c.trigger
            continue
        names = [f"<{t}>" for t in c.tokens]
        if base.tokenizer.add_tokens(names) != len(names):
            raise ValueError(f"tokens {names} already exist in the tokenizer")
        base.text_encoder.resize_token_embeddings(len(base.tokenizer))
        emb = base.text_encoder.get_input_embeddings().weight
        for name, vec in zip(names, c.embeddings.mean(dim=0)):
            emb[base.tokenizer.convert_tokens_to_ids(name)] = vec.to(emb.device, emb.dtype)
        handles[c.handle] = " ".join(names)
    return handles


def write_embeddings(adapter: Adapter, folder: Path) -> list[Path]:
    """One `<name>.safetensors` per token concept, key `emb_params` [2, dim] (layer-averaged): the textual-inversion
    form A1111 and ComfyUI read, and that diffusers' `load_textual_inversion` reads as a single-tensor file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for c in adapter.concepts:
        if not c.trigger:
            out.append(folder / f"{check_name(c.name, 'export')}.safetensors")  # a name is never a path
            save_file({"emb_params": c.embeddings.mean(dim=0).float().contiguous()}, out[-1])
    return out


def _shapes(base: Base) -> dict[str, tuple[int, ...]]:
    return lora_formats.linear_shapes({"text_encoder": base.text_encoder, "unet": base.unet})


def _check(base: Base, adapter: Adapter) -> None:
    check_same_base("the adapter", adapter.fingerprint, base.fingerprint)


def _concepts_json(base: Base, handles: dict[str, str], how: str) -> str:
    return json.dumps({"base_fingerprint": base.fingerprint, "handles": handles,
                       "note": "layer-wise embeddings averaged over the cross-attention layers; " + how}, indent=2)


def _atomic_dir(out: Path, write) -> Path:
    """Build the folder beside `out` and rename it into place: a reader never sees half an export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_pipeline(base: Base, adapter: Adapter, out: str | Path) -> Path:
    """Merge `adapter` into `base` (a fresh base: it is modified) and save a diffusers folder atomically, with the
    unmerged LoRA and embeddings in `lora/`."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    _check(base, adapter)
    merge_lora(base, adapter)
    handles = add_tokens(base, adapter)

    def write(tmp: Path) -> None:
        config = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")}
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=DPMSolverMultistepScheduler.from_config(config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "concepts.json").write_text(_concepts_json(
            base, handles, "write the handle's tokens in prompts, e.g. 'a photo of <alice_a> <alice_b>'"))
        (tmp / "lora").mkdir()
        save_file(lora_formats.to_diffusers(adapter.lora, _shapes(base)),
                  tmp / "lora" / "pytorch_lora_weights.safetensors")
        write_embeddings(adapter, tmp / "lora" / "embeddings")

    return _atomic_dir(Path(out), write)


def write_kohya(base: Base, adapter: Adapter, out: str | Path) -> tuple[Path, Path]:
    """`out` (kohya keys, exact at strength 1.0) and `<stem>_embeddings/` beside it; returns both paths."""
    _check(base, adapter)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a kohya LoRA file ends in .safetensors")
    emb_dir = out.with_name(out.stem + "_embeddings")
    handles = {c.handle: c.trigger or c.name for c in adapter.concepts}

    def write(tmp: Path) -> None:
        write_embeddings(adapter, tmp)
        (tmp / "concepts.json").write_text(_concepts_json(
            base, handles, "in A1111 write the embedding's name, e.g. 'a photo of alice <lora:NAME:1>'; "
            "in ComfyUI 'embedding:alice'"))

    _atomic_dir(emb_dir, write)
    save_tensors(lora_formats.to_kohya(adapter.lora, _shapes(base)), out,
                 {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                  "mos_base_fingerprint": base.fingerprint, "mos_concepts": json.dumps(handles)})
    return out, emb_dir
