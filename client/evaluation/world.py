"""`mos eval world`: the paper's claims measured in the toy world, read by the judge.

0. The base alone: does it draw the shape, colour and place a prompt names, and do two named objects keep their
   own colours (binding), plain prompt vs regional sampling? (`--base-only` stops here: no tuning, a minute.)
1. One concept: ED-LoRA vs plain LoRA (no concept tokens, trigger "sks CLASS") — how often the judge recognises
   the concept in the box the prompt put it in.
2. Two and three concepts fused: gradient fusion (staged; with `--one-shot` also one-shot) vs weight fusion —
   each concept's recognition rate relative to its own single-concept ED-LoRA (1.0 = no identity lost).
3. Multi-concept pictures from the three-concept gradient-fused model, each object in a square of the base's own
   size side by side: regional sampling vs the plain prompt — how often every concept is found in its box ("all
   present"), and, with a concept beside a world object of a named colour, how often that object has its shape
   and colour in its own box ("binding").
Everything is seeded; tuned adapters are cached in the work folder, so a second run only samples and judges.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.config import FusionConfig
from mos.shared.sampling.denoise import decode, sample, seeded_latents
from mos.shared.sampling.layout import Region
from mos.shared.sampling.regional import denoise_batch
from mos.shared.sampling.t2i import concept_boxes, layout_attached
from mos.shared.sd.base import Base
from mos.shared.sd.model import ConceptModel
from mos.shared.world import scenes as world
from mos.shared.world.judge import Judge

HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}
PLACES = ("left", "right", "center")


@dataclass
class Settings:
    data: Path                 # folder holding the concept folders
    work: Path                 # tuned adapters and fused results are kept here
    concepts: tuple[str, ...] = ("alice", "bob", "carol")
    tune_steps: int | None = None  # None: the base's recipe
    images: int = 16           # pictures per concept and condition
    sample_steps: int = 20
    fusion_steps: int = 10     # sampling steps for stage-3 statistics
    seed: int = 0
    workers: int = 2           # tuning runs side by side
    one_shot: bool = False     # also fuse one-shot (the paper's staged-vs-one-shot ablation; ~1.5 min on world)


def box(position: str) -> tuple[float, float, float, float]:
    """Where a big object at `position` sits: what the judge looks at."""
    return world.Thing("circle", "red", "big", position).box()


def recognition(base_fn, adapter: Adapter, judge: Judge, name: str, s: Settings) -> float:
    """Fraction of pictures of `a <name> <place>` in which the judge finds the concept at that place."""
    model = ConceptModel.from_adapter(base_fn(), adapter)
    places = [PLACES[i % len(PLACES)] for i in range(s.images)]
    images = sample(model, [f"a <{name}> {world.PLACE[p]}" for p in places], seed=s.seed, steps=s.sample_steps,
                    progress=False)  # one batch: on a base this small, 16 pictures cost about what 2 do
    return sum(judge(img, [box(p)])[0]["object"] == name for img, p in zip(images, places)) / s.images


def tune_all(s: Settings, base_spec: str) -> dict[str, dict[str, Adapter]]:
    """{"ed-lora" | "lora": {concept: adapter}}: every concept tuned both ways, `s.workers` runs at a time (one
    CPU thread each: a toy model gains nothing from a second thread, and runs side by side use both cores)."""
    from mos.client.tuning.edlora import plain_trigger

    jobs = []
    for kind in ("ed-lora", "lora"):
        for name in s.concepts:
            look = world.CONCEPTS.get(name)
            trigger = plain_trigger(look.class_word if look else "") if kind == "lora" else ""
            folder = s.work / ("lora" if kind == "lora" else "edlora") / name
            jobs.append((kind, name, (str(s.data / name), str(folder), base_spec, s.tune_steps, s.seed, trigger)))
    if s.workers > 1:
        with ProcessPoolExecutor(s.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            folders = list(pool.map(_tune_one, [args for _, _, args in jobs]))
    else:
        folders = [_tune_one(args) for _, _, args in jobs]
    out: dict[str, dict[str, Adapter]] = {"ed-lora": {}, "lora": {}}
    for (kind, name, _), folder in zip(jobs, folders):
        out[kind][name] = adapter_io.load(folder)
    return out


@torch.no_grad()
def autoencoder_ceiling(base: Base, judge: Judge, name: str, s: Settings) -> dict[str, float]:
    """What no adapter can beat: how often the judge finds the concept in its own drawings as drawn
    (`drawn`), and after a round trip through the base's autoencoder (`autoencoded`) — a tuned model only ever
    makes latents, so a look the autoencoder cannot carry is lost before tuning starts."""
    import numpy as np

    vae, backgrounds = base.vae, tuple(world.BACKGROUNDS)
    drawn = kept = 0
    for i in range(s.images):
        # every place × background × size in turn (18 pictures), then again with the object nudged
        place = PLACES[i % len(PLACES)]
        background = backgrounds[(i // len(PLACES)) % len(backgrounds)]
        size = ("big", "small")[(i // (len(PLACES) * len(backgrounds))) % 2]
        nudge = 0.02 * (0, -1, 1)[(i // 18) % 3]
        img = world.render(world.Scene([world.concept_thing(name, size, place, (nudge, nudge))], background))[0]
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        y = vae.decode(vae.encode(x.to(base.device, vae.dtype)).latent_dist.mean).sample
        back = Image.fromarray(((y[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        drawn += judge(img, [box(place)])[0]["object"] == name
        kept += judge(back, [box(place)])[0]["object"] == name
    return {"drawn": drawn / s.images, "autoencoded": kept / s.images}


def _tune_one(args: tuple) -> str:
    """One tuning run (a process of its own when runs go side by side; the result is cached on disk)."""
    from mos.client.tuning.edlora import TuneConfig
    from mos.client.tuning.tune import tune

    data, folder, base_spec, steps, seed, trigger = args
    torch.set_num_threads(1)
    return str(tune(data, folder, TuneConfig(steps=steps, seed=seed, trigger=trigger), base_spec, progress=False))


def fused(s: Settings, base: Base, owns: list[Adapter], method: str, one_shot: bool) -> Adapter:
    from mos.shared.fusion.local import fuse, write_result

    names = "+".join(a.concepts[0].name for a in owns)
    # named by what went in, so a retuned concept or another base never meets an old fusion
    h = hashlib.sha256(base.fingerprint.encode())
    for a in owns:
        tensors = [t for _, BA in sorted(a.lora.items()) for t in BA] + [c.embeddings for c in a.concepts]
        for t in tensors:
            h.update(t.detach().float().cpu().numpy().tobytes())
    folder = s.work / "fused" / f"{names}-{method}{'-one-shot' if one_shot else ''}-{h.hexdigest()[:12]}"
    if (folder / adapter_io.FILENAME).is_file():
        return adapter_io.load(folder)
    result = fuse(owns, base, FusionConfig(method, one_shot, sample_steps=s.fusion_steps), progress=False)
    write_result(result, folder)
    return result


def columns(k: int) -> list[tuple[float, float, float, float]]:
    """k side-by-side boxes (fractions): in a picture k times as wide as the base's, each is a square of the
    base's own size, where a concept is drawn as big as it was tuned."""
    return [(i / k, 0.0, (i + 1) / k, 1.0) for i in range(k)]


