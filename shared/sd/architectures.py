"""Configs of the bases the project can build without any download: `tiny` (SD1.5 block layout at toy widths)
and `sd15-random` (the real SD1.5 architecture). Both keep SD1.5's 16 cross-attention layers."""

from __future__ import annotations

from typing import Any


def recipe_of(spec: str) -> str:
    """Which tuning recipe a base takes: `small` for the pretrained toy world, whose attention projections alone
    cannot take a concept's shape (docs/world.md); `reference` (the paper's) for real bases and for `tiny` (random
    weights: it draws noise either way, and it is the test base)."""
    return "small" if spec == "world" else "reference"


# The sentences fusion's statistics prompt a concept with, in the base's own caption language: the inputs a fused
# layer must serve are those of pictures that show the concept. A real SD base read web captions; the toy world only
# its scene grammar, where "a photo of <alice>" draws nothing of alice, so the spatial statistics measured features
# of no concept and fusion lost every concept there (docs/world.md, "Trials of the tenth session").
STAT_PROMPTS = {
    "captions": ("a photo of {}", "{}", "a close-up photo of {}", "{} in a garden", "a painting of {}",
                 "{} on a beach"),
    "world": ("a {} on the left", "a {} on the right", "a {} in the center", "a {} at the top", "a {} at the bottom",
              "a {} on the left, on a dark background"),
}


def stat_prompts_of(spec: str) -> tuple[str, ...]:
    """Prompt templates ("{}" is the concept's handle) for a base's fusion statistics and retention checks."""
    return STAT_PROMPTS["world" if spec == "world" else "captions"]


def default_placement(spec: str) -> str:
    """The layers a base's recipe puts LoRA on, so tuning and fusion agree without being told."""
    return "wide" if recipe_of(spec) == "small" else "attention"


_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# SD1.x noise schedule (training and the default for sampling schedulers).
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

CLIP_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "vocab_size": 49408}


def tiny() -> dict[str, dict[str, Any]]:
    return {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), down_block_types=_DOWN, up_block_types=_UP,
            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, **CLIP_IDS,
        ),
    }


def world() -> dict[str, dict[str, Any]]:
    """The pretrained toy world's base: tiny's UNet layout on 16x16 latents of 64-px pictures, a 64-wide text
    encoder, an autoencoder that downsamples 4x (not 8x) and is wider at full resolution."""
    cfg = tiny()
    # 2 heads, not 8: 4-wide heads made flash attention's backward 2x the cost of the rest of a CPU training step
    cfg["unet"].update(sample_size=16, attention_head_dim=2, cross_attention_dim=64)
    # 4x down: an 8x autoencoder this small, trained for minutes on CPU, came back blurry with shifted colours
    # (each latent had to carry an 8x8 patch); 16x16 latents keep regions meaningful either way
    cfg["vae"].update(block_out_channels=(32, 64, 64), down_block_types=["DownEncoderBlock2D"] * 3,
                      up_block_types=["UpDecoderBlock2D"] * 3, sample_size=64, scaling_factor=1.0,
                      mid_block_add_attention=False)
    cfg["text_encoder"].update(hidden_size=64, intermediate_size=128, projection_dim=64)
    return cfg


def sd15() -> dict[str, dict[str, Any]]:
    return {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), down_block_types=_DOWN, up_block_types=_UP,
            attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, **CLIP_IDS,
        ),
    }
