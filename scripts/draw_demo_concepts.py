"""Draw the demo concepts `data/alice` and `data/bob`: two made-up figures, deterministic by seed.

alice: a doll with a round yellow head, a purple triangular dress with white stripes, red shoes.
bob:   a robot with a square teal body, a grey square head, one red antenna and round orange eyes.
Each image varies position, scale, pose (a small tilt) and background; a caption with <TOK> and a mask go beside it.
Run: python scripts/draw_demo_concepts.py [--out data] [--n 10]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
BACKGROUNDS = [("a garden", (120, 180, 110)), ("a beach", (230, 215, 160)), ("a blue room", (110, 140, 200)),
               ("a grey street", (150, 150, 150)), ("a pink wall", (230, 170, 190)), ("the snow", (240, 240, 245))]


def draw_alice(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, tilt: float) -> None:
    head_r = 11 * s
    hx, hy = cx + tilt * 8 * s, cy - 24 * s
    dress = [(cx, cy - 12 * s), (cx - 20 * s, cy + 26 * s), (cx + 20 * s, cy + 26 * s)]
    d.polygon(dress, fill=(130, 50, 170))
    for k in (0, 1, 2):  # white stripes across the dress
        y = cy + (k * 11 - 2) * s
        half = 20 * s * (y - (cy - 12 * s)) / (38 * s)
        d.line([(cx - half, y), (cx + half, y)], fill=(250, 250, 250), width=max(1, int(2 * s)))
    d.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=(245, 205, 40))
    for dx in (-9, 5):
        d.rectangle([cx + dx * s, cy + 26 * s, cx + (dx + 5) * s, cy + 31 * s], fill=(210, 30, 30))


def draw_bob(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, tilt: float) -> None:
    d.rectangle([cx - 16 * s, cy - 8 * s, cx + 16 * s, cy + 26 * s], fill=(20, 150, 150))
    hx = cx + tilt * 6 * s
    d.rectangle([hx - 12 * s, cy - 32 * s, hx + 12 * s, cy - 9 * s], fill=(120, 120, 125))
    d.line([(hx, cy - 32 * s), (hx + tilt * 6 * s, cy - 44 * s)], fill=(60, 60, 60), width=max(1, int(2 * s)))
    d.ellipse([hx + tilt * 6 * s - 4 * s, cy - 48 * s, hx + tilt * 6 * s + 4 * s, cy - 40 * s], fill=(220, 30, 30))
    for dx in (-6, 6):
        d.ellipse([hx + dx * s - 4 * s, cy - 25 * s, hx + dx * s + 4 * s, cy - 17 * s], fill=(255, 140, 0))


FIGURES = {"alice": (draw_alice, "doll"), "bob": (draw_bob, "robot")}


def draw(name: str, i: int, rng: random.Random) -> tuple[Image.Image, Image.Image, str]:
    fn, _ = FIGURES[name]
    place, bg = BACKGROUNDS[i % len(BACKGROUNDS)]
    s = rng.uniform(0.9, 1.4)
    cx, cy = rng.uniform(40, 88), rng.uniform(58, 70)
    tilt = rng.uniform(-1, 1)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    silhouette = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    fn(ImageDraw.Draw(img), cx, cy, s, tilt)
    fn(ImageDraw.Draw(silhouette), cx, cy, s, tilt)  # the same shapes on black: anything drawn is the figure
    mask = silhouette.convert("L").point(lambda v: 255 if v else 0)
    return img, mask, f"a photo of <TOK> in {place}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    for seed, (name, (_, cls)) in enumerate(FIGURES.items()):
        rng = random.Random(1000 + seed)
        folder = Path(args.out) / name
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        (folder / "concept.toml").write_text(f'name = "{name}"\nclass_word = "{cls}"\n')
        for i in range(args.n):
            img, mask, caption = draw(name, i, rng)
            img.save(folder / f"{i:02d}.png", optimize=True)
            mask.save(folder / "masks" / f"{i:02d}.png", optimize=True)
            (folder / f"{i:02d}.txt").write_text(caption + "\n")
        print(f"wrote {args.n} images of {name} ({cls}) to {folder}")


if __name__ == "__main__":
    main()
