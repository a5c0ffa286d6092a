"""SelfModifyingTitans against slow, obvious references: one sample, head and token at a time, float64, inner
gradients by autograd at the anchor states."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.models._residual_memory import dgd_chunk
from nl_lightning.models.self_modifying_titans import MEMORIES, SelfModifyingState, SelfModifyingTitans

ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


def reference(smt: SelfModifyingTitans, x: torch.Tensor, anchored: bool = True, create_graph: bool = False):
    """Eq. 88 token by token. ``anchored``: reads and gradients use the weights of the last chunk end (Eq. 90);
    otherwise the weights after the previous token (exact self-reference).

    Returns the output and, per sample and head, the final ``[(W1, W2)] * 5`` and the anchors.
    """
    params = {n: (p.double() if create_graph else p.detach().double()) for n, p in smt.named_parameters()}
    x = x.double()
    batch, seq, dim = x.shape
    heads, d, size = smt.heads, smt.head_dim, smt.conv_size
    act = ACT[smt.activation]
    padded = torch.cat([torch.zeros(batch, size - 1, dim, dtype=x.dtype), x], dim=1)
    conv_w, conv_b = params["conv.weight"][:, 0], params["conv.bias"]  # (D, K), (D,)
    xc = torch.stack([sum(padded[:, t + j] * conv_w[:, j] for j in range(size)) + conv_b for t in range(seq)], dim=1)
    queries = xc @ params["q_proj.weight"].T

    def mlp(w1, w2, z):
        return z + w1 @ act(w2 @ z)

    out = torch.zeros(batch, seq, dim, dtype=x.dtype)
    finals = {}
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            cur = [(params["w1"][m, h], params["w2"][m, h]) for m in range(5)]
            anchor = list(cur)
            for t in range(seq):
                read = anchor if anchored else cur
                x_t = xc[b, t, cols]
                gen = [mlp(*read[m], x_t) for m in range(4)]
                k, v = gen[0] / gen[0].norm(), gen[1]
                eta = smt.eta_max * torch.sigmoid(
                    params["readout_weight"][0, h] @ gen[2] + params["readout_bias"][0, h]
                )
                alpha = torch.sigmoid(params["readout_weight"][1, h] @ gen[3] + params["readout_bias"][1, h])
                q = queries[b, t, cols] / queries[b, t, cols].norm()
                out[b, t, cols] = mlp(*read[4], q)
                new = []
                for m in range(5):
                    if create_graph:  # fresh nodes: the inner gradient ignores the target's dependence on them
                        w1, w2 = read[m][0] * 1, read[m][1] * 1
                    else:
                        w1, w2 = (w.detach().requires_grad_() for w in read[m])
                    target = mlp(*read[m], v)  # the self-generated value, a constant of the inner objective
                    pred = mlp(w1, w2, k)
                    if smt.rule == "paper":
                        loss = (pred - target).pow(2).sum()
                    else:
                        loss = -(pred @ target)
                    g1, g2 = torch.autograd.grad(loss, (w1, w2), create_graph=create_graph)
                    scale = 1.0
                    if smt.max_inner_grad_norm is not None:
                        norm = torch.sqrt(g1.pow(2).sum() + g2.pow(2).sum())
                        scale = torch.clamp(smt.max_inner_grad_norm / norm, max=1.0)
                    w1_old, w2_old = cur[m]
                    decay = alpha * torch.eye(d, dtype=x.dtype) - eta * torch.outer(k, k)
                    new.append((alpha * w1_old - eta * scale * g1, w2_old @ decay - eta * scale * g2))
                cur = new
                if (t + 1) % smt.chunk_size == 0:
                    anchor[:4] = cur[:4]
                if (t + 1) % smt.mem_chunk_size == 0:
                    anchor[4] = cur[4]
            finals[b, h] = (cur, anchor)
    return out @ params["out_proj.weight"].T, finals


def make(dim=8, heads=2, **kwargs) -> SelfModifyingTitans:
    torch.manual_seed(0)
    kwargs.setdefault("eta_max", 0.9)
    kwargs.setdefault("eta_init", 0.4)  # large steps, so that the writes show
    kwargs.setdefault("alpha_init", 0.9)
    kwargs.setdefault("conv_size", 3)
    kwargs.setdefault("max_inner_grad_norm", None)
    return SelfModifyingTitans(dim, heads=heads, hidden_mult=1.5, **kwargs)


def check_state(state: SelfModifyingState, finals: dict, atol: float) -> None:
    for (b, h), (cur, anchor) in finals.items():
        for m in range(5):
            for i, (got_all, ref) in enumerate([(state.w1, cur), (state.w2, cur), (state.anchor_w1, anchor)]):
                want = ref[m][0 if i != 1 else 1]
                assert torch.allclose(got_all[b, m, h].double(), want.detach(), atol=atol), (b, h, m, i)
            assert torch.allclose(state.anchor_w2[b, m, h].double(), anchor[m][1].detach(), atol=atol)


CASES = [  # (chunk_size, mem_chunk_size, seq)
    (1, 1, 6),
    (4, 4, 11),
    (4, 3, 11),
    (3, 5, 10),
]


@pytest.mark.parametrize("rule", ["paper", "delta"])
@pytest.mark.parametrize(("chunk", "mem_chunk", "seq"), CASES)
def test_chunked_equals_token_by_token_reference(rule, chunk, mem_chunk, seq):
    smt = make(chunk_size=chunk, mem_chunk_size=mem_chunk, rule=rule).double()
    x = torch.randn(2, seq, 8, dtype=torch.float64)
    y, state = smt(x)
    y_ref, finals = reference(smt, x)
    assert y.dtype == torch.float64 and state.w1.dtype == torch.float64
    assert torch.allclose(y, y_ref, atol=1e-9, rtol=0), (y - y_ref).abs().max()
    check_state(state, finals, atol=1e-9)
    assert (state.count, state.mem_count) == (seq % chunk, seq % mem_chunk)
    # the writes matter: after the first chunk the output differs from a read-only pass
    frozen = smt(x, write=False)[0]
    first = min(chunk, mem_chunk)
    assert torch.allclose(frozen[:, :first], y[:, :first], atol=1e-12)
    assert (frozen[:, first:] - y[:, first:]).abs().max() > 1e-3


@pytest.mark.parametrize("rule", ["paper", "delta"])
def test_clipped_inner_gradients_equal_the_reference(rule):
    smt = make(chunk_size=3, mem_chunk_size=2, rule=rule, max_inner_grad_norm=0.3).double()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    y, state = smt(x)
    y_ref, finals = reference(smt, x)
    assert torch.allclose(y, y_ref, atol=1e-9, rtol=0)
    check_state(state, finals, atol=1e-9)
    unclipped = make(chunk_size=3, mem_chunk_size=2, rule=rule).double()
    assert (unclipped(x)[0] - y).abs().max() > 1e-4  # the clip was active


@pytest.mark.parametrize("rule", ["paper", "delta"])
def test_chunk_size_one_is_exact_self_reference(rule):
    smt = make(chunk_size=1, rule=rule).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    y, state = smt(x)
    y_ref, finals = reference(smt, x, anchored=False)
    assert torch.allclose(y, y_ref, atol=1e-9, rtol=0)
    check_state(state, finals, atol=1e-9)
    # chunks approximate it: chunk 4 reads differently after the first chunk
    assert (make(chunk_size=4, rule=rule).double()(x)[0][:, 4:] - y[:, 4:]).abs().max() > 1e-4


def sequential_dgd(w1, w2, k, a, p, delta, eta, step, log_alpha):
    """Eq. 88 one token at a time, every product written out: the obvious form of ``dgd_chunk``."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    for s in range(k.shape[-2]):
        alpha, e, st = (t[..., s, None, None] for t in (log_alpha.exp(), eta, step))
        k_col, k_row = k[..., s, :, None], k[..., s, None, :]
        w1 = alpha * w1 - st * p[..., s, :, None] * a[..., s, None, :]
        w2 = w2 @ (alpha * eye - e * k_col * k_row) - st * delta[..., s, :, None] * k_row
    return w1, w2


