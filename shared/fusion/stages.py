"""What a concept's owner computes in each fusion stage (docs/design.md, "The three stages").

The same functions serve the federated client and the one-machine `mos fuse`:
  stage 1  text-encoder inputs, from the concept's own model, on its prompts (encoded layer-wise)
  stage 2  cross-attention k/v inputs: the *fused* text encoder's features at the concept-token positions and the
           end token, per cross-attention layer (layer-wise embeddings make the 16 layers differ)
  stage 3  spatial-layer inputs recorded while sampling the concept's prompts with the fused text encoder, fused
           k/v and the concept's own spatial LoRA
One-shot mode computes all three from the concept's own model in one pass (cheaper, less exact).
Each function takes a base it may mutate (LoRA and processors are applied to it).
"""

from __future__ import annotations

import torch

from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.stats import Stats, StatsRecorder, empty, heldout_key
from mos.shared.sampling.denoise import denoise, seeded_latents
from mos.shared.sd.architectures import stat_prompts_of
from mos.shared.sd.base import Base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.lora import Lora
from mos.shared.sd.model import ConceptModel
from mos.shared.sd.sites import Site, cross_attention_layers, input_sites

# Stage 3 samples the first n statistics prompts, k times each (seeds sample_seed + 0, 1, ...). On real bases the
# first two once: enough rows, a fraction of the time. On the toy world base, whose sampling is cheap, two pictures
# a concept left the fused layers blind to the places and backgrounds the concept's other prompts and seeds draw;
# every prompt three times raised the weaker two concepts from 0.54 and 0.60 of their pictures to 0.75 and 0.73
# (docs/world.md, "Trials of the thirteenth session").
STAGE3_SAMPLES = {"world": (6, 3)}
STAGE3_DEFAULT = (2, 1)


def prompts_for(concept: str, spec: str) -> list[str]:
    """The statistics' prompts for `concept` on the base `spec`, in that base's caption language."""
    return [p.format(f"<{concept}>") for p in stat_prompts_of(spec)]


def stage3_prompts(concept: str, spec: str) -> list[str]:
    """The prompts stage 3 samples for `concept` on the base `spec`, one trajectory each."""
    n, k = STAGE3_SAMPLES.get(spec, STAGE3_DEFAULT)
    return prompts_for(concept, spec)[:n] * k


def heldout_prompts(concept: str, spec: str) -> list[str]:
    """The held-out share's prompts: the sampled prompts once each, from the seeds after the fitted trajectories'."""
    n, _ = STAGE3_SAMPLES.get(spec, STAGE3_DEFAULT)
    return prompts_for(concept, spec)[:n]


def sites_of(base_or_model, stage: int, placement: str | None = None) -> list[Site]:
    b = base_or_model.base if isinstance(base_or_model, ConceptModel) else base_or_model
    return [s for s in input_sites(b.text_encoder, b.unet, placement or "attention") if s.stage == stage]


@torch.no_grad()
def text_encoder_stats(model: ConceptModel, concept: str) -> Stats:
    # every row of the prompts padded to 77, padding included (the reference drops it): the UNet reads the padding
    # positions too; measured, it ties at the default ε and retains better with λ by GCV (docs/design.md)
    with StatsRecorder(model.models, sites_of(model, 1)) as rec:
        model.encode(prompts_for(concept, model.base.spec))
    return rec.stats


@torch.no_grad()
def kv_stats(model: ConceptModel, concept: str) -> Stats:
    """attn2 k/v read the text features directly: their Gram is built from the conditioning, no UNet pass."""
    prompts = prompts_for(concept, model.base.spec)
    cond = model.encode(prompts)  # [B, L, 77, dim]
    ids = model.prompts.layerwise_ids(prompts)[:, 0]
    first_eos = (ids == model.base.tokenizer.eos_token_id).int().argmax(dim=1)
    keep = model.prompts.concept_mask(prompts)  # its own tokens, or a plain LoRA's trigger words
    keep[torch.arange(len(prompts)), first_eos] = True
    by_layer = dict(zip(cross_attention_layers(model.base.unet), range(cond.shape[1])))
    stats: Stats = {}
    for site in sites_of(model, 2):
        k = by_layer[site.name.removeprefix("unet.").removesuffix(".kv")]
        g = empty(site.dim)
        g.add_rows(cond[:, k][keep.to(cond.device)])
        stats[site.name] = g
    return stats


@torch.no_grad()
def spatial_stats(model: ConceptModel, concept: str, config: FusionConfig = FusionConfig()) -> Stats:
    """The spatial sites' Grams along the stage-3 trajectories; with config.uses_heldout also each site's held-out share
    (under stats.heldout_key), from trajectories of the seeds that follow."""
    prompts = stage3_prompts(concept, model.base.spec)
    stats = _sampled(model, prompts, config.sample_seed, config)
    if config.uses_heldout:
        held = _sampled(model, heldout_prompts(concept, model.base.spec), config.sample_seed + len(prompts), config)
        stats |= {heldout_key(site): g for site, g in held.items()}
    return stats


def _sampled(model: ConceptModel, prompts: list[str], seed: int, config: FusionConfig) -> Stats:
    cond, uncond = model.encode(prompts), model.encode([""] * len(prompts))
    latents = seeded_latents(model, range(seed, seed + len(prompts)))
    with StatsRecorder(model.models, sites_of(model, 3, config.placement)) as rec:
        denoise(model, cond, uncond, latents, config.sample_steps, config.guidance, progress=False)
    return rec.stats


def stage1(own: ConceptModel, concept: str, config: FusionConfig = FusionConfig()) -> Stats:
    """Text-encoder statistics from the concept's own model; one-shot: every site's."""
    stats = text_encoder_stats(own, concept)
    if config.one_shot:
        stats |= kv_stats(own, concept)
        stats |= spatial_stats(own, concept, config)
    return stats


def stage2(base: Base, fused_te: Lora, concepts: list[Concept], concept: str) -> Stats:
    model = ConceptModel(base)
    model.set_lora(fused_te)
    for c in concepts:
        model.prompts.add(c)
    return kv_stats(model, concept)


def stage3(base: Base, fused: Lora, own: Adapter, concepts: list[Concept], concept: str,
           config: FusionConfig = FusionConfig()) -> Stats:
    """Spatial statistics with fused text encoder + fused k/v and the concept's own spatial LoRA."""
    spatial = {s for site in sites_of(base, 3, config.placement) for s in site.layers}
    lora = {k: v for k, v in fused.items() if k not in spatial}
    lora |= {k: v for k, v in own.lora.items() if k in spatial}
    model = ConceptModel(base)
    model.set_lora(lora)
    for c in concepts:
        model.prompts.add(c)
    return spatial_stats(model, concept, config)

