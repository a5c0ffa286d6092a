"""Newton-Schulz orthogonalization against the SVD polar factor."""

import pytest
import torch

from nl_lightning.optim.newton_schulz import newton_schulz


def polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


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