def test_dgd_chunk_at_a_long_chunk_in_fp32_equals_the_sequential_recurrence():
    # n = 64 (the throughput chunk size) with near-parallel keys and large steps: the chunk's explicit (I + L)^-1 must
    # match the token-by-token recurrence in fp64, values and gradients, as a triangular solve would
    g, b, h, n, d, hid = 5, 2, 2, 64, 8, 12
    gen = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(b, h, n, d, generator=gen) + 3 * torch.randn(b, h, 1, d, generator=gen), dim=-1)
    inputs = {
        "w1": torch.randn(g, b, h, d, hid, generator=gen) / 3,
        "w2": torch.randn(g, b, h, hid, d, generator=gen) / 3,
        "k": k,
        "a": torch.randn(g, b, h, n, hid, generator=gen),
        "p": torch.randn(g, b, h, n, d, generator=gen),
        "delta": torch.randn(g, b, h, n, hid, generator=gen),
        "eta": 0.9 * torch.rand(b, h, n, generator=gen),
        "step": 0.9 * torch.rand(g, b, h, n, generator=gen),
        "log_alpha": -0.1 * torch.rand(b, h, n, generator=gen),
    }
    cotangents = [torch.randn(g, b, h, d, hid, generator=gen), torch.randn(g, b, h, hid, d, generator=gen)]

    def run(fn, dtype):
        leaves = {name: t.to(dtype).requires_grad_() for name, t in inputs.items()}
        out = fn(**leaves)
        total = sum((o * c.to(dtype)).sum() for o, c in zip(out, cotangents, strict=True))
        grads = torch.autograd.grad(total, list(leaves.values()))
        return [o.double() for o in out], [gr.double() for gr in grads]

    out, grads = run(dgd_chunk, torch.float32)
    ref_out, ref_grads = run(sequential_dgd, torch.float64)
    for got, want in zip(out + grads, ref_out + ref_grads, strict=True):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max()), (got - want).abs().max()
    assert out[1].sub(inputs["w2"].double()).abs().max() > 0.1  # the chunk moved the weights


