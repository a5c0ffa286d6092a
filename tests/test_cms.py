"""ContinuumMemory against slow, obvious references: token-by-token writes with autograd, per sample, in float64."""

from __future__ import annotations

import io
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from nl_lightning import LevelSet
from nl_lightning.models import CMSState, ContinuumMemory

_ELEMENTWISE = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "gelu_new": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
}


def _gated(act):
    def glu(z):  # z (..., 2H): the gate's units, then the up projection's
        gate, up = z.chunk(2, dim=-1)
        return act(gate) * up

    return glu


ACT = {**_ELEMENTWISE, **{f"glu_{name}": _gated(act) for name, act in _ELEMENTWISE.items()}}


def reference(
    cms: ContinuumMemory,
    x: torch.Tensor,
    create_graph: bool = False,
    first_order: bool = False,
    cut_at: Optional[int] = None,
    detach: bool = False,
) -> tuple[torch.Tensor, list]:
    """One sample and one token at a time; each token's gradient by autograd at the chunk's anchor weights.

    ``create_graph``: the writes are differentiable (second order). ``first_order``: the reads keep the fast weights'
    graph to the parameters; each token's gradient is taken at a detached anchor and a detached input, so the writes
    keep only the graph of their targets ``v = W_v k`` to the value projection ``W_v`` (not to the key ``k``).
    ``cut_at``: a segment boundary before that token (first order): the fast weights lose the graph of the targets
    written before it and the pending sums all their graph (first order across calls), or, with ``detach``, the fast
    weights lose every graph. Returns the output and, per level, the final fast weights of every sample.
    """
    h = x.double()
    finals = []
    for blk in cms.blocks:
        params = [p.double() for p in (blk.w1, blk.b1, blk.w2, blk.b2)]
        value = blk.value.double()
        outs, per_sample = [], []
        for b in range(h.shape[0]):
            fast = [p.clone() if create_graph or first_order else p.detach().clone() for p in params]
            plain = fast  # first order: the fast weights without the targets' graph (what a call hands the next)
            pending, count, rows = [torch.zeros_like(p) for p in params], 0, []
            for t in range(h.shape[1]):
                if t == cut_at:
                    fast = plain = [w.detach() for w in plain] if detach else plain
                    pending = [p.detach() for p in pending]
                anchor = fast if create_graph else [w.detach().requires_grad_() for w in fast]
                k = F.rms_norm(h[b, t], (h.shape[-1],), blk.norm.weight.double(), blk.norm.eps)
                k_in = k.detach() if first_order else k
                y = anchor[2] @ ACT[blk.activation](anchor[0] @ k_in + anchor[1]) + anchor[3]
                read = fast[2] @ ACT[blk.activation](fast[0] @ k + fast[1]) + fast[3] if first_order else y
                rows.append(h[b, t] + read if blk.residual else read)
                if blk.inner_lr > 0:
                    loss = 0.5 * (y - value @ k_in).pow(2).sum()
                    grads = torch.autograd.grad(loss, anchor, create_graph=create_graph or first_order)
                    pending = [p + g for p, g in zip(pending, grads, strict=True)]
                count += 1
                if count == blk.chunk_size:
                    scale = blk.inner_lr / (blk.chunk_size if blk.reduction == "mean" else 1)
                    rho = blk.retention  # w <- w0 + rho (w - w0) - f * scale * g
                    step = [scale * g for g in pending]
                    if blk.max_write_norm is not None and scale > 0:  # f: the step's norm (4 weights) <= the bound
                        f = (blk.max_write_norm / torch.sqrt(sum(s.pow(2).sum() for s in step))).clamp(max=1.0)
                        step = [(f.detach() if first_order else f) * s for s in step]  # first order: f a constant
                    fast = [w0 + rho * (w - w0) - s for w, w0, s in zip(fast, params, step, strict=True)]
                    plain = [w0 + rho * (w - w0) - s.detach() for w, w0, s in zip(plain, params, step, strict=True)]
                    pending, count = [torch.zeros_like(p) for p in params], 0
            outs.append(torch.stack(rows))
            per_sample.append(fast)
        h = torch.stack(outs)
        finals.append(per_sample)
    return h, finals


