"""T2I-Adapter conditions (sketch, keypose) added to the UNet's down blocks, weighted by a spatial map.

A diffusers `T2IAdapter` turns a condition image into one feature map per UNet down block; each map is multiplied
by a weight map (a global weight, overridden inside boxes that carry their own weight; overlapping boxes average)
and the conditions' maps are summed. The sums reach the UNet as `down_intrablock_additional_residuals` through a
forward pre-hook (`attached`), so the sampling loop needs no change.

An adapter fits a base when its `channels` equal the UNet's `block_out_channels` and its `downscale_factor`
equals the VAE's (8): SD1.5 takes the stock full adapter; the tiny base takes
`T2IAdapter(in_channels=3 or 1, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8)`, whose four
features (8×8, 4×4, 2×2, 1×1 for a 64 px image) land on the tiny UNet's four down blocks.

A *layout* condition is a sketch of filled discs, one where each object should go, saying where and how big but not
what (`layout_image`); a base can ship an adapter trained on it (`mos.shared.sd.base.layout_adapter_folder`: the
world base's, made by scripts/train_world_layout.py), and `mos sample --fill-boxes` draws one disc in each region box.
Inside the boxes that name a concept the condition lets go after the first part of the schedule (`--t2i-until`,
`CONCEPT_UNTIL` with --fill-boxes): it says where, the concept's adapter then draws its own shape.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mos.shared.sampling.layout import BoxT, Region, cells
from mos.shared.sd.concepts import HANDLE

CONDITIONS = ("sketch", "keypose")
# The layout condition's weight: at 1 the world base's adapter placed world objects in 7 of 16 two-object
# pictures, at 2 in 11 of 16, and only from about 1.6 did tuned concepts follow it (docs/world.md)
FILL_WEIGHT = 2.0
# The largest layout disc, as a fraction of the base's picture side. Alice and bob, each in a 64-px half of a
# 128x64 picture (32 pictures): discs of 0.55 drew both in 0.94 of them, 0.5 in 0.62 (bob's ring closes when
# small), 0.7 in 0.62 (alice's star rounds); uncapped (0.8 of the box, 51 px) in 0.44 at weight 1.5
LARGEST_DISC = 0.55
# Inside a box whose prompt names a concept, the layout condition acts for the first half of the schedule only.
# Held to the end, its filled disc rounds the concept's own shape: alice's star turns into a red blob, bob's ring
# closes (three concepts side by side, 16 pictures: all present 0.19 held throughout, 0.44 let go after 0.4-0.6
# of the schedule; the demo pair, 32 pictures: 0.88 -> 0.97). World objects keep it throughout: their shapes were
# learned with it on, and let go they come out ragged (two-object binding 0.62 -> 0.12; docs/world.md)
CONCEPT_UNTIL = 0.5


class T2IError(ValueError):
    """An adapter or condition image that cannot be used with this base or image size."""


def load_adapter(path: str | Path, unet, vae_scale: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
    """A diffusers T2IAdapter from a local folder (config.json + safetensors; a .safetensors file beside its
    config.json works too), checked against the UNet it will feed. Never reads pickle."""
    from diffusers import T2IAdapter

    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not (folder / "config.json").is_file():
        raise T2IError(f"T2I-Adapter {path}: expected a diffusers folder with config.json and "
                       "diffusion_pytorch_model.safetensors")
    try:
        adapter = T2IAdapter.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                             torch_dtype=torch.float32)
    except Exception as e:
        raise T2IError(f"cannot read T2I-Adapter {folder} ({type(e).__name__}: {e})") from e
    cfg = adapter.config
    want = list(unet.config.block_out_channels)
    if cfg.adapter_type != "full_adapter" or list(cfg.channels) != want or cfg.downscale_factor != vae_scale:
        raise T2IError(f"T2I-Adapter {folder} ({cfg.adapter_type}, channels {list(cfg.channels)}, downscale "
                       f"{cfg.downscale_factor}) does not fit this base: it needs a full_adapter with channels "
                       f"{want} and downscale {vae_scale}")
    return adapter.requires_grad_(False).eval().to(device or "cpu", dtype or torch.float32)


def load_condition(path: str | Path, size: tuple[int, int], channels: int, what: str = "condition") -> torch.Tensor:
    """[1, channels, H, W] in 0–1, as diffusers' adapter pipeline feeds it. The image must have the output size:
    a condition drawn for another size would put the pose somewhere else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} image {p} does not exist")
    try:
        img = Image.open(p)
        img.load()
    except Exception as e:
        raise T2IError(f"{what} image {p} is not a readable image ({type(e).__name__})") from None
    if img.size != tuple(size):
        raise T2IError(f"{what} image {p} is {img.size[0]}x{img.size[1]}, but the image to draw is "
                       f"{size[0]}x{size[1]}: draw the condition at the output size (or pass --size)")
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def disc_box(box: BoxT, size: tuple[int, int], fill: float = 0.8, largest: float | None = None) -> BoxT:
    """The square (in pixels) of side `fill` × the box's shorter side, at most `largest` pixels, centred in the
    box, as fractions: one object, big in its box but clear of the neighbouring boxes."""
    w, h = size
    x0, y0, x1, y1 = box
    side = fill * min((x1 - x0) * w, (y1 - y0) * h)
    side = side if largest is None else min(side, largest)
    cx, cy = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h
    return ((cx - side / 2) / w, (cy - side / 2) / h, (cx + side / 2) / w, (cy + side / 2) / h)


