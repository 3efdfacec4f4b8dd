"""Regionally controllable sampling (Mix-of-Show; docs/design.md, "Regionally controllable sampling").

In every cross-attention layer the output inside a region's box is replaced by the attention of the box's queries
to that region's prompt (layer-wise: layer k reads slice k of the region's 4-D conditioning); where boxes overlap
the region outputs are averaged; outside every box the global prompt rules. Under classifier-free guidance the
batch is [uncond, cond], and the unconditional half of each region attends to the region's negative prompt.

Regions reach the layers by swapping the cross-attention processors for the length of one sampling run
(`regional_attention`), so `mos.shared.sampling.denoise` stays the one sampling loop. Passing them through
`cross_attention_kwargs` would hand them to every self-attention processor as well, which diffusers inspects and
warns about on every call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from mos.shared.sampling.apart import concept_cores, kept_apart
from mos.shared.sampling.denoise import decode, denoise, initial_latents
from mos.shared.sampling.layout import BoxT, Region, cells, grid_size
from mos.shared.sd.model import ConceptModel, LayerwiseAttnProcessor, cross_attention_processors


@dataclass
class RegionPlan:
    """What the processors need: boxes (fractions), each region's conditioning, the latent size."""

    boxes: list[BoxT]
    context: torch.Tensor  # [regions, batch, layers, 77, dim]; batch = [uncond, cond] under guidance
    latent_hw: tuple[int, int]
    _index: dict[int, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def index(self, n_queries: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per region the flat indices of the queries inside its box; the queries outside every box; and per
        query how many boxes cover it (at least 1, so that dividing by it leaves outside queries alone)."""
        if n_queries not in self._index:
            h, w = grid_size(self.latent_hw, n_queries)
            count = torch.zeros(h, w)
            idx = []
            for box in self.boxes:
                r0, r1, c0, c1 = cells(box, h, w)
                count[r0:r1, c0:c1] += 1
                rows, cols = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
                idx.append((rows * w + cols).flatten().to(device))
            count = count.flatten()
            outside = (count == 0).nonzero().flatten().to(device)
            self._index[n_queries] = (idx, outside, count.clamp(min=1).to(device))
        return self._index[n_queries]


class RegionalAttnProcessor(LayerwiseAttnProcessor):
    """LayerwiseAttnProcessor(k) whose queries inside a box attend to the box's prompt instead of the global one.

    The same sums as running the stock processor once per prompt on that prompt's queries and averaging the
    outputs, with one q/k/v projection for all prompts (on tiny models the per-call overhead is what costs).
    """

    def __init__(self, layer: int, plan: RegionPlan):
        super().__init__(layer)
        self.plan = plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if (hidden_states.ndim != 3 or attention_mask is not None or attn.spatial_norm is not None
                or attn.group_norm is not None):
            raise ValueError("regional attention supports SD-style cross-attention only ([batch, queries, dim] "
                             "input, no mask, no spatial or group norm)")
        b, n, _ = hidden_states.shape
        glob = encoder_hidden_states[:, self.layer] if encoder_hidden_states.ndim == 4 else encoder_hidden_states
        regional = self.plan.context[:, :, self.layer].to(glob.dtype)  # [R, B, 77, dim]
        if regional.shape[1] != b:
            raise ValueError(f"regional attention: batch {b} but regions were prepared for {regional.shape[1]} "
                             "(guidance on/off must match the plan)")
        texts = torch.cat([glob[None], regional]).flatten(0, 1)  # [(1 + R) * B, 77, dim]: global first
        if attn.norm_cross:
            texts = attn.norm_encoder_hidden_states(texts)
        # One projection per input for all prompts; then each query attends to the prompt(s) that rule it:
        # the global prompt outside every box, each covering box's prompt inside (averaged where boxes overlap).
        q, k, v = attn.to_q(hidden_states), attn.to_k(texts), attn.to_v(texts)
        heads, d = attn.heads, k.shape[-1] // attn.heads
        q = q.view(b, n, heads, d).transpose(1, 2)  # [B, H, N, d]
        k, v = (t.view(-1, b, t.shape[1], heads, d).transpose(2, 3) for t in (k, v))  # [1 + R, B, H, 77, d]
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        idx, outside, count = self.plan.index(n, hidden_states.device)
        total = torch.zeros_like(q)
        for j, rows in enumerate([outside, *idx]):
            if len(rows):
                total.index_add_(2, rows, F.scaled_dot_product_attention(q[:, :, rows], k[j], v[j]))
        out = (total / count.to(q.dtype)[:, None]).transpose(1, 2).reshape(b, n, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # affine after the average: the same as averaging outputs
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def regional_attention(model: ConceptModel, plan: RegionPlan) -> Iterator[None]:
    """Regional processors on the cross-attention layers for the length of the block."""
    with cross_attention_processors(model.base.unet, lambda k: RegionalAttnProcessor(k, plan)):
        yield


def make_plan(model: ConceptModel, regions: Sequence[Region], negative: str, guidance: float,
              latent_hw: tuple[int, int]) -> RegionPlan:
    """One picture's plan: each region's prompt (and negative; empty -> the global negative), encoded layer-wise."""
    return batch_plan(model, [regions], negative, guidance, latent_hw)


def batch_plan(model: ConceptModel, pictures: Sequence[Sequence[Region]], negative: str, guidance: float,
               latent_hw: tuple[int, int]) -> RegionPlan:
    """The plan of several pictures sampled as one batch: their regions share boxes, each has its own prompts.
    The context's batch follows the denoiser's: [uncond of every picture, cond of every picture]."""
    boxes = [r.box for r in pictures[0]]
    if any([r.box for r in regions] != boxes for regions in pictures):
        raise ValueError("pictures sampled in one batch must share their regions' boxes")
    flat = [r for regions in pictures for r in regions]

    def encoded(prompts: list[str]) -> torch.Tensor:
        x = model.encode(prompts)  # [P·R, layers, 77, dim], picture by picture
        return x.view(len(pictures), len(boxes), *x.shape[1:]).transpose(0, 1)  # [R, P, layers, 77, dim]

    context = encoded([r.prompt for r in flat])
    if guidance > 1.0:
        context = torch.cat([encoded([r.negative or negative for r in flat]), context], dim=1)
    return RegionPlan(boxes, context, latent_hw)


def denoise_regional(model: ConceptModel, prompt: str, negative: str = "", regions: Sequence[Region] = (),
                     latents: torch.Tensor | None = None, seed: int = 0, steps: int = 20, guidance: float = 7.5,
                     size: tuple[int, int] | None = None, scheduler: str = "dpm++", progress: bool = True,
                     apart: bool = True) -> torch.Tensor:
    """Final latents [1, C, h, w] for a global prompt and regions whose boxes are fractions (Region.fractions).

    With no regions this is plain layer-wise sampling. T2I-Adapter residuals, when wanted, are attached around this
    call (`mos.shared.sampling.t2i.attached`). `apart`: concepts' cores kept apart in self-attention (apart.py).
    """
    if latents is None:
        latents = initial_latents(model, 1, seed, size)
    return denoise_batch(model, [(prompt, regions)], latents, negative, steps, guidance, scheduler, progress, apart)


def denoise_batch(model: ConceptModel, jobs: Sequence[tuple[str, Sequence[Region]]], latents: torch.Tensor,
                  negative: str = "", steps: int = 20, guidance: float = 7.5, scheduler: str = "dpm++",
                  progress: bool = True, apart: bool = True) -> torch.Tensor:
    """Final latents [P, C, h, w] of P pictures, each (prompt, regions), from latents [P, …]; their regions share
    boxes (batch_plan). On a small base P pictures in one batch cost little more than one. `apart`: the cores of
    the boxes that name a concept are kept apart in self-attention (apart.py)."""
    if any(r.in_pixels for _, regions in jobs for r in regions):
        raise ValueError("regional sampling takes boxes in fractions: call Region.fractions(size) first")
    cond = model.encode([prompt for prompt, _ in jobs])
    uncond = model.encode([negative] * len(jobs)) if guidance > 1.0 else None
    with contextlib.ExitStack() as stack:
        if any(regions for _, regions in jobs):
            latent_hw = tuple(latents.shape[-2:])
            pictures = [regions for _, regions in jobs]
            stack.enter_context(regional_attention(model, batch_plan(model, pictures, negative, guidance, latent_hw)))
            s = model.base.vae_scale
            size = (latent_hw[1] * s, latent_hw[0] * s)
            cores = [concept_cores(regions, size, model.base) for regions in pictures] if apart else []
            if any(cores):
                stack.enter_context(kept_apart(model.base.unet, cores, latent_hw))
        return denoise(model, cond, uncond, latents, steps, guidance, scheduler, progress=progress)


def sample_regional(model: ConceptModel, prompt: str, negative: str = "", regions: Sequence[Region] = (),
                    seed: int = 0, steps: int = 20, guidance: float = 7.5, size: tuple[int, int] | None = None,
                    scheduler: str = "dpm++", progress: bool = True, apart: bool = True) -> Image.Image:
    """One image; the same seed gives the same image."""
    lat = denoise_regional(model, prompt, negative, regions, None, seed, steps, guidance, size, scheduler, progress,
                           apart)
    return decode(model, lat)[0]

