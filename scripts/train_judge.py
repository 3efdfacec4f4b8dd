"""Train the judge (mos.shared.world.judge) on crops of the world's renders and the demo concepts' renders.

    python scripts/train_judge.py            # writes shared/world/judge.safetensors and prints held-out accuracy

Crops are blurred, rescaled and noised the way a small diffusion model's pictures are, so the judge reads samples,
not only clean renders. Deterministic by seed; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from mos.shared.world import scenes as world
from mos.shared.world.judge import COLOURS, CROP, OBJECTS, JudgeNet, crop

IGNORE = -100


def _overlap(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]))


def _degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * world.SIZE / 64))
    if rng.random() < 0.5:
        s = int(world.SIZE * rng.choice((0.5, 0.625, 0.75)))
        img = img.resize((s, s), Image.BILINEAR).resize(img.size, Image.BILINEAR)
    return img


def _jitter(box, rng: random.Random):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = rng.uniform(0.85, 1.25)
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.12, 0.12) * w, (y0 + y1) / 2 + rng.uniform(-0.12, 0.12) * h
    return (cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2)


def examples(n: int, seed: int, patterned: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    xs, objs, cols = [], [], []
    names = list(world.CONCEPTS)
    for _ in tqdm(range(n // 2), desc=f"crops (seed {seed})", unit="scene", leave=False):
        if rng.random() < 0.35:
            scene, _ = world.concept_scene(rng.choice(names), rng)
        else:
            scene = world.random_scene(rng, patterned=patterned)  # a striped diamond is a diamond, not alice
        img = _degrade(world.render(scene)[0], rng)
        t = rng.choice(scene.things)
        xs.append(crop(img, _jitter(t.box(), rng)))
        concept = next((k for k, v in world.CONCEPTS.items() if t.pattern and v.shape == t.shape), None)
        objs.append(OBJECTS.index(concept or t.shape))
        cols.append(IGNORE if concept else COLOURS.index(t.colour))
        for _ in range(20):  # an empty box of a similar size somewhere else: "none"
            r = world.SIZES[rng.choice(list(world.SIZES))]
            cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_overlap(box, o.box()) < 0.05 for o in scene.things):
                xs.append(crop(img, box))
                objs.append(OBJECTS.index("none"))
                cols.append(IGNORE)
                break
    return torch.stack(xs), torch.tensor(objs), torch.tensor(cols)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shift = (torch.rand(x.shape[0], 3, 1, 1, generator=g) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=g) * torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.12
    return (x + shift + noise).clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="shared/world/judge.safetensors")
    ap.add_argument("--train", type=int, default=24000)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patterned", type=float, default=0.3,
                    help="chance that a world object is patterned (the world base draws them; the judge must not "
                    "take them for a concept)")
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, yo, yc = examples(args.train, args.seed, args.patterned)
    vx, vo, vc = examples(3000, args.seed + 1, args.patterned)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc="judge", unit="step"):
        idx = torch.randint(0, len(x), (64,), generator=g)
        lo, lc = net(augment(x[idx], g))
        loss = F.cross_entropy(lo, yo[idx]) + F.cross_entropy(lc, yc[idx], ignore_index=IGNORE)
        for grp in opt.param_groups:
            grp["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        lo, lc = net(vx)
    keep = vc != IGNORE
    report = {"object_accuracy": float((lo.argmax(-1) == vo).float().mean()),
              "colour_accuracy": float((lc.argmax(-1)[keep] == vc[keep]).float().mean()),
              "per_object": {o: float((lo.argmax(-1)[vo == i] == i).float().mean()) for i, o in enumerate(OBJECTS)},
              "train_crops": len(x), "steps": args.steps, "crop": CROP, "patterned": args.patterned}
    out = Path(args.out)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
