"""Self-modifying rules: HypergradientRule and ScheduledRule around the optimizer step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import DestroyProcessGroup, TinyNet, fit
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning import Level
from nl_lightning.callbacks import (
    HypergradientRule,
    MultiFrequencyUpdates,
    NestedLearningMonitor,
    ScheduledRule,
    SelfModifyingRule,
)
from nl_lightning.callbacks.scheduled_rule import surprise, warmup


def recording_sgd(*args: Any, **kwargs: Any) -> torch.optim.SGD:
    """SGD that records, at every step, the lr / momentum each group used and whether its parameters had gradients.

    The recording is a step post-hook registered before any callback's (``configure_optimizers`` runs first), so it
    sees the values a rule applied, before the rule restores them. (Subclassing SGD and calling ``super().step()``
    would fire torch's step hooks twice once a plain SGD has been built: torch patches ``step`` per class.)
    """
    opt = torch.optim.SGD(*args, **kwargs)
    opt.used = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        optimizer.used.append(
            [
                (float(g["lr"]), float(g["momentum"]), any(p.grad is not None for p in g["params"]))
                for g in optimizer.param_groups
            ]
        )

    opt.register_step_post_hook(record)
    return opt


class Quadratic(pl.LightningModule):
    """L(x) = 1/2 ||x||^2 with plain SGD: the best constant learning rate is exactly 1."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return 0.5 * self.x.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return recording_sgd(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(200, 1)), batch_size=1)


class GroupNet(TinyNet):
    """TinyNet with ``net.0`` and ``net.2`` in separate named groups of a recording SGD, optionally a scheduler."""

    def __init__(self, scheduler: bool = False, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scheduler = scheduler
        self.momentum = momentum

    def configure_optimizers(self) -> Any:
        groups = [
            {"params": self.net[0].parameters(), "name": "body"},
            {"params": self.net[2].parameters(), "name": "head", "lr": 0.05},
        ]
        opt = recording_sgd(groups, lr=0.1, momentum=self.momentum)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Record(pl.Callback):
    """Clean group values at batch start (the schedule's) and the rule's multipliers at batch end, per step."""

    def __init__(self, rule: SelfModifyingRule) -> None:
        self.rule = rule
        self.clean: list[list[float]] = []
        self.mults: list[dict[str, dict[str, float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clean.append([float(g["lr"]) for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mults.append({k: dict(v) for k, v in self.rule.multipliers.items()})


def const_half(step: int, target: str, metrics: dict[str, float]) -> float:
    return 0.5


def by_target(step: int, target: str, metrics: dict[str, float], body: float = 2.0) -> dict[str, float]:
    return {"lr": body if target == "body" else 1.0}


def step_index(step: int, target: str, metrics: dict[str, float]) -> float:
    return 1.0 + step


# ------------------------------------------------------------------------------------------------ hypergradient
def test_hypergradient_raises_a_too_small_lr_up_to_its_bound(tmp_path):
    rule = HypergradientRule(hyper_lr=0.1, lr_bounds=(0.1, 10.0))
    model = Quadratic(lr=0.01)
    rec = Record(rule)
    fit(model, [rule, rec], tmp_path, max_steps=40)
    mults = [m["group0"]["lr"] for m in rec.mults]
    assert mults[0] == 1.0  # no previous update yet: nothing to learn from
    assert all(b > a for a, b in zip(mults[1:24], mults[2:25], strict=True))  # grows while steps keep going downhill
    assert max(mults) == pytest.approx(10.0, rel=1e-12) and all(m <= 10.0 * (1 + 1e-12) for m in mults)
    used = [u[0][0] for u in model.trainer.optimizers[0].used]
    assert used[-1] == pytest.approx(0.1, rel=1e-9)  # 0.01 x the upper bound
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 0.01  # the clean value is back


def test_hypergradient_lowers_an_overshooting_lr_towards_the_optimum(tmp_path):
    rule = HypergradientRule(hyper_lr=0.05, lr_bounds=(0.1, 10.0))
    model = Quadratic(lr=1.9)  # x <- -0.9 x: oscillates, every step overshoots
    fit(model, [rule], tmp_path, max_steps=40)
    used = [u[0][0] for u in model.trainer.optimizers[0].used]
    assert all(b < a for a, b in zip(used[1:10], used[2:11], strict=True))
    assert 0.85 < used[-1] < 1.15  # 1 is the optimal rate of 1/2 ||x||^2
    assert rule.hypergradients["group0"]["lr"] <= 0  # the last step no longer overshoots


def test_hypergradient_adapts_momentum_within_bounds_and_restores_betas(tmp_path):
    class AdamNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05, betas=(0.9, 0.99))

    rule = HypergradientRule(hparams=("lr", "momentum"), hyper_lr=0.2, momentum_bounds=(0.5, 0.95))
    model = AdamNet()
    fit(model, [rule], tmp_path, max_steps=20)
    assert model.trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.99)
    eff = rule.effective["group0"]["momentum"]
    assert 0.5 <= eff <= 0.95
    assert rule.multipliers["group0"]["momentum"] != 1.0


def test_hypergradient_checkpoint_resume_is_exact(tmp_path):
    def run(epochs, ckpt=None, save=None):
        model = GroupNet(scheduler=True)
        rule = HypergradientRule(hparams=("lr", "momentum"), hyper_lr=0.1)
        trainer = fit(model, [rule], tmp_path, ckpt_path=ckpt, max_epochs=epochs)
        if save:
            trainer.save_checkpoint(save)
        return model, rule

    full, full_rule = run(2)  # 14 steps
    path = tmp_path / "mid.ckpt"
    run(1, save=path)  # 7 steps
    resumed, resumed_rule = run(2, ckpt=path)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert full_rule.multipliers == resumed_rule.multipliers
    assert full_rule.num_updates == resumed_rule.num_updates == {"body": 14, "head": 14}
    saved = torch.load(path, weights_only=True)
    assert [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]] == pytest.approx(
        [0.1 * 0.9**7, 0.05 * 0.9**7]
    )  # clean scheduled values, not the modulated ones

    # Without the rule's state the resumed run differs: the comparison above can fail.
    saved["callbacks"] = {}
    torch.save(saved, tmp_path / "no_state.ckpt")
    lossy, _ = run(2, ckpt=tmp_path / "no_state.ckpt")
    assert max(float((a - b).abs().max()) for a, b in zip(full.parameters(), lossy.parameters(), strict=True)) > 1e-6


# ---------------------------------------------------------------------------------------- scheduled + composition
@pytest.mark.parametrize("rule_kind", ["scheduled", "hypergradient"])
def test_effective_lr_is_schedule_times_rule(tmp_path, rule_kind):
    if rule_kind == "scheduled":
        rule = ScheduledRule(warmup, kwargs={"steps": 4, "start": 0.2})
    else:
        rule = HypergradientRule(hyper_lr=0.3)
    rec = Record(rule)
    model = GroupNet(scheduler=True)
    fit(model, [rule, rec], tmp_path, max_steps=9)
    used = model.trainer.optimizers[0].used
    for k in range(9):
        for j, name in enumerate(("body", "head")):
            scheduled = [0.1, 0.05][j] * 0.9**k
            assert rec.clean[k][j] == pytest.approx(scheduled, rel=1e-12)
            assert used[k][j][0] == pytest.approx(scheduled * rec.mults[k][name]["lr"], rel=1e-12)
    if rule_kind == "scheduled":
        assert [m["body"]["lr"] for m in rec.mults] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1])
    else:
        assert len({round(m["body"]["lr"], 12) for m in rec.mults}) > 3  # it did adapt
    assert [g["lr"] for g in model.trainer.optimizers[0].param_groups] == pytest.approx([0.1 * 0.9**9, 0.05 * 0.9**9])


def test_scheduled_rule_by_import_path_dict_output_and_groups(tmp_path):
    rule = ScheduledRule("test_rules.by_target", kwargs={"body": 3.0}, groups=["body"])
    model = GroupNet()
    fit(model, [rule], tmp_path, max_steps=3)
    assert [u[0][0] for u in model.trainer.optimizers[0].used] == pytest.approx([0.3] * 3)
    assert [u[1][0] for u in model.trainer.optimizers[0].used] == pytest.approx([0.05] * 3)  # not targeted
    assert [t.name for t in rule.targets] == ["body"]


def test_rule_targets_one_level_on_its_update_steps(tmp_path):
    calls = []

    updates = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)])
    rule = ScheduledRule(step_index, level="slow")
    rule.fn = _Recorder(step_index, calls)
    model = GroupNet(momentum=0.0)
    fit(model, [updates, rule], tmp_path, max_steps=9)
    used = model.trainer.optimizers[0].used
    slow_steps = [k + 1 for k, u in enumerate(used) if u[0][2]]
    assert slow_steps == [3, 6, 9]
    assert [c[0] for c in calls] == [0, 1, 2] and {c[1] for c in calls} == {"slow"}
    assert [used[k - 1][0][0] for k in slow_steps] == pytest.approx([0.1, 0.2, 0.3])
    assert all(u[1][0] == 0.05 for u in used)  # the other group is never touched
    assert rule.num_updates == {"slow": 3}


