"""The adapter file: one concept (a client's ED-LoRA) or many (a fused result), as safetensors.

Tensors: `lora.<layer>.A` [r, d_in], `lora.<layer>.B` [d_out, r] (scale folded in: ΔW = B @ A), and
`emb.<concept>` [layers, 2, dim] ([layers, 0, dim] for a concept imported from a plain LoRA). The safetensors
header's metadata holds `mos` = JSON: {"format": "mos-adapter", "version": 1, "fingerprint": ...,
"concepts": [{name, class_word[, trigger]}], ...}.
No pickle anywhere: reading an adapter never runs code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mos.shared.files import read_tensors, save_tensors
from mos.shared.sd.concepts import Concept, check_class_word, check_name
from mos.shared.sd.lora import Lora

FORMAT = "mos-adapter"
VERSION = 1
FILENAME = "adapter.safetensors"
MAX_BYTES = 2 << 30  # an SD1.5 fused adapter of 100 concepts stays well below this


class AdapterError(ValueError):
    pass


@dataclass
class Adapter:
    fingerprint: str
    concepts: list[Concept]
    lora: Lora
    meta: dict[str, Any] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {layer: int(A.shape[0]) for layer, (B, A) in self.lora.items()}


def scaled(adapter: Adapter, scale: float) -> Adapter:
    """The adapter with every LoRA B times `scale` (ΔW = scale·BA; the embeddings unchanged), the product of the
    scales so far recorded in meta["lora_scale"]. The reference samples a single concept at 0.7 and checks 0
    (embeddings only), 0.7 and 1."""
    if scale < 0:
        raise AdapterError(f"LoRA scale {scale:g}: must not be negative")
    lora = {layer: (B * scale, A) for layer, (B, A) in adapter.lora.items()}
    meta = {**adapter.meta, "lora_scale": float(adapter.meta.get("lora_scale", 1.0)) * scale}
    return Adapter(adapter.fingerprint, adapter.concepts, lora, meta)


def split_scale(spec: str) -> tuple[str, float]:
    """`runs/alice:0.7` -> ("runs/alice", 0.7); a spec without a numeric `:SCALE` tail has scale 1."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def load_scaled(spec: str) -> Adapter:
    """An adapter from `PATH[:SCALE]`, its LoRA scaled (left as it is at scale 1)."""
    path, scale = split_scale(spec)
    adapter = load(path)
    return adapter if scale == 1.0 else scaled(adapter, scale)


def adapter_file(path: str | Path) -> Path:
    p = Path(path)
    return p / FILENAME if p.is_dir() else p


def save(adapter: Adapter, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    path = adapter_file(path) if Path(path).is_dir() else Path(path)
    tensors = {}
    for layer, (B, A) in adapter.lora.items():
        tensors[f"lora.{layer}.A"] = A.detach().float().contiguous().cpu()
        tensors[f"lora.{layer}.B"] = B.detach().float().contiguous().cpu()
    for c in adapter.concepts:
        tensors[f"emb.{c.name}"] = c.embeddings.detach().float().contiguous().cpu()
    meta = {**adapter.meta, "format": FORMAT, "version": VERSION, "fingerprint": adapter.fingerprint,
            "concepts": [concept_meta(c) for c in adapter.concepts]}
    return save_tensors(tensors, path, {"mos": json.dumps(meta, sort_keys=True)})


def concept_meta(c: Concept) -> dict[str, str]:
    return {"name": c.name, "class_word": c.class_word, **({"trigger": c.trigger} if c.trigger else {})}


def load(path: str | Path, max_bytes: int = MAX_BYTES) -> Adapter:
    """Read and check an adapter; every problem is an AdapterError naming the file and the part."""
    f = adapter_file(path)
    if not f.is_file():
        raise AdapterError(f"no adapter at {path} (expected {FILENAME} in a folder, or the file itself)")
    tensors, header = read_tensors(f, max_bytes, "adapter", AdapterError)
    try:
        meta = json.loads(header.get("mos", "null") or "null")
    except ValueError:
        raise AdapterError(f"{f}: its 'mos' metadata is not JSON") from None
    return from_tensors(tensors, meta, str(f))


def from_tensors(tensors: dict[str, torch.Tensor], meta: Any, where: str) -> Adapter:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{where}: not a mos adapter (no '{FORMAT}' metadata)")
    if meta.get("version") != VERSION:
        raise AdapterError(f"{where}: adapter version {meta.get('version')!r}, this build reads {VERSION}")
    lora: Lora = {}
    layers = sorted({k[5:-2] for k in tensors if k.startswith("lora.")})
    for layer in layers:
        A, B = tensors.get(f"lora.{layer}.A"), tensors.get(f"lora.{layer}.B")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise AdapterError(f"{where}: LoRA of {layer} is incomplete or has inconsistent shapes")
        lora[layer] = (B.float(), A.float())
    concepts = []
    for c in meta.get("concepts", []):
        if not isinstance(c, dict):
            raise AdapterError(f"{where}: a concept entry is not an object")
        try:  # names become folders and files on export: never a path, whoever wrote the file
            check_name(c.get("name"), where)
            check_class_word(c.get("class_word", ""), f"{where}, concept {c.get('name')!r}")
        except ValueError as e:
            raise AdapterError(str(e)) from None
        emb = tensors.get(f"emb.{c.get('name')}")
        if emb is None or emb.ndim != 3:
            raise AdapterError(f"{where}: concept {c.get('name')!r} has no layer-wise embeddings")
        concepts.append(Concept(c["name"], c.get("class_word", ""), emb.float(), str(c.get("trigger", ""))))
        if emb.shape[1] != concepts[-1].n_tokens:
            raise AdapterError(f"{where}: concept {c['name']!r} has {emb.shape[1]} tokens, expected "
                               f"{concepts[-1].n_tokens}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"{where}: tensor {name} holds NaN or Inf")
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "fingerprint", "concepts")}
    return Adapter(meta.get("fingerprint", ""), concepts, lora, extra)