def largest_disc(base) -> float:
    """The largest disc (pixels) to ask of `base`'s layout adapter: a little more than the biggest object it was
    trained on (half the base's picture side). Objects come out a little smaller than their disc, and a disc much
    larger than that asks for a shape the adapter never saw (docs/world.md, "Trials of the fourteenth session")."""
    return LARGEST_DISC * base.resolution


def disc_sketch(boxes: Sequence[BoxT], size: tuple[int, int], largest: float | None = None) -> Image.Image:
    """The layout condition asking for one object in each box (region boxes, fractions), each disc at most
    `largest` pixels across."""
    return layout_image([disc_box(b, size, largest=largest) for b in boxes], size)


def layout_image(boxes: Sequence[BoxT], size: tuple[int, int]) -> Image.Image:
    """White discs on black (mode L), one filling each box (fractions): the layout condition."""
    w, h = size
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        d.ellipse([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], fill=255)
    return img


def weight_map(regions: Sequence[Region], h: int, w: int, weight: float, kind: str | None = None) -> torch.Tensor:
    """[h, w] for condition `kind`: `weight` everywhere, the mean of the box weights where boxes with a weight
    for it cover a cell."""
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for r in regions:
        box_weight = r.t2i_weight_for(kind)
        if box_weight is None:
            continue
        r0, r1, c0, c1 = cells(r.box, h, w)
        total[r0:r1, c0:c1] += box_weight
        count[r0:r1, c0:c1] += 1
    return torch.where(count > 0, total / count.clamp(min=1), torch.full((h, w), float(weight)))


@dataclass
class Condition:
    kind: str  # sketch | keypose
    adapter: torch.nn.Module
    image: torch.Tensor  # [1, C, H, W]
    weight: float = 1.0


@torch.no_grad()
def residuals(conditions: Sequence[Condition], regions: Sequence[Region] = ()) -> list[torch.Tensor]:
    """Σ_conditions feature_i × weight map, one [1, C_i, h_i, w_i] tensor per UNet down block."""
    out: list[torch.Tensor] | None = None
    for c in conditions:
        p = next(c.adapter.parameters())
        feats = c.adapter(c.image.to(p.device, p.dtype))
        weighted = [f * weight_map(regions, f.shape[-2], f.shape[-1], c.weight, c.kind).to(f.device, f.dtype)
                    for f in feats]
        out = weighted if out is None else [a + b for a, b in zip(out, weighted)]
    return out or []


