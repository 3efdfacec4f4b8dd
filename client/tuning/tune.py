"""`tune()`: one concept's ED-LoRA from a folder of images, to an output folder (what `mos tune` and `mos-client`
run).

    out/
        adapter.safetensors   layer-wise embeddings + LoRA (scale folded in), the project's adapter format
        concept.json          what was tuned, on which base and data, with which settings (also the cache key)
        loss.png, samples.png the loss curve; before/after images
        checkpoint.safetensors  only while a run is unfinished (`resume=True` continues from it)

A finished folder whose concept.json matches the data digest, config and base fingerprint is returned at once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mos.client.tuning import checkpoint
from mos.client.tuning.data import ConceptData, image_files, load_concept, make_batch
from mos.client.tuning.edlora import StepStats, Trainer, TuneConfig, embedding_norm, make_trainer, train_step
from mos.client.tuning.prior import draw_prior
from mos.client.tuning.report import plot_loss, sample_grid
from mos.client.tuning.settings import (CHECKPOINT_EVERY, DEFAULT_PASSES, REFERENCE_BATCH, SAMPLE_STEPS,
                                        SMALL_GPU_BYTES, STEP_CAP)
from mos.shared.files import write_json
from mos.shared.formats import adapter as adapter_mod
from mos.shared.runtime import say
from mos.shared.sd.base import Base, load_base
from mos.shared.sd.concepts import check_trigger


def default_steps(n_images: int, batch_size: int, device: torch.device) -> int:
    """ceil(DEFAULT_PASSES · n_images / batch_size), capped per device type (STEP_CAP)."""
    steps = math.ceil(DEFAULT_PASSES * n_images / batch_size)
    return max(1, min(steps, STEP_CAP.get(device.type, STEP_CAP["cuda"])))


def batch_plan(device: torch.device) -> tuple[int, int]:
    """(images per forward, micro-batches per step) for the reference's REFERENCE_BATCH images per step: all at
    once, or in halves with gradient accumulation on a GPU too small to hold them."""
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < SMALL_GPU_BYTES:
        return REFERENCE_BATCH // 2, 2
    return REFERENCE_BATCH, 1


def settle(config: TuneConfig, data: ConceptData, base: Base) -> TuneConfig:
    """Every field of `config` decided: the base's recipe, the concept's kind, the batch plan and the length."""
    config = config.resolved(base.spec).for_kind(data.kind)
    if config.batch_size is None:
        batch, accum = batch_plan(base.device)
        config = replace(config, batch_size=batch, grad_accum=config.grad_accum or accum)
    config = replace(config, grad_accum=config.grad_accum or 1)
    per_step = config.batch_size * config.grad_accum
    return replace(config, steps=config.steps or default_steps(len(data.items), per_step, base.device),
                   trigger=check_trigger(config.trigger) if config.trigger else "")


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("mix-of-show-federated", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def cached(out: Path, key: dict[str, Any]) -> bool:
    """A finished run with the same key is in `out` (concept.json is written last, so it marks a finished run)."""
    info = out / "concept.json"
    if not (info.is_file() and (out / adapter_mod.FILENAME).is_file()):
        return False
    try:
        return json.loads(info.read_text()).get("cache_key") == key
    except (OSError, ValueError):
        return False


@dataclass
class Tuned:
    out: Path
    reused: bool                 # a finished matching run was found: nothing was tuned
    trainer: Trainer | None      # the tuned model in memory (None when reused)
    data: ConceptData


def tune(concept_dir: str | Path, out_dir: str | Path, config: TuneConfig = TuneConfig(), base: str | Base = "tiny",
         **options: Any) -> Path:
    """Tune one concept's ED-LoRA (or reuse a matching finished run in `out_dir`); returns `out_dir`.

    `config` decides what is computed (config.trigger: a plain LoRA instead, no concept tokens, the handle
    stands for the trigger words). `base` is a spec (see mos.shared.sd.base) or an already loaded Base, which is
    then modified in place. `options` are run_tune's keywords (class_word, init_word, resume, checkpoint_every,
    device, dtype, gradient_checkpointing, progress, on_step). Bad input (no images, a class word that is not one
    token, ...) raises ValueError.
    """
    return run_tune(concept_dir, out_dir, config, base, **options).out


def run_tune(concept_dir: str | Path, out_dir: str | Path, config: TuneConfig = TuneConfig(),
             base: str | Base = "tiny", *, class_word: str | None = None, init_word: str | None = None,
             resume: bool = False, checkpoint_every: int = CHECKPOINT_EVERY, device: str | None = None,
             dtype: str | None = None, gradient_checkpointing: bool = False, progress: bool = True,
             on_step: Callable[[int, StepStats], None] | None = None) -> Tuned:
    """`tune()`, also handing back the tuned model in memory (callers that go on using it skip a reload).
    `on_step(steps_done, stats)` is called after every step (raising from it stops the run, keeping the last
    checkpoint)."""
    sizes = (config.rank, config.spatial_rank, config.batch_size, config.steps, config.grad_accum)
    if any(v is not None and v < 1 for v in sizes):
        raise ValueError("ranks, batch size, gradient accumulation and steps must be positive")
    if config.prior is not None and not config.prior >= 0:
        raise ValueError(f"the prior's weight must be 0 (off) or more, not {config.prior}")
    out = Path(out_dir)
    image_files(concept_dir)  # an empty or missing folder fails before a base is loaded
    base_obj = base if isinstance(base, Base) else load_base(base, device, dtype)
    data = load_concept(concept_dir, base_obj.resolution, class_word, init_word)
    if config.trigger:  # a plain LoRA has no tokens to start anywhere
        data.init_word = None
    if not data.class_word:
        raise ValueError(f"no class word for {data.folder}: put class_word = \"...\" in concept.toml or pass "
                         "--class-word (one word the base knows, e.g. dog, woman, toy)")
    config = settle(config, data, base_obj)
    key = {"name": data.name, "class_word": data.class_word, "data_digest": data.digest,
           "base_fingerprint": base_obj.fingerprint, "config": config.as_dict()}
    if data.init_word:  # unset, it is left out: runs tuned before it existed stay cached
        key["init_word"] = data.init_word
    if cached(out, key):
        say(f"reusing cached adapter {out / adapter_mod.FILENAME} (same data, settings and base)", sys.stderr)
        return Tuned(out, True, None, data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concept.json").unlink(missing_ok=True)  # from here on the folder is not a finished run
    trainer = make_trainer(base_obj, data.name, data.class_word, config, gradient_checkpointing, data.init_word)
    start = time.time()
    if config.prior:
        trainer.prior = draw_prior(trainer.model, data, data.class_word, config.seed)
    run(trainer, data, out, key, resume, checkpoint_every, progress, on_step)
    write_outputs(trainer, data, out, key, time.time() - start, gradient_checkpointing)
    (out / checkpoint.FILENAME).unlink(missing_ok=True)
    say(f"tuned <{data.name}> in {config.steps} steps: {out / adapter_mod.FILENAME}", sys.stderr)
    return Tuned(out, False, trainer, data)


def run(trainer: Trainer, data: ConceptData, out: Path, key: dict, resume: bool, checkpoint_every: int,
        progress: bool, on_step: Callable[[int, StepStats], None] | None) -> None:
    """The training loop, from the last checkpoint when resuming."""
    cfg, res = trainer.config, trainer.base.resolution
    ckpt = out / checkpoint.FILENAME
    start = 0
    if resume and ckpt.is_file():
        tensors, meta = checkpoint.read(ckpt)
        if meta["key"] != key:
            changed = sorted(k for k in key if meta["key"].get(k) != key[k])
            raise ValueError(f"checkpoint {ckpt} belongs to another run (differs in {', '.join(changed)}); "
                             "run without --resume to start over")
        start = checkpoint.restore(trainer, tensors, meta)
        say(f"resuming <{data.name}> from step {start}/{cfg.steps}", sys.stderr)
    elif resume:
        say(f"no checkpoint in {out}: starting from step 0", sys.stderr)
    elif ckpt.is_file():
        say(f"starting over (pass --resume to continue from {ckpt})", sys.stderr)
    regularised = data.has_masks and cfg.regularised
    recording = trainer.attention_recording() if regularised else contextlib.nullcontext()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"tune <{data.name}>", unit="step", disable=not progress,
               dynamic_ncols=True)
    with recording, bar:
        for step in range(start, cfg.steps):
            micro = [make_batch(data, cfg.batch_size, cfg.seed, step * cfg.grad_accum + k, res, cfg.crop,
                                cfg.captions) for k in range(cfg.grad_accum)]
            stats = train_step(trainer, micro if len(micro) > 1 else micro[0], step)
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"loss became {stats.loss} at step {step + 1}; the last good checkpoint "
                                         f"stays in {out} (try --dtype fp32)")
            bar.set_postfix(loss=f"{stats.loss:.4f}", norm=f"{stats.embedding_norm:.3f}", refresh=False)
            bar.update()
            done = step + 1
            if checkpoint_every and done % checkpoint_every == 0 and done < cfg.steps:
                checkpoint.save(trainer, done, out / checkpoint.FILENAME, key)
            if on_step:
                on_step(done, stats)


def sample_prompts(trainer: Trainer, data: ConceptData) -> list[str]:
    handle = trainer.concept.handle
    prompts = [f"a photo of {handle}"] + data.captions(handle)[:1] + [f"{handle} in the snow"]
    return list(dict.fromkeys(prompts))  # unique, in order


def write_outputs(trainer: Trainer, data: ConceptData, out: Path, key: dict, seconds: float,
                  gradient_checkpointing: bool) -> None:
    """adapter, loss.png, samples.png, then concept.json (last: it marks the run finished)."""
    cfg, base, concept = trainer.config, trainer.base, trainer.concept
    layers = sorted(trainer.lora)
    meta = {"kind": "lora" if cfg.trigger else "ed-lora", "rank": cfg.rank, "steps": cfg.steps, "data_digest": data.digest}
    adapter_mod.save(trainer.model.to_adapter(meta), out)
    plot_loss(trainer.losses, out / "loss.png", trainer.embedding_frozen_at)
    sample_grid(trainer, sample_prompts(trainer, data), out / "samples.png", seed=cfg.seed, steps=SAMPLE_STEPS)
    fifth = max(1, len(trainer.losses) // 5)
    info = {
        "name": concept.name, "handle": concept.handle, "tokens": concept.tokens, "class_word": concept.class_word,
        "init_word": data.init_word, "base": base.spec, "base_fingerprint": base.fingerprint, "rank": cfg.rank,
        "steps": cfg.steps,
        "cross_attention_layers": trainer.model.n_layers, "target_layers": layers,
        "data_digest": data.digest, "images": [it.stem for it in data.items], "skipped": data.skipped,
        "masks": data.has_masks, "captions": [it.caption for it in data.items],
        "config": cfg.as_dict(), "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "gradient_checkpointing": gradient_checkpointing, "seconds": round(seconds, 1),
        "embedding_frozen_at": trainer.embedding_frozen_at,
        "embedding_norm": embedding_norm(trainer), "trigger": concept.trigger,
        "loss": {"first_fifth": mean(trainer.losses[:fifth]), "last_fifth": mean(trainer.losses[-fifth:]),
                 "history": trainer.losses},
        "library_versions": library_versions(), "cache_key": key,
    }
    write_json(out / "concept.json", info)


def mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
