"""What one party brings to a round and takes from it: its adapter (given, cached or tuned now) and, after the
round, the fused adapter's pipeline and preview."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

from mos.client.tuning.edlora import TuneConfig
from mos.client.tuning.tune import tune
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.formats.export import write_pipeline
from mos.shared.runtime import say
from mos.shared.sampling.preview import write_preview
from mos.shared.sd.base import Base, mos_home


def prepare_adapter(concept: str | None, adapter_path: str | None, base: str, steps: int | None,
                    device: str | None, lora_scale: float = 1.0) -> tuple[Adapter, str]:
    """(adapter, data digest): the given adapter, or the concept's cached (else freshly tuned) one, its LoRA
    times `lora_scale` (what the party uploads; adapter_io.scaled records it in the adapter's meta)."""
    adapter, digest = given_or_tuned(concept, adapter_path, base, steps, device)
    if lora_scale != 1.0:
        say(f"LoRA scaled by {lora_scale:g} before upload")
        adapter = adapter_io.scaled(adapter, lora_scale)
    return adapter, digest


def given_or_tuned(concept: str | None, adapter_path: str | None, base: str, steps: int | None,
                   device: str | None) -> tuple[Adapter, str]:
    if adapter_path:
        adapter = adapter_io.load(adapter_path)
        say(f"using adapter {adapter_path} ({', '.join(c.handle for c in adapter.concepts) or 'no concept'})")
        return adapter, str(adapter.meta.get("data_digest", ""))
    folder_in = Path(concept).resolve()
    slot = hashlib.sha256(f"{folder_in}\n{base}".encode()).hexdigest()[:12]
    folder = mos_home() / "clients" / f"{folder_in.name}-{slot}"
    tune(folder_in, folder, TuneConfig(steps=steps), base, device=device)
    adapter = adapter_io.load(folder)
    return adapter, str(adapter.meta.get("data_digest", ""))


def write_outputs(out: Path, name: str, base: Base, pipeline: bool = True) -> None:
    """What a party leaves after a round: the fused adapter (written by the worker), a merged diffusers pipeline
    and a preview of its concept with the others. `base` is left unchanged (each output works on a copy)."""
    result = adapter_io.load(out / adapter_io.FILENAME)
    say(f"fused adapter: {out / adapter_io.FILENAME} ({', '.join(c.handle for c in result.concepts)})")
    if pipeline:
        say(f"merged diffusers pipeline: {write_pipeline(copy.deepcopy(base), result, out / 'pipeline')}")
    say(f"preview of <{name}> with the others: "
        f"{write_preview(copy.deepcopy(base), result, out / 'preview.png', first=name)}")
