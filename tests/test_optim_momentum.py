"""PreconditionedMomentum and DeltaMomentum against hand-written references of Eq. 20-22 (NL NeurIPS), SGD, state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nl_lightning.optim.delta_momentum import DeltaMomentum
from nl_lightning.optim.dmgd import DMGD
from nl_lightning.optim.m3 import M3
from nl_lightning.optim.newton_schulz import newton_schulz
from nl_lightning.optim.preconditioned_momentum import PreconditionedMomentum

# a wide matrix and a bias (group 0), a tall conv-like kernel and a bias (group 1)
SHAPES = [(4, 6), (4,), (8, 2, 3), (5,)]
STEPS = 8
PRECONDITIONERS = ["identity", "rms", "newton_schulz"]
DEFAULTS = dict(lr=0.1, momentum=0.9, beta2=0.99, eps=1e-8, ns_steps=5, weight_decay=0.0)
GROUP1 = dict(lr=torch.tensor(0.05, dtype=torch.float64), momentum=0.5, beta2=0.9, eps=1e-3, ns_steps=3)


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def grad_seq(steps=STEPS, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]


def groups(params, wd, delta=None, delta1=0.3):
    g0, g1 = {"params": params[:2], "weight_decay": wd}, {"params": params[2:], **GROUP1, "weight_decay": 2 * wd}
    if delta is not None:
        g0["delta"], g1["delta"] = delta, delta1
    return [g0, g1]


def hparams(i, defaults, wd, delta=None):
    """The hyper-parameters of parameter ``i`` under ``groups``."""
    h = {**defaults, "weight_decay": wd, "delta": delta}
    if i >= 2:
        h.update(GROUP1, weight_decay=2 * wd, delta=0.3)
        h["lr"] = float(h["lr"])
    return h


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


# ---------------------------------------------------------------------------------------------- references
def reference(w, grads, lr, momentum, preconditioner, beta2, eps, ns_steps, weight_decay, delta=None, projection=None):
    """Eq. 20-22 on one tensor, step by step: m <- alpha m - delta g_hat <g_hat, m> - lr P(g); W <- W(1 - lr wd) + m."""
    w, m, v = w.detach().clone(), torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if preconditioner == "identity":
            pg = g
        elif preconditioner == "newton_schulz" and g.ndim >= 2:
            pg = newton_schulz(g.reshape(g.shape[0], -1), ns_steps).reshape(g.shape)
        else:  # "rms", and the 1-D fallback of "newton_schulz"
            v = beta2 * v + (1 - beta2) * g * g
            pg = g / (torch.sqrt(v / (1 - beta2**t)) + eps)
        decay = torch.zeros_like(m)
        if delta:
            rows = g.shape[0] if projection == "row" and g.ndim >= 2 else 1
            g2, m2, d2 = g.reshape(rows, -1), m.reshape(rows, -1), decay.view(rows, -1)
            for r in range(rows):
                g_hat = g2[r] / torch.clamp(torch.linalg.norm(g2[r]), min=1e-12)
                d2[r] = delta * g_hat * torch.dot(g_hat, m2[r])
        m = momentum * m - decay - lr * pg
        w = w * (1 - lr * weight_decay) + m
    return w


# ---------------------------------------------------------------------------------------------- equations
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_preconditioned_momentum_matches_reference(preconditioner, foreach, wd):
    params, grads = make_params(), grad_seq()
    opt = PreconditionedMomentum(groups(params, wd), preconditioner=preconditioner, foreach=foreach, **DEFAULTS)
    w0 = [p.detach().clone() for p in params]
    run(opt, params, grads)
    for i, p in enumerate(params):
        h = hparams(i, DEFAULTS, wd)
        h.pop("delta")
        expected = reference(w0[i], [gs[i] for gs in grads], preconditioner=preconditioner, **h)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
        assert int(opt.state[p]["step"]) == STEPS


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("projection", ["tensor", "row"])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_delta_momentum_matches_reference(preconditioner, projection, foreach, wd):
    params, grads = make_params(), grad_seq()
    opt = DeltaMomentum(
        groups(params, wd, delta=0.7), preconditioner=preconditioner, projection=projection, foreach=foreach, **DEFAULTS
    )
    w0 = [p.detach().clone() for p in params]
    run(opt, params, grads)
    for i, p in enumerate(params):
        h = hparams(i, DEFAULTS, wd, delta=0.7)
        expected = reference(w0[i], [gs[i] for gs in grads], preconditioner=preconditioner, projection=projection, **h)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


OPTIMIZERS = [
    *[(PreconditionedMomentum, dict(preconditioner=k)) for k in PRECONDITIONERS],
    *[(DeltaMomentum, dict(preconditioner=k, projection=r)) for k in PRECONDITIONERS for r in ("tensor", "row")],
]
IDS = [f"{cls.__name__}-{'-'.join(kw.values())}" for cls, kw in OPTIMIZERS]


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_foreach_equals_per_tensor(cls, kwargs):
    results = []
    for foreach in (False, True):
        params = make_params()
        opt = cls(groups(params, 0.1), foreach=foreach, **kwargs)
        run(opt, params, grad_seq())
        results.append((params, opt))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            assert torch.equal(value, ob.state[b][key]), key


@pytest.mark.parametrize("projection", ["tensor", "row"])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_delta_zero_is_preconditioned_momentum(preconditioner, projection):
    pa, pb, grads = make_params(), make_params(), grad_seq()
    run(PreconditionedMomentum(groups(pa, 0.1), preconditioner=preconditioner), pa, grads)
    run(
        DeltaMomentum(groups(pb, 0.1, delta=0.0, delta1=0.0), preconditioner=preconditioner, projection=projection),
        pb,
        grads,
    )
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_identity_is_sgd_momentum(momentum):
    """SGD: b <- alpha b + g, W <- W - lr b. Here m <- alpha m - lr g, W <- W + m, so m = -lr b."""
    pa, pb, grads = make_params(), make_params(), grad_seq()
    ours = PreconditionedMomentum(pa, lr=0.1, momentum=momentum, preconditioner="identity")
    sgd = torch.optim.SGD(pb, lr=0.1, momentum=momentum, dampening=0)
    run(ours, pa, grads)
    run(sgd, pb, grads)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if momentum:
            torch.testing.assert_close(ours.state[a]["momentum_buffer"], -0.1 * sgd.state[b]["momentum_buffer"])


def test_momentum_key_can_be_rescheduled():
    """A rule that writes group["momentum"] between steps is obeyed: alpha = 0 gives m = -lr P(g)."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = PreconditionedMomentum([p], lr=1.0, momentum=0.9, preconditioner="identity")
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.0
    p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], -p.grad)