def make(chunk_sizes=(3, 5), **kwargs) -> ContinuumMemory:
    torch.manual_seed(0)
    kwargs.setdefault("inner_lr", [0.5, 0.2, 0.1][: len(chunk_sizes)])
    return ContinuumMemory(6, list(chunk_sizes), hidden_mult=2.0, in_context=True, **kwargs)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "gelu_new", "silu", "relu", "tanh"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunk_parallel_equals_token_by_token(activation, reduction, gated):
    """Sequence 13 over chunks 3 and 5: full chunks, a trailing partial chunk, two levels feeding each other; plain and
    gated (SwiGLU-style) levels."""
    lrs = [0.5, 0.2] if reduction == "mean" else [0.1, 0.04]  # a sum of C gradients takes smaller steps
    cms = make(activation=activation, reduction=reduction, inner_lr=lrs, gated=gated)
    with torch.no_grad():  # a non-identity value projection, so the targets are not the inputs
        for blk in cms.blocks:
            blk.value.add_(0.3 * torch.randn_like(blk.value))
    x = torch.randn(2, 13, 6)
    y, state = cms(x)
    y_ref, finals = reference(cms, x)
    assert torch.allclose(y.double(), y_ref, atol=1e-5), (y.double() - y_ref).abs().max()
    for lvl, ref in zip(state.levels, finals, strict=True):
        for b in range(2):
            for got, want in zip(lvl.weights, ref[b], strict=True):
                assert torch.allclose(got[b].double(), want, atol=1e-5)
    assert [lvl.count for lvl in state.levels] == [13 % 3, 13 % 5]
    # the writes matter: the same module with inner_lr = 0 reads differently after the first chunk
    frozen = make(activation=activation, reduction=reduction, inner_lr=0.0, gated=gated)
    frozen.load_state_dict(cms.state_dict())
    read = frozen(x)[0]
    assert torch.allclose(read[:, :3], y[:, :3], atol=1e-6) and not torch.allclose(read[:, 3:], y[:, 3:], atol=1e-3)


@pytest.mark.parametrize("retention", [0.6, [0.3, 0.9]])
def test_retention_equals_token_by_token(retention):
    """Writes that pull the fast weights back towards the parameters, one value or one per level."""
    cms = make(retention=retention)
    with torch.no_grad():
        for blk in cms.blocks:
            blk.value.add_(0.3 * torch.randn_like(blk.value))
    x = torch.randn(2, 17, 6)
    y, state = cms(x)
    y_ref, finals = reference(cms, x)
    assert [blk.retention for blk in cms.blocks] == (retention if isinstance(retention, list) else [retention] * 2)
    assert torch.allclose(y.double(), y_ref, atol=1e-5), (y.double() - y_ref).abs().max()
    for lvl, ref in zip(state.levels, finals, strict=True):
        for got, want in zip(lvl.weights, ref[1], strict=True):
            assert torch.allclose(got[1].double(), want, atol=1e-5)
    plain = make()  # same parameters, no pull back: the weights end elsewhere
    plain.load_state_dict(cms.state_dict())
    assert not torch.allclose(plain(x)[1].levels[0].w1, state.levels[0].w1, atol=1e-4)


