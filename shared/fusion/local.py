"""Fusion on one machine: `fuse()` plays every party itself (`LocalRunner`), with the same stage functions and
the same driver (`run_fusion`) the federated clients and server run. `mos fuse` and `mos eval world` call it."""

from __future__ import annotations

import copy
from pathlib import Path

from tqdm.auto import tqdm

from mos.shared.files import write_json
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion import stages
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.driver import Fusion, run_fusion
from mos.shared.fusion.stats import Stats
from mos.shared.sd.base import Base, load_base
from mos.shared.sd.concepts import Concept
from mos.shared.sd.lora import Lora
from mos.shared.sd.model import ConceptModel
from mos.shared.sd.sites import input_sites


class LocalRunner:
    """Every party's part of each stage, one after the other, on copies of one loaded base."""

    def __init__(self, base: Base, adapters: list[Adapter], progress: bool = True):
        self.base = base  # kept pristine: every stage works on a copy (LoRA and processors mutate a base)
        self.adapters = {a.concepts[0].name: a for a in adapters}
        self.progress = progress

    def _each(self, desc: str):
        return tqdm(self.adapters.items(), desc=desc, disable=not self.progress, unit="concept")

    def stage1(self, config: FusionConfig) -> dict[str, tuple[Adapter, Stats]]:
        out = {}
        for name, adapter in self._each("stage 1: text encoder" + (" (one-shot: all sites)" if config.one_shot else "")):
            model = ConceptModel.from_adapter(copy.deepcopy(self.base), adapter)
            out[name] = (adapter, stages.stage1(model, name, config))
        return out

    def stage2(self, fused_te: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]:
        return {name: stages.stage2(copy.deepcopy(self.base), fused_te, concepts, name)
                for name, _ in self._each("stage 2: cross-attention k/v")}

    def stage3(self, fused: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]:
        return {name: stages.stage3(copy.deepcopy(self.base), fused, a, concepts, name, config)
                for name, a in self._each("stage 3: spatial layers")}

    def deliver(self, fused: Adapter) -> None:
        pass  # the caller writes the result


def fuse(adapters: list[Adapter], base: str | Base = "tiny", config: FusionConfig = FusionConfig(),
         device: str | None = None, dtype: str | None = None, progress: bool = True) -> Adapter:
    """Fuse tuned concepts on this machine. `base` may be a loaded Base (left unchanged: each stage copies it)."""
    loaded = base if isinstance(base, Base) else load_base(base, device, dtype)
    config = config.resolved(loaded.spec)
    fusion = Fusion(loaded.fingerprint, input_sites(loaded.text_encoder, loaded.unet, config.placement), config)
    for a in adapters:  # fail before any work on a base mismatch
        fusion.check_base(a)
    try:
        result = run_fusion(LocalRunner(loaded, adapters, progress), fusion)
    finally:
        fusion.close()  # its temporary folder of per-concept Grams and terms
    scales = {a.concepts[0].name: float(a.meta.get("lora_scale", 1.0)) for a in adapters}
    result.meta.setdefault("fusion", {})["lora_scales"] = scales  # adapter_io.scaled's, 1 for an unscaled one
    return result


def write_result(result: Adapter, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    adapter_io.save(result, out / adapter_io.FILENAME)
    write_json(out / "fusion.json", result.meta.get("fusion", {}))
