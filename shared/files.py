"""Files written whole or not at all: a reader, or a process restarted mid-write, never sees half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` (atomic on one filesystem) when the block
    ends normally, removed when it raises. The file is created owner-only (0600) unless `mode` says otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes, mode: int | None = 0o644) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented JSON in the object's own key order; numbers JSON does not know (tensor and numpy scalars) as floats,
    anything else it does not know (paths, dates) as its str()."""
    return write_bytes(path, json.dumps(obj, indent=2, default=_plain).encode())


def _plain(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors, written whole or not at all."""
    with atomic_path(path, 0o644) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_tensors(path: Path, max_bytes: int, what: str, error: type[Exception] = ValueError
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, after a size cap; anything else (a pickle) is `error`."""
    from safetensors import safe_open

    if not path.is_file():
        raise error(f"no {what} at {path}")
    if path.stat().st_size > max_bytes:
        raise error(f"{path}: {path.stat().st_size} bytes is over the {max_bytes}-byte cap")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a file that is not one
        raise error(f"{path}: not a readable .safetensors {what} ({type(e).__name__}: {e})") from None
