"""HFCausalLM on tiny random-weight Llama, Qwen2 and GPT-2 configs: training, the loss against the model's own
``labels=`` loss, relative level globs, tied weights, freezing, CMS checkpoints, HFTextDataModule and the recipes."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from helpers import Compiled, fit  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import nl_lightning  # noqa: E402
from nl_lightning import Level  # noqa: E402
from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor  # noqa: E402
from nl_lightning.cli import main  # noqa: E402
from nl_lightning.data import HFTextDataModule, TextDataModule, TextDataset  # noqa: E402
from nl_lightning.data.text import load_corpus  # noqa: E402
from nl_lightning.models import CMSAdapter, HFCausalLM  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*`validation_step` but have no `val_dataloader`")

CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
CONFIGS["qwen2"] = {**CONFIGS["llama"], "model_type": "qwen2"}
CMS = {"llama": "model.layers.*.mlp", "qwen2": "model.layers.*.mlp", "gpt2": "transformer.h.*.mlp"}
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def windows(n: int = 8, seq_len: int = 16) -> DataLoader:
    data = load_corpus()[: n * seq_len + 1]
    return DataLoader(TextDataset(data, seq_len), batch_size=4)


def tiny(kind: str = "llama", **kwargs) -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(config=CONFIGS[kind], lr=3e-3, warmup_steps=0, **kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def make_tokenizer(directory: Path):
    """A small byte-level BPE tokenizer trained here (nothing downloaded), saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, special_tokens=["<eos>"])
    tok.train_from_iterator(["The with statement wraps the execution of a block. def class return"] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


# ---------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_loss_equals_hf_loss_and_a_few_steps_train(kind, tmp_path):
    model = tiny(kind).eval()
    assert model.vocab_size == 256 and model.max_context == 64 and model.stateful is False
    window = next(iter(windows()))
    full = torch.cat([window["tokens"], window["targets"][:, -1:]], dim=1)  # (B, T + 1)
    loss, count, _ = model.sequence_loss(window["tokens"], window["targets"])
    reference = model.hf_model(input_ids=full, labels=full).loss
    assert int(count) == window["targets"].numel()
    assert abs(loss.item() - reference.item()) <= 1e-6
    before = snapshot(model)
    trainer = fit(model.train(), [], tmp_path, train_dataloaders=windows(), max_steps=3)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_greedy_generation_equals_hf_generate():
    model = tiny("gpt2", cms={"targets": CMS["gpt2"], "chunk_sizes": [1, 4], "inner_lr": 0.0})
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    ours = model.generate(prompt, 4, temperature=0)
    model.hf_model.eval()
    theirs = model.hf_model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_memorization_off_reads_with_the_learned_weights():
    """``write=False`` (``memorize_at_eval=False``) reads every token as a model whose levels never write."""
    cms = {"targets": CMS["llama"], "chunk_sizes": [2, 4], "inner_lr": 0.3}
    model = tiny("llama", cms=cms).eval()
    with torch.no_grad():
        for level in (m for m in model.modules() if hasattr(m, "value") and isinstance(m.value, nn.Parameter)):
            level.value.copy_(torch.eye(level.dim))  # targets that make the writes matter
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    frozen = tiny("llama", cms={**cms, "inner_lr": 0.0}).eval()
    frozen.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(tokens, write=False)[0], frozen(tokens)[0])
        assert not torch.allclose(model(tokens)[0], frozen(tokens)[0], atol=1e-4)  # writing reads differently
    assert {m.inner_lr for m in model.modules() if hasattr(m, "inner_lr")} == {0.3}  # the rates are restored


def test_cms_checkpoint_directory_loads_with_its_cms(tmp_path):
    from nl_lightning.models import save_pretrained_cms

    source = tiny("llama", cms={"targets": CMS["llama"], "chunk_sizes": [2, 4], "inner_lr": 0.01})
    save_pretrained_cms(source.hf_model, tmp_path)
    loaded = HFCausalLM(pretrained=str(tmp_path))
    assert len([m for m in loaded.modules() if isinstance(m, CMSAdapter)]) == 2
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), loaded.parameters(), strict=True))


def test_pretrained_directory(tmp_path):
    source = tiny("llama")
    source.hf_model.to(torch.bfloat16).save_pretrained(tmp_path)  # a bf16 checkpoint
    loaded = HFCausalLM(pretrained=str(tmp_path))
    assert loaded.hf_model.training  # from_pretrained returns eval mode; a new LightningModule trains
    assert all(b.dtype == torch.float32 for b in loaded.parameters())  # dtype="float32" by default
    assert all(torch.equal(a.float(), b) for a, b in zip(source.parameters(), loaded.parameters(), strict=True))
    assert next(HFCausalLM(pretrained=str(tmp_path), dtype=None).parameters()).dtype == torch.bfloat16
    with pytest.raises(MisconfigurationException, match="without downloading"):
        HFCausalLM(pretrained=str(tmp_path / "missing"))


