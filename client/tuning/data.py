"""A concept folder: images, captions, masks and concept.toml, read once; augmented batches drawn per step.

    data/alice/
        00.png  00.txt        caption with <TOK> where the concept goes (optional)
        masks/00.png          white where the concept is (optional)
        concept.toml          name = "alice", class_word = "doll", kind = "object", init_word = "red" (optional)

Every random choice of a step (which images, crop, flip) comes from a generator seeded by (seed, step), so a
resumed run draws exactly what an uninterrupted one would.

Two crops (TuneConfig.crop; the concept's kind picks one by default, settings.KIND_DEFAULTS):
* `square`: a random square of 50-100 % of the short side's area, flipped half the time (objects).
* `human`: the reference's crop for people and characters (its HumanResizeCropFinalV3): half the time a
  top-anchored crop of a portrait (so the head stays) or a random square of a landscape; the whole picture then
  fits the long side to the native size and lands at a random place on a black square, whose padding is left out
  of the loss (Batch.valid). Never flipped: faces and clothes are not symmetric.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mos.shared.sd.concepts import HANDLE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
TOKEN = "<TOK>"
TEMPLATE = f"a photo of {TOKEN}"
MAX_ASPECT = 2.0          # longer images are centre-cropped to 2:1 before anything else
CROP_SCALE = (0.5, 1.0)   # random resized crop: fraction of the short side's square area kept
HUMAN_CROP_P = 0.5        # the reference's crop_p: how often the human crop cuts before fitting
KINDS = ("person", "character", "object", "style")
CROPS = ("square", "human")
CAPTION_MODES = ("augment", "fixed")
# Prompts a bare caption (none, or the TEMPLATE) is drawn from at each step, by kind, as the reference's EnhanceText
# does: one fixed prompt teaches the concept one phrasing only.
PEOPLE_PROMPTS = ("a photo of {}", "a photo of one {}", "a picture of {}", "a rendering of {}", "a rendition of {}",
                  "a cropped photo of {}", "a close-up photo of {}", "a good photo of {}", "a bright photo of {}",
                  "a bad photo of {}", "a weird photo of {}", "a cool photo of {}")
OBJECT_PROMPTS = PEOPLE_PROMPTS + ("a dark photo of {}", "a photo of the small {}", "a photo of the large {}",
                                   "a photo of a clean {}", "a photo of a dirty {}", "a photo of my {}")
STYLE_PROMPTS = ("a painting in the style of {}", "a picture in the style of {}", "a rendering in the style of {}",
                 "a close-up painting in the style of {}", "a dark painting in the style of {}",
                 "a bright painting in the style of {}", "a small painting in the style of {}",
                 "a large painting in the style of {}")
BARE_PROMPTS = {"person": PEOPLE_PROMPTS, "character": PEOPLE_PROMPTS, "object": OBJECT_PROMPTS,
                "style": STYLE_PROMPTS}


@dataclass
class Item:
    stem: str
    image: torch.Tensor          # uint8 [3, H, W]
    caption: str                 # with <TOK> where the concept goes
    mask: torch.Tensor | None    # bool [H, W], or None


@dataclass
class ConceptData:
    folder: Path
    name: str
    class_word: str | None
    items: list[Item]
    digest: str
    skipped: list[str] = field(default_factory=list)  # "file: reason" of unreadable images
    kind: str = "object"  # concept.toml `kind`: decides the default crop and attention regulariser
    init_word: str | None = None  # concept.toml `init_word`: token a starts at this word (edlora.make_trainer)

    @property
    def has_masks(self) -> bool:
        return any(it.mask is not None for it in self.items)

    def captions(self, handle: str) -> list[str]:
        return [it.caption.replace(TOKEN, handle) for it in self.items]


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def sanitize_name(raw: str) -> str:
    """A handle-safe concept name: lower-case [a-z0-9_-], starting with a letter or digit."""
    name = re.sub(r"[^a-z0-9_-]+", "_", raw.strip().lower()).strip("_-")
    return name or "concept"


# ---------------------------------------------------------------------------------------------- reading files

def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the source: EXIF rotation applied, alpha composited on white, 16-bit scaled down."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def fit_size(img: Image.Image, resolution: int, resample: int) -> Image.Image:
    """Short side within [resolution, 2·resolution]; aspect at most MAX_ASPECT (centre crop)."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        cw, ch = (min(w, int(MAX_ASPECT * h)), h) if w > h else (w, min(h, int(MAX_ASPECT * w)))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
        w, h = img.size
    short = min(w, h)
    target = min(max(short, resolution), 2 * resolution)
    if target != short:
        img = img.resize((max(1, round(w * target / short)), max(1, round(h * target / short))), resample)
    return img


