"""Saving and loading transformers causal LMs converted by to_cms: save_pretrained_cms / from_pretrained_cms.

Tiny random-weight configs (no download), trained a few optimizer steps so that every CMS level differs from its
initialisation; the round trip restores the same weights, the same runtime settings and the same outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nl_lightning.models import CMSAdapter, to_cms  # noqa: E402
from nl_lightning.models.hf_checkpoint import (  # noqa: E402
    CONVERSIONS_FILE,
    from_pretrained_cms,
    is_cms_checkpoint,
    save_pretrained_cms,
)

VOCAB = 64
TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}


def make(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS)
        return transformers.GPT2LMHeadModel(config), "transformer.h.*.mlp"
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **TOKENS)  # fmt: skip
    return transformers.LlamaForCausalLM(config), "model.layers.*.mlp"


def trained(arch: str):
    """Converted with writes on, then 3 Adam steps: every level's parameters moved away from the conversion."""
    model, targets = make(arch)
    to_cms(model, targets, [2, 4], inner_lr=0.1, retention=[1.0, 0.9])
    adapter = next(m for m in model.modules() if isinstance(m, CMSAdapter))
    before = [p.detach().clone() for p in adapter.cms.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(3):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, adapter.cms.parameters(), strict=True))
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_restores_weights_settings_and_outputs(tmp_path, arch):
    model = trained(arch)
    adapter_name, adapter = next((n, m) for n, m in model.named_modules() if isinstance(m, CMSAdapter))
    adapter.cms.blocks[1].inner_lr = 0.05  # changed after the conversion: not in the weights, restored all the same
    adapter.check_finite = False
    save_pretrained_cms(model, tmp_path)
    assert is_cms_checkpoint(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["nl_cms"]["loader"] == "nl_lightning.models.from_pretrained_cms"
    assert not hasattr(model.config, "nl_cms")  # the marker is written, not left on the model

    loaded = from_pretrained_cms(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert not hasattr(loaded.config, "nl_cms")
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    twin = dict(loaded.named_modules())[adapter_name]
    assert twin.cms.blocks[1].inner_lr == 0.05 and twin.cms.blocks[0].inner_lr == 0.1
    assert [b.retention for b in twin.cms.blocks] == [1.0, 0.9] and twin.check_finite is False
    assert loaded.nl_cms_conversions == model.nl_cms_conversions
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), loaded.generate(ids, **kwargs))  # hooks installed on load


def test_sharded_checkpoint_and_tied_weights(tmp_path):
    """GPT-2 ties lm_head to wte (saved once); a sharded save loads as well."""
    model = trained("gpt2")
    save_pretrained_cms(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = from_pretrained_cms(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_directory_without_the_conversions_file_is_refused(tmp_path):
    model, _ = make("llama")
    model.save_pretrained(tmp_path)
    assert not is_cms_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no {CONVERSIONS_FILE}.*save_pretrained_cms"):
        from_pretrained_cms(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_pretrained_cms(tmp_path / "nowhere")


def test_saving_an_unconverted_model_is_refused(tmp_path):
    model, _ = make("llama")
    with pytest.raises(ValueError, match="no recorded CMS conversion.*to_cms"):
        save_pretrained_cms(model, tmp_path)


def test_weights_that_do_not_match_the_conversions_are_refused(tmp_path):
    model = trained("llama")
    save_pretrained_cms(model, tmp_path)
    record = json.loads((tmp_path / CONVERSIONS_FILE).read_text())
    record["conversions"][0]["targets"] = ["model.layers.0.mlp"]  # layer 1 would stay a plain MLP
    del record["adapters"]["model.layers.1.mlp"]
    (tmp_path / CONVERSIONS_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"do not match.*missing \['model.layers.1.mlp.gate_proj.weight'"):
        from_pretrained_cms(tmp_path)
    record["format"] = 99
    (tmp_path / CONVERSIONS_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="format 99"):
        from_pretrained_cms(tmp_path)


def test_plain_from_pretrained_reinitialises_the_ffns_and_names_the_loader(tmp_path):
    """What a plain ``from_pretrained`` does with such a directory: the original MLPs come back re-initialised (the
    load report lists them as missing), the CMS is dropped, and the config's ``nl_cms`` entry names the loader."""
    model = trained("llama")
    save_pretrained_cms(model, tmp_path)
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert plain.config.nl_cms["loader"] == "nl_lightning.models.from_pretrained_cms"
    assert "model.layers.0.mlp.gate_proj.weight" in info["missing_keys"]
    assert "model.layers.0.mlp.cms.blocks.0.w1" in info["unexpected_keys"]
    assert not any(isinstance(m, CMSAdapter) for m in plain.modules())
    level0 = model.model.layers[0].mlp.cms.blocks[0]
    assert not torch.equal(plain.model.layers[0].mlp.down_proj.weight, level0.w2)
