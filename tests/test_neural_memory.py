"""NeuralMemory against a slow, obvious reference: one token at a time, inner gradients by autograd, in float64."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.models.neural_memory import NeuralMemory, NeuralMemoryState, chunk_coefficients

DIM, HEADS = 8, 2
ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


def make(chunk_size: int = 4, depth: int = 2, momentum: bool = True, dtype=torch.float64, **kwargs) -> NeuralMemory:
    """A memory with large, varied gates and a convolution that mixes tokens, so that every term matters."""
    torch.manual_seed(0)
    kwargs = {"lr_max": 1.0, "init_forget": 0.2, "init_mom_decay": 0.7, "max_inner_grad_norm": None, **kwargs}
    mem = NeuralMemory(DIM, heads=HEADS, chunk_size=chunk_size, depth=depth, momentum=momentum, **kwargs)
    with torch.no_grad():
        if mem.conv is not None:
            mem.conv.add_(0.3 * torch.randn_like(mem.conv))
        mem.to_gates.weight.mul_(3.0)
    return mem.to(dtype)


def reference(mem: NeuralMemory, x: torch.Tensor) -> dict:
    """The equations, token by token: u_t by autograd at the chunk's anchor, clipped to ``mem.max_inner_grad_norm``
    (all layers together), then S and M updated after every token.

    Returns ``y``, the ``weights`` and ``momentum`` at the last chunk boundary (what the state holds; the tokens after
    it are pending), each a per-layer list of ``(B, H, out, in)``, the norms of the unclipped ``u_t`` ``(B, H, T)``,
    the ``keys`` and ``values`` ``(B, H, T, hd)``, the ``gates`` ``(B, H, T, G)`` (theta, log(1 - alpha), log eta) and
    the ``chunk_size``.
    """
    batch, seq, dim = x.shape
    hd, chunk = mem.head_dim, mem.chunk_size
    h = F.rms_norm(x, (dim,), mem.norm.weight, mem.norm.eps)
    proj = torch.cat([h @ mem.to_q.weight.T, h @ mem.to_k.weight.T, h @ mem.to_v.weight.T], dim=-1)
    if mem.conv is not None:
        taps = mem.conv  # (3D, K)
        padded = F.pad(proj, (0, 0, mem.conv_size - 1, 0))
        proj = sum(padded[:, j : j + seq] * taps[:, j] for j in range(mem.conv_size))
    q, k, v = (t.reshape(batch, seq, mem.heads, hd) for t in F.silu(proj).split(dim, dim=-1))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    g = (h @ mem.to_gates.weight.T + mem.to_gates.bias).reshape(batch, seq, -1, mem.heads)
    theta, alpha = mem.lr_max * torch.sigmoid(g[:, :, 0]), torch.sigmoid(g[:, :, 1])
    eta = torch.sigmoid(g[:, :, 2]) if mem.momentum else torch.zeros_like(theta)

    def memory(weights, z):
        out = z
        for i, w in enumerate(weights):
            out = w @ out
            out = ACT[mem.activation](out) if i < len(weights) - 1 else out
        return z + out if mem.residual else out

    reads = torch.zeros(batch, seq, mem.heads, hd, dtype=x.dtype)
    norms = torch.zeros(batch, mem.heads, seq, dtype=x.dtype)
    finals, moms = [], []
    for b in range(batch):
        finals.append([]), moms.append([])
        for hh in range(mem.heads):
            weights = [p[hh].detach().clone() for p in mem.memory]
            surprise = [torch.zeros_like(w) for w in weights]
            for t in range(seq):
                if t % chunk == 0:  # a chunk boundary: the anchor of the tokens up to the next one
                    anchor, anchor_surprise = weights, surprise
                reads[b, t, hh] = memory(anchor, q[b, t, hh])
                with torch.enable_grad():
                    leaves = [w.detach().requires_grad_() for w in anchor]
                    loss = (memory(leaves, k[b, t, hh].detach()) - v[b, t, hh].detach()).square().sum()
                    grads = torch.autograd.grad(loss, leaves)
                norms[b, hh, t] = torch.stack([u.square().sum() for u in grads]).sum().sqrt()
                if mem.max_inner_grad_norm is not None:
                    grads = [u * min(1.0, mem.max_inner_grad_norm / norms[b, hh, t]) for u in grads]
                surprise = [eta[b, t, hh] * s - theta[b, t, hh] * u for s, u in zip(surprise, grads, strict=True)]
                weights = [(1 - alpha[b, t, hh]) * w + s for w, s in zip(weights, surprise, strict=True)]
            if seq % chunk:  # the last chunk is unfinished: the state holds its anchor
                weights, surprise = anchor, anchor_surprise
            finals[-1].append(weights), moms[-1].append(surprise)
    y = F.rms_norm(reads, (hd,), mem.out_norm.weight, mem.out_norm.eps).reshape(batch, seq, dim)
    if mem.to_out_gate is not None:
        y = y * 2 * torch.sigmoid(h @ mem.to_out_gate.weight.T)

    def stacked(per_sample):  # [b][head][layer] -> per layer (B, H, out, in)
        return [torch.stack([torch.stack([w[i] for w in heads]) for heads in per_sample]) for i in range(mem.depth)]

    return {
        "y": y @ mem.to_out.weight.T,
        "weights": stacked(finals),
        "momentum": stacked(moms),
        "norms": norms,
        "keys": k.transpose(1, 2),
        "values": v.transpose(1, 2),
        "gates": torch.stack([theta, torch.log1p(-alpha), *([eta.log()] if mem.momentum else [])], -1).transpose(1, 2),
        "chunk_size": chunk,
    }


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def check_state(state: NeuralMemoryState, ref: dict, tol: float = 1e-9) -> None:
    """The state against the reference: weights and momenta at the last chunk boundary, the later tokens pending."""
    for got, want in zip(state.weights, ref["weights"], strict=True):
        close(got, want, tol)
    for got, want in zip(state.momentum, ref["momentum"] if state.momentum else [], strict=True):
        close(got, want, tol)
    pending = ref["keys"].shape[2] % ref["chunk_size"]
    assert state.pending_count == pending
    if pending:
        close(state.pending_keys, ref["keys"][:, :, -pending:], tol)
        close(state.pending_values, ref["values"][:, :, -pending:], tol)
        close(state.pending_gates, ref["gates"][:, :, -pending:], tol)
    else:
        assert state.pending_keys is state.pending_values is state.pending_gates is None


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_parallel_equals_token_by_token(depth, momentum, chunk_size):
    mem = make(chunk_size, depth, momentum)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)  # 11: not a multiple of 4; shorter than 16 (one partial chunk)
    with torch.no_grad():
        y, state = mem(x)
    ref = reference(mem, x)
    close(y, ref["y"])
    check_state(state, ref)
    assert len(state.momentum) == (depth if momentum else 0)
    # the tokens past the last chunk boundary wait in the state, and are written when their chunk completes, also
    # for a sequence shorter than the chunk (Titans pitfall #59)
    full = 11 // chunk_size * chunk_size
    assert state.pending_count == 11 - full
    if full < 11:
        rest = torch.randn(2, full + chunk_size - 11, DIM, dtype=torch.float64)  # completes the chunk
        with torch.no_grad():
            y_rest, state = mem(rest, state)
        ref = reference(mem, torch.cat([x, rest], dim=1))
        close(y_rest, ref["y"][:, 11:])
        check_state(state, ref)
    assert (state.weights[0] - mem.memory[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [{"conv_size": 0}, {"conv_size": 1, "output_gate": False}, {"residual": True}, {"activation": "tanh"}],
)
def test_variants_equal_reference(options):
    mem = make(3, depth=1 if "residual" in options else 3, **options)
    x = torch.randn(1, 7, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, state = mem(x)
    ref = reference(mem, x)
    close(y, ref["y"])
    check_state(state, ref)


def test_chunk_coefficients_against_products():
    torch.manual_seed(1)
    lr, eta, alpha = torch.rand(3, 5, dtype=torch.float64)
    c = chunk_coefficients(lr, torch.log1p(-alpha), eta.log())
    beta, e = torch.cumprod(1 - alpha, 0), torch.cumprod(eta, 0)
    close(c["keep"], beta[-1]), close(c["decay"], e[-1])
    close(c["a_S"], sum(beta[-1] / beta[t] * e[t] for t in range(5)))
    close(c["c_S"], lr * e[-1] / e)
    close(c["c_M"], torch.stack([lr[i] * sum(beta[-1] / beta[t] * e[t] / e[i] for t in range(i, 5)) for i in range(5)]))
    # extreme gates stay finite (log-space products never overflow)
    c = chunk_coefficients(torch.ones(64), torch.full((64,), -80.0), torch.full((64,), -80.0))
    assert all(torch.isfinite(t).all() for t in c.values())


def test_samples_are_isolated():
    mem = make(4)
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, state = mem(x)
        for b in range(3):
            y_b, state_b = mem(x[b : b + 1])
            close(y[b : b + 1], y_b, 1e-12)
            for got, want in zip(state.select(torch.tensor([b])).weights, state_b.weights, strict=True):
                close(got, want, 1e-12)


@pytest.mark.parametrize("splits", [[8, 4, 12], [5, 7, 12], [1, 2, 1, 17, 3]])
def test_carry_across_segments(splits):
    """Segments at any boundaries equal one long pass, values and gradients (through the pending tokens too)."""
    mem = make(4)
    x = torch.randn(2, 24, DIM, dtype=torch.float64)
    y, state = mem(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in mem.parameters()]
    mem.zero_grad()
    outs, s = [], None
    for part in x.split(splits, dim=1):
        out, s = mem(part, s)
        outs.append(out)
    close(torch.cat(outs, 1), y, 1e-12)
    close(s.weights[1], state.weights[1], 1e-12)
    torch.cat(outs, 1).square().sum().backward()
    for p, g in zip(mem.parameters(), grads, strict=True):
        close(p.grad, g, 1e-10)


def test_gradients_reach_every_parameter():
    mem = make(4, dtype=torch.float32)
    y, _ = mem(torch.randn(2, 12, DIM))
    y.square().sum().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inference_mode_and_detached_state():
    mem = make(4, dtype=torch.float32)
    x, x2 = torch.randn(2, 10, DIM), torch.randn(2, 6, DIM)
    with torch.inference_mode():
        y, state = mem(x)
    with torch.no_grad():
        y_ref, state_ref = mem(x)
    close(y, y_ref, 1e-6)
    close(state.weights[0], state_ref.weights[0], 1e-6)
    out, _ = mem(x2, state.detach())  # usable outside inference mode, with gradients to the parameters
    out.square().sum().backward()
    assert mem.to_q.weight.grad.abs().sum() > 0 and mem.memory[0].grad is None  # the detached state is a leaf
    close(out, mem(x2, state_ref)[0], 1e-6)


def test_autocast_bf16_keeps_state_fp32():
    torch.manual_seed(0)
    mem = NeuralMemory(DIM, heads=HEADS, chunk_size=4)  # default gates (make()'s lr_max = 1 is for exactness tests)
    x = torch.randn(2, 12, DIM)
    with torch.no_grad():
        want, _ = mem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = mem(x)
            y2, state = mem(x, state)
    assert y.dtype == y2.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in (*state.weights, *state.momentum, state.conv))
    assert torch.isfinite(y2).all() and all(torch.isfinite(t).all() for t in state.weights)
    assert (y.float() - want).norm() < 0.05 * want.norm()


def test_state_helpers_and_read_only():
    mem = make(4, dtype=torch.float32)
    x = torch.randn(3, 9, DIM)
    y, state = mem(x)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    loaded = NeuralMemoryState.from_state_dict(torch.load(buffer, weights_only=True))
    close(mem(x, loaded)[0], mem(x, state.detach())[0], 1e-6)
    assert loaded.to(torch.float64).weights[0].dtype == torch.float64
    assert loaded.pending_count == 1 and torch.equal(loaded.pending_gates, state.pending_gates)  # 9 = 2 * 4 + 1
    picked = state.select(torch.tensor([0, 2]))
    assert picked.weights[0].shape[0] == 2 and picked.conv.shape == (2, 3, 3 * DIM)
    assert picked.pending_keys.shape == picked.pending_values.shape == (2, HEADS, 1, DIM // HEADS)
    assert picked.pending_gates.shape == (2, HEADS, 1, 3)
    # read only: the state comes back untouched, and every token reads it (as the rest of the current chunk would)
    read, same = mem(x, state, write=False)
    assert same is state and set(mem.last_stats) == {"surprise", "weight_norm", "lr", "forget", "mom_decay"}
    mem.chunk_size = 10  # the pending token and the 9 of x make one chunk
    close(read, mem(x, state)[0], 1e-6)
    mem.chunk_size = 4
    mem(x, state)
    assert mem.last_stats["surprise"] > 0 and mem.last_stats["grad_norm"] > 0
    assert 0 < mem.last_stats["forget"] < 1 and mem.last_stats["lr"] <= mem.lr_max
    with pytest.raises(ValueError, match="does not fit"):
        mem(x[:2], state)


def test_initial_gates():
    mem = NeuralMemory(16, heads=4, lr_max=0.1)
    mem(torch.randn(2, 8, 16))
    stats = mem.last_stats
    assert abs(stats["forget"] - 0.01) < 0.01 and abs(stats["mom_decay"] - 0.9) < 0.05
    assert abs(stats["lr"] - 0.05) < 0.02


def test_training_learns_in_context_recall():
    """Pairs (key, value) are shown in chunk 1 and queried (key, 0) in chunk 2: only the memory can answer."""
    torch.manual_seed(0)
    dim, half, pairs = 32, 16, 8
    mem = NeuralMemory(dim, heads=2, chunk_size=pairs, depth=2, lr_max=0.5)
    opt = torch.optim.AdamW(mem.parameters(), lr=1e-2)

    def batch(size=32):
        keys = F.normalize(torch.randn(size, pairs, half), dim=-1) * half**0.5
        values = torch.randn(size, pairs, half)
        order = torch.argsort(torch.rand(size, pairs), dim=1)
        queried = torch.gather(keys, 1, order[..., None].expand(-1, -1, half))
        x = torch.cat([torch.cat([keys, values], -1), torch.cat([queried, torch.zeros_like(queried)], -1)], 1)
        return x, torch.gather(values, 1, order[..., None].expand(-1, -1, half))

    def loss(x, target, write=True):
        y, _ = mem(x, write=write)
        return F.mse_loss(y[:, pairs:, half:], target)

    for _ in range(80):
        opt.zero_grad()
        loss(*batch()).backward()
        opt.step()
    with torch.no_grad():
        x, target = batch(256)
        final, without_writes = loss(x, target), loss(x, target, write=False)
    assert final < 0.75 * target.square().mean()  # better than predicting 0 (the values' variance is 1; ~0.5 here)
    assert final < 0.75 * without_writes  # thanks to what was written (reading the initial memory gives ~1.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 10, "heads": 4}, "divisible"),
        ({"dim": 8, "depth": 0}, "depth"),
        ({"dim": 8, "chunk_size": 0}, "chunk_size"),
        ({"dim": 8, "heads": 0}, "heads"),
        ({"dim": 8, "expansion": 0.0}, "expansion"),
        ({"dim": 8, "activation": "swish"}, "activation"),
        ({"dim": 8, "lr_max": 0.0}, "lr_max"),
        ({"dim": 8, "init_lr": 0.5}, "init_lr"),
        ({"dim": 8, "init_forget": 1.0}, "init_forget"),
        ({"dim": 8, "init_mom_decay": 0.0}, "init_mom_decay"),
        ({"dim": 8, "conv_size": -1}, "conv_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="batch, seq, dim"):
        NeuralMemory(8, heads=2)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="empty sequence"):
        NeuralMemory(8, heads=2)(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="does not fit"):  # a state of a memory without convolution
        NeuralMemory(8, heads=2)(torch.randn(2, 5, 8), NeuralMemory(8, heads=2, conv_size=0).initial_state(2))
    _, state = NeuralMemory(8, heads=2, chunk_size=8)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="does not fit"):  # 5 pending tokens: more than a chunk of 4 can hold
        NeuralMemory(8, heads=2, chunk_size=4)(torch.randn(2, 5, 8), state)
    with pytest.raises(ValueError, match="does not fit"):  # pending gates of a memory without momentum
        NeuralMemory(8, heads=2, chunk_size=8, momentum=False)(torch.randn(2, 5, 8), replace(state, momentum=()))


def test_inner_gradient_clipping_keeps_the_memory_finite_and_is_exact_when_inactive():
    key = torch.randn(1, 1, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = key.expand(2, 256, DIM).clone()  # one key, repeated: every chunk sums 16 gradients at the same anchor
    wild = make(chunk_size=16, lr_max=5.0)(x)[1]
    tame = make(chunk_size=16, lr_max=5.0, max_inner_grad_norm=1.0)(x)[1]

    def size(state):
        return max(float(w.detach().abs().max()) if torch.isfinite(w).all() else math.inf for w in state.weights)

    assert size(wild) > 1e6  # the printed equation blows up (or overflows) on such a stream
    assert size(tame) < 1e3
    loose = make(chunk_size=4, max_inner_grad_norm=1e30)  # never active: identical to no clipping
    x = torch.randn(2, 11, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loose(x)[0], make(chunk_size=4)(x)[0])


def make_default(chunk_size: int = 64, seed: int = 0) -> NeuralMemory:
    """The default memory (clipping at ``max_inner_grad_norm = 1``, ``lr_max``, momentum, forgetting, convolution,
    output gate), float64, with a random convolution and output gate so that they mix tokens and matter."""
    torch.manual_seed(seed)
    mem = NeuralMemory(DIM, heads=HEADS, chunk_size=chunk_size).double()
    with torch.no_grad():
        mem.conv.add_(0.5 * torch.randn_like(mem.conv))
        mem.to_out_gate.weight.normal_()
    return mem


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def assert_same_state(a: NeuralMemoryState, b: NeuralMemoryState, tol: float = 1e-8) -> None:
    """Every field equal: weights, momenta, convolution inputs and the pending tokens."""
    da, db = a.state_dict(), b.state_dict()
    assert da.keys() == db.keys()
    for name in da:
        x, y = da[name], db[name]
        if x is None or y is None:
            assert x is None and y is None, name
        elif isinstance(x, list):
            assert len(x) == len(y), name
            assert all(max_diff(t, u) <= tol for t, u in zip(x, y, strict=True)), name
        else:
            assert x.shape == y.shape and max_diff(x, y) <= tol, (name, max_diff(x, y) if x.shape == y.shape else None)


def split_points(mode: str, length: int, chunk_size: int) -> list[int]:
    """Segment lengths: one token at a time, a prompt then one token at a time, or random segments (fixed seed)."""
    if mode == "tokens":
        return [1] * length
    if mode == "prompt":
        prompt = (length + 1) // 2
        return [prompt] + [1] * (length - prompt)
    gen = torch.Generator().manual_seed(1000 * chunk_size + length)
    cuts = sorted(torch.randperm(length - 1, generator=gen)[:4].add(1).tolist()) if length > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]


@pytest.mark.parametrize("mode", ["tokens", "prompt", "random"])
@pytest.mark.parametrize("length", [1, 5, 16, 23, 37])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_streaming_equals_one_pass(mode, length, chunk_size):
    """Carrying the state across calls of any lengths equals one pass: outputs and every field of the final state."""
    mem = make_default(chunk_size)
    x = torch.randn(2, length, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    splits = split_points(mode, length, chunk_size)
    with torch.no_grad():
        y, state = mem(x)
        outs, streamed = [], None
        for part in x.split(splits, dim=1):
            out, streamed = mem(part, streamed)
            outs.append(out)
    assert max_diff(torch.cat(outs, dim=1), y) <= 1e-8
    assert streamed.pending_count == state.pending_count == length % chunk_size
    assert_same_state(streamed, state)


@pytest.mark.parametrize("chunk_size", [64, 4])
def test_default_memory_equals_clipped_reference(chunk_size):
    """The default settings, inner-gradient clipping active, against the token-by-token reference."""
    mem = make_default(chunk_size)
    seq = 3 * chunk_size + chunk_size // 2 + 1  # several chunks and a partial one
    x = torch.randn(2, seq, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, state = mem(x)
    ref = reference(mem, x)
    assert mem.max_inner_grad_norm == 1.0 and (ref["norms"] > 1.0).sum() > seq  # clipping is active on many tokens
    assert (ref["norms"] < 1.0).any()  # and not on every token
    assert max_diff(y, ref["y"]) <= 1e-8
    check_state(state, ref, tol=1e-8)
    unclipped = make_default(chunk_size)
    unclipped.max_inner_grad_norm = None
    with torch.no_grad():
        assert max_diff(unclipped(x)[0], y) > 1e-3  # the clipping changes the outputs


def test_stats_of_a_call_that_writes_no_chunk():
    mem = make_default(4)
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    with torch.no_grad():
        mem(x[:, :1])  # one token: read at the anchor, nothing written
        assert "grad_norm" not in mem.last_stats and mem.last_stats["surprise"] > 0
        _, state = mem(x)
        stats = dict(mem.last_stats)
        mem(x, mem.initial_state(2, dtype=torch.float64), write=False)  # the same reads, at the same anchor
    assert "grad_norm" not in stats and torch.allclose(stats["surprise"], mem.last_stats["surprise"])
    with torch.no_grad():
        mem(torch.randn(2, 2, DIM, dtype=torch.float64), state)  # 3 pending + 2: one chunk written
    assert mem.last_stats["grad_norm"] > 0
