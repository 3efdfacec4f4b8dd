"""Identity retention: how well a fused model keeps each concept, measured on noise predictions.

For each concept, the concept's own model samples its prompts; along those trajectories we compare noise
predictions of the fused model, the concept's own model and the base (the handle replaced by the class word):

    retention error = ‖ε_fused − ε_own‖ / ‖ε_own − ε_base‖

0 means the fused model predicts exactly what the concept's own model does; 1 means it is as far off as the
base model that never saw the concept.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.stages import prompts_for
from mos.shared.sampling.denoise import make_scheduler, seeded_latents
from mos.shared.sd.base import Base
from mos.shared.sd.model import ConceptModel

EVAL_PROMPTS = 3


@torch.no_grad()
def _trajectory(model: ConceptModel, cond: torch.Tensor, uncond: torch.Tensor, seed: int, steps: int,
                guidance: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_t, t) points visited while the concept's own model samples (scaled model inputs)."""
    sched = make_scheduler(model)
    sched.set_timesteps(steps)
    x = seeded_latents(model, range(seed, seed + cond.shape[0])) * sched.init_noise_sigma
    points = []
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        points.append((xin, t))
        e_u, e_c = model.predict(torch.cat([xin, xin]), t, torch.cat([uncond, cond])).chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return points


@torch.no_grad()
def concept_retention(base: Base, fused: Adapter, own: Adapter, steps: int = 10, seed: int = 0,
                      guidance: float = 7.5) -> float:
    concept = own.concepts[0]
    prompts = prompts_for(concept.name, base.spec)[:EVAL_PROMPTS]
    own_m = ConceptModel.from_adapter(copy.deepcopy(base), own)
    fused_m = ConceptModel.from_adapter(copy.deepcopy(base), fused)
    base_m = ConceptModel(copy.deepcopy(base))
    cond_own, uncond = own_m.encode(prompts), own_m.encode([""] * len(prompts))
    cond_fused = fused_m.encode(prompts)
    cond_base = base_m.encode([p.replace(concept.handle, concept.base_words) for p in prompts])
    num = den = 0.0
    for x, t in _trajectory(own_m, cond_own, uncond, seed, steps, guidance):
        e_own = own_m.predict(x, t, cond_own)
        num += float((fused_m.predict(x, t, cond_fused) - e_own).pow(2).sum())
        den += float((base_m.predict(x, t, cond_base) - e_own).pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def retention(base: Base, fused: Adapter, owns: list[Adapter], steps: int = 10, seed: int = 0,
              progress: bool = True) -> dict[str, float]:
    fused_names = {c.name for c in fused.concepts}
    out = {}
    for own in tqdm(owns, desc="retention", disable=not progress, unit="concept"):
        name = own.concepts[0].name
        if name not in fused_names:
            raise ValueError(f"concept {name!r} is not in the fused adapter (it holds {sorted(fused_names)})")
        out[name] = concept_retention(base, fused, own, steps, seed)
    return out
