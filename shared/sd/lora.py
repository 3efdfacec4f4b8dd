"""LoRA on the base's layers (the sites of sites.py), through peft.

Everywhere outside this file a LoRA is a pair of matrices (B, A) per layer with the scale folded into B, so that
ΔW = B @ A; layer names carry their component prefix ("text_encoder." / "unet."). On a convolution peft holds A as
a k×k convolution [r, C, k, k] and B as a 1×1 one [out, r, 1, 1]; as matrices they are A [r, C·k·k] and B [out, r],
and ΔW = B @ A is the convolution's weight change over unfolded patches (reshaped to [out, C, k, k] to apply).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from mos.shared.sd.lora_layers import CUSTOM

ADAPTER = "default"
Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (B, A)


def _split(layer: str) -> tuple[str, str]:
    component, _, path = layer.partition(".")
    return component, path


def inject(models: dict[str, torch.nn.Module], ranks: dict[str, int]) -> None:
    """Wrap each named layer in a peft LoRA of its own rank (alpha = rank, so peft's scale is 1); lora_layers.py
    says when a layer applies it as one merged weight."""
    for component, model in models.items():
        mine = {path: r for layer, r in ranks.items() for comp, path in [_split(layer)] if comp == component}
        if not mine:
            continue
        # Exact paths: peft matches a target by name suffix, and a full path is a unique suffix.
        config = LoraConfig(r=max(mine.values()), lora_alpha=max(mine.values()), target_modules=sorted(mine),
                            rank_pattern={f"^{p}$": r for p, r in mine.items()},
                            alpha_pattern={f"^{p}$": r for p, r in mine.items()}, init_lora_weights=True)
        config._register_custom_module(CUSTOM)  # peft's layers, applied as one weight where that is cheaper
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_layers(models: dict[str, torch.nn.Module]) -> dict[str, LoraLayer]:
    return {f"{c}.{n}": m for c, model in models.items() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def disabled(models: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The base model alone while inside: every LoRA layer off, its parameters' requires_grad as they were after."""
    layers = lora_layers(models).values()
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, g in grads:
            p.requires_grad_(g)


def read(models: dict[str, torch.nn.Module]) -> Lora:
    """(B·scale, A) of every LoRA layer as matrices, float32 on CPU."""
    out = {}
    for name, m in lora_layers(models).items():
        scale = m.scaling[ADAPTER]
        B = m.lora_B[ADAPTER].weight.detach().float().cpu() * scale
        A = m.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        out[name] = (B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1))
    return out


def write(models: dict[str, torch.nn.Module], lora: Lora) -> None:
    """Set LoRA weights; the layers must have been injected with matching ranks."""
    layers = lora_layers(models)
    missing = sorted(set(lora) - set(layers))
    if missing:
        raise ValueError(f"adapter has LoRA for layers the model lacks: {missing[:3]}{' …' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, (B, A) in lora.items():
            m = layers[name]
            a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            if (a.shape[0], a[0].numel()) != tuple(A.shape) or (b.shape[0], b[0].numel()) != tuple(B.shape):
                raise ValueError(f"LoRA shape mismatch at {name}: adapter B{tuple(B.shape)} A{tuple(A.shape)}, "
                                 f"model B{tuple(b.shape)} A{tuple(a.shape)}")
            a.copy_(A.reshape(a.shape))
            b.copy_((B / m.scaling[ADAPTER]).reshape(b.shape))


def trainable_parameters(models: dict[str, torch.nn.Module], component: str) -> list[torch.nn.Parameter]:
    params = []
    for name, m in lora_layers({component: models[component]}).items():
        for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight):
            p.requires_grad_(True)
            params.append(p)
    return params


def delta(lora: Lora, layer: str) -> torch.Tensor:
    B, A = lora[layer]
    return B @ A


def as_weight(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A ΔW matrix [out, in·k·k] in the shape of the layer's weight (a convolution's [out, in, k, k])."""
    return delta.reshape(weight.shape)
