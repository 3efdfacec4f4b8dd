"""The client's worker: answers each Flower message with the stage functions `mos fuse` uses.

It lives in the `mos-client` process (ClientApp processes relay to it, see relay.py), keeps the base and the
concept's adapter loaded, and caches statistics on disk keyed by the stage, the adapter's digest, the base
fingerprint and the digest of what the server sent, so a restarted server is answered without recomputing.

`MOS_TEST_FAULT` (tests only) misbehaves on purpose: `nan:STAGE` puts a NaN into one Gram of that stage's upload,
`shape:STAGE` sends one Gram with the wrong size (the server must reject the client and leave the others be),
`slow:STAGE` waits SLOW_S seconds before answering that stage (a client that can be killed mid-stage).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..shared import adapter as adapter_io
from ..shared import stages, wire
from ..shared.adapter import Adapter
from ..shared.base import Base, mos_home
from ..shared.model import ConceptModel
from ..shared.stats import Stats
from ..shared.stats_file import load_stats, save_stats
from ..shared.threads import limit_threads

FAULT_ENV = "MOS_TEST_FAULT"
CACHE_VERSION = 1
SAMPLE_STEPS = 20  # stage-3 sampling steps: the same default as `mos fuse`
SLOW_S = 30.0


@dataclass
class Outcome:
    kind: str      # "result" | "rejected" | "dropped" | "finished"
    reason: str = ""
    round: int = 0


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Worker:
    def __init__(self, base: Base, adapter: Adapter, out: Path, data_digest: str = "",
                 cache_dir: Path | None = None):
        self.base = base  # pristine: each stage works on a copy (LoRA and processors mutate a base)
        limit_threads(base)
        self.manifest = wire.BaseManifest.from_base(base)
        self.adapter = adapter
        self.name = adapter.concepts[0].name
        self.digest = wire.adapter_digest(adapter)
        self.data_digest = data_digest
        self.out = out
        self.cache_dir = cache_dir or mos_home() / "cache" / "stats"
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self.fault = os.environ.get(FAULT_ENV, "")

    # --- dispatch -------------------------------------------------------------------------------------------

    def handle(self, kind: str, rd: RecordDict, meta: dict) -> RecordDict:
        t0 = time.time()
        say(f"{kind:<13} received {wire.record_bytes(rd) / 1e6:.2f} MB")
        handler = {"train.tune": self.on_tune, "query.kv": self.on_kv, "query.spatial": self.on_spatial,
                   "train.result": self.on_result, "query.notice": self.on_notice}.get(kind)
        if handler is None:
            raise ValueError(f"unknown message type {kind!r}")
        stage = {"train.tune": 1, "query.kv": 2, "query.spatial": 3}.get(kind)
        if stage and self.fault == f"slow:{stage}":
            print(f"{FAULT_ENV}: waiting {SLOW_S:.0f} s before answering {kind}", file=sys.stderr, flush=True)
            time.sleep(SLOW_S)
        reply = handler(rd)
        say(f"{kind:<13} replied {wire.record_bytes(reply) / 1e6:.2f} MB in {time.time() - t0:.1f} s")
        return reply

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
        if f"{self.name}:{self.digest}" in req.known:
            say(f"train.tune    the server already holds <{self.name}> (digest {self.digest[:12]}): nothing to send")
            return wire.encode_concept(reply, self.adapter, self.data_digest, cached=True)
        stats, hit = self.cached(1, "", req.one_shot, lambda: stages.stage1(
            ConceptModel.from_adapter(copy.deepcopy(self.base), self.adapter), self.name, req.one_shot, SAMPLE_STEPS))
        wire.encode_concept(reply, self.adapter, self.data_digest)
        stats_rd = wire.encode_stats(reply, 1, self.name, self.base.fingerprint, stats, hit, wire.gram_dtype_of(req))
        return self.faulty(stats_rd, 1)

    def on_kv(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        stats, hit = self.cached(2, fused.manifest.digest, False, lambda: stages.stage2(
            copy.deepcopy(self.base), fused.lora, fused.concepts, self.name))
        return self.faulty(wire.encode_stats(RecordDict(), 2, self.name, self.base.fingerprint, stats, hit,
                                             wire.gram_dtype_of(fused.manifest)), 2)

    def on_spatial(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        stats, hit = self.cached(3, fused.manifest.digest, False, lambda: stages.stage3(
            copy.deepcopy(self.base), fused.lora, self.adapter, fused.concepts, self.name, SAMPLE_STEPS))
        return self.faulty(wire.encode_stats(RecordDict(), 3, self.name, self.base.fingerprint, stats, hit,
                                             wire.gram_dtype_of(fused.manifest)), 3)

    def on_result(self, rd: RecordDict) -> RecordDict:
        fused = wire.decode_fused(rd, self.manifest)
        if fused.adapter_file is None:
            raise wire.WireError("server: train.result carries no adapter file")
        path = self.out / adapter_io.FILENAME
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(fused.adapter_file)
        result = adapter_io.load(tmp)  # refuse to install a file that is not a valid adapter for this base
        if result.fingerprint != self.base.fingerprint or self.name not in [c.name for c in result.concepts]:
            tmp.unlink()
            raise wire.WireError(f"server: the fused adapter is for base {result.fingerprint} and holds "
                                 f"{[c.name for c in result.concepts]}; expected base {self.base.fingerprint} "
                                 f"with <{self.name}>")
        os.replace(tmp, path)
        say(f"train.result  fused adapter with {', '.join(c.handle for c in result.concepts)} -> {path}")
        self.finish(Outcome("result", round=fused.manifest.round))
        return RecordDict({"ack": ConfigRecord({"written": str(path)})})

    def on_notice(self, rd: RecordDict) -> RecordDict:
        n = wire.decode_notice(rd)
        say(f"query.notice  {n.kind}: {n.reason}")
        self.finish(Outcome(n.kind, n.reason, n.round))
        return RecordDict({"ack": ConfigRecord({"kind": n.kind})})

    # --- cache ----------------------------------------------------------------------------------------------

    def cached(self, stage: int, request: str, one_shot: bool, compute) -> tuple[Stats, bool]:
        key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "stage": stage, "adapter": self.digest,
                                         "base": self.base.fingerprint, "request": request, "one_shot": one_shot,
                                         "steps": SAMPLE_STEPS}, sort_keys=True).encode()).hexdigest()
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

    # --- test-only fault injection --------------------------------------------------------------------------

    def faulty(self, rd: RecordDict, stage: int) -> RecordDict:
        kind, _, at = self.fault.partition(":")
        if not kind or at != str(stage) or kind == "slow":
            return rd
        if kind not in ("nan", "shape"):
            raise ValueError(f"{FAULT_ENV}={self.fault}: use nan:STAGE, shape:STAGE or slow:STAGE")
        tensors = safetensors_load(rd["stats.tensors"][wire.BLOB_KEY].data)
        key = sorted(k for k in tensors if k.startswith("gram/"))[0]
        t = tensors[key].clone()
        if kind == "nan":
            t.view(-1)[0] = float("nan")
        else:
            t = t.reshape(-1)[:-1]
        tensors[key] = t
        blob = safetensors_save(tensors)
        rd["stats.tensors"] = ArrayRecord({wire.BLOB_KEY: Array(dtype="uint8", shape=(len(blob),), stype=wire.STYPE,
                                                                data=blob)})
        print(f"{FAULT_ENV}: corrupted {key} ({kind}) in the stage-{stage} upload", file=sys.stderr, flush=True)
        return rd
