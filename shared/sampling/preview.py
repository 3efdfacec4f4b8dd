"""A small preview picture of fused concepts: each alone, then all together with regional sampling (one vertical
strip per concept, its box drawn on the picture), side by side."""

from __future__ import annotations

import copy
from pathlib import Path

from PIL import Image, ImageDraw

from mos.shared.formats.adapter import Adapter
from mos.shared.sampling.denoise import sample
from mos.shared.sampling.layout import Region
from mos.shared.sampling.regional import sample_regional
from mos.shared.sampling.t2i import layout_attached
from mos.shared.sd.base import Base
from mos.shared.sd.model import ConceptModel


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
        # the base's layout adapter, where it ships one, asks for one object in each strip (docs/design.md)
        with layout_attached(model.base, regions, (images[0].width, images[0].height)):
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


def draw_layout(image, regions: list[Region], prompt: str, min_side: int = 512):
    """The image (scaled up for legibility) with each box outlined and numbered, prompts listed below."""
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, -(-min_side // min(image.size)))
    img = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, img.width // 40))
    line = int(font.size * 1.4)
    canvas = Image.new("RGB", (img.width, img.height + line * (len(regions) + 1) + 8), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    y = img.height + 4
    draw.text((6, y), _fit(draw, f"global: {prompt}", font, canvas.width - 12), fill="black", font=font)
    for i, r in enumerate(regions):
        c = colours[i % len(colours)]
        x0, y0, x1, y1 = r.pixels(img.size)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=c, width=max(2, scale))
        tag = str(i + 1)
        tw = draw.textlength(tag, font=font)
        draw.rectangle((x0, y0, x0 + tw + 6, y0 + line), fill=c)
        draw.text((x0 + 3, y0 + 1), tag, fill="white", font=font)
        neg = f"  (neg: {r.negative})" if r.negative else ""
        w = f"  [t2i {r.t2i_label()}]" if r.t2i_weight is not None else ""
        draw.text((6, y + line * (i + 1)), _fit(draw, f"{tag}: {r.prompt}{neg}{w}", font, canvas.width - 12),
                  fill=c, font=font)
    return canvas


def _fit(draw, text: str, font, width: int) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text