def check_fits(res: Sequence[torch.Tensor], unet, latent_hw: tuple[int, int]) -> None:
    """Each residual must match its down block's output (channels, size) or the UNet would fail mid-sampling."""
    h, w = latent_hw
    chans = list(unet.config.block_out_channels)
    if len(res) != len(chans):
        raise T2IError(f"T2I-Adapter gives {len(res)} feature maps, the UNet has {len(chans)} down blocks")
    for i, (r, c) in enumerate(zip(res, chans)):
        if tuple(r.shape[1:]) != (c, h, w):
            raise T2IError(f"T2I-Adapter feature {i} is {tuple(r.shape[1:])}, down block {i} needs {(c, h, w)}")
        h, w = -(-h // 2), -(-w // 2)


@contextlib.contextmanager
def attached(unet, res: Sequence[torch.Tensor], release: Sequence[BoxT] = (), release_below: float = 0.0
             ) -> Iterator[None]:
    """Feed `res` to every UNet call as down_intrablock_additional_residuals (the UNet pops that list, so each
    call gets a fresh one, expanded to the call's batch: both halves of a guided batch get the condition).
    Once the sampler's timestep falls below `release_below`, the condition is dropped inside the `release` boxes
    (`concept_boxes`): by then it has said where the object goes, and from there its own adapter draws it."""
    if not res:
        yield
        return
    late = _released(res, release) if release and release_below > 0 else None

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        use = late if late is not None and float(torch.as_tensor(t).flatten()[0]) < release_below else res
        kwargs["down_intrablock_additional_residuals"] = [
            r.to(sample.device, sample.dtype).expand(sample.shape[0], -1, -1, -1) for r in use]
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _released(res: Sequence[torch.Tensor], boxes: Sequence[BoxT]) -> list[torch.Tensor]:
    """`res` with every feature cell inside the boxes zeroed (a box weight of 0, as `weight_map` gives one)."""
    out = []
    for r in res:
        keep = torch.ones(r.shape[-2:], dtype=r.dtype, device=r.device)
        for box in boxes:
            r0, r1, c0, c1 = cells(box, *r.shape[-2:])
            keep[r0:r1, c0:c1] = 0
        out.append(r * keep)
    return out


def layout_residuals(base, boxes: Sequence[BoxT], size: tuple[int, int], weight: float = FILL_WEIGHT
                     ) -> list[torch.Tensor]:
    """The base's own layout adapter's features for one disc in each box (fractions); none where the base ships
    no layout adapter."""
    from mos.shared.sd.base import layout_adapter_folder

    folder = layout_adapter_folder(base.spec)
    if folder is None or not boxes:
        return []
    # an evaluation asks for it once a picture: read and check it once per folder, device and dtype
    key = (folder, str(base.device), base.dtype)
    if key not in _LAYOUT_ADAPTERS:
        _LAYOUT_ADAPTERS[key] = load_adapter(folder, base.unet, base.vae_scale, base.device, base.dtype)
    sketch = disc_sketch(boxes, size, largest_disc(base))
    cond = torch.from_numpy(np.asarray(sketch, dtype=np.float32) / 255.0)[None, None]
    return residuals([Condition("sketch", _LAYOUT_ADAPTERS[key], cond, weight)])


_LAYOUT_ADAPTERS: dict[tuple, torch.nn.Module] = {}


def concept_boxes(regions: Sequence[Region]) -> list[BoxT]:
    """The boxes of the regions whose prompt names a concept (<handle>)."""
    return [r.box for r in regions if HANDLE.search(r.prompt)]


def release_timestep(base, until: float) -> float:
    """The timestep below which a condition held for the first `until` of the sampling schedule lets go."""
    return (1.0 - until) * float(base.scheduler_config.get("num_train_timesteps", 1000))


@contextlib.contextmanager
def layout_attached(base, regions: Sequence[Region], size: tuple[int, int], until: float = CONCEPT_UNTIL
                    ) -> Iterator[None]:
    """The base's layout condition (one disc in each region box, `layout_residuals`) on every UNet call of the
    block, let go inside the concepts' boxes after the first `until` of the schedule; nothing where the base
    ships no layout adapter."""
    res = layout_residuals(base, [r.box for r in regions], size)
    with attached(base.unet, res, concept_boxes(regions), release_timestep(base, until)):
        yield


def weighted_residuals(conditions: dict[str, tuple[str, str]], base, size: tuple[int, int], regions: list[Region],
                       weight: float | dict[str, float]) -> list:
    """Load each condition's adapter and image (checked against the base and size) and weight their features:
    `weight` is every condition's, or each kind's own (the paper pairs keypose 0.8 with sketch 0.5)."""
    if not conditions:
        if any(r.t2i_weight is not None for r in regions):
            print("note: region T2I weights are ignored without --t2i-adapter and a condition image",
                  file=sys.stderr)
        return []
    conds = []
    for kind, (adapter_path, image_path) in conditions.items():
        ad = load_adapter(adapter_path, base.unet, base.vae_scale, base.device, base.dtype)
        image = load_condition(image_path, size, ad.config.in_channels, kind)
        conds.append(Condition(kind, ad, image, weight[kind] if isinstance(weight, dict) else weight))
    res = residuals(conds, regions)
    check_fits(res, base.unet, (size[1] // base.vae_scale, size[0] // base.vae_scale))
    return res
