"""The paper's CLIP scores, with a CLIP model from a local folder (nothing is downloaded).

    text-alignment  = mean cos(CLIP_image(generated_i), CLIP_text(prompt_i with the handle replaced by the class word))
    image-alignment = mean cos(CLIP_image(generated), CLIP_image(reference)) over every generated × reference pair

Mix-of-Show (§4.1) follows Custom Diffusion: 20 prompts × 50 images per concept. The defaults here are smaller for
CPUs; `--prompts 20 --images 50` gives the paper's protocol.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mos.shared.formats.adapter import Adapter
from mos.shared.sampling.denoise import sample
from mos.shared.sd.base import Base
from mos.shared.sd.model import ConceptModel

PROMPTS = (
    "a photo of {}", "{} on a beach", "{} in the jungle", "{} in the snow", "{} on a cobblestone street",
    "{} with a city in the background", "{} with a mountain in the background", "{} floating in an ocean of milk",
    "{} on top of a wooden floor", "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
    "{} on top of pink fabric", "{} in a garden", "a painting of {}", "a close-up photo of {}",
    "{} next to a cup of coffee", "{} in a forest at night",
)


class Clip:
    """A local CLIP model with its tokenizer and image preprocessing."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--clip {folder}: no CLIP model folder there (config.json, weights, tokenizer)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"--clip {folder}: not a loadable CLIPModel folder with its tokenizer ({e})") from None
        size = self.model.config.vision_config.image_size
        if (folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        else:  # CLIP's own preprocessing at the model's input size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        px = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return torch.nn.functional.normalize(self.model.get_image_features(pixel_values=px).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(self.model.get_text_features(**tok).pooler_output.float(), dim=-1)


def scores(clip: Clip, generated: list[Image.Image], plain_prompts: list[str], refs: list[Image.Image]) -> dict:
    """Text- and image-alignment of `generated` (image i was drawn for plain_prompts[i])."""
    g = clip.images(generated)
    text = float((g * clip.texts(plain_prompts)).sum(-1).mean())
    image = float((g @ clip.images(refs).T).mean())
    return {"text_alignment": text, "image_alignment": image, "images": len(generated)}


def evaluate(base: Base, adapter: Adapter, refs: dict[str, list[Image.Image]], clip: Clip, n_prompts: int = 4,
             n_images: int = 2, steps: int = 20, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Per concept in `refs`: sample n_prompts × n_images with the adapter, score them against its references."""
    model = ConceptModel.from_adapter(copy.deepcopy(base), adapter)
    by_name = {c.name: c for c in adapter.concepts}
    missing = sorted(set(refs) - set(by_name))
    if missing:
        raise ValueError(f"concept(s) {missing} are not in the adapter (it holds {sorted(by_name)})")
    out = {}
    for name, images in refs.items():
        c = by_name[name]
        prompts = [p.format(c.handle) for p in PROMPTS[:n_prompts]]
        generated = []
        for i, p in enumerate(tqdm(prompts, desc=f"clip {c.handle}", disable=not progress, unit="prompt")):
            generated += sample(model, [p] * n_images, seed=seed + i * n_images, steps=steps, progress=False)
        plain = [p.replace(c.handle, c.base_words) for p in prompts for _ in range(n_images)]
        out[name] = scores(clip, generated, plain, images)
    return out
