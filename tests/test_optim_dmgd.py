"""DMGD against a slow, obvious reference (row by row, inner gradients by autograd, float64) and the sanity checks."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.optim.dmgd import DMGD

ACT = {"silu": F.silu, "tanh": torch.tanh, "relu": F.relu}
HP = ("lr", "momentum", "memory_lr", "objective", "key", "output", "activation", "ns_steps", "weight_decay")
QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's coefficients (NL NeurIPS Sec. 4)


def orthogonalize(u: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference's own quintic Newton-Schulz in float64, from the equations (not the library's):
    ``X_0 = U / (||U||_F + 1e-7)``, ``X <- a X + b (X X^T) X + c (X X^T)^2 X``."""
    a, b, c = QUINTIC
    x = u.double() / (torch.linalg.matrix_norm(u.double()) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x


class Reference:
    """One parameter's DMGD, one row (or element) at a time, with the inner gradient taken by autograd in float64."""

    def __init__(self, p: torch.Tensor, hidden: int, seed: int, index: int) -> None:
        self.shape = p.shape
        if p.ndim < 2:  # one scalar memory per element, key 1
            self.phi = {"m": torch.zeros(p.numel(), dtype=torch.float64)}
            return
        c = p.numel() // p.shape[0]
        self.phi = {"M": torch.zeros(c, c, dtype=torch.float64)}
        if hidden > 0:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**32)
            self.phi["W2"] = torch.randn(hidden, c, generator=gen).double()
            self.phi["W1"] = torch.zeros(c, hidden, dtype=torch.float64)

    def memory(self, z: torch.Tensor, act: str) -> torch.Tensor:
        out = self.phi["M"] @ z
        if "W1" in self.phi:
            out = out + self.phi["W1"] @ ACT[act](self.phi["W2"] @ z)
        return out

    def step(self, w: torch.Tensor, grad: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
        alpha, eta = hp["momentum"], hp["memory_lr"]
        if len(self.shape) < 2:
            phi = self.phi["m"].clone().requires_grad_()
            with torch.enable_grad():
                loss = 0
                for i, g in enumerate(grad.reshape(-1)):
                    read, value = phi[i] * 1.0, -g
                    loss = loss + (0.5 * (read - value) ** 2 if hp["objective"] == "l2" else -read * value)
                (dphi,) = torch.autograd.grad(loss, phi)
            self.phi["m"] = alpha * self.phi["m"] - eta * dphi
            u = self.phi["m"].reshape(1, -1)
        else:
            rows = grad.reshape(self.shape[0], -1)
            c = rows.shape[1]
            keys = [g / max(g.norm(), 1e-12) if hp["key"] == "gradient" else torch.full_like(g, c**-0.5) for g in rows]
            params = {name: t.clone().requires_grad_() for name, t in self.phi.items()}
            with torch.enable_grad():
                old, self.phi = self.phi, params
                loss = 0
                for k, g in zip(keys, rows, strict=True):
                    read = self.memory(k, hp["activation"])
                    if hp["objective"] == "l2":
                        loss = loss + 0.5 * (read + g).pow(2).sum()
                    else:
                        loss = loss - (read * -g).sum()
                loss = loss / len(rows)
                grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
                self.phi = old
            retain = {name: 1.0 if name == "W2" else alpha for name in self.phi}  # the key projection keeps no decay
            self.phi = {name: retain[name] * t - eta * grads[name] for name, t in self.phi.items()}
            u = torch.stack([self.memory(k, hp["activation"]) for k in keys])
        if hp["output"] == "tanh":
            u = torch.tanh(u)
        elif hp["output"] == "newton_schulz":
            u = orthogonalize(u, hp["ns_steps"])
        return w * (1 - hp["lr"] * hp["weight_decay"]) + hp["lr"] * u.reshape(w.shape)


def fake_grad(w: torch.Tensor, t: int, i: int) -> torch.Tensor:
    """A gradient that depends on the weights (so errors would propagate) and on the step."""
    gen = torch.Generator().manual_seed(1000 * t + i)
    return 0.5 * w + torch.randn(w.shape, generator=gen, dtype=torch.float64)


def run_both(
    groups_hp: list[dict[str, Any]],
    shapes: list[list[tuple[int, ...]]],
    steps: int = 7,
    seed: int = 3,
    shared_grads: bool = False,
):
    """Run DMGD and the reference side by side; return the two lists of final weights.

    By default each side computes its gradients from its own weights, so a difference anywhere feeds back into every
    later step. ``shared_grads=True`` hands the reference DMGD's gradient instead: each step then differs only by its
    own arithmetic, which is what a comparison against a float64 Newton-Schulz needs (DMGD's runs in fp32, and the
    weight-dependent gradients would otherwise amplify that rounding through the memory's dynamics, to 5e-5 here).
    """
    gen = torch.Generator().manual_seed(0)
    params = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in group] for group in shapes]
    tensors = [p.clone().requires_grad_() for p in itertools.chain(*params)]
    it = iter(tensors)
    groups = [{"params": [next(it) for _ in group], **hp} for group, hp in zip(shapes, groups_hp, strict=True)]
    opt = DMGD(groups, seed=seed)
    refs, ref_w, ref_hp = [], [], []
    for group in opt.param_groups:
        for p in group["params"]:
            refs.append(Reference(p, group["hidden"], seed, len(refs)))
            ref_w.append(p.detach().clone())
            ref_hp.append(group)
    for t in range(steps):
        if t == 4:  # an external rule scales alpha between steps
            for group in opt.param_groups:
                group["momentum"] *= 0.9
        for i, p in enumerate(tensors):
            p.grad = fake_grad(p.detach(), t, i)
            ref_grad = p.grad.clone() if shared_grads else fake_grad(ref_w[i], t, i)
            ref_w[i] = refs[i].step(ref_w[i], ref_grad, {k: ref_hp[i][k] for k in HP})
        opt.step()
    return [p.detach() for p in tensors], ref_w


