"""What the server has received, on disk, so a killed server resumes where it stopped.

    STATE/state.json                      base fingerprint the state belongs to
    STATE/rounds/round-R/round.json       status (running | complete), concepts, dropped
    STATE/rounds/round-R/<concept>/       adapter.safetensors, stats-1.safetensors (…-2, …-3), concept.json
    STATE/registry/<concept>/             the same, for every concept of a completed round (reused later)
    STATE/owners.json                     concept name -> the node key that first uploaded it
    STATE/bounds-<placement>.json         the base's limits on one concept's reach (shared/fusion/driver.py)

Every file is written to a temporary name and renamed, so a kill leaves either the old or the new file (and a file
is never changed in place, so the registry hard-links the round's files instead of copying them).
Statistics are safetensors (shared/fusion/stats_file.py: a Gram that came as a triangular factor is kept as that
factor, a dense one as float64; row counts in the header); no pickle. The round's fusion keeps its own files
(per-site terms, Grams it had to write) under round-R/.fusion/, emptied when a server (re)starts the round.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mos.shared.files import read_json, write_json
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.bounds import Bounds
from mos.shared.fusion.stats import Stats
from mos.shared.fusion.stats_file import StoredGram, load_stats, save_stats

STAGES = (1, 2, 3)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one, else a copy. The registry holds the same files as the round
    (statistics are ~140 MiB per SD1.5 concept): state files are only ever replaced by a rename, never written in
    place, so the two names can share them."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class ServerState:
    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = read_json(self.root / "state.json")
        if meta and meta.get("fingerprint") != fingerprint:
            raise ValueError(f"state folder {self.root} belongs to base {meta.get('fingerprint')}, this server runs "
                             f"base {fingerprint}; use another --state-dir")
        if not meta:
            write_json(self.root / "state.json", {"fingerprint": fingerprint, "format": "mos-server-state/1"})
        self.fingerprint = fingerprint

    # --- rounds ---------------------------------------------------------------------------------------------

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"round-{r}"

    def rounds(self) -> list[int]:
        found = [int(p.name.split("-")[1]) for p in (self.root / "rounds").glob("round-*") if p.name[6:].isdigit()]
        return sorted(found)

    def round_info(self, r: int) -> dict:
        return read_json(self.round_dir(r) / "round.json") or {}

    def open_round(self) -> tuple[int, bool]:
        """(round, resumed): the round a previous server left running, else the next new one (a failed round
        stays failed: its clients start again in a new round)."""
        rounds = self.rounds()
        if rounds and self.round_info(rounds[-1]).get("status") not in ("complete", "failed"):
            return rounds[-1], True
        r = (rounds[-1] + 1) if rounds else 1
        write_json(self.round_dir(r) / "round.json", {"round": r, "status": "running"})
        return r, False

    def complete_round(self, r: int, concepts: list[str], report: dict) -> None:
        """Concepts of a finished round enter the registry (replacing older versions), then the round closes."""
        for name in concepts:
            src = self.round_dir(r) / name
            if not src.is_dir():
                continue  # a concept reused from the registry itself
            dst = self.root / "registry" / name
            tmp = dst.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, copy_function=_link_or_copy)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        write_json(self.round_dir(r) / "round.json", {"round": r, "status": "complete", "concepts": concepts,
                                                      "dropped": report.get("dropped", {})})

    def fail_round(self, r: int, reason: str, report: dict) -> None:
        write_json(self.round_dir(r) / "round.json", {"round": r, "status": "failed", "reason": reason,
                                                      "dropped": report.get("dropped", {})})

    # --- who owns a name ------------------------------------------------------------------------------------

    def owners(self) -> dict[str, str]:
        return read_json(self.root / "owners.json") or {}

    def claim(self, name: str, key: str) -> None:
        """The first node key to upload a name owns it, across rounds and runs on this state."""
        owners = self.owners()
        if name not in owners:
            write_json(self.root / "owners.json", {**owners, name: key})

    # --- the base's bounds ----------------------------------------------------------------------------------

    def bounds(self, base, placement: str) -> Bounds:
        """The base's limits, computed once per state folder (a short pass of the base) and kept."""
        path = self.root / f"bounds-{placement}.json"
        saved = read_json(path)
        if saved:
            return Bounds.from_json(saved)
        bounds = Bounds.from_base(base, placement)
        write_json(path, bounds.to_json())
        return bounds

    # --- concepts -------------------------------------------------------------------------------------------

    def save_concept(self, r: int, adapter: Adapter, digest: str, info: dict) -> None:
        d = self.round_dir(r) / adapter.concepts[0].name
        for stage in STAGES:  # a new upload invalidates whatever an earlier attempt left for this concept
            (d / f"stats-{stage}.safetensors").unlink(missing_ok=True)
        adapter_io.save(adapter, d / adapter_io.FILENAME)
        write_json(d / "concept.json", {**info, "digest": digest})

    def save_stats(self, r: int, name: str, stage: int, stats: Stats) -> Path:
        return save_stats(stats, self.round_dir(r) / name / f"stats-{stage}.safetensors")

    def known(self, r: int) -> dict[str, str]:
        """name -> adapter digest, for concepts of round r whose adapter and stage-1 statistics are on disk."""
        out = {}
        for d in sorted(self.round_dir(r).glob("*/")):
            info = read_json(d / "concept.json")
            if info and (d / adapter_io.FILENAME).is_file() and (d / "stats-1.safetensors").is_file():
                out[d.name] = info["digest"]
        return out

    def load(self, folder: Path) -> tuple[Adapter, dict[int, dict[str, StoredGram]]]:
        """The adapter, and each stage's statistics as references (read site by site when the fusion adds them:
        memory does not grow with the concepts held)."""
        adapter = adapter_io.load(folder / adapter_io.FILENAME)
        stats = {s: st for s in STAGES if (st := load_stats(folder / f"stats-{s}.safetensors", lazy=True)) is not None}
        return adapter, stats

    def load_round_concept(self, r: int, name: str) -> tuple[Adapter, dict[int, Stats]]:
        return self.load(self.round_dir(r) / name)

    def registry(self) -> dict[str, str]:
        """name -> digest of every concept fused in a completed round."""
        out = {}
        for d in sorted((self.root / "registry").glob("*/")):
            info = read_json(d / "concept.json")
            if info and (d / "stats-1.safetensors").is_file():
                out[d.name] = info["digest"]
        return out

    def load_registry(self, name: str) -> tuple[Adapter, dict[int, Stats]]:
        return self.load(self.root / "registry" / name)
