"""Draw the demo concepts `data/alice`, `data/bob`, `data/carol`: objects the toy world has no words for.

alice: a red star with white stripes     (class word "diamond")
bob:   a blue ring with yellow checks    (class word "circle")
carol: a purple heart with orange dots   (class word "triangle")
Drawn by the world's own renderer (mos.shared.world.scenes), alone or beside a world object, at varied places, sizes and
backgrounds; a caption with <TOK> and the concept's mask go beside each image. Deterministic by seed.
Run: python scripts/draw_demo_concepts.py [--out data] [--n 10]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from mos.shared.world import scenes as world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    for seed, (name, look) in enumerate(world.CONCEPTS.items()):
        rng = random.Random(1000 + seed)
        folder = Path(args.out) / name
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        (folder / "concept.toml").write_text(f'name = "{name}"\nclass_word = "{look.class_word}"\n')
        for i in range(args.n):
            scene, caption = world.concept_scene(name, rng)
            img, masks = world.render(scene)
            img.save(folder / f"{i:02d}.png", optimize=True)
            masks[0].point(lambda v: 255 if v >= 128 else 0).save(folder / "masks" / f"{i:02d}.png", optimize=True)
            (folder / f"{i:02d}.txt").write_text(caption + "\n")
        print(f"wrote {args.n} images of {name} ({look.shape} with {look.pattern}) to {folder}")


if __name__ == "__main__":
    main()