def column_box(i: int, k: int) -> tuple[float, float, float, float]:
    """Where the judge looks in column i of k: a big object's box at the column's centre."""
    x0, y0, x1, y1 = box("center")
    return ((i + x0) / k, y0, (i + x1) / k, y1)


def pair_prompt(left: str, right: str, regional: bool) -> tuple[str, list[Region] | tuple]:
    """The prompt and regions (regional: each phrase in its half) of a picture of `left` beside `right`."""
    regions = [Region(left, box=HALVES["left"]), Region(right, box=HALVES["right"])] if regional else ()
    return f"{left} on the left and {right} on the right", regions


def draw_all(model: ConceptModel, jobs: list[tuple[str, list[Region] | tuple]], seed: int, s: Settings,
             width: int = 1, layout: bool = True) -> list[Image.Image]:
    """Pictures `width` times as wide as the base's, one per (prompt, regions), seeds seed, seed + 1, …. With
    regions, regional sampling as Mix-of-Show does it: the region prompts plus a spatial condition, here (with
    `layout`) the base's layout adapter asking for one object in each box, where it ships one. Pictures with the
    same layout (boxes, and which of them name a concept) go in one batch (on the world base 0.65 of their time one
    by one with two threads, bench/regional.py --batch)."""
    size = (width * model.base.resolution, model.base.resolution)
    groups: dict[tuple, list[int]] = {}
    for i, (_, regions) in enumerate(jobs):
        groups.setdefault((tuple(r.box for r in regions), tuple(concept_boxes(regions))), []).append(i)
    out: dict[int, Image.Image] = {}
    for members in groups.values():
        regions = jobs[members[0]][1]
        lat = seeded_latents(model, [seed + i for i in members], size)
        with layout_attached(model.base, regions, size) if regions and layout else contextlib.nullcontext():
            lat = denoise_batch(model, [jobs[i] for i in members], lat, steps=s.sample_steps, progress=False)
        out.update(zip(members, decode(model, lat)))
    return [out[i] for i in range(len(jobs))]


