"""Where LoRA sits, and which layers read the same input ("input sites").

Fusion needs one Gram matrix per distinct input tensor, so layers that read the same tensor share a site:
attn1 to_q/to_k/to_v read the same hidden states, attn2 to_k/to_v read the same text features, and the text
encoder's q/k/v read the same normed hidden states. Layer names are module paths prefixed with their component
("text_encoder." or "unet."), the names adapters and statistics use everywhere.

Placements (docs/design.md, "ED-LoRA"): `attention` is the paper's (text-encoder and UNet attention projections);
`transformer` adds each UNet transformer's feed-forward and its 1×1 proj_in / proj_out; `wide` adds the ResNet
3×3 convolutions as well (LoCon-style). A convolution is a linear map over unfolded input patches, so its site's
dimension is channels × kernel area and its Gram is taken over patches (`Site.conv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


PLACEMENTS = ("attention", "transformer", "wide")


@dataclass(frozen=True)
class Conv:
    """How a convolution reads its input: the patches F.unfold cuts with these settings are its input rows."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Site:
    name: str                 # e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.qkv"
    dim: int                  # input features (a convolution's: channels × kernel area)
    layers: tuple[str, ...]   # full layer names reading this input
    out_dims: tuple[int, ...]
    stage: int                # 1 text encoder, 2 cross-attention k/v, 3 spatial
    conv: Conv | None = None  # set for a convolution's site

    def as_dict(self) -> dict:
        d = {"site": self.name, "dim": self.dim, "stage": self.stage,
             "layers": [{"name": n, "out_dim": o} for n, o in zip(self.layers, self.out_dims)]}
        if self.conv:
            d["conv"] = {"kernel": list(self.conv.kernel), "stride": list(self.conv.stride),
                         "padding": list(self.conv.padding)}
        return d


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
    mods = [_plain(module.get_submodule(c)) for c in children]
    dims = {_in_features(m) for m in mods}
    assert len(dims) == 1, f"layers of one input site disagree on input size: {parent} {children}"
    name = f"{prefix}.{parent}.{group}" if parent else f"{prefix}.{group}"
    layers = tuple(f"{prefix}.{parent}.{c}" if parent else f"{prefix}.{c}" for c in children)
    return Site(name, dims.pop(), layers, tuple(_out_features(m) for m in mods), stage, _conv(mods[0]))


def _plain(m: torch.nn.Module) -> torch.nn.Module:
    return getattr(m, "base_layer", m)  # peft wraps the layer it adapts


def _conv(m: torch.nn.Module) -> Conv | None:
    if not isinstance(m, torch.nn.Conv2d):
        return None
    if m.groups != 1 or m.dilation != (1, 1) or not isinstance(m.padding, tuple):
        raise ValueError(f"convolution {m} is not a plain one (groups, dilation, padding mode): no LoRA site")
    return Conv(tuple(m.kernel_size), tuple(m.stride), tuple(m.padding))


def _in_features(m: torch.nn.Module) -> int:
    if isinstance(m, torch.nn.Conv2d):
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return m.in_features


def _out_features(m: torch.nn.Module) -> int:
    return m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features


def text_encoder_sites(text_encoder: torch.nn.Module) -> list[Site]:
    sites = []
    for name, mod in text_encoder.named_modules():
        if name.endswith("self_attn"):
            sites.append(_site("text_encoder", mod, name, "qkv", ("q_proj", "k_proj", "v_proj"), 1))
            sites.append(_site("text_encoder", mod, name, "out_proj", ("out_proj",), 1))
    return sites


def unet_sites(unet: torch.nn.Module, placement: str = "attention") -> list[Site]:
    if placement not in PLACEMENTS:
        raise ValueError(f"LoRA placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    sites = []
    for name in cross_attention_layers(unet):
        block = name[: -len(".attn2")]
        a1, a2 = f"{block}.attn1", name
        sites.append(_site("unet", unet.get_submodule(a1), a1, "qkv", ("to_q", "to_k", "to_v"), 3))
        sites.append(_site("unet", unet.get_submodule(a1), a1, "to_out.0", ("to_out.0",), 3))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "to_q", ("to_q",), 3))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "kv", ("to_k", "to_v"), 2))
        sites.append(_site("unet", unet.get_submodule(a2), a2, "to_out.0", ("to_out.0",), 3))
        if placement != "attention":
            transformer = block.rsplit(".transformer_blocks.", 1)[0]
            sites.append(_site("unet", unet.get_submodule(block), block, "ff.net.0.proj", ("ff.net.0.proj",), 3))
            sites.append(_site("unet", unet.get_submodule(block), block, "ff.net.2", ("ff.net.2",), 3))
            for proj in ("proj_in", "proj_out"):
                sites.append(_site("unet", unet, "", f"{transformer}.{proj}", (f"{transformer}.{proj}",), 3))
    if placement == "wide":
        resnets = sorted({n.rsplit(".", 1)[0] for n, m in unet.named_modules() if n.endswith(".conv1")
                          and ".resnets." in n}, key=_block_key)
        for r in resnets:
            for conv in ("conv1", "conv2"):
                sites.append(_site("unet", unet, "", f"{r}.{conv}", (f"{r}.{conv}",), 3))
    return sites


def input_sites(text_encoder: torch.nn.Module, unet: torch.nn.Module, placement: str = "attention") -> list[Site]:
    return text_encoder_sites(text_encoder) + unet_sites(unet, placement)


def lora_target_layers(text_encoder: torch.nn.Module, unet: torch.nn.Module, placement: str = "attention"
                       ) -> list[str]:
    return [layer for s in input_sites(text_encoder, unet, placement) for layer in s.layers]
