"""Checks of the closed-form gradient-fusion math in mos.shared.fusion.solver (CPU, float64, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from mos.shared.fusion.gram import check_gram, pack_sym, unpack_sym
from mos.shared.fusion.solver import (
    DEFAULT_EPS,
    LayerTerm,
    SiteSums,
    residual,
    residual_parts,
    site_residual,
    solve_site,
    weight_fusion,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora(d_out: int, d_in: int, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(d_out, r, generator=g, dtype=F64), torch.randn(r, d_in, generator=g, dtype=F64)


def rows(n: int, d_in: int, g: torch.Generator, basis: torch.Tensor | None = None) -> torch.Tensor:
    """n input rows; inside span(basis rows) when given."""
    if basis is None:
        return torch.randn(n, d_in, generator=g, dtype=F64)
    return torch.randn(n, basis.shape[0], generator=g, dtype=F64) @ basis


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def fuse(xs, loras, eps=DEFAULT_EPS, layer="L"):
    """Closed-form fused dense delta for one layer from explicit inputs."""
    G = sum(x.T @ x for x in xs)
    terms = {layer: [LayerTerm(B, A @ (x.T @ x)) for x, (B, A) in zip(xs, loras)]}
    sol = solve_site(G, terms, eps)
    B, A = sol.loras[layer]
    return B @ A, sol


def lstsq_reference(xs, loras, lam: float, driver: str = "gelsd") -> torch.Tensor:
    """argmin_dW sum_i ||(dW - dW_i) X_i^T||^2 + lam ||dW||^2 via lstsq on the stacked system."""
    X = torch.cat(xs)
    Y = torch.cat([x @ (B @ A).T for x, (B, A) in zip(xs, loras)])
    d_in, d_out = X.shape[1], Y.shape[1]
    if lam > 0:
        X = torch.cat([X, math.sqrt(lam) * torch.eye(d_in, dtype=F64)])
        Y = torch.cat([Y, torch.zeros(d_in, d_out, dtype=F64)])
    return torch.linalg.lstsq(X, Y, driver=driver).solution.T


def default_lam(xs, eps=DEFAULT_EPS) -> float:
    G = sum(x.T @ x for x in xs)
    return eps * float(torch.trace(G)) / G.shape[0]


# --------------------------------------------------------------------------- against lstsq


def test_matches_lstsq_overdetermined():
    g = gen(0)
    d_in, d_out = 24, 16
    xs = [rows(n, d_in, g) for n in (40, 30, 20)]
    loras = [lora(d_out, d_in, 2, g) for _ in xs]
    dW, sol = fuse(xs, loras)
    assert sol.path == "cholesky"
    assert rel(dW, lstsq_reference(xs, loras, default_lam(xs))) < 1e-8


def test_matches_lstsq_underdetermined_ridge_and_min_norm():
    g = gen(1)
    d_in, d_out = 40, 10
    xs = [rows(8, d_in, g), rows(7, d_in, g)]  # 15 rows < d_in: SG singular
    loras = [lora(d_out, d_in, 3, g) for _ in xs]
    # Ridge: the components outside range(SG) are rounding amplified by ~u * mu_max / lam, so
    # compare at a ridge where that sits below the 1e-8 tolerance.
    dW, sol = fuse(xs, loras, eps=1e-6)
    assert sol.path == "cholesky"
    assert rel(dW, lstsq_reference(xs, loras, default_lam(xs, 1e-6))) < 1e-8
    # eps = 0: the minimum-norm least-squares solution (what LBFGS from W0 heads for).
    dW0, sol0 = fuse(xs, loras, eps=0.0)
    assert sol0.path == "eigh"
    assert rel(dW0, lstsq_reference(xs, loras, 0.0, driver="gelsd")) < 1e-8


# --------------------------------------------------------------------------- reproduction


@pytest.mark.parametrize("n_rows", [100, 10])  # full-rank and rank-deficient inputs
def test_single_concept_reproduced_on_its_inputs(n_rows):
    g = gen(2)
    d_in, d_out = 32, 20
    x = rows(n_rows, d_in, g)
    B, A = lora(d_out, d_in, 4, g)
    dW, _ = fuse([x], [(B, A)])
    target = x @ (B @ A).T
    assert rel(x @ dW.T, target) <= 1e-6
    sol = solve_site(x.T @ x, {"L": [LayerTerm(B, A @ x.T @ x)]})
    assert residual(*sol.loras["L"], B, A, x.T @ x) <= 1e-12


def test_orthogonal_input_subspaces_both_reproduced():
    g = gen(3)
    d_in, d_out = 30, 12
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))
    x1 = rows(40, d_in, g, basis=Q[:, :10].T)
    x2 = rows(40, d_in, g, basis=Q[:, 10:22].T)  # 8 directions unseen by anyone
    loras = [lora(d_out, d_in, 3, g), lora(d_out, d_in, 3, g)]
    for eps, tol in ((0.0, 1e-20), (DEFAULT_EPS, 1e-9)):
        dW, _ = fuse([x1, x2], loras, eps=eps)
        for x, (B, A) in zip((x1, x2), loras):
            err = rel(x @ dW.T, x @ (B @ A).T)
            assert err**2 <= tol, (eps, err)
    # and a non-orthogonal pair genuinely conflicts, so the check above has teeth
    x3 = rows(40, d_in, g)
    dW, _ = fuse([x1, x3], loras)
    assert rel(x1 @ dW.T, x1 @ (loras[0][0] @ loras[0][1]).T) > 1e-3


# --------------------------------------------------------------------------- LoRA form


def dense_solve(xs, loras, eps=DEFAULT_EPS) -> torch.Tensor:
    G = sum(x.T @ x for x in xs)
    P = sum((B @ A) @ (x.T @ x) for x, (B, A) in zip(xs, loras))
    M = G + default_lam(xs, eps) * torch.eye(G.shape[0], dtype=F64)
    return torch.linalg.solve(M, P.T).T  # M symmetric: P M^-1 = (M^-1 P^T)^T


def test_low_rank_output_equals_dense_solve():
    g = gen(4)
    d_in, d_out = 48, 36
    xs = [rows(60, d_in, g) for _ in range(3)]
    loras = [lora(d_out, d_in, 4, g) for _ in xs]
    dW, sol = fuse(xs, loras)
    B, A = sol.loras["L"]
    assert B.shape == (d_out, 12) and A.shape == (12, d_in) and not sol.dense
    assert rel(dW, dense_solve(xs, loras)) < 1e-10


@pytest.mark.parametrize("d_in,d_out", [(12, 20), (20, 12)])
@pytest.mark.parametrize("n", [3, 4])  # sum r = 12 == min(d_in, d_out) and 16 > it
def test_dense_path_when_rank_reaches_min_dim_is_exact(d_in, d_out, n):
    g = gen(5)
    xs = [rows(30, d_in, g) for _ in range(n)]
    loras = [lora(d_out, d_in, 4, g) for _ in xs]
    dW, sol = fuse(xs, loras)
    B, A = sol.loras["L"]
    assert "L" in sol.dense
    assert B.shape[1] == A.shape[0] == min(d_in, d_out)
    eye = torch.eye(min(d_in, d_out), dtype=F64)
    assert torch.equal(A if d_in <= d_out else B, eye)
    assert rel(dW, dense_solve(xs, loras)) < 1e-10


# --------------------------------------------------------------------------- running sums


def make_site(g, layers, d, concepts, n_rows=50, r=2):
    site = SiteSums("blk.attn1", d)
    data = {}
    for c in concepts:
        x = rows(n_rows, d, g)
        lo = {name: lora(d_out, d, r, g) for name, d_out in layers.items()}
        site.add(c, x.T @ x, n_rows, lo)
        data[c] = (x, lo)
    return site, data


def products(sol):
    return {k: B @ A for k, (B, A) in sol.loras.items()}


def test_shared_site_equals_per_layer_solves_and_missing_layer_is_zero_delta():
    g = gen(6)
    d = 20
    layers = {"to_q": 20, "to_k": 20, "to_v": 16}
    site, data = make_site(g, layers, d, ["a", "b"])
    # concept c lacks to_v: must equal giving it an explicit zero LoRA there
    xc = rows(50, d, g)
    lo_c = {"to_q": lora(20, d, 2, g), "to_k": lora(20, d, 2, g)}
    site.add("c", pack_sym(xc.T @ xc), 50, lo_c)  # packed Gram accepted too
    sol = site.solve()
    assert sol.path == "cholesky" and set(sol.loras) == set(layers)

    xs = [data["a"][0], data["b"][0], xc]
    for name in layers:
        los = [data["a"][1][name], data["b"][1][name]]
        los.append(lo_c.get(name, (torch.zeros(layers[name], 1, dtype=F64), torch.zeros(1, d, dtype=F64))))
        ref, _ = fuse(xs, los, layer=name)
        assert rel(products(sol)[name], ref) < 1e-12
    assert site.rows == 150 and site.concepts == ["a", "b", "c"]


def test_add_then_remove_gives_previous_result():
    g = gen(7)
    d = 24
    layers = {"to_q": 24, "to_k": 24}
    site, _ = make_site(g, layers, d, ["a", "b"])
    before = products(site.solve())

    x = 10.0 * rows(80, d, g)  # a loud concept, so a wrong removal would show
    site.add("c", x.T @ x, 80, {"to_q": lora(24, d, 3, g)})
    during = products(site.solve())
    assert rel(during["to_q"], before["to_q"]) > 1e-2
    with pytest.raises(ValueError, match="differ"):
        site.remove("c", 2 * x.T @ x, 80)
    site.remove("c", x.T @ x, 80)
    after = products(site.solve())
    for name in layers:
        assert rel(after[name], before[name]) < 1e-12
    assert site.concepts == ["a", "b"] and site.rows == 100


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_factored_grams_sum_like_dense_ones_and_come_out_again(dtype):
    """R (float32, as the wire sends it) instead of RᵀR: float64 products agree with the dense Gram to rounding,
    float32 ones (what the driver uses at a fixed ε >= 1e-3) to float32's level; removal takes the same products
    out again."""
    g = gen(11)
    d, layers = 40, {"to_q": 40, "to_k": 24}
    xs = {c: rows(60, d, g) for c in "abc"}
    los = {c: {name: lora(o, d, 2, g) for name, o in layers.items()} for c in "abc"}
    dense, factored = SiteSums("s", d), SiteSums("s", d, factor_products=dtype)
    for c in "ab":
        dense.add(c, xs[c].T @ xs[c], 60, los[c])
        R = torch.linalg.qr(xs[c].float(), mode="r").R  # RᵀR = XᵀX up to float32 rounding
        factored.add(c, R, 60, los[c], factor=True)
    want, got = products(dense.solve(1e-2)), products(factored.solve(1e-2))
    for name in layers:
        assert rel(got[name], want[name]) < 2e-6  # ~2e-7 with either products: R itself is float32 here
    before = factored.solve(1e-2)
    Rc = torch.linalg.qr(10.0 * xs["c"].float(), mode="r").R
    factored.add("c", Rc, 60, los["c"], factor=True)
    factored.remove("c", Rc, 60, factor=True)
    for name in layers:
        assert rel(products(factored.solve(1e-2))[name], products(before)[name]) < 1e-12


def test_removing_everything_resets_exactly():
    g = gen(8)
    site, data = make_site(g, {"to_out.0": 16}, 16, ["a"])
    x, _ = data["a"]
    site.remove("a", x.T @ x, 50)
    assert torch.count_nonzero(site.gram_sum) == 0 and site.rows == 0
    assert site.solve().loras == {} and site.layers == []


def test_bad_add_is_rejected_and_leaves_state_intact():
    g = gen(9)
    site, _ = make_site(g, {"to_q": 16}, 16, ["a"])
    before = site.gram_sum.clone()
    x = rows(20, 16, g)
    with pytest.raises(ValueError, match="blk.attn1.*'b'.*to_q"):
        site.add("b", x.T @ x, 20, {"to_q": lora(16, 15, 2, g)})  # wrong d_in
    with pytest.raises(ValueError, match="already added"):
        site.add("a", x.T @ x, 20, {})
    assert torch.equal(site.gram_sum, before) and site.concepts == ["a"]


# --------------------------------------------------------------------------- fallback


def test_zero_gram_without_ridge_falls_back_and_changes_nothing():
    g = gen(10)
    B, A = lora(8, 6, 2, g)
    Z = torch.zeros(6, 6, dtype=F64)
    sol = solve_site(Z, {"L": [LayerTerm(B, A @ Z)]}, eps=0.0)
    assert sol.path == "eigh" and sol.lam == 0.0
    assert torch.count_nonzero(sol.loras["L"][0] @ sol.loras["L"][1]) == 0


def test_indefinite_gram_falls_back_to_positive_pseudo_inverse():
    g = gen(11)
    d = 6
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    # The most negative eigenvalue (-0.2) is the noise floor: 0.1 lies below it and is dropped.
    w = torch.tensor([3.0, 2.0, 1.0, 0.1, -0.05, -0.2], dtype=F64)
    S = Q @ torch.diag(w) @ Q.T
    AG = torch.randn(2, d, generator=g, dtype=F64)
    B = torch.randn(5, 2, generator=g, dtype=F64)
    sol = solve_site(S, {"L": [LayerTerm(B, AG)]}, eps=0.0)
    assert sol.path == "eigh"
    inv = torch.where(w > 0.2, 1.0 / w, torch.zeros_like(w))
    expect = B @ AG @ (Q @ torch.diag(inv) @ Q.T)
    got = sol.loras["L"][0] @ sol.loras["L"][1]
    assert rel(got, expect) < 1e-12


def test_numerically_singular_but_cholesky_passing_is_caught():
    # Singular up to rounding, yet Cholesky "succeeds" with a 2-ulp pivot; the pivot check must
    # send it to the eigh path instead of dividing by rounding noise.
    u = torch.finfo(F64).eps
    S = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0 + 2 * u, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    assert int(torch.linalg.cholesky_ex(S).info) == 0  # precondition: Cholesky alone would pass
    AG = torch.tensor([[1.0, -1.0, 0.5]], dtype=F64)  # mostly along the near-null direction
    sol = solve_site(S, {"L": [LayerTerm(torch.ones(2, 1, dtype=F64), AG)]}, eps=0.0)
    assert sol.path == "eigh"
    A = sol.loras["L"][1]
    assert float(A.abs().max()) < 10.0  # plain Cholesky would give entries ~1e15
    assert solve_site(S + torch.eye(3, dtype=F64), {"L": [LayerTerm(torch.ones(2, 1, dtype=F64), AG)]}, 0.0).path == "cholesky"


# --------------------------------------------------------------------------- packing and validation


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_pack_unpack_round_trip(d):
    x = torch.randn(3 * d, d, generator=gen(13), dtype=F64)
    G = x.T @ x
    v = pack_sym(G)
    assert v.shape == (d * (d + 1) // 2,)
    assert torch.equal(unpack_sym(v, d), G.triu() + G.triu(1).T)
    assert torch.equal(unpack_sym(v), unpack_sym(v, d))


@pytest.mark.parametrize("d", [1, 7, 128, 129, 300])
def test_tiled_symmetric_forms_equal_the_whole_matrix_ones(d):
    from mos.shared.fusion.gram import symmetric_from_upper, symmetrised

    U = torch.randn(d, d, generator=gen(d), dtype=F64)
    assert torch.equal(symmetric_from_upper(U), torch.triu(U) + torch.triu(U, 1).T)
    assert torch.equal(symmetrised(U), 0.5 * (U + U.T))


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="needs 10"):
        unpack_sym(torch.zeros(9), 4)


SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda G: G.index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"), dtype=F64)), "NaN or Inf"),
        (lambda G: G.index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(float("inf"), dtype=F64)), "NaN or Inf"),
        (lambda G: G + torch.triu(torch.ones_like(G), 1), "not symmetric"),
        (lambda G: G[:, :3], "square"),
        (lambda G: G.unsqueeze(0), "square"),
        (lambda G: G[:3, :3], "expected 4x4"),
        (lambda G: G - 100 * torch.eye(4, dtype=F64), "negative diagonal"),
    ],
)
def test_check_gram_rejects_with_site_name(make, msg):
    x = torch.randn(10, 4, generator=gen(14), dtype=F64)
    G = x.T @ x
    check_gram(G, SITE, 4)  # the clean one passes
    with pytest.raises(ValueError, match=msg) as err:
        check_gram(make(G), SITE, 4)
    assert SITE in str(err.value)


def test_check_gram_accepts_float32_rounding_asymmetry():
    x = torch.randn(500, 32, generator=gen(15))
    G = x.T @ x  # float32: triangles may differ by ulps
    G[0, 1] += 1e-7 * float(G.abs().max())
    check_gram(G, SITE)


# --------------------------------------------------------------------------- baseline and residuals


@pytest.mark.parametrize("mode,w", [("sum", 1.0), ("average", 1.0 / 3)])
@pytest.mark.parametrize("r", [2, 8])  # 3 x 8 = 24 >= min(d) = 16 takes the dense branch
def test_weight_fusion_equals_dense_sum(mode, w, r):
    g = gen(16)
    loras = [lora(16, 20, r, g) for _ in range(3)]
    B, A = weight_fusion(loras, mode)
    expect = w * sum(B_i @ A_i for B_i, A_i in loras)
    assert B.shape[1] == min(3 * r, 16)
    assert rel(B @ A, expect) < 1e-13


def test_weight_fusion_rejects_bad_mode_and_mismatched_ranks():
    with pytest.raises(ValueError, match="mode"):
        weight_fusion([lora(4, 4, 1, gen(0))], "median")
    g = gen(0)
    (B1, A1), (B2, A2) = lora(6, 5, 2, g), lora(6, 5, 3, g)
    with pytest.raises(ValueError, match="LoRA 0"):
        weight_fusion([(B1, A2), (B2, A1)])  # total ranks agree, pairs do not


@pytest.mark.parametrize("r_each", [2, 10])  # low-rank trace and dense trace branches
def test_residual_matches_explicit_inputs(r_each):
    g = gen(17)
    d_in, d_out = 16, 14
    xs = [rows(30, d_in, g) for _ in range(2)]
    loras = [lora(d_out, d_in, r_each, g) for _ in xs]
    dW, sol = fuse(xs, loras)
    Bs, As = sol.loras["L"]
    for x, (B, A) in zip(xs, loras):
        G = x.T @ x
        explicit = float(torch.linalg.norm(x @ (dW - B @ A).T) ** 2 / torch.linalg.norm(x @ (B @ A).T) ** 2)
        assert explicit > 1e-4  # the two concepts conflict, so this is not trivially zero
        assert residual(Bs, As, B, A, G) == pytest.approx(explicit, rel=1e-9)
    num, den = residual_parts(Bs, As, None, None, xs[0].T @ xs[0])
    assert den == 0.0 and num == pytest.approx(float(torch.linalg.norm(xs[0] @ dW.T) ** 2), rel=1e-9)
    assert math.isnan(residual(Bs, As, None, None, xs[0].T @ xs[0]))


def test_site_residual_sums_over_layers():
    g = gen(18)
    d = 12
    site, data = make_site(g, {"to_k": 10, "to_v": 10}, d, ["a", "b"], n_rows=20)
    sol = site.solve()
    x, lo = data["a"]
    G = x.T @ x
    parts = [residual_parts(*sol.loras[k], *lo[k], G) for k in ("to_k", "to_v")]
    expect = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert site_residual(sol, lo, G) == pytest.approx(expect, rel=1e-12)
    assert site_residual(sol, lo, pack_sym(G)) == pytest.approx(expect, rel=1e-12)
    assert expect > 1e-6


def test_float32_grams_on_few_rows_still_fit_the_inputs():
    # float32 rounding makes a rank-deficient Gram sum slightly indefinite; whichever path runs,
    # every concept's outputs on its own inputs must match the exact float64 fusion.
    g = gen(19)
    d = 256
    scale = torch.linspace(0.01, 3.0, d)
    xs = [torch.randn(40, d, generator=g) * scale for _ in range(2)]  # float32, 80 rows < d
    loras = [lora(64, d, 4, g) for _ in xs]

    def fused(grams, eps):
        terms = {"L": [LayerTerm(B, A @ G) for G, (B, A) in zip(grams, loras)]}
        sol = solve_site(sum(grams), terms, eps)
        return sol.loras["L"][0] @ sol.loras["L"][1], sol.path

    exact, _ = fused([x.double().T @ x.double() for x in xs], 0.0)
    for eps in (DEFAULT_EPS, 0.0):
        dW, path = fused([(x.T @ x).double() for x in xs], eps)
        assert path in ("cholesky", "eigh")
        for x in xs:
            x64 = x.double()
            assert rel(x64 @ dW.T, x64 @ exact.T) < 1e-5, (eps, path)


@pytest.mark.parametrize("i,j", [(10, 550), (550, 10), (300, 599), (599, 599)])
def test_check_gram_tiles_cover_the_whole_matrix(i, j):
    # d > the 256-wide tiles, so asymmetry or NaN in any tile must still be found
    x = torch.randn(700, 600, generator=gen(20), dtype=F64)
    G = x.T @ x
    check_gram(G, SITE)
    bad = G.clone()
    bad[i, j] += 1e-3 * float(G.abs().max()) if i != j else 0.0
    if i != j:
        with pytest.raises(ValueError, match="not symmetric"):
            check_gram(bad, SITE)
    bad[i, j] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_gram(bad, SITE)


def test_float32_gram_is_used_blockwise_like_its_float64_copy():
    # SiteSums never copies a float32 Gram to float64 whole; the blockwise path must agree.
    g = gen(21)
    d = 300  # several row blocks and several symmetry tiles
    x = torch.randn(400, d, generator=g)
    G32 = x.T @ x
    G32 = 0.5 * (G32 + G32.T)
    loras = {"to_k": lora(40, d, 3, g), "to_v": lora(40, d, 2, g)}
    a, b = SiteSums("s32", d), SiteSums("s64", d)
    a.add("c", G32, 400, loras)
    b.add("c", G32.double(), 400, loras)
    assert torch.equal(a.gram_sum, b.gram_sum)
    for layer in loras:
        assert rel(a.terms()[layer][0].AG, b.terms()[layer][0].AG) < 1e-14
    a.remove("c", G32, 400)
    assert torch.count_nonzero(a.gram_sum) == 0


# --------------------------------------------------------------------------- lam by GCV (eps=None)


def decaying_rows(n: int, d: int, g: torch.Generator, tilt: torch.Tensor) -> torch.Tensor:
    """Rows with a 1/j input spectrum, each concept tilting it its own way (as activations of one site)."""
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=F64)
    return torch.randn(n, d, generator=g, dtype=F64) * spectrum * tilt


def gcv_problem(seed: int):
    g = gen(seed)
    d, d_out = 40, 12
    tilts = [torch.exp(0.5 * torch.randn(d, generator=g, dtype=F64)) for _ in range(3)]
    loras = [{"to_k": lora(d_out, d, 3, g), "to_v": lora(d_out, d, 2, g)} for _ in tilts]
    xs = [decaying_rows(n, d, g, t) for n, t in zip((30, 60, 120), tilts)]
    fresh = [decaying_rows(4000, d, g, t) for t in tilts]
    site = SiteSums("s", d)
    for i, (x, lo) in enumerate(zip(xs, loras)):
        site.add(f"c{i}", x.T @ x, x.shape[0], lo)
    return site, xs, fresh, loras


def fit_loss(sol, xs, loras) -> float:
    """sum_i ||(dW - dW_i) X_i^T||^2 over both layers, from explicit rows."""
    total = 0.0
    for x, lo in zip(xs, loras):
        for layer, (B, A) in lo.items():
            Bs, As = sol.loras[layer]
            total += float(((x @ (Bs @ As - B @ A).T) ** 2).sum())
    return total


def test_gcv_equals_its_definition_on_explicit_rows():
    # GCV computed from Grams and per-concept terms = RSS / (1 - df/n)^2 computed from the rows themselves,
    # and the solve at the chosen lam is the fixed-eps solve at that eps.
    from mos.shared.fusion.solver import _GCV_EPS

    site, xs, _, loras = gcv_problem(30)
    n = sum(x.shape[0] for x in xs)
    mu = torch.linalg.eigvalsh(site.gram_sum)
    direct = []
    for eps in _GCV_EPS.tolist():
        sol = site.solve(eps)
        df = float((mu / (mu + sol.lam)).sum())
        direct.append(fit_loss(sol, xs, loras) / (1 - df / n) ** 2)
    chosen = site.solve(None)
    assert chosen.path == "eigh"
    assert chosen.eps == pytest.approx(_GCV_EPS[min(range(len(direct)), key=direct.__getitem__)].item(), rel=1e-9)
    assert chosen.lam == pytest.approx(chosen.eps * float(mu.mean()), rel=1e-9)
    fixed = site.solve(chosen.eps)
    for layer in fixed.loras:
        assert rel(chosen.loras[layer][0] @ chosen.loras[layer][1], fixed.loras[layer][0] @ fixed.loras[layer][1]) < 1e-9


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_gcv_lands_near_the_best_held_out_lam(seed):
    # Concepts conflict on shared, weakly visited directions: the held-out optimum needs a real ridge, and GCV's
    # choice must be within 5% of the best held-out loss over the grid, and far better than eps=1e-8.
    from mos.shared.fusion.solver import _GCV_EPS

    site, _, fresh, loras = gcv_problem(seed)
    held = {eps: fit_loss(site.solve(eps), fresh, loras) for eps in _GCV_EPS.tolist()}
    best = min(held.values())
    chosen = site.solve(None)
    assert fit_loss(chosen, fresh, loras) <= 1.05 * best
    assert held[_GCV_EPS[0].item()] > 1.05 * best  # the problem has teeth: no ridge is clearly worse


@pytest.mark.parametrize("seed", [35, 36])
def test_heldout_lam_equals_its_definition_on_explicit_rows(seed):
    # The held-out choice from SH and the terms A_i H_i = the grid's argmin of the fused layers' error on the
    # held-out rows themselves; its solve is the fixed-eps solve at that eps. Few fit rows (30 < d for the first
    # concept): the fit's Gram is rank-deficient, as stage 3's conv sites can be.
    from mos.shared.fusion.solver import _GCV_EPS

    site, xs, fresh, loras = gcv_problem(seed)
    held_rows = [f[:n] for f, n in zip(fresh, (20, 25, 30))]  # other rows of the same concepts
    held = SiteSums("s#heldout", 40)
    for i, (x, lo) in enumerate(zip(held_rows, loras)):
        held.add(f"c{i}", x.T @ x, x.shape[0], lo)
    direct = [fit_loss(site.solve(eps), held_rows, loras) for eps in _GCV_EPS.tolist()]
    chosen = site.solve(1e-2, heldout=held)
    best = min(range(len(direct)), key=direct.__getitem__)
    assert chosen.eps == pytest.approx(_GCV_EPS[best].item(), rel=1e-9) and chosen.path == "eigh"
    assert direct[best] < min(direct[0], direct[-1])  # an inner optimum: the choice has something to choose
    fixed = site.solve(chosen.eps)
    for layer, (B, A) in fixed.loras.items():
        assert rel(chosen.loras[layer][0] @ chosen.loras[layer][1], B @ A) < 1e-9


def test_held_out_rows_that_ask_for_the_heaviest_ridge_get_at_most_eps_1():
    # One party's held-out rows, all power on directions where its own change is nothing (no LoRA on the layer),
    # make W0 the best held-out fit: the choice stops at eps = 1, the top of its grid, not GCV's 10.
    site, xs, _, loras = gcv_problem(38)
    held = SiteSums("s#heldout", 40)
    for i, (x, lo) in enumerate(zip(xs, loras)):
        held.add(f"c{i}", (x.T @ x) * (1e6 if i == 0 else 1e-6), x.shape[0], {} if i == 0 else lo)
    assert site.solve(1e-2, heldout=held).eps == pytest.approx(1.0)


def test_heldout_sums_must_come_from_the_same_concepts():
    site, xs, _, loras = gcv_problem(37)
    held = SiteSums("s#heldout", 40)
    held.add("c0", xs[0].T @ xs[0], xs[0].shape[0], loras[0])
    with pytest.raises(ValueError, match="held-out rows from"):
        site.solve(1e-2, heldout=held)


def test_gcv_picks_a_tiny_lam_when_concepts_do_not_conflict():
    # Orthogonal input subspaces: every concept can be reproduced, so GCV must not damp anything.
    g = gen(34)
    d, d_out = 30, 12
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    xs = [rows(200, d, g, basis=Q[:, :10].T), rows(200, d, g, basis=Q[:, 10:22].T)]
    loras = [{"L": lora(d_out, d, 3, g)}, {"L": lora(d_out, d, 3, g)}]
    site = SiteSums("s", d)
    for i, (x, lo) in enumerate(zip(xs, loras)):
        site.add(f"c{i}", x.T @ x, x.shape[0], lo)
    sol = site.solve(None)
    assert sol.eps <= 1e-6
    assert fit_loss(sol, xs, loras) <= 1e-10 * sum(float(((x @ (lo["L"][0] @ lo["L"][1]).T) ** 2).sum())
                                                   for x, lo in zip(xs, loras))


def test_gcv_needs_energies_and_rows():
    g = gen(35)
    x = rows(20, 8, g)
    B, A = lora(4, 8, 2, g)
    with pytest.raises(ValueError, match="GCV"):
        solve_site(x.T @ x, {"L": [LayerTerm(B, A @ x.T @ x)]}, None, rows=20)  # no energy
    with pytest.raises(ValueError, match="GCV"):
        solve_site(x.T @ x, {"L": [LayerTerm(B, A @ x.T @ x, energy=1.0)]}, None)  # no rows


def test_spilled_terms_solve_like_memory_and_leave_no_file_behind(tmp_path):
    from mos.shared.fusion.spill import SpilledTerms

    g = gen(36)
    d = 20
    spilled, memory = SiteSums("s", d, SpilledTerms(tmp_path / "s")), SiteSums("s", d)
    data = {}
    for name in ("a", "b", "c"):
        x = rows(30, d, g)
        lo = {"to_k": lora(8, d, 2, g), "to_v": lora(8, d, 3, g)} if name != "b" else {"to_k": lora(8, d, 2, g)}
        data[name] = (x.T @ x, lo)
        for site in (spilled, memory):
            site.add(name, x.T @ x, 30, lo)
    assert len(list((tmp_path / "s").iterdir())) == 3  # one file per concept, nothing in memory
    spilled.remove("a", data["a"][0], 30)
    memory.remove("a", data["a"][0], 30)
    assert len(list((tmp_path / "s").iterdir())) == 2
    for eps in (DEFAULT_EPS, None):
        got, want = spilled.solve(eps), memory.solve(eps)
        assert got.lam == want.lam and set(got.loras) == set(want.loras) == {"to_k", "to_v"}
        for layer in want.loras:
            assert torch.equal(got.loras[layer][0], want.loras[layer][0])
            assert torch.equal(got.loras[layer][1], want.loras[layer][1])
    for name in ("b", "c"):
        spilled.remove(name, data[name][0], 30)
    assert not list((tmp_path / "s").iterdir())


def test_spilled_loras_come_back_as_put_and_leave_no_file_behind(tmp_path):
    from mos.shared.fusion.spill import SpilledLoras

    g = gen(37)
    store = SpilledLoras(tmp_path / "l")
    los = {"a": {"x.to_k": lora(8, 20, 2, g), "x.to_v": lora(6, 20, 2, g)}, "b": {"x.to_k": lora(8, 20, 1, g)}}
    for name, lo in los.items():
        store.put(name, lo)
    for name, lo in los.items():
        back = store.load(name)
        assert list(back) == list(lo)
        assert all(torch.equal(back[k][i], lo[k][i]) for k in lo for i in (0, 1))
    store.drop("a")
    store.drop("b")
    assert not list((tmp_path / "l").iterdir())


@pytest.mark.parametrize("eps,want", [(1e-2, torch.float32), (1e-3, torch.float32), (1e-4, F64), (None, F64)])
def test_fusion_uses_float32_factor_products_only_at_a_large_fixed_eps(eps, want):
    """The driver's choice (solver docstring, "Gram precision"): float32 RᵀR products where their rounding stays far
    below the ridge, float64 for GCV and small ε."""
    from mos.shared.fusion.config import FusionConfig
    from mos.shared.fusion.driver import Fusion
    from mos.shared.sd.sites import Site

    fusion = Fusion("fp", [Site("s", 8, ("s.to_q",), (8,), 1)], FusionConfig(eps=eps))
    try:
        assert fusion._sums("s").factor_products == want
    finally:
        fusion.close()
    # a spatial site whose λ the held-out rows choose (it may be small): float64, for the fit and the held-out sums
    fusion = Fusion("fp", [Site("s", 8, ("s.to_q",), (8,), 3)], FusionConfig(eps=eps, heldout=True))
    try:
        assert fusion._sums("s").factor_products == fusion._sums("s#heldout").factor_products == torch.float64
    finally:
        fusion.close()


def test_gcv_with_too_few_rows_to_judge_damps_the_most():
    from mos.shared.fusion.solver import _GCV_EPS

    g = gen(37)
    x = rows(30, 30, g)
    B, A = lora(6, 30, 2, g)
    G = x.T @ x
    energy = float(((x @ (B @ A).T) ** 2).sum())
    # claim 2 rows for a full-rank Gram: df > n at every candidate lam
    sol = solve_site(G, {"L": [LayerTerm(B, A @ G, energy)]}, None, rows=2)
    assert sol.eps == pytest.approx(_GCV_EPS[-1].item())


def _fused_with_workers(workers: int, tmp_path) -> tuple[dict, dict]:
    """Three concepts over sites of different widths, factored Grams (the wire's form), taken in and solved by
    `workers` threads: (site -> ΣG, layer -> fused (B, A))."""
    from mos.shared.formats.adapter import Adapter
    from mos.shared.fusion.config import FusionConfig
    from mos.shared.fusion.driver import Fusion
    from mos.shared.fusion.stats import FactorGram
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.sites import Site

    dims = {"a": 24, "b": 40, "c": 8, "d": 40}
    sites = [Site(s, d, (f"{s}.to_q", f"{s}.to_k"), (d, 6), 1) for s, d in dims.items()]
    fusion = Fusion("fp", sites, FusionConfig(eps=1e-2), spill=tmp_path / f"w{workers}", workers=workers)
    try:
        for c in range(3):
            g = gen(100 + c)
            lo = {l: tuple(t.float() for t in lora(o, s.dim, 2, g)) for s in sites for l, o in zip(s.layers, s.out_dims)}
            fusion.add(Adapter("fp", [Concept(f"c{c}", "object", torch.zeros(1, 0, 8))], lo))
            stats = {s.name: FactorGram.of(torch.linalg.qr(rows(s.dim + 5, s.dim, g)).R.float(), s.dim + 5)
                     for s in sites}
            fusion.add_stats(f"c{c}", stats)
        return {s: fusion.sums[s].gram_sum for s in dims}, fusion.solve(1)
    finally:
        fusion.close()


def test_fusion_with_two_workers_gives_the_same_bits_as_one(tmp_path):
    """Sites are taken in and solved side by side, but each site's sum still takes its concepts in order."""
    sums1, fused1 = _fused_with_workers(1, tmp_path)
    sums2, fused2 = _fused_with_workers(2, tmp_path)
    assert all(torch.equal(sums1[s], sums2[s]) for s in sums1)
    assert list(fused1) == list(fused2)
    assert all(torch.equal(fused1[l][i], fused2[l][i]) for l in fused1 for i in (0, 1))


def test_in_parallel_keeps_order_and_raises_only_after_every_call_finished():
    import threading
    import time

    from mos.shared.fusion.workers import in_parallel

    assert in_parallel(lambda x: x * x, range(7), 2) == [x * x for x in range(7)]
    done = []
    lock = threading.Lock()

    def work(x: int) -> int:
        if x == 0:
            raise ValueError("site 0")
        time.sleep(0.01)
        with lock:
            done.append(x)
        return x

    with pytest.raises(ValueError, match="site 0"):
        in_parallel(work, range(5), 2)
    assert sorted(done) == [1, 2, 3, 4]


def test_default_workers_fill_the_cores_torch_leaves_idle(monkeypatch):
    from mos.shared.fusion import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert workers.default_workers() == 2
        torch.set_num_threads(2)
        assert workers.default_workers() == 1
    finally:
        torch.set_num_threads(threads)
