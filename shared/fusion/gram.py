"""A Gram matrix G = XᵀX as data: its packed-symmetric form, and the one check that it is plausibly XᵀX.

A Gram that arrives dense (a local `mos fuse`, or float64 packed on the wire) passes `check_gram` and `check_psd`
once, in Fusion.check_stats (or SiteSums.add when called directly):
square, of the site's size, finite, symmetric, with a non-negative diagonal and |G_ij| <= sqrt(G_ii G_jj)
(necessary conditions of positive semidefiniteness that cost one pass). The checks run tile by tile: at SD1.5
sizes a whole-matrix temporary per concept and site fragments the heap (RSS grew by hundreds of MiB per concept).

A Gram that arrives as its triangular factor R (the wire's default) is never formed densely on the server: RᵀR is
symmetric and positive semidefinite by construction, so neither check applies, and `add_factor_gram` adds it to a
running sum directly (stats.FactorGram). Factors travel and are stored as their packed upper trapezoid
(`pack_trapezoid`), half the bytes of R whole.
"""

from __future__ import annotations

import math

import numpy as np
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


def trapezoid_len(k: int, d: int) -> int:
    """Values of an upper-trapezoidal k x d matrix (row i holds columns i..d-1)."""
    return k * d - k * (k - 1) // 2


def pack_trapezoid(R: Tensor) -> Tensor:
    """The upper trapezoid of R [k, d] (k <= d), row by row, as a 1-D tensor (the wire's and the state's form).

    Row slices through numpy: a k-step loop of contiguous copies is 3-7x faster than gathering through
    triu_indices (which builds two int64 index tensors of k·d/2 each call) at d = 1280.
    """
    k, d = R.shape
    if k > d:
        raise ValueError(f"an upper-trapezoidal factor has at most as many rows as columns, got {tuple(R.shape)}")
    Rn = R.detach().cpu().contiguous().numpy()
    if k == 0:
        return torch.zeros(0, dtype=R.dtype)
    return torch.from_numpy(np.concatenate([Rn[i, i:] for i in range(k)]))


def unpack_trapezoid(t: Tensor, k: int, d: int) -> Tensor:
    """Inverse of pack_trapezoid: R [k, d] with zeros below the diagonal (t's dtype, a new tensor)."""
    if t.ndim != 1 or t.shape[0] != trapezoid_len(k, d) or not 0 <= k <= d:
        raise ValueError(f"a {k} x {d} trapezoid has {trapezoid_len(k, d)} values, got shape {tuple(t.shape)}")
    R = torch.empty(k, d, dtype=t.dtype)  # every entry written once below: no zero-fill first
    Rn, tn = R.numpy(), t.detach().cpu().contiguous().numpy()
    start = 0
    for i in range(k):
        Rn[i, :i] = 0
        Rn[i, i:] = tn[start : start + d - i]
        start += d - i
    return R


def sq_norm(t: Tensor, chunk: int = 65536) -> float:
    """‖t‖² accumulated in float64, widened a chunk at a time (no float64 copy of t whole: at SD1.5 sizes a fresh
    copy per Gram cost more than the sum; torch.linalg.vector_norm(dtype=float64) ran 3x slower)."""
    v = t.reshape(-1)
    if v.dtype == torch.float64:
        return float(torch.dot(v, v))
    scratch = torch.empty(min(chunk, v.numel()), dtype=torch.float64)
    total = 0.0
    for i in range(0, v.numel(), chunk):
        c = scratch[: min(chunk, v.numel() - i)].copy_(v[i : i + chunk])
        total += float(torch.dot(c, c))
    return total


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


def add_factor_gram(S: Tensor, R: Tensor, alpha: float = 1.0, block: int = 128, A: Tensor | None = None,
                    dtype: torch.dtype | None = None) -> Tensor | None:
    """S += alpha · RᵀR on S's upper triangle (and diagonal) only, for an upper-trapezoidal R [k, d]; with A [r, d]
    also return A RᵀR (float64) from the same blocks of RᵀR, never forming RᵀR whole.

    By row blocks of RᵀR: rows of R at or past a block's end are zero in its columns, so block j is
    R[:end, j:end]ᵀ R[:end, j:] (about a quarter of the work of R.T @ R at d = 1280 with 128-wide blocks). Only
    S's upper triangle is meaningful afterwards (diagonal blocks are written whole, the rest of the lower triangle
    not at all); callers that need the whole matrix mirror it (`symmetric_from_upper`). The products are formed in
    `dtype` (default S's) and added into S: float32 products of a float32 R run twice as fast as float64 ones and
    round each entry of RᵀR to about 1e-7 of its row and column scale (solver.py, "Gram precision", says when the
    fusion uses them). A RᵀR uses every block twice, as G is symmetric: block j holds G[j:end, j:], which gives
    A[:, j:end] G[j:end, j:] and, mirrored, A[:, end:] G[end:, j:end].
    """
    k, d = R.shape
    dtype = dtype or S.dtype
    R = R.to(dtype)  # once, not block by block
    AG = None if A is None else torch.zeros(A.shape[0], d, dtype=torch.float64)
    A64 = None if A is None else A.to(torch.float64)
    scratch = torch.empty(block * d, dtype=dtype)  # one block of RᵀR at a time, reused
    # ... and widened to S's dtype before it is added: an in-place add across dtypes ran at a third of the speed
    wide = None if dtype == S.dtype else torch.empty(block * d, dtype=S.dtype)
    for j in range(0, d, block):
        end = min(j + block, d)
        rows = min(end, k)
        if rows == 0:
            break
        P = scratch[: (end - j) * (d - j)].view(end - j, d - j)
        torch.mm(R[:rows, j:end].T, R[:rows, j:], out=P)
        P = P if wide is None else wide[: P.numel()].view_as(P).copy_(P)
        S[j:end, j:].add_(P, alpha=alpha)
        if AG is not None:
            P64 = P.to(torch.float64)  # a no-op for float64 sums, as the server keeps
            AG[:, j:].addmm_(A64[:, j:end], P64)
            AG[:, j:end].addmm_(A64[:, end:], P64[:, end - j :].T)
    return AG


def symmetric_from_upper(U: Tensor, block: int = 128) -> Tensor:
    """The symmetric matrix whose upper triangle (with the diagonal) is U's; U's lower triangle is ignored.

    By row panels of the upper triangle, each copied into place and, transposed, into the column panel below
    (torch.triu(U) + torch.triu(U, 1).T sweeps U transposed whole: ~10x slower at d = 1280)."""
    d = U.shape[0]
    M = torch.empty_like(U)
    for i in range(0, d, block):
        panel = U[i : i + block, i:]
        M[i : i + block, i:] = panel
        M[i:, i : i + block] = panel.T
        M[i : i + block, i : i + block] = torch.triu(panel[:, :block]) + torch.triu(panel[:, :block], 1).T
    return M


def symmetrised(G: Tensor, block: int = 128) -> Tensor:
    """(G + Gᵀ) / 2 as a new tensor, by tiles (a whole transposed sweep is slow; see symmetric_from_upper)."""
    d = G.shape[0]
    M = torch.empty_like(G)
    for i in range(0, d, block):
        for j in range(i, d, block):
            a, b = G[i : i + block, j : j + block], G[j : j + block, i : i + block]
            t = (a + b.T).mul_(0.5)
            M[i : i + block, j : j + block] = t
            M[j : j + block, i : i + block] = t.T
    return M


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
