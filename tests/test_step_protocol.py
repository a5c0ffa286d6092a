"""The step protocol: one owner per Trainer runs every participant's phases of an optimizer step in a fixed order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning import Level
from nl_lightning.callbacks import (
    CMSConsolidation,
    ExperienceReplay,
    MultiFrequencyUpdates,
    NestedLearningMonitor,
    Phase,
    ScheduledRule,
    StepHookCallback,
    StepProtocol,
)
from nl_lightning.callbacks.continual_evaluation import _method_of

LR = 0.1


def half(step: int, target: str, metrics: Any) -> float:
    return 0.5


class PairNet(LightningModule):
    """x -> fast (4x4) -> slow (4x4) -> head: two same-shaped layers a consolidation pair can link."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.split = split
        self.fast = nn.Linear(4, 4)
        self.slow = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.log_calls: list[Any] = []  # shared with the recording wrappers

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.slow(torch.tanh(self.fast(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        slow = list(self.slow.parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in slow)]
        opt = torch.optim.SGD([{"params": rest}, {"params": slow}] if self.split else self.parameters(), lr=LR)
        # Registered before the protocol attaches its hooks, so it runs first: it marks the update itself.
        opt.register_step_post_hook(lambda *_: self.log_calls.append(("step", opt.param_groups[0]["lr"])))
        return opt

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 2, (24,), generator=g)), 4)


class Probe(StepHookCallback):
    """A participant that records each phase it takes part in."""

    def __init__(self, *phases: Phase) -> None:
        super().__init__()
        self.step_phases = phases
        self.calls: list[tuple[Phase, int]] = []

    def on_step_phase(self, phase, trainer, pl_module, index, optimizer):
        self.calls.append((phase, trainer.global_step))
        pl_module.log_calls.append((phase.name, "Probe"))


def _record(cb: StepHookCallback) -> None:
    """Wrap ``cb.on_step_phase`` so that each call is recorded with the learning rate the optimizer holds then."""
    inner = cb.on_step_phase

    def on_step_phase(phase, trainer, pl_module, index, optimizer):
        inner(phase, trainer, pl_module, index, optimizer)
        pl_module.log_calls.append((phase.name, type(cb).__name__, optimizer.param_groups[0]["lr"]))

    cb.on_step_phase = on_step_phase


def test_fixed_order_whatever_the_callbacks_order(tmp_path):
    """Plan -> modulate -> measure -> step -> commit -> restore -> consolidate, with the callbacks listed backwards."""
    mfu = MultiFrequencyUpdates([Level("slow", ["slow.*"], every=2)])
    rule = ScheduledRule(half, groups=[0])
    monitor = NestedLearningMonitor(log_histograms=False)
    cms = CMSConsolidation([{"fast": "fast", "slow": "slow", "alpha": 0.5}])
    probes = [Probe(phase) for phase in reversed(Phase)]
    for cb in (mfu, rule, monitor, cms):
        _record(cb)
    model = PairNet()
    fit(model, [cms, monitor, rule, mfu, *probes], tmp_path, max_steps=2, log_every_n_steps=1)

    starts = [i for i, call in enumerate(model.log_calls) if call[:2] == ("PLAN", "MultiFrequencyUpdates")]
    assert len(starts) == 2
    second = model.log_calls[starts[1] :]  # the second step, whose plan updates the slow level
    modulated, clean = LR / 2, LR
    assert second == [
        ("PLAN", "MultiFrequencyUpdates", clean),
        ("PLAN", "Probe"),
        ("MODULATE", "ScheduledRule", modulated),
        ("MODULATE", "Probe"),
        ("MEASURE", "NestedLearningMonitor", modulated),
        ("MEASURE", "Probe"),
        ("step", modulated),
        ("COMMIT", "NestedLearningMonitor", modulated),  # within a phase: the order of `trainer.callbacks`
        ("COMMIT", "MultiFrequencyUpdates", modulated),
        ("COMMIT", "Probe"),
        ("RESTORE", "ScheduledRule", clean),
        ("RESTORE", "Probe"),
        ("CONSOLIDATE", "CMSConsolidation", clean),
        ("CONSOLIDATE", "Probe"),
    ]
    # Nobody planned twice, the monitor read the plan and the modulated rate, the slow level's update triggered a
    # consolidation, and every probe saw its phase once per step.
    assert mfu.num_updates == {"slow": 1}
    assert monitor.watches["slow"].updates == 0 and monitor.watches["slow"].lr == pytest.approx(modulated)
    assert cms.transfers == {"fast_to_slow": 1}
    assert [len(p.calls) for p in probes] == [2] * len(Phase)