COMBOS = list(itertools.product((0, 8), ("l2", "dot"), ("gradient", "constant"), ("none", "tanh", "newton_schulz")))


@pytest.mark.parametrize(("hidden", "objective", "key", "output"), COMBOS)
def test_matches_reference(hidden, objective, key, output):
    flip = {"l2": "dot", "dot": "l2", "gradient": "constant", "constant": "gradient"}
    group_a = dict(
        lr=0.3, momentum=0.9, memory_lr=0.4, hidden=hidden, objective=objective, key=key, output=output,
        activation="silu", weight_decay=0.1,
    )  # fmt: skip
    group_b = dict(
        lr=0.7, momentum=0.8, memory_lr=0.8, hidden=8 - hidden, objective=flip[objective], key=flip[key],
        output=output, activation="tanh", ns_steps=3,
    )  # fmt: skip
    shapes = [[(5, 7), (3, 2, 2), (6,)], [(4, 3), (1, 5), (2,)]]
    ns = output == "newton_schulz"
    got, want = run_both([group_a, group_b], shapes, shared_grads=ns)
    # DMGD's Newton-Schulz runs in fp32 (about 3e-7 per entry of its output here, at the scale of fp32 rounding), the
    # reference's in float64: 7 steps of lr <= 0.7 add up to about 1.2e-6; everything else matches to float64
    tol = 5e-6 if ns else 1e-10
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=0 if ns else tol)


@pytest.mark.parametrize("activation", ["silu", "tanh", "relu"])
def test_matches_reference_activations(activation):
    hp = dict(lr=0.5, momentum=0.9, memory_lr=0.5, hidden=6, activation=activation, output="none")
    got, want = run_both([hp], [[(5, 7), (4, 3, 2)]], steps=8)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def sanity_run(shape, objective, key, steps=6, alpha=0.9, eta=0.3):
    """DMGD with a linear memory, no output nonlinearity and lr 1; returns weights and gradients per step."""
    p = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = DMGD([p], lr=1.0, momentum=alpha, memory_lr=eta, hidden=0, objective=objective, key=key, output="none")
    gen = torch.Generator().manual_seed(7)
    weights, grads = [p.detach().clone()], []
    for _ in range(steps):
        grads.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        p.grad = grads[-1].clone()
        opt.step()
        weights.append(p.detach().clone())
    return weights, grads


@pytest.mark.parametrize("shape", [(1, 5), (5,)])
@pytest.mark.parametrize(("objective", "decay"), [("dot", 0.9), ("l2", 0.9 - 0.3)])
def test_sanity_heavy_ball_and_ema(shape, objective, decay):
    """(a) dot + constant key: m <- alpha m - eta g, W <- W + m; (b) l2 + constant key: decay alpha - eta."""
    weights, grads = sanity_run(shape, objective, "constant")
    w, m = weights[0], torch.zeros(shape, dtype=torch.float64)
    for t, g in enumerate(grads):
        m = decay * m - 0.3 * g
        w = w + m
        torch.testing.assert_close(weights[t + 1], w, atol=1e-12, rtol=1e-12)


def test_sanity_delta_momentum():
    """(c) l2 + gradient key: M <- M (alpha I - eta gh gh^T) - eta g gh^T, W <- W + M gh (dmgd docstring)."""
    weights, grads = sanity_run((1, 5), "l2", "gradient")
    w, big_m = weights[0], torch.zeros(5, 5, dtype=torch.float64)
    for t, g in enumerate(grads):
        g = g.reshape(5)
        gh = g / g.norm()
        big_m = big_m @ (0.9 * torch.eye(5, dtype=torch.float64) - 0.3 * torch.outer(gh, gh)) - 0.3 * torch.outer(g, gh)
        w = w + big_m @ gh
        torch.testing.assert_close(weights[t + 1], w, atol=1e-12, rtol=1e-12)


