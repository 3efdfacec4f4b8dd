"""Regions of a regionally controlled image: a prompt, a negative prompt and a box each.

Three ways to write them, all turned into `Region`s:
  --region "PROMPT|NEG|x0,y0,x1,y1[|T2I_WEIGHT]"   box as left, top, right, bottom; fractions 0–1 or pixels
  --region "[PROMPT]-*-[NEG]-*-[top,left,bottom,right]|[…]-*-…"   the reference's strings, pixels, joined by `|`
  --layout layout.toml | layout.json   a global prompt, negative, size and a list of regions (see LAYOUT_HELP)

A box whose four numbers all lie in 0–1 is read as fractions of the image, otherwise as pixels. Boxes become
fractions (`Region.fractions(size)`) once the image size is known; that is where range errors are raised.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from mos.shared.sd.concepts import HANDLE, UnknownConceptError

BoxT = tuple[float, float, float, float]  # x0, y0, x1, y1 (left, top, right, bottom)
REFERENCE_SEP = "-*-"
LAYOUT_KEYS = {"prompt", "negative", "size", "region", "regions"}
REGION_KEYS = {"prompt", "negative", "box", "t2i_weight"}
LAYOUT_HELP = """\
prompt = "a photo of <alice> and <bob> on a beach"   # optional when --prompt is given
negative = "blurry"                                   # optional
size = "512x512"                                      # optional (or [512, 512])
[[region]]
prompt = "a photo of <alice>"
negative = ""                 # optional: empty means the global negative
box = [0.0, 0.0, 0.5, 1.0]    # left, top, right, bottom: fractions 0-1 or pixels
t2i_weight = 1.0              # optional: T2I-Adapter weight inside this box, or per condition:
                              # t2i_weight = { sketch = 0.5, keypose = 0.8 }"""


class LayoutError(ValueError):
    """A region string or layout file that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Region:
    prompt: str
    negative: str = ""
    box: BoxT = (0.0, 0.0, 1.0, 1.0)
    in_pixels: bool = False
    # T2I weight inside the box: one for every condition, or ((kind, weight), ...) for the kinds named
    t2i_weight: float | tuple[tuple[str, float], ...] | None = None

    def t2i_weight_for(self, kind: str | None) -> float | None:
        """The weight this box gives condition `kind` (None: the box says nothing for it)."""
        if isinstance(self.t2i_weight, tuple):
            return dict(self.t2i_weight).get(kind)
        return self.t2i_weight

    def t2i_label(self) -> str:
        w = self.t2i_weight
        return ",".join(f"{k}={v:g}" for k, v in w) if isinstance(w, tuple) else f"{w:g}"

    def fractions(self, size: tuple[int, int]) -> "Region":
        """This region with its box in fractions of a `size` = (width, height) image, checked."""
        w, h = size
        x0, y0, x1, y1 = self.box
        limit = (w, h, w, h) if self.in_pixels else (1, 1, 1, 1)
        unit = "px" if self.in_pixels else ""
        if any(v < 0 or v > m for v, m in zip(self.box, limit)):
            raise LayoutError(f"region {self.prompt!r}: box {_fmt(self.box, unit)} lies outside the {w}x{h} image")
        if x1 <= x0 or y1 <= y0:
            raise LayoutError(f"region {self.prompt!r}: box {_fmt(self.box, unit)} has zero area "
                              "(need left < right and top < bottom)")
        if not self.in_pixels:
            return self
        return replace(self, box=(x0 / w, y0 / h, x1 / w, y1 / h), in_pixels=False)

    def pixels(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        w, h = size
        x0, y0, x1, y1 = self.fractions(size).box
        return round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box)
        if isinstance(self.t2i_weight, tuple):
            d["t2i_weight"] = dict(self.t2i_weight)
        return {k: v for k, v in d.items() if v is not None}


def _fmt(box: Iterable[float], unit: str) -> str:
    return "(" + ", ".join(f"{v:g}{unit}" for v in box) + ")"


def grid_size(latent_hw: tuple[int, int], n_queries: int) -> tuple[int, int]:
    """Spatial size of an attention layer with n_queries queries: the latent halved (rounding up) until it fits."""
    h, w = latent_hw
    while h * w > n_queries:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_queries:
        raise ValueError(f"{n_queries} attention queries match no downsampling of a {latent_hw} latent")
    return h, w


def cells(box: BoxT, h: int, w: int) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of an h×w grid that a fractional box covers.

    A cell belongs to the box when its centre does; a box smaller than one cell still takes the cell under its own
    centre, so that small regions reach the coarse attention layers too (the reference drops them there).
    """
    x0, y0, x1, y1 = box

    def span(a: float, b: float, n: int) -> tuple[int, int]:
        lo, hi = math.ceil(a * n - 0.5), math.ceil(b * n - 0.5)
        if hi <= lo:
            lo = min(n - 1, max(0, math.floor((a + b) / 2 * n)))
            hi = lo + 1
        return max(0, lo), min(n, hi)

    r0, r1 = span(y0, y1, h)
    c0, c1 = span(x0, x1, w)
    return r0, r1, c0, c1


