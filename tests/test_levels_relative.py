"""Level globs relative to a wrapped model (``nl_parameter_root``), without ``torch.compile``'s ``_orig_mod``, and
tied weights (one tensor under two names): resolution, reports and errors, in plain PyTorch and through the callback."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import NUM_CLASSES, NUM_FEATURES, Compiled, TinyNet, fit
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.callbacks.cms_consolidation import ConsolidationPair
from nl_lightning.levels import ParameterNames, TiedParameter, resolve_levels, strip_compile_prefix


class Tied(nn.Module):
    """``embed`` and ``head`` share one weight (as GPT-2's ``wte`` and ``lm_head``); ``mid`` is untied."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight


class RootedTinyNet(TinyNet):
    """TinyNet that declares its ``net`` as the root of relative names (``"0.*"`` selects ``"net.0.*"``)."""

    nl_parameter_root = "net"


def names(pairs):
    return [n for n, _ in pairs]


def test_strip_compile_prefix():
    assert strip_compile_prefix("a._orig_mod.b._orig_mod.c") == "a.b.c"
    assert strip_compile_prefix("_orig_mod.w") == "w"
    assert strip_compile_prefix("net.0.weight") == "net.0.weight"
    assert strip_compile_prefix("my_orig_mod.w") == "my_orig_mod.w"  # only whole segments


def test_globs_need_no_orig_mod_and_full_names_still_match():
    model = nn.Sequential()
    model.add_module("body", Compiled(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))))
    named = list(model.named_parameters())
    assert names(named)[0] == "body._orig_mod.0.weight"
    for glob in ("body.0.*", "body._orig_mod.0.*", "*.0.*"):
        matched = resolve_levels([Level("slow", [glob], 2)], named)
        assert names(matched["slow"]) == ["body._orig_mod.0.weight", "body._orig_mod.0.bias"], glob


def test_globs_relative_to_a_root_also_under_compile():
    outer = nn.Module()
    outer.inner = Compiled(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    named = list(outer.named_parameters())
    for glob in ("1.*", "inner.1.*", "inner._orig_mod.1.*"):
        matched = resolve_levels([Level("top", [glob])], named, root="inner")
        assert names(matched["top"]) == ["inner._orig_mod.1.weight", "inner._orig_mod.1.bias"], glob
    with pytest.raises(ValueError, match=r"'1\.\*' matches no parameter"):
        resolve_levels([Level("top", ["1.*"])], named)  # no root: relative names do not exist
    with pytest.raises(ValueError, match="root"):
        ParameterNames(named, root="")


def test_unmatched_glob_lists_the_names_a_user_writes():
    outer = nn.Module()
    outer.inner = Compiled(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"'layers\.1\.\*' matches no parameter.*'1\.weight'") as err:
        resolve_levels([Level("top", ["layers.1.*"])], outer.named_parameters(), root="inner")
    assert "_orig_mod" not in str(err.value) and "inner." not in str(err.value)


def test_tied_weight_resolves_to_one_tensor_under_its_first_name():
    model = Tied()
    named = list(model.named_parameters(remove_duplicate=False))
    assert "head.weight" in names(named) and "head.weight" not in names(model.named_parameters())
    for glob in ("head.*", "embed.*"):
        book = LevelSet([Level("slow", [glob], 3)], named)
        assert book.params("slow") == [("embed.weight", model.embed.weight)], glob
    book = LevelSet([Level("slow", ["head.*"], 3)], model.named_parameters(remove_duplicate=False))
    assert book.tied == [TiedParameter("slow", ("embed.weight", "head.weight"), ("head.weight",))]
    both = LevelSet([Level("slow", ["embed.*", "head.*"], 3)], model.named_parameters(remove_duplicate=False))
    assert both.tied == [TiedParameter("slow", ("embed.weight", "head.weight"), ("embed.weight", "head.weight"))]
    assert LevelSet([Level("m", ["mid.*"], 2)], model.named_parameters(remove_duplicate=False)).tied == []
    # Without the aliases (remove_duplicate=True) only the first name exists, as before.
    with pytest.raises(ValueError, match=r"'head\.\*' matches no parameter"):
        LevelSet([Level("slow", ["head.*"], 3)], model.named_parameters())


def test_two_levels_claiming_a_tied_tensor_through_two_names():
    model = Tied()
    levels = [Level("out", ["head.*"], 2), Level("inp", ["embed.*"], 4)]
    with pytest.raises(ValueError, match=r"'head\.weight' \(level 'out'.*'embed\.weight' \(level 'inp'.*tied weights"):
        resolve_levels(levels, model.named_parameters(remove_duplicate=False))
    # The same name claimed twice keeps its message.
    levels = [Level("a", ["head.*"], 2), Level("b", ["*.weight"], 4)]
    with pytest.raises(ValueError, match=r"Parameter 'head\.weight' is matched by level 'a'.*and by level 'b'"):
        resolve_levels(levels, model.named_parameters(remove_duplicate=False))


def test_relative_globs_train_exactly_as_full_names(tmp_path):
    results = []
    for levels in ([Level("slow", ["0.*"], 3)], [Level("slow", ["net.0.*"], 3)]):
        model = RootedTinyNet()
        updates = MultiFrequencyUpdates(levels)
        fit(model, [updates], tmp_path, max_steps=7)
        assert names(updates.book.params("slow")) == ["net.0.weight", "net.0.bias"]
        assert updates.num_updates == {"slow": 2}
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_callback_reports_a_tie(tmp_path, caplog):
    class TiedNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(NUM_FEATURES, NUM_FEATURES), nn.Tanh(), nn.Linear(NUM_FEATURES, 8))
            self.out = nn.Linear(8, NUM_CLASSES)
            self.net[0].weight = nn.Parameter(torch.eye(NUM_FEATURES) * 0.5)
            self.twin = nn.Linear(NUM_FEATURES, NUM_FEATURES)
            self.twin.weight = self.net[0].weight  # one tensor, names 'net.0.weight' and 'twin.weight'

        def forward(self, x):
            return self.out(self.net(x) + self.twin(x).mean())

    model = TiedNet()
    with pytest.warns(UserWarning, match=r"Level 'slow' \(every=2\) matched \['twin\.weight'\].*\['net\.0\.weight'\]"):
        fit(model, [MultiFrequencyUpdates([Level("slow", ["twin.weight"], 2)])], tmp_path, max_steps=2)
    with caplog.at_level(logging.INFO):
        fit(TiedNet(), [MultiFrequencyUpdates([Level("s", ["twin.weight", "net.0.weight"], 2)])], tmp_path, max_steps=1)
    assert (
        "['net.0.weight', 'twin.weight'] are one tensor (tied weights); it follows level 's' (every=2)" in caplog.text
    )
    with pytest.raises(MisconfigurationException, match="tied weights"):
        levels = [Level("a", ["twin.weight"], 2), Level("b", ["net.0.*"], 3)]
        fit(TiedNet(), [MultiFrequencyUpdates(levels)], tmp_path, max_steps=1)


