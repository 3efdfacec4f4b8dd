"""Statistics on disk: dense Grams as float64 safetensors under `gram/<site>`, factored ones (stats.FactorGram) as
the packed upper trapezoid of their factor R under `trapezoid/<site>` in the dtype it came in (the wire's own form:
half the bytes of R stored whole, which files written before kept under `factor/<site>` and still load); row counts
and factor shapes in the header. No pickle.

`load_stats(path, lazy=True)` reads the header only and gives `StoredGram`s, each of which reads its one tensor when
asked: the server and the fusion hold a concept's statistics as such references, so memory does not grow with the
number of concepts (a Gram of an SD1.5 spatial site is 13 MiB dense, 3-7 MiB as a factor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mos.shared.files import save_tensors
from mos.shared.fusion.gram import trapezoid_len
from mos.shared.fusion.stats import FactorGram, Gram, Stats


@dataclass(frozen=True)
class StoredGram:
    """One site's Gram in a statistics file, read when `load` is called."""

    path: Path
    site: str
    rows: int
    factored: bool
    # Fusion.check_stats accepted this content before it was written (the server checks an upload, then saves
    # it): the fusion does not check it again. A file read back from an earlier run is checked (False).
    checked: bool = False
    shape: tuple[int, int] | None = None  # a factor's [k, d] when stored packed; None: stored whole (older files)

    def load(self) -> Gram | FactorGram:
        with safe_open(str(self.path), framework="pt") as f:
            if not self.factored:
                return Gram(f.get_tensor(f"gram/{self.site}"), self.rows)
            if self.shape is None:
                return FactorGram.of(f.get_tensor(f"factor/{self.site}"), self.rows)
            k, d = self.shape
            t = f.get_tensor(f"trapezoid/{self.site}")
            if t.ndim != 1 or t.shape[0] != trapezoid_len(k, d) or not 0 <= k <= d:
                raise ValueError(f"{self.path}: {self.site}: {tuple(t.shape)} values do not fit a {k} x {d} factor")
            return FactorGram(t, k, d, self.rows)


def held(g: Gram | FactorGram | StoredGram) -> Gram | FactorGram:
    """The Gram itself, read from its file if it is a reference."""
    return g.load() if isinstance(g, StoredGram) else g


def save_stats(stats: dict[str, Gram | FactorGram | StoredGram], path: str | Path) -> Path:
    """Write atomically: a reader (or a restarted server) never sees half a file. References are read one at a time."""
    tensors, rows, shapes = {}, {}, {}
    for site, g in stats.items():
        g = held(g)
        if isinstance(g, FactorGram):
            tensors[f"trapezoid/{site}"] = g.packed.contiguous()
            shapes[site] = [g.rank, g.dim]
        else:
            tensors[f"gram/{site}"] = g.gram.to(torch.float64).contiguous()
        rows[site] = int(g.rows)
    return save_tensors(tensors, path, {"rows": json.dumps(rows, sort_keys=True),
                                        "factored": json.dumps(sorted(shapes)),
                                        "factor_shapes": json.dumps(shapes, sort_keys=True)})


def checked_refs(stats: dict[str, Gram | FactorGram | StoredGram], path: Path) -> dict[str, StoredGram]:
    """References to what `save_stats(stats, path)` wrote, marked as checked (the caller checked `stats`); read from
    the file's header, so they describe the file as written (every factor packed, whatever form it came in)."""
    refs = load_stats(path, lazy=True) or {}
    return {site: replace(refs[site], checked=True) for site in stats}


def load_stats(path: str | Path, lazy: bool = False) -> Stats | dict[str, StoredGram] | None:
    """The statistics in `path` (lazy: references that read each Gram when asked), or None when there is no such
    file."""
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        rows = json.loads(meta.get("rows", "{}"))
        factored = set(json.loads(meta.get("factored", "[]")))
        shapes = {site: tuple(int(v) for v in kd) for site, kd in json.loads(meta.get("factor_shapes", "{}")).items()}
    refs = {site: StoredGram(path, site, int(n), site in factored, shape=shapes.get(site)) for site, n in rows.items()}
    return refs if lazy else {site: r.load() for site, r in refs.items()}
