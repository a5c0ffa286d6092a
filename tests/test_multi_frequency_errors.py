"""Every misconfiguration of MultiFrequencyUpdates raises early, naming the offending value and the fix."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from helpers import ManualTinyNet, TinyNet, fit
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ({"net.0.*": 0}, "every.*>= 1.*got 0"),
        ([Level("a", ["net.0.*"]), Level("a", ["net.2.*"], 2)], "Two levels are named 'a'"),
        ([{"name": "a", "params": [7], "every": 2}], r"glob.*7 \(int\)"),
        ([], "empty"),
        ("net.0.*", "list of Level objects"),
    ],
)
def test_construction_errors(levels, match):
    with pytest.raises(MisconfigurationException, match=match):
        MultiFrequencyUpdates(levels)


def test_bad_reduction():
    with pytest.raises(MisconfigurationException, match="reduction.*'median'"):
        MultiFrequencyUpdates({"net.0.*": 2}, reduction="median")


def test_glob_matching_nothing_raises_at_setup(tmp_path):
    cb = MultiFrequencyUpdates([Level("slow", ["backbone.*"], 4)])
    with pytest.raises(MisconfigurationException, match=r"'backbone\.\*' matches no parameter.*'net\.0\.weight'"):
        fit(TinyNet(), [cb], tmp_path, max_steps=1)


def test_parameter_in_two_levels_raises_at_setup(tmp_path):
    cb = MultiFrequencyUpdates([Level("a", ["net.*"], 2), Level("b", ["net.2.bias"], 3)])
    with pytest.raises(MisconfigurationException, match=r"'net\.2\.bias' is matched by level 'a'"):
        fit(TinyNet(), [cb], tmp_path, max_steps=1)


def test_two_identical_instances_refused(tmp_path):
    """Lightning refuses two stateful callbacks with one state key when the Trainer is built (see test_state_keys)."""
    cbs = [MultiFrequencyUpdates({"net.0.*": 2}), MultiFrequencyUpdates({"net.0.*": 3})]
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MultiFrequencyUpdates`"):
        fit(TinyNet(), cbs, tmp_path, max_steps=1)


@pytest.mark.parametrize("strategy_cls", [DeepSpeedStrategy, FSDPStrategy])
def test_sharding_strategies_refused(strategy_cls):
    """DeepSpeed owns backward and step; FSDP shards gradients. Checked with a stand-in trainer (no GPU here)."""
    trainer = SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls), callbacks=[], accumulate_grad_batches=1)
    cb = MultiFrequencyUpdates({"net.0.*": 2})
    with pytest.raises(MisconfigurationException, match=f"does not support {strategy_cls.__name__}.*ddp"):
        cb.setup(trainer, TinyNet(), "fit")


def test_fused_optimizer_with_grad_scaler_refused(tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(MisconfigurationException, match="AdamW unscales gradients inside `step\\(\\)`.*fused=False"):
        fit(TinyNet(optimizer="fused_adamw"), [MultiFrequencyUpdates({"net.0.*": 2})], tmp_path, max_steps=1,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip


def test_fused_optimizer_without_scaler_is_fine(tmp_path):
    cb = MultiFrequencyUpdates({"net.0.*": 2})
    fit(TinyNet(optimizer="fused_adamw"), [cb], tmp_path, max_steps=4)
    assert cb.num_updates == {"net.0.*": 2}


def test_level_spread_over_two_optimizers_refused(tmp_path):
    cb = MultiFrequencyUpdates([Level("both", ["*.weight"], 2)])
    with pytest.raises(MisconfigurationException, match=r"Level 'both' has parameters in optimizers \[0, 1\]"):
        fit(ManualTinyNet(two_optimizers=True), [cb], tmp_path, max_steps=1)


def test_stepping_a_raw_optimizer_is_caught(tmp_path):
    class RawStep(ManualTinyNet):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers().optimizer  # the raw torch optimizer: no Lightning hooks
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    with pytest.raises(
        RuntimeError, match="about to step without MultiFrequencyUpdates seeing its gradients.*prepare_step"
    ):
        fit(RawStep(), [MultiFrequencyUpdates({"net.0.*": 2})], tmp_path, max_steps=2)


@pytest.mark.parametrize("with_closure", [False, True])
def test_stepping_a_raw_optimizer_raises_before_any_parameter_moves(tmp_path, with_closure):
    """The check runs in a torch step pre-hook (or, for ``step(closure)``, right after the closure): nothing moved."""

    class RawStep(ManualTinyNet):
        snapshot: dict = {}

        def training_step(self, batch, batch_idx):
            opt = self.optimizers().optimizer
            opt.zero_grad()

            def closure():
                loss = self.loss(batch)
                self.manual_backward(loss)
                return loss

            if not with_closure:
                closure()
            self.snapshot = {n: p.detach().clone() for n, p in self.named_parameters()}
            opt.step(closure) if with_closure else opt.step()

    model = RawStep(optimizer="adamw")
    with pytest.raises(RuntimeError, match="Optimizer 0 is about to step.*call `MultiFrequencyUpdates.prepare_step"):
        fit(model, [MultiFrequencyUpdates({"net.0.*": 2})], tmp_path, max_steps=2)
    assert model.snapshot
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), model.snapshot[name]), f"{name} moved before the error"


def test_raw_optimizer_step_after_prepare_step_is_exact(tmp_path):
    class RawStepPrepared(ManualTinyNet):
        def training_step(self, batch, batch_idx):
            mfu = next(cb for cb in self.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates))
            opt = self.optimizers().optimizer
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            mfu.prepare_step(opt)
            opt.step()

    cb = MultiFrequencyUpdates({"net.0.*": 2})
    # Raw steps bypass Lightning's step counter: stop on max_epochs=1 (7 batches).
    fit(RawStepPrepared(), [cb], tmp_path, max_epochs=1)
    assert cb.num_updates == {"net.0.*": 3}


def test_prepare_step_with_an_unknown_optimizer(tmp_path):
    cb = MultiFrequencyUpdates({"net.0.*": 2})
    fit(TinyNet(), [cb], tmp_path, max_steps=1)
    with pytest.raises(RuntimeError, match="not one of the Trainer's optimizers"):
        cb.prepare_step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_book_before_setup():
    with pytest.raises(RuntimeError, match="once `trainer.fit` has called `setup`"):
        _ = MultiFrequencyUpdates({"a": 2}).book
    assert MultiFrequencyUpdates({"a": 2}).num_updates == {"a": 0}


def test_picklable_after_fit(tmp_path):
    """ddp_spawn pickles callbacks: hook handles and optimizers must not travel."""
    cb = MultiFrequencyUpdates({"net.0.*": 2})
    fit(TinyNet(), [cb], tmp_path, max_steps=3)
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.num_updates == {"net.0.*": 1}
