"""Statistics on disk: float64 Grams as safetensors under `gram/<site>`, row counts in the header. No pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mos.shared.files import save_tensors
from mos.shared.fusion.stats import Gram, Stats


def save_stats(stats: Stats, path: str | Path) -> Path:
    """Write atomically: a reader (or a restarted server) never sees half a file."""
    tensors = {f"gram/{site}": g.gram.to(torch.float64).contiguous() for site, g in stats.items()}
    rows = {site: int(g.rows) for site, g in stats.items()}
    return save_tensors(tensors, path, {"rows": json.dumps(rows, sort_keys=True)})


def load_stats(path: str | Path) -> Stats | None:
    """The statistics in `path`, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        rows = json.loads((f.metadata() or {}).get("rows", "{}"))
        return {site: Gram(f.get_tensor(f"gram/{site}"), int(n)) for site, n in rows.items()}