def read_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as m:
        m.load()
        m = ImageOps.exif_transpose(m)
        if m.mode.startswith("I") or m.mode == "F":  # 16-bit: scale like images
            m = to_rgb(m)
        m = m.convert("L")  # alpha is ignored: a mask is its grey level
    return m if m.size == size else m.resize(size, Image.NEAREST)


def read_caption(path: Path) -> str:
    """The caption with exactly the concept's <TOK>; other <handles> lose their brackets."""
    if not path.is_file():
        return TEMPLATE
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    if not text:
        return TEMPLATE
    parts = [HANDLE.sub(r"\1", p) for p in text.split(TOKEN)]
    text = TOKEN.join(parts)
    return text if TOKEN in text else f"{TOKEN}, {text}"


def read_toml(folder: Path) -> dict:
    f = folder / "concept.toml"
    if not f.is_file():
        return {}
    try:
        return tomllib.loads(f.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{f}: not valid TOML ({e})") from e


def image_files(folder: str | Path) -> list[Path]:
    """The folder's image files by suffix (cheap: run before loading a base to fail fast)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"concept folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_concept(folder: str | Path, resolution: int, class_word: str | None = None,
                 init_word: str | None = None) -> ConceptData:
    """Read a concept folder; bad files are skipped with a warning, no usable image is an error. `class_word` and
    `init_word`, where given, override concept.toml's."""
    folder = Path(folder)
    files = image_files(folder)
    meta = read_toml(folder)
    h = hashlib.sha256(b"mos-concept-data/1\n")
    items, skipped = [], []
    for path in files:
        try:
            img = read_image(path)
        except Exception as e:  # PIL raises many types for broken files
            skipped.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        mask = None
        mask_path = folder / "masks" / f"{path.stem}.png"
        if mask_path.is_file():
            try:
                mask = read_mask(mask_path, img.size)
            except Exception as e:
                warn(f"{mask_path}: unreadable mask, image used without it ({type(e).__name__})")
                mask_path = None
        caption = read_caption(path.with_suffix(".txt"))
        pixels = torch.from_numpy(np.array(fit_size(img, resolution, Image.BICUBIC))).permute(2, 0, 1).contiguous()
        if mask is not None:
            mask = torch.from_numpy(np.array(fit_size(mask, resolution, Image.NEAREST)) >= 128)
            if not mask.any():  # an empty mask would tell the loss to ignore the whole image
                warn(f"{mask_path}: mask is empty, image used without it")
                mask = None
        items.append(Item(path.stem, pixels, caption, mask))
        h.update(f"{path.name}\n".encode() + path.read_bytes() + f"\n{caption}\n".encode())
        h.update(mask_path.read_bytes() if mask is not None else b"-")
    if skipped:
        warn(f"skipped {len(skipped)} unreadable image(s) in {folder}: " + "; ".join(skipped))
    if not items:
        raise ValueError(f"concept folder {folder}: none of its {len(files)} image(s) could be read")
    name = sanitize_name(str(meta.get("name") or folder.resolve().name))
    cw = class_word or meta.get("class_word")
    iw = str(init_word or meta.get("init_word") or "").strip() or None
    return ConceptData(folder, name, str(cw).strip() if cw else None, items, h.hexdigest()[:32], skipped,
                       concept_kind(meta, folder), iw)


def concept_kind(meta: dict, folder: Path) -> str:
    """concept.toml's `kind`, default `object` (the crop the project always used)."""
    kind = str(meta.get("kind", "object")).strip().lower()
    if kind not in KINDS:
        raise ValueError(f"{folder / 'concept.toml'}: kind = {kind!r}; use one of {', '.join(KINDS)}")
    return kind


# ---------------------------------------------------------------------------------------------- batches

def seeded(seed: int, what: str, n: int) -> torch.Generator:
    """A CPU generator for one named draw; independent of every other (seed, what, n)."""
    digest = hashlib.sha256(f"{seed}/{what}/{n}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def batch_indices(n_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Images of a step: a fresh permutation per pass over the data, read as one endless stream."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n_items
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_items, generator=seeded(seed, "epoch", epoch)).tolist()
        out.append(perms[epoch][pos % n_items])
    return out


def augment_caption(caption: str, kind: str, g: torch.Generator) -> str:
    """The caption of one step: a bare caption becomes one of the kind's prompts; a written one keeps its first
    comma-separated part and shuffles the rest (the reference's ShuffleCaption, keep_token_num 1), so that no tag
    is learnt for its position."""
    if caption == TEMPLATE:
        prompts = BARE_PROMPTS[kind]
        return prompts[int(torch.randint(len(prompts), (1,), generator=g))].format(TOKEN)
    parts = [p.strip() for p in caption.split(",")]
    if len(parts) < 3:
        return caption
    rest = [parts[1:][i] for i in torch.randperm(len(parts) - 1, generator=g).tolist()]
    return ", ".join([parts[0], *rest])


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored picture: 'left' and 'right' trade places."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", caption)