def test_retention_keeps_a_long_stream_near_the_initial_weights():
    """Over 150 writes, plain writes wander off; with retention rho the distance from the parameters stays
    below the largest single step divided by 1 - rho (the geometric bound), measured write by write."""
    torch.manual_seed(0)
    x = torch.randn(1, 600, 6)
    dist = {}
    for rho in (1.0, 0.5):
        cms = ContinuumMemory(6, [4], hidden_mult=2.0, in_context=True, inner_lr=0.2, retention=rho)
        blk, state, steps, d = cms.blocks[0], None, [], []
        w0 = torch.cat([p.detach().flatten() for p in (blk.w1, blk.b1, blk.w2, blk.b2)])
        with torch.no_grad():
            for t in range(0, 600, 4):
                before = state.levels[0] if state is not None else blk.initial_state(1)
                _, state = cms(x[:, t : t + 4], state)
                after = torch.cat([w[0].flatten() for w in state.levels[0].weights])
                prev = torch.cat([w[0].flatten() for w in before.weights])
                steps.append((after - (w0 + rho * (prev - w0))).norm())  # this write's gradient step
                d.append((after - w0).norm())
        dist[rho] = (max(d), max(steps))
    assert dist[0.5][0] <= dist[0.5][1] / (1 - 0.5) + 1e-5
    assert dist[1.0][0] > 2 * dist[0.5][0]


def test_batched_equals_one_by_one():
    cms = make()
    x = torch.randn(4, 11, 6)
    y, state = cms(x)
    for b in range(4):
        y_b, state_b = cms(x[b : b + 1])
        assert torch.allclose(y[b : b + 1], y_b, atol=1e-6)
        for lvl, lvl_b in zip(state.levels, state_b.levels, strict=True):
            assert all(torch.allclose(w[b], wb[0], atol=1e-6) for w, wb in zip(lvl.weights, lvl_b.weights, strict=True))


@pytest.mark.parametrize("split", [4, 6, 10])
def test_two_segments_equal_one_long_segment(split):
    """Carrying the state over a segment boundary (mid-chunk or on it) equals reading the whole sequence at once."""
    cms = make()
    x = torch.randn(2, 16, 6)
    y, state = cms(x)
    y1, mid = cms(x[:, :split])
    y2, end = cms(x[:, split:], mid)
    assert torch.allclose(torch.cat([y1, y2], dim=1), y, atol=1e-6)
    for a, b in zip(state.levels, end.levels, strict=True):
        assert a.count == b.count
        assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a.weights, b.weights, strict=True))


def stream(cms: ContinuumMemory, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, CMSState]:
    """Feed ``x`` in consecutive segments of ``lengths`` tokens, carrying the state; the outputs concatenated."""
    ys, state = [], None
    for segment in x.split(lengths, dim=1):
        y, state = cms(segment, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def assert_same_stream(got: tuple, want: tuple, atol: float) -> None:
    """Outputs, fast weights, pending sums and chunk positions of two streams agree to ``atol``."""
    assert (got[0] - want[0]).abs().max() <= atol, (got[0] - want[0]).abs().max()
    for a, b in zip(got[1].levels, want[1].levels, strict=True):
        assert a.count == b.count and (a.pending is None) == (b.pending is None)
        for u, v in zip(a.weights + (a.pending or ()), b.weights + (b.pending or ()), strict=True):
            assert u.dtype == v.dtype == got[0].dtype and (u - v).abs().max() <= atol, (u - v).abs().max()


@pytest.mark.parametrize("differentiable_writes", [True, False])
@pytest.mark.parametrize("retention", [1.0, 0.8])
@pytest.mark.parametrize(("chunk_sizes", "seq"), [([1], 7), ([3, 5], 15), ([3, 5], 13), ([4, 16], 32), ([4, 16], 37)])
def test_float64_token_by_token_equals_one_pass(chunk_sizes, seq, retention, differentiable_writes):
    """A float64 memory computes in float64 (reads, writes, state): streamed one token at a time, after a prompt, or
    in random segments, it equals one pass to 1e-10, on chunk multiples and off them."""
    lrs = [0.2, 0.1][: len(chunk_sizes)]  # writes that change the reads by O(1) without blowing the stream up
    cms = make(chunk_sizes, inner_lr=lrs, retention=retention, differentiable_writes=differentiable_writes).double()
    with torch.no_grad():  # a non-identity value projection, so the targets are not the inputs
        for blk in cms.blocks:
            blk.value.add_(0.3 * torch.randn_like(blk.value))
    x = torch.randn(2, seq, 6, dtype=torch.float64)
    whole = cms(x)
    assert_same_stream(stream(cms, x, [1] * seq), whole, atol=1e-10)
    assert_same_stream(stream(cms, x, [5] + [1] * (seq - 5)), whole, atol=1e-10)  # a prompt, then tokens
    g = torch.Generator().manual_seed(seq)
    cuts = sorted(torch.randperm(seq - 1, generator=g)[:4].add(1).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq], strict=True)]
    assert_same_stream(stream(cms, x, lengths), whole, atol=1e-10)


