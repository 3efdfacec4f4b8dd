"""How far one concept may reach, relative to the base (docs/protocol.md, "What one party can do to the result").

The server derives the limits once from its base: each LoRA'd layer's weight norm, and each input site's
trace(G)/rows on the base's own activations. A concept outside them is refused before it counts; a fused result
outside them fails the round before anything is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mos.shared.fusion.config import FusionConfig
from mos.shared.sd.concepts import Concept


class BoundsError(ValueError):
    """A concept, or a fused result, outside the base's limits."""


MAX_DELTA = 2.0            # ‖B A‖_F ≤ MAX_DELTA · ‖W‖_F per layer (tiny, random test adapters: 0.15–0.24)
POWER_RANGE = (1e-6, 1e2)  # trace(G)/rows within this factor of the base's own activations (tiny: 0.79–1.39)


@dataclass(frozen=True)
class Bounds:
    """Limits derived from the base: each LoRA'd layer's weight norm (matrix form `W.reshape(out, -1)`, so a
    convolution counts like its unfolded linear map) and each input site's trace(G)/rows on the base's own
    activations. A concept outside them is refused; a fused result outside them fails the round."""

    weight_norms: dict[str, float]
    row_power: dict[str, float]
    max_delta: float = MAX_DELTA
    power_range: tuple[float, float] = POWER_RANGE
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_base(cls, base, placement: str) -> "Bounds":
        """Weight norms, and row power from one pass of a neutral concept (no LoRA, class-word embeddings)
        through every site (the one-shot recording, 2 sampling steps)."""
        import copy

        from mos.shared.formats.adapter import Adapter
        from mos.shared.fusion import stages
        from mos.shared.sd.model import ConceptModel
        from mos.shared.sd.sites import input_sites

        sites = input_sites(base.text_encoder, base.unet, placement)
        models = {"text_encoder": base.text_encoder, "unet": base.unet}
        norms = {}
        for layer in (l for s in sites for l in s.layers):
            component, _, path = layer.partition(".")
            W = models[component].get_submodule(path).weight
            norms[layer] = float(W.detach().double().reshape(W.shape[0], -1).norm())
        probe = ConceptModel(copy.deepcopy(base))
        emb = probe.prompts.init_embeddings("object", torch.Generator().manual_seed(0))
        neutral = Adapter(base.fingerprint, [Concept("mos-reference", "object", emb)], {})
        model = ConceptModel.from_adapter(copy.deepcopy(base), neutral)
        stats = stages.stage1(model, "mos-reference", FusionConfig(one_shot=True, sample_steps=2,
                                                                   placement=placement, heldout=False))
        power = {name: float(g.gram.diagonal().sum()) / max(g.rows, 1) for name, g in stats.items()}
        return cls(norms, power)

    def to_json(self) -> dict:
        return {"weight_norms": self.weight_norms, "row_power": self.row_power, "max_delta": self.max_delta,
                "power_range": list(self.power_range)}

    @classmethod
    def from_json(cls, d: dict) -> "Bounds":
        return cls(dict(d["weight_norms"]), dict(d["row_power"]), float(d["max_delta"]),
                   tuple(d["power_range"]))

    def check_delta(self, what: str, layer: str, B: torch.Tensor, A: torch.Tensor, factor: float = 1.0) -> None:
        """‖B A‖_F against ‖W‖_F, computed without forming B A (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ))."""
        Bd, Ad = B.double(), A.double()
        sq = float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum())
        norm = math.sqrt(sq) if math.isfinite(sq) and sq >= 0 else math.inf
        w = self.weight_norms.get(layer)
        if w is None:
            raise BoundsError(f"{what}, layer {layer}: no bound for this layer (not a LoRA target of this base)")
        if not norm <= self.max_delta * factor * w:
            raise BoundsError(f"{what}, layer {layer}: LoRA change ‖BA‖ = {norm:.3g} is {norm / w:.3g}× the base "
                              f"weight's norm {w:.3g}; at most {self.max_delta * factor:g}× is accepted")

    def check_power(self, what: str, site: str, trace: float, rows: int) -> None:
        """trace(G)/rows against the base's (the caller gives tr G: a factored Gram's is ‖R‖², never G itself)."""
        ref = self.row_power.get(site)
        if ref is None or ref <= 0:
            return  # a site the base gives no signal on: nothing to compare with
        per_row = trace / rows
        lo, hi = self.power_range
        if not lo * ref <= per_row <= hi * ref:
            raise BoundsError(f"{what}, site {site}: trace(G)/rows = {per_row:.3g} is {per_row / ref:.3g}× what the "
                              f"base's own activations give ({ref:.3g}); accepted {lo:g}× to {hi:g}×")
