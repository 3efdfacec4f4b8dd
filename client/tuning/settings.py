"""Defaults of `mos tune`, kept free of heavy imports so that `mos tune --help` and input checks stay quick."""

# Default length: the reference makes ~500 passes over the images (batch 2-4). On a CPU that is capped so a
# demo-sized concept tunes in minutes; --steps always wins.
DEFAULT_PASSES = 500
STEP_CAP = {"cuda": 4000, "cpu": 400}
CHECKPOINT_EVERY = 250
SAMPLE_STEPS = 20  # sampler steps of the before/after images

# What a tuning run uses where TuneConfig leaves a field unset (None), by base (shared/sd/architectures.recipe_of).
# `reference` is the paper's recipe (attention-only LoRA, masked loss), the default on real SD bases. `small` was
# measured on the toy world base, where attention-only adapters never drew a concept's shape (docs/world.md, "An
# adapter recipe for a small base"); its placement is architectures.default_placement's, which fusion uses.
RECIPES = {
    "reference": {"placement": "attention", "rank": 4, "lr_embedding": 1e-3, "lr_text_encoder": 1e-5,
                  "lr_unet": 1e-4, "mask_outside": 0.0, "attention_reg": 0.01, "prior": 0.0},
    "small": {"placement": "wide", "rank": 16, "lr_embedding": 1e-3, "lr_text_encoder": 3e-4,
              "lr_unet": 3e-3, "mask_outside": 1.0, "attention_reg": 0.0, "batch_size": 4, "steps": 800,
              "prior": 0.0},
}


# The reference's schedule (its `B4_Repeat500` configs): 500 passes over the images at 4 images per optimiser step.
# A recipe without `batch_size` takes REFERENCE_BATCH: all at once where the device holds it (batch_plan), else
# in micro-batches of 2 with gradient accumulation, the same effective batch.
REFERENCE_BATCH = 4
SMALL_GPU_BYTES = 20 * 2**30  # a GPU with less memory than this runs the reference batch as 2 x 2

# What a concept's kind (concept.toml `kind`) sets where TuneConfig leaves it unset, as the reference's configs do:
# people and characters get its HumanResizeCropFinalV3 crop; every kind gets reg_full_identity: false ("partial":
# only the reference's Thanos uses "full"); a style has no region to regularise.
KIND_DEFAULTS = {
    "person": {"crop": "human", "attention_reg_mode": "partial"},
    "character": {"crop": "human", "attention_reg_mode": "partial"},
    "object": {"crop": "square", "attention_reg_mode": "partial"},
    "style": {"crop": "square", "attention_reg_mode": "off"},
}
ATTENTION_REG_MODES = ("full", "partial", "off")


def recipe_for(base_spec: str) -> str:
    from mos.shared.sd.architectures import recipe_of

    return recipe_of(base_spec)
