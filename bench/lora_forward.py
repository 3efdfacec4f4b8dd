"""peft's two-product LoRA form against one merged weight (shared/sd/lora_layers.py); not a test.

On one model with the base's own recipe (the world base: rank 16 on the wide placement), the two forms
alternating call by call so both share whatever else the machine is doing:
  tune    one ED-LoRA training step (`train_step`)
  sample  one denoiser call without gradients, classifier-free batch of two, as the sampler makes it (with the
          concept being tuned, or with --adapter's)
each once with the layers choosing the merged weight where it is cheaper (the product) and once in peft's form.
It also checks that the forms agree: the loss and every LoRA gradient of one batch, relative difference.

Usage (repo root, package installed):
    python bench/lora_forward.py                  # world base, one thread (about 2 minutes)
    python bench/lora_forward.py --adapter FUSED_FOLDER   # sampling with a fused (full-rank) adapter
Writes JSON (default bench/results/lora_forward.json) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from mos.client.tuning.data import load_concept, make_batch
from mos.client.tuning.edlora import TuneConfig, compute_loss, make_trainer, train_step
from mos.client.tuning.tune import settle
from mos.shared.formats import adapter as adapter_mod
from mos.shared.sd import lora as lora_mod
from mos.shared.sd.base import load_base
from mos.shared.sd.lora_layers import merges, peft_form
from mos.shared.sd.model import ConceptModel

from output import write  # bench/output.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
FORMS = ("merged", "peft")


def form(name: str):
    return peft_form() if name == "peft" else contextlib.nullcontext()


def gradients(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = compute_loss(trainer, batch, 0)[0]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.named_parameters().items() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss), grads


def agreement(trainer, batch) -> dict:
    """Largest relative difference between the forms: the loss, and each LoRA tensor's gradient (by norm)."""
    loss_m, g_m = gradients(trainer, batch)
    with peft_form():
        loss_p, g_p = gradients(trainer, batch)
    rel = [float((g_m[n] - g_p[n]).norm() / g_p[n].norm().clamp_min(1e-30)) for n in g_p]
    return {"loss_rel_diff": abs(loss_m - loss_p) / abs(loss_p), "grad_rel_diff_max": max(rel),
            "tensors": len(rel)}


def merged_share(trainer, batch) -> dict:
    """How many LoRA layers choose the merged weight in a tuning step and in a sampling call."""
    counts = {"tune": [0, 0], "sample": [0, 0]}
    layers = lora_mod.lora_layers(trainer.model.models).values()

    def hook(kind):
        def fn(m, args):
            counts[kind][merges(m, args[0], m.rows(args[0]), {}) is not None] += 1
        return fn
    for kind, grad in (("tune", True), ("sample", False)):
        hs = [m.register_forward_pre_hook(hook(kind)) for m in layers]
        with torch.set_grad_enabled(grad):
            compute_loss(trainer, batch, 0)
        for h in hs:
            h.remove()
        trainer.optimizer.zero_grad(set_to_none=True)
    return {k: {"merged": v[1], "peft": v[0]} for k, v in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="world")
    ap.add_argument("--concept", default=str(REPO / "data" / "alice"))
    ap.add_argument("--steps", type=int, default=20, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapter", default=None, help="time sampling with this adapter folder (e.g. a fused one, "
                    "full rank) instead of the concept being tuned")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "lora_forward.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.base, "cpu", None)
    data = load_concept(args.concept, base.resolution)
    cfg = settle(TuneConfig(steps=10**6), data, base)  # what tune() would run; the rates stay at their start
    trainer = make_trainer(base, data.name, data.class_word, cfg)
    batches = [make_batch(data, cfg.batch_size, 0, s, base.resolution, cfg.crop) for s in range(4)]
    check = agreement(trainer, batches[0])
    share = merged_share(trainer, batches[0])

    sampler = trainer.model
    if args.adapter:
        adapter = adapter_mod.load(args.adapter)
        sampler = ConceptModel.from_adapter(load_base(args.base, "cpu", None), adapter)
        prompt = f"a photo of {adapter.concepts[0].handle}"
    else:
        prompt = batches[0].captions[0].replace("<TOK>", trainer.concept.handle)
    with torch.no_grad():
        cond = sampler.encode([prompt, ""])  # classifier-free: the prompt and the empty one
    side = base.resolution // 2 ** (len(base.vae.config.block_out_channels) - 1)
    latents = torch.randn(2, base.unet.config.in_channels, side, side)
    t = torch.tensor([500, 500])

    # Each kind on its own, its two forms alternating (AB, BA, ...): a call right after a tuning step runs on
    # cold caches, so mixing the kinds in one rotation would always charge that to the same form.
    ms = {f"{kind}_{f}": [] for kind in ("tune", "sample") for f in FORMS}
    for kind in ("tune", "sample"):
        for i in range(args.warmup + args.steps):
            for f in FORMS if i % 2 == 0 else FORMS[::-1]:
                t0 = time.perf_counter()
                with form(f):
                    if kind == "tune":
                        train_step(trainer, batches[i % len(batches)], i)
                    else:
                        with torch.no_grad():
                            sampler.predict(latents, t, cond)
                if i >= args.warmup:
                    ms[f"{kind}_{f}"].append((time.perf_counter() - t0) * 1e3)

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(ms[a], ms[b])), 3)

    result = {
        "base": args.base, "sample_adapter": args.adapter, "rank": cfg.rank, "placement": cfg.placement, "batch_size": cfg.batch_size,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "ms_median": {k: round(statistics.median(v), 1) for k, v in ms.items()},
        "ratio_merged_over_peft": {"tune": ratio("tune_merged", "tune_peft"),
                                   "sample": ratio("sample_merged", "sample_peft")},
        "layers_merged": share, "agreement": check,
    }
    write(result, args.out, "bench/lora_forward.py")


if __name__ == "__main__":
    main()
