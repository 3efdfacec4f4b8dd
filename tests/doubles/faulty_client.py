"""A test double: `mos-client` whose worker misbehaves on purpose, so tests can check that the server survives it.

    python faulty_client.py FAULT [mos-client arguments]

FAULT is `nan:STAGE` (a NaN in one Gram of that stage's upload), `shape:STAGE` (one Gram of the wrong size) or
`slow:STAGE` (wait SLOW_S seconds before answering that stage: a client that can be killed mid-stage).
The product has no switch for any of this: the double swaps the worker class before `mos-client` starts it.
"""

from __future__ import annotations

import sys
import time

from flwr.app import Array, ArrayRecord, RecordDict
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mos.client.commands import client
from mos.client.federation import worker
from mos.shared.federation import wire

SLOW_S = 30.0
STAGE_OF = {"train.tune": 1, "query.kv": 2, "query.spatial": 3}


def corrupt(rd: RecordDict, kind: str, stage: int) -> RecordDict:
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
    print(f"faulty_client: corrupted {key} ({kind}) in the stage-{stage} upload", file=sys.stderr, flush=True)
    return rd


def faulty_worker(fault: str) -> type:
    kind, _, at = fault.partition(":")
    if kind not in ("nan", "shape", "slow") or at not in ("1", "2", "3"):
        raise SystemExit(f"faulty_client: FAULT {fault!r}: use nan:STAGE, shape:STAGE or slow:STAGE")

    class FaultyWorker(worker.Worker):
        def handle(self, msg_kind: str, rd: RecordDict, meta: dict) -> RecordDict:
            stage = STAGE_OF.get(msg_kind)
            if kind == "slow" and str(stage) == at:
                print(f"faulty_client: waiting {SLOW_S:.0f} s before answering {msg_kind}", file=sys.stderr,
                      flush=True)
                time.sleep(SLOW_S)
            reply = super().handle(msg_kind, rd, meta)
            return corrupt(reply, kind, stage) if kind != "slow" and str(stage) == at else reply

    return FaultyWorker


if __name__ == "__main__":
    worker.Worker = faulty_worker(sys.argv[1])
    sys.exit(client.main(sys.argv[2:]))
