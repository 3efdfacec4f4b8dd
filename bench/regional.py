"""Cost of regional sampling (mos.shared.sampling.regional) against plain sampling; not a test.

Times one image with 1, 2 and 4 regions and without regions, interleaved (each repetition runs every setting,
in a rotating order) so that load on the machine hits all settings alike; reports medians and ratios to plain,
of wall time and of the process's CPU time (steadier on a shared machine; with --threads 1 it is the work done).
Boxes: 1 = left half, 2 = left/right halves, 4 = quadrants. Guidance is on (batch [uncond, cond]).
With --batch P it also times P pictures with two regions each (their own prompts, the same boxes) drawn one by
one against the same P in one batch (`denoise_batch`, what `mos eval world` does), interleaved the same way.

Usage (from the repo root, package installed):
    python bench/regional.py [--out PATH] [--base tiny] [--device cpu] [--steps 20] [--reps 7] [--size 64x64]
                             [--batch P]
Writes JSON (default bench/results/regional.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mos.shared.sampling.denoise import initial_latents, seeded_latents
from mos.shared.sampling.layout import Region, parse_size
from mos.shared.sampling.regional import denoise_batch, denoise_regional
from mos.shared.sd.base import load_base
from mos.shared.sd.model import ConceptModel

BOXES = {
    1: [(0.0, 0.0, 0.5, 1.0)],
    2: [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)],
    4: [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)],
}
PROMPTS = ["a red ball", "a green tree", "a blue car", "a yellow house"]


def regions(n: int) -> list[Region]:
    return [Region(PROMPTS[i], "", box) for i, box in enumerate(BOXES[n])] if n else []


def clock(device: torch.device, work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of `work`: on a shared machine the CPU time is the steadier."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t, c = time.perf_counter(), time.process_time()
    work()
    sync()
    return time.perf_counter() - t, time.process_time() - c


def timed(model: ConceptModel, lat: torch.Tensor, n: int, steps: int) -> tuple[float, float]:
    return clock(lat.device, lambda: denoise_regional(model, "a photo of a street", "blurry", regions(n), lat,
                                                      steps=steps, guidance=7.5, progress=False))


def timed_pictures(model: ConceptModel, lat: torch.Tensor, steps: int, together: bool) -> tuple[float, float]:
    """P pictures (lat [P, …]) with two regions each, each its own pair of prompts: one batch, or one by one."""
    jobs = [("a street", [Region(PROMPTS[(i + k) % len(PROMPTS)], "", box) for k, box in enumerate(BOXES[2])])
            for i in range(len(lat))]
    if together:
        return clock(lat.device, lambda: denoise_batch(model, jobs, lat, "blurry", steps=steps, progress=False))
    return clock(lat.device, lambda: [denoise_batch(model, [job], lat[i:i + 1], "blurry", steps=steps,
                                                    progress=False) for i, job in enumerate(jobs)])


def batch_rows(model: ConceptModel, size: tuple[int, int], pictures: int, steps: int, reps: int) -> dict:
    lat = seeded_latents(model, range(pictures), size)
    timed_pictures(model, lat, min(2, steps), True)  # warm-up
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps):
        for together in ((True, False) if rep % 2 else (False, True)):
            w, c = timed_pictures(model, lat, steps, together)
            wall[together].append(w)
            cpu[together].append(c)
    return {"pictures": pictures, "one_by_one": {**summary(wall[False], wall[False], "wall"),
                                                 **summary(cpu[False], cpu[False], "cpu")},
            "batched": {**summary(wall[True], wall[False], "wall"), **summary(cpu[True], cpu[False], "cpu")}}


def summary(t: list[float], plain: list[float], kind: str) -> dict:
    return {f"{kind}_median_s": statistics.median(t), f"{kind}_min_s": min(t), f"{kind}_times_s": t,
            f"{kind}_ratio": statistics.median(t) / statistics.median(plain),
            f"{kind}_ratio_paired": statistics.median(a / b for a, b in zip(t, plain))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/regional.json")
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", default=None, help="WxH (default: the base's native size)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 was as fast as 2 on tiny models)")
    ap.add_argument("--batch", type=int, default=0, help="also time P pictures one by one against one batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base(args.base, args.device, args.dtype)
    model = ConceptModel(base)
    size = parse_size(args.size) if args.size else (base.resolution, base.resolution)
    lat = initial_latents(model, 1, seed=0, size=size)
    settings = [0, 1, 2, 4]
    for n in settings:  # warm-up: allocator, kernels, per-resolution index caches
        timed(model, lat, n, min(2, args.steps))
    wall: dict[int, list[float]] = {n: [] for n in settings}
    cpu: dict[int, list[float]] = {n: [] for n in settings}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for n in settings[rep % 4:] + settings[:rep % 4]:
            w, c = timed(model, lat, n, args.steps)
            wall[n].append(w)
            cpu[n].append(c)
    rows = {str(n): {**summary(wall[n], wall[0], "wall"), **summary(cpu[n], cpu[0], "cpu")} for n in settings}
    result = {
        "bench": "regional", "base": args.base, "fingerprint": base.fingerprint, "device": str(base.device),
        "dtype": str(base.dtype).replace("torch.", ""), "size": list(size), "steps": args.steps, "guidance": 7.5,
        "reps": args.reps, "threads": args.threads, "scheduler": "dpm++",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name() if base.device.type == "cuda" else None},
        "regions": rows,
        "batch": batch_rows(model, size, args.batch, args.steps, args.reps) if args.batch else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.base} {size[0]}x{size[1]}, {args.steps} steps, guidance 7.5, {args.reps} interleaved reps, "
          f"{base.device}")
    print(f"{'regions':>8} {'wall s':>8} {'ratio':>6} {'paired':>7} {'cpu s':>8} {'ratio':>6} {'paired':>7}")
    for n, r in rows.items():
        print(f"{n:>8} {r['wall_median_s']:>8.3f} {r['wall_ratio']:>6.2f} {r['wall_ratio_paired']:>7.2f} "
              f"{r['cpu_median_s']:>8.3f} {r['cpu_ratio']:>6.2f} {r['cpu_ratio_paired']:>7.2f}")
    if result["batch"]:
        b = result["batch"]
        print(f"{b['pictures']} pictures with 2 regions: one by one {b['one_by_one']['wall_median_s']:.3f} s, "
              f"one batch {b['batched']['wall_median_s']:.3f} s (paired ratio {b['batched']['wall_ratio_paired']:.2f};"
              f" cpu {b['batched']['cpu_ratio_paired']:.2f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