def test_meta_gradients_equal_second_order_autograd_of_the_reference():
    smt = make(chunk_size=2, mem_chunk_size=3, max_inner_grad_norm=2.0).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    smt(x)[0].pow(2).sum().backward()
    ours = {n: p.grad.clone() for n, p in smt.named_parameters()}
    smt.zero_grad()
    reference(smt, x, create_graph=True)[0].pow(2).sum().backward()
    for name, p in smt.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-9, rtol=1e-7), name


def test_batched_equals_one_by_one():
    smt = make(chunk_size=4, mem_chunk_size=3)
    x = torch.randn(3, 10, 8)
    y, state = smt(x)
    for b in range(3):
        y_b, state_b = smt(x[b : b + 1])
        assert torch.allclose(y[b : b + 1], y_b, atol=1e-5)
        single = state.select(torch.tensor([b]))
        for name in SelfModifyingState._TENSORS:
            assert torch.allclose(getattr(single, name), getattr(state_b, name), atol=1e-5), name


@pytest.mark.parametrize(("chunk", "mem_chunk"), [(4, 4), (4, 2), (3, 4)])
@pytest.mark.parametrize("split", [4, 6, 9])
def test_two_segments_equal_one_long_pass(chunk, mem_chunk, split):
    """Carrying the state over a boundary (on a chunk multiple or inside a chunk) equals one long pass."""
    smt = make(chunk_size=chunk, mem_chunk_size=mem_chunk).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    y, state = smt(x)
    y1, mid = smt(x[:, :split])
    y2, end = smt(x[:, split:], mid)
    assert torch.allclose(torch.cat([y1, y2], dim=1), y, atol=1e-10)
    assert (end.count, end.mem_count) == (state.count, state.mem_count)
    for name in SelfModifyingState._TENSORS:
        assert torch.allclose(getattr(end, name), getattr(state, name), atol=1e-10), name


def test_state_round_trips_through_a_file():
    smt = make(chunk_size=4, mem_chunk_size=3)
    x = torch.randn(2, 12, 8)
    y, _ = smt(x)
    _, mid = smt(x[:, :5])
    buffer = io.BytesIO()
    torch.save(mid.state_dict(), buffer)
    buffer.seek(0)
    restored = SelfModifyingState.from_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.count, restored.mem_count) == (1, 2)
    assert torch.allclose(smt(x[:, 5:], restored)[0], y[:, 5:], atol=1e-5)


def test_gradients_reach_every_meta_parameter():
    for chunk, mem_chunk in [(2, 2), (2, 3)]:  # the merged and the separate M_mem pass
        smt = make(chunk_size=chunk, mem_chunk_size=mem_chunk)
        smt(torch.randn(2, 9, 8))[0].pow(2).mean().backward()
        for name, p in smt.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        for i, memory in enumerate(MEMORIES):  # each memory's initial weights, every head
            for h in range(smt.heads):
                assert smt.w1.grad[i, h].abs().sum() > 0 and smt.w2.grad[i, h].abs().sum() > 0, (memory, h)
        assert (smt.readout_weight.grad.abs().sum(-1) > 0).all() and (smt.readout_bias.grad != 0).all()
        for module in (smt.conv, smt.q_proj, smt.out_proj):
            assert all(p.grad.abs().sum() > 0 for p in module.parameters())


def test_detached_state_stops_gradients_at_the_boundary():
    smt = make(chunk_size=2)
    _, state = smt(torch.randn(2, 4, 8))
    y, _ = smt(torch.randn(2, 4, 8), state.detach())
    y.sum().backward()
    assert smt.w1.grad is None or smt.w1.grad.abs().sum() == 0  # the only path to w1 ran through the first segment
    assert smt.q_proj.weight.grad.abs().sum() > 0