class _Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __call__(self, step, target, metrics, **kwargs):
        self.calls.append((step, target))
        return self.fn(step, target, metrics, **kwargs)


def test_hypergradient_on_a_level_uses_the_level_clock(tmp_path):
    updates = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=2)])
    rule = HypergradientRule(level="slow", hyper_lr=0.2)
    rec = Record(rule)
    model = GroupNet(momentum=0.0)
    fit(model, [updates, rule, rec], tmp_path, max_steps=8)
    mults = [m["slow"]["lr"] for m in rec.mults]
    assert mults[0] == mults[1] == mults[2] == 1.0  # first update at step 2 (no past), second at step 4 adapts
    assert mults[3] != 1.0 and mults[4] == mults[3]  # unchanged between the level's updates
    assert rule.num_updates == {"slow": 4}


def test_skipped_fp16_step_is_neither_observed_nor_modulated(tmp_path):
    rule = ScheduledRule(step_index)
    model = GroupNet(inf_calls=[3])
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    fit(model, [rule], tmp_path, max_steps=5, plugins=[precision])
    used = model.trainer.optimizers[0].used
    assert len(used) == 4  # the 3rd step was skipped by the scaler
    assert [u[0][0] for u in used] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert rule.num_updates == {"body": 4, "head": 4}
    assert [g["lr"] for g in model.trainer.optimizers[0].param_groups] == [0.1, 0.05]


