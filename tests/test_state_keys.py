"""Stateful callbacks key their checkpoint state by configuration: several instances coexist, old checkpoints load."""

from __future__ import annotations

import copy

import lightning
import pytest
import torch
from helpers import TinyNet, fit, max_abs_diff
from lightning.pytorch import Trainer
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning import Level
from nl_lightning.callbacks import (
    CMSConsolidation,
    ContinualEvaluation,
    ElasticWeightConsolidation,
    ExperienceReplay,
    HypergradientRule,
    MultiFrequencyUpdates,
    NestedLearningMonitor,
    ScheduledRule,
)
from nl_lightning.callbacks.scheduled_rule import warmup

SLOW = [Level("slow", ["net.0.*"], every=3)]
MID = [Level("mid", ["net.2.weight"], every=2)]


def _two():
    return [MultiFrequencyUpdates(SLOW), MultiFrequencyUpdates(MID)]


def _trainer(callbacks, tmp_path):
    return Trainer(callbacks=callbacks, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


# ------------------------------------------------------------------------------------------ MultiFrequencyUpdates
def test_two_multi_frequency_callbacks_save_and_restore_their_own_state(tmp_path):
    """Two instances (one level each) equal one instance with both levels, and each resumes mid-chunk exactly."""
    together = TinyNet()
    fit(together, [MultiFrequencyUpdates(SLOW + MID)], tmp_path / "one", max_epochs=2)
    uninterrupted = TinyNet()
    fit(uninterrupted, _two(), tmp_path / "a", max_epochs=2)
    assert max_abs_diff(uninterrupted, together) == 0.0

    first = _two()
    trainer = fit(TinyNet(), first, tmp_path / "b", max_epochs=1)
    assert (first[0].book.counts, first[1].book.counts) == ({"slow": 1}, {"mid": 1})
    trainer.save_checkpoint(tmp_path / "mid_chunk.ckpt")
    saved = torch.load(tmp_path / "mid_chunk.ckpt", weights_only=True)["callbacks"]
    keys = [cb.state_key for cb in first]
    assert keys[0] != keys[1] and set(keys) <= set(saved)
    assert set(saved[keys[0]]["levels"]) == {"slow"} and set(saved[keys[1]]["levels"]) == {"mid"}
    assert set(saved[keys[0]]["levels"]["slow"]["buffers"]) == {"net.0.weight", "net.0.bias"}

    resumed_cbs = _two()[::-1]  # the order of the callbacks does not matter
    resumed = TinyNet(seed=1)
    fit(resumed, resumed_cbs, tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "mid_chunk.ckpt")
    assert (resumed_cbs[1].num_updates, resumed_cbs[0].num_updates) == ({"slow": 4}, {"mid": 7})
    assert max_abs_diff(resumed, uninterrupted) == 0.0


def test_checkpoint_with_the_old_state_key_still_loads(tmp_path):
    """Checkpoints written before the keys named the configuration hold the state under the class name."""
    uninterrupted = TinyNet()
    fit(uninterrupted, [MultiFrequencyUpdates(SLOW + MID)], tmp_path / "a", max_epochs=2)
    first = MultiFrequencyUpdates(SLOW + MID)
    trainer = fit(TinyNet(), [first], tmp_path / "b", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)
    saved["callbacks"] = {"MultiFrequencyUpdates": saved["callbacks"].pop(first.state_key)}
    torch.save(saved, tmp_path / "old.ckpt")

    resumed_cb, resumed = MultiFrequencyUpdates(SLOW + MID), TinyNet(seed=1)
    fit(resumed, [resumed_cb], tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "old.ckpt")
    assert resumed_cb.num_updates == {"slow": 4, "mid": 7}
    assert max_abs_diff(resumed, uninterrupted) == 0.0


def test_changed_period_keeps_the_key_and_the_clock(tmp_path):
    """The key names the levels and their globs, not their periods: a resumed run may change a period."""
    key = MultiFrequencyUpdates(SLOW).state_key
    assert key == "MultiFrequencyUpdates{'levels': {'slow': ['net.0.*']}}"
    assert key == MultiFrequencyUpdates([Level("slow", "net.0.*", 7)], reduction="sum").state_key


def test_identical_instances_are_refused_by_lightning(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MultiFrequencyUpdates`"):
        _trainer([MultiFrequencyUpdates(SLOW), MultiFrequencyUpdates(SLOW)], tmp_path)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MultiFrequencyUpdates`"):
        _trainer([MultiFrequencyUpdates({"net.0.*": 2}), MultiFrequencyUpdates({"net.0.*": 3})], tmp_path)


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ([Level("other", ["net.*"], 2)], r"'net\.0\.weight' is in level 'slow'.*and in level 'other'"),
        ([Level("slow", ["net.2.*"], 2)], r"level name 'slow' is used by two MultiFrequencyUpdates"),
    ],
)
def test_instances_that_overlap_are_refused(tmp_path, second, match):
    with pytest.raises(MisconfigurationException, match=match):
        fit(TinyNet(), [MultiFrequencyUpdates(SLOW), MultiFrequencyUpdates(second)], tmp_path, max_steps=1)


