"""Scale benchmark of closed-form gradient fusion (mos.shared.fusion.solver); not a test.

(1) Server cost at SD1.5 input-site dimensions for N concepts (rank 4 each), synthetic Grams
    streamed concept by concept; each N runs in a fresh subprocess so its peak RSS is its own.
(2) The reference's way as a baseline: per-layer LBFGS over stacked raw activations, on a sample
    of layers, with the whole-model time extrapolated (and labelled as such).

Usage (from the repo root, package installed):
    python bench/fusion_scale.py [--out PATH] [--ns 2,10,50,100] [--lbfgs-ns 2,10] [--quick]
Writes JSON (default bench/results/fusion_scale.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mos.shared.fusion.config import FusionConfig, parse_eps
from mos.shared.fusion.solver import SiteSums, site_residual
from mos.shared.fusion.spill import SpilledTerms

THREADS = 2  # default; --threads overrides (the machine is 2 cores)
RANK = 4
ROWS = (64, 256)  # input rows per concept and site (uniform); low-rank-plus-noise
SHARED_DIRS, OWN_DIRS = 16, 8  # activation structure shared by all concepts / own to a concept
NOISE = 0.1
TEXT_DIM = 768
LBFGS_ITERS = {"spatial": 50, "cross_kv": 500, "text": 500}
TARGETS = {"n100_server_total_s": 60.0, "n100_peak_rss_mib": 2048, "rss_flat_in_n": True, "lbfgs_speedup": 100.0}
EPS = FusionConfig().eps  # the product's default ridge; --eps changes it (None: λ per site by GCV)
WORKERS = None  # --workers: threads of the fusion's intake and solve (None: as mos-server, default_workers())

# --------------------------------------------------------------------------- model dimensions


def fallback_sites() -> list[dict]:
    """SD1.5 attention input sites from the real architecture (diffusers module names)."""
    blocks = [(f"down_blocks.{b}.attentions.{a}", c) for b, c in enumerate((320, 640, 1280)) for a in range(2)]
    blocks.append(("mid_block.attentions.0", 1280))
    blocks += [(f"up_blocks.{b}.attentions.{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in range(3)]
    sites = []
    for path, c in blocks:
        p = f"unet.{path}.transformer_blocks.0"
        sites += [
            _site(f"{p}.attn1.qkv", c, [(f"{p}.attn1.to_{x}", c) for x in "qkv"], 3),
            _site(f"{p}.attn1.to_out.0", c, [(f"{p}.attn1.to_out.0", c)], 3),
            _site(f"{p}.attn2.to_q", c, [(f"{p}.attn2.to_q", c)], 3),
            _site(f"{p}.attn2.kv", TEXT_DIM, [(f"{p}.attn2.to_{x}", c) for x in "kv"], 2),
            _site(f"{p}.attn2.to_out.0", c, [(f"{p}.attn2.to_out.0", c)], 3),
        ]
    for i in range(12):
        p = f"text_encoder.text_model.encoder.layers.{i}.self_attn"
        sites += [
            _site(f"{p}.qkv", TEXT_DIM, [(f"{p}.{x}_proj", TEXT_DIM) for x in "qkv"], 1),
            _site(f"{p}.out_proj", TEXT_DIM, [(f"{p}.out_proj", TEXT_DIM)], 1),
        ]
    return sites


def _site(name: str, dim: int, layers: list[tuple[str, int]], stage: int | None = None) -> dict:
    return {"site": name, "dim": dim, "stage": stage, "layers": [{"name": n, "out_dim": o} for n, o in layers]}


def load_sites() -> tuple[list[dict], str]:
    """Dims from `mos base info --base sd15-random --json` when it works, else the table above."""
    exe = shutil.which("mos")
    cmd = [exe] if exe else [sys.executable, "-m", "mos.shared.commands.mos"]
    cmd += ["base", "info", "--base", "sd15-random", "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
        sites = json.loads(proc.stdout)["input_sites"]
        sites = [_site(s["site"], int(s["dim"]), [(l["name"], int(l["out_dim"])) for l in s["layers"]], s.get("stage"))
                 for s in sites]
        if not sites:
            raise RuntimeError("no input_sites in its output")
        return sites, "mos base info --base sd15-random --json"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the table, and say why
        why = f"{type(exc).__name__}: {exc}"[:200]
        return fallback_sites(), f"fallback table in bench/fusion_scale.py (mos base info unavailable: {why})"


def quick_subset(sites: list[dict]) -> list[dict]:
    """One transformer block per UNet channel width plus two text-encoder layers."""
    keep = ("down_blocks.0.attentions.0.", "down_blocks.1.attentions.0.", "mid_block.attentions.0.",
            "encoder.layers.0.", "encoder.layers.1.")
    picked = [s for s in sites if any(k in s["site"] for k in keep)]
    return picked or sites[: max(1, len(sites) // 8)]


STAGE_KIND = {1: "text", 2: "cross_kv", 3: "spatial"}  # `stage` in mos base info's input_sites


def layer_kind(name: str, stage: int | None = None) -> str:
    """Which LBFGS budget the reference gives a layer (its text-encoder budget also covers cross-attn k/v)."""
    if stage in STAGE_KIND:
        return STAGE_KIND[stage]
    if name.startswith("text_encoder") or "text_model" in name:
        return "text"
    if "attn2" in name and ("to_k" in name or "to_v" in name):
        return "cross_kv"
    return "spatial"


# --------------------------------------------------------------------------- synthetic data


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**62)
    return torch.Generator().manual_seed(seed)


def _structure(site_idx: int, dim: int, concept: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Row count m, coefficients Z (m x 24) and directions W (24 x d) of one concept's inputs."""
    shared = torch.randn(SHARED_DIRS, dim, generator=_gen(1, site_idx))
    g = _gen(2, site_idx, concept)
    m = int(torch.randint(ROWS[0], ROWS[1] + 1, (1,), generator=g))
    own = torch.randn(OWN_DIRS, dim, generator=g)
    Z = torch.cat([3.0 * torch.randn(m, SHARED_DIRS, generator=g), torch.randn(m, OWN_DIRS, generator=g)], dim=1)
    return m, Z, torch.cat([shared, own])


