"""CMSConsolidation: drift and distillation transfers from a fast CMS level into a slow one."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import DestroyProcessGroup, fit
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.callbacks.cms_consolidation import CMSConsolidation, ConsolidationPair
from nl_lightning.data import DigitsDataset, TaskStreamDataModule
from nl_lightning.models import ContinuumMemory

FAST, SLOW = "cms.blocks.0", "cms.blocks.1"
NAME = f"{FAST}_to_{SLOW}"
RELATIVE = ["b1", "b2", "norm.weight", "w1", "w2"]  # a static CMS level has no value projection


class CMSNet(LightningModule):
    """Linear(in_dim, 8) -> static CMS over (B, 1, 8) with levels of period 1 and 4 -> Linear(8, classes)."""

    def __init__(self, in_dim: int = 8, classes: int = 3, seed: int = 0, hidden_dims: Optional[list] = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_dim, 8)
        self.cms = ContinuumMemory(dim=8, chunk_sizes=[1, 4], hidden_mult=2, hidden_dims=hidden_dims)
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.cms(self.proj(x).unsqueeze(1)).squeeze(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(28, 8, generator=g), torch.randint(0, 3, (28,), generator=g))
        return DataLoader(data, batch_size=4)  # 7 batches per epoch


class Snap(Callback):
    """Parameters and gradients at train start and at every batch / epoch end, when its turn comes."""

    def __init__(self) -> None:
        self.start: dict[str, Tensor] = {}
        self.batches: list[dict[str, Tensor]] = []
        self.epochs: list[dict[str, Any]] = []

    def on_train_start(self, trainer, pl_module):
        self.start = _params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(_params(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()}
        self.epochs.append({"params": _params(pl_module), "grads": grads})


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


_fit = fit  # the shared quiet single-device Trainer of tests/helpers.py


def _expected(before: dict, anchor: dict, alpha: float, move_slow: bool = True) -> dict[str, Tensor]:
    """The reference transfer, written out: slow + alpha * delta, anchor + (1 - alpha) * delta."""
    out = {}
    for rel in RELATIVE:
        fast, slow = f"{FAST}.{rel}", f"{SLOW}.{rel}"
        delta = before[fast] - anchor[fast]
        out[fast] = anchor[fast] if alpha == 1.0 else anchor[fast] + (1.0 - alpha) * delta
        if move_slow:
            out[slow] = before[slow] + alpha * delta
    return out


# --------------------------------------------------------------------------------------------------- drift
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_drift_moves_the_slow_level_by_exactly_alpha_times_the_drift(tmp_path, alpha):
    before, after = Snap(), Snap()
    cb = CMSConsolidation([ConsolidationPair(FAST, SLOW, mode="drift", alpha=alpha, every=3)])
    trainer = _fit(CMSNet(), [before, cb, after], tmp_path, max_steps=7)
    assert cb.transfers == {NAME: 2}
    anchor = before.start
    for step, (b, a) in enumerate(zip(before.batches, after.batches, strict=True), start=1):
        if step % 3:
            assert all(torch.equal(b[n], a[n]) for n in b), f"step {step} moved without a boundary"
            continue
        expected = _expected(b, anchor, alpha)
        for n in b:
            assert torch.equal(a[n], expected.get(n, b[n])), (step, n)
        moved = [n for n in expected if n.endswith("w1") and not torch.equal(a[n], b[n])]
        assert sorted(moved) == [f"{FAST}.w1", f"{SLOW}.w1"]
        if alpha == 1.0:  # the fast level restarts from its anchor
            assert all(torch.equal(a[f"{FAST}.{r}"], anchor[f"{FAST}.{r}"]) for r in RELATIVE)
        anchor = a  # the next drift is measured from the consolidated state
    drift = sum((before.batches[5][f"{FAST}.{r}"] - after.batches[2][f"{FAST}.{r}"]).pow(2).sum() for r in RELATIVE)
    metrics = trainer.callback_metrics
    assert float(metrics[f"cms/{NAME}/transfers"]) == 2
    assert float(metrics[f"cms/{NAME}/drift_norm"]) == pytest.approx(float(drift.sqrt()), rel=1e-5)


@pytest.mark.parametrize("order", ["mfu_first", "consolidation_first"])
def test_drift_follows_the_slow_levels_updates(tmp_path, order):
    model = CMSNet()
    mfu = MultiFrequencyUpdates(model.cms.levels("cms"))  # cms.level_0 every step, cms.level_1 every 4
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "alpha": 0.5}])
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, mfu.num_updates["cms.level_1"], cb.transfers[NAME]))

    callbacks = [mfu, cb, Record()] if order == "mfu_first" else [cb, mfu, Record()]
    _fit(model, callbacks, tmp_path, max_steps=10)
    assert [u for _, u, _ in seen] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert [t for _, _, t in seen] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # right after each slow update, never else


class SkippingCMSNet(CMSNet):
    """CMSNet whose ``training_step`` returns ``None`` (no backward, a step without gradients) on every third batch.

    7 batches per epoch, batches 2 and 5 skipped: of the first 12 steps, 3, 6 and 10 carry no gradient.
    """

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        if batch_idx % 3 == 2:
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:.*returned `None`")
@pytest.mark.parametrize("boundary", ["every", "mfu"])
def test_steps_without_gradients_do_not_advance_consolidation(tmp_path, boundary):
    """A step without gradients neither counts towards ``every`` nor triggers a consolidation.

    12 steps, 9 with gradients (1 2 4 5 7 8 9 11 12): ``every=2`` consolidates after the 2nd, 4th, 6th and 8th of them
    (steps 2, 5, 8, 11); a trigger level of period 4 updates after the 4th and 8th (steps 5 and 11), the pair with it.
    """
    before, after = Snap(), Snap()
    model = SkippingCMSNet()
    if boundary == "every":
        callbacks = [before, CMSConsolidation([ConsolidationPair(FAST, SLOW, alpha=0.5, every=2)]), after]
        expected = [2, 5, 8, 11]
    else:
        mfu = MultiFrequencyUpdates(model.cms.levels("cms"))  # cms.level_1 every 4
        callbacks = [mfu, before, CMSConsolidation([ConsolidationPair(FAST, SLOW, alpha=0.5)]), after]
        expected = [5, 11]
    cb = callbacks[-2]
    _fit(model, callbacks, tmp_path, max_steps=12)
    consolidated = [
        step
        for step, (b, a) in enumerate(zip(before.batches, after.batches, strict=True), start=1)
        if any(not torch.equal(b[n], a[n]) for n in b)
    ]
    assert consolidated == expected
    assert cb.transfers == {NAME: len(expected)}
    assert cb.state_dict()["pairs"][NAME]["count"] == (1 if boundary == "every" else 0)  # real step 9, after 8
    if boundary == "mfu":
        assert mfu.num_updates["cms.level_1"] == 2


# --------------------------------------------------------------------------------------------------- distill
def _stream() -> TaskStreamDataModule:
    return TaskStreamDataModule(
        DigitsDataset(True),
        DigitsDataset(False),
        num_tasks=2,
        samples_per_task=96,
        batch_size=16,
        val_fraction=0.0,
        seed=0,
    )


def _stream_trainer(tmp_path, dm, callbacks, **kwargs) -> Trainer:
    args = dict(
        default_root_dir=tmp_path,
        max_epochs=dm.expected_epochs,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    args.update(kwargs)
    return Trainer(callbacks=callbacks, **args)


@pytest.mark.filterwarnings("ignore:.*no `validation_step`")
def test_distill_at_task_boundaries(tmp_path):
    dm = _stream()
    before, after = Snap(), Snap()
    alpha = 0.5
    cb = CMSConsolidation(
        [{"fast": FAST, "slow": SLOW, "mode": "distill", "alpha": alpha}],
        buffer_size=32,
        distill_steps=30,
        distill_lr=1e-2,
    )
    losses = []

    class Losses(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            assert pl_module.training  # the distillation ran in eval mode and restored train mode
            m = trainer.callback_metrics
            losses.append((float(m[f"cms/{NAME}/distill_loss_before"]), float(m[f"cms/{NAME}/distill_loss_after"])))

    trainer = _stream_trainer(tmp_path, dm, [before, cb, after, Losses()])
    trainer.fit(CMSNet(in_dim=64, classes=10), datamodule=dm)
    assert cb.transfers == {NAME: 2} and len(losses) == 2
    anchor = before.start
    for b, a, (loss_before, loss_after) in zip(before.epochs, after.epochs, losses, strict=True):
        assert 0 < loss_after < 0.5 * loss_before
        expected = _expected(b["params"], anchor, alpha, move_slow=False)
        for n, p in a["params"].items():
            if n.startswith(SLOW + "."):
                continue
            assert torch.equal(p, expected.get(n, b["params"][n])), n  # fast reset; all other parameters untouched
        slow_moved = [
            r
            for r in ("w1", "b1", "w2", "b2")
            if not torch.equal(a["params"][f"{SLOW}.{r}"], b["params"][f"{SLOW}.{r}"])
        ]
        assert slow_moved == ["w1", "b1", "w2", "b2"]
        for n, g in a["grads"].items():  # no parameter's .grad was touched, the slow level's included
            assert (g is None and b["grads"][n] is None) or torch.equal(g, b["grads"][n]), n
        anchor = a["params"]


@pytest.mark.filterwarnings("ignore:.*no `validation_step`")
def test_distill_waits_for_the_end_of_the_task(tmp_path):
    """An epoch cut short by max_steps completes no task: no distillation at its end."""
    dm = _stream()
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "mode": "distill"}], buffer_size=8, distill_steps=2)
    _stream_trainer(tmp_path, dm, [cb], max_steps=3).fit(CMSNet(in_dim=64, classes=10), datamodule=dm)
    assert cb.transfers == {NAME: 0}


class _RanksAgree(Callback):
    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CMSConsolidation))
        assert cb.transfers == {NAME: 2}, cb.transfers
        for p in pl_module.parameters():
            rank0 = p.detach().clone()
            torch.distributed.broadcast(rank0, src=0)
            assert torch.equal(rank0, p.detach()), "ranks diverged"


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU is not tested on Windows")
def test_distill_keeps_ranks_in_sync_under_ddp(tmp_path):
    """Each rank buffers its own shard; the distillation's gradients are averaged, so the weights stay identical."""
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "mode": "distill", "every": 3}], buffer_size=6, distill_steps=3)
    _fit(
        CMSNet(),
        [cb, _RanksAgree(), DestroyProcessGroup()],
        tmp_path,
        max_steps=6,
        strategy="ddp_spawn",
        devices=2,
    )