# ---------------------------------------------------------------------------------------------- strings

def _numbers(text: str, where: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.strip().strip("[]()").split(","))
    except ValueError:
        raise LayoutError(f"{where}: box {text.strip()!r} is not four numbers") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise LayoutError(f"{where}: box {text.strip()!r} must be four finite numbers")
    return vals


def make_box(values: Iterable[float], where: str) -> tuple[BoxT, bool]:
    """(box, in_pixels): all four numbers in 0–1 means fractions."""
    vals = tuple(float(v) for v in values)
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise LayoutError(f"{where}: box must be four finite numbers, got {list(values)!r}")
    return vals, not all(0.0 <= v <= 1.0 for v in vals)


T2I_KINDS = ("sketch", "keypose")


def _weight(text: Any, where: str) -> float | tuple[tuple[str, float], ...] | None:
    """A region's T2I weight: a number, or per condition as a table {sketch = 0.5} or text `sketch=0.5,keypose=1`."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str) and "=" in text:
        pairs = [part.partition("=") for part in text.split(",")]
        text = {k.strip(): v for k, _, v in pairs}
    if isinstance(text, dict):
        unknown = sorted(set(text) - set(T2I_KINDS))
        if unknown:
            raise LayoutError(f"{where}: T2I weight for {', '.join(unknown)}; conditions are {', '.join(T2I_KINDS)}")
        return tuple(sorted((k, _weight(v, where)) for k, v in text.items()))
    try:
        w = float(text)
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: T2I weight {text!r} is not a number") from None
    if not math.isfinite(w):
        raise LayoutError(f"{where}: T2I weight must be finite")
    return w


def parse_region(text: str) -> list[Region]:
    """One --region value: our `PROMPT|NEG|x0,y0,x1,y1[|W]`, or reference strings joined by `|`."""
    if REFERENCE_SEP in text:
        return parse_reference(text)
    where = f"--region {text!r}"
    fields = text.split("|")
    if len(fields) not in (3, 4):
        raise LayoutError(f"{where}: expected PROMPT|NEG|x0,y0,x1,y1 (NEG may be empty; an optional 4th field "
                          "is the T2I weight), or the reference's [prompt]-*-[negative]-*-[top,left,bottom,right]")
    prompt, negative, box = fields[0].strip(), fields[1].strip(), fields[2]
    if not prompt:
        raise LayoutError(f"{where}: empty region prompt")
    vals, px = make_box(_numbers(box, where), where)
    return [Region(prompt, negative, vals, px, _weight(fields[3] if len(fields) == 4 else None, where))]


def parse_reference(text: str) -> list[Region]:
    """The reference CLI's `[prompt]-*-[negative]-*-[top,left,bottom,right]` (pixels), several joined by `|`."""
    regions = []
    for i, part in enumerate(p for p in text.split("|") if p.strip()):
        where = f"reference region {i + 1} {part.strip()!r}"
        fields = part.split(REFERENCE_SEP)
        if len(fields) != 3:
            raise LayoutError(f"{where}: expected [prompt]-*-[negative]-*-[top,left,bottom,right]")
        prompt, negative = (_unbracket(f) for f in fields[:2])
        if not prompt:
            raise LayoutError(f"{where}: empty region prompt")
        top, left, bottom, right = _numbers(fields[2], where)
        regions.append(Region(prompt, negative, (left, top, right, bottom), True))
    if not regions:
        raise LayoutError(f"no region in {text!r}")
    return regions


