"""Time and memory of a client's statistics capture, per fusion stage (mos.shared.fusion.stages); not a test.

The three stages a client computes in a round, on the chosen base and device:
  stage 1  text-encoder Grams from the concept's own model (six prompts through the text encoder)
  stage 2  cross-attention k/v Grams from the fused text encoder's conditioning (no UNet pass)
  stage 3  spatial Grams recorded while sampling two prompts for --sample-steps steps with guidance
Adapters are random (rank 4 on every layer of the base's default placement; two concepts): the work done
does not depend on the values. Stage 2 and 3 take concept 1's LoRA as the "fused" one (same shapes).
Each stage runs --reps times after one warm-up; medians are reported, with peak CUDA memory where on CUDA.

Usage (repo root, package installed):
    python bench/stats_capture.py                                   # tiny, CPU
    python bench/stats_capture.py --base sd15-random --device cuda  # SD1.5 at 512 px
Writes JSON (default bench/results/stats_capture.json) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from mos.shared.files import write_json
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion import stages
from mos.shared.fusion.config import FusionConfig
from mos.shared.sd.base import Base, load_base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.model import ConceptModel
from mos.shared.sd.sites import input_sites

REPO = Path(__file__).resolve().parents[1]


def random_adapter(base: Base, name: str, placement: str, seed: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    emb = ConceptModel(copy.deepcopy(base)).prompts.init_embeddings("doll", g)
    lora = {}
    for site in input_sites(base.text_encoder, base.unet, placement):
        for layer, out_dim in zip(site.layers, site.out_dims):
            lora[layer] = (0.1 * torch.randn(out_dim, rank, generator=g),
                           torch.randn(rank, site.dim, generator=g) / site.dim ** 0.5)
    return Adapter(base.fingerprint, [Concept(name, "doll", emb)], lora)


def sync(base: Base) -> None:
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--sample-steps", type=int, default=20, help="stage 3 sampling steps (default 20, the server's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stats_capture.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load_base(args.base, args.device, args.dtype)
    load_s = time.perf_counter() - t0
    config = FusionConfig(sample_steps=args.sample_steps).resolved(base.spec)
    own, other = (random_adapter(base, n, config.placement, i) for i, n in enumerate(("alice", "bob")))
    concepts = own.concepts + other.concepts
    runs = {
        "stage1": lambda: stages.stage1(ConceptModel.from_adapter(copy.deepcopy(base), own), "alice", config),
        "stage2": lambda: stages.stage2(copy.deepcopy(base), own.lora, concepts, "alice"),
        "stage3": lambda: stages.stage3(copy.deepcopy(base), own.lora, own, concepts, "alice", config),
    }
    cuda = base.device.type == "cuda"
    rows = {}
    for stage, fn in runs.items():
        times = []
        peak = 0.0
        for rep in range(args.reps + 1):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(base.device)
            sync(base)
            t = time.perf_counter()
            stats = fn()
            sync(base)
            if rep:  # the first run is a warm-up (allocator, kernels)
                times.append(time.perf_counter() - t)
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated(base.device) / 2**30)
        rows[stage] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                       "sites": len(stats), "rows": sum(int(g.rows) for g in stats.values()),
                       "gram_mib": round(sum(g.gram.numel() * g.gram.element_size() for g in stats.values())
                                         / 2**20, 2),
                       "peak_gpu_memory_gib": round(peak, 2) if cuda else None}
    result = {"bench": "stats_capture", "base": args.base, "device": str(base.device),
              "dtype": str(base.dtype).replace("torch.", ""), "resolution": base.resolution,
              "placement": config.placement, "sample_steps": args.sample_steps, "reps": args.reps,
              "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(base.device) if cuda else None, "base_load_s": round(load_s, 1),
              "stages": rows, "total_s": round(time.perf_counter() - t0, 1),
              "command": " ".join(["python", "bench/stats_capture.py", *sys.argv[1:]])}
    write_json(args.out, result)
    print(f"{args.base} on {base.device} ({result['dtype']}), {base.resolution} px, placement {config.placement}, "
          f"stage 3 at {args.sample_steps} steps, median of {args.reps}")
    print(f"{'stage':>7} {'s':>8} {'sites':>6} {'rows':>8} {'Gram MiB':>9} {'peak GiB':>9}")
    for stage, r in rows.items():
        print(f"{stage:>7} {r['median_s']:>8.3f} {r['sites']:>6} {r['rows']:>8} {r['gram_mib']:>9.2f} "
              f"{r['peak_gpu_memory_gib'] if cuda else '-':>9}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
