r"""`mos sample`: draw an image with concepts, optionally with regions and T2I-Adapter conditions.

    mos sample --adapter fused/ --prompt "<alice> and <bob> on a beach" \
        --region "<alice>, a doll||0,0,0.5,1" --region "<bob>, a robot||0.5,0,1,1" --out beach.png

Writes the image, `<name>_layout.png` (boxes and labels drawn on it, when there are regions) and `<name>.json`
(every setting, seed included; `mos sample --layout <name>.json …` reads its regions back).
Every input is checked before the first step: region strings, the layout and concept handles even before the
base model loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mos.shared.commands.base import add_base_options

if TYPE_CHECKING:
    from mos.shared.sampling.layout import Region

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


HELP = "draw images with concepts (and regions)"


def register(sub) -> None:
    from mos.shared.sampling.layout import LAYOUT_HELP

    p = sub.add_parser("sample", help=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=__doc__ + "\nlayout file (TOML; JSON with the same keys and a "
                       "'regions' list works too):\n" + LAYOUT_HELP)
    p.add_argument("--adapter", help="adapter file or folder (one concept or a fused set); none: the plain base")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="A",
                   help="multiply the adapter's LoRA by A (default 1; 0: the concepts' embeddings only; the "
                        "reference shows a single concept at 0.7)")
    p.add_argument("--prompt", help="the global prompt; concepts by handle, e.g. <alice>")
    p.add_argument("--negative", help="global negative prompt (default: empty)")
    p.add_argument("--region", action="append", default=[], metavar="PROMPT|NEG|x0,y0,x1,y1",
                   help="a region: box as left,top,right,bottom in fractions 0-1 or pixels; an empty NEG means the "
                        "global negative; an optional 4th field is its T2I weight. The reference's "
                        "[prompt]-*-[neg]-*-[top,left,bottom,right] strings joined by | are accepted too. Repeatable")
    p.add_argument("--layout", help="a .toml or .json layout file (prompt, negative, size, regions); --prompt, "
                                    "--negative and --size override it, --region adds to it")
    p.add_argument("--out", default="sample.png", help="output image (default sample.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", help="WxH in pixels (default: the base's native size)")
    p.add_argument("--scheduler", default="dpm++", choices=["dpm++", "ddim", "euler"])
    t = p.add_argument_group("T2I-Adapter")
    t.add_argument("--t2i-adapter", action="append", default=[], metavar="[sketch=|keypose=]PATH",
                   help="diffusers T2IAdapter folder; prefix with sketch= / keypose= when the two conditions use "
                        "different adapters")
    t.add_argument("--sketch", help="sketch condition image (output size)")
    t.add_argument("--keypose", help="keypose condition image (output size)")
    t.add_argument("--t2i-weight", type=float, default=1.0,
                   help="global T2I weight (default 1); a region's own weight overrides it inside its box")
    t.add_argument("--sketch-weight", type=float, default=None, help="the sketch condition's weight (default: "
                   "--t2i-weight; the paper pairs keypose 0.8 with sketch 0.5)")
    t.add_argument("--keypose-weight", type=float, default=None, help="the keypose condition's weight (default: "
                   "--t2i-weight)")
    t.add_argument("--t2i-until", type=float, default=None, metavar="F",
                   help="inside region boxes that name a concept, the conditions act for the first F of the sampling "
                        "schedule only (default 1: throughout; with --fill-boxes 0.5: its discs say where, the "
                        "concept's adapter then draws its own shape)")
    t.add_argument("--fill-boxes", action="store_true",
                   help="ask for one object in each region box: draws <name>_sketch.png (a disc in each box) and "
                        "uses it as the sketch condition with the base's own layout adapter (the world base ships "
                        "one); its weight is --sketch-weight, default the one the adapter was measured at (2)")
    p.add_argument("--no-apart", dest="apart", action="store_false",
                   help="let the concepts' pixels attend to each other in self-attention, as the paper's sampler "
                        "does (default: the middle of each box that names a concept is kept apart from the others', "
                        "so that concepts of one class do not trade colours; docs/design.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_base_options(p)
    p.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------- checking inputs

def gather(args) -> tuple[str, str, list[Region], tuple[int, int] | None]:
    """Global prompt, negative, regions (boxes not yet resolved) and size from flags and the layout file."""
    from mos.shared.sampling.layout import Layout, LayoutError, load_layout, parse_region, parse_size

    layout = load_layout(args.layout) if args.layout else Layout()
    prompt = args.prompt if args.prompt is not None else layout.prompt
    if not prompt or not prompt.strip():
        raise LayoutError("no prompt: pass --prompt (or set prompt in the --layout file)")
    negative = args.negative if args.negative is not None else (layout.negative or "")
    regions = list(layout.regions or []) + [r for text in args.region for r in parse_region(text)]
    size = parse_size(args.size) if args.size else layout.size
    return prompt.strip(), negative, regions, size


def t2i_paths(args) -> dict[str, tuple[str, str]]:
    """condition kind -> (adapter path, image path) for the conditions given."""
    images = {k: getattr(args, k) for k in ("sketch", "keypose") if getattr(args, k)}
    named, plain = {}, []
    for item in args.t2i_adapter:
        kind, sep, path = item.partition("=")
        if sep and kind in ("sketch", "keypose"):
            named[kind] = path
        else:
            plain.append(item)
    if len(plain) > 1:
        raise ValueError("several --t2i-adapter without a kind: write sketch=PATH / keypose=PATH")
    if images and not (named or plain):
        raise ValueError(f"--{next(iter(images))} needs --t2i-adapter PATH")
    if (named or plain) and not images:
        raise ValueError("--t2i-adapter needs a condition image: --sketch IMG and/or --keypose IMG")
    out = {}
    for kind, image in images.items():
        path = named.get(kind) or (plain[0] if plain else None)
        if path is None:
            raise ValueError(f"--{kind} has no adapter: pass --t2i-adapter {kind}=PATH")
        out[kind] = (path, image)
    return out


def check_fill_boxes(args, regions: list) -> Path | None:
    """With --fill-boxes: the base's layout adapter folder, after checking the flag fits the other inputs."""
    if not args.fill_boxes:
        return None
    from mos.shared.sd.base import layout_adapter_folder

    if not regions:
        raise ValueError("--fill-boxes draws one object in each region box: give --region (or a --layout file)")
    if args.sketch or args.t2i_adapter:
        raise ValueError("--fill-boxes makes the sketch condition itself: drop --sketch / --t2i-adapter, or "
                         "drop --fill-boxes")
    folder = layout_adapter_folder(args.base)
    if folder is None:
        raise ValueError(f"--fill-boxes: base {args.base} ships no layout adapter (only world does); pass "
                         "--t2i-adapter sketch=PATH --sketch IMG with an adapter trained for it")
    return folder