def _unbracket(s: str) -> str:
    s = s.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    return s.strip()


# ---------------------------------------------------------------------------------------------- layout files

@dataclass
class Layout:
    prompt: str | None = None
    negative: str | None = None
    size: tuple[int, int] | None = None
    regions: list[Region] | None = None


def parse_size(value: Any, where: str = "--size") -> tuple[int, int]:
    """'WxH', 'W' (square) or [W, H] -> (W, H)."""
    try:
        if isinstance(value, str):
            parts = value.lower().replace("×", "x").split("x")
            parts = parts * 2 if len(parts) == 1 else parts
        else:
            parts = list(value)
        w, h = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: size {value!r} is not WIDTHxHEIGHT") from None
    if w <= 0 or h <= 0:
        raise LayoutError(f"{where}: size {value!r} must be positive")
    return w, h


def load_layout(path: str | Path) -> Layout:
    """Read a .toml or .json layout (a `mos sample` record .json works too: its `layout` is read)."""
    p = Path(path)
    if not p.is_file():
        raise LayoutError(f"layout file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise LayoutError(f"layout file {p}: use a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"layout file {p} is not valid {p.suffix[1:].upper()}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("layout"), dict) and data.get("format") == "mos-sample":
        data = data["layout"]
    return layout_from_dict(data, str(p))


def layout_from_dict(data: Any, where: str) -> Layout:
    if not isinstance(data, dict):
        raise LayoutError(f"{where}: a layout is a table with prompt, negative, size and regions; example:\n"
                          + LAYOUT_HELP)
    unknown = sorted(set(data) - LAYOUT_KEYS)
    if unknown:
        raise LayoutError(f"{where}: unknown key(s) {', '.join(unknown)}; a layout holds "
                          f"{', '.join(sorted(LAYOUT_KEYS - {'region'}))}; example:\n" + LAYOUT_HELP)
    for key in ("prompt", "negative"):
        if key in data and not isinstance(data[key], str):
            raise LayoutError(f"{where}: {key} must be a string")
    items = data.get("regions", data.get("region", []))
    if not isinstance(items, list):
        raise LayoutError(f"{where}: regions must be a list of tables ([[region]] in TOML)")
    size = parse_size(data["size"], f"{where}: size") if "size" in data else None
    regions = [_region_from_dict(r, f"{where}: region {i + 1}") for i, r in enumerate(items)]
    return Layout(data.get("prompt"), data.get("negative"), size, regions)


def _region_from_dict(d: Any, where: str) -> Region:
    if not isinstance(d, dict):
        raise LayoutError(f"{where}: expected a table with prompt, negative, box")
    unknown = sorted(set(d) - REGION_KEYS - {"in_pixels"})
    if unknown:
        raise LayoutError(f"{where}: unknown key(s) {', '.join(unknown)}; a region holds "
                          f"{', '.join(sorted(REGION_KEYS))}")
    prompt, negative = d.get("prompt"), d.get("negative", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LayoutError(f"{where}: prompt is missing or empty")
    if not isinstance(negative, str):
        raise LayoutError(f"{where}: negative must be a string")
    box = d.get("box")
    if not isinstance(box, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise LayoutError(f"{where}: box must be a list of four numbers [left, top, right, bottom]")
    vals, px = make_box(box, where)
    if isinstance(d.get("in_pixels"), bool):  # written by `mos sample` records: never guess there
        px = d["in_pixels"]
    return Region(prompt.strip(), negative.strip(), vals, px, _weight(d.get("t2i_weight"), where))


# ---------------------------------------------------------------------------------------------- concepts

def check_handles(prompts: Iterable[str], known: Iterable[str]) -> None:
    """Every <handle> in the prompts names a loaded concept, else UnknownConceptError listing the known ones."""
    known = list(known)
    for p in prompts:
        for m in HANDLE.finditer(p):
            if m.group(1) not in known:
                raise UnknownConceptError(f"unknown concept handle <{m.group(1)}> in prompt {p!r}; known: "
                                          + (", ".join(f"<{k}>" for k in known) or "none (no adapter loaded)"))
