"""Defaults of `mos tune`, kept free of heavy imports so that `mos tune --help` and input checks stay quick."""

# Default length: the reference makes ~500 passes over the images (batch 2-4). On a CPU that is capped so a
# demo-sized concept tunes in minutes; --steps always wins.
DEFAULT_PASSES = 500
STEP_CAP = {"cuda": 4000, "cpu": 400}
CHECKPOINT_EVERY = 250
SAMPLE_STEPS = 20  # sampler steps of the before/after images
