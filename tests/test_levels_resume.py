# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Resuming with changed levels, non-finite gradients kept out of the level buffers, one-glob levels in YAML, and the
warning for a period longer than the run."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, batches, fit
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import nl_lightning
from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.cli import main

NAMES = ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "head.weight", "head.bias"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        self.head = nn.Linear(2, 1)


def _step(book: LevelSet, model: nn.Module, value: float) -> dict[str, float | None]:
    """One committed step on which every parameter's gradient is ``value``; returns the value each optimizer sees."""
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    plan = book.prepare()
    seen = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, p.grad.flatten()[0].expand_as(p.grad), equal_nan=True), n
        seen[n] = None if p.grad is None else p.grad.flatten()[0].item()
    book.commit(plan)
    return seen


def _saved(levels: list[Level], values: list[float]) -> dict:
    """The engine state after committed steps with gradients ``values``, through torch.save / load(weights_only)."""
    model = Net()
    book = LevelSet(levels, model.named_parameters())
    for v in values:
        _step(book, model, v)
    buffer = io.BytesIO()
    torch.save(book.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume(levels: list[Level], state: dict) -> tuple[LevelSet, nn.Module]:
    model = Net()
    book = LevelSet(levels, model.named_parameters())
    book.load_state_dict(state, strict=False)
    return book, model


# ------------------------------------------------------------------------------------------- resuming, the engine
def test_widened_glob_new_parameters_join_at_the_resume():
    """``backbone.0.*`` -> ``backbone.*``: the new parameters' first step is the mean of what they got since."""
    state = _saved([Level("slow", ["backbone.0.*"], every=4)], [1.0, 2.0])
    widened = [Level("slow", ["backbone.*"], every=4)]
    book, model = _resume(widened, state)
    assert _step(book, model, 3.0)["backbone.1.weight"] is None  # held: the level is not due yet
    seen = _step(book, model, 4.0)
    assert seen["backbone.0.weight"] == (1 + 2 + 3 + 4) / 4
    assert seen["backbone.1.weight"] == seen["backbone.1.bias"] == (3 + 4) / 2  # was 7 / 4: under-scaled
    assert seen["head.weight"] == 4.0
    assert book.num_updates == {"slow": 1} and book.counts == {"slow": 0}
    assert book.compare_state_dict(state).changed == ["slow: joined ['backbone.1.weight', 'backbone.1.bias']"]
    with pytest.raises(ValueError, match=r"changed \[\"slow: joined \['backbone.1.weight', 'backbone.1.bias'\]\"\]"):
        LevelSet(widened, Net().named_parameters()).load_state_dict(state)  # strict: the change is named


def test_changed_globs_same_name_move_the_held_gradients():
    """Two levels swap their globs: each parameter brings its held gradients into its new level."""
    saved = [Level("a", ["backbone.0.*"], every=4), Level("b", ["backbone.1.*"], every=3)]
    state = _saved(saved, [1.0, 2.0])
    swapped = [Level("a", ["backbone.1.*"], every=4), Level("b", ["backbone.0.*"], every=3)]
    book, model = _resume(swapped, state)
    seen = _step(book, model, 3.0)  # b is due (count 3): backbone.0 steps on all three of its gradients
    assert seen["backbone.0.weight"] == (1 + 2 + 3) / 3 and seen["backbone.1.weight"] is None
    seen = _step(book, model, 4.0)  # a is due: backbone.1 steps on all four of its gradients (was 7 / 4)
    assert seen["backbone.1.weight"] == (1 + 2 + 3 + 4) / 4 and seen["backbone.0.weight"] is None
    changed = book.compare_state_dict(state).changed
    assert "a: joined ['backbone.1.weight', 'backbone.1.bias']" in changed
    assert "b: left ['backbone.1.bias', 'backbone.1.weight']" in changed
    assert book.compare_state_dict(state).unexpected == []  # nothing is dropped


def test_moved_into_a_new_level_keeps_its_gradients():
    """A renamed level is a new level (fresh clock); its parameters bring what they held."""
    state = _saved([Level("slow", ["backbone.*"], every=4)], [1.0, 2.0])
    book, model = _resume([Level("renamed", ["backbone.*"], every=3)], state)
    assert _step(book, model, 3.0)["backbone.0.weight"] is None
    assert _step(book, model, 4.0)["backbone.0.weight"] is None
    assert _step(book, model, 5.0)["backbone.0.weight"] == (1 + 2 + 3 + 4 + 5) / 5
    result = book.compare_state_dict(state)
    assert result.missing == ["renamed"] and result.unexpected == ["slow"]


def test_held_gradients_that_no_level_takes_are_reported():
    state = _saved([Level("slow", ["backbone.0.*"], every=4)], [1.0, 2.0])
    narrowed = [Level("slow", ["backbone.1.*"], every=4)]
    with pytest.raises(ValueError, match=r"unexpected \['slow/backbone.0.weight', 'slow/backbone.0.bias'\]"):
        LevelSet(narrowed, Net().named_parameters()).load_state_dict(state)
    book, _ = _resume(narrowed, state)
    assert book.compare_state_dict(state).unexpected == ["slow/backbone.0.weight", "slow/backbone.0.bias"]


@pytest.mark.parametrize(
    ("every", "steps"),
    [
        (1, [(3.0, (1 + 2 + 3) / 3), (4.0, 4.0)]),  # period 1: the held gradients join the next update
        (2, [(3.0, (1 + 2 + 3) / 3), (4.0, None), (5.0, 4.5)]),  # shorter than the count: due at once
        (5, [(3.0, None), (4.0, None), (5.0, 3.0)]),  # longer: keeps its position
    ],
)
def test_changed_period_keeps_the_held_gradients(every, steps):
    state = _saved([Level("slow", ["backbone.*"], every=4)], [1.0, 2.0])
    book, model = _resume([Level("slow", ["backbone.*"], every=every)], state)
    for value, expected in steps:
        assert _step(book, model, value)["backbone.1.bias"] == expected
    assert book.compare_state_dict(state).changed == [f"slow: every 4 -> {every}"]


def test_unchanged_levels_report_nothing_and_old_states_load():
    levels = [Level("slow", ["backbone.*"], every=4)]
    state = _saved(levels, [1.0, 2.0])
    assert LevelSet(levels, Net().named_parameters()).load_state_dict(state) == ([], [], [])
    for key in ("params", "held"):  # a state saved before memberships were recorded
        del state["levels"]["slow"][key]
    book, model = _resume(levels, state)
    _step(book, model, 3.0)
    assert _step(book, model, 4.0)["backbone.0.weight"] == 2.5


# ------------------------------------------------------------------------------------------- resuming, the callback
def test_callback_refuses_a_resume_that_drops_held_gradients(tmp_path):
    first = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=4)])
    trainer = fit(TinyNet(optimizer="plain_sgd"), [first], tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    moved = MultiFrequencyUpdates([Level("slow", ["net.2.*"], every=4)])
    with pytest.raises(MisconfigurationException, match=r"gradients of \['slow/net.0.weight', 'slow/net.0.bias'\]"):
        fit(TinyNet(optimizer="plain_sgd"), [moved], tmp_path, max_steps=4, ckpt_path=tmp_path / "mid.ckpt")


def test_callback_widened_glob_warns_and_continues(tmp_path):
    first = MultiFrequencyUpdates([Level("slow", ["net.0.weight"], every=4)])
    trainer = fit(TinyNet(optimizer="plain_sgd"), [first], tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    widened = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=4)])
    with pytest.warns(UserWarning, match=r"changed: \[\"slow: joined \['net.0.bias'\]\"\]"):
        fit(TinyNet(optimizer="plain_sgd"), [widened], tmp_path, max_steps=4, ckpt_path=tmp_path / "mid.ckpt")
    assert widened.num_updates == {"slow": 1}


