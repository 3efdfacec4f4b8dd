"""How the fused layer fits, by choice of ridge: the reference's LBFGS against the closed form at fixed ε, at the
per-site λ that GCV picks, and at the λ chosen on a held-out share (the product's default for spatial sites;
mos.shared.fusion.solver); not a test.

One layer problem per SD1.5 kind and width: text-encoder q/k/v (768 -> 768), cross-attention k/v (768 text features
-> 320 and 1280), spatial (320, 640, 1280 square). Three concepts with 1k, 4k and 16k input rows, rank-4 LoRAs. The
inputs have a decaying spectrum (singular values ~ 1/j in a random basis) that each concept tilts its own way, so
concepts conflict on shared directions, most on the weakly visited ones. Two losses, each relative to leaving the
layer at W0 (dW = 0):

    fitted    sum_i ||(dW - dW_i) X_i^T||^2 on the rows the statistics came from
    held-out  the same on fresh rows of the same concepts (same distribution, same counts)

The held-out choice sees a third set of rows per concept, a quarter as many as it fitted (its own share: the
held-out loss above is on rows no method saw).

LBFGS is the reference's optimiser (its update_quasi_newton: torch LBFGS, lr 1, strong Wolfe, from W0, 500 iterations
for text and k/v layers, 50 for spatial ones) on the reference's loss (the mean squared error over the stacked rows),
evaluated through the Grams in float64: the same function of W as the stacked-rows form, with no float32 rounding,
so LBFGS gets at least the accuracy it has in the reference, at a cost that does not grow with the row count.

Usage (from the repo root, package installed):
    python bench/ridge.py [--out bench/results/ridge.json] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mos.shared.fusion.solver import SiteSums

F64 = torch.float64
RANK = 4
ROWS = (1000, 4000, 16000)
LBFGS_ITERS = {"text": 500, "cross_kv": 500, "spatial": 50}
# (kind, d_in, d_out): the reference's layer shapes
PROBLEMS = [("text", 768, 768), ("cross_kv", 768, 320), ("cross_kv", 768, 1280),
            ("spatial", 320, 320), ("spatial", 640, 640), ("spatial", 1280, 1280)]
FIXED = {"eps=1e-2": 1e-2, "eps=1e-3": 1e-3, "eps=1e-8": 1e-8}


def gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**62)
    return torch.Generator().manual_seed(seed)


def problem(p: int, d_in: int, d_out: int, rows: tuple[int, ...]) -> dict:
    """Grams of fitted and fresh rows and the LoRAs of the concepts of one layer problem."""
    g = gen(1, p)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))
    spectrum = 1.0 / torch.arange(1, d_in + 1, dtype=F64)
    fit, held, choose, loras = [], [], [], []
    for c, n in enumerate(rows):
        gc = gen(2, p, c)
        scale = spectrum * torch.exp(0.75 * torch.randn(d_in, generator=gc, dtype=F64))  # the concept's tilt
        grams = []
        for _ in range(2):  # fitted rows, then fresh rows
            x = (torch.randn(n, d_in, generator=gc, dtype=F64) * scale) @ basis.T
            grams.append(x.T @ x)
        fit.append(grams[0])
        held.append(grams[1])
        B = 0.05 * torch.randn(d_out, RANK, generator=gc, dtype=F64)
        A = torch.randn(RANK, d_in, generator=gc, dtype=F64) / math.sqrt(d_in)
        loras.append((B, A))
        x = (torch.randn(max(1, n // 4), d_in, generator=gen(3, p, c), dtype=F64) * scale) @ basis.T
        choose.append(x.T @ x)  # the held-out share the product's default chooses λ on
    return {"fit": fit, "held": held, "choose": choose, "loras": loras, "rows": list(rows)}


def loss(dW: torch.Tensor, grams: list[torch.Tensor], loras: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sum_i tr((dW - dW_i) G_i (dW - dW_i)^T): the stacked squared error, from Grams, without cancellation."""
    total = 0.0
    for G, (B, A) in zip(grams, loras):
        D = dW - B @ A
        total += float(((D @ G) * D).sum())
    return total


def lbfgs(pr: dict, iters: int, d_out: int) -> tuple[torch.Tensor, float, int]:
    """The reference's LBFGS from W0 (dW = 0) on the MSE over all stacked rows (sum_i rows_i * d_out entries)."""
    n_entries = sum(pr["rows"]) * d_out
    deltas = [B @ A for B, A in pr["loras"]]
    dW = torch.zeros_like(deltas[0]).requires_grad_(True)
    opt = torch.optim.LBFGS([dW], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-16, tolerance_change=1e-16)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad()
        value = sum(((dW - Di) @ G * (dW - Di)).sum() for G, Di in zip(pr["fit"], deltas)) / n_entries
        value.backward()
        return value

    t0 = time.perf_counter()
    opt.step(closure)
    return dW.detach(), time.perf_counter() - t0, evals