def test_state_round_trips_through_a_file():
    cms = make()
    x = torch.randn(2, 16, 6)
    y, _ = cms(x)
    _, mid = cms(x[:, :7])
    buffer = io.BytesIO()
    torch.save(mid.state_dict(), buffer)
    buffer.seek(0)
    restored = CMSState.from_state_dict(torch.load(buffer, weights_only=True))
    y2, _ = cms(x[:, 7:], restored)
    assert torch.allclose(y2, y[:, 7:], atol=1e-6)


def test_inference_mode_writes_and_matches_grad_mode():
    cms = make()
    x = torch.randn(2, 12, 6)
    y, state = cms(x)
    with torch.inference_mode():
        y_inf, state_inf = cms(x)
    assert torch.allclose(y, y_inf, atol=1e-6)
    assert not torch.allclose(state_inf.levels[0].w1, cms.blocks[0].w1.detach())  # it wrote
    carried = state_inf.detach()  # usable outside inference mode, e.g. to keep training on the stream
    out, _ = cms(x, carried)
    out.sum().backward()


@pytest.mark.parametrize("retention", [1.0, 0.7])
def test_gradients_through_writes_match_autograd_of_the_reference(retention):
    """differentiable_writes=True: the meta-gradients (initial weights, norm, value) equal second-order autograd."""
    cms = make(chunk_sizes=(2, 3), retention=retention)
    x = torch.randn(2, 7, 6)
    cms(x)[0].pow(2).sum().backward()
    ours = {n: p.grad.clone() for n, p in cms.named_parameters()}
    cms.zero_grad()
    y_ref, _ = reference(cms, x, create_graph=True)
    y_ref.pow(2).sum().backward()
    for name, p in cms.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-4, rtol=1e-4), name
    assert ours["blocks.0.value"].abs().sum() > 0


@pytest.mark.parametrize(
    ("retention", "detach", "activation"),
    [
        (1.0, True, "gelu"),
        (1.0, False, "silu"),
        (0.6, True, "relu"),
        (0.6, False, "gelu"),
        (0.6, True, "tanh"),
        (1.0, False, "glu_silu"),
        (0.6, True, "glu_gelu_tanh"),
        (0.6, False, "gelu_new"),
    ],
)
def test_first_order_meta_gradients_match_the_reference(retention, detach, activation):
    """differentiable_writes=False over two segments (the state detached between them, or not; the second starts
    mid-chunk): the outputs and the gradients of the input, the initial weights, the norms and the value projections
    equal the reference's, whose reads keep the fast weights' graph and whose write gradients keep only the targets'
    graph; with retention, the weights of a detached segment depend on the initial weights again. Covers the one-node
    backward of the reads (``first_order_reads``), per activation."""
    cms = make(chunk_sizes=(2, 3), retention=retention, differentiable_writes=False, activation=activation)
    x = torch.randn(2, 11, 6, requires_grad=True)
    y1, state = cms(x[:, :5])
    y2, _ = cms(x[:, 5:], state.detach() if detach else state)
    torch.cat([y1, y2], dim=1).pow(2).sum().backward()
    ours = {n: p.grad.clone() for n, p in cms.named_parameters() if p.grad is not None}
    x_grad, x.grad = x.grad.clone(), None
    cms.zero_grad()
    y_ref, _ = reference(cms, x, first_order=True, cut_at=5, detach=detach)
    assert torch.allclose(torch.cat([y1, y2], dim=1).double(), y_ref, atol=1e-4, rtol=1e-4)  # fp32 vs fp64
    y_ref.pow(2).sum().backward()
    assert torch.allclose(x_grad, x.grad, atol=1e-4, rtol=1e-4), (x_grad - x.grad).abs().max()
    params = dict(cms.named_parameters())
    assert set(ours) == {n for n, p in params.items() if p.grad is not None} == set(params)  # the values included
    for name, grad in ours.items():
        want = dict(cms.named_parameters())[name].grad
        assert torch.allclose(grad, want, atol=1e-4, rtol=1e-4), (name, (grad - want).abs().max())


