"""Draw the demo concepts `data/alice`, `data/bob`, `data/carol`: objects the toy world has no words for.

alice: a red star     (class word "diamond")
bob:   a blue ring     (class word "circle")
carol: a green star    (class word "diamond": alice's class, so fusion meets concept conflict)
Drawn by the world's own renderer (mos.shared.world.scenes.draw_concepts), big, alone at each of the world's places
in turn or beside a small world object, on varied backgrounds; a caption with <TOK> and the concept's mask go beside
each image.
Deterministic by seed. Run: python scripts/draw_demo_concepts.py [--out data] [--n 10]
"""

from __future__ import annotations

import argparse

from mos.shared.world import scenes as world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    for folder in world.draw_concepts(args.out, args.n):
        look = world.CONCEPTS[folder.name]
        pattern = f" with {look.colour2} {look.pattern}" if look.pattern else ""
        print(f"wrote {args.n} images of {folder.name} ({look.colour} {look.shape}{pattern}) to {folder}")


if __name__ == "__main__":
    main()
