"""The fusion of one round: concepts in, one fused adapter out, stage by stage.

`run_fusion` is the one driver of the three stages. Whoever answers the stages — the local loop of `mos fuse`
or the Flower clients of `mos-server` — implements `StageRunner`; the server side (this file and solver.py)
never needs the base weights, only the input-site manifest (names and dimensions).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from mos.shared.formats.adapter import Adapter, concept_meta
from mos.shared.fusion import solver
from mos.shared.fusion.bounds import Bounds, BoundsError
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.gram import check_gram, check_psd, trapezoid_len
from mos.shared.fusion.spill import SpilledLoras, SpilledTerms
from mos.shared.fusion.stats import FactorGram, Gram, Stats, as_summed, gram_trace, heldout_key, site_of_key
from mos.shared.fusion.stats_file import StoredGram, held, load_stats, save_stats
from mos.shared.fusion.workers import default_workers, in_parallel
from mos.shared.sd.base import check_same_base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.lora import Lora
from mos.shared.sd.sites import Site


class FusionError(ValueError):
    pass


def _bounded(check, *args, **kwargs) -> None:
    try:
        check(*args, **kwargs)
    except BoundsError as e:
        raise FusionError(str(e)) from None


class StageRunner(Protocol):
    """Who computes each concept's statistics: a local loop or remote clients. Missing names = dropped."""

    def stage1(self, config: FusionConfig) -> dict[str, tuple[Adapter, Stats]]: ...
    def stage2(self, fused_te: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]: ...
    def stage3(self, fused: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]: ...
    def deliver(self, fused: Adapter) -> None: ...


# Per-concept residuals in fusion.json cost O(N) each (the fused rank grows with N), so O(N²) in all: above this
# many concepts they are left out (fusion.json says so in residuals_skipped). Estimated, not yet measured: at SD1.5
# sizes with full-rank Grams, ~4N·Σ_sites(layers·d²) multiply-adds per concept, i.e. ~50 G per concept at N = 100,
# more than the intake; at N = 3 the report took 2.4 s wall (bench/fusion_scale.py --real --ns 3).
RESIDUALS_UPTO = 16
RIDGE_RAISES = 4          # a site over its bounds is solved again at ε ×10, up to this many times (ε ×10⁴)
RIDGE_RAISE_FROM = 1e-3   # the smallest ε a raise starts from (a configured ε = 0, or a GCV choice near the floor)

# Factored Grams are summed with float32 RᵀR products at a fixed ε of at least this (solver.py, "Gram precision":
# the fused ΔW moves by ~2e-6 relative at ε = 1e-2, ~6e-5 at 1e-4 on the scale benchmark's Grams).
FLOAT32_PRODUCTS_MIN_EPS = 1e-3


