"""One party's side: tuning a concept's ED-LoRA, taking part in a federated round, measuring fused models.

    from mos.client import TuneConfig, tune
    tune("data/alice", "runs/alice", TuneConfig(steps=300), base="world")
"""

from mos.shared.runtime import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "TuneConfig": "mos.client.tuning.edlora", "tune": "mos.client.tuning.tune",
    "retention": "mos.client.evaluation.retention",
})
