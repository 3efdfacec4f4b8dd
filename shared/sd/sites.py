"""Where LoRA sits, and which layers read the same input ("input sites").

Fusion needs one Gram matrix per distinct input tensor, so layers that read the same tensor share a site:
attn1 to_q/to_k/to_v read the same hidden states, attn2 to_k/to_v read the same text features, and the text
encoder's q/k/v read the same normed hidden states. Layer names are module paths prefixed with their component
("text_encoder." or "unet."), the names adapters and statistics use everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Site:
    name: str                 # e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.qkv"
    dim: int                  # input features
    layers: tuple[str, ...]   # full layer names reading this input
    out_dims: tuple[int, ...]
    stage: int                # 1 text encoder, 2 cross-attention k/v, 3 spatial

    def as_dict(self) -> dict:
        return {"site": self.name, "dim": self.dim, "stage": self.stage,
                "layers": [{"name": n, "out_dim": o} for n, o in zip(self.layers, self.out_dims)]}


def _block_key(name: str) -> tuple:
    # down -> mid -> up (diffusers registers down, up, mid), then numeric order inside each block
    head = name.split(".")[0]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[head]
    return (order, *[int(p) for p in name.split(".") if p.isdigit()])


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules in layer-wise-embedding order (down, mid, up)."""
    names = [n for n, _ in unet.named_modules() if n.endswith(".attn2")]
    return sorted(names, key=_block_key)


def _site(prefix: str, module: torch.nn.Module, parent: str, group: str, children: tuple[str, ...], stage: int) -> Site:
    mods = [module.get_submodule(c) for c in children]
    dims = {_in_features(m) for m in mods}
    assert len(dims) == 1, f"layers of one input site disagree on input size: {parent} {children}"
    return Site(f"{prefix}.{parent}.{group}", dims.pop(), tuple(f"{prefix}.{parent}.{c}" for c in children),
                tuple(_out_features(m) for m in mods), stage)


def _in_features(m: torch.nn.Module) -> int:
    return getattr(m, "in_features", None) or m.base_layer.in_features  # plain or peft-wrapped Linear


def _out_features(m: torch.nn.Module) -> int:
    return getattr(m, "out_features", None) or m.base_layer.out_features


def text_encoder_sites(text_encoder: torch.nn.Module) -> list[Site]:
    sites = []
    for name, mod in text_encoder.named_modules():
        if name.endswith("self_attn"):
            sites.append(_site("text_encoder", mod, name, "qkv", ("q_proj", "k_proj", "v_proj"), 1))
            sites.append(_site("text_encoder", mod, name, "out_proj", ("out_proj",), 1))
    return sites


def unet_sites(unet: torch.nn.Module) -> list[Site]:
    sites = []
    for name in cross_attention_layers(unet):
        block = name[: -len(".attn2")]
        a1, a2 = f"{block}.attn1", name
        sites.append(_site("unet", unet.get_submodule(a1), a1, "qkv", ("to_q", "to_k", "to_v"), 3))
        sites.append(_site("unet", unet.get_submodule(a1), a1, "to_out.0", ("to_out.0",), 3))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "to_q", ("to_q",), 3))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "kv", ("to_k", "to_v"), 2))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "to_out.0", ("to_out.0",), 3))
    return sites


def input_sites(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> list[Site]:
    return text_encoder_sites(text_encoder) + unet_sites(unet)


def lora_target_layers(text_encoder: torch.nn.Module, unet: torch.nn.Module) -> list[str]:
    return [layer for s in input_sites(text_encoder, unet) for layer in s.layers]