def test_inference_mode_writes_and_matches_grad_mode():
    smt = make(chunk_size=3, mem_chunk_size=2)
    x = torch.randn(2, 9, 8)
    y, state = smt(x)
    with torch.inference_mode():
        y_inf, state_inf = smt(x)
    assert torch.allclose(y, y_inf, atol=1e-6)
    assert torch.allclose(state.w1, state_inf.w1, atol=1e-6)
    assert not torch.allclose(state_inf.w1[0], smt.w1.detach(), atol=1e-3)  # it wrote
    out, _ = smt(x, state_inf.detach())  # usable outside inference mode
    out.sum().backward()


def test_bf16_autocast_keeps_the_state_fp32():
    smt = make(chunk_size=4, mem_chunk_size=3)
    x = torch.randn(2, 11, 8)
    ref, _ = smt(x)
    for inp in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = smt(inp)
        assert y.dtype == inp.dtype and torch.isfinite(y).all()
        assert all(getattr(state, name).dtype == torch.float32 for name in SelfModifyingState._TENSORS)
        assert (y.float() - ref).abs().max() < 0.1
        assert set(smt.last_stats) >= {"eta", "alpha", "inner_loss/mem", "norm/k"}


def test_stats_describe_the_last_call():
    smt = make(chunk_size=4, mem_chunk_size=3, eta_init=0.3, alpha_init=0.95)
    smt(torch.randn(2, 10, 8))
    stats = smt.last_stats
    assert {f"inner_loss/{m}" for m in MEMORIES} | {f"norm/{m}" for m in MEMORIES} | {"eta", "alpha"} == set(stats)
    assert all(v.dim() == 0 and torch.isfinite(v) and not v.requires_grad for v in stats.values())
    assert 0 < stats["eta"] < smt.eta_max and 0.5 < stats["alpha"] < 1
    assert abs(stats["eta"].item() - 0.3) < 0.2 and abs(stats["alpha"].item() - 0.95) < 0.05


def test_toy_task_loss_decreases_with_adamw():
    """Predict the previous token (vocab 8) through the memory read; a few dozen AdamW steps."""
    torch.manual_seed(0)
    vocab, dim = 8, 16
    emb, smt, head = (
        torch.nn.Embedding(vocab, dim),
        SelfModifyingTitans(dim, heads=2, chunk_size=8),
        torch.nn.Linear(dim, vocab),
    )
    params = [*emb.parameters(), *smt.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(40):
        tokens = torch.randint(0, vocab, (8, 32))
        logits = head(smt(emb(tokens))[0])
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, vocab), tokens[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dim=10, heads=4), "divisible by `heads`"),
        (dict(dim=0), "`dim`.*0"),
        (dict(chunk_size=0), "`chunk_size`.*0"),
        (dict(mem_chunk_size=-2), "`mem_chunk_size`.*-2"),
        (dict(conv_size=0), "`conv_size`"),
        (dict(hidden_mult=0.0), "`hidden_mult`"),
        (dict(rule="hebbian"), "`rule`.*'hebbian'"),
        (dict(activation="swish"), "`activation`.*'swish'"),
        (dict(eta_max=1.5), "`eta_max`.*1.5"),
        (dict(eta_max=0.1, eta_init=0.2), "`eta_init`"),
        (dict(alpha_init=1.0), "`alpha_init`"),
        (dict(max_inner_grad_norm=0.0), "`max_inner_grad_norm`"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"dim": 8, "heads": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        SelfModifyingTitans(**kwargs)


def test_bad_inputs_raise():
    smt = make()
    with pytest.raises(ValueError, match="shape"):
        smt(torch.randn(2, 5, 6))
    _, state = smt(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="select"):
        smt(torch.randn(3, 5, 8), state)


def test_default_clip_keeps_a_long_random_stream_finite():
    torch.manual_seed(0)
    smt = SelfModifyingTitans(32, heads=2)
    with torch.no_grad():
        y, state = smt(torch.randn(2, 768, 32))
    assert torch.isfinite(y).all() and torch.isfinite(state.w1).all() and torch.isfinite(state.w2).all()
    assert max(smt.last_stats[f"norm/{m}"].item() for m in MEMORIES) < 20


def test_read_only_pass_keeps_the_memories():
    smt = make(chunk_size=4, mem_chunk_size=3)
    x = torch.randn(2, 10, 8)
    _, state = smt(x[:, :5])
    y, after = smt(x[:, 5:], state, write=False)
    for name in ("w1", "w2", "anchor_w1", "anchor_w2"):
        assert torch.equal(getattr(after, name), getattr(state, name)), name
    assert (after.count, after.mem_count) == (state.count, state.mem_count)
    assert torch.equal(after.conv, x[:, -2:])  # the convolution's history still advances
    # every token is read with M_mem's anchor: a write pass agrees until M_mem's chunk ends (token 6 = 5 + 1)
    written, _ = smt(x[:, 5:], state)
    assert torch.allclose(written[:, :1], y[:, :1], atol=1e-6) and not torch.allclose(written, y, atol=1e-3)
