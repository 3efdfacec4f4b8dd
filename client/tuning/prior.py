"""Prior preservation (DreamBooth's): the adapter also keeps drawing the concept's class as the base drew it.

A concept's own pictures never say which of the changes tuning makes need the concept's tokens: a LoRA may as well
turn every object of the class red. Two such concepts of one class (two stars, one red, one green) then ask fusion
for opposite changes on the same inputs. Before the first step the base draws PICTURES pictures of the class, from
the folder's own captions with the class word where the concept stood ("a diamond on the left"); each step then
also fits PRIOR_ROWS of them, under their class captions, to their own noise. A change the class pictures do not
want must be keyed on the concept's tokens. On the world base that removes what fusion loses, but each concept
then learns less of its own look (docs/world.md, "Trials of the eighteenth session"), so the recipes leave it off.

The pictures are latents the base drew (no decoding, no files): the same seed draws the same ones, so a resumed run
sees the pictures it started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mos.client.tuning.data import TOKEN, ConceptData, seeded
from mos.shared.sampling.denoise import denoise, seeded_latents
from mos.shared.sd import lora as lora_mod
from mos.shared.sd.model import ConceptModel

PICTURES = 20
PRIOR_ROWS = 1  # class pictures per step, beside the batch's own (its weight is the config's prior)
SAMPLE_STEPS = 20
CHUNK = 4  # pictures drawn at a time (a real base at 512 px holds few in memory)


@dataclass
class Prior:
    latents: torch.Tensor  # [PICTURES, C, h, w]: what the base drew, in the UNet's latent space
    captions: list[str]    # the class captions they were drawn from


def class_captions(data: ConceptData, class_word: str, n: int = PICTURES) -> list[str]:
    return [data.items[i % len(data.items)].caption.replace(TOKEN, class_word) for i in range(n)]


@torch.no_grad()
def draw_prior(model: ConceptModel, data: ConceptData, class_word: str, seed: int) -> Prior:
    """The base's pictures of the class (every LoRA off while drawing, so a resumed run draws the same)."""
    captions = class_captions(data, class_word)
    drawn = []
    with lora_mod.disabled(model.models):
        for i in range(0, len(captions), CHUNK):
            part = captions[i:i + CHUNK]
            lat = seeded_latents(model, range(seed * 1000 + i, seed * 1000 + i + len(part)))
            lat = denoise(model, model.encode(part), model.encode([""] * len(part)), lat, SAMPLE_STEPS,
                          progress=False)
            drawn.append(lat.float().cpu())
    return Prior(torch.cat(drawn), captions)


def pick(prior: Prior, seed: int, step: int) -> tuple[torch.Tensor, list[str]]:
    """The class pictures of `step` and their captions."""
    idx = torch.randperm(len(prior.captions), generator=seeded(seed, "prior", step))[:PRIOR_ROWS].tolist()
    return prior.latents[idx], [prior.captions[i] for i in idx]