def test_argument_errors():
    with pytest.raises(MisconfigurationException, match="exactly one of `config`.*config=null"):
        HFCausalLM()
    with pytest.raises(MisconfigurationException, match="exactly one of"):
        HFCausalLM(config=CONFIGS["llama"], pretrained="/x")
    with pytest.raises(MisconfigurationException, match="model_type"):
        HFCausalLM(config={"hidden_size": 32})
    with pytest.raises(MisconfigurationException, match="`cms` must be a dict.*chunk_sizes"):
        tiny(cms={"targets": "model.layers.*.mlp"})
    with pytest.raises(MisconfigurationException, match="to_cms.*failed"):
        tiny(cms={"targets": "model.nothing.*", "chunk_sizes": [1, 4]})
    with pytest.raises(MisconfigurationException, match="`vocab_size` is 300 but the model outputs 256"):
        tiny(vocab_size=300)
    with pytest.raises(MisconfigurationException, match="dtype"):
        tiny(dtype="int8")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "nl-lightning\[hf\]"'):
        HFCausalLM(config=CONFIGS["llama"])
    with pytest.raises(ImportError, match=r'pip install "nl-lightning\[hf\]"'):
        HFTextDataModule("/nowhere")


def test_transformers_is_imported_lazily():
    """No module of the package imports transformers at import time, so `import nl_lightning` works without it."""
    for path in Path(nl_lightning.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), path


def test_data_vocabulary_check(tmp_path):
    data = TextDataModule(seq_len=16, batch_size=2, samples_per_epoch=2)
    small = HFCausalLM(config={**CONFIGS["llama"], "vocab_size": 128})
    with pytest.raises(MisconfigurationException, match="256 token ids but the model only 128"):
        fit(small, [], tmp_path, datamodule=data, max_steps=1)
    large = HFCausalLM(config={**CONFIGS["llama"], "vocab_size": 300})
    with pytest.warns(UserWarning, match="256 token ids and the model 300"):
        fit(large, [], tmp_path, datamodule=data, max_steps=1, limit_val_batches=0)


# ---------------------------------------------------------------------------------------------------- level globs
@pytest.mark.parametrize("compiled", [False, True])
def test_level_globs_relative_to_the_hf_model(compiled, tmp_path):
    model = tiny("llama")
    if compiled:
        model.hf_model = Compiled(model.hf_model)
    prefix = "hf_model._orig_mod." if compiled else "hf_model."
    updates = MultiFrequencyUpdates([Level("lower", ["model.layers.0.*"], 2), Level("top", ["lm_head.*"])])
    fit(model, [updates], tmp_path, train_dataloaders=windows(), max_steps=4)
    lower = [n for n, _ in updates.book.params("lower")]
    assert lower and all(n.startswith(prefix + "model.layers.0.") for n in lower)
    assert [n for n, _ in updates.book.params("top")] == [prefix + "lm_head.weight"]
    assert updates.num_updates == {"lower": 2, "top": 4}
    with pytest.raises(MisconfigurationException, match=r"'model\.layer\.0\.\*' matches no parameter.*model\.layers"):
        fit(tiny("llama"), [MultiFrequencyUpdates([Level("x", ["model.layer.0.*"], 2)])], tmp_path, max_steps=1)


def test_gpt2_tied_head_is_reported_and_two_aliases_are_refused(tmp_path):
    model = tiny("gpt2")
    wte = model.hf_model.transformer.wte.weight
    assert model.hf_model.lm_head.weight is wte
    updates = MultiFrequencyUpdates([Level("head", ["lm_head.*"], 2)])
    with pytest.warns(UserWarning, match=r"matched \['hf_model\.lm_head\.weight'\].*\['hf_model\.transformer\.wte"):
        fit(model, [updates], tmp_path, train_dataloaders=windows(), max_steps=2)
    assert updates.book.params("head") == [("hf_model.transformer.wte.weight", wte)]
    assert updates.num_updates == {"head": 1}
    levels = [Level("head", ["lm_head.*"], 2), Level("embed", ["transformer.wte.*"], 4)]
    match = r"'hf_model\.lm_head\.weight' \(level 'head'.*'hf_model\.transformer\.wte\.weight' \(level 'embed'.*tied"
    with pytest.raises(MisconfigurationException, match=match):
        fit(tiny("gpt2"), [MultiFrequencyUpdates(levels)], tmp_path, train_dataloaders=windows(), max_steps=1)