def test_effective_values_are_logged_and_seen_by_the_monitor(tmp_path):
    rule = ScheduledRule(const_half)
    monitor = NestedLearningMonitor()
    logger = CSVLogger(tmp_path)
    model = GroupNet()
    fit(model, [monitor, rule], tmp_path, max_steps=4, logger=logger, log_every_n_steps=1)
    metrics = model.trainer.logged_metrics
    assert float(metrics["scheduled/body/lr"]) == pytest.approx(0.05)
    assert float(metrics["scheduled/head/lr_multiplier"]) == pytest.approx(0.5)
    assert float(metrics["nested/all/lr"]) == pytest.approx(0.05)  # the monitor reads the effective rate


def test_surprise_and_warmup_functions():
    assert (
        warmup(0, "x", {}, steps=4) == 0.0
        and warmup(2, "x", {}, steps=4) == 0.5
        and warmup(9, "x", {}, steps=4) == 1.0
        and warmup(50, "x", {}) == 0.5
    )
    assert surprise(0, "x", {}) == 1.0
    assert surprise(0, "x", {"train_loss": 2.0}, reference=0.5) == 4.0
    assert surprise(0, "x", {"train_loss": 100.0}) == 10.0 and surprise(0, "x", {"train_loss": 1e-4}) == 0.1


# ------------------------------------------------------------------------------------------------ skipped batches
class SkippingQuadratic(Quadratic):
    """Quadratic with momentum SGD whose ``training_step`` returns ``None`` on every third batch when ``skip``.

    Lightning then runs no backward but still calls the optimizer step, with no gradient: not an update.
    """

    def __init__(self, lr: float, momentum: float = 0.5, skip: bool = True) -> None:
        super().__init__(lr)
        self.momentum, self.skip = momentum, skip

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.skip and batch_idx % 3 == 2:
            return None
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return recording_sgd(self.parameters(), lr=self.lr, momentum=self.momentum)


