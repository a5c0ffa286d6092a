"""NestedLearningMonitor: per-level updates, gradient norm at update, drift and learning rate, with any logger."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, fit
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.demos import Transformer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor
from nl_lightning.models import ContinuumMemory, to_cms

LEVELS = [Level("slow", ["net.0.*"], every=3), Level("mid", ["net.2.weight"], every=2)]


class LastUpdateSpy(Callback):
    """Records the norm of the slow level's gradient and its parameter change at each of its updates."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.drifts: list[float] = []
        self._before = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.net[0].parameters() if p.grad is not None]
        self._before = [p.detach().clone() for p in pl_module.net[0].parameters()] if grads else None
        if grads:
            self.grad_norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is not None:
            after = [p.detach() for p in pl_module.net[0].parameters()]
            self.drifts.append(
                math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(after, self._before, strict=True)))
            )


def test_logs_every_level_with_values_of_its_last_update(tmp_path):
    spy = LastUpdateSpy()  # listed after MultiFrequencyUpdates: sees the chunk mean on update steps only
    mfu = MultiFrequencyUpdates(LEVELS)
    trainer = fit(TinyNet(optimizer="plain_sgd"), [NestedLearningMonitor(), mfu, spy], tmp_path, max_steps=10,
                  log_every_n_steps=5)  # fmt: skip
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for level in ("slow", "mid"):
        for key in ("updates", "grad_norm", "drift", "drift_rel", "lr"):
            assert f"nested/{level}/{key}" in metrics, key
    assert metrics["nested/slow/updates"] == 3 == mfu.num_updates["slow"]
    assert metrics["nested/mid/updates"] == 5
    # The slow level last updated at step 9: its gradient was the mean of steps 7-9.
    assert metrics["nested/slow/grad_norm"] == pytest.approx(spy.grad_norms[-1], rel=1e-5)
    assert metrics["nested/slow/drift"] == pytest.approx(spy.drifts[-1], rel=1e-5)
    # plain SGD moves by lr * gradient
    assert metrics["nested/slow/drift"] == pytest.approx(0.1 * metrics["nested/slow/grad_norm"], rel=1e-5)
    assert metrics["nested/slow/lr"] == pytest.approx(0.1)


def test_tensorboard_scalars_and_histograms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(TinyNet(), [MultiFrequencyUpdates(LEVELS), NestedLearningMonitor()], tmp_path, max_steps=12,
        logger=logger, log_every_n_steps=4)  # fmt: skip
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars, histograms = events.Tags()["scalars"], events.Tags()["histograms"]
    assert {"nested/slow/updates", "nested/mid/grad_norm", "nested/slow/drift"} <= set(scalars)
    assert {"nested/slow/grad", "nested/slow/update", "nested/mid/grad", "nested/mid/update"} <= set(histograms)
    updates = [(e.step, e.value) for e in events.Scalars("nested/slow/updates")]
    assert updates == [(3, 1.0), (7, 2.0), (11, 4.0)]  # logged at steps 4, 8 and 12


@pytest.mark.parametrize("logger", [False, "csv"])
def test_works_with_other_loggers_or_none(tmp_path, logger):
    logger = CSVLogger(tmp_path) if logger == "csv" else False
    trainer = fit(TinyNet(), [MultiFrequencyUpdates(LEVELS), NestedLearningMonitor()], tmp_path, max_steps=6,
                  logger=logger, log_every_n_steps=3)  # fmt: skip
    assert float(trainer.callback_metrics["nested/slow/updates"]) == 2
    if logger:
        logger.save()
        assert "nested/slow/updates" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()


def test_without_multi_frequency_updates_monitors_the_optimizer(tmp_path):
    trainer = fit(TinyNet(), [NestedLearningMonitor()], tmp_path, max_steps=6, log_every_n_steps=3)
    assert float(trainer.callback_metrics["nested/all/updates"]) == 6
    assert float(trainer.callback_metrics["nested/all/grad_norm"]) > 0