# ---------------------------------------------------------------------------------------------- delta rule by hand
def _two_steps(shape, g1, g2, momentum, delta, projection):
    """Step 1 writes m = -g1 (lr 1); step 2 has lr 0, so it only applies the decay to m."""
    p = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = DeltaMomentum([p], lr=1.0, momentum=momentum, delta=delta, projection=projection)
    p.grad = torch.tensor(g1, dtype=torch.float64)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.tensor(g2, dtype=torch.float64)
    opt.step()
    return opt.state[p]["momentum_buffer"], p.detach()


@pytest.mark.parametrize(
    ("momentum", "delta", "expected"),
    [(1.0, 1.0, [0.0, -4.0]), (1.0, 0.5, [-1.5, -4.0]), (0.5, 0.5, [0.0, -2.0]), (1.0, 0.0, [-3.0, -4.0])],
)
def test_delta_removes_component_along_gradient(momentum, delta, expected):
    # m = (-3, -4); g2 = (2, 0): g_hat = (1, 0), <g_hat, m> = -3, m <- alpha m - delta (1, 0)(-3)
    m, w = _two_steps((2,), [3.0, 4.0], [2.0, 0.0], momentum, delta, "tensor")
    assert torch.allclose(m, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(w, torch.tensor([-3.0, -4.0], dtype=torch.float64) + m, rtol=0, atol=1e-15)


def test_delta_projection_row_and_tensor_by_hand():
    g1, g2 = [[3.0, 4.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 5.0]]  # m = -g1
    m_row, _ = _two_steps((2, 2), g1, g2, 1.0, 1.0, "row")  # each row loses its component along its g row
    assert torch.allclose(m_row, torch.tensor([[0.0, -4.0], [-1.0, 0.0]], dtype=torch.float64), atol=1e-15)
    # whole tensor: g_hat = g2 / sqrt(26), <g_hat, m> = -13 / sqrt(26), m + (13 / 26) g2
    m_ten, _ = _two_steps((2, 2), g1, g2, 1.0, 1.0, "tensor")
    assert torch.allclose(m_ten, torch.tensor([[-2.5, -4.0], [-1.0, 0.5]], dtype=torch.float64), atol=1e-15)


def test_delta_decay_is_a_contraction():
    gen = torch.Generator().manual_seed(3)
    p = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    opt = DeltaMomentum([p], lr=0.0, momentum=1.0, delta=1.0, projection="row")
    opt.state[p]["step"] = torch.tensor(0.0)
    opt.state[p]["momentum_buffer"] = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for _ in range(5):
        before = opt.state[p]["momentum_buffer"].clone()
        p.grad = 100 * torch.randn(6, 5, generator=gen, dtype=torch.float64)  # large gradients do not blow m up
        opt.step()
        after = opt.state[p]["momentum_buffer"]
        assert (after.norm(dim=1) <= before.norm(dim=1) + 1e-12).all()
        assert torch.allclose((after * p.grad).sum(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-9)


# ---------------------------------------------------------------------------------------------- state and edges
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_state_dict_round_trip_resumes_exactly(cls, kwargs):
    n, k = 4, 5
    grads = grad_seq(n + k)
    full = make_params()
    run(cls(groups(full, 0.1), **kwargs), full, grads)

    first = make_params()
    opt = cls(groups(first, 0.1), **kwargs)
    run(opt, first, grads[:n])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [w.clone().requires_grad_() for w in ckpt["params"]]
    opt2 = cls(groups(resumed, 0.1), **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    run(opt2, resumed, grads[n:])
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)
    assert int(opt2.state[resumed[0]]["step"]) == n + k


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:3] + OPTIMIZERS[3::2], ids=IDS[:3] + IDS[3::2])
def test_param_without_grad_is_untouched(cls, kwargs):
    params = make_params()
    opt = cls(groups(params, 0.1), **kwargs)
    frozen = params[2].detach().clone()
    grads = [[g if i != 2 else None for i, g in enumerate(gs)] for gs in grad_seq(3)]
    run(opt, params, grads)
    assert torch.equal(params[2], frozen)
    assert params[2] not in opt.state
    assert all(int(opt.state[p]["step"]) == 3 for i, p in enumerate(params) if i != 2)


