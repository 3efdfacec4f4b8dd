"""How a Gram matrix travels: packed upper triangle in float64 (exact), or an upper-triangular factor R with
RᵀR = G (k × d, k = rank ≤ rows: never larger than the packed triangle, smaller where the Gram has few rows, and
still positive semidefinite after rounding to float32). A factor is decoded to the factor (stats.FactorGram, still
packed as sent), never to the dense Gram: the server stores it so and sums RᵀR straight from it. A packed Gram is
decoded dense and left to the fusion's one check (Fusion.check_stats: check_gram and check_psd).
"""

from __future__ import annotations

import torch

from mos.protos import mos_pb2 as pb
from mos.shared.fusion.gram import pack_sym, pack_trapezoid, packed_len, trapezoid_len, unpack_sym
from mos.shared.fusion.stats import FactorGram, Gram

GRAM_DTYPE = "float32"   # halves the upload against float64; see docs/protocol.md for what it costs


class GramError(ValueError):
    """A Gram that cannot be decoded; the message says whose and where."""


def triangular_factor(G: torch.Tensor) -> torch.Tensor:
    """Upper-trapezoidal R [k, d], k = rank(G), with RᵀR = G (float64).

    Cholesky where G is positive definite; otherwise the eigen-factor over G's numerical range (eigenvalues
    above d·ε·λmax), made triangular by a QR step.
    """
    G = G.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L.T.contiguous()
    evals, evecs = torch.linalg.eigh(G)
    tol = float(evals.max().clamp(min=0)) * G.shape[0] * torch.finfo(torch.float64).eps
    keep = evals > tol
    if not bool(keep.any()):
        return torch.zeros(0, G.shape[0], dtype=torch.float64)
    F = evals[keep].sqrt()[:, None] * evecs[:, keep].T
    R = torch.linalg.qr(F, mode="r").R
    return R


def encode_gram(g: Gram, dtype: str = GRAM_DTYPE) -> tuple[int, int, torch.Tensor]:
    """(encoding, rank, 1-D tensor). float64 travels packed (exact); narrower types as the triangular factor,
    whose RᵀR stays positive semidefinite after rounding (a rounded packed Gram can turn indefinite, and the
    fusion's solve amplifies that: docs/protocol.md)."""
    if dtype == "float64":
        return pb.PACKED_UPPER, 0, pack_sym(g.gram)
    R = triangular_factor(g.gram)
    return pb.TRIANGULAR_FACTOR, R.shape[0], pack_trapezoid(R)


def gram_wire_bytes(d: int, rows: int, dtype: str = GRAM_DTYPE) -> int:
    """Upper bound of one Gram's bytes on the wire (the factor's rank is at most min(rows, d))."""
    n = packed_len(d) if dtype == "float64" else trapezoid_len(min(rows, d), d)
    return n * {"float32": 4, "float64": 8}[dtype]


def decode_gram(encoding: int, rank: int, t: torch.Tensor, dim: int, rows: int, where: str) -> Gram | FactorGram:
    """A Gram from its wire form, its layout checked (length, rank). The factor stays a factor (float32 as sent:
    finite, as the wire's tensor check ensures); a packed Gram comes back dense float64, to be checked once by
    the fusion (Fusion.check_stats) before it counts."""
    if t.ndim != 1:
        raise GramError(f"{where}: Gram tensor must be 1-D, got shape {tuple(t.shape)}")
    if encoding == pb.PACKED_UPPER:
        if t.shape[0] != packed_len(dim):
            raise GramError(f"{where}: packed Gram has {t.shape[0]} values, site dimension {dim} needs "
                            f"{packed_len(dim)}")
        return Gram(unpack_sym(t.to(torch.float64), dim), rows)
    if encoding == pb.TRIANGULAR_FACTOR:
        if not 0 <= rank <= min(rows, dim) or t.shape[0] != trapezoid_len(rank, dim):
            raise GramError(f"{where}: triangular factor of rank {rank} has {t.shape[0]} values; site dimension "
                            f"{dim} needs {trapezoid_len(rank, dim)} with rank <= min(rows={rows}, {dim})")
        return FactorGram(t, rank, dim, rows)  # kept packed, as sent: stored so, unpacked once when summed
    raise GramError(f"{where}: unknown Gram encoding {encoding}")
