"""Concepts kept apart in self-attention while they are drawn side by side.

Regional sampling gives each concept its own prompt in cross-attention, but self-attention still lets every pixel
look at every other. Two concepts of one class (alice's red star and carol's green star) have nearly the same
features up to their colour, so their pixels attend to each other most and trade colours: on the world base three
concepts side by side came out all right in 0.62 of the pictures, alice mostly green where she failed. Here a query
inside one concept's core (the middle of its box, where its object is drawn: `t2i.disc_box`, the layout disc) does
not see keys inside another concept's core; everything else, background and world objects included, attends as
before. With it, the same fused model drew all three right in 0.94 and 1.00 of 16 pictures at two seeds
(docs/world.md, "Trials of the twentieth session"). Boxes whose prompt names no concept are never kept apart, so
world objects side by side draw as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from mos.shared.sampling.layout import BoxT, Region, cells, grid_size
from mos.shared.sampling.t2i import concept_boxes, disc_box, largest_disc
from mos.shared.sd.model import self_attention_processors


def concept_cores(regions: Sequence[Region], size: tuple[int, int], base) -> list[BoxT]:
    """The cores (fractions) of a picture's boxes whose prompt names a concept; fewer than two means nothing to
    keep apart, so then none."""
    cores = [disc_box(box, size, largest=largest_disc(base)) for box in concept_boxes(regions)]
    return cores if len(cores) >= 2 else []


class ApartAttnProcessor(AttnProcessor2_0):
    """Self-attention in which a query inside one core does not see the keys inside another core of its picture.
    `cores[p]` are picture p's; a batch holds whole copies of the pictures in turn (the sampler's [uncond, cond])."""

    def __init__(self, cores: Sequence[Sequence[BoxT]], latent_hw: tuple[int, int]):
        super().__init__()
        self.cores, self.latent_hw = [list(c) for c in cores], latent_hw
        self._allowed: dict[int, torch.Tensor] = {}

    def allowed(self, n_queries: int, device: torch.device) -> torch.Tensor:
        """[pictures, N, N] bool: may query i attend to key j."""
        if n_queries not in self._allowed:
            h, w = grid_size(self.latent_hw, n_queries)
            masks = []
            for cores in self.cores:
                owner = torch.full((h, w), -1)
                for i, box in enumerate(cores):
                    r0, r1, c0, c1 = cells(box, h, w)
                    owner[r0:r1, c0:c1] = i  # where boxes overlap, the later core owns the cell
                o = owner.flatten()
                masks.append(~((o[:, None] >= 0) & (o[None, :] >= 0) & (o[:, None] != o[None, :])))
            self._allowed[n_queries] = torch.stack(masks).to(device)
        return self._allowed[n_queries]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        plain = (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3
                 or attn.spatial_norm is not None or attn.group_norm is not None)
        if plain or not any(len(c) >= 2 for c in self.cores):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        b, n, _ = hidden_states.shape
        if b % len(self.cores):
            raise ValueError(f"kept apart: batch {b} is not a whole number of copies of {len(self.cores)} pictures")
        # [B, 1, N, N], broadcast over heads: the stock processor takes a mask too, but copies it per head
        mask = self.allowed(n, hidden_states.device)[torch.arange(b) % len(self.cores)][:, None]
        heads = attn.heads
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, heads * d)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def kept_apart(unet: torch.nn.Module, cores: Sequence[Sequence[BoxT]], latent_hw: tuple[int, int]) -> Iterator[None]:
    """ApartAttnProcessor on the transformer blocks' self-attention (attn1) for the length of the block."""
    proc = ApartAttnProcessor(cores, latent_hw)  # one for all: the masks are per resolution, shared
    with self_attention_processors(unet, lambda k: proc):
        yield