# ------------------------------------------------------------------------------------------- every stateful class
PAIRS = {
    "ContinualEvaluation": (lambda: ContinualEvaluation(split="test"), lambda: ContinualEvaluation(split="val")),
    "ElasticWeightConsolidation": (
        lambda: ElasticWeightConsolidation(ewc_lambda=1.0),
        lambda: ElasticWeightConsolidation(ewc_lambda=10.0),
    ),
    "ExperienceReplay": (lambda: ExperienceReplay(buffer_size=10), lambda: ExperienceReplay(buffer_size=20)),
    "CMSConsolidation": (
        lambda: CMSConsolidation([{"fast": "a", "slow": "b", "every": 2}]),
        lambda: CMSConsolidation([{"fast": "c", "slow": "d", "every": 2}]),
    ),
    "NestedLearningMonitor": (lambda: NestedLearningMonitor(prefix="a"), lambda: NestedLearningMonitor(prefix="b")),
    "MultiFrequencyUpdates": (lambda: MultiFrequencyUpdates(SLOW), lambda: MultiFrequencyUpdates(MID)),
    "ScheduledRule": (lambda: ScheduledRule(warmup, groups=[0]), lambda: ScheduledRule(warmup, groups=[1])),
    "HypergradientRule": (lambda: HypergradientRule(level="a"), lambda: HypergradientRule(level="b")),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_differently_configured_instances_have_distinct_keys(tmp_path, name):
    make_a, make_b = PAIRS[name]
    a, b = make_a(), make_b()
    assert type(a).__name__ == name
    assert a.state_key != b.state_key
    assert a.state_key.startswith(name + "{") and b.state_key.startswith(name + "{")
    assert a.state_key == make_a().state_key  # a function of the configuration only
    _trainer([a, b], tmp_path)  # Lightning accepts them together ...
    with pytest.raises(RuntimeError, match=f"more than one stateful callback of type `{name}`"):
        _trainer([make_a(), make_a()], tmp_path)  # ... and refuses identical duplicates


def test_two_continual_evaluations_need_their_own_files(tmp_path):
    """A test and a val matrix coexist in checkpoints, but must not overwrite each other's JSON."""
    cbs = [ContinualEvaluation(split="test"), ContinualEvaluation(split="val")]
    with pytest.raises(MisconfigurationException, match="Two ContinualEvaluation callbacks write 'continual_metrics"):
        fit(TinyNet(), cbs, tmp_path, max_steps=1)


def _ewc_state(cb, k):
    cb.tasks_consolidated = k
    cb._fisher = {"w": torch.full((2,), float(k))}
    cb._anchor = {"w": torch.zeros(2)}


def _replay_state(cb, k):
    cb.reservoir.add([torch.full((k, 3), float(k)), torch.arange(k)])


def _cms_state(cb, k):
    (state,) = cb._state.values()
    state.transfers, state.count = k, k + 1


def _read(cb):
    if isinstance(cb, ElasticWeightConsolidation):
        return cb.tasks_consolidated, float(cb._fisher["w"][0])
    if isinstance(cb, ExperienceReplay):
        return int(cb._loaded["seen"]), float(cb._loaded["fields"][0][0, 0])
    assert cb.has_loaded_state  # restored, applied at train start; until then `state_dict` returns it as it came
    (state,) = cb.state_dict()["pairs"].values()
    return state["transfers"], state["count"]


@pytest.mark.parametrize(
    ("name", "write"),
    [("ElasticWeightConsolidation", _ewc_state), ("ExperienceReplay", _replay_state), ("CMSConsolidation", _cms_state)],
)
def test_two_instances_round_trip_through_a_checkpoint(tmp_path, name, write):
    """Lightning's own save / restore path hands each instance its state, whatever the order of the callbacks."""
    make_a, make_b = PAIRS[name]
    a, b = make_a(), make_b()
    write(a, 2)
    write(b, 3)
    checkpoint = {
        "callbacks": call._call_callbacks_state_dict(_trainer([a, b], tmp_path)),
        "pytorch-lightning_version": lightning.__version__,
    }
    assert len(checkpoint["callbacks"]) == 2
    a2, b2 = make_a(), make_b()
    trainer = _trainer([b2, a2], tmp_path)
    call._call_callbacks_on_load_checkpoint(trainer, checkpoint)
    call._call_callbacks_load_state_dict(trainer, checkpoint)
    assert _read(a2)[0] == 2 and _read(b2)[0] == 3
    assert _read(a2) != _read(b2)


def test_a_reconfigured_single_instance_adopts_its_old_state(tmp_path):
    """One instance of the class and one unclaimed state of it: restored, with a warning naming both keys."""
    old = ElasticWeightConsolidation(ewc_lambda=1.0)
    _ewc_state(old, 4)
    checkpoint = {"callbacks": {old.state_key: copy.deepcopy(old.state_dict())},
                  "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    new = ElasticWeightConsolidation(ewc_lambda=50.0)
    trainer = _trainer([new], tmp_path)
    with pytest.warns(UserWarning, match=r"restoring the state saved under .*ewc_lambda': 1\.0"):
        call._call_callbacks_on_load_checkpoint(trainer, checkpoint)
    call._call_callbacks_load_state_dict(trainer, checkpoint)
    assert new.tasks_consolidated == 4


def test_an_old_state_is_not_guessed_between_two_instances(tmp_path):
    old = ElasticWeightConsolidation()
    _ewc_state(old, 4)
    checkpoint = {"callbacks": {"ElasticWeightConsolidation": old.state_dict()},
                  "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    a, b = PAIRS["ElasticWeightConsolidation"]
    a, b = a(), b()
    trainer = _trainer([a, b], tmp_path)
    with pytest.warns(UserWarning, match="2 ElasticWeightConsolidation callbacks.*none of them is restored"):
        call._call_callbacks_on_load_checkpoint(trainer, checkpoint)
    call._call_callbacks_load_state_dict(trainer, checkpoint)
    assert a.tasks_consolidated == b.tasks_consolidated == 0
