"""Newton-Schulz orthogonalization against an independent float64 prediction from the SVD.

An odd matrix polynomial acts on the singular values alone: one quintic step maps ``X = U diag(s) V^T`` to
``U diag(p(s)) V^T`` with ``p(s) = a s + b s^3 + c s^5``. So ``T`` steps from ``X_0 = G / (||G||_F + eps)`` give
exactly ``NS_T(G) = U diag(f_T(s / (||G||_F + eps))) V^T``, ``f_T = p o ... o p`` (``T`` times), where ``G = U diag(s)
V^T`` is the SVD. That is a prediction of every entry of the output, computed here in float64 from
``torch.linalg.svd`` and the scalar map, with nothing taken from the module but its coefficients.
"""

import pytest
import torch

from nl_lightning.optim.newton_schulz import newton_schulz

QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's coefficients, as in the module docstring
EPS32 = 2.0**-24  # fp32 unit roundoff: the module iterates in fp32 whatever the input dtype


def scalar_map(s: torch.Tensor, steps: int, kind: str = "quintic") -> torch.Tensor:
    """``f_T(s)``: the iteration's scalar polynomial applied ``steps`` times (float64)."""
    a, b, c = QUINTIC
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5 if kind == "quintic" else 1.5 * s - 0.5 * s**3
    return s


