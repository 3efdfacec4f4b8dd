"""The paper's CLIP scores, on the reference's scale, with a CLIP model from a local folder (nothing is downloaded).

As the reference's evaluation (Mix-of-Show research branch, scripts/evaluation_scripts: CLIPScore of Hessel et al.
2021, ViT-B/32 there) computes them:

    text-alignment  = mean 2.5 · max(cos(CLIP_image(generated_i), CLIP_text("A photo depicts " + caption_i)), 0)
    image-alignment = mean max(cos(CLIP_image(generated), CLIP_image(reference)), 0) over every generated × reference

caption_i is the prompt image i was drawn for with the concept's handle replaced by its class word. The prompts
are the reference's benchmark lists (datasets/benchmark_prompts/single-concept), one per category, 20 each; the
concept folder's `kind` picks the category (person and character: human; object: object), `--category` or
`--prompt-file` overrides it. The reference draws 20 prompts × 50 images per concept (its README: text 0.8010,
image 0.8519 for the fused catA with the pet list); the defaults here are smaller for CPUs, and `--prompts 20
--images 50` is that protocol.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mos.shared.formats.adapter import Adapter
from mos.shared.sampling.denoise import sample
from mos.shared.sd.base import Base
from mos.shared.sd.model import ConceptModel

PREFIX = "A photo depicts "  # CLIPScore's caption prefix: it raised correlation with human judgement in its paper
TEXT_WEIGHT = 2.5           # CLIPScore's w: stretches image-text cosines (~0.2-0.4) towards [0, 1]
IMAGE_WEIGHT = 1.0          # the reference's image-alignment keeps the cosine's scale, clipped at 0 all the same
TOKEN = "<TOK>"             # where the concept goes, in a --prompt-file as in the reference's lists

# The reference's benchmark prompt lists, "{}" where the concept's handle goes. Each has four groups of five:
# places, styles, interactions, attributes. Its objects come as per-object lists (chair, table, vase, plushy); the
# plushy one is the least tied to one kind of thing, so it stands for `object` (the others: --prompt-file).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "human": (
        "A photo of {} on the beach, small waves, detailed symmetric face, beautiful composition",
        "A {}, in front of Eiffel tower", "A {}, near the mount fuji", "A {}, in the forest",
        "A {}, walking on the street",
        "A {}, cyberpunk 2077, 4K, 3d render in unreal engine", "A watercolor painting of a {}",
        "A painting of a {} in the style of Vincent Van Gogh", "A painting of a {} in the style of Claude Monet",
        "A {} in the style of Pixel Art",
        "A {} sit on the chair", "A {} ride a horse", "A {}, wearing a headphone", "A {}, wearing a sunglass",
        "A {}, wearing a Santa hat",
        "A smiling {}", "An angry {}", "A running {}", "A jumping {}", "A {} is lying down",
    ),
    "animal": (
        "A {}, in the swimming pool", "A {}, in front of Eiffel tower", "A {}, near the mount fuji",
        "A {}, in the forest", "A {}, walking on the street",
        "A {}, cyberpunk 2077, 4K, 3d render in unreal engine", "A watercolor painting of a {}",
        "A painting of a {} in the style of Vincent Van Gogh", "A painting of a {} in the style of Claude Monet",
        "A {} in the style of Pixel Art",
        "A {} sit on the chair", "A {} on the boat", "A {}, wearing a headphone", "A {}, wearing a sunglass",
        "A {} playing with a ball",
        "A sad {}", "An angry {}", "A running {}", "A jumping {}", "A {} is lying down",
    ),
    "object": (
        "A {}, in the ocean", "A {}, near the Eiffel tower", "A {}, near the mount fuji", "A {}, in the forest",
        "A {}, in times square",
        "A {}, cyberpunk 2077, 4K, 3d render in unreal engine", "A watercolor painting of a {}",
        "A painting of a {} in the style of Vincent Van Gogh", "A painting of a {} in the style of Claude Monet",
        "A {} in the style of Pixel Art",
        "A {} on a table", "A {} on a chair", "A {} on a skateboard", "A child is playing a {}", "A {} on a carpet",
        "A close view of {}", "A top view of {}", "A {} in rainbow colors", "a fallen {}", "A broken {}",
    ),
    "scene": (
        "A {}, in the snow", "A {}, at night", "A {}, in autumn", "A {}, in a sunny day",
        "A {}, in thunder and lightning",
        "A {}, cyberpunk 2077, 4K, 3d render in unreal engine", "A watercolor painting of a {}",
        "A painting of a {} in the style of Vincent Van Gogh", "A painting of a {} in the style of Claude Monet",
        "A {} in the style of Pixel Art",
        "A girl near the {}", "A boy near the {}", "A dog near the {}", "A cat near the {}",
        "Many people near the {}",
        "A {} in rainbow colors", "A {} made of metal", "A close view of {}", "A top view of {}",
        "A bottom view of {}",
    ),
}
# concept.toml kinds with a list of their own; styles have none in the reference (name one with --category)
KIND_CATEGORY = {"person": "human", "character": "human", "object": "object"}


def category_for(kind: str) -> str:
    """The prompt category a concept folder's `kind` implies."""
    if kind not in KIND_CATEGORY:
        raise ValueError(f"kind {kind!r} has no prompt list of its own (the reference evaluates people, animals, "
                         f"objects and scenes); pass --category {'|'.join(CATEGORIES)} or --prompt-file")
    return KIND_CATEGORY[kind]


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """Prompts from a text file in the reference's format: one a line, <TOK> where the concept goes, blank lines
    skipped (so the reference's own lists, e.g. its chair, table or vase one, can be used as they are)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = tuple(ln for ln in lines if ln)
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    bad = [p for p in prompts if TOKEN not in p]
    if bad:
        raise ValueError(f"--prompt-file {path}: {bad[0]!r} has no {TOKEN} (where the concept goes)")
    return tuple(p.replace(TOKEN, "{}") for p in prompts)


def pick(templates: Sequence[str], n: int) -> list[str]:
    """n of the templates, spread evenly: the lists run in groups (places, styles, interactions, attributes), and
    a short run should see every group rather than the first n places."""
    if not 1 <= n <= len(templates):
        raise ValueError(f"--prompts must be 1..{len(templates)} (the list has {len(templates)})")
    return [templates[i * len(templates) // n] for i in range(n)]


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


def clipscore(cos: torch.Tensor, w: float) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021): w · max(cos, 0), elementwise."""
    return w * cos.clamp(min=0)


