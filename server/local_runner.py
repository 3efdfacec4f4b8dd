"""The one-machine StageRunner: `mos fuse` plays every party itself, with the same stage functions the
federated clients run."""

from __future__ import annotations

import copy

from tqdm.auto import tqdm

from ..shared import stages
from ..shared.adapter import Adapter
from ..shared.base import Base
from ..shared.concepts import Concept
from ..shared.lora import Lora
from ..shared.model import ConceptModel
from ..shared.stats import Stats


class LocalRunner:
    def __init__(self, base: Base, adapters: list[Adapter], steps: int = 20, progress: bool = True):
        self.base = base  # kept pristine: every stage works on a copy (LoRA and processors mutate a base)
        self.adapters = {a.concepts[0].name: a for a in adapters}
        self.steps = steps
        self.progress = progress

    def _each(self, desc: str):
        return tqdm(self.adapters.items(), desc=desc, disable=not self.progress, unit="concept")

    def stage1(self, one_shot: bool) -> dict[str, tuple[Adapter, Stats]]:
        out = {}
        for name, adapter in self._each("stage 1: text encoder" + (" (one-shot: all sites)" if one_shot else "")):
            model = ConceptModel.from_adapter(copy.deepcopy(self.base), adapter)
            out[name] = (adapter, stages.stage1(model, name, one_shot, self.steps))
        return out

    def stage2(self, fused_te: Lora, concepts: list[Concept]) -> dict[str, Stats]:
        return {name: stages.stage2(copy.deepcopy(self.base), fused_te, concepts, name)
                for name, _ in self._each("stage 2: cross-attention k/v")}

    def stage3(self, fused: Lora, concepts: list[Concept]) -> dict[str, Stats]:
        return {name: stages.stage3(copy.deepcopy(self.base), fused, a, concepts, name, self.steps)
                for name, a in self._each("stage 3: spatial layers")}

    def deliver(self, fused: Adapter) -> None:
        pass  # the caller writes the result
