"""Base models: the embedded `tiny`, `sd15-random`, and local SD1.x/SD2.x weights; their fingerprint.

A base is named by a spec string:
  tiny           SD1.5 block layout at toy widths, deterministic weights (seed 0), cached on disk
  tiny:SEED      the same architecture with other weights (a *different* base: its fingerprint differs)
  world          the toy world's base: tiny's layout pretrained on shared/world.py's scenes (weights ship with the
                 package, shared/world/weights/; made by scripts/train_world.py)
  sd15-random    the full SD1.5 architecture with random weights (benchmarks), built once and cached on disk
  PATH           a local diffusers folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)
  FILE.safetensors  a single-file SD1.x checkpoint, read offline with the embedded SD1.5 configs
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mos.shared.sd import architectures
from mos.shared.sd.tokenizer import load_tokenizer, write_tokenizer_files

FORMAT_VERSION = 1  # bump when tiny's or sd15-random's recipe changes: it changes every fingerprint (and cache)
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


class BaseModelError(ValueError):
    """A base model spec or folder that cannot be used; the message says what is missing."""


@dataclass
class Base:
    spec: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image side in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def check_same_base(what: str, got: str, expected: str, error: type[Exception] = ValueError) -> None:
    """The one refusal for anything made on another base: it names the thing and both fingerprints."""
    if got != expected:
        raise error(f"{what} was made on base {got or '?'}, but this base is {expected}: every party must use the "
                    "same base model")


def mos_home() -> Path:
    return Path(os.environ.get("MOS_HOME", Path.home() / ".cache" / "mos"))


# ---------------------------------------------------------------------------------------------- device choice

def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    if name:
        dt = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(name)
        if dt is None:
            raise ValueError(f"unknown dtype {name!r}: use fp32, fp16 or bf16")
        return dt
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------- random weights

def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights from numpy's PCG64 (stable across torch versions and machines)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                continue
            if "embedding" in name:
                std = 0.4 / np.sqrt(p.shape[-1])  # token/position rows with CLIP-like norms (~0.4)
            else:
                std = 1.0 / np.sqrt(int(np.prod(p.shape[1:])))
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape, dtype=np.float32) * np.float32(std)))
        # 1-D tensors: norm scales start at one, every bias at zero (constructors draw random biases)
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def build_random(configs: dict[str, dict[str, Any]], seed: int) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    torch.manual_seed(seed)  # only shapes come from the constructors; weights come from _init_weights
    te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    for i, m in enumerate((te, unet, vae)):
        _init_weights(m, seed * 7919 + i)
    return te.eval(), unet.eval(), vae.eval()


def _write_folder(folder: Path, configs: dict, seed: int | None, weights: Path | None = None) -> None:
    """Write a diffusers-format SD folder atomically: weights drawn from `seed`, or read from `weights/<name>
    .safetensors`, or none (configs only) when neither is given."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write_tokenizer_files(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "DDPMScheduler", **architectures.SCHEDULER}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                 "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
                 "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if weights is not None:
            te, unet, vae = load_weights(configs, weights)
            for name, m in (("text_encoder", te), ("unet", unet), ("vae", vae)):
                m.save_pretrained(tmp / name, safe_serialization=True)
        elif seed is None:
            te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            te.config.save_pretrained(tmp / "text_encoder")
            for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
                _save_config(cls, configs[name], tmp / name)
        else:
            te, unet, vae = build_random(configs, seed)
            te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_config(cls, config: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": cls.__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _built_folder(name: str, recipe: Callable[[], dict], seed: int) -> Path:
    """A random-weight base as a diffusers folder, built once from `recipe` and cached under MOS_HOME."""
    folder = mos_home() / "bases" / f"{name}-v{FORMAT_VERSION}-seed{seed}"
    if not (folder / "model_index.json").is_file():
        _write_folder(folder, recipe(), seed)
    return folder


def tiny_folder(seed: int = 0) -> Path:
    return _built_folder("tiny", architectures.tiny, seed)


def sd15_random_folder(seed: int = 0) -> Path:
    """4 GB of float32 weights: drawing its 1.07 B random weights took 20-30 s in every process that loaded it,
    reading them back takes about one."""
    return _built_folder("sd15-random", architectures.sd15, seed)


# The toy world's pretrained base ships with the world package (scripts/train_world.py makes it).
WORLD_WEIGHTS = Path(__file__).resolve().parents[1] / "world" / "weights"
WORLD_LAYOUT = Path(__file__).resolve().parents[1] / "world" / "layout"


def layout_adapter_folder(spec: str) -> Path | None:
    """The base's own layout adapter (a T2I-Adapter on disc sketches; docs/world.md), where one ships: `world`."""
    return WORLD_LAYOUT if resolve(spec)[0] == "world" else None


def load_weights(configs: dict, folder: Path) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """The three models from `folder/<name>.safetensors` (stored fp16, loaded fp32), every tensor required."""
    from safetensors.torch import load_file

    te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    for name, m in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        f = folder / f"{name}.safetensors"
        if not f.is_file():
            raise BaseModelError(f"the world base's weights are missing ({f}); make them with "
                                 "`python scripts/train_world.py` (see docs/world.md)")
        state = {k: v.float() for k, v in load_file(f).items()}
        if name == "vae" and (folder / "world.json").is_file():
            m.register_to_config(scaling_factor=json.loads((folder / "world.json").read_text())["vae_scaling_factor"])
        m.load_state_dict(state, strict=True)
    return te.eval(), unet.eval(), vae.eval()


def world_folder() -> Path:
    """The world base as a diffusers folder under MOS_HOME, named by its weights' digest (retraining = new folder)."""
    h = hashlib.sha256()
    for name in ("text_encoder", "unet", "vae", "world.json"):
        f = WORLD_WEIGHTS / (name if name.endswith(".json") else f"{name}.safetensors")
        h.update(f.read_bytes() if f.is_file() else b"-")
    folder = mos_home() / "bases" / f"world-v{FORMAT_VERSION}-{h.hexdigest()[:12]}"
    if not (folder / "model_index.json").is_file():
        _write_folder(folder, architectures.world(), None, WORLD_WEIGHTS)
    return folder


def sd15_config_folder() -> Path:
    """SD1.5 configs and tokenizer, no weights: lets diffusers read single-file checkpoints offline."""
    folder = mos_home() / "configs" / f"sd15-v{FORMAT_VERSION}"
    if not (folder / "model_index.json").is_file():
        _write_folder(folder, architectures.sd15(), None)
    return folder


# ---------------------------------------------------------------------------------------------- fingerprint

# Config keys that change what a model computes without changing its tensors' names or shapes.
_FP_KEYS = ("hidden_act", "layer_norm_eps", "attention_head_dim", "num_attention_heads", "norm_eps",
            "norm_num_groups", "scaling_factor", "act_fn", "upcast_attention", "use_linear_projection",
            "time_embedding_type", "flip_sin_to_cos", "freq_shift", "cross_attention_dim", "sample_size")
_FP_SCHED = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def fingerprint(tokenizer: CLIPTokenizer, models: dict[str, torch.nn.Module], scheduler_config: dict) -> str:
    """sha256 over the compute-relevant config and every tensor (as float32, sorted by name)."""
    h = hashlib.sha256(b"mos-fingerprint/1\n")
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps({k: scheduler_config.get(k) for k in _FP_SCHED}, sort_keys=True, default=str).encode())
    for comp in sorted(models):
        model = models[comp]
        cfg = model.config if isinstance(model.config, dict) else model.config.to_dict()
        h.update(comp.encode())
        h.update(json.dumps({k: cfg.get(k) for k in _FP_KEYS}, sort_keys=True, default=str).encode())
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- loading

