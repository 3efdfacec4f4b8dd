"""Cost of an ED-LoRA training step against a plain LoRA step; not a test.

Both run `mos.client.tuning.edlora.train_step` on the same model, batch and resolution, interleaved step by step so
they share whatever else the machine is doing:
  lora           one concept token, one embedding, 3-D conditioning: one text-encoder pass per sample
  edlora         two tokens, one embedding per cross-attention layer, 4-D conditioning: L passes per sample
  edlora_masked  edlora plus the mask-weighted loss and the attention regulariser (explicit cross-attention)
It also times the text encoder alone (forward + backward, L copies vs one) to say how much of an ED-LoRA step
the L passes cost, and how much sharing the causal prefix before the first concept token could save at most.

Usage (repo root, package installed):
    python bench/tune_step.py                                   # tiny base, CPU
    python bench/tune_step.py --base sd15-random --device cuda  # SD1.5 at 512², batch 2 (a few minutes)
    python bench/tune_step.py --base sd15-random --resolution 256 --threads 1 --steps 4 --warmup 1 \
        --variants lora,edlora                                   # SD1.5 shapes on a CPU (about 6 minutes)
Writes JSON (default bench/results/tune_step.json) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mos.client.tuning.data import load_concept, make_batch
from mos.client.tuning.edlora import TuneConfig, make_trainer, token_ids, train_step
from mos.shared.sd.base import load_base

from output import write  # bench/output.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"lora": dict(layerwise=False, use_masks=False), "edlora": dict(layerwise=True, use_masks=False),
            "edlora_masked": dict(layerwise=True, use_masks=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(ms: list[float]) -> dict:
    return {"median": round(statistics.median(ms), 2), "mean": round(statistics.fmean(ms), 2),
            "min": round(min(ms), 2), "n": len(ms)}


def te_pass(trainer, ids: torch.Tensor) -> None:
    """Text encoder alone, forward + backward (into the embeddings and the text encoder's LoRA)."""
    with trainer.autocast():
        h = trainer.base.text_encoder(ids.reshape(-1, ids.shape[-1]).to(trainer.base.device)).last_hidden_state
    h.float().square().mean().backward()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure(trainer, batches, steps: int, warmup: int, variants: list[str] | None = None) -> tuple[dict, dict]:
    """ms of each job per round (jobs interleaved, order rotated every round) and peak CUDA memory (GiB).

    Jobs: the three step variants, and the text encoder alone with layer-wise ids (te_edlora) and plain ids
    (te_lora). Measured in the same rounds, their ratios see the same background load.
    """
    dev = trainer.base.device
    captions = batches[0].captions
    te_ids = {"te_edlora": token_ids(trainer, captions, True)[0], "te_lora": token_ids(trainer, captions, False)[0]}
    jobs = list(variants or VARIANTS) + list(te_ids)
    ms = {j: [] for j in jobs}
    peak = {j: 0.0 for j in jobs}
    with trainer.attention_recording():  # unmasked variants fall through to the stock (SDPA) path
        for i in range(warmup + steps):
            for j in jobs[i % len(jobs):] + jobs[:i % len(jobs)]:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                sync(dev)
                t0 = time.perf_counter()
                if j in VARIANTS:
                    train_step(trainer, batches[i % len(batches)], i, **VARIANTS[j])
                else:
                    te_pass(trainer, te_ids[j])
                sync(dev)
                if i >= warmup:
                    ms[j].append((time.perf_counter() - t0) * 1e3)
                if dev.type == "cuda":
                    peak[j] = max(peak[j], torch.cuda.max_memory_allocated(dev) / 2**30)
    return ms, peak


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of the per-round ratio (robust to load that changes between rounds)."""
    return round(statistics.median(a / b for a, b in zip(num, den)), 3)


def prefix_tokens(trainer, captions: list[str]) -> int:
    """Tokens before the first concept token (BOS included): identical in all L copies of a causal encoder."""
    _, pos = token_ids(trainer, captions, True)
    return int(pos[:, 0].min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bf16/fp16 on CUDA (autocast), fp32 on CPU")
    ap.add_argument("--concept", default=str(REPO / "data" / "alice"))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=None, help="image side in px (default: the base's native "
                    "size; 256 keeps sd15-random on a CPU to seconds per step)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                    f"{', '.join(VARIANTS)} (lora and edlora always run: the ratio needs both)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 20 CPU, 10 CUDA)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tune_step.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_base(args.base, args.device, args.dtype)
    load_s = time.perf_counter() - t_start
    steps = args.steps or (10 if base.device.type == "cuda" else 20)
    res = args.resolution or base.resolution
    data = load_concept(args.concept, res)
    config = TuneConfig(steps=10**6, batch_size=args.batch_size)  # lr stays at its start over the few steps timed
    trainer = make_trainer(base, data.name, data.class_word or "doll", config,
                           gradient_checkpointing=args.gradient_checkpointing)
    batches = [make_batch(data, args.batch_size, 0, s, res) for s in range(4)]
    variants = [v for v in VARIANTS if v in {"lora", "edlora", *args.variants.split(",")}]
    ms, peak = measure(trainer, batches, steps, args.warmup, variants)
    prefix = prefix_tokens(trainer, batches[0].captions)
    seq = base.tokenizer.model_max_length
    te_share = ratio(ms["te_edlora"], ms["edlora"])
    result = {
        "base": args.base, "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else platform.processor()
        or platform.machine(),
        "resolution": res, "batch_size": args.batch_size, "cross_attention_layers": trainer.model.n_layers,
        "gradient_checkpointing": args.gradient_checkpointing, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "ms_per_step": {v: summary(ms[v]) for v in variants},
        "ratio_edlora_over_lora": ratio(ms["edlora"], ms["lora"]),
        "ratio_edlora_masked_over_lora": ratio(ms["edlora_masked"], ms["lora"]) if "edlora_masked" in ms else None,
        "text_encoder_fwd_bwd": {"edlora_ms": summary(ms["te_edlora"]), "lora_ms": summary(ms["te_lora"]),
                                 "share_of_edlora_step": te_share,
                                 "share_of_lora_step": ratio(ms["te_lora"], ms["lora"])},
        "causal_prefix": {"tokens": prefix, "of_sequence": seq,
                          "max_saving_of_edlora_step": round(te_share * prefix / seq, 4),
                          "note": "upper bound: only positions before the first concept token are shared; "
                                  "every later position (padding included) attends to the concept tokens"},
        "peak_gpu_memory_gib": {k: round(v, 2) for k, v in peak.items()} if base.device.type == "cuda" else None,
        "base_load_s": round(load_s, 1), "total_s": round(time.perf_counter() - t_start, 1),
    }
    write(result, args.out, "bench/tune_step.py")


if __name__ == "__main__":
    main()