def test_one_dimensional_newton_schulz_is_normalized_momentum():
    """For a 1-D parameter, NS of the (1, n) read is m / ||m|| times the quintic's image of 1."""
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = DMGD([p], lr=1.0, output="newton_schulz", ns_steps=5)
    p.grad = torch.randn(6, dtype=torch.float64)
    opt.step()
    m = opt.state[p]["m"]
    s = 1.0
    for _ in range(5):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    torch.testing.assert_close(p.detach(), s * m / m.norm(), atol=1e-5, rtol=1e-5)
    assert s == pytest.approx(0.696, abs=1e-3)  # the value the docstring quotes


def train(p_shapes, steps, mode=None, split=None):
    """A few steps with fixed gradients; optionally inside a context for the first `split` steps."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in p_shapes]
    opt = DMGD(ps, lr=0.1, hidden=4, output="none")
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))
        if mode is not None and t < split:
            with mode():
                opt.step()
        else:
            opt.step()
    return ps, opt


def test_inference_mode():
    shapes = [(4, 3), (3,)]
    want, _ = train(shapes, 5)
    got, _ = train(shapes, 5, mode=torch.inference_mode, split=3)  # 3 steps inside, 2 outside
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.detach(), w.detach())
    got, _ = train(shapes, 3, mode=torch.inference_mode, split=3)  # every step inside
    for g, w in zip(got, train(shapes, 3)[0], strict=True):
        assert torch.equal(g.detach(), w.detach())


def test_seed_determines_memory_without_global_rng():
    def memories(seed):
        ps = [torch.zeros(4, 6, requires_grad=True), torch.zeros(4, 6, requires_grad=True)]
        opt = DMGD(ps, hidden=5, seed=seed)
        for p in ps:
            p.grad = torch.ones_like(p)
        rng = torch.get_rng_state()
        opt.step()
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither read nor advanced
        return [opt.state[p]["W2"] for p in ps]

    torch.manual_seed(0)
    a = memories(seed=1)
    torch.manual_seed(123)
    b = memories(seed=1)
    c = memories(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # each parameter index gets its own draw


def test_state_dict_round_trip_continues_exactly():
    shapes = [(5, 4), (4,), (3, 2, 2)]

    def model():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]

    def make(ps):
        return DMGD(
            [{"params": ps[:2]}, {"params": ps[2:], "output": "newton_schulz", "lr": 0.05}],
            lr=0.1, hidden=3, output="tanh", weight_decay=0.01,
        )  # fmt: skip

    def steps(ps, opt, ts):
        for t in ts:
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))
            opt.step()

    ref = model()
    ref_opt = make(ref)
    steps(ref, ref_opt, range(10))

    first = model()
    first_opt = make(first)
    steps(first, first_opt, range(5))
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": first_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(ckpt["optim"])
    steps(resumed, resumed_opt, range(5, 10))

    for a, b in zip(resumed, ref, strict=True):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(resumed, ref, strict=True):
        sa, sb = resumed_opt.state[a], ref_opt.state[b]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 10
        assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "step")


def test_load_state_dict_keeps_fp32_memory_for_bf16_params():
    p = torch.zeros(3, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = DMGD([p], hidden=2)
    p.grad = torch.randn(3, 4).bfloat16()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
    assert all(v.dtype == torch.float32 for v in saved.values())
    opt2 = DMGD([p], hidden=2)
    opt2.load_state_dict(opt.state_dict())
    assert all(torch.equal(opt2.state[p][k], v) for k, v in saved.items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, "-0.1"),
        ({"momentum": 1.5}, "1.5"),
        ({"momentum": -0.2}, "-0.2"),
        ({"memory_lr": -0.01}, "-0.01"),
        ({"memory_lr": 0.97}, "0.97"),
        ({"hidden": -1}, "-1"),
        ({"hidden": 2.5}, "2.5"),
        ({"objective": "cosine"}, "'cosine'"),
        ({"key": "random"}, "'random'"),
        ({"output": "sign"}, "'sign'"),
        ({"activation": "gelu"}, "'gelu'"),
        ({"ns_steps": -2}, "-2"),
        ({"weight_decay": -0.5}, "-0.5"),
        ({"seed": "zero"}, "'zero'"),
    ],
)
def test_bad_arguments(kwargs, match):
    p = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        DMGD([p], **kwargs)
    with pytest.raises(ValueError, match=match):  # also as a group override
        DMGD([{"params": [p], **kwargs}])


def test_bad_string_lists_allowed_values():
    with pytest.raises(ValueError, match="'l2', 'dot'"):
        DMGD([torch.zeros(2, requires_grad=True)], objective="mse")


def test_grad_none_is_untouched():
    a, b = torch.ones(3, 2, requires_grad=True), torch.ones(3, 2, requires_grad=True)
    opt = DMGD([a, b], weight_decay=0.1)
    a.grad = torch.ones(3, 2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3, 2)) and len(opt.state[b]) == 0
    assert not torch.equal(a.detach(), torch.ones(3, 2))


@pytest.mark.parametrize(("output", "lr"), [("newton_schulz", 0.05), ("none", 0.5)])
def test_loss_decreases_on_least_squares(output, lr):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 4, generator=gen)
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    opt = DMGD(lin.parameters(), lr=lr, output=output)

    def loss_fn():
        return F.mse_loss(lin(x), y)

    start = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.05 * start