@pytest.mark.parametrize("cls", [PreconditionedMomentum, DeltaMomentum])
def test_sparse_grad_raises(cls):
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        cls(emb.parameters()).step()


@pytest.mark.parametrize("cls", [PreconditionedMomentum, DeltaMomentum, M3, DMGD])
def test_closure_runs_with_grad_and_returns_loss(cls):
    lin = nn.Linear(3, 2)
    opt = cls(lin.parameters())
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() > 0 and all(p in opt.state for p in lin.parameters())


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PreconditionedMomentum, dict(lr=-0.1), r"`lr` must be >= 0, got -0.1"),
        (PreconditionedMomentum, dict(lr=torch.tensor(-2.0)), r"`lr` must be >= 0, got -2.0"),
        (PreconditionedMomentum, dict(momentum=1.5), r"`momentum` must be in \[0, 1\], got 1.5"),
        (PreconditionedMomentum, dict(momentum=-0.1), r"`momentum` must be in \[0, 1\], got -0.1"),
        (PreconditionedMomentum, dict(preconditioner="adam"), r"'identity', 'rms', 'newton_schulz', got 'adam'"),
        (PreconditionedMomentum, dict(beta2=1.0), r"`beta2` must be in \[0, 1\), got 1.0"),
        (PreconditionedMomentum, dict(beta2=-0.5), r"`beta2` must be in \[0, 1\), got -0.5"),
        (PreconditionedMomentum, dict(eps=0.0), r"`eps` must be > 0, got 0.0"),
        (PreconditionedMomentum, dict(ns_steps=-1), r"`ns_steps` must be an integer >= 0, got -1"),
        (PreconditionedMomentum, dict(ns_steps=2.5), r"`ns_steps` must be an integer >= 0, got 2.5"),
        (PreconditionedMomentum, dict(weight_decay=-1e-4), r"`weight_decay` must be >= 0, got -0.0001"),
        (PreconditionedMomentum, dict(momentum=float("nan")), r"`momentum` must be in \[0, 1\], got nan"),
        (DeltaMomentum, dict(delta=1.5), r"`delta` must be in \[0, 1\], got 1.5"),
        (DeltaMomentum, dict(delta=-0.5), r"`delta` must be in \[0, 1\], got -0.5"),
        (DeltaMomentum, dict(projection="column"), r"`projection` must be one of 'tensor', 'row', got 'column'"),
        (DeltaMomentum, dict(preconditioner="x"), r"`preconditioner` must be one of .* got 'x'"),
        (DeltaMomentum, dict(momentum=2), r"`momentum` must be in \[0, 1\], got 2"),
    ],
)
def test_bad_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [PreconditionedMomentum, DeltaMomentum])
def test_bad_group_override_raises(cls):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\], got 3.0"):
        cls([{"params": [a]}, {"params": [b], "momentum": 3.0}])
    opt = cls([a])
    with pytest.raises(ValueError, match=r"`eps` must be > 0, got -1"):
        opt.add_param_group({"params": [b], "eps": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_bf16_params_step(cls, kwargs):
    params = make_params(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    opt = cls(groups(params, 0.1), **kwargs)
    run(opt, params, grad_seq(3, dtype=torch.bfloat16))
    for p, w in zip(params, before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, w)
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_reduces_least_squares_loss(cls, kwargs):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 4, generator=gen) + 0.5
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = cls(model.parameters(), lr=0.02, **kwargs)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]
