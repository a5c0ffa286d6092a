"""HopeModule, HopeBlock and the Titans (MAL) baseline: state carry, evaluation modes, precision, training."""

from __future__ import annotations

import pytest
import torch
from helpers import fit

from nl_lightning.data import MQARDataModule, TextDataModule
from nl_lightning.models import HopeBlock, HopeModule, HopeState, TitansMAL, TransformerPP
from nl_lightning.models.cms_memory import CMSState
from nl_lightning.models.hope import DEFAULT_CMS_RETENTION

TINY = dict(vocab_size=64, dim=32, depth=2, heads=4)


def models(**kw):
    return {
        "hope": HopeModule(**TINY, chunk_size=4, cms_chunk_sizes=[4, 8], **kw),
        "hope_attention": HopeModule(**TINY, variant="attention", cms_chunk_sizes=[4, 8], **kw),
        "titans": TitansMAL(**TINY, window=8, chunk_size=4, **kw),
        "transformer": TransformerPP(**TINY, **kw),
    }


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_carrying_the_state_equals_one_long_pass():
    """Hope has no attention: everything it remembers of a segment is in the state it returns."""
    torch.manual_seed(0)
    model = models()["hope"].double()
    x = tokens(length=24)
    full, _ = model(x)
    first, state = model(x[:, :8])  # a boundary at a chunk multiple
    second, _ = model(x[:, 8:], state)
    assert torch.allclose(torch.cat([first, second], dim=1), full, atol=1e-9)


def test_titans_carries_its_memory_and_its_attention_cache():
    torch.manual_seed(0)
    model = models()["titans"].double()
    x = tokens(length=24)
    full, _ = model(x)
    first, state = model(x[:, :8])
    second, _ = model(x[:, 8:], state)
    fresh, _ = model(x[:, 8:])
    assert torch.allclose(first, full[:, :8], atol=1e-12)
    assert not torch.allclose(second, fresh, atol=1e-6)  # the memory carried over matters
    assert torch.allclose(second, full[:, 8:], atol=1e-12)  # memory and key/value cache carried: one long pass


def test_hope_attention_carries_only_its_cms():
    torch.manual_seed(0)
    model = models()["hope_attention"]
    _, state = model(tokens())
    assert all(b.titans is None and isinstance(b.cms, CMSState) for b in state.blocks)
    out1, _ = model(tokens(seed=1), state)
    out2, _ = model(tokens(seed=1))
    assert not torch.allclose(out1, out2)  # the CMS memory of the first segment changes the second


@pytest.mark.parametrize("name", ["hope", "titans"])
def test_per_sample_state_isolation(name):
    torch.manual_seed(0)
    model = models()[name].double()
    x = tokens(batch=3)
    batched, _ = model(x)
    for i in range(3):
        alone, _ = model(x[i : i + 1])
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-9)


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans"])
def test_write_false_reads_without_writing(name):
    torch.manual_seed(0)
    model = models()[name]
    _, state = model(tokens())
    with torch.inference_mode():
        y_read, same = model(tokens(seed=1), state, write=False)
        y_write, moved = model(tokens(seed=1), state)
    assert not torch.allclose(y_read, y_write)
    flat = [t for b in same.blocks for t in _tensors(b)]
    orig = [t for b in state.blocks for t in _tensors(b)]
    assert all(torch.equal(a, b) for a, b in zip(flat, orig, strict=True))


def _tensors(block_state):
    if hasattr(block_state, "cms"):  # HopeBlockState: the CMS fast weights (the titans state's conv history moves)
        return [w for lvl in block_state.cms.levels for w in lvl.weights]
    return [t for t in vars(block_state).values() if isinstance(t, torch.Tensor) and t.dim() > 2]


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = models()[name]
    logits, _ = model.segment_forward(tokens(length=32), segment_len=16)
    logits.float().pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []  # the CMS value projections included: first-order writes keep their targets' gradient