def scores(clip: Clip, generated: list[Image.Image], captions: list[str], refs: list[Image.Image]) -> dict:
    """Text- and image-alignment of `generated` (image i was drawn for captions[i], the concept's class word in
    place of its handle), on the reference's scale."""
    g = clip.images(generated)
    t = clip.texts([PREFIX + c for c in captions])
    text = float(clipscore((g * t).sum(-1), TEXT_WEIGHT).mean())
    image = float(clipscore(g @ clip.images(refs).T, IMAGE_WEIGHT).mean())
    return {"text_alignment": text, "image_alignment": image, "images": len(generated), "references": len(refs)}


def evaluate(base: Base, adapter: Adapter, refs: dict[str, list[Image.Image]], clip: Clip,
             templates: dict[str, Sequence[str]], n_prompts: int = 4, n_images: int = 2, steps: int = 20,
             seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Per concept in `refs`: sample n_prompts (of its templates) × n_images with the adapter, score them against
    its references. Each row also lists the prompts drawn."""
    model = ConceptModel.from_adapter(copy.deepcopy(base), adapter)
    by_name = {c.name: c for c in adapter.concepts}
    missing = sorted(set(refs) - set(by_name))
    if missing:
        raise ValueError(f"concept(s) {missing} are not in the adapter (it holds {sorted(by_name)})")
    out = {}
    for name, images in refs.items():
        c = by_name[name]
        chosen = pick(templates[name], n_prompts)
        prompts = [t.replace("{}", c.handle) for t in chosen]
        generated = []
        for i, p in enumerate(tqdm(prompts, desc=f"clip {c.handle}", disable=not progress, unit="prompt")):
            generated += sample(model, [p] * n_images, seed=seed + i * n_images, steps=steps, progress=False)
        captions = [t.replace("{}", c.base_words) for t in chosen for _ in range(n_images)]
        out[name] = {**scores(clip, generated, captions, images), "prompts": prompts}
    return out
