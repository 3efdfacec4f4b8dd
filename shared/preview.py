"""A small preview picture of fused concepts: each alone, then all together with regional sampling (one vertical
strip per concept, its box drawn on the picture), side by side."""

from __future__ import annotations

import copy
from pathlib import Path

from PIL import Image, ImageDraw

from .adapter import Adapter
from .base import Base
from .model import ConceptModel
from .regional import sample_regional
from .regions import Region
from .sampling import sample


def prompts_for(adapter: Adapter, first: str | None = None) -> list[str]:
    """`first` alone (or every concept alone)."""
    names = [c.name for c in adapter.concepts]
    return [f"a <{n}>" for n in ([first] if first else names)]


def layout_for(adapter: Adapter) -> tuple[str, list[Region]]:
    """All concepts in one picture, left to right, each in its own strip."""
    names = [c.name for c in adapter.concepts]
    k = len(names)
    regions = [Region(f"a <{n}>", box=(i / k, 0.0, (i + 1) / k, 1.0)) for i, n in enumerate(names)]
    return " and ".join(r.prompt for r in regions), regions


def write_preview(base: Base, adapter: Adapter, path: str | Path, first: str | None = None, steps: int = 20,
                  seed: int = 0) -> Path:
    """Sample on a copy of `base` and save one row of images as a PNG."""
    model = ConceptModel.from_adapter(copy.deepcopy(base), adapter)
    images = sample(model, prompts_for(adapter, first), seed=seed, steps=steps, progress=False)
    if len(adapter.concepts) > 1:
        prompt, regions = layout_for(adapter)
        images.append(sample_regional(model, prompt, regions=regions, seed=seed, steps=steps, progress=False))
    scale = max(1, -(-192 // images[0].width))  # toy bases draw 64 px: enlarge so a person can see them
    images = [im.resize((im.width * scale, im.height * scale), Image.LANCZOS) for im in images]
    if len(adapter.concepts) > 1:
        d, (w, h) = ImageDraw.Draw(images[-1]), images[-1].size
        for r in regions[1:]:
            d.line((round(r.box[0] * w), 0, round(r.box[0] * w), h - 1), fill=(255, 255, 255))
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