def chunk_reference(blk, x: torch.Tensor, carried: Optional[tuple] = None) -> tuple[torch.Tensor, tuple]:
    """One first-order level, chunk by chunk with plain autograd: the reads ``y = MLP(k, W_j)`` keep their whole graph,
    each write's pending gradient is formed from detached ``k``, ``z``, ``a``, ``y`` and anchor ``W2`` with only the
    targets ``v = W_v k`` carrying their graph, to ``W_v`` (``error = y.detach() - v``), and the weights
    ``W_j = lerp(W_0, W_{j-1}, rho) - s pending_j`` keep theirs. ``carried``: ``(weights, pending, count)`` handed on
    by the previous call, whose weights have lost the graph of the targets written in it and whose pending sums have
    lost all graph (first order across calls). Returns the output and what this call hands on."""
    act, rho = ACT[blk.activation], blk.retention
    scale = blk.inner_lr / (blk.chunk_size if blk.reduction == "mean" else 1)
    initial = (blk.w1, blk.b1, blk.w2, blk.b2)
    keys = blk.norm(x)  # (B, S, D)
    values = keys.detach() @ blk.value.T  # (B, S, D): the targets' graph reaches W_v only
    weights, pending, count = carried or ([w.expand(x.shape[0], *w.shape) for w in initial], None, 0)
    plain, reads, t = weights, [], 0
    while t < x.shape[1]:
        n = min(blk.chunk_size - count, x.shape[1] - t)
        k, v = keys[:, t : t + n], values[:, t : t + n]  # (B, n, D)
        w1, b1, w2, b2 = weights
        z = k @ w1.mT + b1[:, None]  # (B, n, H)
        a = act(z)
        y = a @ w2.mT + b2[:, None]  # (B, n, D)
        reads.append(y)
        z_leaf = z.detach().requires_grad_()
        error = y.detach() - v
        dz = torch.autograd.grad(act(z_leaf), z_leaf, error @ w2.detach(), create_graph=True)[0]  # (B, n, H)
        grads = (dz.mT @ k.detach(), dz.sum(1), error.mT @ a.detach(), error.sum(1))
        pending = grads if pending is None else tuple(p + g for p, g in zip(pending, grads, strict=True))
        count, t = count + n, t + n
        if count == blk.chunk_size:
            step = [scale * p for p in pending]
            if blk.max_write_norm is not None and scale > 0:  # per-sample factor on the step, a constant (first order)
                norm = torch.sqrt(sum(s.detach().flatten(1).pow(2).sum(1) for s in step))  # (B,)
                f = (blk.max_write_norm / norm).clamp(max=1.0)
                step = [s * f.view(-1, *[1] * (s.dim() - 1)) for s in step]
            weights = [w0 + rho * (w - w0) - s for w, w0, s in zip(weights, initial, step, strict=True)]
            plain = [w0 + rho * (w - w0) - s.detach() for w, w0, s in zip(plain, initial, step, strict=True)]
            pending, count = None, 0
    y = torch.cat(reads, dim=1)
    return x + y if blk.residual else y, (plain, None if pending is None else [p.detach() for p in pending], count)


