"""M3 (Algorithm 1, arXiv:2512.24695) against a hand-written reference, the slow-momentum schedule, AdamW, state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nl_lightning.optim.m3 import M3

# a wide matrix and a bias (group 0), a tall conv-like kernel and a bias (group 1)
SHAPES = [(4, 6), (4,), (8, 2, 3), (5,)]
STEPS = 11  # group 0 (slow_every=3) writes M2 at steps 3, 6, 9; group 1 (slow_every=2) five times
DEFAULTS = dict(lr=0.01, betas=(0.9, 0.99, 0.8), alpha=1.0, eps=1e-8, ns_steps=5, slow_every=3, adamw_lr=None)
GROUP1 = dict(
    lr=torch.tensor(0.02, dtype=torch.float64), betas=(0.5, 0.9, 0.5), alpha=0.5, eps=1e-3, ns_steps=3, slow_every=2
)
GROUP1_ADAMW_LR = 0.005


QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's coefficients (NL NeurIPS Sec. 4)


def orthogonalize(m: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference's own quintic Newton-Schulz in float64, from the equations (not the library's): on the matrix
    view ``(rows, rest)``, ``X_0 = M / (||M||_F + 1e-7)``, ``X <- a X + b (X X^T) X + c (X X^T)^2 X``."""
    a, b, c = QUINTIC
    x = m.double().reshape(m.shape[0], -1)
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.reshape(m.shape)


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def grad_seq(steps=STEPS, seed=1, dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def groups(params, wd):
    return [
        {"params": params[:2], "weight_decay": wd},
        {"params": params[2:], **GROUP1, "adamw_lr": GROUP1_ADAMW_LR, "weight_decay": 2 * wd},
    ]


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()


def reference(w, grads, lr, betas, alpha, eps, ns_steps, slow_every, weight_decay, literal, adamw_lr):
    """M3 on one tensor, step by step; the slow block is read straight from the gradient list."""
    (b1, b2, b3), f = betas, slow_every
    w, m1, v = w.detach().clone(), torch.zeros_like(w), torch.zeros_like(w)
    if w.ndim < 2:  # AdamW
        lr = lr if adamw_lr is None else adamw_lr
        for t, g in enumerate(grads, start=1):
            m1 = b1 * m1 + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w * (1 - lr * weight_decay) - lr * (m1 / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        return w

    m2, o2 = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if literal:
            m1 = m1 + b1 * g
            v = v + b2 * g * g
            den = torch.sqrt(v) + eps
        else:
            m1 = b1 * m1 + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            den = torch.sqrt(v / (1 - b2**t)) + eps
        w = w * (1 - lr * weight_decay) - lr * (orthogonalize(m1, ns_steps) + alpha * o2) / den
        if t % f == 0:
            block = sum(grads[t - f : t])  # the f gradients of steps t-f+1 .. t
            m2 = m2 + b3 * block if literal else b3 * m2 + (1 - b3) * block / f
            o2 = orthogonalize(m2, ns_steps)
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("literal", [False, True])
def test_m3_matches_reference(literal, foreach, wd):
    params, grads = make_params(), grad_seq()
    opt = M3(groups(params, wd), literal=literal, foreach=foreach, weight_decay=wd, **DEFAULTS)
    w0 = [p.detach().clone() for p in params]
    run(opt, params, grads)
    for i, p in enumerate(params):
        h = {**DEFAULTS, "weight_decay": wd}
        if i >= 2:
            h.update(GROUP1, lr=float(GROUP1["lr"]), adamw_lr=GROUP1_ADAMW_LR, weight_decay=2 * wd)
        expected = reference(w0[i], [gs[i] for gs in grads], literal=literal, **h)
        # matrices: M3's Newton-Schulz runs in fp32 (a few 1e-7 per entry), the reference's in float64, and the step
        # divides it by sqrt(V_hat) + eps: up to 8e-7 after 11 steps here; vectors (AdamW) match to float64
        tol = 4e-6 if p.ndim >= 2 else 1e-10
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=tol)
        assert int(opt.state[p]["step"]) == STEPS


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("literal", [False, True])
def test_foreach_equals_per_tensor(literal, wd):
    results = []
    for foreach in (False, True):
        params = make_params()
        opt = M3(groups(params, wd), literal=literal, foreach=foreach, **DEFAULTS)
        run(opt, params, grad_seq())
        results.append((params, opt))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            assert torch.equal(value, ob.state[b][key]), key


@pytest.mark.parametrize("literal", [False, True])
def test_slow_momentum_uses_exactly_the_last_block(literal):
    p = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    opt = M3([p], lr=0.01, betas=(0.9, 0.99, 0.8), slow_every=3, literal=literal)
    grads = [g[0] for g in grad_seq(6, shapes=[(3, 2)])]
    state = opt.state[p]
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        if t < 3:  # no slow write yet: O2 = 0, the block sum grows
            assert not state["slow_avg"].any() and not state["slow_orth"].any()
            torch.testing.assert_close(state["slow_acc"], sum(grads[:t]))
        if t == 3:
            first = 0.8 * sum(grads[:3]) if literal else 0.2 * sum(grads[:3]) / 3
            torch.testing.assert_close(state["slow_avg"], first)
            assert not state["slow_acc"].any()
        if t == 4:
            torch.testing.assert_close(state["slow_avg"], first)  # unchanged inside the block
            torch.testing.assert_close(state["slow_acc"], grads[3])
        if t == 6:
            second = first + 0.8 * sum(grads[3:6]) if literal else 0.8 * first + 0.2 * sum(grads[3:6]) / 3
            torch.testing.assert_close(state["slow_avg"], second)
            torch.testing.assert_close(state["slow_orth"], orthogonalize(second, 5), atol=1e-6, rtol=0)  # fp32 NS


def test_slow_term_is_zero_during_the_first_block():
    """alpha weighs O2 only: the trajectories of alpha=0 and alpha=5 agree for f steps and split at step f+1."""
    runs = []
    for alpha in (0.0, 5.0):
        params = make_params()
        opt = M3(params, lr=0.01, alpha=alpha, slow_every=3)
        traj = []
        for gs in grad_seq(4):
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
            traj.append(params[0].detach().clone())
        runs.append(traj)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3], strict=True))
    assert not torch.allclose(runs[0][3], runs[1][3])