def use_fill_boxes(args, folder: Path, regions: list, size: tuple[int, int], image_path: Path, base) -> dict:
    """Draw the disc sketch beside the output and make it an ordinary sketch condition (so the record's
    reproduce command needs no --fill-boxes)."""
    from mos.shared.sampling.t2i import CONCEPT_UNTIL, FILL_WEIGHT, disc_sketch, largest_disc

    sketch = image_path.with_name(image_path.stem + "_sketch.png")
    sketch.parent.mkdir(parents=True, exist_ok=True)
    disc_sketch([r.box for r in regions], size, largest_disc(base)).save(sketch)
    args.t2i_adapter, args.sketch = [f"sketch={folder}"], str(sketch)
    if args.sketch_weight is None:
        args.sketch_weight = FILL_WEIGHT
    if args.t2i_until is None:
        args.t2i_until = CONCEPT_UNTIL
    return t2i_paths(args)


def condition_weights(args) -> dict[str, float]:
    """Each condition's weight: its own flag, else --t2i-weight."""
    return {k: w if (w := getattr(args, f"{k}_weight")) is not None else args.t2i_weight for k in ("sketch", "keypose")}


def until(args) -> float:
    """How much of the schedule the conditions act inside the concepts' boxes."""
    return 1.0 if args.t2i_until is None else args.t2i_until


def out_paths(out: str) -> tuple[Path, Path, Path]:
    p = Path(out)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: use an image name ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return p, p.with_name(p.stem + "_layout.png"), p.with_suffix(".json")


def check_numbers(args) -> None:
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if args.guidance < 0:
        raise ValueError("--guidance must not be negative")
    if args.lora_scale < 0:
        raise ValueError("--lora-scale must not be negative")
    if args.t2i_until is not None and not 0 <= args.t2i_until <= 1:
        raise ValueError("--t2i-until is a fraction of the sampling schedule: give a number from 0 to 1")


# ---------------------------------------------------------------------------------------------- outputs

def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reproduce_command(args, used: dict[str, Any], record_path: Path) -> str:
    cmd = ["mos", "sample", "--layout", str(record_path), "--prompt", used["prompt"], "--seed", str(args.seed),
           "--steps", str(args.steps), "--guidance", f"{args.guidance:g}", "--scheduler", args.scheduler,
           "--size", "x".join(map(str, used["size"])), "--base", args.base]
    if used["negative"]:
        cmd += ["--negative", used["negative"]]
    if args.adapter:
        cmd += ["--adapter", args.adapter, "--lora-scale", f"{args.lora_scale:g}"]
    for a in args.t2i_adapter:
        cmd += ["--t2i-adapter", a]
    for k in ("sketch", "keypose"):
        if getattr(args, k):
            cmd += [f"--{k}", getattr(args, k)]
    if args.t2i_adapter:
        cmd += ["--t2i-weight", f"{args.t2i_weight:g}"]
        for kind, w in condition_weights(args).items():
            if w != args.t2i_weight:
                cmd += [f"--{kind}-weight", f"{w:g}"]
        if until(args) != 1:
            cmd += ["--t2i-until", f"{until(args):g}"]
    if not args.apart:
        cmd += ["--no-apart"]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value:
            cmd += [flag, value]
    return shlex.join(cmd + ["--out", "again.png"])


