"""The client's worker: answers each Flower message with the stage functions `mos fuse` uses.

It lives in the `mos-client` process (ClientApp processes relay to it, see relay.py), keeps the base and the
concept's adapter loaded, and caches statistics on disk keyed by the stage, the adapter's digest, the base
fingerprint, the stage-3 sampling settings and the digest of what the server sent, so a restarted server is
answered without recomputing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from mos.shared.federation import wire
from mos.shared.files import atomic_path
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion import stages
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.stats import Stats
from mos.shared.fusion.stats_file import load_stats, save_stats
from mos.shared.runtime import limit_threads, say
from mos.shared.sd.base import Base, mos_home
from mos.shared.sd.model import ConceptModel

CACHE_VERSION = 3  # 2: the stage-3 sampling settings are part of the key; 3: and the prompts


@dataclass
class Outcome:
    kind: str      # "result" | "rejected" | "dropped" | "finished"
    reason: str = ""
    round: int = 0



class Worker:
    def __init__(self, base: Base, adapter: Adapter, out: Path, data_digest: str = "",
                 cache_dir: Path | None = None):
        self.base = base  # pristine: each stage works on a copy (LoRA and processors mutate a base)
        limit_threads(base)
        self.manifest = wire.BaseManifest.from_base(base, "wide")  # every layer a fused LoRA may hold
        self.adapter = adapter
        self.name = adapter.concepts[0].name
        self.digest = wire.adapter_digest(adapter)
        self.data_digest = data_digest
        self.out = out
        self.cache_dir = cache_dir or mos_home() / "cache" / "stats"
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self.run_id: int | None = None  # the run this client joined; messages of any other run get nothing

    # --- dispatch -------------------------------------------------------------------------------------------

    def handle(self, kind: str, rd: RecordDict, meta: dict) -> RecordDict:
        self.check_run(kind, meta)
        t0 = time.time()
        say(f"{kind:<13} received {wire.record_bytes(rd) / 1e6:.2f} MB")
        handler = {"train.tune": self.on_tune, "query.kv": self.on_kv, "query.spatial": self.on_spatial,
                   "train.result": self.on_result, "query.notice": self.on_notice}.get(kind)
        if handler is None:
            raise ValueError(f"unknown message type {kind!r}")
        reply = handler(rd)
        say(f"{kind:<13} replied {wire.record_bytes(reply) / 1e6:.2f} MB in {time.time() - t0:.1f} s")
        return reply

    def check_run(self, kind: str, meta: dict) -> None:
        """Answer one run only: the first that opens with train.tune (or tells this client it is out). A SuperLink
        can hold other runs, and their ClientApps would otherwise fetch this concept's adapter and statistics."""
        run = meta.get("run_id")
        if not isinstance(run, int):
            raise PermissionError(f"{kind}: no run id with the message; nothing is answered")
        if self.run_id is None and kind in ("train.tune", "query.notice"):
            self.run_id = run
            say(f"serving run {run}")
        if run != self.run_id:
            ours = f"run {self.run_id}" if self.run_id is not None else "a run that opens with train.tune"
            raise PermissionError(f"{kind} of run {run}: this client serves {ours} only")

    def new_session(self) -> None:
        """A new SuperNode is starting (the server restarted: its run has a new id): the next run is ours."""
        self.run_id = None

    def finish(self, outcome: Outcome) -> None:
        if self.outcome is None or self.outcome.kind != "result":
            self.outcome = outcome
        self.done.set()

    # --- stages ---------------------------------------------------------------------------------------------

    def on_tune(self, rd: RecordDict) -> RecordDict:
        req = wire.decode_tune(rd)
        reply = RecordDict()
        if req.base_fingerprint != self.base.fingerprint:
            say(f"train.tune    the server's base is {req.base_fingerprint}, ours is {self.base.fingerprint}: "
                "sending the manifest only (the server will refuse it)")
            return wire.encode_concept(reply, self.adapter, self.data_digest, cached=True)
        if wire.held_token(self.name, self.digest) in req.known:
            say(f"train.tune    the server already holds <{self.name}> (digest {self.digest[:12]}): nothing to send")
            return wire.encode_concept(reply, self.adapter, self.data_digest, cached=True)
        cfg = wire.config_of(req)
        stats, hit = self.cached(1, "", cfg, lambda: stages.stage1(
            ConceptModel.from_adapter(copy.deepcopy(self.base), self.adapter), self.name, cfg))
        wire.encode_concept(reply, self.adapter, self.data_digest)
        return wire.encode_stats(reply, 1, self.name, self.base.fingerprint, stats, hit, cfg.gram_dtype)

    def on_kv(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        cfg = wire.config_of(fused.manifest)
        stats, hit = self.cached(2, fused.manifest.digest, cfg, lambda: stages.stage2(
            copy.deepcopy(self.base), fused.lora, fused.concepts, self.name))
        return wire.encode_stats(RecordDict(), 2, self.name, self.base.fingerprint, stats, hit, cfg.gram_dtype)

    def on_spatial(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        cfg = wire.config_of(fused.manifest)
        stats, hit = self.cached(3, fused.manifest.digest, cfg, lambda: stages.stage3(
            copy.deepcopy(self.base), fused.lora, self.adapter, fused.concepts, self.name, cfg))
        return wire.encode_stats(RecordDict(), 3, self.name, self.base.fingerprint, stats, hit, cfg.gram_dtype)

    def on_result(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        if fused.adapter_file is None:
            raise wire.WireError("server: train.result carries no adapter file")
        path = self.out / adapter_io.FILENAME
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, 0o644) as tmp:  # a file that is not a valid adapter for this base is never installed
            tmp.write_bytes(fused.adapter_file)
            result = adapter_io.load(tmp)
            if result.fingerprint != self.base.fingerprint or self.name not in [c.name for c in result.concepts]:
                raise wire.WireError(f"server: the fused adapter is for base {result.fingerprint} and holds "
                                     f"{[c.name for c in result.concepts]}; expected base {self.base.fingerprint} "
                                     f"with <{self.name}>")
        say(f"train.result  fused adapter with {', '.join(c.handle for c in result.concepts)} -> {path}")
        self.finish(Outcome("result", round=fused.manifest.round))
        return RecordDict({"ack": ConfigRecord({"written": str(path)})})

    def on_notice(self, rd: RecordDict) -> RecordDict:
        n = wire.decode_notice(rd)
        say(f"query.notice  {n.kind}: {n.reason}")
        self.finish(Outcome(n.kind, n.reason, n.round))
        return RecordDict({"ack": ConfigRecord({"kind": n.kind})})

    # --- cache ----------------------------------------------------------------------------------------------

    def cached(self, stage: int, request: str, cfg: FusionConfig, compute) -> tuple[Stats, bool]:
        # what decides the statistics: the Gram dtype only changes how they travel
        what = {"one_shot": cfg.one_shot, "steps": cfg.sample_steps, "seed": cfg.sample_seed, "guidance": cfg.guidance,
                "placement": cfg.placement, "heldout": cfg.uses_heldout,
                "prompts": stages.prompts_for(self.name, self.base.spec),
                "sampled": stages.stage3_prompts(self.name, self.base.spec)}  # cached with other prompts: not these
        key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "stage": stage, "adapter": self.digest,
                                         "base": self.base.fingerprint, "request": request, **what},
                                        sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"{key[:32]}.safetensors"
        stats = load_stats(path)
        if stats is not None:
            say(f"stage {stage}       cache hit: statistics of <{self.name}> from {path.name} (not recomputed)")
            return stats, True
        t0 = time.time()
        stats = compute()
        save_stats(stats, path)
        say(f"stage {stage}       computed statistics of <{self.name}> for {len(stats)} sites in "
            f"{time.time() - t0:.1f} s")
        return stats, False