def chunk_reference_chain(cms: ContinuumMemory, x: torch.Tensor, carried: Optional[list] = None) -> tuple:
    """:func:`chunk_reference` through every level; returns the output and what each level hands on."""
    handed = []
    for i, blk in enumerate(cms.blocks):
        x, state = chunk_reference(blk, x, carried[i] if carried is not None else None)
        handed.append(state)
    return x, handed


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("retention", [1.0, 0.8])
@pytest.mark.parametrize(
    ("chunk_sizes", "first", "second", "activation", "detach"),
    [
        ([1], 3, 4, "gelu", False),
        ([3, 5], 7, 6, "silu", False),  # 13 tokens: both levels end mid-chunk
        ([3, 5], 7, 8, "relu", True),  # 15 tokens: both end on a write
        ([4, 16], 6, 26, "tanh", False),  # 32 tokens: the slow level writes twice
        ([4, 16], 6, 31, "gelu", True),
        ([3, 5], 7, 6, "glu_silu", False),  # gated levels (SwiGLU)
        ([4, 16], 6, 31, "glu_gelu", True),  # GeGLU
        ([3, 5], 7, 8, "gelu_new", False),
    ],
)
def test_first_order_gradients_equal_autograd_of_a_chunk_reference(
    chunk_sizes, first, second, activation, detach, retention, reduction
):
    """differentiable_writes=False in float64, over two calls (the first leaves pending tokens in the state, carried
    as is or detached): the outputs and the gradients of the input, the value projections, the norms and the initial
    weights equal those of :func:`chunk_reference` to 1e-10."""
    lrs = ([0.2, 0.1] if reduction == "mean" else [0.05, 0.01])[: len(chunk_sizes)]
    cms = make(chunk_sizes, inner_lr=lrs, retention=retention, reduction=reduction, activation=activation)
    cms.differentiable_writes = False
    cms.double()
    with torch.no_grad():
        for blk in cms.blocks:
            blk.value.add_(0.3 * torch.randn_like(blk.value))
    x = torch.randn(2, first + second, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        state = cms(x[:, :first])[1]
    assert all(lvl.pending is not None for lvl in state.levels[1:])  # the second call completes a pending chunk
    runs = [
        (lambda u, st: cms(u, st), CMSState.detach),
        (lambda u, st: chunk_reference_chain(cms, u, st), lambda st: [_detached(handed) for handed in st]),
    ]
    outputs = []
    for run, cut in runs:
        y1, state = run(x[:, :first], None)
        y2 = run(x[:, first:], cut(state) if detach else state)[0]
        y = torch.cat([y1, y2], dim=1)
        y.pow(2).sum().backward()
        outputs.append((y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in cms.named_parameters()}))
        x.grad = None
        cms.zero_grad(set_to_none=True)
    (y, x_grad, grads), (y_ref, x_grad_ref, grads_ref) = outputs
    assert (y - y_ref).abs().max() <= 1e-10
    assert _close(x_grad, x_grad_ref)
    assert grads_ref["blocks.0.value"].abs().max() > 1e-3  # the targets' gradient matters
    for name, grad in grads.items():
        assert _close(grad, grads_ref[name]), (name, (grad - grads_ref[name]).abs().max())


def _detached(handed: tuple) -> tuple:
    weights, pending, count = handed
    return [w.detach() for w in weights], pending, count


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> bool:
    """Equal to ``tol`` relative to the size of ``want`` (absolute below 1)."""
    return bool((got - want).abs().max() <= tol * max(1.0, float(want.abs().max())))