def concept_rows(site_idx: int, dim: int, concept: int) -> torch.Tensor:
    """X_i for one concept at one site: shared + own low-rank structure + noise (float32)."""
    m, Z, W = _structure(site_idx, dim, concept)
    x = Z @ W + NOISE * torch.randn(m, dim, generator=_gen(5, site_idx, concept))
    return x / math.sqrt(dim)


def concept_gram(site_idx: int, dim: int, concept: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The expected X_i^T X_i over the noise: exact low-rank part + isotropic noise floor.

    Costs 24 d^2 instead of m d^2, so the benchmark's time goes to the server, not to fake clients.
    It is full rank (as Grams of real spatial activations, with thousands of rows, are).
    """
    m, Z, W = _structure(site_idx, dim, concept)
    W = W.to(dtype) / math.sqrt(dim)
    K = (Z.T @ Z).to(dtype)
    G = W.T @ (K @ W)
    G.diagonal().add_(NOISE**2 * m / dim)
    return G, m


def concept_lora(site_idx: int, layer_idx: int, dim: int, out_dim: int, concept: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(3, site_idx, layer_idx, concept)
    B = 0.05 * torch.randn(out_dim, RANK, generator=g)
    A = torch.randn(RANK, dim, generator=g) / math.sqrt(dim)
    return B, A


def concept_loras(site_idx: int, site: dict, concept: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {l["name"]: concept_lora(site_idx, j, site["dim"], l["out_dim"], concept) for j, l in enumerate(site["layers"])}


# --------------------------------------------------------------------------- (1) one N, in a child


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_scale(n: int, sites: list[dict], residual_upto: int, gram_dtype: torch.dtype, spill: str | None) -> dict:
    """spill: a folder for the per-concept terms (spill.SpilledTerms, one subfolder per site), or None: memory."""
    base_rss = _maxrss_mib()
    sums = [SiteSums(s["site"], s["dim"], SpilledTerms(Path(spill) / f"{k:03d}") if spill else None)
            for k, s in enumerate(sites)]
    gen_s = add_s = add_cpu_s = 0.0
    add_per_concept = []
    for c in range(n):  # stream: the server only ever sees one concept's Grams at a time
        add_before = add_s
        for k, s in enumerate(sites):
            t0 = time.perf_counter()
            gram, rows = concept_gram(k, s["dim"], c, gram_dtype)
            loras = concept_loras(k, s, c)
            t1, c1 = time.perf_counter(), time.process_time()
            sums[k].add(f"c{c}", gram, rows, loras)
            add_s += time.perf_counter() - t1
            add_cpu_s += time.process_time() - c1
            gen_s += t1 - t0
            del gram
        add_per_concept.append(add_s - add_before)
    tenth = max(1, n // 10)
    held = {
        "gram_sums_mib": sum(sm.dim ** 2 for sm in sums) * 8 / 2**20,
        "terms_mib": _mib(t for sm in sums for ts in sm.terms().values() for term in ts for t in (term.B, term.AG)),
        "terms_in": "files (spilled)" if spill else "memory",
    }
    rss_after_intake = _maxrss_mib()

    t0, c0 = time.perf_counter(), time.process_time()
    fused, paths, dense, lams = {}, Counter(), 0, []
    for sm in sums:
        sol = sm.solve(EPS)
        paths[sol.path] += 1
        dense += len(sol.dense)
        lams.append(sol.lam)
        # what the server would keep to write the fused LoRA file
        fused[sm.name] = {k: (B.float(), A.float()) for k, (B, A) in sol.loras.items()}
    solve_s, solve_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    held["outputs_mib"] = _mib(t for site in fused.values() for BA in site.values() for t in BA)
    peak = _maxrss_mib()

    out = {
        "n": n, "gen_s": gen_s, "add_s": add_s, "solve_s": solve_s, "server_s": add_s + solve_s,
        "add_cpu_s": add_cpu_s, "solve_cpu_s": solve_cpu_s, "server_cpu_s": add_cpu_s + solve_cpu_s,
        "add_s_per_concept_first_tenth": sum(add_per_concept[:tenth]) / tenth,
        "add_s_per_concept_last_tenth": sum(add_per_concept[-tenth:]) / tenth,
        "peak_rss_mib": peak, "start_rss_mib": base_rss, "rss_after_intake_mib": rss_after_intake, **held,
        "paths": dict(paths), "dense_layers": dense, "lam_min": min(lams), "lam_max": max(lams),
        "fused_rank_max": max(B.shape[1] for site in fused.values() for B, _ in site.values()),
    }
    if n <= residual_upto:  # quality of the fit for concept 0, per site (regenerates its Grams)
        res = []
        for k, s in enumerate(sites):
            gram, _ = concept_gram(k, s["dim"], 0, torch.float64)
            res.append(site_residual(fused[s["site"]], concept_loras(k, s, 0), gram))
        res.sort()
        out["residual_concept0"] = {"median": res[len(res) // 2], "max": res[-1], "min": res[0]}
    return out


def _rss_now_mib() -> dict[str, float]:
    """Current RSS split as the kernel counts it (/proc/self/status): anonymous memory (the process's own) and
    file-backed pages mapped in (e.g. a safetensors file read through mmap: page cache, dropped when unmapped)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out


def _bench_bounds(sites: list[dict]):
    """Limits as mos-server has them (state.bounds: from the base), so intake pays for their checks too: weight
    norms of the random base the synthetic LoRAs are scaled for (‖W‖_F ~ sqrt(d_out)); row power of the synthetic
    Grams: tr G = m (9·16 + 8 + NOISE²) for m rows, sent with max(m, d) rows (run_real), at the mean m."""
    from mos.shared.fusion.bounds import Bounds

    norms = {l["name"]: math.sqrt(l["out_dim"]) for s in sites for l in s["layers"]}
    m = sum(ROWS) / 2
    power = {s["site"]: (9.0 * SHARED_DIRS + OWN_DIRS + NOISE**2) * m / max(m, s["dim"]) for s in sites}
    return Bounds(norms, power)


def run_real(n: int, sites: list[dict], folder: str) -> dict:
    """mos-server's intake as it runs: each synthetic Gram encoded by the wire codec as a client does (float32
    triangular factor, packed; clients' work, excluded), then per concept the server's decode_gram -> Fusion
    check_adapter/check_stats with the base's bounds -> save to the state folder -> Fusion.add_stats over the file
    references (FlowerRunner._query's order), then every stage's solve and the report. The fusion spills its terms
    under the state folder, as mos-server's does."""
    from mos.protos import mos_pb2 as pb
    from mos.shared.federation.gram_codec import decode_gram, encode_gram
    from mos.shared.formats.adapter import Adapter
    from mos.shared.fusion.driver import Fusion
    from mos.shared.fusion.stats import Gram
    from mos.shared.fusion.stats_file import checked_refs, save_stats
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.sites import Site

    base_rss = _maxrss_mib()
    objs = [Site(s["site"], s["dim"], tuple(l["name"] for l in s["layers"]), tuple(l["out_dim"] for l in s["layers"]),
                 s.get("stage") or (1 if layer_kind(s["site"]) == "text" else 2 if layer_kind(s["site"]) == "cross_kv"
                                    else 3)) for s in sites]
    state = Path(folder)
    workers = {} if WORKERS is None else {"workers": WORKERS}
    fusion = Fusion("bench", objs, FusionConfig(eps=EPS), _bench_bounds(sites), spill=state / ".fusion", **workers)
    gen_s = intake_s = intake_cpu_s = 0.0
    per_concept, rss = [], []
    for c in range(n):
        name = f"c{c:03d}"
        t0 = time.perf_counter()
        wire_stats, lora = {}, {}
        for k, s in enumerate(sites):
            gram, rows = concept_gram(k, s["dim"], c, torch.float64)
            enc, rank, t = encode_gram(Gram(gram, rows), "float32")
            # The synthetic Gram is the full-rank expectation (as real spatial Grams over thousands of rows are); the
            # wire requires rank <= rows, so it travels with the rows a full-rank Gram needs.
            wire_stats[s["site"]] = (enc, rank, t.float(), max(rows, rank))
            lora |= concept_loras(k, s, c)
            del gram
        adapter = Adapter("bench", [Concept(name, "object", torch.zeros(1, 0, 8))], lora)
        t1, c1 = time.perf_counter(), time.process_time()
        gen_s += t1 - t0
        stats = {site: decode_gram(enc, rank, t, objs[k].dim, rows, site)
                 for k, (site, (enc, rank, t, rows)) in enumerate(wire_stats.items())}
        assert all(e == pb.TRIANGULAR_FACTOR for e, *_ in wire_stats.values())
        fusion.check_adapter(adapter)
        fusion.check_stats(name, stats)
        path = save_stats(stats, state / name / "stats-1.safetensors")
        refs = checked_refs(stats, path)
        del stats, wire_stats  # the fusion reads each Gram back from the state file (as mos-server's does)
        fusion.add(adapter)
        fusion.add_stats(name, refs)
        dt = time.perf_counter() - t1
        intake_s += dt
        intake_cpu_s += time.process_time() - c1
        per_concept.append(dt)
        rss.append(_rss_now_mib())
    rss_after_intake = _maxrss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    fused = fusion.solve(1) | fusion.solve(2) | fusion.solve(3)
    solve_s, solve_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    report = fusion.report()
    report_s, report_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rss_end = _rss_now_mib()
    res = sorted(r for by_site in report["residuals"].values() for r in by_site.values())
    tenth = max(1, n // 10)
    files = [f for f in state.rglob("*") if f.is_file()]
    spill = sum(f.stat().st_size for f in files if ".fusion" in f.relative_to(state).parts)
    disk = sum(f.stat().st_size for f in files)
    fusion.close()
    first, last = rss[tenth - 1], rss[-1]  # after the first tenth of the concepts, after the last one
    return {
        "n": n, "mode": "real", "gen_s": gen_s, "add_s": intake_s, "solve_s": solve_s, "report_s": report_s,
        "server_s": intake_s + solve_s + report_s, "add_cpu_s": intake_cpu_s, "solve_cpu_s": solve_cpu_s,
        "report_cpu_s": report_cpu_s, "server_cpu_s": intake_cpu_s + solve_cpu_s + report_cpu_s,
        "add_s_per_concept_first_tenth": sum(per_concept[:tenth]) / tenth,
        "add_s_per_concept_last_tenth": sum(per_concept[-tenth:]) / tenth,
        "peak_rss_mib": _maxrss_mib(), "start_rss_mib": base_rss, "rss_after_intake_mib": rss_after_intake,
        "rss_samples": {"after_concept": [tenth, n], "anon_mib": [first["RssAnon"], last["RssAnon"]],
                        "file_mib": [first["RssFile"], last["RssFile"]], "after_solve": rss_end,
                        "anon_max_sampled_mib": max(r["RssAnon"] for r in rss + [rss_end]),
                        "file_max_sampled_mib": max(r["RssFile"] for r in rss + [rss_end])},
        "rss_anon_growth_per_concept_mib": (last["RssAnon"] - first["RssAnon"]) / max(1, n - tenth),
        "gram_sums_mib": sum(s["dim"] ** 2 for s in sites) * 8 / 2**20, "terms_mib": float("nan"),
        "terms_in": "files (spilled)", "outputs_mib": _mib(t for BA in fused.values() for t in BA),
        "state_disk_mib": disk / 2**20, "state_stats_mib_per_concept": (disk - spill) / 2**20 / n,
        "spill_mib_per_concept": spill / 2**20 / n, "residuals_reported": len(res),
        "residual_median": res[len(res) // 2] if res else None, "residuals_skipped": report["residuals_skipped"],
        "paths": dict(Counter(report["solve_path"].values())), "dense_layers": 0,
        "factor_products": str(fusion.sums[next(iter(fusion.sums))].factor_products).removeprefix("torch."),
        "fusion_workers": fusion.workers,
    }


# --------------------------------------------------------------------------- (2) LBFGS baseline


class _OutOfTime(Exception):
    pass


def lbfgs_reference(xs: list[torch.Tensor], targets: list[torch.Tensor], W0: torch.Tensor, iters: int,
                    max_s: float) -> dict:
    """The reference's optimiser: LBFGS from W0 on the mean-squared error over stacked rows (float32).

    Stops after max_s seconds if the budget is not done by then; the caller extrapolates the time.
    """
    X, Y = torch.cat(xs), torch.cat(targets)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-16, tolerance_change=1e-16)
    best = {"loss": math.inf, "W": W0.clone(), "evals": 0}
    t0 = time.perf_counter()

    def closure():
        if time.perf_counter() - t0 > max_s:
            raise _OutOfTime
        opt.zero_grad()
        loss = F.mse_loss(F.linear(X, W), Y)
        best["evals"] += 1
        value = float(loss.detach())
        if value < best["loss"]:
            best["loss"], best["W"] = value, W.detach().clone()
        loss.backward()
        return loss

    completed = True
    try:
        opt.step(closure)
    except _OutOfTime:
        completed = False
    elapsed = time.perf_counter() - t0
    n_iter = int(opt.state[W].get("n_iter", 0))
    done = n_iter if completed else max(n_iter - 1, 1)  # the interrupted iteration does not count
    return {"W": best["W"], "evals": best["evals"], "iters_done": done, "completed": completed,
            "elapsed_s": elapsed, "full_s": elapsed if completed else elapsed * iters / done}


def fusion_loss(W: torch.Tensor, Ws: list[torch.Tensor], xs: list[torch.Tensor]) -> float:
    """sum_i ||(W - W_i) X_i^T||^2 in float64."""
    return sum(float(torch.linalg.norm(x.double() @ (W.double() - Wi.double()).T) ** 2) for x, Wi in zip(xs, Ws))


def lbfgs_sample(n: int, sites: list[dict], site_idx: int, layer_idx: int, max_s: float) -> dict:
    s = sites[site_idx]
    layer = s["layers"][layer_idx]
    d_in, d_out, kind = s["dim"], layer["out_dim"], layer_kind(layer["name"], s.get("stage"))
    xs = [concept_rows(site_idx, d_in, c) for c in range(n)]
    deltas = [B @ A for B, A in (concept_lora(site_idx, layer_idx, d_in, d_out, c) for c in range(n))]
    W0 = torch.randn(d_out, d_in, generator=_gen(4, site_idx, layer_idx)) / math.sqrt(d_in)
    Ws = [W0 + dW for dW in deltas]
    loss_w0 = fusion_loss(W0, Ws, xs)

    run = lbfgs_reference(xs, [x @ Wi.T for x, Wi in zip(xs, Ws)], W0, LBFGS_ITERS[kind], max_s)
    W_lbfgs, lbfgs_s = run["W"], run["full_s"]

    # closed form: Gram building (the clients' share) and the server's add + solve, timed apart
    t0 = time.perf_counter()
    grams = [x.double().T @ x.double() for x in xs]
    t1 = time.perf_counter()
    sm = SiteSums(s["site"], d_in)
    for c, (x, G) in enumerate(zip(xs, grams)):
        sm.add(f"c{c}", G, x.shape[0], {layer["name"]: concept_lora(site_idx, layer_idx, d_in, d_out, c)})
    sol = sm.solve(EPS)
    B, A = sol.loras[layer["name"]]
    t2 = time.perf_counter()
    W_closed = W0.double() + B @ A

    return {
        "n": n, "layer": layer["name"], "kind": kind, "d_in": d_in, "d_out": d_out, "iters": LBFGS_ITERS[kind],
        "rows": sum(x.shape[0] for x in xs), "lbfgs_s": lbfgs_s, "lbfgs_evals": run["evals"],
        "lbfgs_iters_done": run["iters_done"], "lbfgs_completed": run["completed"],
        "lbfgs_measured_s": run["elapsed_s"],
        "closed_gram_s": t1 - t0, "closed_server_s": t2 - t1, "closed_s": t2 - t0, "closed_path": sol.path,
        "speedup": lbfgs_s / (t2 - t0), "speedup_server_only": lbfgs_s / (t2 - t1),
        "lbfgs_rel_loss": fusion_loss(W_lbfgs, Ws, xs) / loss_w0,
        "closed_rel_loss": fusion_loss(W_closed, Ws, xs) / loss_w0,
    }


def layer_groups(sites: list[dict]) -> dict[tuple[str, int], list[tuple[int, int, int]]]:
    """(kind, d_in) -> every (site_idx, layer_idx, d_out) of that kind and input width."""
    groups: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for i, s in enumerate(sites):
        for j, l in enumerate(s["layers"]):
            groups.setdefault((layer_kind(l["name"], s.get("stage")), s["dim"]), []).append((i, j, l["out_dim"]))
    return groups


def run_lbfgs(ns: list[int], sites: list[dict], scale: dict[int, dict], max_s: float) -> dict:
    """Time one layer per (kind, d_in) -- the one with the smallest d_out -- and extrapolate.

    Every other layer of the group is charged the sampled time scaled by d_out / d_out_sampled
    (an LBFGS evaluation costs rows * d_in * d_out; same iteration budget within a group).
    """
    groups = layer_groups(sites)
    samples, extrapolated = [], []
    for n in ns:
        whole = 0.0
        for key, members in sorted(groups.items()):
            site_idx, layer_idx, d_out = min(members, key=lambda m: m[2])
            r = lbfgs_sample(n, sites, site_idx, layer_idx, max_s)
            r["group_layers"] = len(members)
            r["group_lbfgs_s_extrapolated"] = sum(r["lbfgs_s"] * m[2] / d_out for m in members)
            samples.append(r)
            whole += r["group_lbfgs_s_extrapolated"]
            done = "" if r["lbfgs_completed"] else f" (extrapolated from {r['lbfgs_iters_done']} iters)"
            print(f"  lbfgs N={n:<3} {key[0]:8s} {r['d_in']:>4}->{r['d_out']:<4} iters={r['iters']:<3} "
                  f"lbfgs {r['lbfgs_s']:7.2f}s{done}  closed {r['closed_s']:.4f}s (server {r['closed_server_s']:.4f}s)  "
                  f"x{r['speedup']:6.0f}  rel.loss lbfgs {r['lbfgs_rel_loss']:.3e} closed {r['closed_rel_loss']:.3e}",
                  flush=True)
        row = {"n": n, "lbfgs_whole_model_s_extrapolated": whole}
        if n in scale:
            row["closed_form_server_s_measured"] = scale[n]["server_s"]
            row["speedup_whole_model_extrapolated"] = whole / scale[n]["server_s"]
        extrapolated.append(row)
    return {
        "settings": {"optimizer": "torch.optim.LBFGS lr=1 history_size=25 strong_wolfe tol=1e-16, float32, from W0",
                     "iters": LBFGS_ITERS, "loss": "mean squared error over stacked rows (as the reference)",
                     "sampling": "one layer per (kind, d_in), the smallest d_out; others scaled by d_out",
                     "time_cap_s": max_s,
                     "time_cap_rule": "a sample still running after time_cap_s is stopped; lbfgs_s is then "
                                      "lbfgs_measured_s * iters / lbfgs_iters_done (EXTRAPOLATED) and its loss is the "
                                      "loss reached so far (lbfgs_completed = false)"},
        "samples": samples, "whole_model": extrapolated,
    }


# --------------------------------------------------------------------------- report


def summarise(scale: list[dict], lbfgs: dict | None) -> dict:
    by_n = {r["n"]: r for r in scale}
    big = by_n.get(max(by_n)) if by_n else None
    out: dict = {}
    real = bool(big and big.get("mode") == "real")
    if big:
        # which path the keys (n100_server_total_s, ...) describe in this file
        out["path"] = ("real: mos-server's intake (decode -> check with bounds -> state file -> Fusion.add_stats), "
                       "solve and report" if real else "synthetic: SiteSums.add on dense Grams, and the solve")
    if real:
        out[f"n{big['n']}_real_server_total_s"] = round(big["server_s"], 3)
        out[f"n{big['n']}_real_server_total_cpu_s"] = round(big["server_cpu_s"], 3)
        out[f"n{big['n']}_real_report_s"] = round(big["report_s"], 3)
        out[f"n{big['n']}_state_disk_mib"] = round(big["state_disk_mib"], 1)
        out["state_stats_mib_per_concept"] = round(big["state_stats_mib_per_concept"], 1)
        out["factor_products"] = big["factor_products"]
        out["fusion_workers"] = big.get("fusion_workers")
    if big:
        out[f"n{big['n']}_server_total_s"] = round(big["server_s"], 3)
        out[f"n{big['n']}_add_s"] = round(big["add_s"], 3)
        out[f"n{big['n']}_solve_s"] = round(big["solve_s"], 3)
        out[f"n{big['n']}_peak_rss_mib"] = round(big["peak_rss_mib"], 1)
        # CPU seconds of the process: on a shared, oversubscribed machine wall time also counts waiting for a core
        out[f"n{big['n']}_server_total_cpu_s"] = round(big["server_cpu_s"], 3)
        out[f"n{big['n']}_solve_cpu_s"] = round(big["solve_cpu_s"], 3)
    if len(by_n) > 1:
        lo, hi = by_n[min(by_n)], by_n[max(by_n)]
        out["rss_per_concept_mib"] = round((hi["peak_rss_mib"] - lo["peak_rss_mib"]) / (hi["n"] - lo["n"]), 2)
        out["rss_per_concept_source"] = f"peak RSS slope between N={lo['n']} and N={hi['n']}"
        if real:  # the terms live in the spill files there; anonymous RSS growth within the largest run
            out["rss_anon_per_concept_mib_within_largest"] = round(hi["rss_anon_growth_per_concept_mib"], 2)
        else:
            out["terms_mib_per_concept"] = round(hi["terms_mib"] / hi["n"], 2)
        out["fixed_gram_sums_mib"] = round(hi["gram_sums_mib"], 1)
    elif real:
        # One N: anonymous RSS (the process's own memory, not mapped file pages) after the first tenth of the
        # concepts and after the last, sampled between concepts; the slope is the growth per concept
        out["rss_per_concept_mib"] = round(big["rss_anon_growth_per_concept_mib"], 2)
        out["rss_per_concept_source"] = (f"RssAnon slope between concept {big['rss_samples']['after_concept'][0]} "
                                         f"and {big['n']}, within the one run (/proc/self/status between concepts)")
        out[f"n{big['n']}_rss_anon_max_sampled_mib"] = round(big["rss_samples"]["anon_max_sampled_mib"], 1)
        out[f"n{big['n']}_rss_file_max_sampled_mib"] = round(big["rss_samples"]["file_max_sampled_mib"], 1)
    elif big:
        # One N: the per-concept growth measured inside the run (intake only; the solve's outputs grow with N too)
        out["rss_per_concept_mib"] = round((big["rss_after_intake_mib"] - big["gram_sums_mib"] - big["start_rss_mib"])
                                           / big["n"], 2)
        out["rss_per_concept_source"] = "(RSS after intake - start RSS - Gram sums) / N, within the one run"
    if lbfgs:
        s = lbfgs["samples"]
        out["lbfgs_layer_speedup_min"] = round(min(r["speedup"] for r in s), 1)
        out["lbfgs_layer_speedup_median"] = round(sorted(r["speedup"] for r in s)[len(s) // 2], 1)
        out["lbfgs_layer_speedup_server_only_min"] = round(min(r["speedup_server_only"] for r in s), 1)
        out["closed_loss_le_lbfgs_loss_all"] = all(r["closed_rel_loss"] <= r["lbfgs_rel_loss"] * (1 + 1e-9) for r in s)
        out["rel_loss_lbfgs_vs_closed"] = {f"N{r['n']} {r['kind']} {r['d_in']}->{r['d_out']}":
                                           [float(f"{r['lbfgs_rel_loss']:.3e}"), float(f"{r['closed_rel_loss']:.3e}")] for r in s}
        whole = [r for r in lbfgs["whole_model"] if "speedup_whole_model_extrapolated" in r]
        if whole:
            out["lbfgs_whole_model_s_extrapolated"] = {r["n"]: round(r["lbfgs_whole_model_s_extrapolated"], 1) for r in whole}
            out["lbfgs_whole_model_speedup_extrapolated"] = {r["n"]: round(r["speedup_whole_model_extrapolated"], 1) for r in whole}
    return out


def print_table(scale: list[dict]) -> None:
    print(f"{'N':>4} {'add s':>8} {'solve s':>8} {'server s':>9} {'gen s':>7} {'peak RSS MiB':>13} "
          f"{'ΣG MiB':>7} {'terms MiB':>9} {'out MiB':>8} {'dense':>6} {'paths':>16} {'resid c0 med/max':>18}")
    for r in scale:
        res = r.get("residual_concept0")
        res_s = f"{res['median']:.2e}/{res['max']:.2e}" if res else "-"
        print(f"{r['n']:>4} {r['add_s']:>8.2f} {r['solve_s']:>8.2f} {r['server_s']:>9.2f} {r['gen_s']:>7.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['gram_sums_mib']:>7.0f} {r['terms_mib']:>9.0f} {r['outputs_mib']:>8.0f} "
              f"{r['dense_layers']:>6} {json.dumps(r['paths']):>16} {res_s:>18}")


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(args.threads)}
    if not args.glibc_malloc_default:
        # Fixed threshold: every block >= 128 KiB is its own mmap, returned on free. With glibc's
        # default (dynamic) threshold the d x d temporaries of the solve and of the fake clients
        # share the heap with long-lived small tensors, and RSS carries the fragmentation.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fusion_scale.json")
    ap.add_argument("--ns", default="2,10,50,100", help="concept counts for the scale run")
    ap.add_argument("--lbfgs-ns", default="2,10", help="concept counts for the LBFGS baseline ('' to skip)")
    ap.add_argument("--quick", action="store_true", help="a subset of sites (one block per width, 2 text layers)")
    ap.add_argument("--residual-upto", type=int, default=10, help="report concept-0 residuals for N up to this")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    ap.add_argument("--glibc-malloc-default", action="store_true",
                    help="do not set MALLOC_MMAP_THRESHOLD_=131072 in the scale children (see notes)")
    ap.add_argument("--lbfgs-max-s", type=float, default=60.0,
                    help="stop an LBFGS sample after this long and extrapolate its time (default 60)")
    ap.add_argument("--gram-dtype", choices=("float32", "float64"), default="float32",
                    help="dtype the Grams reach the server in (shared/federation/gram_codec.py ships float32 by default)")
    ap.add_argument("--eps", type=parse_eps, default=FusionConfig().eps,
                    help="ridge factor of every solve, or 'gcv' (default: the product's, as mos fuse)")
    ap.add_argument("--terms-in-memory", action="store_true",
                    help="keep per-concept terms in memory instead of spilling them to a temporary folder")
    ap.add_argument("--real", action="store_true",
                    help="mos-server's intake path: wire-encoded Grams, decode -> check -> state file -> Fusion")
    ap.add_argument("--spill-dir", default=None, help="where the temporary state/spill folder goes (default: TMPDIR)")
    ap.add_argument("--workers", type=int, default=None,
                    help="--real: the fusion's worker threads (default: as mos-server, the cores --threads leaves idle, "
                         "at most 2)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sites-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global EPS, WORKERS
    EPS, WORKERS = args.eps, args.workers

    if args.child is not None:
        sites = json.loads(Path(args.sites_file).read_text())
        with tempfile.TemporaryDirectory(prefix="mos-spill-", dir=args.spill_dir) as spill:
            if args.real:
                print(json.dumps(run_real(args.child, sites, spill)))
                return
            result = run_scale(args.child, sites, args.residual_upto, getattr(torch, args.gram_dtype),
                               None if args.terms_in_memory else spill)
        print(json.dumps(result))
        return
    load_before = os.getloadavg()

    sites, source = load_sites()
    if args.quick:
        sites = quick_subset(sites)
    ns = [int(v) for v in args.ns.split(",") if v]
    lbfgs_ns = [int(v) for v in args.lbfgs_ns.split(",") if v]
    n_layers = sum(len(s["layers"]) for s in sites)
    print(f"{len(sites)} input sites, {n_layers} layers ({source}); quick={args.quick}; threads={args.threads}; "
          f"load avg {load_before[0]:.1f}", flush=True)

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sites, f)
        sites_file = f.name
    try:
        scale = []
        for n in ns:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--sites-file", sites_file,
                   "--residual-upto", str(args.residual_upto), "--threads", str(args.threads),
                   "--gram-dtype", args.gram_dtype, "--eps", "gcv" if EPS is None else repr(EPS)] + (
                       ["--terms-in-memory"] if args.terms_in_memory else []) + (["--real"] if args.real else []) + (
                       ["--spill-dir", args.spill_dir] if args.spill_dir else []) + (
                       ["--workers", str(args.workers)] if args.workers is not None else [])
            env = {**os.environ, **child_env(args)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"child N={n} failed:\n{proc.stderr[-3000:]}")
            scale.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = scale[-1]
            print(f"  N={n}: server {r['server_s']:.2f}s (add {r['add_s']:.2f} + solve {r['solve_s']:.2f}; CPU "
                  f"{r['add_cpu_s']:.2f} + {r['solve_cpu_s']:.2f}), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    finally:
        os.unlink(sites_file)

    lbfgs = run_lbfgs(lbfgs_ns, sites, {r["n"]: r for r in scale}, args.lbfgs_max_s) if lbfgs_ns else None

    kinds = Counter(layer_kind(l["name"], s.get("stage")) for s in sites for l in s["layers"])
    result = {
        "benchmark": "fusion_scale",
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "quick": args.quick,
        "dims_source": source,
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_1_5_15_start": [round(v, 2) for v in load_before],
                    "load_avg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
                    "scale_child_env": child_env(args)},
        "model": {"sites": len(sites), "layers": n_layers, "layers_by_kind": dict(kinds),
                  "gram_sum_entries": sum(s["dim"] ** 2 for s in sites)},
        "synthetic": {"rank": RANK, "rows_per_concept_site": list(ROWS), "shared_dirs": SHARED_DIRS,
                      "own_dirs": OWN_DIRS, "noise": NOISE, "gram_dtype": args.gram_dtype,
                      "eps": "gcv (λ per site)" if EPS is None else EPS,
                      "terms": "memory" if args.terms_in_memory else "spilled to a temporary folder (spill.SpilledTerms)",
                      "scale_run_grams": "expected X^T X over the noise (exact low-rank part + isotropic floor, full rank)",
                      "lbfgs_run_inputs": "explicit X_i (64-256 rows of low-rank-plus-noise), Grams built from them"},
        "targets": TARGETS,
        "scale": scale,
        "lbfgs": lbfgs,
        "summary": summarise(scale, lbfgs),
        "notes": [
            ("server_s = add_s (the whole intake, see Scope) + solve_s (every stage's solve) + report_s (fusion.json's "
             "report; per-concept residuals only up to 16 concepts); gen_s is synthetic-data generation and the wire "
             "encoding (the clients' work) and is excluded." if args.real else
             "server_s = add_s (validate the Gram, SG += G_i, A_i G_i, write the concept's terms to the spill folder) + "
             "solve_s (read the terms back, factor + solve every site, outputs cast to float32); "
             "gen_s is synthetic-data generation (the clients' work) and is excluded."),
            "Each N ran in a fresh subprocess; peak_rss_mib is that child's ru_maxrss (includes the interpreter and torch, start_rss_mib).",
            ("Scope (--real): mos-server's own intake. Per concept: decode_gram keeps each float32 factor packed as sent, "
             "Fusion.check_adapter/check_stats with bounds (LoRA reach, trace(G)/rows), save_stats writes the packed "
             "factors to the concept's state file, Fusion.add_stats reads each back, unpacks it and adds R^T R to the "
             "site's float64 sum by blocks (float32 products at the product's eps: summary.factor_products; "
             "solver.py 'Gram precision'), A_i G_i from the same blocks, and spills the terms. Every synthetic Gram is "
             "full rank (rank = d: the largest factor the wire allows)." if args.real else
             "Scope: intake here is SiteSums.add on dense float32 Grams. mos-server's intake (--real) differs: the "
             "Grams come as float32 triangular factors, are written to the state dir and read back, and R^T R is "
             "summed by blocks (d^3/6 multiply-adds per full-rank site)."),
            "Memory that could grow with N: the per-concept terms (B_i, A_i G_i, kept so a concept can be removed; spilled to "
            "files unless --terms-in-memory) and the fused outputs (rank 4N per layer until it reaches the dense size); "
            "the Gram sums are fixed.",
            "LBFGS whole-model times are EXTRAPOLATED: one layer per (kind, d_in) group was timed (the smallest d_out) and every "
            "layer of the group charged that time scaled by its d_out. Its row counts are this benchmark's synthetic 64-256 per concept; the reference records far more "
            "rows for spatial layers (20 timesteps x H*W tokens), so the real LBFGS cost is higher and the ratio here is conservative.",
            "Per-layer closed_s in the LBFGS comparison includes building the Grams from the raw activations (clients' work); "
            "closed_server_s is the server's add + solve alone.",
            "Allocator: scale children run with MALLOC_MMAP_THRESHOLD_=131072 (machine.scale_child_env; off with "
            "--glibc-malloc-default). With glibc's dynamic threshold, d x d temporaries share the heap with long-lived "
            "small tensors: an earlier SiteSums.add that copied each Gram to float64 made RSS grow ~300 MiB per concept at "
            "SD1.5 sizes (N<=6); add now works blockwise, but the solve's d x d factors and the callers' own temporaries "
            "still cost ~250-330 MiB of fragmentation at N=2..10 without the setting (this session). Recommended for mos-server.",
            "Scale-run Grams are the expectation of X^T X over the noise (full rank), so they cost 24 d^2 to make; the solver "
            "cost does not depend on how a Gram was made. Residuals reflect the synthetic overlap: every concept shares 16 "
            "strong input directions and brings an unrelated random LoRA, a deliberately hard conflict; not a quality figure.",
            "Machine shared with other jobs: see machine.load_avg_*; with 2 cores oversubscribed, 2 torch threads can run several "
            "times slower than 1, which hits every timing here alike.",
            "LBFGS budgets follow the reference: 50 iterations for spatial layers, 500 for text-encoder layers and (as the reference "
            "does) for the cross-attention k/v layers, which read text features.",
        ],
    }
    if args.real:
        result["notes"].append(
            "RSS (--real): peak_rss_mib is ru_maxrss, which counts file-backed pages too (state files are read "
            "through mmap while a Gram is unpacked); rss_samples splits /proc/self/status RssAnon (the process's own "
            "memory) from RssFile, sampled after every concept and after the solve (samples, not peaks).")
    if args.threads != THREADS:
        result["notes"].append(
            f"Run with --threads {args.threads}, not the default {THREADS}: on this shared machine (load averages in "
            "machine.*) two torch threads on two oversubscribed cores ran 4-15x slower than one, measured in this session.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print_table(scale)
    print()
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