def test_skipped_fp16_steps_are_not_updates(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = fit(TinyNet(inf_calls=(2,)), [NestedLearningMonitor()], tmp_path, max_steps=6, log_every_n_steps=3,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    assert float(trainer.callback_metrics["nested/all/updates"]) == 5


class SkippingNet(TinyNet):
    """TinyNet whose ``training_step`` returns ``None`` (no backward, a step without gradients) on every third batch.

    7 batches per epoch, batches 2 and 5 skipped: of the first 9 steps, 3 and 6 carry no gradient.
    """

    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 2:
            return None
        return super().training_step(batch, batch_idx)


class Logged(Callback):
    """The monitor's logged values after each batch (list it after the monitor)."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys
        self.values: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append({k: float(trainer.callback_metrics[k]) for k in self.keys})


@pytest.mark.filterwarnings("ignore:.*returned `None`")
def test_steps_without_gradients_are_not_updates(tmp_path):
    """Without MultiFrequencyUpdates, steps 3 and 6 of 9 (no backward) are neither counted nor measured."""
    logged = Logged("nested/all/updates", "nested/all/grad_norm", "nested/all/drift")
    monitor = NestedLearningMonitor()
    fit(SkippingNet(optimizer="plain_sgd"), [monitor, logged], tmp_path, max_steps=9, log_every_n_steps=1)
    assert [v["nested/all/updates"] for v in logged.values] == [1, 2, 2, 3, 4, 4, 5, 6, 7]
    for k in (2, 5):  # steps 3 and 6 log the values of the previous (real) update
        assert logged.values[k] == logged.values[k - 1]
    assert all(v["nested/all/grad_norm"] > 0 and v["nested/all/drift"] > 0 for v in logged.values)
    assert monitor.state_dict() == {"updates": {"all": 7}}


@pytest.mark.filterwarnings("ignore:.*returned `None`")
def test_steps_without_gradients_follow_multi_frequency_updates(tmp_path):
    """With MultiFrequencyUpdates the counts are its own: period 3 over real steps 1 2 4 5 7 8 9 updates at 4 and 8."""
    mfu = MultiFrequencyUpdates([Level("slow", ["net.0.*"], every=3)])
    logged = Logged("nested/slow/updates")
    fit(SkippingNet(optimizer="plain_sgd"), [mfu, NestedLearningMonitor(), logged], tmp_path, max_steps=9,
        log_every_n_steps=1)  # fmt: skip
    assert [v["nested/slow/updates"] for v in logged.values] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert mfu.num_updates == {"slow": 2}


def test_bad_prefix():
    with pytest.raises(MisconfigurationException, match="prefix.*''"):
        NestedLearningMonitor(prefix="")


# ------------------------------------------------------------------------------------------------ non-finite CMS states
VOCAB = 20


class DemoLM(LightningModule):
    """Lightning's demo transformer with its encoder and decoder FFNs converted to token-axis CMS chains."""

    def __init__(self, inner_lr: float, check_finite: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
        layers = ["transformer.encoder.layers.*", "transformer.decoder.layers.*"]
        # unbounded writes (the printed rule), so that a large inner_lr diverges
        to_cms(self.model, layers, [2, 4], inner_lr=inner_lr, check_finite=check_finite, max_write_norm=None)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.nll_loss(self.model(x[:, :-1], x[:, :-1]), x[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        tokens = torch.randint(0, VOCAB, (16, 17), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=4)


class RawCMS(LightningModule):
    """A ContinuumMemory used directly (no CMSAdapter, so no finite check of its own), as Hope uses it."""

    def __init__(self, inner_lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cms = ContinuumMemory(dim=8, chunk_sizes=[2, 4], in_context=True, inner_lr=inner_lr, max_write_norm=None)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        y, _ = self.cms(batch[0])
        return self.head(y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(10 * torch.randn(16, 12, 8, generator=torch.Generator().manual_seed(0))), 4)


CMS_NAMES = ["model.transformer.encoder.layers.0.ffn.cms", "model.transformer.decoder.layers.0.ffn.cms"]


def nonfinite_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "hold NaN or inf" in str(w.message)]


def test_reports_nonfinite_states_of_a_converted_transformer(tmp_path):
    """inner_lr=0.5 makes the writes of the converted demo transformer diverge (its adapters' check is off here)."""
    model = DemoLM(inner_lr=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(model, [NestedLearningMonitor()], tmp_path, max_steps=3, log_every_n_steps=1)
    assert float(trainer.callback_metrics["nested/nonfinite_states"]) == 2
    messages = nonfinite_warnings(caught)
    assert len(messages) == 1  # the first time only
    assert all(name in messages[0] for name in CMS_NAMES)
    cms = [m for m in model.modules() if isinstance(m, ContinuumMemory)]
    assert len(cms) == 2 and all(not m._forward_hooks for m in cms)  # removed in teardown


def test_healthy_states_report_zero_and_no_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(DemoLM(inner_lr=0.01), [NestedLearningMonitor()], tmp_path, max_steps=3, log_every_n_steps=1)
    assert float(trainer.callback_metrics["nested/nonfinite_states"]) == 0
    assert nonfinite_warnings(caught) == []


def test_reports_a_continuum_memory_used_directly(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"states of \['cms'\] hold NaN or inf"):
        trainer = fit(RawCMS(inner_lr=1e4), [NestedLearningMonitor()], tmp_path, max_steps=2, log_every_n_steps=1)
    assert float(trainer.callback_metrics["nested/nonfinite_states"]) == 1
    trainer = fit(RawCMS(inner_lr=1e-3), [NestedLearningMonitor()], tmp_path, max_steps=2, log_every_n_steps=1)
    assert float(trainer.callback_metrics["nested/nonfinite_states"]) == 0


def test_names_the_diverged_modules_when_the_adapter_raises(tmp_path):
    """With the adapters' own check on, the step raises FloatingPointError; the monitor still names the modules."""
    with pytest.raises(FloatingPointError), pytest.warns(RuntimeWarning, match="encoder.layers.0.ffn.cms"):
        fit(DemoLM(inner_lr=0.5, check_finite=True), [NestedLearningMonitor()], tmp_path, max_steps=2,
            log_every_n_steps=1)  # fmt: skip


class ChecksSeen(Callback):
    """Whether the monitor checked the states in each batch (list it before the monitor)."""

    def __init__(self, monitor: NestedLearningMonitor) -> None:
        self.monitor = monitor
        self.seen: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(bool(self.monitor._state_checks))


def test_states_are_checked_on_logging_steps_only(tmp_path):
    monitor = NestedLearningMonitor()
    spy = ChecksSeen(monitor)
    fit(DemoLM(inner_lr=0.01), [spy, monitor], tmp_path, max_steps=4, log_every_n_steps=2)
    assert spy.seen == [False, True, False, True]


def test_models_without_token_axis_cms_log_no_state_metric(tmp_path):
    trainer = fit(TinyNet(), [NestedLearningMonitor()], tmp_path, max_steps=3, log_every_n_steps=1)
    assert "nested/nonfinite_states" not in trainer.callback_metrics
