"""Closed-form gradient fusion of LoRA concepts: the pure math (torch only, float64).

Problem
-------
Take one LoRA'd linear layer with base weight W0 (d_out x d_in). Concept i brings a delta
dW_i = B_i A_i (B_i: d_out x r_i, A_i: r_i x d_in, LoRA scale already folded into B_i) and
the Gram G_i = X_i^T X_i (d_in x d_in) of the input rows X_i that the layer saw for concept i.
Mix-of-Show's gradient fusion looks for one weight that reproduces every concept's outputs
on that concept's own inputs:

    W* = argmin_W  sum_i ||(W - W0 - dW_i) X_i^T||_F^2  =  argmin_W  sum_i tr((W - W_i) G_i (W - W_i)^T)

Every input row counts once, so a concept that brings more rows weighs more, as in the
reference, which stacks all rows into one mean-squared error.

Derivation
----------
The gradient is 2 sum_i (W - W_i) G_i. Setting it to zero and writing dW = W - W0:

    dW * SG = sum_i dW_i G_i =: P,        SG = sum_i G_i.

W0 cancels, so the server never needs base weights. Rows of dW_i G_i lie in range(G_i), which is
inside range(SG) because every G_i is PSD, so the system is always consistent. When SG is
singular (fewer input rows than d_in) the natural pick is the minimum-norm solution P SG^+:
it changes W0 only along directions some concept's inputs visit, and it is where the reference
implementation's LBFGS started from W0 heads (its gradient steps never leave W0 + rows in
range(SG)). We solve the ridge form

    dW* = P (SG + lam I)^-1,      lam = eps * tr(SG) / d_in   (eps * the mean eigenvalue of SG),

which tends to that minimum-norm solution as eps -> 0 and keeps the matrix positive definite,
so a Cholesky factorisation applies; one factorisation serves every layer reading the same
input ("input site", e.g. attn1 to_q/to_k/to_v).

Why DEFAULT_EPS = 1e-8. Ridge scales the solution along an eigen-direction of SG with
eigenvalue mu by mu / (mu + lam), so a concept's outputs are reproduced to about lam / mu.
Activation Grams are heavy-tailed (a few outlier channels dominate tr(SG)), so typical
directions sit orders of magnitude below the mean eigenvalue; eps = 1e-8 still keeps those down
to 1e-5 of the mean within 0.1%, and on well-spread inputs the error is ~1e-8. The floor below
is numerical: Cholesky pivots are trustworthy only above ~d * u * max(diag) (u = 2.2e-16, the
float64 epsilon), and lam >= eps * max(diag) / d, so eps must stay well above d^2 * u (3.6e-10
at d_in = 1280; 1e-8 leaves a ~30x margin even when one channel holds all the energy). The price
of a small lam is that rounding in the components of
A_i G_i outside range(SG) (exactly zero in exact arithmetic) is amplified by about
u * mu_max / lam <= u * d / eps (2.8e-5 relative at d = 1280): a change only on inputs that no
concept ever showed the layer, far below fp16 inference noise. eps = 0 asks for the exact
minimum-norm solution; the singular system then takes the eigh path described in _factor.

Gram precision. Grams accumulated or shipped in float32 carry rounding noise of 1e-6 to 4e-6
of the mean eigenvalue (measured on the benchmark's data), well above lam. Where SG is rank-deficient
(few input rows, few concepts) that makes SG + lam I slightly indefinite, Cholesky fails, and
the eigh fallback runs: it takes the size of the most negative eigenvalue as the noise floor
and gives no update along directions below it. The result is sound either way; float64 Grams
keep the faster Cholesky path. SiteSolution.path reports which one ran.

A factored Gram (G = R^T R, the wire's default) enters SG as R^T R formed block by block
(gram.add_factor_gram): d^3/6 multiply-adds per full-rank site, the largest part of the server's intake
(~0.6 s per SD1.5 concept on one core in float64, exact for a float32 R). SiteSums(factor_products=
float32) forms them in float32, twice as fast, rounding each entry to ~1e-7 of its scale; the sums stay
float64. Measured on the scale benchmark's Grams (10 concepts, d = 320/768/1280): the fused dW on the
concepts' inputs moves by ~2e-6 relative at eps = 1e-2 (shipping R in float32 itself: ~1e-7) and by
~6e-5 at eps = 1e-4, far below the resolution of fp16 weights (~5e-4); at GCV's small lam it would not
be, so the driver (driver.py) asks for float32 products only with a fixed eps of at least 1e-3.

Choosing lam per site: generalized cross-validation (eps=None)
--------------------------------------------------------------
A fixed eps cannot suit every site: how much the concepts conflict on an input direction, and how
many rows back it, differ from site to site and base to base. The problem above is ridge regression
of stacked targets y = x dW_i^T on stacked rows x (n = sum_i rows_i of them), so the standard
choice of its penalty, GCV (Golub, Heath & Wahba 1979: the rotation-invariant form of leave-one-row-
out error), applies, and it needs only what the server holds. With SG = V diag(mu) V^T, S = V^T P^T
(s_j = ||P v_j||^2, summed over the layers of the site) and dW(lam) = P (SG + lam I)^-1:

    RSS(lam) = sum_i tr((dW - dW_i) G_i (dW - dW_i)^T)
             = C - sum_j s_j (mu_j + 2 lam) / (mu_j + lam)^2,      C = sum_i tr(dW_i G_i dW_i^T),
    df(lam)  = tr(SG (SG + lam I)^-1) = sum_j mu_j / (mu_j + lam),
    GCV(lam) = RSS(lam) / (1 - df(lam) / n)^2.

(Expand the square: tr(dW SG dW^T) - 2 tr(dW P^T) + C, then rotate into the eigenbasis.) C is the
sum of the per-term `energy` tr(B_i A_i G_i A_i^T B_i^T), recorded when a concept is added; s_j costs
R d^2 for the eigenbasis products that the solve needs anyway. One eigh per site (about 8x a
Cholesky; 0.3 s at d = 1280 on one core) gives GCV on a grid of eps = lam / mean(mu) from 1e-8 (the
numerical floor above) to 10, four points a decade, and the solve at the minimum. Directions below
the Grams' rounding noise get no update, as on the eigh fallback. GCV's n assumes independent rows.
Real rows are tokens of a few prompts and steps of a few sampling trajectories, so it sees little
overfitting there and picks lam near the floor; it also cannot see a later trajectory visiting
other inputs. That is why GCV is opt-in; the product's defaults (config.py) are a fixed eps, and on the toy bases
lam chosen per spatial site on held-out rows (next section).

Choosing lam per site on held-out rows (heldout=...)
-----------------------------------------------------
The rows GCV would need to be independent can be made so: each concept also records a held-out share, rows
from sampling trajectories of other seeds (stages.py), summed into a second Gram H_i that the fit never sees.
The lam kept is the one whose fused layer best reproduces every concept's outputs on those fresh rows:

    HO(lam) = sum_i tr((dW(lam) - dW_i) H_i (dW(lam) - dW_i)^T)
            = f^T K f - 2 c^T f + const,       f_j = 1 / (mu_j + lam),

with, per layer l (B_l = [B_1 ... B_n], Q_l = (A G)_l V the fit's terms in SG's eigenbasis, and the held-out
sums SH = sum_i H_i, M_l = sum_i B_i A_i H_i):

    K = sum_l (Q_l^T B_l^T B_l Q_l) o (V^T SH V)           (o: elementwise),
    c_j = sum_l (V^T M_l^T B_l Q_l)_jj.

(Rotate dW(lam) = B_l Q_l diag(f) V^T into the trace and collect terms.) The server needs only the held-out
sums SH and the terms B_i, A_i H_i: a second SiteSums of the same shape as the first. One eigh and two d x d
products per layer, then O(d^2) per candidate lam on the grid of GCV up to eps = 1 (held-out rows come from the
parties: the cap bounds how much ridge one of them can ask for). It measures what fusion is for, outputs on
inputs the concept will meet, where a small lam that fits the recorded rows exactly extrapolates off them.

LoRA form
---------
P = sum_i B_i (A_i G_i) = [B_1 ... B_n] [A_1 G_1; ...; A_n G_n], hence dW* = B* A* exactly with

    B* = [B_1 ... B_n] (columns concatenated),   A* = [A_1 G_1; ...; A_n G_n] (SG + lam I)^-1,

a LoRA of rank R = sum_i r_i. Where R >= min(d_in, d_out) the factors would be no smaller than
the dense delta, so we form dW* and write it as B = dW*, A = I (d_in <= d_out) or B = I, A = dW*:
still exact, and every layer stays a LoRA of rank min(R, d_in, d_out).
A concept with no LoRA on a layer of the site adds its G_i to SG but nothing to P: it counts as
dW_i = 0 there and pulls the fused layer towards W0 on its inputs.

Running sums (SiteSums)
-----------------------
Per site the server keeps SG (d x d) and, per layer and concept, the small terms B_i and A_i G_i
(in memory, or spilled to files so that the server's memory does not grow with the concepts).
Concepts stream in one at a time, so the server never holds all G_i; removing a concept
subtracts its G_i (the caller supplies it again) and drops its terms, and the next solve gives
the previous result back up to float64 rounding.

Also here: the paper's weight-fusion baseline (dW = sum_i w_i dW_i, also an exact LoRA), the
per-concept residual from Grams only. Grams are checked and unpacked by gram.py.

Public API (all results float64; callers cast for storage)
----------------------------------------------------------
DEFAULT_EPS                                   ridge factor eps (see above); eps=None: lam per site by GCV
LayerTerm(B, AG, energy)                      one concept's terms for one layer; energy = tr(B A G A^T B^T) (GCV)
SiteSolution(loras, path, lam, dense, eps)    solve output: layer -> (B*, A*), "cholesky"|"eigh", lam, dense layers,
                                              eps = lam / mean eigenvalue of SG
SiteSums(name, dim, store=None, factor_products=float64)
                                              running sums of one site (.gram_sum, .rows, .concepts, .layers,
                                              .terms()); per-concept terms in a TermStore (MemoryTerms by
                                              default; spill.SpilledTerms keeps them in files); the dtype
                                              R^T R is formed in from a factor (see "Gram precision")
  .add(concept, gram, rows, loras, factor=False, checked=False)
                                              loras: layer -> (B, A); gram dense d x d or packed, or (factor=True)
                                              R [k, d] with G = R^T R, summed without forming G
  .remove(concept, gram, rows, factor=False)  gram/rows as given to add
  .solve(eps=DEFAULT_EPS, heldout=None) -> SiteSolution
                                              eps=None: GCV over .rows; heldout: a SiteSums of held-out rows
solve_site(gram_sum, terms, eps, rows, heldout=None) -> SiteSolution
                                              terms: layer -> [LayerTerm]; rows: n, for GCV; heldout: (SH, terms)
weight_fusion(loras, mode="sum"|"average") -> (B, A)
residual_parts(B_star, A_star, B_i, A_i, G_i) -> (num, den)
residual(B_star, A_star, B_i, A_i, G_i) -> float         num / den (nan if den == 0)
site_residual(fused, loras_i, G_i, factor=False) -> float  sum_layers num / sum_layers den (G_i or its factor)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from mos.shared.fusion.gram import add_factor_gram, check_gram, sq_norm, symmetric_from_upper, symmetrised, unpack_sym

__all__ = [
    "DEFAULT_EPS",
    "LayerTerm",
    "SiteSolution",
    "SiteSums",
    "TermStore",
    "MemoryTerms",
    "solve_site",
    "weight_fusion",
    "residual_parts",
    "residual",
    "site_residual",
]

DEFAULT_EPS = 1e-8
F64 = torch.float64


@dataclass(frozen=True)
class LayerTerm:
    """One concept's terms for one layer: B_i (d_out x r_i, any float dtype), A_i G_i (r_i x d_in, float64) and
    energy = tr(dW_i G_i dW_i^T), the concept's output power on its own inputs (GCV's C; nan when unknown)."""

    B: Tensor
    AG: Tensor
    energy: float = math.nan


@dataclass(frozen=True)
class SiteSolution:
    """Fused LoRAs of one site. `path` says which factorisation ran ("cholesky" or "eigh")."""

    loras: dict[str, tuple[Tensor, Tensor]]
    path: str
    lam: float
    dense: frozenset[str] = field(default_factory=frozenset)
    eps: float = math.nan  # lam / mean eigenvalue of SG: the ridge factor given, or the one GCV chose


# Work on d x d Grams in row blocks of at most this many bytes, through one scratch buffer per call.
# Whole-matrix temporaries cost a d x d allocation per concept and site; interleaved with the small
# long-lived per-concept terms they fragment glibc's heap (RSS grew by hundreds of MiB per concept at
# SD1.5 sizes). Blocks much smaller than this made intake slow: per-call overhead on tiny products.
_BLOCK_BYTES = 1024 * 1024


def _take_in(A: Tensor, G: Tensor, gram_sum: Tensor) -> Tensor:
    """gram_sum += G and return A @ G (float64), in one pass over G without a float64 copy of it whole.

    Intake at scale is bound by reading the Grams (about 300 MB per SD1.5 concept in float32), so each
    block is converted once and used for both the sum and the product.
    """
    if G.dtype == F64:
        gram_sum += G
        return A @ G
    d = G.shape[1]
    out = torch.zeros(A.shape[0], d, dtype=F64)
    step = max(1, _BLOCK_BYTES // (8 * d))
    scratch = torch.empty(min(step, G.shape[0]), d, dtype=F64)
    for r in range(0, G.shape[0], step):
        block = scratch[: min(step, G.shape[0] - r)]
        block.copy_(G[r : r + step])
        gram_sum[r : r + step] += block
        out.addmm_(A[:, r : r + step], block)
    return out


def _take_in_factor(A: Tensor, R: Tensor, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """upper += RᵀR (upper triangle only) and return A RᵀR (float64) from the same blocks of RᵀR, formed in
    `dtype` (module docstring, "Gram precision"); never forms RᵀR whole."""
    return add_factor_gram(upper, R, A=A, dtype=dtype)


def _dense_gram(gram: Tensor, dim: int, name: str, checked: bool = False) -> Tensor:
    if gram.ndim == 1:
        try:
            gram = unpack_sym(gram, dim)
        except ValueError as exc:
            raise ValueError(f"Gram for {name}: {exc}") from None
    if not checked:
        check_gram(gram, name, dim)
    return gram  # kept in its own dtype: add/remove promote it in place or blockwise, never whole


# --------------------------------------------------------------------------- factorisation


def _finite(t: Tensor) -> bool:
    """No NaN or Inf in t: min and max propagate both, in one pass without a boolean copy of t."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _factor(gram_sum: Tensor, eps: float) -> tuple[Callable[[Tensor], Tensor], str, float]:
    """Return (x -> (SG + lam I)^-1 x, path, lam), by Cholesky or, failing that, eigh."""
    if not _finite(gram_sum):
        raise ValueError("gram sum contains NaN or Inf")
    d = gram_sum.shape[0]
    if d == 0:
        return (lambda rhs: rhs), "cholesky", 0.0
    M = symmetrised(gram_sum.to(F64))  # kill asymmetric rounding from running sums
    lam = max(0.0, eps * float(torch.trace(M)) / d)
    M.diagonal().add_(lam)

    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0 and _pivots_ok(L, M):
        return (lambda rhs: torch.cholesky_solve(rhs, L)), "cholesky", lam

    # Singular or indefinite: pseudo-inverse on the trusted part of the spectrum; the other
    # directions get no update (the minimum-norm choice). A true Gram sum has no negative
    # eigenvalues, so the most negative one measures the rounding noise the Grams carry
    # (e.g. float32 accumulation); positive eigenvalues no larger than it are noise as well.
    w, V = torch.linalg.eigh(M)
    noise = max(0.0, -float(w.min()))
    tol = max(d * torch.finfo(F64).eps * float(w.abs().max()), noise)  # rounding level, noise level
    keep = w > tol
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    return (lambda rhs: V @ (inv[:, None] * (V.T @ rhs))), "eigh", lam