@pytest.mark.parametrize("literal", [False, True])
def test_vectors_are_adamw(literal):
    pa = [torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64).requires_grad_()]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    ours = M3(pa, lr=0.5, adamw_lr=0.01, betas=(0.8, 0.95, 0.9), eps=1e-6, weight_decay=0.1, literal=literal)
    adamw = torch.optim.AdamW(pb, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for a, b in zip(pa, pb, strict=True):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        ours.step()
        adamw.step()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------- state and edges
@pytest.mark.parametrize("literal", [False, True])
def test_state_dict_round_trip_mid_block(literal):
    n, k = 4, 7  # stop one step into group 0's second slow block (slow_every=3)
    grads = grad_seq(n + k)
    full = make_params()
    run(M3(groups(full, 0.1), literal=literal, **DEFAULTS), full, grads)

    first = make_params()
    opt = M3(groups(first, 0.1), literal=literal, **DEFAULTS)
    run(opt, first, grads[:n])
    assert opt.state[first[0]]["slow_acc"].any()  # a partial block is in flight
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [w.clone().requires_grad_() for w in ckpt["params"]]
    opt2 = M3(groups(resumed, 0.1), literal=literal, **DEFAULTS)
    opt2.load_state_dict(ckpt["opt"])
    run(opt2, resumed, grads[n:])
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)


def test_bf16_params_step_and_resume_with_fp32_accumulator():
    grads = grad_seq(7, dtype=torch.bfloat16)
    full = make_params(torch.bfloat16)
    before = [p.detach().clone() for p in full]
    run(M3(full, lr=0.01, slow_every=3), full, grads)
    for p, w in zip(full, before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, w)

    first = make_params(torch.bfloat16)
    opt = M3(first, lr=0.01, slow_every=3)
    run(opt, first, grads[:4])
    assert opt.state[first[0]]["slow_acc"].dtype == torch.float32
    assert opt.state[first[0]]["exp_avg"].dtype == torch.bfloat16
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = M3(first, lr=0.01, slow_every=3)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[first[0]]["slow_acc"].dtype == torch.float32  # torch alone would cast it to bf16
    assert torch.equal(opt2.state[first[0]]["slow_acc"], opt.state[first[0]]["slow_acc"])
    run(opt2, first, grads[4:])
    for a, b in zip(full, first, strict=True):
        assert torch.equal(a, b)


def test_param_without_grad_is_untouched():
    params = make_params()
    opt = M3(groups(params, 0.1), **DEFAULTS)
    frozen = params[0].detach().clone()
    grads = [[g if i != 0 else None for i, g in enumerate(gs)] for gs in grad_seq(4)]
    run(opt, params, grads)
    assert torch.equal(params[0], frozen)
    assert params[0] not in opt.state
    assert all(int(opt.state[p]["step"]) == 4 for p in params[1:])


def test_sparse_grad_raises():
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="M3 does not support sparse gradients"):
        M3(emb.parameters()).step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1e-3), r"`lr` must be >= 0, got -0.001"),
        (dict(betas=(0.9, 0.999)), r"`betas` must be a tuple \(beta1, beta2, beta3\), got \(0.9, 0.999\)"),
        (dict(betas=(1.0, 0.999, 0.9)), r"`betas\[0\] \(beta1\)` must be in \[0, 1\), got 1.0"),
        (dict(betas=(0.9, -0.1, 0.9)), r"`betas\[1\] \(beta2\)` must be in \[0, 1\), got -0.1"),
        (dict(betas=(0.9, 0.999, 1.5)), r"`betas\[2\] \(beta3\)` must be in \[0, 1\), got 1.5"),
        (dict(alpha=-1.0), r"`alpha` must be >= 0, got -1.0"),
        (dict(eps=0), r"`eps` must be > 0, got 0"),
        (dict(ns_steps=-2), r"`ns_steps` must be an integer >= 0, got -2"),
        (dict(slow_every=0), r"`slow_every` must be an integer >= 1, got 0"),
        (dict(slow_every=2.5), r"`slow_every` must be an integer >= 1, got 2.5"),
        (dict(weight_decay=-0.1), r"`weight_decay` must be >= 0, got -0.1"),
        (dict(literal="yes"), r"`literal` must be True or False, got 'yes'"),
        (dict(adamw_lr=-1.0), r"`adamw_lr` must be >= 0, got -1.0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M3([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_bad_group_override_raises():
    a, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"`slow_every` must be an integer >= 1, got -4"):
        M3([{"params": [a]}, {"params": [b], "slow_every": -4}])


@pytest.mark.parametrize(("literal", "ratio"), [(False, 0.25), (True, 0.75)])
def test_reduces_least_squares_loss(literal, ratio):
    """The printed sums (``literal``) shrink the step like Adagrad, so they are held to a weaker bar."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 4, generator=gen) + 0.5
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = M3(model.parameters(), lr=0.02, eps=1e-2, adamw_lr=0.05, slow_every=10, literal=literal)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < ratio * losses[0], losses[::10]
