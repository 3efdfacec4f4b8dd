"""How a Gram matrix travels: packed upper triangle in float64 (exact), or an upper-triangular factor R with
RᵀR = G (k × d, k = rank ≤ rows: never larger than the packed triangle, smaller where the Gram has few rows, and
still positive semidefinite after rounding to float32). Decoding ends in the one Gram check (fusion/gram.py).
"""

from __future__ import annotations

import torch

from mos.protos import mos_pb2 as pb
from mos.shared.fusion.gram import check_gram, pack_sym, packed_len, unpack_sym
from mos.shared.fusion.stats import Gram

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


def _factor_gram(R: torch.Tensor, block: int = 256) -> torch.Tensor:
    """RᵀR for an upper-trapezoidal R [k, d], by column blocks: rows at or past a block's end are zero in its
    columns, so each block multiplies only the rows above. Half the work of R.T @ R (it was the server's largest
    per-Gram cost at SD1.5 sizes: 58 ms -> 28 ms at d = 1280 on one thread), and exactly symmetric."""
    k, d = R.shape
    G = torch.empty(d, d, dtype=R.dtype)
    for j in range(0, d, block):
        end = min(j + block, d)
        rows = min(end, k)
        G[j:end, j:] = R[:rows, j:end].T @ R[:rows, j:]
        G[end:, j:end] = G[j:end, end:].T
        D = G[j:end, j:end]  # the diagonal block: its upper triangle mirrored, so G is exactly symmetric
        D.copy_(torch.triu(D) + torch.triu(D, 1).T)
    return G


def trapezoid_len(k: int, d: int) -> int:
    return k * d - k * (k - 1) // 2


def encode_gram(g: Gram, dtype: str = GRAM_DTYPE) -> tuple[int, int, torch.Tensor]:
    """(encoding, rank, 1-D tensor). float64 travels packed (exact); narrower types as the triangular factor,
    whose RᵀR stays positive semidefinite after rounding (a rounded packed Gram can turn indefinite, and the
    fusion's solve amplifies that: docs/protocol.md)."""
    d = g.gram.shape[0]
    if dtype == "float64":
        return pb.PACKED_UPPER, 0, pack_sym(g.gram)
    R = triangular_factor(g.gram)
    k = R.shape[0]
    iu = torch.triu_indices(k, d)
    return pb.TRIANGULAR_FACTOR, k, R[iu[0], iu[1]]


def gram_wire_bytes(d: int, rows: int, dtype: str = GRAM_DTYPE) -> int:
    """Upper bound of one Gram's bytes on the wire (the factor's rank is at most min(rows, d))."""
    n = packed_len(d) if dtype == "float64" else trapezoid_len(min(rows, d), d)
    return n * {"float32": 4, "float64": 8}[dtype]


def decode_gram(encoding: int, rank: int, t: torch.Tensor, dim: int, rows: int, where: str) -> torch.Tensor:
    """Dense float64 Gram from its wire form, checked: right size, finite, symmetric and plausibly PSD."""
    if t.ndim != 1:
        raise GramError(f"{where}: Gram tensor must be 1-D, got shape {tuple(t.shape)}")
    if encoding == pb.PACKED_UPPER:
        if t.shape[0] != packed_len(dim):
            raise GramError(f"{where}: packed Gram has {t.shape[0]} values, site dimension {dim} needs "
                            f"{packed_len(dim)}")
        G = unpack_sym(t, dim)
    elif encoding == pb.TRIANGULAR_FACTOR:
        if not 0 <= rank <= min(rows, dim) or t.shape[0] != trapezoid_len(rank, dim):
            raise GramError(f"{where}: triangular factor of rank {rank} has {t.shape[0]} values; site dimension "
                            f"{dim} needs {trapezoid_len(rank, dim)} with rank <= min(rows={rows}, {dim})")
        R = torch.zeros(rank, dim, dtype=torch.float64)
        iu = torch.triu_indices(rank, dim)
        R[iu[0], iu[1]] = t.to(torch.float64)
        G = _factor_gram(R)
    else:
        raise GramError(f"{where}: unknown Gram encoding {encoding}")
    try:
        check_gram(G, where)
    except ValueError as e:
        raise GramError(str(e)) from None
    return G