def prompt_following(model: ConceptModel, judge: Judge, s: Settings) -> float:
    """How often one object comes out with the shape, colour and place its prompt names."""
    colours, places = list(world.COLOURS), list(world.POSITIONS)
    said = {"colour": True, "size": False, "position": True, "background": False}
    things = [world.Thing(world.SHAPES[i % len(world.SHAPES)], colours[(3 * i) % len(colours)], "big",
                          places[i % len(places)]) for i in range(s.images)]
    images = sample(model, [world.caption(world.Scene([t], "gray", said=said)) for t in things], seed=s.seed + 300,
                    steps=s.sample_steps, progress=False)
    got = [judge(img, [t.box()])[0] for img, t in zip(images, things)]
    return sum(g["object"] == t.shape and g["colour"] == t.colour for g, t in zip(got, things)) / s.images


def object_binding(model: ConceptModel, judge: Judge, s: Settings, regional: bool, layout: bool = True) -> float:
    """How often two named objects both keep their shape and colour, each in its own half."""
    colours = list(world.COLOURS)
    pairs = [[(colours[(2 * i + k) % len(colours)], world.SHAPES[(i + 1 + 2 * k) % len(world.SHAPES)]) for k in (0, 1)]
             for i in range(s.images)]
    jobs = [pair_prompt(*(f"a {c} {sh}" for c, sh in objects), regional) for objects in pairs]
    images = draw_all(model, jobs, s.seed + 400, s, layout=layout)
    hits = 0
    for img, objects in zip(images, pairs):
        got = judge(img, [box("left"), box("right")])
        hits += all(g["object"] == sh and g["colour"] == c for g, (c, sh) in zip(got, objects))
    return hits / s.images


def base_rates(base: Base, judge: Judge, s: Settings) -> dict:
    """Part 0, the base alone before any concept: prompt following, and two-object binding with the plain prompt,
    with regional sampling, and with the region prompts alone (no layout condition)."""
    model = ConceptModel(base)
    return {"prompt_following": prompt_following(model, judge, s),
            "binding": {"plain": object_binding(model, judge, s, False),
                        "regional": object_binding(model, judge, s, True),
                        "regional_prompts_only": object_binding(model, judge, s, True, layout=False)}}


def together_prompt(names: list[str], regional: bool) -> tuple[str, list[Region] | tuple]:
    """The prompt and regions of a picture of every concept side by side, each in its own column."""
    regions = [Region(f"a <{n}>", box=b) for n, b in zip(names, columns(len(names)))] if regional else ()
    return ", ".join(f"a <{n}>" for n in names[:-1]) + f" and a <{names[-1]}>", regions


