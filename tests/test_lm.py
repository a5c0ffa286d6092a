"""CausalLM (segments, truncated backpropagation, evaluation names, generation, optimizer) and TransformerPP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nl_lightning.data.synthetic import MQARDataModule
from nl_lightning.data.text import TextDataModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.transformer import CausalSelfAttention, KVCache, SwiGLU, TransformerPP, rope_angles

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _tiny(**kwargs) -> TransformerPP:
    torch.manual_seed(0)
    args = dict(vocab_size=50, dim=16, depth=2, heads=2)
    return TransformerPP(**{**args, **kwargs})


class RunningSumLM(CausalLM):
    """A stateful toy LM: the state is the running sum of the embeddings read so far, ``(B, D)``."""

    def __init__(self, vocab_size: int = 20, dim: int = 8, **lm_kwargs) -> None:
        super().__init__(vocab_size, **lm_kwargs)
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size)
        self.calls: list[tuple[bool, bool]] = []  # (write, incoming state requires grad)

    def forward(self, tokens: Tensor, state=None, write: bool = True):
        e = self.embed(tokens)  # (B, T, D)
        prefix = e.cumsum(dim=1) + (0 if state is None else state[:, None])  # (B, T, D)
        self.calls.append((write, state is not None and state.requires_grad))
        new = prefix[:, -1] if write else state
        return self.head(torch.tanh(prefix)), new


# ----------------------------------------------------------------------------------------------- attention
def _reference_attention(attn: CausalSelfAttention, x: Tensor, window=None) -> Tensor:
    """Explicit rotation matrices, explicit softmax and an explicit (causal or sliding-window) mask."""
    B, T, D = x.shape
    H, Dh = attn.heads, attn.head_dim
    wq, wk, wv = attn.qkv.weight.split(D)
    q, k, v = (x @ w.T for w in (wq, wk, wv))  # (B, T, D)
    rot = torch.zeros(T, Dh, Dh, dtype=x.dtype)  # R_t pairs dimension i with i + Dh/2
    for t in range(T):
        for i in range(Dh // 2):
            theta = t * attn.rope_base ** (-2 * i / Dh)
            c, s = math.cos(theta), math.sin(theta)
            j = i + Dh // 2
            rot[t, i, i], rot[t, i, j], rot[t, j, i], rot[t, j, j] = c, -s, s, c
    out = torch.zeros(B, T, D, dtype=x.dtype)
    for h in range(H):
        sl = slice(h * Dh, (h + 1) * Dh)
        qh = torch.einsum("tij,btj->bti", rot, q[..., sl])
        kh = torch.einsum("tij,btj->bti", rot, k[..., sl])
        scores = qh @ kh.transpose(1, 2) / math.sqrt(Dh)  # (B, T, T)
        for i in range(T):
            for j in range(T):
                if j > i or (window is not None and i - j >= window):
                    scores[:, i, j] = float("-inf")
        p = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        out[..., sl] = p @ v[..., sl]
    return out @ attn.proj.weight.T


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_explicit_reference(window):
    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=16, heads=2, window=window, rope_base=100.0).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, window), atol=1e-10, rtol=0)
    if window is not None:  # and it really differs from full causal attention
        assert not torch.allclose(attn(x), _reference_attention(attn, x, None), atol=1e-3)


def test_sliding_window_mask():
    attn = CausalSelfAttention(dim=8, heads=2, window=3)
    expected = torch.tensor([[j <= i and i - j < 3 for j in range(6)] for i in range(6)])
    assert torch.equal(attn.mask(6), expected)
    assert CausalSelfAttention(dim=8, heads=2).mask(6) is None


@pytest.mark.parametrize("window", [None, 1, 3])
def test_cached_attention_in_pieces_equals_one_pass(window):
    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=16, heads=2, window=window, rope_base=100.0).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = attn(x)
    y, cache = attn.forward_cached(x)  # no cache: the same computation as forward
    torch.testing.assert_close(y, full, atol=0, rtol=0)
    outs, cache = [], None
    for start, stop in [(0, 1), (1, 5), (5, 6), (6, 7), (7, 13)]:
        y, cache = attn.forward_cached(x[:, start:stop], cache)
        outs.append(y)
        kept = stop if window is None else min(window - 1, stop)
        assert cache.pos == stop and cache.k.shape == cache.v.shape == (2, 2, kept, 8)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=0)


def test_cached_attention_mask_and_cache_errors():
    attn = CausalSelfAttention(dim=8, heads=2, window=3)
    # two new tokens (positions 2, 3) over two cached ones (positions 0, 1): causal and within the window of 3
    expected = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert torch.equal(attn.mask(2, past=2), expected)
    causal = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.equal(CausalSelfAttention(dim=8, heads=2).mask(2, past=2), causal)
    _, cache = attn.forward_cached(torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="cache holds keys"):
        attn.forward_cached(torch.randn(2, 1, 8), cache)
    attn.forward_cached(torch.randn(2, 1, 8), cache.select(torch.tensor([0, 2])))  # the cache of two samples fits


def test_kv_cache_detach_select_to_and_state_dict(tmp_path):
    attn = CausalSelfAttention(dim=8, heads=2)
    _, cache = attn.forward_cached(torch.randn(3, 5, 8))
    assert cache.k.requires_grad and not cache.detach().k.requires_grad and cache.detach().pos == 5
    picked = cache.select(torch.tensor([2, 0]))
    assert torch.equal(picked.k, cache.k[[2, 0]]) and torch.equal(picked.v, cache.v[[2, 0]]) and picked.pos == 5
    assert cache.to(torch.float64).k.dtype == torch.float64
    torch.save(cache.state_dict(), tmp_path / "cache.pt")
    loaded = KVCache.from_state_dict(torch.load(tmp_path / "cache.pt", weights_only=True))
    assert torch.equal(loaded.k, cache.k) and torch.equal(loaded.v, cache.v) and loaded.pos == 5
    with torch.inference_mode():
        _, made_inside = attn.forward_cached(torch.randn(3, 2, 8))
    attn.forward_cached(torch.randn(3, 1, 8), made_inside.detach())[0].sum().backward()  # usable outside


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    from nl_lightning.models.transformer import apply_rope

    def score(tq: int, tk: int) -> Tensor:
        cq, sq = rope_angles(1, 8, offset=tq, dtype=torch.float64)
        ck, sk = rope_angles(1, 8, offset=tk, dtype=torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-10, rtol=0)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_swiglu_hidden_is_rounded_to_multiple_of_8():
    assert SwiGLU(256).hidden == 688 and SwiGLU(10, mult=1.0).hidden == 16 and SwiGLU(24, mult=1.0).hidden == 24


# ----------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("window", [None, 4])
def test_transformer_is_causal(window):
    model = _tiny(window=window).eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    a, b = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-3
    assert model(tokens)[1] is None


def test_segmenting_a_stateless_model_equals_separate_segments():
    model = _tiny(segment_len=8).eval()
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(2))
    targets[0, :5] = -100
    logits, state = model.segment_forward(tokens)
    separate = torch.cat([model(tokens[:, s : s + 8])[0] for s in (0, 8, 16)], dim=1)
    torch.testing.assert_close(logits, separate, atol=0, rtol=0)
    assert state is None
    assert not torch.allclose(logits[:, 8:], model(tokens)[0][:, 8:], atol=1e-4)  # segments do not see each other
    loss, count, hits = model.sequence_loss(tokens, targets)
    mask = targets != -100
    torch.testing.assert_close(loss, F.cross_entropy(separate[mask], targets[mask]))
    assert int(count) == 35 and int(hits) == int((separate.argmax(-1)[mask] == targets[mask]).sum())


def test_stateful_segments_carry_and_detach_the_state():
    torch.manual_seed(0)
    model = RunningSumLM(segment_len=4)
    tokens = torch.randint(0, 20, (3, 10))
    full, full_state = model(tokens)
    model.calls.clear()
    seg, seg_state = model.segment_forward(tokens)
    torch.testing.assert_close(seg, full)  # the carried state makes segments equal one long pass
    torch.testing.assert_close(seg_state, full_state)
    # three segments; every incoming state is detached (truncated backpropagation), though it was computed with grad
    assert [c[1] for c in model.calls] == [False, False, False] and full_state.requires_grad
    loss, _, _ = model.sequence_loss(tokens[:, :8], tokens[:, 1:9])
    loss.backward()
    assert model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("memorize", [True, False])
def test_evaluation_uses_memorize_at_eval_under_inference_mode(memorize):
    model = RunningSumLM(segment_len=4, memorize_at_eval=memorize)
    batch = {"tokens": torch.randint(0, 20, (2, 12)), "targets": torch.randint(0, 20, (2, 12))}
    modes = []

    class Probe(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            modes.append(torch.is_inference_mode_enabled())

    trainer = Trainer(callbacks=[Probe()], **TRAINER)
    out = trainer.validate(model, DataLoader([batch], batch_size=None), verbose=False)[0]
    assert modes == [True]
    assert {w for w, _ in model.calls} == {memorize}
    assert set(out) == {"val_loss", "val_bpc", "val_acc"}
    assert out["val_bpc"] == pytest.approx(out["val_loss"] / math.log(2))
    preds = model.predict_step(batch, 0)
    assert preds.shape == (2, 12) and preds.dtype == torch.int64


def test_fit_on_text_reduces_loss_then_validates_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = TransformerPP(vocab_size=256, dim=32, depth=1, heads=2, lr=1e-2, warmup_steps=5, max_steps_schedule=40)
    dm = TextDataModule(seq_len=64, batch_size=16, samples_per_epoch=16 * 40)
    losses, raw, clipped = [], [], []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before clipping
            raw.append(float(torch.stack([p.grad.norm() for p in pl_module.parameters()]).norm()))

        def on_train_start(self, trainer, pl_module):  # the gradients the update used (clipped), read after it
            def hook(optimizer, args, kwargs):
                clipped.append(float(torch.stack([p.grad.norm() for p in pl_module.parameters()]).norm()))

            trainer.optimizers[0].register_step_post_hook(hook)

    trainer = Trainer(max_steps=40, limit_val_batches=4, num_sanity_val_steps=1, callbacks=[Record()], **TRAINER)
    trainer.fit(model, datamodule=dm)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses  # about 5.4 -> 3.3 nats
    assert len(raw) == len(clipped) == 40 and max(raw) > 1.05  # grad_clip=1.0 by default: norm -> min(norm, 1)
    assert all(c == pytest.approx(min(r, 1.0), rel=1e-3) for r, c in zip(raw, clipped, strict=True))
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # cosine to 10 %
    out = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert 0 < out["val_bpc"] < 6.5 and out["val_bpc"] == pytest.approx(out["val_loss"] / math.log(2))
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = TransformerPP.load_from_checkpoint(tmp_path / "lm.ckpt")
    assert loaded.dim == 32 and loaded.hparams.max_steps_schedule == 40
    tokens = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(loaded(tokens)[0], model.eval()(tokens)[0])


def test_several_val_loaders_log_per_length_names():
    dm = MQARDataModule(num_pairs=4, seq_len=32, vocab_size=32, batch_size=16, train_samples=16, val_samples=32)
    model = _tiny(vocab_size=32)
    metrics = Trainer(**TRAINER).validate(model, datamodule=dm, verbose=False)
    assert set(metrics[0]) == {f"val_{k}{s}" for k in ("loss", "bpc", "acc") for s in ("", "_len32")}
    assert set(metrics[1]) == {"val_loss_len64", "val_bpc_len64", "val_acc_len64"}
    assert set(metrics[2]) == {"val_loss_len128", "val_bpc_len128", "val_acc_len128"}
    assert metrics[0]["val_acc"] == metrics[0]["val_acc_len32"]
    assert all(0 <= m[f"val_acc_len{n}"] <= 1 for m, n in zip(metrics, (32, 64, 128), strict=True))


# ----------------------------------------------------------------------------------------------- generation
def test_generate_shape_greedy_and_window():
    model = _tiny(max_context=8)
    prompt = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(3))
    a = model.generate(prompt, 6, temperature=0)
    assert a.shape == (2, 26) and torch.equal(a[:, :20], prompt) and model.training  # mode restored
    assert torch.equal(a, model.generate(prompt, 6, temperature=0))
    assert torch.equal(a, model.generate(prompt, 6, top_k=1))
    seq = prompt  # the reference: re-read the last max_context tokens for every new token
    model.eval()
    for _ in range(6):
        seq = torch.cat([seq, model(seq[:, -8:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, seq)
    s1 = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    s2 = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and torch.equal(model.generate(prompt, 0), prompt)


def test_generate_carries_the_state_of_a_stateful_model():
    torch.manual_seed(0)
    model = RunningSumLM(segment_len=3)
    prompt = torch.randint(0, 20, (2, 7))
    out = model.generate(prompt, 5, temperature=0)
    # the prompt in 3 segments (7 tokens, segment_len 3), then one call per new token but the last
    assert len(model.calls) == 3 + 4
    seq = prompt  # the reference: read the whole sequence again for every new token
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


# ----------------------------------------------------------------------------------------------- optimizer, size
def test_optimizer_groups_and_schedule():
    model = _tiny(lr=2e-3, weight_decay=0.1, warmup_steps=10, max_steps_schedule=110)
    config = model.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert all(p.dim() >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == len(list(model.parameters()))
    assert config["optimizer"].defaults["betas"] == (0.9, 0.95)
    f = model.lr_factor
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert _tiny(warmup_steps=0).lr_factor(1000) == 1.0


def test_num_parameters():
    V, D, depth, hidden = 50, 16, 2, SwiGLU(16).hidden
    block = 4 * D * D + 3 * D * hidden + 2 * D
    tied = _tiny()
    assert tied.num_parameters(non_embedding=True) == depth * block + D
    assert tied.num_parameters() == depth * block + D + V * D == sum(p.numel() for p in tied.parameters())
    untied = _tiny(tie_embeddings=False)
    assert untied.num_parameters() == depth * block + D + 2 * V * D
    assert untied.num_parameters(non_embedding=True) == depth * block + D + V * D  # the head is not an embedding


def test_bf16_autocast_forward():
    model = _tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(0, 50, (2, 12)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=30, heads=4),
        dict(dim=12, heads=4),  # odd head width
        dict(depth=0),
        dict(mlp_mult=0),
        dict(window=0),
        dict(rope_base=0.0),
        dict(max_context=0),
        dict(vocab_size=1),
        dict(lr=0.0),
        dict(weight_decay=-0.1),
        dict(warmup_steps=-1),
        dict(warmup_steps=10, max_steps_schedule=10),
        dict(betas=(0.9, 1.0)),
        dict(segment_len=0),
        dict(grad_clip=0.0),
        dict(min_lr_ratio=1.5),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        _tiny(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(max_new_tokens=-1), dict(prompt=torch.zeros(5).long())]
)
def test_bad_generate_arguments_raise(kwargs):
    args = {"prompt": torch.zeros(1, 3).long(), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError):
        _tiny().generate(**args)
