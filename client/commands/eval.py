"""`mos eval retention fused/ runs/alice runs/bob [--also other_fused/ …] [--json]`
`mos eval clip fused/ --clip CLIP_FOLDER --concept data/alice --concept data/bob [--category C] [--json]`."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from mos.shared.commands.base import add_base_options

if TYPE_CHECKING:
    from mos.shared.formats import adapter as adapter_io


HELP = "measure fused models"


def register(sub) -> None:
    p = sub.add_parser("eval", help=HELP)
    esub = p.add_subparsers(dest="eval_command", required=True)
    r = esub.add_parser("retention", help="per concept: ‖ε_fused − ε_own‖ / ‖ε_own − ε_base‖ along sampled "
                        "trajectories (0 = identity kept, 1 = as far off as the base)")
    r.add_argument("fused", help="fused folder (or adapter file)")
    r.add_argument("own", nargs="+", help="each concept's own tuned folder")
    r.add_argument("--also", nargs="+", default=[], metavar="FUSED", help="more fused results to compare side by side")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print {concept: {method: error}}")
    add_base_options(r)
    r.set_defaults(run=run_retention)
    c = esub.add_parser("clip", help="the paper's CLIP text- and image-alignment, with a local CLIP model folder")
    c.add_argument("adapter", help="fused (or single-concept) folder or adapter file")
    c.add_argument("--clip", required=True, help="a local CLIPModel folder (config, weights, tokenizer files)")
    c.add_argument("--concept", action="append", required=True, metavar="FOLDER",
                   help="a concept folder: its images are the references (repeat for each concept)")
    # the keys of evaluation.clip.CATEGORIES, written out: importing it here would load torch for every `mos` call
    c.add_argument("--category", choices=("human", "animal", "object", "scene"), default=None,
                   help="the reference's prompt list to draw from (default: by each folder's kind; person and "
                   "character: human, object: object)")
    c.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="prompts one a line with <TOK> for the concept (the reference's benchmark_prompts format)")
    c.add_argument("--prompts", type=int, default=4, help="prompts per concept, spread over the list (the paper: 20)")
    c.add_argument("--images", type=int, default=2, help="images per prompt (the paper: 50)")
    c.add_argument("--steps", type=int, default=20, help="sampling steps")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print {concept: {text_alignment, image_alignment, images, "
                   "references, category, prompts}}")
    add_base_options(c)
    c.set_defaults(run=run_clip)
    w = esub.add_parser("world", help="the paper's claims in the toy world, read by the judge (ED-LoRA vs LoRA, "
                        "gradient vs weight fusion, regional vs plain prompts)")
    w.add_argument("--data", default=None, help="folder with the concept folders (default: the demo concepts, "
                   "drawn into the work folder by the world's renderer: the same as data/ in the repository)")
    w.add_argument("--concepts", nargs="+", default=["alice", "bob", "carol"])
    w.add_argument("--out", default="mos-out/eval-world", help="where world_eval.json and world_eval.png go")
    w.add_argument("--work", default=None, help="tuned and fused adapters (default MOS_HOME/eval-world; reused)")
    w.add_argument("--tune-steps", type=int, default=None, help="tuning steps (default: the base's recipe)")
    w.add_argument("--images", type=int, default=16, help="pictures per concept and condition (default 16)")
    w.add_argument("--steps", type=int, default=20, help="sampling steps")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--json", action="store_true", help="print the JSON (and nothing else) instead of the table")
    w.add_argument("--base", default="world", help="base (default world: the judge knows only that world)")
    w.add_argument("--one-shot", action="store_true", help="also fuse one-shot (no staging), the paper's ablation "
                   "(about 1.5 minutes more on world)")
    w.add_argument("--base-only", action="store_true", help="only part 0, the base alone (no tuning; a minute)")
    w.set_defaults(run=run_world)


def label(fused: adapter_io.Adapter, path: str) -> str:
    info = fused.meta.get("fusion", {})
    return f"{info.get('method', path)}/{info.get('mode', '?')}" if info else path


def run_retention(args) -> int:
    from mos.client.evaluation.retention import retention
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.sd.base import load_base

    base = load_base(args.base, args.device, args.dtype)
    owns = [adapter_io.load(p) for p in args.own]
    table: dict[str, dict[str, float]] = {o.concepts[0].name: {} for o in owns}
    for path in [args.fused, *args.also]:
        fused = adapter_io.load(path)
        key = label(fused, path)
        for name, err in retention(base, fused, owns, args.steps, args.seed).items():
            table[name][key] = err
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    keys = list(next(iter(table.values())))
    print(f"{'concept':<16}" + "".join(f"{k:>22}" for k in keys))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[k]:>22.4f}" for k in keys))
    return 0


def run_clip(args) -> int:
    from PIL import Image

    from mos.client.evaluation.clip import CATEGORIES, Clip, category_for, evaluate, pick, read_prompt_file
    from mos.client.tuning.data import load_concept
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.sd.base import load_base

    if args.category and args.prompt_file:
        raise ValueError("give --category or --prompt-file, not both")
    if args.prompts < 1 or args.images < 1:
        raise ValueError("--prompts and --images must be at least 1")
    own = read_prompt_file(args.prompt_file) if args.prompt_file else None
    base = load_base(args.base, args.device, args.dtype)
    refs, templates, category = {}, {}, {}
    for folder in args.concept:
        data = load_concept(folder, base.resolution)
        refs[data.name] = [Image.fromarray(it.image.permute(1, 2, 0).numpy()) for it in data.items]
        category[data.name] = "file" if own else args.category or category_for(data.kind)
        templates[data.name] = own or CATEGORIES[category[data.name]]
        pick(templates[data.name], args.prompts)  # a --prompts the list cannot give fails before any sampling
    adapter = adapter_io.load(args.adapter)
    clip = Clip(args.clip, base.device)
    table = evaluate(base, adapter, refs, clip, templates, args.prompts, args.images, args.steps, args.seed)
    for name, row in table.items():
        row["category"] = category[name]
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'concept':<16}{'category':>10}{'text-alignment':>16}{'image-alignment':>17}{'images':>8}")
    for name, row in table.items():
        print(f"{name:<16}{row['category']:>10}{row['text_alignment']:>16.4f}{row['image_alignment']:>17.4f}"
              f"{row['images']:>8}")
    return 0


def run_world(args) -> int:
    from pathlib import Path

    from mos.client.evaluation.world import Settings, evaluate, table, write
    from mos.shared.sd.base import mos_home

    # the default work folder is per base, tuning length and seed: a retrained base or other settings never meet
    # adapters tuned for something else
    work = Path(args.work) if args.work else mos_home() / "eval-world" / "{}-t{}-s{}".format(
        args.base.replace(":", "-").replace("/", "_"), args.tune_steps or "recipe", args.seed)
    data = Path(args.data) if args.data else work / "concepts"
    if not args.data:
        from mos.shared.world.scenes import CONCEPTS, draw_concepts

        unknown = sorted(set(args.concepts) - set(CONCEPTS))
        if unknown:
            raise ValueError(f"no demo concept {unknown[0]!r} (demo concepts: {', '.join(CONCEPTS)}); pass --data")
        draw_concepts(data, names=tuple(args.concepts))
    s = Settings(data, work, tuple(args.concepts), args.tune_steps, args.images, args.steps, seed=args.seed,
                 one_shot=args.one_shot)
    for name in s.concepts:
        if not (s.data / name).is_dir():
            raise FileNotFoundError(f"no concept folder {s.data / name}")
    result, pictures = evaluate(s, args.base, base_only=args.base_only)
    write(result, pictures, Path(args.out))
    print(json.dumps(result, indent=2) if args.json else table(result))
    figures = "" if args.base_only else ", world_eval.png and world_eval_pictures.png"
    print(f"wrote {Path(args.out) / 'world_eval.json'}{figures}", file=sys.stderr, flush=True)
    return 0