def record(args, used: dict[str, Any], base, adapter, conditions: dict, seconds: float, outs) -> dict[str, Any]:
    """Every setting of the run (seed included), as JSON; its `layout` is a valid --layout."""
    import diffusers
    import torch
    import transformers

    from mos.shared.formats.adapter import adapter_file

    image, layout_png, json_path = outs
    regions = used["regions"]
    return {
        "format": "mos-sample", "version": 1,
        "image": image.name, "layout_image": layout_png.name if regions else None,
        "layout": {"prompt": used["prompt"], "negative": used["negative"], "size": list(used["size"]),
                   "regions": [r.as_dict() for r in regions]},
        "sampler": {"seed": args.seed, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
                    "apart": args.apart},
        "base": {"spec": args.base, "fingerprint": base.fingerprint},
        "adapter": None if adapter is None else {
            "path": args.adapter, "sha256": sha256(adapter_file(args.adapter)), "lora_scale": args.lora_scale,
            "concepts": [{"name": c.name, "handle": c.handle, "class_word": c.class_word} for c in adapter.concepts]},
        "t2i": None if not conditions else {
            "weight": args.t2i_weight, "weights": condition_weights(args), "until": until(args),
            "conditions": {k: {"adapter": a, "image": img, "image_sha256": sha256(img)}
                           for k, (a, img) in conditions.items()}},
        "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "seconds": round(seconds, 3),
        "reproduce": reproduce_command(args, used, json_path),
    }


# ---------------------------------------------------------------------------------------------- run

def run(args) -> int:
    # everything that needs no model is checked first
    check_numbers(args)
    prompt, negative, regions, size = gather(args)
    layout_folder = check_fill_boxes(args, regions)
    conditions = t2i_paths(args)
    outs = out_paths(args.out)

    from mos.shared.formats import adapter as adapter_mod
    from mos.shared.sampling.layout import check_handles

    adapter = adapter_mod.load(args.adapter) if args.adapter else None
    if adapter is not None and args.lora_scale != 1.0:
        adapter = adapter_mod.scaled(adapter, args.lora_scale)
    known = [c.name for c in adapter.concepts] if adapter else []
    check_handles([prompt, negative] + [t for r in regions for t in (r.prompt, r.negative)], known)

    from mos.shared.sampling import t2i
    from mos.shared.sampling.denoise import decode, initial_latents
    from mos.shared.sampling.preview import draw_layout
    from mos.shared.sampling.regional import denoise_regional
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel

    t0 = time.perf_counter()
    base = load_base(args.base, args.device, args.dtype)
    size = size or (base.resolution, base.resolution)
    if size[0] % base.vae_scale or size[1] % base.vae_scale:
        raise ValueError(f"--size {size[0]}x{size[1]} must be a multiple of {base.vae_scale}")
    regions = [r.fractions(size) for r in regions]
    if layout_folder is not None:
        conditions = use_fill_boxes(args, layout_folder, regions, size, outs[0], base)
    res = t2i.weighted_residuals(conditions, base, size, regions, condition_weights(args))
    if args.t2i_until is not None and not conditions:
        print("note: --t2i-until is ignored without a T2I condition (--t2i-adapter and an image, or --fill-boxes)",
              file=sys.stderr)

    model = ConceptModel.from_adapter(base, adapter) if adapter else ConceptModel(base)
    lat = initial_latents(model, 1, args.seed, size)
    with t2i.attached(base.unet, res, t2i.concept_boxes(regions), t2i.release_timestep(base, until(args))):
        lat = denoise_regional(model, prompt, negative, regions, lat, steps=args.steps, guidance=args.guidance,
                               scheduler=args.scheduler, progress=not args.quiet, apart=args.apart)
    image = decode(model, lat)[0]
    seconds = time.perf_counter() - t0

    image_path, layout_path, json_path = outs
    image_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path)
    if regions:
        draw_layout(image, regions, prompt).save(layout_path)
    used = {"prompt": prompt, "negative": negative, "size": size, "regions": regions}
    rec = record(args, used, base, adapter, conditions, seconds, outs)
    json_path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {image_path} ({size[0]}x{size[1]}, seed {args.seed}, {len(regions)} region(s), {seconds:.1f}s)"
          + (f", {layout_path}" if regions else "") + f", {json_path}")
    return 0