def multi_concept(base_fn, adapter: Adapter, judge: Judge, s: Settings) -> tuple[dict, dict[str, list]]:
    """Plain prompt vs regional sampling: how often every concept is found in its own box (pictures of all the
    concepts side by side, in turn in every order), and binding (a concept beside a world object of a named
    colour). Every object gets a square of the base's own size."""
    model = ConceptModel.from_adapter(base_fn(), adapter)
    names = list(s.concepts)
    k = len(names)
    orders = [names[i:] + names[:i] for i in range(k)]
    orders += [o[::-1] for o in orders]
    groups = [orders[i % len(orders)] for i in range(s.images)]
    colours = list(world.COLOURS)
    beside = [(g[0], world.SHAPES[i % len(world.SHAPES)], colours[i % len(colours)]) for i, g in enumerate(groups)]
    out, pictures = {}, {}
    for mode in ("plain", "regional"):
        regional = mode == "regional"
        alls = draw_all(model, [together_prompt(g, regional) for g in groups], s.seed + 100, s, k)
        jobs = [pair_prompt(f"a <{c}>", f"a {colour} {shape}", regional) for c, shape, colour in beside]
        pairs = draw_all(model, jobs, s.seed + 200, s, 2)
        present = sum(all(g["object"] == n for g, n in zip(judge(img, [column_box(j, k) for j in range(k)]), group))
                      for img, group in zip(alls, groups))
        bound = 0
        for img, (c, shape, colour) in zip(pairs, beside):
            got = judge(img, [column_box(0, 2), column_box(1, 2)])
            bound += got[0]["object"] == c and got[1]["object"] == shape and got[1]["colour"] == colour
        out[mode] = {"all_present": present / s.images, "binding": bound / s.images}
        pictures[mode] = [im for both in zip(alls, pairs) for im in both]
    return out, pictures


def evaluate(s: Settings, base_spec: str = "world", judge: Judge | None = None, base_only: bool = False
             ) -> tuple[dict, dict[str, list]]:
    """The measurements (a JSON-able dict) and the multi-concept pictures, plain and regional."""
    from mos.shared.sd.base import load_base

    judge = judge or Judge()
    loaded = load_base(base_spec)

    def fresh() -> Base:  # ConceptModel mutates its base: every model gets its own copy
        import copy

        return copy.deepcopy(loaded)

    head = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
            "base": base_spec, "base_fingerprint": loaded.fingerprint, "base_alone": base_rates(fresh(), judge, s)}
    if base_only:
        return head, {}
    head["ceiling"] = {n: autoencoder_ceiling(loaded, judge, n, s) for n in s.concepts if n in world.CONCEPTS}
    steps = tqdm(total=4, desc="eval world", unit="part")
    tuned = tune_all(s, base_spec)
    ed, plain = tuned["ed-lora"], tuned["lora"]
    steps.update()
    single = {n: {"ed-lora": recognition(fresh, ed[n], judge, n, s), "lora": recognition(fresh, plain[n], judge, n, s)}
              for n in s.concepts}
    steps.update()
    fusion = {}
    for k in (2, 3) if len(s.concepts) >= 3 else (len(s.concepts),):
        group = list(s.concepts[:k])
        for label, method, one_shot in (("gradient", "gradient", False),
                                        *([("gradient one-shot", "gradient", True)] if s.one_shot else []),
                                        ("weight", "weight", False)):
            f = fused(s, loaded, [ed[n] for n in group], method, one_shot)
            for n in group:
                rate = recognition(fresh, f, judge, n, s)
                own = single[n]["ed-lora"]
                fusion.setdefault(f"{k} concepts", {}).setdefault(label, {})[n] = {
                    "rate": rate, "relative": rate / own if own else None}  # None: nothing to keep
    steps.update()
    three = fused(s, loaded, [ed[n] for n in s.concepts], "gradient", False)
    multi, pictures = multi_concept(fresh, three, judge, s)
    steps.update()
    steps.close()
    result = {**head, "single": single, "fusion": fusion, "multi": multi}
    return {**result, "summary": summary(result)}, pictures


def summary(r: dict) -> dict[str, float]:
    """The headline numbers (each in 0–1): the lowest over the concepts where a rate is per concept; a fused
    concept's keep is its rate over its own ED-LoRA's (capped at 1; 0 where its own was 0)."""
    def keep(method: str) -> float:
        per = r["fusion"]["3 concepts"][method]
        return min(min(1.0, v["relative"] or 0.0) for v in per.values())

    single = r["single"].values()
    return {"single_edlora_min": min(v["ed-lora"] for v in single), "single_lora_min": min(v["lora"] for v in single),
            "fused3_gradient_keep_min": keep("gradient"), "fused3_weight_keep_min": keep("weight"),
            "regional_all_present": r["multi"]["regional"]["all_present"],
            "plain_all_present": r["multi"]["plain"]["all_present"],
            "base_two_objects_regional": r["base_alone"]["binding"]["regional"]}


def _ratio(x: float | None) -> str:
    return "  —" if x is None else f"{x:.2f}"


def _mean_relative(per: dict) -> float:
    vals = [v["relative"] for v in per.values() if v["relative"] is not None]
    return sum(vals) / len(vals) if vals else 0.0