def test_distill_buffer_keeps_the_last_inputs():
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "mode": "distill", "every": 1}], buffer_size=5)
    for start in range(0, 12, 3):
        cb._remember([torch.arange(start, start + 3).float().unsqueeze(1), torch.zeros(3)])
    assert sorted(cb._buffered().flatten().tolist()) == [7, 8, 9, 10, 11]
    cb._remember({"x": torch.arange(20, 27).float().unsqueeze(1)})  # more than the buffer: the last 5
    assert sorted(cb._buffered().flatten().tolist()) == [22, 23, 24, 25, 26]
    with pytest.raises(MisconfigurationException, match="one shape.*Pad"):
        cb._remember([torch.zeros(2, 3)])
    with pytest.raises(MisconfigurationException, match="input_key"):
        cb._remember([[1, 2]])


# --------------------------------------------------------------------------------------------------- checkpoints
CONFIGS = {
    "drift_every": dict(pairs=[{"fast": FAST, "slow": SLOW, "alpha": 0.5, "every": 3}]),
    "drift_levels": dict(pairs=[{"fast": FAST, "slow": SLOW, "alpha": 0.5}]),
    "distill_every": dict(
        pairs=[{"fast": FAST, "slow": SLOW, "mode": "distill", "every": 3}],
        buffer_size=10,
        distill_steps=5,
        distill_lr=1e-2,
    ),
}