class Fusion:
    """Running sums per input site over the concepts added so far; solve per stage.

    Memory does not grow with the concepts: each concept's Grams stay in files (the server's own statistics files,
    or files this fusion writes under `spill`) and come back only to take a concept out or for the report; the
    per-concept terms of each site (spill.SpilledTerms) and each concept's LoRA (spill.SpilledLoras) are spilled;
    what memory keeps that grows with N is the fused result itself and each concept's names and embeddings.
    `spill` belongs to the fusion and is
    emptied when it starts; without one a temporary folder is used and removed with the fusion (`close`).
    """

    def __init__(self, fingerprint: str, sites: list[Site], config: FusionConfig = FusionConfig(),
                 bounds: Bounds | None = None, spill: str | Path | None = None, workers: int | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="mos-fusion-") if spill is None else None
        self.spill = Path(self._tmp.name if self._tmp else spill)
        if self._tmp is None:
            shutil.rmtree(self.spill, ignore_errors=True)  # a previous (killed) run's files: nothing refers to them
        self.spill.mkdir(parents=True, exist_ok=True)
        self._files = 0
        self.config = config
        self.bounds = bounds  # None: no limits from the base (the caller trusts every concept)
        self.fingerprint = fingerprint
        self.sites = {s.name: s for s in sites}
        self.site_of = {layer: s for s in sites for layer in s.layers}
        # Each concept's adapter without its LoRA (names, embeddings, metadata); the LoRA itself is in a file of the
        # spill folder, read when it is needed (memory does not grow with the concepts).
        self.adapters: dict[str, Adapter] = {}
        self._loras = SpilledLoras(self.spill / "loras")
        self.stats: dict[str, dict[str, StoredGram]] = {}  # concept -> site -> where its Gram is
        self.sums: dict[str, solver.SiteSums] = {}
        self.solved: dict[int, dict[str, solver.SiteSolution]] = {}
        self.dropped: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._workers = workers  # None: workers.default_workers(), asked each time (torch's threads may change)

    @property
    def workers(self) -> int:
        """Threads that check, take in and solve sites side by side."""
        return default_workers() if self._workers is None else self._workers

    # --- concepts -------------------------------------------------------------------------------------------

    @property
    def concepts(self) -> list[Concept]:
        return [c for a in self.adapters.values() for c in a.concepts]

    def add(self, adapter: Adapter) -> None:
        """Register one party's adapter (its concept and LoRA) after checking it against the manifest."""
        self.check_adapter(adapter)
        name = adapter.concepts[0].name
        self._loras.put(name, adapter.lora)
        self.adapters[name] = replace(adapter, lora={})
        self.stats[name] = {}

    def check_adapter(self, adapter: Adapter) -> None:
        """Everything `add` requires, changing nothing (the server checks a client's upload before it counts)."""
        if len(adapter.concepts) != 1:
            raise FusionError(f"an adapter to fuse must hold one concept, this one holds {len(adapter.concepts)}")
        name = adapter.concepts[0].name
        self.check_base(adapter)
        if name in self.adapters:
            raise FusionError(f"two concepts are named {name!r}; rename one (concept.toml `name`)")
        for layer, (B, A) in adapter.lora.items():
            site = self.site_of.get(layer)
            if site is None:
                raise FusionError(f"concept {name!r}: LoRA on {layer}, which is not a LoRA target of this base")
            out_dim = site.out_dims[site.layers.index(layer)]
            if A.shape[1] != site.dim or B.shape[0] != out_dim:
                raise FusionError(f"concept {name!r}, layer {layer}: LoRA {tuple(B.shape)}x{tuple(A.shape)} does not "
                                  f"fit {out_dim}x{site.dim}")
            if self.bounds is not None:
                _bounded(self.bounds.check_delta, f"concept {name!r}", layer, B, A)

    def check_base(self, adapter: Adapter) -> None:
        name = adapter.concepts[0].name if adapter.concepts else "?"
        check_same_base(f"concept {name!r}", adapter.fingerprint, self.fingerprint, FusionError)

    def remove(self, name: str, reason: str = "removed") -> None:
        """Take a concept out of every sum it entered; the next solve is as if it never came."""
        for site, ref in self.stats.pop(name, {}).items():
            if site in self.sums and name in self.sums[site].concepts:
                self._take_out(name, site, ref)
        self.adapters.pop(name, None)
        self._loras.drop(name)
        self.dropped[name] = reason

    def _take_out(self, name: str, site: str, ref: StoredGram) -> None:
        g = ref.load()  # read back once, to subtract exactly what was added
        G, factor = as_summed(g)
        self.sums[site].remove(name, G, g.rows, factor=factor)

    def _site(self, key: str) -> Site:
        """The input site of a statistics key (a site's name, or its held-out share's: stats.heldout_key)."""
        return self.sites[site_of_key(key)[0]]

    def _sums(self, key: str) -> solver.SiteSums:
        """The running sums of a site, or of its held-out rows (key: stats.heldout_key)."""
        if key not in self.sums:
            site = self._site(key)
            store = SpilledTerms(self.spill / "terms" / f"{len(self.sums):04d}")  # site names are not file names
            chosen = site.stage == 3 and self.config.uses_heldout  # λ from the held-out rows: it may be small
            products = self._factor_products(None if chosen else self.config.eps_at(site.stage))
            self.sums[key] = solver.SiteSums(key, site.dim, store, products)
        return self.sums[key]

    @staticmethod
    def _factor_products(eps: float | None) -> torch.dtype:
        """float32 RᵀR products (half the intake's time) only with a fixed ridge large enough that their rounding
        stays far below fp16 weights' resolution (solver.py, "Gram precision"); float64 for a λ chosen from the data
        (GCV, held-out rows: eps=None) or a small ε."""
        return torch.float32 if eps is not None and eps >= FLOAT32_PRODUCTS_MIN_EPS else torch.float64

    def _kept(self, stats: Stats | dict[str, StoredGram]) -> dict[str, StoredGram]:
        """Where each of these Grams stays while the concept is in the sums: its own file when it has one (the
        server's state), else a file of the fusion's spill folder, written once."""
        if all(isinstance(g, StoredGram) for g in stats.values()):
            return dict(stats)
        path = self.spill / "grams" / f"{self._files:06d}.safetensors"
        self._files += 1
        save_stats(stats, path)
        return load_stats(path, lazy=True)

    def add_stats(self, name: str, stats: Stats | dict[str, StoredGram]) -> None:
        """Validate all of a concept's statistics first, then add them: a bad upload changes nothing. Values may
        be references to files (stats_file.StoredGram): each is read when it is added, one site at a time."""
        if name not in self.adapters:
            raise FusionError(f"statistics for unknown concept {name!r}")
        self.check_stats(name, stats)
        kept = self._kept(stats)
        lora = self._loras.load(name)
        for site_name in stats:
            self._sums(site_name)  # created here, not by the workers

        def add_site(site_name: str) -> None:
            g = held(stats[site_name])
            loras = {l: lora[l] for l in self._site(site_name).layers if l in lora}
            G, factor = as_summed(g)  # a dense Gram was checked once, in check_stats (or before its file was marked)
            self.sums[site_name].add(name, G, g.rows, loras, factor=factor, checked=True)

        try:  # largest sites first: the workers finish together
            in_parallel(add_site, sorted(stats, key=lambda s: -self._site(s).dim), self.workers)
        finally:  # where a site failed, the others are in their sums: record them, as one at a time did
            for site_name in stats:
                if name in self.sums[site_name].concepts:
                    self.stats[name][site_name] = kept[site_name]

    def check_stats(self, name: str, stats: Stats | dict[str, StoredGram]) -> None:
        """Everything `add_stats` requires, changing nothing, once per Gram: the Gram check and XᵀX's
        semidefiniteness for a dense Gram, and the base's bound on trace(G)/rows. A factored Gram (the wire's
        default) skips the first two: RᵀR is symmetric and positive semidefinite by construction, and the wire
        checked R finite. A file reference marked checked was checked before it was written."""
        added = self.stats.get(name, {})
        # the sites side by side (the dense checks and the traces release the GIL); the first bad site in order is
        # the error raised, as one at a time
        in_parallel(lambda site_name: self._check_site(name, site_name, stats[site_name], added), list(stats),
                    self.workers)

    def _check_site(self, name: str, site_name: str, g: Gram | FactorGram | StoredGram, added: dict) -> None:
        bare, held_out = site_of_key(site_name)
        site = self.sites.get(bare)
        what = f"concept {name!r}, site {site_name}"
        if site is None:
            raise FusionError(f"concept {name!r}: statistics for unknown site {site_name}")
        if held_out and (site.stage != 3 or not self.config.uses_heldout):
            raise FusionError(f"concept {name!r}: held-out statistics for {bare}, where none are asked for")
        if site_name in added:
            raise FusionError(f"concept {name!r}: statistics for {site_name} sent twice")
        if g.rows <= 0:
            raise FusionError(f"{what}: zero rows")
        if isinstance(g, StoredGram) and g.checked:
            return
        g = held(g)
        if isinstance(g, FactorGram):
            fits = g.dim == site.dim and 0 <= g.rank <= site.dim
            if not fits or g.packed.shape != (trapezoid_len(g.rank, g.dim),):
                raise FusionError(f"{what}: factor of rank {g.rank}, dimension {g.dim} ({g.packed.numel()} "
                                  f"values) does not fit {site.dim}")
        else:
            try:
                check_gram(g.gram, what, site.dim)
                check_psd(g.gram, f"Gram for {what}")
            except ValueError as e:
                raise FusionError(str(e)) from None
        if self.bounds is not None:
            _bounded(self.bounds.check_power, f"concept {name!r}", bare, gram_trace(g), g.rows)

    def forget_stage(self, stage: int) -> None:
        """Take every concept's statistics of one stage's sites out of the sums (they were computed with fused
        layers that held a concept since dropped: they are recomputed without it)."""
        for name, stats in self.stats.items():
            for site_name in [s for s in stats if self._site(s).stage == stage]:
                self._take_out(name, site_name, stats.pop(site_name))

    def close(self) -> None:
        """Remove the temporary spill folder (a folder given by the caller stays: the caller owns it)."""
        if self._tmp is not None:
            self._tmp.cleanup()

    def check_result(self, lora: Lora) -> None:
        """Before anything is sent: every fused layer finite and, with bounds, within what the concepts in it
        could reach together."""
        for layer, (B, A) in lora.items():
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                raise FusionError(f"fused layer {layer}: NaN or Inf in the result; nothing is sent")
        if self.bounds is not None:
            _bounded(self._check_reach, lora)

    def _check_reach(self, lora: Lora) -> None:
        """BoundsError unless every fused layer is within n× the per-concept bound for n concepts."""
        n = max(1, len(self.adapters))
        for layer, (B, A) in lora.items():
            self.bounds.check_delta("the fused result", layer, B, A, factor=n)

    # --- solving --------------------------------------------------------------------------------------------

    def solve(self, stage: int) -> Lora:
        """Fused LoRA (float32) of every layer of this stage's sites."""
        t0 = time.perf_counter()
        sites = [s for s in self.sites.values() if s.stage == stage]
        if self.config.method == "weight":
            out = self._weight(sites)
        else:
            missing = [(n, s.name) for n in self.adapters for s in sites if s.name not in self.stats[n]]
            if missing:
                raise FusionError(f"concept {missing[0][0]!r} sent no statistics for {missing[0][1]} "
                                  f"({len(missing)} site(s) missing)")
            names = [s.name for s in sorted(sites, key=lambda s: -s.dim) if s.name in self.sums]
            solved = dict(zip(names, in_parallel(self._solve_site, names, self.workers)))
            self.solved[stage] = {s.name: solved[s.name] for s in sites if s.name in self.sums}
            out = {l: BA for sol in self.solved[stage].values() for l, BA in sol.loras.items()}
        self.timings[f"stage{stage}_solve_s"] = time.perf_counter() - t0
        self.check_result(out)
        return out

    def _solve_site(self, name: str) -> solver.SiteSolution:
        """The site's ridge solution; with bounds, at the smallest ε (the configured one, then ×10 each try) whose
        layers stay within them. Ridge regression is least squares under a norm bound, so a larger ε is that bound
        kept: honest concepts whose rows differ little can make a small-ε solve reach far past every concept's
        own change (the world base's mid-block attention, docs/world.md), which would otherwise fail the round."""
        sol = _float32(self.sums[name].solve(self.config.eps_at(self.sites[name].stage), self._heldout(name)))
        for _ in range(RIDGE_RAISES):
            if self.bounds is None or self._within_bounds(sol.loras):
                break
            sol = _float32(self.sums[name].solve(max(RIDGE_RAISE_FROM, sol.eps) * 10))  # max ignores a NaN ε
        return sol

    def _heldout(self, name: str) -> solver.SiteSums | None:
        """The site's held-out sums when λ is chosen on them: asked for, and sent by every concept in the fit
        (a client that sent none, e.g. an older one, leaves the site at the fixed ε)."""
        held = self.sums.get(heldout_key(name))
        if not self.config.uses_heldout or held is None or sorted(held.concepts) != sorted(self.sums[name].concepts):
            return None
        return held

    def _within_bounds(self, lora: Lora) -> bool:
        try:
            self._check_reach(lora)
        except BoundsError:
            return False
        return True

    def _weight(self, sites: list[Site]) -> Lora:
        out = {}
        loras = [self._loras.load(name) for name in self.adapters]
        for layer in (l for s in sites for l in s.layers):
            parts = [lora[layer] for lora in loras if layer in lora]
            if parts:
                B, A = solver.weight_fusion(parts, "average")
                out[layer] = (B.float(), A.float())
        return out

    def result(self, lora: Lora) -> Adapter:
        return Adapter(self.fingerprint, self.concepts, lora, {"fusion": self.report()})

    def residuals(self) -> dict[str, dict[str, float]]:
        """Each concept's relative error per solved site, each Gram read back once (as a factor where it came as
        one); {} above RESIDUALS_UPTO concepts (module constant: the cost is O(N) per concept)."""
        if len(self.stats) > RESIDUALS_UPTO:
            return {}
        solved = {site: sol for stage in self.solved.values() for site, sol in stage.items()}
        residuals: dict[str, dict[str, float]] = {}
        for name, stats in self.stats.items():
            lora = self._loras.load(name) if name in self.adapters else {}
            for site, ref in stats.items():
                if site in solved:
                    G, factor = as_summed(ref.load())
                    r = solver.site_residual(solved[site], lora, G, factor)
                    residuals.setdefault(name, {})[site] = r
        return residuals

    def _lambda_rule(self) -> str:
        rule = "gcv" if self.config.eps is None else "fixed eps"
        chosen = any(self._heldout(site) is not None for sols in self.solved.values() for site in sols)
        return f"held out (spatial sites), {rule} elsewhere" if chosen else rule

    def report(self) -> dict:
        residuals = self.residuals()
        return {
            "method": self.config.method, "mode": "one-shot" if self.config.one_shot else "staged",
            "eps": self.config.eps, "lambda_rule": self._lambda_rule(),
            "config": self.config.as_dict(), "fingerprint": self.fingerprint,
            "concepts": [concept_meta(c) for c in self.concepts],
            "dropped": self.dropped, "timings": self.timings,
            "lambda": {site: sol.lam for st in self.solved.values() for site, sol in st.items()},
            "eps_per_site": {site: sol.eps for st in self.solved.values() for site, sol in st.items()},
            "solve_path": {site: sol.path for st in self.solved.values() for site, sol in st.items()},
            "residuals": residuals,
            "residuals_skipped": (f"{len(self.stats)} concepts > {RESIDUALS_UPTO}: per-concept residuals cost "
                                  "O(N) each" if len(self.stats) > RESIDUALS_UPTO else ""),
        }