@pytest.mark.parametrize("name", ["hope", "titans"])
def test_bf16_autocast_keeps_state_fp32(name):
    torch.manual_seed(0)
    model = models()[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(tokens())
    assert torch.isfinite(logits.float()).all()
    block = state.blocks[0]
    memory = block.titans if isinstance(state, HopeState) else block
    assert {t.dtype for t in vars(memory).values() if isinstance(t, torch.Tensor) and t.is_floating_point()} == {
        torch.float32
    }


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans", "transformer"])
def test_a_few_steps_decrease_the_loss_and_validate_predict_work(name, tmp_path):
    torch.manual_seed(0)
    model = models(lr=3e-3, warmup_steps=0, segment_len=16)[name]
    dm = MQARDataModule(num_pairs=4, seq_len=32, vocab_size=64, batch_size=16, train_samples=256, val_samples=32)
    x = next(iter(_loader(dm)))
    before = float(model.sequence_loss(x["tokens"], x["targets"])[0])
    trainer = fit(model, [], tmp_path, datamodule=dm, max_steps=30, limit_val_batches=1, num_sanity_val_steps=0)
    after = float(model.sequence_loss(x["tokens"], x["targets"])[0])
    assert after < before - 0.3, (before, after)
    if name in ("hope", "titans"):  # per-layer memory statistics (inner loss / surprise, norms)
        assert any(k.startswith("train_layer0/") for k in trainer.callback_metrics)
    results = trainer.validate(model, datamodule=dm, verbose=False)  # inference mode, memory writing
    metrics = {k: v for per_loader in results for k, v in per_loader.items()}
    assert {"val_acc_len32", "val_acc_len64", "val_acc_len128"} <= set(metrics)
    preds = trainer.predict(model, dataloaders=dm.val_dataloader()[0])
    assert preds[0].shape == (16, 32)


def _loader(dm):
    dm.setup("fit")
    return dm.train_dataloader()


def test_generate_carries_the_state():
    torch.manual_seed(0)
    model = models()["hope"].eval()
    prompt = tokens(batch=2, length=6)
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], prompt)
    # greedy generation with the carried state equals re-reading the whole sequence each time
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_text_datamodule_trains_hope(tmp_path):
    model = HopeModule(vocab_size=256, dim=32, depth=1, heads=4, chunk_size=8, cms_chunk_sizes=[8], segment_len=32)
    dm = TextDataModule(seq_len=64, batch_size=4, samples_per_epoch=16)
    trainer = fit(model, [], tmp_path, datamodule=dm, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    assert torch.isfinite(torch.tensor(trainer.validate(model, datamodule=dm, verbose=False)[0]["val_bpc"]))


@pytest.mark.parametrize(("retention", "expected"), [(None, [DEFAULT_CMS_RETENTION] * 2), ([1.0, 0.5], [1.0, 0.5])])
def test_cms_retention_reaches_every_level(retention, expected):
    kwargs = {} if retention is None else {"cms_retention": retention}
    for variant in ("titans", "attention"):
        model = HopeModule(**TINY, variant=variant, cms_chunk_sizes=[4, 8], **kwargs)
        assert [[lvl.retention for lvl in blk.cms.blocks] for blk in model.blocks] == [expected] * TINY["depth"]
    assert 0 < DEFAULT_CMS_RETENTION < 1


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (HopeModule, {"variant": "mamba"}, "variant"),
        (HopeModule, {"dim": 0}, "dim"),
        (TitansMAL, {"window": 0}, "window"),
        (HopeBlock, {"dim": 30, "heads": 4}, "30"),
        (HopeModule, {"cms_retention": 0.0}, r"retention.*\(0, 1\]"),
        (HopeModule, {"cms_chunk_sizes": [4, 8], "cms_retention": [0.9]}, "retention.*one value per level"),
    ],
)
def test_errors(cls, kwargs, match):
    args = {"dim": 32} if cls is HopeBlock else {}
    with pytest.raises(ValueError, match=match):
        cls(**{**args, **kwargs})


def test_language_models_take_an_optimizer_callable():
    from functools import partial

    from nl_lightning.optim import M3

    model = TransformerPP(**TINY, optimizer=partial(M3, lr=1e-5, slow_every=10), warmup_steps=4)
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, M3) and [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 / 4)  # the warm-up schedule applies to it too
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-5 / 4)
    assert "optimizer" not in model.hparams  # a callable is not saved in checkpoints