def _callbacks(config: str, model: CMSNet) -> list[Callback]:
    cb = CMSConsolidation(**CONFIGS[config])
    return [MultiFrequencyUpdates(model.cms.levels("cms")), cb] if config == "drift_levels" else [cb]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_mid_period_is_exact(tmp_path, config):
    """Stop after 7 steps (1 step into a period of 3, 3 into one of 4), resume: equal to 14 uninterrupted steps."""
    uninterrupted = CMSNet()
    cbs = _callbacks(config, uninterrupted)
    _fit(uninterrupted, cbs, tmp_path / "a", max_epochs=2)
    assert cbs[-1].transfers == {NAME: 4 if config != "drift_levels" else 3}

    first = CMSNet()
    first_cbs = _callbacks(config, first)
    trainer = _fit(first, first_cbs, tmp_path / "b", max_epochs=1)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    key = first_cbs[-1].state_key  # names the pairs (tests/test_state_keys.py)
    state = saved["callbacks"][key]
    assert set(state["pairs"][NAME]["anchor"]) == {f"{FAST}.{r}" for r in RELATIVE}
    assert state["pairs"][NAME]["transfers"] == 2 if config != "drift_levels" else 1
    assert ("buffer" in state) == config.startswith("distill")

    resumed = CMSNet(seed=1)  # any initial weights: the checkpoint restores them
    cbs = _callbacks(config, resumed)
    _fit(resumed, cbs, tmp_path / "c", max_epochs=2, ckpt_path=ckpt)
    assert cbs[-1].transfers == {NAME: 4 if config != "drift_levels" else 3}
    for (n, p), q in zip(resumed.named_parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(p, q), n

    # Without the callback's state the resumed run differs, so the comparison above has teeth.
    del saved["callbacks"][key]
    torch.save(saved, tmp_path / "no_state.ckpt")
    lossy = CMSNet(seed=1)
    _fit(lossy, _callbacks(config, lossy), tmp_path / "d", max_epochs=2, ckpt_path=tmp_path / "no_state.ckpt")
    assert any(not torch.equal(p, q) for p, q in zip(lossy.parameters(), uninterrupted.parameters(), strict=True))


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pairs=[]), "non-empty list"),
        (dict(pairs={"fast": FAST, "slow": SLOW}), "non-empty list"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "alpha": 0}]), r"alpha.*\(0, 1\].*got 0"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "alpha": 1.5}]), r"alpha.*got 1.5"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "mode": "copy"}]), "mode.*'copy'"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "every": 0}]), "every.*>= 1.*got 0"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "params": []}]), "params.*non-empty"),
        (dict(pairs=[{"fast": FAST, "slow": FAST}]), "both 'cms.blocks.0'"),
        (dict(pairs=[{"fast": "", "slow": SLOW}]), "`fast` must be"),
        (dict(pairs=[{"fast": FAST}]), "needs `fast` and `slow`"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW, "speed": 2}]), "may have only"),
        (dict(pairs=[7]), "ConsolidationPair or a dict"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW}, {"fast": "a", "slow": "b", "name": NAME}]), "names must be unique"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW}], buffer_size=0), "buffer_size.*got 0"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW}], distill_steps=0), "distill_steps.*got 0"),
        (dict(pairs=[{"fast": FAST, "slow": SLOW}], distill_lr=0.0), "distill_lr.*got 0.0"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        CMSConsolidation(**kwargs)


@pytest.mark.parametrize(
    ("pairs", "model_kwargs", "match"),
    [
        ([{"fast": "cms.blocks.7", "slow": SLOW, "every": 1}], {}, r"no parameter is named 'cms.blocks.7'"),
        ([{"fast": FAST, "slow": "head", "every": 1}], {}, r"no partner.*params"),
        ([{"fast": FAST, "slow": SLOW, "every": 1}], {"hidden_dims": [16, 8]}, r"differ in shape.*w1: \(16, 8\)"),
        ([{"fast": "cms", "slow": SLOW, "every": 1}], {}, "share parameters"),
        ([{"fast": FAST, "slow": SLOW, "every": 1, "params": ["w*", "gamma"]}], {}, r"\['gamma'\] match no"),
        (
            [
                {"fast": FAST, "slow": SLOW, "every": 1},
                {"fast": FAST, "slow": SLOW, "every": 1, "params": ["w1"], "name": "b"},
            ],
            {},
            "fast side of pairs",
        ),
        ([{"fast": FAST, "slow": SLOW, "mode": "distill"}], {}, "TaskStreamDataModule.*every"),
        ([{"fast": FAST, "slow": SLOW}], {}, "no boundary.*every.*MultiFrequencyUpdates"),
    ],
)
def test_setup_errors(tmp_path, pairs, model_kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        _fit(CMSNet(**model_kwargs), [CMSConsolidation(pairs)], tmp_path, max_steps=1)


def test_params_filter_pairs_only_the_named_parameters(tmp_path):
    cb = CMSConsolidation([{"fast": "proj", "slow": "head", "every": 1, "params": ["weight"]}])
    # proj.weight (8, 8) and head.weight (3, 8): the filter does not hide a mismatch it selects.
    with pytest.raises(MisconfigurationException, match=r"differ in shape \(\['weight: \(8, 8\) vs \(3, 8\)'\]\)"):
        _fit(CMSNet(), [cb], tmp_path, max_steps=1)
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "every": 1, "params": ["w?"]}])
    _fit(CMSNet(), [cb], tmp_path, max_steps=2)
    assert sorted(m[0] for m in cb._matches[NAME]) == ["w1", "w2"]