# ------------------------------------------------------------------------------------------- non-finite gradients
def test_nonfinite_gradients_never_enter_a_buffer():
    model = Net()
    book = LevelSet([Level("slow", ["backbone.*"], every=3)], model.named_parameters())
    _step(book, model, 1.0)
    seen = _step(book, model, float("inf"))  # masked on this step, nothing added
    assert seen["backbone.0.weight"] is None and seen["head.weight"] == float("inf")  # no level: the optimizer's
    assert book.counts == {"slow": 1}
    assert _step(book, model, 3.0)["backbone.0.weight"] is None
    nan = _step(book, model, float("nan"))  # due, but not finite: masked, stays due
    assert nan["backbone.0.weight"] is None and book.is_due("slow") and book.num_updates == {"slow": 0}
    assert _step(book, model, 5.0)["backbone.0.weight"] == (1 + 3 + 5) / 3
    assert book.num_updates == {"slow": 1}


def test_nonfinite_gradients_can_raise():
    model = Net()
    book = LevelSet([Level("slow", ["backbone.*"], every=3)], model.named_parameters(), nonfinite="raise")
    _step(book, model, 1.0)
    with pytest.raises(FloatingPointError, match=r"level\(s\) \{'slow': \['backbone.0.weight'"):
        _step(book, model, float("inf"))
    assert book.counts == {"slow": 1}
    with pytest.raises(ValueError, match="`nonfinite` must be one of"):
        LevelSet([Level("slow", ["backbone.*"], every=3)], model.named_parameters(), nonfinite="ignore")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # on a CPU, Lightning runs 16-mixed as bf16-mixed
