"""The judge: a small CNN that says what is inside a box of a world picture, and in which colour.

Classes: the world's shapes, the demo concepts (made-up objects), "other" (a made-up object that is none of the
concepts: a concept's shape and pattern with its colour, pattern or pattern colour changed, a near miss) and "none"
(empty background); colours: the world's. A concept is its whole look, not its shape: alice and carol are both stars.
Trained by scripts/train_judge.py on crops of the generator's renders, blurred and noised the way a small diffusion
model's pictures are; its weights ship with the package (shared/world/judge.safetensors). `mos eval world` asks it
whether each concept appears in its box and whether attributes stayed on the right object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mos.shared.world import scenes as world

CROP = 32
OBJECTS = (*world.SHAPES, *world.CONCEPTS, "other", "none")  # consumers index by name
COLOURS = tuple(world.COLOURS)
WEIGHTS = Path(__file__).resolve().parent / "judge.safetensors"


class JudgeNet(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.object = nn.Linear(128, len(OBJECTS))
        self.colour = nn.Linear(128, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.object(h), self.colour(h)


def crop(image: Image.Image, box: tuple[float, float, float, float], margin: float = 0.15) -> torch.Tensor:
    """[3, CROP, CROP] in [-1, 1]: the box (fractions of the image) with a margin, resized."""
    w, h = image.size
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    px = (max(0, (x0 - mx) * w), max(0, (y0 - my) * h), min(w, (x1 + mx) * w), min(h, (y1 + my) * h))
    a = np.asarray(image.convert("RGB").crop(tuple(int(round(v)) for v in px)).resize((CROP, CROP), Image.BILINEAR))
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


class Judge:
    def __init__(self, weights: str | Path = WEIGHTS):
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise FileNotFoundError(f"no judge weights at {weights}; make them with `python scripts/train_judge.py`")
        self.net = JudgeNet()
        self.net.load_state_dict(load_file(weights))
        self.net.eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> list[dict]:
        """For each box: the most likely object and colour, with their probabilities."""
        lo, lc = self.net(torch.stack([crop(image, b) for b in boxes]))
        po, pc = lo.softmax(-1), lc.softmax(-1)
        return [{"object": OBJECTS[int(o.argmax())], "p_object": float(o.max()),
                 "colour": COLOURS[int(c.argmax())], "p_colour": float(c.max()),
                 "probs": {k: float(v) for k, v in zip(OBJECTS, o)}} for o, c in zip(po, pc)]
