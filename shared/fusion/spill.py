"""Per-concept fusion terms (and LoRAs) kept in files instead of memory, so the server's memory does not grow with N.

A `SpilledTerms` is a solver.TermStore: each concept's terms of one site (B_i, A_i G_i and the energy per layer)
go to one safetensors file when the concept is added, and come back only while that site is solved. At SD1.5 sizes
they are ~7 MiB per concept over all sites, so at N = 100 the files hold ~0.7 GiB that memory no longer does; the
solve reads one site's worth at a time. Files are safetensors (no pickle), written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mos.shared.fusion.solver import LayerTerm


class _Folder:
    """One safetensors file per concept in one folder (the caller owns and removes the folder)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}  # concept -> its file, in the order concepts came
        self._next = 0  # file names are numbers: concept names are not file-name safe

    def _write(self, concept: str, tensors: dict[str, torch.Tensor], layers: list[str]) -> None:
        path = self.folder / f"{self._next:06d}.safetensors"
        self._next += 1
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"layers": json.dumps(layers)})  # the layer order
        os.replace(tmp, path)
        self.drop(concept)
        self._files[concept] = path

    def drop(self, concept: str) -> None:
        path = self._files.pop(concept, None)
        if path is not None:
            path.unlink(missing_ok=True)


class SpilledTerms(_Folder):
    """solver.TermStore over one folder (one per site)."""

    def put(self, concept: str, terms: dict[str, LayerTerm]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for layer, t in terms.items():
            tensors[f"B/{layer}"] = t.B.contiguous()
            tensors[f"AG/{layer}"] = t.AG.contiguous()
            tensors[f"energy/{layer}"] = torch.tensor([t.energy], dtype=torch.float64)
        self._write(concept, tensors, list(terms))

    def load(self) -> dict[str, list[LayerTerm]]:
        out: dict[str, list[LayerTerm]] = {}
        for path in self._files.values():
            with safe_open(str(path), framework="pt") as f:
                for layer in json.loads(f.metadata()["layers"]):
                    term = LayerTerm(B=f.get_tensor(f"B/{layer}"), AG=f.get_tensor(f"AG/{layer}"),
                                     energy=float(f.get_tensor(f"energy/{layer}")[0]))
                    out.setdefault(layer, []).append(term)
        return out


class SpilledLoras(_Folder):
    """Each concept's LoRA in a file of one folder, read when a stage's statistics are added or for the report: a
    rank-4 SD1.5 LoRA is ~5 MiB, ~0.5 GiB that memory need not hold at N = 100."""

    def put(self, concept: str, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        tensors = {f"{k}/{layer}": t.detach().contiguous() for layer, BA in lora.items() for k, t in zip("BA", BA)}
        self._write(concept, tensors, list(lora))

    def load(self, concept: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with safe_open(str(self._files[concept]), framework="pt") as f:
            return {layer: (f.get_tensor(f"B/{layer}"), f.get_tensor(f"A/{layer}"))
                    for layer in json.loads(f.metadata()["layers"])}