def test_inf_loss_under_mixed_precision_on_cpu_leaves_the_levels_finite(tmp_path, precision):
    """No GradScaler: the step with an inf loss is skipped by every level, and the run goes on finite."""
    levels = [Level("slow", ["net.0.*"], every=3), Level("fast", ["net.2.*"])]
    cb = MultiFrequencyUpdates(levels)
    model = TinyNet(inf_calls=[2])
    with pytest.warns(UserWarning, match=r"non-finite gradients \(inf or NaN\) in level\(s\) \['slow', 'fast'\]"):
        trainer = fit(model, [cb], tmp_path, max_steps=6, precision=precision)
    assert getattr(trainer.precision_plugin, "scaler", None) is None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert cb.num_updates == {"slow": 1, "fast": 5}  # step 2 counted by no level: slow updates at step 4
    assert cb.book.counts == {"slow": 2, "fast": 0}
    assert all(torch.isfinite(b).all() for c in cb.book._clocks.values() for b in c.buffers.values())


def test_callback_nonfinite_raise(tmp_path):
    cb = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)], nonfinite="raise")
    with pytest.raises(FloatingPointError, match="Non-finite gradients"):
        fit(TinyNet(inf_calls=[2]), [cb], tmp_path, max_steps=4, precision="bf16-mixed")
    with pytest.raises(MisconfigurationException, match="`nonfinite` must be 'skip'"):
        MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)], nonfinite="ignore")


# ------------------------------------------------------------------------------------------- configuration
def test_period_longer_than_the_run_warns(tmp_path):
    cb = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=10), Level("mid", ["net.2.*"], every=2)])
    with pytest.warns(UserWarning, match=r"Level 'slow' has every=10, but this run takes 3 optimizer steps") as rec:
        fit(TinyNet(), [cb], tmp_path, max_steps=3)
    assert not any("'mid'" in str(w.message) for w in rec)
    assert cb.num_updates == {"slow": 0, "mid": 1}


def test_one_glob_string_in_yaml_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = Path(nl_lightning.__file__).parent / "recipes" / "digits_multifrequency.yaml"
    text = recipe.read_text()
    assert 'params: ["backbone.*"]' in text
    config = tmp_path / "one_glob.yaml"
    config.write_text(text.replace('params: ["backbone.*"]', 'params: "backbone.*"'))
    quiet = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]
    quiet.append("--trainer.enable_model_summary=false")
    cli = main(["fit", "--config", str(config), "--trainer.max_steps=8", *quiet])
    (updates,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)]
    assert [(lvl.name, lvl.params, lvl.every) for lvl in updates.levels] == [
        ("head", ("head.*",), 1),
        ("backbone", ("backbone.*",), 8),
    ]
    assert updates.num_updates == {"head": 8, "backbone": 1}


def test_callback_widened_glob_resumes_exactly(tmp_path):
    """Lightning end to end, against a hand-written loop: ``net.0.weight`` (every 4) widened to ``net.0.*`` at the
    epoch boundary (step 7, count 3): ``net.0.bias`` steps every step before, then with the level from step 8 on the
    mean of the gradients it got since it joined (step 8 alone, then steps 9-12)."""
    first = MultiFrequencyUpdates([Level("slow", ["net.0.weight"], every=4)])
    trainer = fit(TinyNet(optimizer="plain_sgd"), [first], tmp_path, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch.ckpt")
    widened, resumed = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=4)]), TinyNet(optimizer="plain_sgd")
    fit(resumed, [widened], tmp_path, max_epochs=2, ckpt_path=tmp_path / "epoch.ckpt")
    assert widened.num_updates == {"slow": 3}

    model = TinyNet(optimizer="plain_sgd")
    held: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    data = batches()
    for t in range(1, 15):
        model.zero_grad(set_to_none=True)
        model.loss(next(data)).backward()
        for n, p in model.named_parameters():
            held[n].append(p.grad.clone())
            if n == "net.0.weight":
                due = t % 4 == 0
            elif n == "net.0.bias":
                due = t <= 8 or t % 4 == 0  # alone before step 8; with the level (due at 8 and 12) from step 8
            else:
                due = True
            if due:
                total = held[n][0]
                for g in held[n][1:]:
                    total = total + g
                with torch.no_grad():
                    p.add_(total / len(held[n]), alpha=-0.1)
                held[n] = []
    for (n, a), b in zip(resumed.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
