"""A Gram matrix G = XᵀX as data: its packed-symmetric form, and the one check that it is plausibly XᵀX.

A Gram that arrives dense (a local `mos fuse`, or float64 packed on the wire) passes `check_gram` and `check_psd`
once, in Fusion.check_stats (or SiteSums.add when called directly):
square, of the site's size, finite, symmetric, with a non-negative diagonal and |G_ij| <= sqrt(G_ii G_jj)
(necessary conditions of positive semidefiniteness that cost one pass). The checks run tile by tile: at SD1.5
sizes a whole-matrix temporary per concept and site fragments the heap (RSS grew by hundreds of MiB per concept).

A Gram that arrives as its triangular factor R (the wire's default) is never formed densely on the server: RᵀR is
symmetric and positive semidefinite by construction, so neither check applies, and `add_factor_gram` adds it to a
running sum directly (stats.FactorGram).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A Gram computed in float32 can have triangles that differ by a few float32 ulps of its largest entry.
SYM_RTOL = 1e-5
PSD_SHIFT = 1e-6  # G + PSD_SHIFT · tr(G)/d · I must factor: XᵀX up to rounding far below the solve's λ
PSD_RTOL = 1e-3  # slack on |G_ij| <= sqrt(G_ii G_jj) for rounding
_BLOCK_BYTES = 256 * 1024  # tiles of 256 x 256 float32 (181 x 181 float64)


def packed_len(d: int) -> int:
    return d * (d + 1) // 2


def pack_sym(G: Tensor) -> Tensor:
    """Upper triangle of a symmetric matrix, row by row, as a 1-D tensor."""
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"pack_sym needs a square matrix, got shape {tuple(G.shape)}")
    iu = torch.triu_indices(G.shape[0], G.shape[0], device=G.device)
    return G[iu[0], iu[1]]


def unpack_sym(v: Tensor, d: int | None = None) -> Tensor:
    """Inverse of pack_sym (same dtype); d is inferred from the length when not given."""
    if v.ndim != 1:
        raise ValueError(f"packed Gram must be 1-D, got shape {tuple(v.shape)}")
    if d is None:
        d = (math.isqrt(8 * v.numel() + 1) - 1) // 2
    if v.numel() != packed_len(d):
        raise ValueError(f"packed Gram has {v.numel()} values; d={d} needs {packed_len(d)}")
    iu = torch.triu_indices(d, d, device=v.device)
    G = torch.zeros(d, d, dtype=v.dtype, device=v.device)
    G[iu[0], iu[1]] = v
    G[iu[1], iu[0]] = v
    return G


def check_gram(G: Tensor, name: str, dim: int | None = None) -> None:
    """Raise ValueError (naming `name`) unless G looks like a Gram matrix XᵀX."""
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram for {name}: expected a square matrix, got shape {tuple(G.shape)}")
    if dim is not None and G.shape[0] != dim:
        raise ValueError(f"Gram for {name}: expected {dim}x{dim}, got {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise ValueError(f"Gram for {name}: expected a floating dtype, got {G.dtype}")
    if G.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(G))  # NaN and Inf propagate: one pass checks both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"Gram for {name}: contains NaN or Inf")
    scale = max(-lo, hi)
    diag = G.diagonal()
    if float(diag.min()) < -SYM_RTOL * scale:
        raise ValueError(f"Gram for {name}: negative diagonal entry ({float(diag.min()):.3g}); not XᵀX")
    asym, excess = _tile_checks(G, diag.clamp(min=0).sqrt())
    if asym > SYM_RTOL * scale:
        raise ValueError(f"Gram for {name}: not symmetric (max |G - G^T| = {asym:.3g}, max |G| = {scale:.3g})")
    if excess > 1e-6 * scale:
        raise ValueError(f"Gram for {name}: breaks |G_ij| <= sqrt(G_ii G_jj) by {excess:.3g}; not XᵀX")


def _tile_checks(G: Tensor, root_diag: Tensor) -> tuple[float, float]:
    """(max |G - Gᵀ|, max of |G_ij| - sqrt(G_ii G_jj)(1 + PSD_RTOL)), tile by tile over the upper triangle.

    Each tile's mirror is first copied into a contiguous scratch tile (a blocked transpose): subtracting a
    transposed view directly is a slow strided sweep, and it dominated the server's intake at SD1.5 sizes.
    """
    d, asym, excess = G.shape[0], 0.0, -math.inf
    tile = max(1, min(d, math.isqrt(_BLOCK_BYTES // G.element_size())))
    mirror = torch.empty(tile, tile, dtype=G.dtype)
    bound = torch.empty(tile, tile, dtype=G.dtype)
    for i in range(0, d, tile):
        for j in range(i, d, tile):
            a, b = G[i : i + tile, j : j + tile], G[j : j + tile, i : i + tile]
            m, k = a.shape
            t = mirror[:m, :k]
            t.copy_(b.T)
            asym = max(asym, float(t.sub_(a).abs_().max()))
            u = bound[:m, :k]
            torch.outer(root_diag[i : i + m], root_diag[j : j + k], out=u)
            excess = max(excess, float(t.copy_(a).abs_().sub_(u.mul_(1 + PSD_RTOL)).max()))
    return asym, excess


def add_factor_gram(S: Tensor, R: Tensor, alpha: float = 1.0, block: int = 256) -> None:
    """S += alpha · RᵀR on S's upper triangle (and diagonal) only, for an upper-trapezoidal R [k, d].

    By column blocks: rows at or past a block's end are zero in its columns, so each block multiplies only the
    rows above, straight into S (no d × d temporary): about a quarter of the work of R.T @ R at d = 1280 (18 ms
    on one thread). Only S's upper triangle is meaningful afterwards (diagonal blocks are written whole, the rest
    of the lower triangle not at all); callers that need the whole matrix mirror it (`symmetric_from_upper`). A
    float32 R is widened block by block, so the products are float64 (RᵀR of the values as sent).
    """
    k, d = R.shape
    for j in range(0, d, block):
        end = min(j + block, d)
        rows = min(end, k)
        if rows == 0:
            break
        left = R[:rows, j:end].to(S.dtype)
        right = R[:rows, j:].to(S.dtype)
        S[j:end, j:].addmm_(left.T, right, alpha=alpha)


def symmetric_from_upper(U: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle (with the diagonal) is U's; U's lower triangle is ignored."""
    return torch.triu(U) + torch.triu(U, 1).T


def factor_gram(R: Tensor) -> Tensor:
    """Dense RᵀR (R's dtype, exactly symmetric) for an upper-trapezoidal R [k, d]."""
    G = torch.zeros(R.shape[1], R.shape[1], dtype=R.dtype)
    add_factor_gram(G, R)
    return symmetric_from_upper(G)


def check_psd(G: torch.Tensor, what: str) -> None:
    """XᵀX is positive semidefinite: G plus a shift far below the solve's ridge λ must have a Cholesky factor."""
    d = G.shape[0]
    if d == 0:
        return
    Gd = G.double()
    shift = PSD_SHIFT * max(float(Gd.diagonal().sum()) / d, 0.0) + 1e-300
    _, info = torch.linalg.cholesky_ex(Gd + shift * torch.eye(d, dtype=torch.float64))
    if int(info) != 0:
        raise ValueError(f"{what}: not positive semidefinite (a negative eigenvalue beyond rounding); not XᵀX")
