"""`mos tune --concept DIR --out DIR`: one concept's ED-LoRA on this machine."""

from __future__ import annotations

import sys

from mos.shared.commands.base import add_base_options

HELP = "tune one concept's ED-LoRA"


def register(sub) -> None:
    from mos.client.tuning.settings import (ATTENTION_REG_MODES, CHECKPOINT_EVERY, DEFAULT_PASSES, REFERENCE_BATCH,
                                            STEP_CAP)

    p = sub.add_parser("tune", help=HELP, description=(
        "Tune a concept's ED-LoRA (two layer-wise tokens + LoRA) from a folder of images with optional "
        "<stem>.txt captions (<TOK> marks the concept), masks/<stem>.png and concept.toml (name, class_word, kind, "
        "init_word). "
        "A finished output folder with the same data, settings and base is reused as it is."))
    p.add_argument("--concept", required=True, help="concept folder")
    p.add_argument("--out", required=True, help="output folder (adapter.safetensors, concept.json, loss.png, "
                   "samples.png)")
    add_base_options(p)
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default: the base's recipe: 800 on "
                   f"world; elsewhere {DEFAULT_PASSES} passes over the images at the batch size, at most "
                   f"{STEP_CAP['cpu']} on a CPU, {STEP_CAP['cuda']} on a GPU)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the base's recipe: 4, the paper's; "
                   "16 on world)")
    p.add_argument("--spatial-rank", type=int, default=None, help="rank of the spatial layers' LoRA (self-attention, "
                   "cross-attention q/out, feed-forward, convolutions; default: --rank). Lower keeps more of each "
                   "concept through fusion, which shares these layers between concepts")
    p.add_argument("--placement", choices=("attention", "transformer", "wide"), default=None,
                   help="layers that carry LoRA (default: the base's recipe: attention, the paper's; wide on "
                   "tiny/world: + feed-forward, transformer projections and ResNet convolutions)")
    p.add_argument("--mask-outside", type=float, default=None, help="loss weight outside a concept's masks (0: the "
                   "paper's masked loss, the default on real bases; 1: unmasked, the default on tiny/world)")
    p.add_argument("--prior", type=float, default=None, help="weight of prior preservation: the base's own pictures "
                   "of the class, drawn first, are tuned on beside the concept's (0: off, the default on real bases; "
                   "the world base's recipe sets it)")
    p.add_argument("--class-word", default=None, help="class word that initialises the second token (one token: "
                   "dog, woman, toy...; default: class_word in concept.toml)")
    p.add_argument("--init-word", default=None, help="word that initialises the first token (one token that says "
                   "what sets the concept apart from its class, e.g. its colour; default: init_word in concept.toml, "
                   "else a small random vector, as the reference)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw: same seed, same adapter (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the base's "
                   f"recipe: {REFERENCE_BATCH} per step, as the reference, in two micro-batches of "
                   f"{REFERENCE_BATCH // 2} on a GPU under 20 GiB; 4 on world)")
    p.add_argument("--grad-accum", type=int, default=None, help="forward passes whose gradients make one step "
                   "(default 1, or 2 where --batch-size is left to the recipe on a small GPU)")
    p.add_argument("--crop", choices=("square", "human"), default=None, help="training crop: square (random "
                   "50-100%% square, flipped half the time) or human (the reference's crop for people: the head "
                   "stays, padded, never flipped); default: by concept.toml kind, human for person and character")
    p.add_argument("--captions", choices=("augment", "fixed"), default="augment", help="augment (default, as the "
                   "reference): a missing caption is drawn each step from prompts for the concept's kind, and a "
                   "written caption keeps its first comma-separated part and shuffles the rest; fixed: as written")
    p.add_argument("--attn-reg", choices=ATTENTION_REG_MODES, default=None, help="attention regulariser with "
                   "masks: full (token b's attention equals the mask), partial (it only stays inside: the "
                   "reference's default) or off; default: by concept.toml kind, off for style, else partial")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, help="steps between checkpoints "
                   f"(default {CHECKPOINT_EVERY}; 0: none)")
    p.add_argument("--plain", nargs="?", const="", default=None, metavar="TRIGGER",
                   help="a plain LoRA instead of ED-LoRA (the paper's baseline): no concept tokens, the handle "
                   "stands for trigger words (default 'sks CLASS_WORD')")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (large bases)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from mos.client.tuning.data import image_files

    image_files(args.concept)  # a missing or empty folder is reported before the heavy imports
    from mos.client.tuning.edlora import TuneConfig
    from mos.client.tuning.tune import tune

    trigger = ""
    if args.plain is not None:
        from pathlib import Path

        from mos.client.tuning.data import read_toml
        from mos.client.tuning.edlora import plain_trigger

        trigger = args.plain or plain_trigger(args.class_word or read_toml(Path(args.concept)).get("class_word") or "")
    try:
        config = TuneConfig(steps=args.steps, rank=args.rank, spatial_rank=args.spatial_rank,
                            batch_size=args.batch_size, seed=args.seed, placement=args.placement,
                            mask_outside=args.mask_outside, prior=args.prior,
                            trigger=trigger.strip(), grad_accum=args.grad_accum, crop=args.crop,
                            attention_reg_mode=args.attn_reg, captions=args.captions)
        out = tune(args.concept, args.out, config, args.base, class_word=args.class_word, init_word=args.init_word,
                   resume=args.resume, checkpoint_every=args.checkpoint_every, device=args.device, dtype=args.dtype,
                   gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress)
    except FloatingPointError as e:  # diverged: say so in one line, the checkpoint is kept
        print(f"mos tune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmos tune: interrupted; `mos tune ... --resume` continues from the last checkpoint in {args.out}",
              file=sys.stderr)
        return 130
    print(out)
    return 0