def random_crop(image: torch.Tensor, mask: torch.Tensor | None, size: int, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """A random square (CROP_SCALE of the short side's area) resized to size², flipped half the time; the last
    value says whether it was flipped."""
    _, h, w = image.shape
    u = torch.empty(3).uniform_(generator=g).tolist()
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0]
    side = max(1, round(min(h, w) * area ** 0.5))
    top, left = round((h - side) * u[1]), round((w - side) * u[2])
    flip = bool(torch.rand(1, generator=g) < 0.5)
    crop = image[None, :, top:top + side, left:left + side].float()
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    out = (out / 127.5 - 1.0).clamp(-1, 1)
    m = None
    if mask is not None:
        mc = mask[None, None, top:top + side, left:left + side].float()
        m = F.interpolate(mc, size=(size, size), mode="area" if side > size else "nearest")[0]
    if flip:
        out = out.flip(-1)
        m = None if m is None else m.flip(-1)
    return out, m, flip


def human_crop(image: torch.Tensor, mask: torch.Tensor | None, size: int, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The reference's crop for people: (pixels, mask, valid), valid [1, S, S] being 1 on the picture and 0 on
    the black padding. With chance HUMAN_CROP_P a portrait keeps its top (height between its width and all of
    it) and a landscape a random square; the result's long side is then `size`, pasted at a random place."""
    _, h, w = image.shape
    u = torch.empty(5).uniform_(generator=g).tolist()
    top, left, ch, cw = 0, 0, h, w
    if u[0] < HUMAN_CROP_P:
        if h > w:
            ch = w + round((h - w) * u[1])  # anchored at the top: the head is in every crop
        else:
            cw = ch = h
            left = round((w - h) * u[1])
    scale = size / max(ch, cw)
    nh, nw = max(1, min(size, round(ch * scale))), max(1, min(size, round(cw * scale)))
    y, x = round((size - nh) * u[2]), round((size - nw) * u[3])
    crop = image[None, :, top:top + ch, left:left + cw].float()
    fitted = F.interpolate(crop, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    out = torch.full((3, size, size), -1.0)  # black, as the reference pads
    out[:, y:y + nh, x:x + nw] = (fitted / 127.5 - 1.0).clamp(-1, 1)
    valid = torch.zeros(1, size, size)
    valid[:, y:y + nh, x:x + nw] = 1.0
    m = None
    if mask is not None:
        mc = mask[None, None, top:top + ch, left:left + cw].float()
        m = torch.zeros(1, size, size)
        m[:, y:y + nh, x:x + nw] = F.interpolate(mc, size=(nh, nw), mode="area" if ch > nh else "nearest")[0]
    return out, m, valid


@dataclass
class Batch:
    pixels: torch.Tensor     # [B, 3, S, S] in [-1, 1]
    masks: torch.Tensor      # [B, 1, S, S] in [0, 1]; ones where an image has no mask
    has_mask: torch.Tensor   # bool [B]
    captions: list[str]      # with <TOK>
    valid: torch.Tensor | None = None  # [B, 1, S, S]: 0 on padding the loss must not see (None: none padded)


def make_batch(data: ConceptData, batch_size: int, seed: int, step: int, size: int, crop: str = "square",
               captions: str = "fixed") -> Batch:
    """The images of `step`, cropped by `crop` (CROPS), captions as they are or augmented (CAPTION_MODES)."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r}: use one of {', '.join(CROPS)}")
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions {captions!r}: use one of {', '.join(CAPTION_MODES)}")
    g = seeded(seed, "crop", step)
    gc = seeded(seed, "caption", step)  # its own stream: augmenting captions leaves the crops as they were
    idx = batch_indices(len(data.items), batch_size, seed, step)
    pixels, masks, has, texts, valid = [], [], [], [], []
    for i in idx:
        it = data.items[i]
        if crop == "human":
            px, m, v = human_crop(it.image, it.mask, size, g)
            caption = it.caption
        else:
            px, m, flipped = random_crop(it.image, it.mask, size, g)
            v, caption = torch.ones(1, size, size), mirror_caption(it.caption) if flipped else it.caption
        pixels.append(px)
        masks.append(m if m is not None else torch.ones(1, size, size))
        has.append(m is not None)
        texts.append(augment_caption(caption, data.kind, gc) if captions == "augment" else caption)
        valid.append(v)
    return Batch(torch.stack(pixels), torch.stack(masks), torch.tensor(has), texts,
                 torch.stack(valid) if crop == "human" else None)