def table(r: dict) -> str:
    b = r["base_alone"]
    lines = [f"0. the base alone: prompt following {b['prompt_following']:.2f}; two objects bound: "
             f"plain prompt {b['binding']['plain']:.2f}, regional {b['binding']['regional']:.2f} "
             f"(region prompts alone {b['binding']['regional_prompts_only']:.2f})"]
    if "single" not in r:
        return "\n".join(lines)
    ceiling = r.get("ceiling", {})
    lines += ["1. one concept: recognition rate (ceiling: its own drawings as drawn / through the autoencoder)",
              f"{'concept':<10}{'ED-LoRA':>10}{'LoRA':>10}{'drawn':>10}{'autoenc.':>10}"]
    lines += [f"{n:<10}{v['ed-lora']:>10.2f}{v['lora']:>10.2f}" + "".join(
        f"{ceiling[n][k]:>10.2f}" for k in ("drawn", "autoencoded") if n in ceiling) for n, v in r["single"].items()]
    lines.append("2. fused: recognition rate relative to the concept's own ED-LoRA (rate)")
    for group, methods in r["fusion"].items():
        for method, per in methods.items():
            cells = "  ".join(f"{n} {_ratio(v['relative'])} ({v['rate']:.2f})" for n, v in per.items())
            lines.append(f"  {group:<11}{method:<19}{cells}")
    lines.append("3. multi-concept pictures (3-concept gradient fusion)")
    lines.append(f"{'':<10}{'all present':>13}{'binding':>10}")
    lines += [f"{mode:<10}{v['all_present']:>13.2f}{v['binding']:>10.2f}" for mode, v in r["multi"].items()]
    return "\n".join(lines)


def figure(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mos.client.tuning.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(r["single"])
    x = torch.arange(len(names)).numpy()
    for j, (key, label) in enumerate((("ed-lora", "ED-LoRA"), ("lora", "LoRA"))):
        axes[0].bar(x + (j - 0.5) * 0.38, [r["single"][n][key] for n in names], 0.38, label=label)
    axes[0].set(xticks=x, xticklabels=names, ylim=(0, 1.05), title="one concept: recognised")
    axes[0].legend(fontsize=8)
    labels, values = [], []
    for group, methods in r["fusion"].items():
        for method, per in methods.items():
            labels.append(f"{group[0]}: {method}")
            values.append(_mean_relative(per))
    axes[1].barh(labels, values, color="tab:green")
    axes[1].axvline(0.9, color="grey", ls="--", lw=1)
    axes[1].set(xlim=(0, 1.2), title="fused: mean rate vs own ED-LoRA")
    modes = list(r["multi"])
    xm = torch.arange(2).numpy()
    for j, mode in enumerate(modes):
        axes[2].bar(xm + (j - 0.5) * 0.38, [r["multi"][mode]["all_present"], r["multi"][mode]["binding"]], 0.38,
                    label=mode)
    axes[2].set(xticks=xm, xticklabels=["all present", "binding"], ylim=(0, 1.05), title="multi-concept pictures")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def strip(pictures: dict[str, list], path: Path, scale: int = 3) -> None:
    """One row per mode (plain prompt, regional) of the multi-concept pictures, enlarged."""
    from PIL import ImageDraw

    rows = [(mode, ims) for mode, ims in pictures.items() if ims]
    H, label = max(im.height for _, ims in rows for im in ims) * scale, 70
    width = max(sum(im.width for im in ims) for _, ims in rows) * scale
    sheet = Image.new("RGB", (label + width, H * len(rows)), "white")
    d = ImageDraw.Draw(sheet)
    for r, (mode, ims) in enumerate(rows):
        d.text((4, r * H + H // 2 - 6), mode, fill="black")
        x = label
        for im in ims:  # pictures of all the concepts and pairs side by side: each at its own width
            sheet.paste(im.resize((im.width * scale, im.height * scale), Image.LANCZOS), (x, r * H))
            x += im.width * scale
    sheet.save(path)


def write(r: dict, pictures: dict[str, list], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "world_eval.json").write_text(json.dumps(r, indent=1))
    if "single" not in r:  # --base-only: nothing to draw
        return
    figure(r, out / "world_eval.png")
    strip(pictures, out / "world_eval_pictures.png")