def _pivots_ok(L: Tensor, M: Tensor) -> bool:
    # cholesky_ex can "succeed" on a numerically singular matrix with rounding-sized pivots;
    # those would blow up the solve, so treat them as a failure.
    if M.numel() == 0:
        return True
    pivots = L.diagonal() ** 2
    floor = M.shape[0] * torch.finfo(F64).eps * float(M.diagonal().max())
    return bool(float(pivots.min()) > floor)


_GCV_EPS = torch.logspace(-8, 1, 37, dtype=F64)  # candidate lam / mean eigenvalue: 1e-8 .. 10, 4 a decade


def _spectrum(gram_sum: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """SG = V diag(w) V^T, the directions above rounding and noise (keep), and the mean eigenvalue. As in _factor's
    fallback: a Gram sum has no negative eigenvalue, so the most negative one measures the noise."""
    d = gram_sum.shape[0]
    w, V = torch.linalg.eigh(symmetrised(gram_sum.to(F64)))
    noise = max(0.0, -float(w.min()))
    keep = w > max(d * torch.finfo(F64).eps * float(w.abs().max()), noise)
    return w, V, keep, float(w.sum()) / d


def _layer_blocks(Q: Tensor, Bs: Sequence[Tensor]):
    """(B_l, Q_l) per layer: Q stacks every layer's rows in the order of Bs."""
    start = 0
    for B in Bs:
        yield B, Q[start : start + B.shape[1]]
        start += B.shape[1]


def _ridge_in_basis(Q: Tensor, V: Tensor, w: Tensor, keep: Tensor, lam: float) -> Tensor:
    """A* = Q diag(1 / (w + lam)) V^T on the kept directions; none along the others."""
    filt = torch.where(keep, 1.0 / (w + lam), torch.zeros_like(w))
    return (Q * filt) @ V.T


def _gcv(gram_sum: Tensor, AG: Tensor, Bs: Sequence[Tensor], energy: float, rows: int) -> tuple[Tensor, float, float]:
    """A* = AG (SG + lam I)^-1 at the lam minimising GCV (module docstring); returns (A*, lam, eps).

    AG stacks every layer's A_i G_i rows; Bs holds each layer's [B_1 ... B_n], in the same order.
    """
    if not _finite(gram_sum):
        raise ValueError("gram sum contains NaN or Inf")
    if rows <= 0 or not math.isfinite(energy):
        raise ValueError("choosing lam by GCV needs the row count and every term's energy")
    w, V, keep, mean = _spectrum(gram_sum)
    if mean <= 0 or not bool(keep.any()):
        return torch.zeros_like(AG), 0.0, 0.0
    Q = AG @ V  # P_l V = B_l Q_l per layer, so s_j = sum_l ||B_l Q_l[:, j]||^2 = sum_l q^T (B_l^T B_l) q
    s = torch.zeros(gram_sum.shape[0], dtype=F64)
    for B, Ql in _layer_blocks(Q, Bs):
        s += (Ql * ((B.T @ B) @ Ql)).sum(0)
    wk, sk = w[keep, None], s[keep, None]
    lams = _GCV_EPS[None, :] * mean
    f = 1.0 / (wk + lams)  # kept directions x candidates
    rss = energy - (sk * (wk + 2 * lams) * f * f).sum(0)
    # The subtraction loses ~1e-13 of C; below that RSS is rounding, and ties go to the larger lam.
    rss = rss.clamp(min=1e-12 * energy)
    df = (wk * f).sum(0)
    gcv = torch.where(df < rows, rss / (1 - df / rows) ** 2, torch.full_like(rss, math.inf))
    # No finite GCV means fewer rows than even the largest lam's df: too little data to judge, so damp the most.
    k = int(torch.argmin(gcv)) if bool(torch.isfinite(gcv).any()) else len(_GCV_EPS) - 1
    lam = float(lams[0, k])
    return _ridge_in_basis(Q, V, w, keep, lam), lam, float(_GCV_EPS[k])


# The held-out choice's candidates: GCV's grid up to eps = 1. Held-out rows come from the parties, so one of them could
# shape its rows to ask for a heavy ridge that leaves every concept's change at that site damped; the cap bounds what
# that can do (eps = 1: each direction kept at mu / (mu + mean mu) of its fit), and the world base's sites chose 0.1 at
# most.
_HELDOUT_EPS = _GCV_EPS[_GCV_EPS <= 1.0]


def _stacked(terms: Sequence[LayerTerm], d_out: int, d_in: int) -> tuple[Tensor, Tensor]:
    """([B_1 ... B_n], [A_1 G_1; ...; A_n G_n]) of one layer's terms (empty when no concept has one there)."""
    if not terms:
        return torch.zeros(d_out, 0, dtype=F64), torch.zeros(0, d_in, dtype=F64)
    return torch.cat([t.B.to(F64) for t in terms], dim=1), torch.cat([t.AG.to(F64) for t in terms], dim=0)


def _heldout(gram_sum: Tensor, AG: Tensor, Bs: Sequence[Tensor], ho_sum: Tensor,
             ho_terms: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, float, float]:
    """A* = AG (SG + lam I)^-1 at the lam minimising the held-out error HO(lam) (module docstring); (A*, lam, eps).

    AG and Bs as for _gcv; ho_terms holds each layer's ([B_1 ... B_n], [A_1 H_1; ...; A_n H_n]) of the held-out sums,
    in the same layer order.
    """
    if not (_finite(gram_sum) and _finite(ho_sum)):
        raise ValueError("gram sum contains NaN or Inf")
    w, V, keep, mean = _spectrum(gram_sum)
    if mean <= 0 or not bool(keep.any()):
        return torch.zeros_like(AG), 0.0, 0.0
    d = gram_sum.shape[0]
    Q = AG @ V
    Hv = V.T @ symmetrised(ho_sum.to(F64)) @ V
    K = torch.zeros(d, d, dtype=F64)
    c = torch.zeros(d, dtype=F64)
    for (B, Ql), (Bh, AH) in zip(_layer_blocks(Q, Bs), ho_terms):
        K += (Ql.T @ (B.T @ B) @ Ql) * Hv
        c += ((AH @ V) * ((Bh.T @ B) @ Ql)).sum(0)
    K, c = K[keep][:, keep], c[keep]
    f = 1.0 / (w[keep, None] + _HELDOUT_EPS[None, :] * mean)  # kept directions x candidates
    ho = (f * (K @ f)).sum(0) - 2 * (c[:, None] * f).sum(0)
    k = int(torch.argmin(ho))
    lam = float(_HELDOUT_EPS[k]) * mean
    return _ridge_in_basis(Q, V, w, keep, lam), lam, float(_HELDOUT_EPS[k])


# --------------------------------------------------------------------------- LoRA form


def _as_lora(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Exact LoRA of B @ A with rank <= min(d_in, d_out); flag says whether it went dense."""
    d_out, R = B.shape
    d_in = A.shape[1]
    if R < min(d_in, d_out):
        return B, A, False
    dW = B @ A
    if d_in <= d_out:
        return dW, torch.eye(d_in, dtype=dW.dtype), True
    return torch.eye(d_out, dtype=dW.dtype), dW, True


def solve_site(
    gram_sum: Tensor, terms: Mapping[str, Sequence[LayerTerm]], eps: float | None = DEFAULT_EPS, rows: int = 0,
    heldout: tuple[Tensor, Mapping[str, Sequence[LayerTerm]]] | None = None,
) -> SiteSolution:
    """Fused LoRA per layer of one input site: B* = [B_i], A* = [A_i G_i] (SG + lam I)^-1.

    lam = eps * tr(SG) / d; with `heldout` (SH and its terms B_i, A_i H_i) the lam whose fit best reproduces every
    concept on its held-out rows; with eps=None the GCV choice over `rows` input rows (module docstring).
    Layers with no terms are left out of the result (nothing to fuse).
    """
    layers = [name for name, ts in terms.items() if len(ts) > 0]
    d = gram_sum.shape[0]
    Bs = [torch.cat([t.B.to(F64) for t in terms[name]], dim=1) for name in layers]  # [B_1 ... B_n] per layer
    # every layer's A_i G_i rows stacked, in the order of Bs: one solve serves the whole site
    AG = torch.cat([t.AG.to(F64) for name in layers for t in terms[name]], dim=0) if layers else None
    if (eps is None or heldout is not None) and layers and d > 0:
        if heldout is not None:
            ho_sum, ho = heldout
            ho_terms = [_stacked(ho.get(name, []), Bs[i].shape[0], d) for i, name in enumerate(layers)]
            A_all, lam, eps = _heldout(gram_sum, AG, Bs, ho_sum, ho_terms)
        else:
            energy = sum(t.energy for name in layers for t in terms[name])
            A_all, lam, eps = _gcv(gram_sum, AG, Bs, energy, rows)
        path = "eigh"
    else:
        eps = eps or 0.0  # None with nothing to fuse: no lam to choose
        solve, path, lam = _factor(gram_sum, eps)
        if not layers:
            return SiteSolution({}, path, lam, eps=eps)
        A_all = solve(AG.T).T

    out: dict[str, tuple[Tensor, Tensor]] = {}
    dense: set[str] = set()
    for name, (B, A) in zip(layers, _layer_blocks(A_all, Bs)):
        B_out, A_out, went_dense = _as_lora(B, A.contiguous())
        out[name] = (B_out, A_out)
        if went_dense:
            dense.add(name)
    return SiteSolution(out, path, lam, frozenset(dense), eps)


class TermStore(Protocol):
    """Where a site keeps its per-concept terms until the solve: memory, or files (spill.py)."""

    def put(self, concept: str, terms: dict[str, LayerTerm]) -> None: ...
    def drop(self, concept: str) -> None: ...
    def load(self) -> dict[str, list[LayerTerm]]: ...  # layer -> terms, concepts in the order they came


class MemoryTerms:
    """The default TermStore: a dict. At SD1.5 sizes it grows by ~7 MiB per concept over all sites."""

    def __init__(self) -> None:
        self._by_concept: dict[str, dict[str, LayerTerm]] = {}

    def put(self, concept: str, terms: dict[str, LayerTerm]) -> None:
        self._by_concept[concept] = terms

    def drop(self, concept: str) -> None:
        self._by_concept.pop(concept, None)

    def load(self) -> dict[str, list[LayerTerm]]:
        out: dict[str, list[LayerTerm]] = {}
        for terms in self._by_concept.values():
            for layer, term in terms.items():
                out.setdefault(layer, []).append(term)
        return out


class SiteSums:
    """Running sums for one input site: SG and row counts in memory, per-layer per-concept terms in `store`."""

    def __init__(self, name: str, dim: int, store: TermStore | None = None, factor_products: torch.dtype = F64) -> None:
        """factor_products: the dtype RᵀR is formed in from a factor R (float32: twice as fast; module docstring,
        "Gram precision"); the sums stay float64."""
        self.name = name
        self.dim = dim
        self.factor_products = factor_products
        # SG, upper triangle and diagonal only: a factored Gram adds RᵀR there alone (a third of the work); the
        # lower triangle is not kept up to date and `gram_sum` mirrors the upper one when asked.
        self._upper = torch.zeros(dim, dim, dtype=F64)
        self.rows = 0
        self._seen: dict[str, tuple[int, float]] = {}  # concept -> (rows, tr G_i) to vet removals
        self._store: TermStore = store if store is not None else MemoryTerms()
        self._layers: dict[str, dict[str, None]] = {}  # layer -> the concepts with a term there (ordered set)
        self._out_dim: dict[str, int] = {}

    @property
    def concepts(self) -> list[str]:
        return list(self._seen)

    @property
    def gram_sum(self) -> Tensor:
        """SG (a new symmetric d x d tensor)."""
        return symmetric_from_upper(self._upper)

    @property
    def layers(self) -> list[str]:
        return [name for name, by_concept in self._layers.items() if by_concept]

    def terms(self) -> dict[str, list[LayerTerm]]:
        """layer -> every concept's LayerTerm there (read back from the store)."""
        return self._store.load()

    def add(
        self, concept: str, gram: Tensor, rows: int, loras: Mapping[str, tuple[Tensor, Tensor]], *,
        factor: bool = False, checked: bool = False,
    ) -> None:
        """Add a concept: its Gram (dense or packed; with factor=True the upper-trapezoidal R [k, d] of G = RᵀR),
        input row count, and layer -> (B, A). checked=True: the caller ran check_gram on a dense Gram already (a
        factor needs no check: RᵀR is a Gram by construction)."""
        where = f"site {self.name!r}, concept {concept!r}"
        if concept in self._seen:
            raise ValueError(f"{where}: already added")
        if rows < 0:
            raise ValueError(f"{where}: negative row count {rows}")
        if factor:
            if gram.ndim != 2 or gram.shape[1] != self.dim or gram.shape[0] > self.dim:
                raise ValueError(f"{where}: factor of shape {tuple(gram.shape)} does not fit d_in={self.dim}")
            G = gram
        else:
            G = _dense_gram(gram, self.dim, where, checked)
        # Validate everything before touching state, so a bad add leaves the sums intact.
        for layer, (B, A) in loras.items():
            self._check_lora(where, layer, B, A)
        A_all = torch.cat([A.to(F64) for _, A in loras.values()]) if loras else torch.zeros(0, self.dim, dtype=F64)
        # One pass over G for all layers of the site: the sum and every A_i G_i.
        AG = _take_in_factor(A_all, G, self._upper, self.factor_products) if factor else _take_in(A_all, G, self._upper)
        new_terms = self._terms_for(loras, AG)
        self.rows += rows
        self._seen[concept] = (rows, _trace(G, factor))
        self._store.put(concept, new_terms)
        for layer, term in new_terms.items():
            self._layers.setdefault(layer, {})[concept] = None
            self._out_dim[layer] = term.B.shape[0]

    def remove(self, concept: str, gram: Tensor, rows: int, *, factor: bool = False) -> None:
        """Undo add(concept, ...). The caller passes the same Gram (or factor) and row count again."""
        where = f"site {self.name!r}, concept {concept!r}"
        if concept not in self._seen:
            raise ValueError(f"{where}: not present")
        G = gram if factor else _dense_gram(gram, self.dim, where, checked=True)  # it was checked when added
        seen_rows, seen_trace = self._seen[concept]
        trace = _trace(G, factor)
        if rows != seen_rows or abs(trace - seen_trace) > 1e-6 * max(abs(seen_trace), 1e-300):
            raise ValueError(f"{where}: Gram/rows differ from those added (tr {trace:.6g} vs {seen_trace:.6g})")

        del self._seen[concept]
        self._store.drop(concept)
        for by_concept in self._layers.values():
            by_concept.pop(concept, None)
        if not self._seen:
            # Nothing left: reset exactly instead of carrying rounding residue forward.
            self._upper.zero_()
            self.rows = 0
        elif factor:  # the same products as when it was added, subtracted
            add_factor_gram(self._upper, G, -1.0, dtype=self.factor_products)
            self.rows -= rows
        else:
            self._upper -= G
            self.rows -= rows

    def solve(self, eps: float | None = DEFAULT_EPS, heldout: "SiteSums | None" = None) -> SiteSolution:
        """eps=None: lam by GCV; heldout: the held-out rows' sums of the same concepts, lam chosen on them (module
        docstring)."""
        if heldout is not None and sorted(heldout.concepts) != sorted(self.concepts):
            raise ValueError(f"site {self.name!r}: held-out rows from {sorted(heldout.concepts)}, fit rows from "
                             f"{sorted(self.concepts)}")
        ho = (heldout.gram_sum, heldout.terms()) if heldout is not None else None
        return solve_site(self.gram_sum, self.terms(), eps, self.rows, ho)

    def _check_lora(self, where: str, layer: str, B: Tensor, A: Tensor) -> None:
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or A.shape[1] != self.dim:
            raise ValueError(
                f"{where}, layer {layer!r}: LoRA shapes B{tuple(B.shape)} A{tuple(A.shape)} "
                f"do not fit d_in={self.dim}"
            )
        if layer in self._out_dim and self._layers.get(layer) and B.shape[0] != self._out_dim[layer]:
            raise ValueError(f"{where}, layer {layer!r}: d_out {B.shape[0]} != {self._out_dim[layer]}")
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise ValueError(f"{where}, layer {layer!r}: LoRA contains NaN or Inf")

    @staticmethod
    def _terms_for(loras: Mapping[str, tuple[Tensor, Tensor]], AG: Tensor) -> dict[str, LayerTerm]:
        """Split the stacked A_i G_i by layer and attach each layer's B_i and energy."""
        terms, start = {}, 0
        for layer, (B, A) in loras.items():
            # B stays in its incoming dtype (upcast at solve time, losslessly): about half the
            # per-concept memory. A_i G_i is kept in float64.
            AGl = AG[start : start + A.shape[0]].clone()
            start += A.shape[0]
            B64 = B.to(F64)
            energy = float(((B64.T @ B64) * (AGl @ A.to(F64).T)).sum())  # tr(B A G A^T B^T), r x r work
            terms[layer] = LayerTerm(B=B.detach().clone(), AG=AGl, energy=energy)
        return terms


def _trace(G: Tensor, factor: bool) -> float:
    """tr(G) of a dense Gram, or of RᵀR given R (= ‖R‖², accumulated in float64)."""
    return sq_norm(G) if factor else float(G.diagonal().sum(dtype=F64))


# --------------------------------------------------------------------------- baseline


def weight_fusion(loras: Sequence[tuple[Tensor, Tensor]], mode: str = "sum") -> tuple[Tensor, Tensor]:
    """Paper's baseline: dW = sum_i w_i B_i A_i, w_i = 1 ("sum") or 1/n ("average"), as a LoRA."""
    if mode not in ("sum", "average"):
        raise ValueError(f"weight_fusion mode must be 'sum' or 'average', got {mode!r}")
    if not loras:
        raise ValueError("weight_fusion needs at least one LoRA")
    for i, (B, A) in enumerate(loras):
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"weight_fusion: LoRA {i} has B{tuple(B.shape)} A{tuple(A.shape)}")
    w = 1.0 if mode == "sum" else 1.0 / len(loras)
    B = torch.cat([w * B.to(F64) for B, _ in loras], dim=1)
    A = torch.cat([A.to(F64) for _, A in loras], dim=0)
    B_out, A_out, _ = _as_lora(B, A)
    return B_out, A_out


# --------------------------------------------------------------------------- residuals


def _quad_trace(U: Tensor, V: Tensor, G: Tensor, factor: bool = False) -> float:
    """tr(U V G V^T U^T) without forming U V when the rank is small; factor=True: G is given as R, G = R^T R."""
    k = U.shape[1]
    if k == 0:
        return 0.0
    if k < min(U.shape[0], V.shape[1]):
        if factor:
            VR = V @ G.T
            return float(((U.T @ U) * (VR @ VR.T)).sum())
        return float(((U.T @ U) * (V @ G @ V.T)).sum())
    D = U @ V
    if factor:
        return float((D @ G.T).square().sum())
    return float(((D @ G) * D).sum())


def residual_parts(
    B_star: Tensor, A_star: Tensor, B_i: Tensor | None, A_i: Tensor | None, G_i: Tensor, factor: bool = False
) -> tuple[float, float]:
    """(tr((dW* - dW_i) G_i (dW* - dW_i)^T), tr(dW_i G_i dW_i^T)); B_i = A_i = None means dW_i = 0.
    factor=True: G_i is given as its factor R (G_i = R^T R)."""
    G = G_i.to(F64)
    Bs, As = B_star.to(F64), A_star.to(F64)
    if B_i is None or A_i is None:
        return max(_quad_trace(Bs, As, G, factor), 0.0), 0.0
    Bi, Ai = B_i.to(F64), A_i.to(F64)
    num = _quad_trace(torch.cat([Bs, -Bi], dim=1), torch.cat([As, Ai], dim=0), G, factor)
    den = _quad_trace(Bi, Ai, G, factor)
    return max(num, 0.0), max(den, 0.0)  # tiny negatives are rounding


def residual(B_star: Tensor, A_star: Tensor, B_i: Tensor | None, A_i: Tensor | None, G_i: Tensor) -> float:
    """Relative error of the fused layer on concept i's inputs; nan when dW_i G_i dW_i^T = 0."""
    num, den = residual_parts(B_star, A_star, B_i, A_i, G_i)
    return num / den if den > 0 else float("nan")


def site_residual(
    fused: SiteSolution | Mapping[str, tuple[Tensor, Tensor]],
    loras_i: Mapping[str, tuple[Tensor, Tensor]],
    G_i: Tensor,
    factor: bool = False,
) -> float:
    """Concept i's relative error over all fused layers of a site (layers it lacks count as dW_i = 0).
    factor=True: G_i is given as its factor R (G_i = R^T R), which is never formed."""
    layers = fused.loras if isinstance(fused, SiteSolution) else fused
    G = unpack_sym(G_i) if G_i.ndim == 1 and not factor else G_i
    num = den = 0.0
    for name, (Bs, As) in layers.items():
        Bi, Ai = loras_i.get(name, (None, None))
        n, d = residual_parts(Bs, As, Bi, Ai, G, factor)
        num += n
        den += d
    return num / den if den > 0 else float("nan")