class SkippingGroupNet(GroupNet):
    """GroupNet whose ``training_step`` returns ``None`` on batches 2 and 5 of every epoch (every third)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 3 == 2:
            return None
        return super().training_step(batch, batch_idx)


SKIPPED = "ignore:.*returned `None`"


@pytest.mark.filterwarnings(SKIPPED)
def test_hypergradient_ignores_steps_without_gradients(tmp_path):
    """10 steps of which 3 (batches 3, 6, 9) have no backward: the rule sees exactly 7 plain steps.

    On the skipped steps it neither observes (its previous update and the cosine are those of the last real step)
    nor modulates (the optimizer holds the clean values); the trajectory equals that of 7 steps without skipping.
    """
    runs = []
    for skip, steps in ((True, 10), (False, 7)):
        model = SkippingQuadratic(lr=0.05, skip=skip)
        rule = HypergradientRule(hparams=("lr", "momentum"), hyper_lr=0.1, momentum_bounds=(0.1, 0.9))
        fit(model, [rule], tmp_path / str(skip), max_steps=steps)
        runs.append((model, rule, model.trainer.optimizers[0].used))
    (skipping, rule, used), (plain, plain_rule, plain_used) = runs
    assert [k + 1 for k, u in enumerate(used) if not u[0][2]] == [3, 6, 9]
    assert [u for u in used if u[0][2]] == plain_used
    assert [u[0][:2] for u in used if not u[0][2]] == [(0.05, 0.5)] * 3  # clean values: nothing modulated
    assert rule.num_updates == plain_rule.num_updates == {"group0": 7}
    assert rule.multipliers == plain_rule.multipliers and rule.multipliers["group0"]["lr"] != 1.0
    assert rule.hypergradients == plain_rule.hypergradients
    assert torch.equal(skipping.x, plain.x)


@pytest.mark.filterwarnings(SKIPPED)
def test_scheduled_rule_on_groups_counts_only_steps_with_gradients(tmp_path):
    """9 steps, batches 3 and 6 without backward: each group's rule is called at its updates 0..6, never else."""
    calls = []
    rule = ScheduledRule(step_index)
    rule.fn = _Recorder(step_index, calls)
    model = SkippingGroupNet(momentum=0.0)
    fit(model, [rule], tmp_path, max_steps=9)
    used = model.trainer.optimizers[0].used
    assert [k + 1 for k, u in enumerate(used) if not u[0][2]] == [3, 6]
    assert [s for s, t in calls if t == "body"] == [s for s, t in calls if t == "head"] == list(range(7))
    assert rule.num_updates == {"body": 7, "head": 7}
    real = [u for u in used if u[0][2]]
    assert [u[0][0] for u in real] == pytest.approx([0.1 * (1 + k) for k in range(7)])
    assert [u[1][0] for u in real] == pytest.approx([0.05 * (1 + k) for k in range(7)])
    assert [(u[0][0], u[1][0]) for u in used if not u[0][2]] == [(0.1, 0.05)] * 2  # not modulated
    assert [g["lr"] for g in model.trainer.optimizers[0].param_groups] == [0.1, 0.05]


@pytest.mark.filterwarnings(SKIPPED)
def test_rule_on_a_level_follows_its_real_updates_with_skipped_batches(tmp_path):
    """Period 3, batches 3 and 6 of 9 without backward: the level updates at its 3rd and 6th real steps (4 and 8)."""
    calls = []
    updates = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)])
    rule = ScheduledRule(step_index, level="slow")
    rule.fn = _Recorder(step_index, calls)
    model = SkippingGroupNet(momentum=0.0)
    fit(model, [updates, rule], tmp_path, max_steps=9)
    used = model.trainer.optimizers[0].used
    assert [k + 1 for k, u in enumerate(used) if u[0][2]] == [4, 8]
    assert calls == [(0, "slow"), (1, "slow")]
    assert [used[k - 1][0][0] for k in (4, 8)] == pytest.approx([0.1, 0.2])
    assert rule.num_updates == updates.num_updates == {"slow": 2}


# ------------------------------------------------------------------------------------------------ DDP
class RankRule(pl.Callback):
    def __init__(self, rules):
        self.rules = rules

    def on_train_end(self, trainer, pl_module):
        for rule in self.rules:
            mults = torch.tensor([m for v in rule.multipliers.values() for m in v.values()], dtype=torch.float64)
            gathered = trainer.strategy.all_gather(mults)
            assert torch.equal(gathered[0], gathered[1]), (type(rule).__name__, gathered)


