"""MultiFrequencyUpdates in setups that change what a step is: late parameters, skipped batches, float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TinyNet, fit
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader

from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor


class Recorder(Callback):
    """Per batch: the gradients backward produced (before any masking), and the parameters before and after it.

    List it after ``MultiFrequencyUpdates``: ``seen`` then holds the gradients the optimizer was handed.
    """

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []  # {} for a batch without backward
        self.seen: list[dict[str, torch.Tensor]] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self._grads: dict[str, torch.Tensor] = {}
        self._seen: dict[str, torch.Tensor] = {}

    @staticmethod
    def _snapshot(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._snapshot(pl_module))
        self._grads, self._seen = {}, {}

    def on_after_backward(self, trainer, pl_module):
        self._grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._seen = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._snapshot(pl_module))
        self.grads.append(self._grads)
        self.seen.append(self._seen)

    def moved(self, name: str) -> list[int]:
        """The batches (1-based) at which parameter ``name`` changed."""
        return [
            i + 1
            for i, (b, a) in enumerate(zip(self.before, self.after, strict=True))
            if not torch.equal(b[name], a[name])
        ]


# --------------------------------------------------------------------------------------------------- late parameters
class BackboneNet(BoringModel):
    """A frozen-then-unfrozen ``backbone`` and a ``layer`` head; plain SGD over the trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(32, 16), nn.Tanh())
        self.layer = nn.Linear(16, 2)

    def forward(self, x):
        return self.layer(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        return DataLoader(list(torch.randn(24, 32, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _constant(epoch):
    return 1.0


def _finetuning():
    return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=_constant, backbone_initial_lr=0.05,
                              should_align=False, initial_denom_lr=1.0)  # fmt: skip


BACKBONE = [Level("backbone", ["backbone.*"], every=4)]


def test_backbone_finetuning_late_parameters_follow_their_level(tmp_path):
    """BackboneFinetuning adds the backbone with ``add_param_group`` at epoch 1: its level clock starts then.

    6 batches per epoch: the backbone joins at batch 7 and moves at batches 10, 14, 18 (its 4th, 8th, 12th steps), each
    time by ``lr * mean`` of the 4 gradients it received since its previous step.
    """
    mfu, rec = MultiFrequencyUpdates(BACKBONE), Recorder()
    with pytest.warns(UserWarning, match=r"'backbone'.*in no optimizer.*BackboneFinetuning"):
        trainer = fit(BackboneNet(), [_finetuning(), mfu, rec, NestedLearningMonitor()], tmp_path, max_epochs=3,
                      limit_val_batches=0, log_every_n_steps=1)  # fmt: skip
    assert rec.moved("backbone.0.weight") == rec.moved("backbone.0.bias") == [10, 14, 18]
    assert rec.moved("layer.weight") == list(range(1, 19))
    assert mfu.num_updates == {"backbone": 3}
    assert mfu.book.counts == {"backbone": 0}
    assert trainer.callback_metrics["nested/backbone/updates"] == 3
    assert trainer.callback_metrics["nested/backbone/lr"] == pytest.approx(0.05)
    for step in (10, 14, 18):
        for name in ("backbone.0.weight", "backbone.0.bias"):
            mean = torch.stack([rec.grads[k - 1][name] for k in range(step - 3, step + 1)]).mean(0)
            delta = rec.after[step - 1][name] - rec.before[step - 1][name]
            torch.testing.assert_close(delta, -0.05 * mean, rtol=1e-5, atol=1e-6)
            assert name not in rec.seen[step - 2]  # masked (p.grad is None) on the step before


class Thaw(Callback):
    """BackboneFinetuning re-freezes the backbone when a resumed run sets up (its ``setup`` always freezes): undo it."""

    def on_train_start(self, trainer, pl_module):
        if trainer.current_epoch > 1:
            BaseFinetuning.make_trainable(pl_module.backbone)


def test_backbone_finetuning_resume_mid_chunk_is_exact(tmp_path):
    """Stop after epoch 2 (the backbone 2 steps into its chunk), resume: equal to 3 uninterrupted epochs."""
    kwargs = dict(limit_val_batches=0)
    uninterrupted = BackboneNet()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in no optimizer.*")
        fit(uninterrupted, [_finetuning(), MultiFrequencyUpdates(BACKBONE)], tmp_path / "a", max_epochs=3, **kwargs)
        first = MultiFrequencyUpdates(BACKBONE)
        trainer = fit(BackboneNet(), [_finetuning(), first], tmp_path / "b", max_epochs=2, **kwargs)
    assert first.book.counts == {"backbone": 2} and first.num_updates == {"backbone": 1}
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, resumed_cb = BackboneNet(), MultiFrequencyUpdates(BACKBONE)
    resumed.layer.weight.data.zero_()  # the checkpoint restores the weights
    fit(resumed, [_finetuning(), resumed_cb, Thaw()], tmp_path / "c", max_epochs=3, ckpt_path=tmp_path / "mid.ckpt",
        **kwargs)  # fmt: skip
    assert resumed_cb.num_updates == {"backbone": 3}
    for (name, a), b in zip(resumed.named_parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_level_set_sync_late_members_join_the_running_chunk():
    """A parameter that joins a level mid-chunk steps with the level, on the mean of what it got since it joined."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    book = LevelSet([Level("l", ["a", "b"], every=3)], [("a", a), ("b", b)])
    assert book.sync([a]) == {}  # the first call adopts the current holding
    seen = []
    for step in range(1, 7):
        if step == 2:
            assert book.sync([a, b]) == {"l": (["b"], [])}
        a.grad, b.grad = torch.full((2,), float(step)), torch.full((2,), 10.0 * step)
        plan = book.prepare()
        seen.append((a.grad, b.grad))
        book.commit(plan)
    assert book.num_updates == {"l": 2}
    torch.testing.assert_close(seen[2][0], torch.full((2,), 2.0))  # (1 + 2 + 3) / 3
    torch.testing.assert_close(seen[2][1], torch.full((2,), 25.0))  # (20 + 30) / 2: b joined before step 2
    torch.testing.assert_close(seen[5][1], torch.full((2,), 50.0))  # a full chunk from then on
    assert seen[3] == (None, None)


def test_level_set_whole_level_joining_late_starts_its_clock():
    a = nn.Parameter(torch.zeros(1))
    book = LevelSet([Level("l", ["a"], every=2)], [("a", a)])
    book.sync([])
    a.grad = torch.ones(1)
    book.commit(book.prepare())  # a level no optimizer holds does not tick
    assert book.counts == {"l": 0} and a.grad is not None
    assert book.sync([a]) == {"l": (["a"], [])}
    for step in (1, 2):
        a.grad = torch.full((1,), float(step))
        plan = book.prepare()
        book.commit(plan)
    assert book.num_updates == {"l": 1}
    torch.testing.assert_close(a.grad, torch.full((1,), 1.5))


# --------------------------------------------------------------------------------------------------- skipped batches
class SkippingNet(TinyNet):
    """``training_step`` returns None (Lightning skips backward and step) on batches 1 and 4 of every epoch."""

    skip = (1, 4)

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip:
            return None
        return super().training_step(batch, batch_idx)


def test_skipped_batches_contribute_nothing_and_do_not_tick(tmp_path):
    """Non-skipped batches of 2 epochs: 0 2 3 | 5 6 7 | 9 10 12 | 13: the slow level moves at batches 3, 7, 12.

    Each update is ``lr * mean`` of exactly the 3 gradients of its non-skipped batches.
    """
    mfu, rec = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)]), Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*returned `None`.*")
        fit(SkippingNet(optimizer="plain_sgd"), [mfu, rec], tmp_path, max_epochs=2)
    real = [i for i, g in enumerate(rec.grads) if g]
    assert real == [0, 2, 3, 5, 6, 7, 9, 10, 12, 13]
    assert rec.moved("net.0.weight") == rec.moved("net.0.bias") == [4, 8, 13]  # 1-based batches
    assert mfu.num_updates == {"slow": 3}
    assert mfu.book.counts == {"slow": 1}
    for chunk in ([0, 2, 3], [5, 6, 7], [9, 10, 12]):
        for name in ("net.0.weight", "net.0.bias"):
            mean = torch.stack([rec.grads[k][name] for k in chunk]).mean(0)
            delta = rec.after[chunk[-1]][name] - rec.before[chunk[-1]][name]
            torch.testing.assert_close(delta, -0.1 * mean, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- float64
class DoubleBoring(BoringModel):
    """BoringModel in float64 (so a checkpoint loads without a detour through fp32), plain SGD, fixed batches of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.double()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(list(torch.randn(64, 32, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_float64_parameters_get_float64_buffers(tmp_path):
    """64-true, period 3: the optimizer is handed the float64 mean of the 3 gradients, to the last bits."""
    torch.manual_seed(0)
    mfu, rec = MultiFrequencyUpdates([Level("slow", ["layer.*"], every=3)]), Recorder()
    fit(DoubleBoring(), [mfu, rec], tmp_path, max_steps=5, precision="64-true", limit_val_batches=0)
    assert rec.moved("layer.weight") == [3]
    for name in ("layer.weight", "layer.bias"):
        assert rec.grads[0][name].dtype == torch.float64
        reference = (rec.grads[0][name] + rec.grads[1][name] + rec.grads[2][name]) / 3
        assert _relative(rec.seen[2][name], reference) < 1e-15
        torch.testing.assert_close(
            rec.after[2][name], rec.before[2][name] - 0.1 * rec.seen[2][name], rtol=0, atol=1e-15
        )
    buffers = mfu.book.state_dict()["levels"]["slow"]["buffers"]
    assert {n: b.dtype for n, b in buffers.items()} == {"layer.weight": torch.float64, "layer.bias": torch.float64}


def test_float64_buffers_survive_a_checkpoint(tmp_path):
    """Save 1 step into a chunk (end of epoch 1, 4 batches), resume: the buffers come back float64, the run is exact."""
    torch.manual_seed(0)
    uninterrupted, first_model = DoubleBoring(), DoubleBoring()
    first_model.load_state_dict(uninterrupted.state_dict())
    levels = [Level("slow", ["layer.*"], every=3)]
    kwargs = dict(precision="64-true", limit_val_batches=0, limit_train_batches=4)
    fit(uninterrupted, [MultiFrequencyUpdates(levels)], tmp_path / "a", max_epochs=2, **kwargs)
    trainer = fit(first_model, [MultiFrequencyUpdates(levels)], tmp_path / "b", max_epochs=1, **kwargs)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    (state,) = (s for k, s in saved["callbacks"].items() if k.startswith("MultiFrequencyUpdates"))
    assert {b.dtype for b in state["levels"]["slow"]["buffers"].values()} == {torch.float64}

    resumed_cb = MultiFrequencyUpdates(levels)

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module):
            buffers = resumed_cb.book.state_dict()["levels"]["slow"]["buffers"]
            self.dtypes = {b.dtype for b in buffers.values()}

    peek, resumed = Peek(), DoubleBoring()
    fit(resumed, [resumed_cb, peek], tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "mid.ckpt", **kwargs)
    assert peek.dtypes == {torch.float64}
    assert resumed_cb.num_updates == {"slow": 2}
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert a.dtype == b.dtype == torch.float64
        assert torch.equal(a, b)


def test_level_set_buffer_dtypes():
    params = {
        "h": nn.Parameter(torch.zeros(2, dtype=torch.float16)),
        "b": nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
        "f": nn.Parameter(torch.zeros(2)),
        "d": nn.Parameter(torch.zeros(2, dtype=torch.float64)),
    }
    book = LevelSet([Level("l", list(params), every=3)], params.items())
    for p in params.values():
        p.grad = torch.full_like(p, 1 / 3)
    book.commit(book.prepare())
    state = book.state_dict()["levels"]["l"]["buffers"]
    assert {n: b.dtype for n, b in state.items()} == {
        "h": torch.float32,
        "b": torch.float32,
        "f": torch.float32,
        "d": torch.float64,
    }
    restored = LevelSet([Level("l", list(params), every=3)], params.items())
    restored.load_state_dict(book.state_dict())
    assert restored.state_dict()["levels"]["l"]["buffers"]["d"].dtype == torch.float64
    params["d"].grad = torch.full((2,), 1 / 3, dtype=torch.float64)
    restored.commit(restored.prepare())
    params["d"].grad = torch.full((2,), 1 / 3, dtype=torch.float64)
    restored.prepare()
    assert params["d"].grad.dtype == torch.float64
    assert torch.equal(params["d"].grad, torch.full((2,), (1 / 3 + 1 / 3 + 1 / 3) / 3, dtype=torch.float64))