@pytest.mark.parametrize("root", ["nothing_here", 3])
def test_bad_parameter_root(tmp_path, root):
    class Bad(TinyNet):
        nl_parameter_root = root

    with pytest.raises(MisconfigurationException, match="nl_parameter_root"):
        fit(Bad(), [MultiFrequencyUpdates([Level("slow", ["net.0.*"], 2)])], tmp_path, max_steps=1)


def test_checkpoint_state_uses_full_names(tmp_path):
    model = RootedTinyNet()
    updates = MultiFrequencyUpdates([Level("slow", ["0.*"], 3)])
    fit(model, [updates], tmp_path, max_steps=2)
    assert sorted(updates.state_dict()["levels"]["slow"]["buffers"]) == ["net.0.bias", "net.0.weight"]


def test_consolidation_prefixes_may_be_relative_to_the_parameter_root():
    """CMSConsolidation's fast/slow prefixes, like level globs, may leave out the wrapper's root and `_orig_mod`."""
    from nl_lightning.callbacks.cms_consolidation import _match

    fast = {f"hf_model._orig_mod.mlp.cms.blocks.1.{n}": torch.zeros(2) for n in ("w1", "b1")}
    slow = {f"hf_model._orig_mod.mlp.cms.blocks.2.{n}": torch.zeros(2) for n in ("w1", "b1")}
    named = {**fast, **slow}
    pair = ConsolidationPair(name="p", fast="mlp.cms.blocks.1", slow="mlp.cms.blocks.2", mode="drift", every=4)
    matches = _match(pair, named, root="hf_model")
    assert [(rel, f, s) for rel, f, _, s, _ in matches] == [
        ("b1", "hf_model._orig_mod.mlp.cms.blocks.1.b1", "hf_model._orig_mod.mlp.cms.blocks.2.b1"),
        ("w1", "hf_model._orig_mod.mlp.cms.blocks.1.w1", "hf_model._orig_mod.mlp.cms.blocks.2.w1"),
    ]
    full = ConsolidationPair(
        name="p", fast="hf_model._orig_mod.mlp.cms.blocks.1", slow="hf_model.mlp.cms.blocks.2", mode="drift", every=4
    )
    assert [m[1] for m in _match(full, named, root="hf_model")] == [m[1] for m in matches]