def svd64(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, s, V^T`` of ``g`` in float64 and the normalised singular values ``s / (||g||_F + eps)`` (batched)."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    fro = torch.linalg.matrix_norm(g.double())  # (...)
    return u, s, vh, s / (fro.unsqueeze(-1) + 1e-7)  # the module's default eps


def predicted(g: torch.Tensor, steps: int, kind: str = "quintic") -> torch.Tensor:
    """``U diag(f_T(s / (||G||_F + eps))) V^T`` in float64."""
    u, _, vh, s = svd64(g)
    return u @ torch.diag_embed(scalar_map(s, steps, kind)) @ vh


def polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh, _ = svd64(g)
    return u @ vh


def amplification(s: torch.Tensor, steps: int, kind: str = "quintic") -> float:
    """How much ``f_T`` can magnify a perturbation of a matrix with normalised singular values ``s``.

    The Frechet derivative of an odd matrix function is made of divided differences of ``f_T`` over pairs of singular
    values (``|f(s_i) - f(s_j)| / |s_i - s_j|``, ``(f(s_i) + f(s_j)) / (s_i + s_j)``) and, for the directions outside
    the row and column spaces, ``f(s_i) / s_i``. All are bounded by ``max |f_T'|`` over ``[min s, max s]`` and
    ``max f_T(s_i) / s_i``. fp32 rounding in the iteration is magnified by about this much (up to ``3.4445^T``, the
    slope at 0, for a singular matrix).
    """
    grid = torch.linspace(float(s.min()), float(s.max()), 20001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(scalar_map(grid, steps, kind).sum(), grid)
    pos = s[s > 0]
    return max(1.0, float(slope.abs().max()), float((scalar_map(pos, steps, kind) / pos).max()))


def fp32_tol(g: torch.Tensor, steps: int, kind: str = "quintic") -> float:
    """The spectral-norm tolerance of the fp32 iteration against the float64 prediction: 8 fp32 roundoffs made at each
    stage that rounds (the normalisation, then every step ``t``), each magnified by the :func:`amplification` of the
    steps left, at the singular values ``f_t(s)`` of that stage (the largest over a batch; zero matrices stay exactly
    zero). Measured over square, tall, wide, single-row, ill-conditioned and singular inputs of sizes up to 256 and 0
    to 8 steps, quintic and cubic: at most 0.3 of it."""
    s = svd64(g)[3].reshape(-1, min(g.shape[-2:]))
    stages = [
        sum(amplification(scalar_map(row, t, kind), steps - t, kind) for t in range(steps + 1))
        for row in s
        if row.max() > 0
    ]
    return 8 * EPS32 * max(stages)


def with_singular_values(rows: int, cols: int, sv: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 matrix ``U diag(sv) V^T`` with random orthonormal ``U`` ``(rows, k)`` and ``V`` ``(cols, k)``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))[0]
    return ((u * sv) @ v.T).float()


def case(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if name == "square":
        return torch.randn(16, 16, generator=gen)
    if name == "tall":
        return torch.randn(48, 12, generator=gen)
    if name == "wide":
        return torch.randn(12, 48, generator=gen)
    if name == "row":
        return torch.randn(1, 9, generator=gen)
    if name == "column":
        return torch.randn(9, 1, generator=gen)
    if name == "condition 10":
        return with_singular_values(32, 24, torch.logspace(0, -1, 24, dtype=torch.float64), 1)
    if name == "condition 1e3":
        return with_singular_values(24, 32, torch.logspace(0, -3, 24, dtype=torch.float64), 2)
    if name == "rank 6 of 20":
        sv = torch.cat([torch.linspace(1, 0.3, 6, dtype=torch.float64), torch.zeros(14, dtype=torch.float64)])
        return with_singular_values(20, 20, sv, 3)
    if name == "near rank 4 of 16":
        sv = torch.cat([torch.linspace(2, 1, 4, dtype=torch.float64), torch.full((12,), 1e-6, dtype=torch.float64)])
        return with_singular_values(30, 16, sv, 4)
    raise AssertionError(name)


CASES = [
    "square",
    "tall",
    "wide",
    "row",
    "column",
    "condition 10",
    "condition 1e3",
    "rank 6 of 20",
    "near rank 4 of 16",
]


@pytest.mark.parametrize("steps", [0, 1, 3, 5, 8])
@pytest.mark.parametrize("name", CASES)
def test_quintic_equals_the_scalar_map_on_the_singular_values(name, steps):
    """(a) ``NS_T(G) = U diag(f_T(s)) V^T``: the same singular vectors as ``G``, each value mapped by ``f_T``."""
    g = case(name)
    out = newton_schulz(g, steps)
    assert out.dtype == torch.float32 and out.shape == g.shape
    err = torch.linalg.matrix_norm(out.double() - predicted(g, steps), ord=2)
    assert err <= fp32_tol(g, steps), (float(err), fp32_tol(g, steps))


@pytest.mark.parametrize("steps", [1, 5, 30])
@pytest.mark.parametrize("name", ["square", "tall", "wide", "condition 10", "rank 6 of 20"])
def test_cubic_equals_the_scalar_map_on_the_singular_values(name, steps):
    g = case(name)
    err = torch.linalg.matrix_norm(newton_schulz(g, steps, kind="cubic").double() - predicted(g, steps, "cubic"), ord=2)
    assert err <= fp32_tol(g, steps, "cubic"), float(err)


def test_batched_input_equals_the_scalar_map_matrix_by_matrix():
    """A batch ``(2, 3, 10, 6)`` (tall, iterated transposed) and ``(4, 5, 7)`` (wide) with a zero matrix inside."""
    gen = torch.Generator().manual_seed(5)
    scales = torch.logspace(-3, 3, 6).reshape(2, 3, 1, 1)  # the normalisation makes the scale irrelevant
    for g in (torch.randn(2, 3, 10, 6, generator=gen) * scales, torch.randn(4, 5, 7, generator=gen)):
        g[(0,) * (g.ndim - 2)] = 0  # zero stays zero: f_T(0) = 0
        out = newton_schulz(g)
        assert out.shape == g.shape
        want = predicted(g, 5)
        assert not want[(0,) * (g.ndim - 2)].any() and not out[(0,) * (g.ndim - 2)].any()
        err = torch.linalg.matrix_norm(out.double() - want, ord=2)  # (...) one per matrix
        assert err.max() <= fp32_tol(g, 5), float(err.max())


@pytest.mark.parametrize(("dtype", "ulp"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11), (torch.float64, 0)])
def test_low_and_high_precision_inputs(dtype, ulp):
    """The iteration runs in fp32 and rounds its result to the input dtype (one ulp at most, relative to each entry);
    the prediction starts from the rounded input."""
    g = case("tall").to(dtype)
    out = newton_schulz(g)
    assert out.dtype == dtype
    want = predicted(g, 5)  # g is exactly representable in float64
    bound = ulp * want.abs() + fp32_tol(g, 5)
    assert ((out.double() - want).abs() <= bound).all(), float((out.double() - want).abs().max())


def band(steps: int, s_min: float) -> tuple[float, float]:
    """``[lo, hi]``: the range of ``f_T`` over normalised singular values in ``[s_min, 1]`` (a dense float64 grid)."""
    f = scalar_map(torch.linspace(s_min, 1, 200001, dtype=torch.float64), steps)
    return float(f.min()), float(f.max())


def test_band_of_the_default_iteration():
    """The band the 5 quintic steps reach (the module docstring says "roughly [0.7, 1.2]").

    Normalised singular values are at most 1 and, for ``k`` singular values with condition number ``kappa``, at least
    ``1 / (sqrt(k) kappa)``. From ``0.01`` up the band is ``[0.6818, 1.1344]``; from ``0.002`` up it widens to the
    quintic's invariant band ``[0.6818, 1.2024]`` (1.2024 is ``p``'s maximum, at ``s = 0.5545``); below that the
    values are not lifted into it (``f_5(s) ~ 3.4445^5 s = 485 s`` near 0).
    """
    assert band(5, 0.01) == pytest.approx((0.6818, 1.1344), abs=1e-4)
    assert band(5, 0.002) == pytest.approx((0.6818, 1.2024), abs=1e-4)
    assert float(scalar_map(torch.tensor(1e-3, dtype=torch.float64), 5)) == pytest.approx(0.4705, abs=1e-4)


@pytest.mark.parametrize(
    ("rows", "cols", "kappa"), [(16, 16, 1.0), (64, 16, 3.0), (16, 64, 10.0), (40, 40, 10.0), (1, 8, 1.0)]
)
def test_quintic_lands_in_the_band_around_the_polar_factor(rows, cols, kappa):
    """(b) well-conditioned input: every singular value of ``NS_5(G)`` lies in the band ``[lo, hi]`` of its
    normalised singular values, and ``||NS_5(G) - U V^T||_2 <= max(1 - lo, hi - 1)`` (up to fp32 rounding)."""
    k = min(rows, cols)
    sv = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64)
    g = with_singular_values(rows, cols, sv, seed=rows + cols)
    lo, hi = band(5, 1 / (k**0.5 * kappa) - 1e-6)
    out = newton_schulz(g)
    tol = fp32_tol(g, 5)
    s_out = torch.linalg.svdvals(out.double())
    assert s_out.min() >= lo - tol and s_out.max() <= hi + tol, (s_out, lo, hi)
    err = torch.linalg.matrix_norm(out.double() - polar(g), ord=2)
    assert err <= max(1 - lo, hi - 1) + tol, (float(err), lo, hi)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_cubic_converges_to_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, steps=60, kind="cubic")
    assert torch.allclose(o.double(), polar(g), atol=1e-5)


def test_quintic_singular_values_land_near_one_and_keep_the_singular_vectors():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g)  # 5 quintic steps, Muon's coefficients
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25
    # same singular vectors as g: o is U diag(p(s)) V^T, so U^T o V is diagonal
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ o @ vh.T
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4


def test_batched_equals_one_by_one_zero_stays_zero_and_dtype_kept():
    g = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(2))
    batched = newton_schulz(g)
    for i in range(3):
        assert torch.allclose(batched[i], newton_schulz(g[i]), atol=1e-6)
    assert torch.equal(newton_schulz(torch.zeros(4, 4)), torch.zeros(4, 4))
    assert newton_schulz(g.bfloat16()).dtype == torch.bfloat16
    assert torch.allclose(newton_schulz(g, steps=0).flatten(1).norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize(
    ("args", "match"),
    [((torch.ones(3),), r"\(3,\)"), ((torch.ones(2, 2), -1), "-1"), ((torch.ones(2, 2), 5, "x"), "'x'")],
)
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz(*args)