def test_first_order_pass_without_a_graph_gives_the_same_state():
    """Under ``no_grad`` the first-order pass skips the autograd node; outputs and states equal the graph-carrying
    pass's, and the state's weights carry no graph."""
    cms = make(chunk_sizes=(2, 3), retention=0.7, differentiable_writes=False)
    x = torch.randn(2, 7, 6)
    y, state = cms(x)
    with torch.no_grad():
        y_ng, state_ng = cms(x)
    assert torch.equal(y.detach(), y_ng)
    for lvl, lvl_ng in zip(state.levels, state_ng.levels, strict=True):
        assert lvl.count == lvl_ng.count and lvl.initial_share == lvl_ng.initial_share
        pairs = zip(lvl.weights, lvl_ng.weights, strict=True)
        assert all(torch.equal(a.detach(), b) and not b.requires_grad for a, b in pairs)
        assert all(w.requires_grad for w in lvl.weights)


def test_first_order_writes_train_the_value_projections():
    """The value projections learn through the targets of the writes; the initial weights' gradients are the same
    whether the value projections need one (per-piece weight gradients and a reverse scan) or not (one GEMM)."""
    cms = make(differentiable_writes=False)
    x = torch.randn(2, 17, 6)
    cms(x)[0].pow(2).sum().backward()
    assert all(blk.value.grad is not None and blk.value.grad.abs().sum() > 0 for blk in cms.blocks)
    names = [f"blocks.{i}.{w}" for i in range(2) for w in ("w1", "b1", "w2", "b2")]
    with_value = {n: p.grad.clone() for n, p in cms.named_parameters() if n in names}
    cms.zero_grad(set_to_none=True)
    for blk in cms.blocks:
        blk.value.requires_grad_(False)
    cms(x)[0].pow(2).sum().backward()
    for name, p in cms.named_parameters():
        if name in names:
            assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, with_value[name], atol=1e-6, rtol=1e-5), name


def test_first_order_tokens_written_in_a_later_call_give_the_values_no_gradient():
    """A call that does not complete a chunk writes nothing: its targets get a zero gradient (first order across
    calls: the next call's write does not reach back into this call's graph)."""
    cms = make(chunk_sizes=(8,), differentiable_writes=False)
    cms(torch.randn(2, 7, 6))[0].pow(2).sum().backward()
    assert cms.blocks[0].value.grad is not None and cms.blocks[0].value.grad.abs().max() == 0


@pytest.mark.parametrize("differentiable_writes", [True, False])
def test_bf16_autocast_keeps_the_state_fp32(differentiable_writes):
    cms = make(differentiable_writes=differentiable_writes)
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = cms(x)
    assert y.dtype == torch.bfloat16
    for lvl in state.levels:
        assert all(t.dtype == torch.float32 for t in lvl.weights)
        assert lvl.pending is None or all(t.dtype == torch.float32 for t in lvl.pending)
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in cms.parameters() if p.grad is not None)
    assert cms.blocks[0].w1.grad.abs().sum() > 0


def test_static_mode_is_a_chain_of_residual_mlps():
    torch.manual_seed(0)
    cms = ContinuumMemory(6, [1, 4], hidden_mult=2.0)
    x = torch.randn(3, 5, 6)
    h = x
    for blk in cms.blocks:
        h = h + F.linear(F.gelu(F.linear(blk.norm(h), blk.w1, blk.b1)), blk.w2, blk.b2)
    assert torch.allclose(cms(x), h, atol=1e-6)
    with pytest.raises(ValueError, match="static"):
        cms(x, CMSState())