def closed(pr: dict, eps: float | None, heldout: bool = False) -> tuple[torch.Tensor, float, float]:
    """The product's solve (SiteSums) at a fixed ε, at GCV's λ when eps is None, or at the λ chosen on the held-out
    share: dW, seconds, chosen ε."""
    t0 = time.perf_counter()
    site, share = SiteSums("s", pr["fit"][0].shape[0]), SiteSums("s#heldout", pr["fit"][0].shape[0])
    for c, (G, H, lo, n) in enumerate(zip(pr["fit"], pr["choose"], pr["loras"], pr["rows"])):
        site.add(f"c{c}", G, n, {"L": lo})
        if heldout:
            share.add(f"c{c}", H, max(1, n // 4), {"L": lo})
    sol = site.solve(eps, share if heldout else None)
    B, A = sol.loras["L"]
    return B @ A, time.perf_counter() - t0, sol.eps


def run(problems: list[tuple[str, int, int]], rows: tuple[int, ...], iters_scale: float) -> list[dict]:
    out = []
    for p, (kind, d_in, d_out) in enumerate(problems):
        pr = problem(p, d_in, d_out, rows)
        zero = torch.zeros(d_out, d_in, dtype=F64)
        base = {"fit": loss(zero, pr["fit"], pr["loras"]), "held": loss(zero, pr["held"], pr["loras"])}
        methods = {}
        iters = max(1, int(LBFGS_ITERS[kind] * iters_scale))
        dW, secs, evals = lbfgs(pr, iters, d_out)
        methods["lbfgs"] = {"dW": dW, "s": secs, "evals": evals, "iters": iters}
        for label, eps in (*FIXED.items(), ("gcv", None)):
            dW, secs, chosen = closed(pr, eps)
            methods[label] = {"dW": dW, "s": secs, "eps": chosen}
        dW, secs, chosen = closed(pr, 1e-2, heldout=True)
        methods["heldout"] = {"dW": dW, "s": secs, "eps": chosen}
        row = {"kind": kind, "d_in": d_in, "d_out": d_out, "rows": list(rows), "methods": {}}
        for label, m in methods.items():
            dW = m.pop("dW")
            m["fit_rel"] = loss(dW, pr["fit"], pr["loras"]) / base["fit"]
            m["held_rel"] = loss(dW, pr["held"], pr["loras"]) / base["held"]
            row["methods"][label] = m
        ref = row["methods"]["lbfgs"]
        for label, m in row["methods"].items():
            m["fit_vs_lbfgs"] = m["fit_rel"] / ref["fit_rel"]
            m["held_vs_lbfgs"] = m["held_rel"] / ref["held_rel"]
        out.append(row)
        print(f"{kind:8s} {d_in:>4}->{d_out:<4} " + "  ".join(
            f"{label} fit {m['fit_vs_lbfgs']:.3f} held {m['held_vs_lbfgs']:.3f}" for label, m in row["methods"].items()
            if label != "lbfgs") + f"  (vs LBFGS; gcv eps {row['methods']['gcv']['eps']:.2g}, heldout eps "
            f"{row['methods']['heldout']['eps']:.2g}, "
            f"LBFGS {ref['s']:.1f}s, gcv {row['methods']['gcv']['s']:.2f}s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/ridge.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller layers and rows, a tenth of the LBFGS iterations "
                    "(checks that the script runs; not the figures)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems, rows, scale = PROBLEMS, ROWS, 1.0
    if args.quick:
        problems, rows, scale = [("text", 96, 64), ("spatial", 64, 64)], (100, 200, 400), 0.1
    t0 = time.perf_counter()
    results = run(problems, rows, scale)
    summary = {
        "gcv_at_or_below_lbfgs_fit_all": all(r["methods"]["gcv"]["fit_vs_lbfgs"] <= 1.0 for r in results),
        "gcv_at_or_below_lbfgs_held_all": all(r["methods"]["gcv"]["held_vs_lbfgs"] <= 1.0 for r in results),
        "vs_lbfgs_fit_held": {f"{r['kind']} {r['d_in']}->{r['d_out']}": {
            label: [round(m["fit_vs_lbfgs"], 4), round(m["held_vs_lbfgs"], 4)]
            for label, m in r["methods"].items() if label != "lbfgs"} for r in results},
        "heldout_at_or_below_lbfgs_fit_all": all(r["methods"]["heldout"]["fit_vs_lbfgs"] <= 1.0 for r in results),
        "heldout_at_or_below_lbfgs_held_all": all(r["methods"]["heldout"]["held_vs_lbfgs"] <= 1.0 for r in results),
        "gcv_eps": {f"{r['kind']} {r['d_in']}->{r['d_out']}": r["methods"]["gcv"]["eps"] for r in results},
        "heldout_eps": {f"{r['kind']} {r['d_in']}->{r['d_out']}": r["methods"]["heldout"]["eps"] for r in results},
    }
    result = {
        "benchmark": "ridge",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "quick": args.quick,
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "load_avg_1_5_15_start": list(os.getloadavg())},
        "settings": {"rank": RANK, "rows": list(rows), "lbfgs_iters": LBFGS_ITERS, "iters_scale": scale,
                     "lbfgs": "torch.optim.LBFGS lr=1 history_size=25 strong_wolfe tol=1e-16, from W0, float64, "
                              "MSE over stacked rows evaluated through the Grams",
                     "inputs": "singular values 1/j in a random basis, each concept scaling them by exp(0.75 z_j)",
                     "losses": "relative to dW = 0; *_vs_lbfgs = method / LBFGS (below 1: better than LBFGS)"},
        "problems": results,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