def _load_folder(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL, dict]:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise BaseModelError(
            f"base folder {folder} lacks {', '.join(m + '/' for m in missing)} — expected a diffusers-format Stable "
            "Diffusion folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    sched_file = folder / "scheduler" / "scheduler_config.json"

    def load(what: str, fn):
        try:
            return fn()
        except Exception as e:  # name the broken part rather than a deep library traceback
            raise BaseModelError(f"cannot read {what} of base {folder}: {type(e).__name__}: {e}") from e

    tok = load("tokenizer/", lambda: load_tokenizer(folder / "tokenizer"))
    te = load("text_encoder/", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                                     torch_dtype=torch.float32))
    unet = load("unet/", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True,
                                                                      torch_dtype=torch.float32))
    vae = load("vae/", lambda: AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True,
                                                             torch_dtype=torch.float32))
    sched = load("scheduler/scheduler_config.json", lambda: json.loads(sched_file.read_text()))
    return tok, te, unet, vae, sched


def _load_single_file(path: Path):
    from diffusers import StableDiffusionPipeline
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(sd15_config_folder()), local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        raise BaseModelError(
            f"cannot read single-file checkpoint {path} offline as SD1.x ({type(e).__name__}: {e}); "
            "convert it to a diffusers folder and pass that folder instead") from e
    return pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, dict(pipe.scheduler.config)


