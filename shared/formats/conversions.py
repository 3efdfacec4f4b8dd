"""LoRA files in other tools' conventions, both ways.

Ours: layer "unet.<module path>" -> (B, A) with ΔW = B @ A (scale folded into B).
kohya (AUTOMATIC1111, ComfyUI, sd-scripts), SD1.x: "lora_unet_<path, dots as _>" / "lora_te_<path>" with
    .lora_down.weight = A [r, in], .lora_up.weight = B [out, r], .alpha = α;   ΔW = (α / r) · up @ down
diffusers / peft: "unet.<path>.lora_A.weight" = A, ".lora_B.weight" = B (older files: ".lora.down.weight",
    ".lora.up.weight"), "text_encoder.<path>…";  ΔW = B @ A unless an ".alpha" says otherwise.

Exports keep every layer's own rank and give exactly our ΔW at a multiplier of 1.0 in those tools. On a
convolution both conventions hold down/A as a k×k convolution [r, C, k, k] and up/B as a 1×1 one [out, r, 1, 1]
(kohya's LoCon form); ours are the same numbers as matrices.
Reading resolves each key against the base's real module names (a kohya name is ambiguous once its dots are
underscores), so a key that names no layer of the base, or a layer of another shape, is a clear error.
"""

from __future__ import annotations

import math

import torch

from mos.shared.sd.lora import Lora

KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DIFFUSERS_SUFFIX = {"lora_A.weight": "A", "lora_B.weight": "B", "lora.down.weight": "A", "lora.up.weight": "B",
                    "alpha": "alpha"}
KOHYA_SUFFIX = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


class LoraFormatError(ValueError):
    pass


def kohya_name(layer: str) -> str:
    """Text-encoder names carry `text_model_`, as kohya (and A1111, ComfyUI) write them: transformers 4 nested
    CLIPTextModel's modules under `.text_model`; transformers 5 does not, so our paths lack it."""
    component, _, path = layer.partition(".")
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return KOHYA[component] + path.replace(".", "_")


def _as_module_weights(layer: str, B: torch.Tensor, A: torch.Tensor, shapes: dict[str, tuple[int, ...]] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) shaped as the layer's LoRA modules hold them: 4-D on a convolution."""
    shape = (shapes or {}).get(layer)
    if shape is None or len(shape) == 2:
        return B, A
    return B.reshape(B.shape[0], B.shape[1], 1, 1), A.reshape(A.shape[0], shape[1], *shape[2:])


def to_kohya(lora: Lora, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """One α for every layer (α = the largest rank), as kohya's trainer writes it; up = B·r/α keeps ΔW exact.

    Per-layer α = r would be as valid, but diffusers 0.42's kohya loader drops per-layer alphas (its alpha_pattern
    keys match no module) and would scale those layers wrongly."""
    alpha = float(max(A.shape[0] for B, A in lora.values()))
    out = {}
    for layer, (B, A) in lora.items():
        k = kohya_name(layer)
        up, down = _as_module_weights(layer, B.double() * (A.shape[0] / alpha), A, shapes)
        out[f"{k}.lora_down.weight"] = down.float().contiguous()
        out[f"{k}.lora_up.weight"] = up.float().contiguous()
        out[f"{k}.alpha"] = torch.tensor(alpha)
    return out


def to_diffusers(lora: Lora, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for layer, (B, A) in lora.items():
        B, A = _as_module_weights(layer, B, A, shapes)
        out[f"{layer}.lora_A.weight"] = A.float().contiguous()
        out[f"{layer}.lora_B.weight"] = B.float().contiguous()
    return out


def linear_shapes(models: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Every weight-bearing layer of the base: "unet.<path>" -> weight shape ([out, in] for a Linear)."""
    return {f"{c}.{n}": tuple(m.weight.shape) for c, model in models.items() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _split(key: str, layers: dict[str, tuple[int, ...]], kohya: dict[str, str]) -> tuple[str, str] | None:
    """(layer, part) for a key in either convention, or None if it names no layer of the base."""
    if key.startswith(("lora_unet_", "lora_te_")):
        stem, _, suffix = key.partition(".")
        layer = kohya.get(stem)
        part = KOHYA_SUFFIX.get(suffix)
    else:
        for suffix, part in DIFFUSERS_SUFFIX.items():
            if key.endswith("." + suffix):
                layer = key[: -len(suffix) - 1]
                break
        else:
            return None
        layer = layer if layer in layers else None
    return (layer, part) if layer and part else None


def read(tensors: dict[str, torch.Tensor], models: dict[str, torch.nn.Module]) -> Lora:
    """A plain LoRA (kohya or diffusers keys, any rank, alpha honoured) as our (B, A) per layer of `models`."""
    layers = linear_shapes(models)
    kohya = {kohya_name(layer): layer for layer in layers}
    kohya |= {"lora_te_" + layer.partition(".")[2].replace(".", "_"): layer  # files written without text_model_
              for layer in layers if layer.startswith("text_encoder.")}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        hit = _split(key, layers, kohya)
        if hit is None:
            unknown.append(key)
        else:
            parts.setdefault(hit[0], {})[hit[1]] = t
    if unknown:
        hint = (" (SDXL or LDM-style names? this base is SD1.x with diffusers module names)"
                if any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks")) for k in unknown) else "")
        raise LoraFormatError(f"{len(unknown)} key(s) name no LoRA part of a layer of this base{hint}: "
                              + ", ".join(sorted(unknown)[:4]) + (" …" if len(unknown) > 4 else ""))
    if not parts:
        raise LoraFormatError("the file holds no LoRA weights")
    return {layer: _pair(layer, p, layers[layer]) for layer, p in sorted(parts.items())}


def _pair(layer: str, p: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if "A" not in p or "B" not in p:
        raise LoraFormatError(f"{layer}: the LoRA has only {sorted(p)}, needs both down (A) and up (B)")
    A, B = p["A"], p["B"]
    if A.ndim != len(shape) or B.ndim != len(shape) or len(shape) not in (2, 4) or B.shape[2:] not in ((), (1, 1)):
        raise LoraFormatError(f"{layer}: LoRA A{tuple(A.shape)} B{tuple(B.shape)} does not fit a layer with weight "
                              f"{shape} (linear layers, and convolutions with a 1×1 up)")
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # a convolution's, over unfolded patches
    r = A.shape[0]
    shape = (shape[0], math.prod(shape[1:]))
    if B.shape[1] != r or (B.shape[0], A.shape[1]) != shape:
        raise LoraFormatError(f"{layer}: LoRA B{tuple(B.shape)} @ A{tuple(A.shape)} does not fit the base's weight "
                              f"{shape}: was it trained on another base model?")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LoraFormatError(f"{layer}: LoRA holds NaN or Inf")
    scale = float(p["alpha"].float().reshape(-1)[0]) / r if "alpha" in p else 1.0
    return (B.float() * scale, A.float().clone())
