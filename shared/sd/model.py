"""A base with concepts and LoRA applied: what tuning, sampling and statistics capture all run on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from mos.shared.formats.adapter import Adapter, AdapterError
from mos.shared.sd import lora as lora_mod
from mos.shared.sd.base import Base, check_same_base
from mos.shared.sd.concepts import PromptEncoder
from mos.shared.sd.sites import cross_attention_layers


class LayerwiseAttnProcessor(AttnProcessor2_0):
    """Cross-attention layer k reads slice k of 4-D conditioning; 3-D conditioning passes as it is."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states[:, self.layer]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_layerwise(unet: torch.nn.Module) -> None:
    for k, name in enumerate(cross_attention_layers(unet)):
        unet.get_submodule(name).set_processor(LayerwiseAttnProcessor(k))


@contextlib.contextmanager
def cross_attention_processors(unet: torch.nn.Module, make: Callable[[int], object]) -> Iterator[None]:
    """Swap in `make(k)` as cross-attention layer k's processor; put the previous ones back afterwards.
    (Regional sampling and the tuning-time attention recorder both extend attention this way.)"""
    with _swapped([unet.get_submodule(n) for n in cross_attention_layers(unet)], make):
        yield


@contextlib.contextmanager
def self_attention_processors(unet: torch.nn.Module, make: Callable[[int], object]) -> Iterator[None]:
    """The same for the self-attention (attn1) of the transformer block of cross-attention layer k."""
    names = [n[: -len("attn2")] + "attn1" for n in cross_attention_layers(unet)]
    with _swapped([unet.get_submodule(n) for n in names], make):
        yield


@contextlib.contextmanager
def _swapped(layers: list[torch.nn.Module], make: Callable[[int], object]) -> Iterator[None]:
    previous = [m.processor for m in layers]
    try:
        for k, m in enumerate(layers):
            m.set_processor(make(k))
        yield
    finally:
        for m, p in zip(layers, previous):
            m.set_processor(p)


class ConceptModel:
    """Base + LoRA + concept embeddings. Mutates the base's modules (load a fresh base per model)."""

    def __init__(self, base: Base):
        self.base = base
        self.n_layers = len(cross_attention_layers(base.unet))
        install_layerwise(base.unet)
        self.prompts = PromptEncoder(base.tokenizer, base.text_encoder, self.n_layers)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.base.text_encoder, "unet": self.base.unet}

    @classmethod
    def from_adapter(cls, base: Base, adapter: Adapter, check_fingerprint: bool = True) -> "ConceptModel":
        if check_fingerprint:
            check_same_base("the adapter", adapter.fingerprint, base.fingerprint, AdapterError)
        model = cls(base)
        model.set_lora(adapter.lora)
        for c in adapter.concepts:
            model.prompts.add(c)
        return model

    def set_lora(self, lora: lora_mod.Lora) -> None:
        lora_mod.inject(self.models, {layer: int(A.shape[0]) for layer, (B, A) in lora.items()})
        lora_mod.write(self.models, lora)
        for m in self.models.values():
            m.to(self.base.device, self.base.dtype)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.prompts.encode(prompts)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.base.unet(latents, t, encoder_hidden_states=cond, **kwargs).sample

    def to_adapter(self, meta: dict | None = None) -> Adapter:
        return Adapter(self.base.fingerprint, self.prompts.concepts(), lora_mod.read(self.models), meta or {})