def resolve(spec: str) -> tuple[str, Path | None, int | None]:
    """(kind, path, seed) for a base spec; kind is tiny | sd15-random | folder | file."""
    if spec == "tiny" or spec.startswith("tiny:"):
        seed = spec.partition(":")[2] or "0"
        if not seed.isdigit():
            raise BaseModelError(f"bad base spec {spec!r}: use tiny or tiny:SEED")
        return "tiny", None, int(seed)
    if spec in ("sd15-random", "world"):
        return spec, None, 0
    path = Path(spec).expanduser()
    if not path.exists():
        raise BaseModelError(f"base {spec!r} is neither tiny, tiny:SEED, world, sd15-random nor an existing path")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BaseModelError(f"base file {path} is not a .safetensors checkpoint (pickle checkpoints are refused)")
        return "file", path, None
    return "folder", path, None


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, dtype advice) drowns the project's own progress lines."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_base(spec: str = "tiny", device: str | None = None, dtype: str | None = None) -> Base:
    """Load a base model, compute its fingerprint, then move it to the chosen device/dtype (frozen, eval mode)."""
    quiet_libraries()
    kind, path, seed = resolve(spec)
    if kind == "tiny":
        tok, te, unet, vae, sched = _load_folder(tiny_folder(seed))
    elif kind == "world":
        tok, te, unet, vae, sched = _load_folder(world_folder())
    elif kind == "sd15-random":
        tok, te, unet, vae, sched = _load_folder(sd15_random_folder(seed))
    elif kind == "file":
        tok, te, unet, vae, sched = _load_single_file(path)
    else:
        tok, te, unet, vae, sched = _load_folder(path)
    fp = fingerprint(tok, {"text_encoder": te, "unet": unet, "vae": vae}, sched)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    for m in (te, unet):
        m.requires_grad_(False).eval().to(dev, dt)
    vae.requires_grad_(False).eval().to(dev, torch.float32 if dev.type == "cuda" else dt)  # fp16 VAEs overflow
    return Base(spec, tok, te, unet, vae, sched, fp, dev, dt)


def load_tokenizer_only(spec: str = "tiny") -> CLIPTokenizer:
    """The base's tokenizer without loading weights."""
    kind, path, seed = resolve(spec)
    folder = {"tiny": lambda: tiny_folder(seed), "sd15-random": sd15_config_folder,
              "file": sd15_config_folder, "folder": lambda: path}[kind]()
    if not (folder / "tokenizer").is_dir():
        raise BaseModelError(f"base folder {folder} lacks tokenizer/")
    return load_tokenizer(folder / "tokenizer")
