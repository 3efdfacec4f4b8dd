"""Input-activation statistics: one Gram matrix XᵀX (float64) and a row count per input site.

Forward pre-hooks on the first LoRA'd layer of each site see exactly the tensor every layer of that site reads
(peft's wrapper passes its input to the base layer unchanged). A convolution's rows are its unfolded input
patches. Only the running sums are kept, never activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mos.shared.fusion.gram import factor_gram, pack_trapezoid, sq_norm, unpack_trapezoid
from mos.shared.sd.sites import Site


@dataclass
class Gram:
    gram: torch.Tensor  # float64 [d, d]
    rows: int

    def add_rows(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.gram.device, torch.float64)
        self.gram.addmm_(x.T, x)
        self.rows += x.shape[0]

    def cpu(self) -> "Gram":
        return Gram(self.gram.cpu(), self.rows)


@dataclass
class FactorGram:
    """G = RᵀR for an upper-trapezoidal R [rank, dim], held as the wire carries it: R's upper trapezoid packed row by
    row (gram.pack_trapezoid), float32 by default. The server stores it so (half the bytes of R whole) and sums Grams
    in this form: RᵀR is symmetric and positive semidefinite by construction (no Cholesky check needed),
    tr(G) = ‖R‖², and adding RᵀR to a running sum costs a third of forming G densely and then adding it."""

    packed: torch.Tensor  # 1-D, gram.trapezoid_len(rank, dim) values
    rank: int
    dim: int
    rows: int

    @classmethod
    def of(cls, R: torch.Tensor, rows: int) -> "FactorGram":
        """From R itself [k, d] (its lower triangle is ignored)."""
        return cls(pack_trapezoid(R), int(R.shape[0]), int(R.shape[1]), rows)

    @property
    def factor(self) -> torch.Tensor:
        """R [rank, dim] (a new tensor, the packed values' dtype)."""
        return unpack_trapezoid(self.packed, self.rank, self.dim)

    @property
    def gram(self) -> torch.Tensor:
        """Dense float64 G, formed on demand (tests, small tools; the server never needs it)."""
        return factor_gram(self.factor.to(torch.float64))

    def trace(self) -> float:
        """‖R‖², over the packed values (accumulated in float64)."""
        return sq_norm(self.packed)


# A site's statistics: dense (what a recorder accumulates) or factored (what the server receives).
Stats = dict[str, "Gram | FactorGram"]

# A stage-3 site's held-out share (rows from trajectories of other seeds, used only to choose its λ) travels and is
# kept beside the site's own Gram under the site's name with this suffix (no site name holds a '#').
HELDOUT_SUFFIX = "#heldout"


def heldout_key(site: str) -> str:
    return site + HELDOUT_SUFFIX


def site_of_key(key: str) -> tuple[str, bool]:
    """(site name, held out?) of a statistics key."""
    return (key.removesuffix(HELDOUT_SUFFIX), True) if key.endswith(HELDOUT_SUFFIX) else (key, False)


def as_summed(g: "Gram | FactorGram") -> tuple[torch.Tensor, bool]:
    """(tensor, factor) as SiteSums.add/remove and site_residual take a Gram: R for a factored one, else G."""
    return (g.factor, True) if isinstance(g, FactorGram) else (g.gram, False)


def gram_trace(g: "Gram | FactorGram") -> float:
    return g.trace() if isinstance(g, FactorGram) else float(g.gram.diagonal().sum(dtype=torch.float64))


def rows(x: torch.Tensor, site: Site) -> torch.Tensor:
    """The input rows a site's layers see: the tensor itself, or a convolution's patches [.., C·k·k]."""
    if site.conv is None:
        return x
    c = site.conv
    return F.unfold(x, c.kernel, padding=c.padding, stride=c.stride).transpose(1, 2)


def empty(dim: int, device: torch.device | str = "cpu") -> Gram:
    return Gram(torch.zeros(dim, dim, dtype=torch.float64, device=device), 0)


class StatsRecorder:
    """Context manager: accumulate the Gram of every listed site while the models run.

        with StatsRecorder(model.models, sites) as rec:
            ...forward passes...
        stats = rec.stats
    """

    def __init__(self, models: dict[str, torch.nn.Module], sites: list[Site]):
        self.models = models
        self.sites = sites
        self.stats: Stats = {}
        self._handles: list = []

    def _module(self, layer: str) -> torch.nn.Module:
        component, _, path = layer.partition(".")
        return self.models[component].get_submodule(path)

    def __enter__(self) -> "StatsRecorder":
        for site in self.sites:
            module = self._module(site.layers[0])
            device = next(module.parameters()).device
            gram = self.stats.setdefault(site.name, empty(site.dim, device))
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, g=gram, s=site: g.add_rows(rows(args[0], s))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stats = {k: v.cpu() for k, v in self.stats.items()}


def merge(a: Stats, b: Stats) -> Stats:
    """Sum two statistics (sites present in either)."""
    out = {k: Gram(v.gram.clone(), v.rows) for k, v in a.items()}
    for k, v in b.items():
        if k in out:
            out[k].gram += v.gram
            out[k].rows += v.rows
        else:
            out[k] = Gram(v.gram.clone(), v.rows)
    return out
