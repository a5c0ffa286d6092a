"""HopeConfig and TitansConfig: checks, blocks built from a config, the LightningModules' keywords -> config round trip
and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from nl_lightning.models import (
    HopeBlock,
    HopeConfig,
    HopeModule,
    SelfModifyingTitans,
    TitansBlock,
    TitansConfig,
    TitansMAL,
)
from nl_lightning.models.hope import DEFAULT_CMS_RETENTION

TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
ARCH = dict(vocab_size=32, dim=16, depth=2, heads=2, chunk_size=4, cms_chunk_sizes=[4, 8])


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same parameter names (state_dict keys) and bitwise equal values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------------------------------------ HopeConfig
def test_hope_config_defaults_and_normalisation():
    config = HopeConfig()
    assert (config.dim, config.depth, config.heads, config.chunk_size) == (256, 4, 4, 16)
    assert config.cms_chunk_sizes == (16, 64, 256) and config.cms_retention == DEFAULT_CMS_RETENTION
    assert config.cms_write_signal == "task_loss" and config.titans_kwargs == {}
    assert HopeConfig(variant="attention").cms_write_signal == "target"
    config = HopeConfig(cms_chunk_sizes=[4, 8], cms_retention=[1.0, 0.5], titans_kwargs={"rule": "delta"})
    assert config.cms_chunk_sizes == (4, 8) and config.cms_retention == (1.0, 0.5)
    assert config == HopeConfig(cms_chunk_sizes=(4, 8), cms_retention=(1.0, 0.5), titans_kwargs={"rule": "delta"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 32  # type: ignore[misc]
    assert dataclasses.replace(config, dim=32).dim == 32
    with pytest.raises(ValueError, match="`dim` must be an integer >= 1, got 0"):
        dataclasses.replace(config, dim=0)  # a replaced field is checked again


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, "`vocab_size`.*got 1"),
        ({"dim": 0}, "`dim`.*got 0"),
        ({"depth": 2.0}, "`depth`.*got 2.0"),
        ({"heads": True}, "`heads`.*got True"),
        ({"chunk_size": -1}, "`chunk_size`.*got -1"),
        ({"dim": 30, "heads": 4}, r"`dim` \(30\) must be divisible by `heads` \(4\)"),
        ({"cms_chunk_sizes": []}, "`cms_chunk_sizes`.*got \\[\\]"),
        ({"cms_chunk_sizes": [4, 0]}, "`cms_chunk_sizes`.*got \\[4, 0\\]"),
        ({"cms_hidden_mult": 0.0}, "`cms_hidden_mult`.*got 0.0"),
        ({"variant": "mamba"}, "`variant`.*'mamba'"),
        ({"variant": "attention", "window": 0}, "`window`.*got 0"),
        ({"cms_retention": 0.0}, r"`cms_retention` must be in \(0, 1\].*got 0.0"),
        ({"cms_retention": [1.0, 0.5]}, r"`cms_retention` needs one value per level \(3\)"),
        ({"cms_write_signal": "surprise"}, "`cms_write_signal`.*'surprise'"),
        ({"variant": "attention", "cms_write_signal": "task_loss"}, "variant='titans'"),
        ({"titans_kwargs": "rule=delta"}, "`titans_kwargs` must be None or a dict"),
        ({"titans_kwargs": {"heads": 2}}, r"`titans_kwargs` sets \['heads'\]; set them as fields"),
        ({"titans_kwargs": {"rules": "delta"}}, r"`titans_kwargs`.*\['rules'\]"),
        ({"titans_kwargs": {"eta_max": 1.5}}, r"`titans_kwargs`: `eta_max` must be in \(0, 1\].*1.5"),
    ],
)
def test_hope_config_errors_name_the_field_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HopeConfig(**kwargs)


def test_hope_config_checks_titans_kwargs_with_the_titans_variant_only():
    assert HopeConfig(variant="attention", titans_kwargs={"eta_max": 1.5}).titans_kwargs == {"eta_max": 1.5}
    with pytest.warns(UserWarning, match="max_inner_grad_norm': None"):
        HopeConfig(titans_kwargs={"max_inner_grad_norm": None})


# ------------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 4, "cms_chunk_sizes": [4, 8], "titans_kwargs": {"mem_chunk_size": 3, "rule": "delta"}},
        {"chunk_size": 4, "cms_chunk_sizes": [4], "cms_write_signal": "task_loss", "cms_retention": [0.5]},
        {"variant": "attention", "window": 5, "cms_chunk_sizes": [4, 8], "cms_inner_lr": 0.02},
    ],
)
def test_hope_block_from_a_config_equals_the_keyword_block_bitwise(kwargs):
    """``HopeBlock(config)`` and the keyword form ``HopeBlock(dim, heads, **kwargs)`` (whose write signal defaults to
    ``"target"``) build the same parameters, names and values, from the same seed, and compute the same outputs."""
    config = HopeConfig(dim=16, heads=2, **{"cms_write_signal": "target", **kwargs})
    torch.manual_seed(0)
    from_config = HopeBlock(config)
    torch.manual_seed(0)
    from_keywords = HopeBlock(16, 2, **kwargs)
    assert from_keywords.config == config
    assert_same_module(from_config, from_keywords)
    x = torch.randn(2, 11, 16)
    write = config.cms_write_signal == "target"
    y1, s1 = from_config(x, write=write)
    y2, s2 = from_keywords(x, write=write)
    assert torch.equal(y1, y2)
    assert torch.equal(s1.cms.levels[0].w1, s2.cms.levels[0].w1)


def test_hope_block_positional_form_and_bad_calls():
    torch.manual_seed(0)
    positional = HopeBlock(16, 2, 4, [4, 8])  # dim, heads, chunk_size, cms_chunk_sizes
    torch.manual_seed(0)
    keywords = HopeBlock(dim=16, heads=2, chunk_size=4, cms_chunk_sizes=[4, 8])
    assert_same_module(positional, keywords)
    assert positional.config == HopeConfig(
        dim=16, heads=2, chunk_size=4, cms_chunk_sizes=(4, 8), cms_write_signal="target"
    )
    with pytest.raises(TypeError, match="no further arguments"):
        HopeBlock(HopeConfig(dim=16, heads=2), heads=4)
    with pytest.raises(TypeError, match="bogus"):
        HopeBlock(16, 2, bogus=1)
    with pytest.raises(TypeError, match="dim"):
        HopeBlock()


def test_self_modifying_titans_from_a_config():
    config = HopeConfig(dim=16, heads=2, chunk_size=3, titans_kwargs={"mem_chunk_size": 5, "hidden_mult": 1.5})
    torch.manual_seed(0)
    a = SelfModifyingTitans.from_config(config)
    torch.manual_seed(0)
    b = SelfModifyingTitans(16, 2, 3, mem_chunk_size=5, hidden_mult=1.5)
    assert_same_module(a, b)
    assert (a.chunk_size, a.mem_chunk_size, a.hidden) == (3, 5, 12)
    SelfModifyingTitans.check_arguments(16, 2, 3, rule="delta")
    with pytest.raises(ValueError, match="`rule` must be 'paper' or 'delta', got 'hebbian'"):
        SelfModifyingTitans.check_arguments(16, 2, 3, rule="hebbian")
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['rules'\]"):
        SelfModifyingTitans.check_arguments(16, 2, 3, rules="delta")


# ------------------------------------------------------------------------------------------------ TitansConfig
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "`dim`.*got 0"),
        ({"window": 0}, "`window`.*got 0"),
        ({"memory_depth": 0}, "`memory_depth`.*got 0"),
        ({"dim": 30, "heads": 4}, r"`dim` \(30\) must be divisible by `heads` \(4\)"),
        ({"mlp_mult": -1.0}, "`mlp_mult`.*-1.0"),
        ({"memory_kwargs": [1]}, "`memory_kwargs` must be None or a dict"),
        ({"memory_kwargs": {"depth": 3}}, r"`memory_kwargs` sets \['depth'\].*`memory_depth`"),
        ({"memory_kwargs": {"lr": 0.1}}, r"`memory_kwargs` has names NeuralMemory does not take: \['lr'\]"),
    ],
)
def test_titans_config_errors_name_the_field_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TitansConfig(**kwargs)


def test_titans_blocks_and_model_from_a_config():
    config = TitansConfig(
        vocab_size=32, dim=16, depth=2, heads=2, window=6, chunk_size=4, memory_kwargs={"lr_max": 0.2}
    )
    assert config.memory_kwargs == {"lr_max": 0.2} and TitansConfig().memory_kwargs == {}
    block = TitansBlock(config)
    assert block.memory.chunk_size == 4 and block.attn.window == 6
    kwargs = dict(vocab_size=32, dim=16, depth=2, heads=2, window=6, chunk_size=4, memory_kwargs={"lr_max": 0.2})
    torch.manual_seed(0)
    from_keywords = TitansMAL(**kwargs, segment_len=8)
    torch.manual_seed(0)
    from_config = TitansMAL.from_config(config, segment_len=8)
    assert from_keywords.config == from_config.config == config
    assert_same_module(from_keywords, from_config)
    assert dict(from_config.hparams) == dict(from_keywords.hparams)


# ------------------------------------------------------------------------------------------------ HopeModule
def test_hope_module_keywords_make_its_config_and_back():
    lm = dict(segment_len=8, lr=1e-3)
    torch.manual_seed(0)
    model = HopeModule(**ARCH, titans_kwargs={"rule": "delta"}, **lm)
    assert model.config == HopeConfig(**ARCH, titans_kwargs={"rule": "delta"})
    assert all(block.config is model.config for block in model.blocks)
    assert "config" not in model.hparams and model.hparams.cms_chunk_sizes == [4, 8]  # the keywords, as passed
    assert model.hparams.cms_write_signal is None and model.cms_write_signal == "task_loss"
    torch.manual_seed(0)
    rebuilt = HopeModule.from_config(model.config, **lm)
    assert rebuilt.config == model.config
    assert_same_module(rebuilt, model)
    tokens = torch.randint(0, 32, (2, 13))
    assert torch.equal(rebuilt(tokens)[0], model(tokens)[0])
    assert HopeModule(vocab_size=256, dim=256, depth=4, heads=4).config == HopeConfig()  # the public minimal call


def test_a_checkpoint_saved_by_hope_module_loads(tmp_path):
    torch.manual_seed(0)
    model = HopeModule(**ARCH, segment_len=8, cms_retention=[0.9, 0.7], warmup_steps=0)
    tokens = torch.randint(0, 32, (4, 17))
    batches = [{"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}]
    trainer = Trainer(max_steps=1, **TRAINER)
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "hope.ckpt")
    checkpoint = torch.load(tmp_path / "hope.ckpt", weights_only=False)
    assert "config" not in checkpoint["hyper_parameters"]  # plain keywords: loads with or without HopeConfig
    assert checkpoint["hyper_parameters"]["cms_retention"] == [0.9, 0.7]
    loaded = HopeModule.load_from_checkpoint(tmp_path / "hope.ckpt")
    assert loaded.config == model.config
    assert_same_module(loaded, model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=0, rtol=0)
