"""The fusion of one round: concepts in, one fused adapter out, stage by stage.

`run_fusion` is the one driver of the three stages. Whoever answers the stages — the local loop of `mos fuse`
or the Flower clients of `mos-server` — implements `StageRunner`; the server side (this file and solver.py)
never needs the base weights, only the input-site manifest (names and dimensions).
"""

from __future__ import annotations

import time
from typing import Protocol

from mos.shared.formats.adapter import Adapter, concept_meta
from mos.shared.fusion import solver
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.gram import check_gram
from mos.shared.fusion.stats import Stats
from mos.shared.sd.base import check_same_base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.lora import Lora
from mos.shared.sd.sites import Site


class FusionError(ValueError):
    pass


class StageRunner(Protocol):
    """Who computes each concept's statistics: a local loop or remote clients. Missing names = dropped."""

    def stage1(self, config: FusionConfig) -> dict[str, tuple[Adapter, Stats]]: ...
    def stage2(self, fused_te: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]: ...
    def stage3(self, fused: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]: ...
    def deliver(self, fused: Adapter) -> None: ...


class Fusion:
    """Running sums per input site over the concepts added so far; solve per stage."""

    def __init__(self, fingerprint: str, sites: list[Site], config: FusionConfig = FusionConfig()):
        self.config = config
        self.fingerprint = fingerprint
        self.sites = {s.name: s for s in sites}
        self.site_of = {layer: s for s in sites for layer in s.layers}
        self.adapters: dict[str, Adapter] = {}
        self.stats: dict[str, Stats] = {}
        self.sums: dict[str, solver.SiteSums] = {}
        self.solved: dict[int, dict[str, solver.SiteSolution]] = {}
        self.dropped: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # --- concepts -------------------------------------------------------------------------------------------

    @property
    def concepts(self) -> list[Concept]:
        return [c for a in self.adapters.values() for c in a.concepts]

    def add(self, adapter: Adapter) -> None:
        """Register one party's adapter (its concept and LoRA) after checking it against the manifest."""
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
        self.adapters[name] = adapter
        self.stats[name] = {}

    def check_base(self, adapter: Adapter) -> None:
        name = adapter.concepts[0].name if adapter.concepts else "?"
        check_same_base(f"concept {name!r}", adapter.fingerprint, self.fingerprint, FusionError)

    def remove(self, name: str, reason: str = "removed") -> None:
        """Take a concept out of every sum it entered; the next solve is as if it never came."""
        for site, gram in self.stats.pop(name, {}).items():
            if site in self.sums and name in self.sums[site].concepts:
                self.sums[site].remove(name, gram.gram, gram.rows)
        self.adapters.pop(name, None)
        self.dropped[name] = reason

    def add_stats(self, name: str, stats: Stats) -> None:
        """Validate all of a concept's statistics first, then add them: a bad upload changes nothing."""
        if name not in self.adapters:
            raise FusionError(f"statistics for unknown concept {name!r}")
        lora = self.adapters[name].lora
        for site_name, g in stats.items():
            site = self.sites.get(site_name)
            if site is None:
                raise FusionError(f"concept {name!r}: statistics for unknown site {site_name}")
            if site_name in self.stats[name]:
                raise FusionError(f"concept {name!r}: statistics for {site_name} sent twice")
            if g.rows <= 0:
                raise FusionError(f"concept {name!r}, site {site_name}: zero rows")
            check_gram(g.gram, f"concept {name!r}, site {site_name}", site.dim)
        for site_name, g in stats.items():
            loras = {l: lora[l] for l in self.sites[site_name].layers if l in lora}
            self.sums.setdefault(site_name, solver.SiteSums(site_name, self.sites[site_name].dim)).add(
                name, g.gram, g.rows, loras)
            self.stats[name][site_name] = g

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
            self.solved[stage] = {s.name: self.sums[s.name].solve(self.config.eps) for s in sites if s.name in self.sums}
            out = {l: (B.float(), A.float()) for sol in self.solved[stage].values() for l, (B, A) in sol.loras.items()}
        self.timings[f"stage{stage}_solve_s"] = time.perf_counter() - t0
        return out

    def _weight(self, sites: list[Site]) -> Lora:
        out = {}
        for layer in (l for s in sites for l in s.layers):
            parts = [a.lora[layer] for a in self.adapters.values() if layer in a.lora]
            if parts:
                B, A = solver.weight_fusion(parts, "average")
                out[layer] = (B.float(), A.float())
        return out

    def result(self, lora: Lora) -> Adapter:
        return Adapter(self.fingerprint, self.concepts, lora, {"fusion": self.report()})

    def report(self) -> dict:
        residuals: dict[str, dict[str, float]] = {}
        for stage in self.solved.values():
            for site, sol in stage.items():
                for name, stats in self.stats.items():
                    if site in stats:
                        r = solver.site_residual(sol, self.adapters[name].lora, stats[site].gram)
                        residuals.setdefault(name, {})[site] = r
        return {
            "method": self.config.method, "mode": "one-shot" if self.config.one_shot else "staged",
            "eps": self.config.eps, "config": self.config.as_dict(), "fingerprint": self.fingerprint,
            "concepts": [concept_meta(c) for c in self.concepts],
            "dropped": self.dropped, "timings": self.timings,
            "lambda": {site: sol.lam for st in self.solved.values() for site, sol in st.items()},
            "solve_path": {site: sol.path for st in self.solved.values() for site, sol in st.items()},
            "residuals": residuals,
        }


def _drop_missing(fusion: Fusion, replied: dict, stage: str) -> None:
    for name in [n for n in fusion.adapters if n not in replied]:
        fusion.remove(name, f"no reply in {stage}")


def run_fusion(runner: StageRunner, fusion: Fusion) -> Adapter:
    """Drive the stages: tune/collect -> fuse text encoder -> k/v -> spatial -> deliver (docs/design.md,
    "The federated shape")."""
    t0 = time.perf_counter()
    cfg = fusion.config
    staged = not cfg.one_shot and cfg.method == "gradient"
    for name, (adapter, stats) in runner.stage1(cfg).items():
        fusion.add(adapter)
        fusion.add_stats(name, stats)
    if not fusion.adapters:
        raise FusionError("no concept to fuse: every party dropped out")
    fused = fusion.solve(1)
    if staged:
        replies = runner.stage2(fused, fusion.concepts, cfg)
        _drop_missing(fusion, replies, "stage 2")
        for name, stats in replies.items():
            fusion.add_stats(name, stats)
        fused = fusion.solve(1)  # a concept dropped since stage 1 leaves the text encoder too
    fused |= fusion.solve(2)
    if staged:
        replies = runner.stage3(fused, fusion.concepts, cfg)
        _drop_missing(fusion, replies, "stage 3")
        for name, stats in replies.items():
            fusion.add_stats(name, stats)
        fused = fusion.solve(1) | fusion.solve(2)
    fused |= fusion.solve(3)
    fusion.timings["total_s"] = time.perf_counter() - t0
    result = fusion.result(fused)
    runner.deliver(result)
    return result