# ---------------------------------------------------------------------------------------------------- freezing
def test_freeze_with_exceptions_trains_only_those(tmp_path):
    model = tiny("llama", freeze=["model.*"], train=["model.layers.1.mlp.*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".layers.1.mlp." in n or "lm_head" in n}
    before = snapshot(model)
    fit(model, [], tmp_path, train_dataloaders=windows(), max_steps=2)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != (n in trainable), n


def test_freeze_a_tied_alias_freezes_the_tensor():
    model = tiny("gpt2", freeze=["lm_head.*"])
    assert not model.hf_model.transformer.wte.weight.requires_grad
    assert sum(not p.requires_grad for p in model.parameters()) == 1


def test_freeze_errors():
    with pytest.raises(MisconfigurationException, match=r"`freeze` glob 'model\.layer\.\*' matches no.*model\.layers"):
        tiny(freeze=["model.layer.*"])
    with pytest.raises(MisconfigurationException, match="`train` glob 'nothing' matches no"):
        tiny(freeze=["*"], train=["nothing"])
    with pytest.raises(MisconfigurationException, match="`freeze` is empty"):
        tiny(train=["lm_head.*"])
    with pytest.raises(MisconfigurationException, match="changes nothing"):
        tiny(freeze=["model.*"], train=["lm_head.*"])
    with pytest.raises(MisconfigurationException, match="leaves no parameter to train"):
        tiny(freeze=["*"])
    with pytest.raises(MisconfigurationException, match="list of non-empty glob strings"):
        tiny(freeze=[""])


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cms_checkpoint_round_trip(kind, tmp_path):
    cms = {"targets": CMS[kind], "chunk_sizes": [1, 4], "in_context": False}
    model = tiny(kind, cms=cms, freeze=["*"], train=["*.cms.blocks.1.*"])
    assert sum(isinstance(m, CMSAdapter) for m in model.modules()) == 2
    trainer = fit(model, [], tmp_path, train_dataloaders=windows(), max_steps=2)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(123)  # a different random init: every value must come from the checkpoint
    loaded = HFCausalLM.load_from_checkpoint(path)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in loaded.parameters()]


# ---------------------------------------------------------------------------------------------------- data
def test_hf_text_data_module(tmp_path):
    tok = make_tokenizer(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("The with statement wraps the execution of a block.\n" * 60)
    dm = HFTextDataModule(str(tmp_path), paths=[str(text)], seq_len=12, batch_size=3, samples_per_epoch=6)
    assert dm.vocab_size == len(tok)
    dm.setup("fit")
    ids = tok("The with statement wraps the execution of a block.\n" * 60, add_special_tokens=False)["input_ids"]
    assert dm.corpus.tolist() == ids
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (3, 12) and batch["tokens"].dtype == torch.int64
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    val = next(iter(dm.val_dataloader()))
    assert val["tokens"][0].tolist() == ids[dm.split_index : dm.split_index + 12]
    with pytest.raises(ValueError, match="without downloading"):
        HFTextDataModule(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])


SHORT = ["--trainer.max_steps=3", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", *QUIET]


@pytest.mark.usefixtures("_isolated")
def test_recipe_cms_frozen():
    cli = main(["fit", "--config", "hf_llama_cms_frozen", *SHORT])
    model = cli.model
    assert cli.trainer.global_step == 3
    adapters = [m for m in model.modules() if isinstance(m, CMSAdapter)]
    assert len(adapters) == model.hf_model.config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    new = (".mlp.cms.blocks.1.", ".mlp.cms.blocks.2.", ".mlp.cms.blocks.0.value")  # the pretrained weights stay frozen
    assert trainable and all(any(part in n for part in new) for n in trainable)
    assert all(a.cms.in_context for a in adapters)  # token-axis writes on
    (updates,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)]
    assert updates.num_updates == {"cms_1": 0, "cms_2": 0}  # periods 4 and 16: none is due within 3 steps
    assert any(isinstance(cb, NestedLearningMonitor) for cb in cli.trainer.callbacks)


@pytest.mark.usefixtures("_isolated")
def test_recipe_slow_fast_with_a_local_checkpoint_and_its_tokenizer(tmp_path):
    cli = main(["fit", "--config", "hf_llama_slow_fast", *SHORT])
    (updates,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)]
    assert updates.num_updates == {"lower": 0, "upper": 3}
    # The documented GPU command, on the CPU: a local checkpoint directory and its tokenizer.
    checkpoint = tmp_path / "checkpoint"
    tok = make_tokenizer(checkpoint)
    config = transformers.AutoConfig.for_model(**{**CONFIGS["llama"], "vocab_size": len(tok), "num_hidden_layers": 4})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
    args = ["--model.init_args.config=null", f"--model.init_args.pretrained={checkpoint}"]
    args += ["--data=nl_lightning.data.HFTextDataModule", f"--data.init_args.tokenizer={checkpoint}"]
    cli = main(["fit", "--config", "hf_llama_slow_fast", *args, *SHORT, "--trainer.accelerator=cpu"])
    assert cli.trainer.global_step == 3
    assert cli.model.vocab_size == cli.datamodule.vocab_size == len(tok)


def test_a_rule_targets_a_level_from_yaml_style_arguments(tmp_path):
    """Each MultiFrequencyUpdates level gets parameter groups of its own, so a level-targeted rule works without a
    custom `configure_optimizers`."""
    from nl_lightning.callbacks import HypergradientRule

    model = tiny("qwen2")
    updates = MultiFrequencyUpdates([Level("slow", ["model.layers.0.*", "model.embed_tokens.*"], every=2)])
    rule = HypergradientRule(level="slow")
    trainer = fit(model, [updates, rule], tmp_path, train_dataloaders=windows(), max_steps=4)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["slow/decay", "slow/no_decay", "decay", "no_decay"]
    slow = {id(p) for g in trainer.optimizers[0].param_groups[:2] for p in g["params"]}
    assert slow == {id(p) for _, p in updates.book.params("slow")}
    assert updates.num_updates == {"slow": 2}