def test_a_participant_registered_twice_takes_part_once(tmp_path):
    probe = Probe(*Phase)
    fit(PairNet(), [probe, probe], tmp_path, max_steps=3)  # Lightning calls its `setup` twice
    assert [phase for phase, _ in probe.calls] == list(Phase) * 3

    trainer = Trainer(logger=False, enable_checkpointing=False)
    protocol = StepProtocol.of(trainer)
    assert StepProtocol.of(trainer) is protocol
    assert protocol.register(probe) is True
    assert protocol.register(probe) is False
    assert protocol.participants(Probe) == [probe]
    protocol.unregister(probe)
    assert protocol.participants(Probe) == []


def test_participants_are_found_through_the_protocol(tmp_path):
    mfu = MultiFrequencyUpdates({"slow.*": 2})
    rule = ScheduledRule(half, level="slow.*")
    trainer = fit(PairNet(split=True), [rule, mfu], tmp_path, max_steps=4)  # the rule comes first: found all the same
    assert mfu.num_updates == {"slow.*": 2} and rule.num_updates == {"slow.*": 2}
    assert StepProtocol.of(trainer).participants(MultiFrequencyUpdates) == []  # unregistered at teardown


class EveryThirdStep(CMSConsolidation):
    """Consolidate after every third optimizer step and at each epoch's end, whatever the levels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[Any, Any]] = []

    def should_consolidate(self, trainer, pl_module, pair, step_idx=None, epoch_idx=None):
        self.asked.append((step_idx, epoch_idx))
        return (step_idx is not None and step_idx % 3 == 2) or epoch_idx is not None


def test_overridden_trigger_decides_the_boundaries(tmp_path):
    pairs = [{"fast": "fast", "slow": "slow", "alpha": 1.0}]
    with pytest.raises(MisconfigurationException, match="has no boundary"):  # the default needs a level or `every`
        fit(PairNet(), [CMSConsolidation(pairs)], tmp_path, max_steps=1)

    cms = EveryThirdStep(pairs)
    model = PairNet()
    fit(model, [cms], tmp_path, max_epochs=2)  # 6 steps per epoch
    assert cms.asked == [(s, None) for s in range(6)] + [(None, 0)] + [(s, None) for s in range(6, 12)] + [(None, 1)]
    assert cms.transfers == {"fast_to_slow": 4 + 2}
    # alpha = 1 restarts the fast level from its anchor: it has not moved since the last (epoch-end) transfer.
    anchor = cms._state["fast_to_slow"].anchor
    assert torch.equal(anchor["fast.weight"], model.fast.weight.detach())


def test_method_tags_name_the_method():
    class Mine(ExperienceReplay):
        pass

    class Tagged(StepHookCallback):
        method_tag = "mine"

    trainer = SimpleNamespace(
        callbacks=[Mine(), MultiFrequencyUpdates({"a": 2}), Tagged(), Probe()], datamodule=SimpleNamespace(joint=True)
    )
    assert _method_of(trainer) == "joint+replay+multi_frequency+mine"
    assert _method_of(SimpleNamespace(callbacks=[Probe()], datamodule=None)) == "naive"
