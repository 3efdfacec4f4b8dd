"""Files written whole or not at all: a reader, or a process restarted mid-write, never sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors to a temporary file beside `path`, then rename (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