def _float32(sol: solver.SiteSolution) -> solver.SiteSolution:
    """The solution as it is delivered (float32), kept for the report: one copy of the fused result, not a float64
    one beside it (the fused result grows with N: rank 4N per layer until dense, ~0.4 GiB float32 at N = 100)."""
    return replace(sol, loras={l: (B.float(), A.float()) for l, (B, A) in sol.loras.items()})


def _drop_missing(fusion: Fusion, replied: dict, stage: str) -> None:
    for name in [n for n in fusion.adapters if n not in replied]:
        fusion.remove(name, f"no reply in {stage}")


def _collect(fusion: Fusion, ask, stage: str) -> bool:
    """Ask every concept for one stage's statistics and add them — unless a concept left during the stage:
    then the replies are discarded (they were computed with fused layers that still held it) and False says
    so, for the caller to solve again without it and ask again."""
    asked = set(fusion.adapters)
    replies = ask()
    _drop_missing(fusion, replies, stage)
    if not fusion.adapters:
        raise FusionError(f"no concept to fuse: every party dropped out in {stage}")
    if set(fusion.adapters) != asked:
        return False
    for name, stats in replies.items():
        fusion.add_stats(name, stats)
    return True


def _staged(runner: StageRunner, fusion: Fusion, cfg: FusionConfig) -> Lora:
    """Stages 2 and 3, each re-run for the survivors when a concept drops: what a dropped concept shaped (the
    fused text encoder the others' k/v statistics were recorded with, the fused text encoder + k/v of their
    spatial statistics) is recomputed without it, so the result is the survivors' fusion alone."""
    while True:
        fused = fusion.solve(1)
        if not _collect(fusion, lambda: runner.stage2(fused, fusion.concepts, cfg), "stage 2"):
            continue
        fused |= fusion.solve(2)
        if _collect(fusion, lambda: runner.stage3(fused, fusion.concepts, cfg), "stage 3"):
            return fused | fusion.solve(3)
        fusion.forget_stage(2)


def run_fusion(runner: StageRunner, fusion: Fusion) -> Adapter:
    """Drive the stages: tune/collect -> fuse text encoder -> k/v -> spatial -> deliver (docs/design.md,
    "The federated shape")."""
    t0 = time.perf_counter()
    cfg = fusion.config
    for name, (adapter, stats) in runner.stage1(cfg).items():
        fusion.add(adapter)
        fusion.add_stats(name, stats)
    if not fusion.adapters:
        raise FusionError("no concept to fuse: every party dropped out")
    if not cfg.one_shot and cfg.method == "gradient":
        fused = _staged(runner, fusion, cfg)
    else:  # every statistic came with stage 1 (one-shot), or none is needed (weight fusion)
        fused = fusion.solve(1) | fusion.solve(2) | fusion.solve(3)
    fusion.timings["total_s"] = time.perf_counter() - t0
    result = fusion.result(fused)
    runner.deliver(result)
    return result
