"""The project's own encode/denoise loop (stock pipelines reject layer-wise 4-D conditioning).

DPM-Solver++ by default, classifier-free guidance, deterministic by seed: the initial noise is drawn on the CPU
from a seeded generator, so the same seed gives the same image on any device.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image
from tqdm.auto import tqdm

from mos.shared.sd.model import ConceptModel

SCHEDULERS = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def make_scheduler(model: ConceptModel, name: str = "dpm++"):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: {', '.join(SCHEDULERS)}")
    config = {k: v for k, v in model.base.scheduler_config.items() if not k.startswith("_")}
    if name == "dpm++":
        config["algorithm_type"] = "dpmsolver++"
    return SCHEDULERS[name].from_config(config)


def initial_latents(model: ConceptModel, n: int, seed: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    w, h = size or (model.base.resolution, model.base.resolution)
    s = model.base.vae_scale
    if w % s or h % s:
        raise ValueError(f"image size {w}x{h} must be a multiple of {s}")
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (n, model.base.unet.config.in_channels, h // s, w // s)
    return torch.randn(shape, generator=g).to(model.base.device, model.base.dtype)


def seeded_latents(model: ConceptModel, seeds: Iterable[int], size: tuple[int, int] | None = None) -> torch.Tensor:
    """One picture's starting noise per seed, stacked: picture i of a batch is the picture its seed draws alone."""
    return torch.cat([initial_latents(model, 1, seed, size) for seed in seeds])


@torch.no_grad()
def denoise(model: ConceptModel, cond: torch.Tensor, uncond: torch.Tensor | None, latents: torch.Tensor,
            steps: int = 20, guidance: float = 7.5, scheduler: str = "dpm++",
            cross_attention_kwargs: dict[str, Any] | None = None, progress: bool = True,
            on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the sampler from `latents`; with guidance > 1 the batch is [uncond, cond]."""
    sched = make_scheduler(model, scheduler)
    sched.set_timesteps(steps, device=latents.device)
    latents = latents * sched.init_noise_sigma
    use_cfg = uncond is not None and guidance > 1.0
    context = torch.cat([uncond, cond]) if use_cfg else cond
    for i, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False)):
        x = torch.cat([latents] * 2) if use_cfg else latents
        x = sched.scale_model_input(x, t)
        eps = model.predict(x, t, context, cross_attention_kwargs=cross_attention_kwargs)
        if use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        latents = sched.step(eps, t, latents).prev_sample
        if on_step:
            on_step(i, latents)
    return latents


@torch.no_grad()
def decode(model: ConceptModel, latents: torch.Tensor) -> list[Image.Image]:
    vae = model.base.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in x]


def sample(model: ConceptModel, prompts: list[str], negative: str = "", seed: int = 0, steps: int = 20,
           guidance: float = 7.5, size: tuple[int, int] | None = None, scheduler: str = "dpm++",
           progress: bool = True) -> list[Image.Image]:
    """Images for prompts (one per prompt, seeds seed, seed+1, …)."""
    cond = model.encode(prompts)
    uncond = model.encode([negative] * len(prompts)) if guidance > 1.0 else None
    lat = seeded_latents(model, range(seed, seed + len(prompts)), size)
    return decode(model, denoise(model, cond, uncond, lat, steps, guidance, scheduler, progress=progress))
