"""A small preview picture of fused concepts: each alone, then all together, side by side."""

from __future__ import annotations

import copy
from pathlib import Path

from PIL import Image

from .adapter import Adapter
from .base import Base
from .model import ConceptModel
from .sampling import sample


def prompts_for(adapter: Adapter, first: str | None = None) -> list[str]:
    """`first` alone (or every concept alone), then all of them in one prompt."""
    names = [c.name for c in adapter.concepts]
    if first:
        names = [first] + [n for n in names if n != first]
    handles = [f"<{n}>" for n in names]
    alone = [f"a photo of {h}" for h in (handles[:1] if first else handles)]
    together = [f"a photo of {' and '.join(handles)}"] if len(handles) > 1 else []
    return alone + together


def write_preview(base: Base, adapter: Adapter, path: str | Path, first: str | None = None, steps: int = 20,
                  seed: int = 0) -> Path:
    """Sample the prompts on a copy of `base` and save one row of images as a PNG."""
    model = ConceptModel.from_adapter(copy.deepcopy(base), adapter)
    images = sample(model, prompts_for(adapter, first), seed=seed, steps=steps, progress=False)
    w, h = images[0].size
    row = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        row.paste(im, (i * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    row.save(tmp)
    tmp.replace(path)
    return path