def test_slow_level_split_over_levels(tmp_path):
    mfu = MultiFrequencyUpdates({f"{SLOW}.w*": 4})
    with pytest.raises(MisconfigurationException, match="split over MultiFrequencyUpdates levels"):
        _fit(CMSNet(), [mfu, CMSConsolidation([{"fast": FAST, "slow": SLOW}])], tmp_path, max_steps=1)


class TwoOptimizers(CMSNet):
    def configure_optimizers(self):
        fast = [p for n, p in self.named_parameters() if n.startswith(FAST) and n.endswith("w1")]
        rest = [p for n, p in self.named_parameters() if not (n.startswith(FAST) and n.endswith("w1"))]
        self.automatic_optimization = False
        return [torch.optim.SGD(fast, lr=0.1), torch.optim.SGD(rest, lr=0.1)]

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for opt in self.optimizers():
            opt.step()


def test_fast_level_over_two_optimizers(tmp_path):
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "every": 2}])
    with pytest.raises(MisconfigurationException, match=r"optimizers \['0', '1'\].*exactly one optimizer"):
        _fit(TwoOptimizers(), [cb], tmp_path, max_steps=1)


def test_distill_into_frozen_parameters(tmp_path):
    model = CMSNet()
    model.cms.blocks[1].w1.requires_grad_(False)
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "mode": "distill", "every": 1}])
    with pytest.raises(MisconfigurationException, match="do not require grad.*params"):
        _fit(model, [cb], tmp_path, max_steps=1)


@pytest.mark.parametrize("strategy_cls", [DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy])
def test_sharding_strategies_refused(strategy_cls):
    cb = CMSConsolidation([{"fast": FAST, "slow": SLOW, "every": 1}])
    trainer = SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls), callbacks=[])
    with pytest.raises(MisconfigurationException, match=f"does not support {strategy_cls.__name__}.*ddp"):
        cb.setup(trainer, CMSNet(), "fit")