def rank_dependent(step: int, target: str, metrics: dict[str, float]) -> float:
    return 1.0 + 0.1 * torch.distributed.get_rank() + 0.01 * step


def test_rules_identical_on_all_ddp_ranks(tmp_path):
    hyper = HypergradientRule(groups=["body"], hyper_lr=0.2)
    sched = ScheduledRule(rank_dependent, groups=["head"])
    fit(
        GroupNet(),
        [hyper, sched, RankRule([hyper, sched]), DestroyProcessGroup()],
        tmp_path,
        max_steps=4,
        strategy="ddp_spawn",
        devices=2,
    )


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hparams": ("learning_rate",)}, "learning_rate"),
        ({"hparams": ("lr", "lr")}, "distinct"),
        ({"level": "slow", "groups": [0]}, "both"),
        ({"groups": 0}, "non-empty list"),
        ({"hyper_lr": -1.0}, "hyper_lr"),
        ({"lr_bounds": (2.0, 10.0)}, r"\(2.0, 10.0\)"),
        ({"lr_bounds": (0.0, 10.0)}, "0 < min"),
        ({"momentum_bounds": (0.5, 1.0)}, "max < 1"),
        ({"lr_bounds": 3}, "pair"),
        ({"hparams": ("weight_decay",)}, "ScheduledRule"),
    ],
)
def test_hypergradient_argument_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        HypergradientRule(**kwargs)


def test_scheduled_rule_argument_errors():
    with pytest.raises(MisconfigurationException, match="nl_lightning.nope.fn"):
        ScheduledRule("nl_lightning.nope.fn")
    with pytest.raises(MisconfigurationException, match="full path"):
        ScheduledRule("warmup")
    with pytest.raises(MisconfigurationException, match="not callable"):
        ScheduledRule(3)


def negative(step, target, metrics):
    return -1.0


def wrong_key(step, target, metrics):
    return {"momentum": 2.0}


@pytest.mark.parametrize(("fn", "match"), [(negative, "-1.0"), (wrong_key, "momentum")])
def test_scheduled_rule_bad_output(tmp_path, fn, match):
    with pytest.raises(ValueError, match=match):
        fit(GroupNet(), [ScheduledRule(fn)], tmp_path, max_steps=2)


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [ScheduledRule(const_half, level="slow")], "needs a MultiFrequencyUpdates"),
        (
            lambda: [
                MultiFrequencyUpdates([Level("slow", ["net.0.weight"], every=2)]),
                HypergradientRule(level="fast"),
            ],
            "not one of the levels",
        ),
        (
            lambda: [
                MultiFrequencyUpdates([Level("slow", ["net.0.weight"], every=2)]),
                HypergradientRule(level="slow"),
            ],
            "own parameter group",
        ),
        (lambda: [ScheduledRule(const_half, groups=[5])], "does not exist"),
        (lambda: [ScheduledRule(const_half, groups=["1/0"])], "does not exist"),
        (lambda: [ScheduledRule(const_half), HypergradientRule(groups=["head"])], "both modify 'lr'"),
    ],
)
def test_setup_errors(tmp_path, callbacks, match):
    with pytest.raises(MisconfigurationException, match=match):
        fit(GroupNet(), callbacks(), tmp_path, max_steps=2)


def test_missing_hparam_names_the_optimizer(tmp_path):
    class AdagradNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match=r"Adagrad group 0 has no \['momentum'\]"):
        fit(AdagradNet(), [ScheduledRule(const_half, hparams=("momentum",))], tmp_path, max_steps=2)


def test_two_rules_on_different_hparams_compose(tmp_path):
    lr_rule = ScheduledRule(const_half)
    mom_rule = ScheduledRule(const_half, hparams=("momentum",))
    model = GroupNet()
    fit(model, [lr_rule, mom_rule], tmp_path, max_steps=2)
    assert [u[0][:2] for u in model.trainer.optimizers[0].used] == [pytest.approx((0.05, 0.45))] * 2
    assert model.trainer.optimizers[0].param_groups[0]["momentum"] == 0.9