def test_levels_own_only_their_parameters():
    cms = ContinuumMemory(6, [1, 4, 16])
    levels = cms.levels()
    assert [(lvl.name, lvl.every) for lvl in levels] == [("level_0", 1), ("level_1", 4), ("level_2", 16)]
    book = LevelSet(levels, cms.named_parameters())
    for i, lvl in enumerate(levels):
        assert {n for n, _ in book.params(lvl.name)} == {
            n for n, _ in cms.named_parameters() if n.startswith(f"blocks.{i}.")
        }
    model = torch.nn.Module()
    model.cms = cms
    nested = cms.levels("cms", every=[1, 2, 4])
    assert [lvl.params for lvl in nested][2] == ("cms.blocks.2.*",) and nested[1].every == 2
    LevelSet(nested, model.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk_sizes=[]), "chunk_sizes"),
        (dict(chunk_sizes=[4, 0]), "chunk_sizes"),
        (dict(chunk_sizes=[4, 8], activation=["gelu"]), "activation.*one value per level"),
        (dict(chunk_sizes=[4], activation="swish"), "activation.*'swish'"),
        (dict(chunk_sizes=[4], norm="batchnorm"), "norm.*'batchnorm'"),
        (dict(chunk_sizes=[4], inner_lr=-1.0), "inner_lr.*-1.0"),
        (dict(chunk_sizes=[4], retention=0.0), r"retention.*\(0, 1\].*0.0"),
        (dict(chunk_sizes=[4], retention=1.5), r"retention.*1.5"),
        (dict(chunk_sizes=[4], retention=True), r"retention.*True"),
        (dict(chunk_sizes=[4, 8], retention=[0.9]), "retention.*one value per level"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinuumMemory(6, **kwargs)


def test_in_context_without_writes_is_bitwise_the_static_chain():
    cms = make(inner_lr=0.0)
    static = ContinuumMemory(6, [3, 5], hidden_mult=2.0)
    static.load_state_dict({k: v for k, v in cms.state_dict().items() if not k.endswith(".value")})
    x = torch.randn(2, 13, 6)
    y, state = cms(x)
    assert torch.equal(y, static(x))
    assert [lvl.count for lvl in state.levels] == [1, 3] and state.levels[0].pending is None


def test_write_false_reads_without_writing():
    torch.manual_seed(0)
    cms = ContinuumMemory(dim=8, chunk_sizes=[2, 4], in_context=True, inner_lr=0.5)
    x = torch.randn(2, 12, 8)
    _, state = cms(x)  # a state that has been written to
    y_read, same = cms(x, state, write=False)
    assert all(a is b for a, b in zip(same.levels, state.levels, strict=True))  # nothing written or advanced
    # equal to a read with frozen weights: a memory whose chunk is longer than the input never writes in between
    frozen = [blk.chunk_size for blk in cms.blocks]
    for blk in cms.blocks:
        blk.chunk_size = 10**6
    y_ref, _ = cms(x, state)
    for blk, c in zip(cms.blocks, frozen, strict=True):
        blk.chunk_size = c
    assert torch.allclose(y_read, y_ref, atol=1e-6)
    y_write, _ = cms(x, state)
    assert not torch.allclose(y_read, y_write, atol=1e-4)  # with writes the later chunks read other weights


def test_checkpoint_with_blocks_named_levels_still_loads():
    """State dicts written when the blocks were registered as ``levels.<i>`` load into ``blocks.<i>``."""
    cms = ContinuumMemory(8, [1, 4])
    legacy = {k.replace("blocks.", "levels.", 1): v.clone() + 1 for k, v in cms.state_dict().items()}
    fresh = ContinuumMemory(8, [1, 4])
    fresh.load_state_dict(legacy)
    for key, value in legacy.items():
        assert torch.equal(fresh.state_dict()[key.replace("levels.", "blocks.", 1)], value)


def test_glob_written_with_levels_names_the_fix():
    """A level glob naming ``cms.levels.<i>`` matches nothing and the error names ``cms.blocks.<i>``."""
    from nl_lightning.levels import Level

    model = torch.nn.Sequential()
    model.add_module("cms", ContinuumMemory(8, [1, 4]))
    with pytest.raises(ValueError, match=r"write 'cms\.blocks\.1\.\*'"):
        LevelSet([Level("slow", ["cms.levels.1.*"], every=4)], model.named_parameters())
