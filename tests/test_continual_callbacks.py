"""ContinualEvaluation, ElasticWeightConsolidation and ExperienceReplay."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import DestroyProcessGroup
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from nl_lightning.callbacks import ContinualEvaluation, ElasticWeightConsolidation, ExperienceReplay
from nl_lightning.callbacks.replay import Reservoir
from nl_lightning.data import DigitsDataset, TaskStreamDataModule
from nl_lightning.models import MLPClassifier

NUM_CLASSES = 6


def one_hot_data(n_per_class: int = 8) -> TensorDataset:
    """Inputs that spell out their label: x = one_hot(y)."""
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    return TensorDataset(F.one_hot(y, NUM_CLASSES).float(), y)


class Oracle(LightningModule):
    """A model whose accuracy we control: it answers right exactly for the classes it currently 'knows'.

    Training on a task makes it know the task's classes (on every rank alike); with ``forget=True`` only those.
    """

    def __init__(self, forget: bool) -> None:
        super().__init__()
        self.forget = forget
        self.dummy = nn.Parameter(torch.zeros(1))
        self.register_buffer("known", torch.zeros(NUM_CLASSES, dtype=torch.bool))

    def forward(self, x):
        truth = x.argmax(-1)
        wrong = (truth + 1) % NUM_CLASSES
        answer = torch.where(self.known[truth], truth, wrong)
        return F.one_hot(answer, NUM_CLASSES).float() + 0 * self.dummy

    def training_step(self, batch, batch_idx):
        labels = torch.zeros_like(self.known)
        labels[self.trainer.datamodule.task_classes[self.trainer.datamodule.current_task]] = True
        self.known.copy_(labels if self.forget else self.known | labels)
        return (self.dummy**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, dm, callbacks, **kwargs):
    args = dict(default_root_dir=tmp_path, max_epochs=dm.expected_epochs, reload_dataloaders_every_n_epochs=1,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu")  # fmt: skip
    args.update(kwargs)
    return Trainer(callbacks=callbacks, **args)


@pytest.mark.parametrize("forget", [True, False])
def test_matrix_bookkeeping_on_a_controlled_model(tmp_path, forget):
    data = one_hot_data()
    dm = TaskStreamDataModule(data, data, num_tasks=3, epochs_per_task=2, class_order=range(6), val_fraction=0)
    evaluation = ContinualEvaluation(method="oracle")
    _trainer(tmp_path, dm, [evaluation]).fit(Oracle(forget), datamodule=dm)
    report = json.loads((tmp_path / "continual_metrics.json").read_text())
    if forget:  # knows only the task just trained
        expected = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        assert report["acc"] == pytest.approx(1 / 3)
        assert report["bwt"] == pytest.approx(-1.0) and report["forgetting"] == pytest.approx(1.0)
    else:  # remembers everything
        expected = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
        assert report["acc"] == 1.0 and report["bwt"] == 0.0 and report["forgetting"] == 0.0
    assert report["matrix"] == expected
    assert report["untrained"] == [0.0, 0.0, 0.0]
    assert report["learning_accuracy"] == 1.0 and report["fwt"] == 0.0
    assert report["method"] == "oracle" and report["scenario"] == "class_incremental"
    assert report["task_classes"] == [[0, 1], [2, 3], [4, 5]] and report["stages_completed"] == [0, 1, 2, 3]


def test_logs_scalars_heatmap_and_json_to_tensorboard(tmp_path):
    data = one_hot_data()
    dm = TaskStreamDataModule(data, data, num_tasks=3, class_order=range(6), val_fraction=0)
    logger = TensorBoardLogger(tmp_path, name="cl")
    trainer = _trainer(tmp_path, dm, [ContinualEvaluation()], logger=logger)
    trainer.fit(Oracle(forget=True), datamodule=dm)
    assert float(trainer.callback_metrics["continual/acc"]) == pytest.approx(1 / 3)
    assert float(trainer.callback_metrics["continual/task_2"]) == 1.0
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "continual/accuracy_matrix" in events.Tags()["images"]
    assert [e.step for e in events.Images("continual/accuracy_matrix")] == [1, 2, 3]
    report = json.loads((tmp_path / "cl" / "version_0" / "continual_metrics.json").read_text())
    assert report["method"] == "naive" and report["seed"] is None or isinstance(report["seed"], int)


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU is not tested on Windows")
def test_matrix_under_ddp_spawn(tmp_path):
    """Two processes each evaluate half of every task; the summed counts give the single-process matrix."""
    data = one_hot_data()
    dm = TaskStreamDataModule(data, data, num_tasks=3, class_order=range(6), val_fraction=0)
    trainer = _trainer(tmp_path, dm, [ContinualEvaluation(), DestroyProcessGroup()], strategy="ddp_spawn", devices=2)
    trainer.fit(Oracle(forget=True), datamodule=dm)
    report = json.loads((tmp_path / "continual_metrics.json").read_text())
    assert report["matrix"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert report["acc"] == pytest.approx(1 / 3) and report["stages_completed"] == [0, 1, 2, 3]


def test_needs_a_task_stream(tmp_path):
    from nl_lightning.data import DigitsDataModule

    with pytest.raises(MisconfigurationException, match="ContinualEvaluation needs a task stream"):
        Trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[ContinualEvaluation()], logger=False).fit(
            MLPClassifier(), datamodule=DigitsDataModule()
        )
    with pytest.raises(MisconfigurationException, match="split.*'train'"):
        ContinualEvaluation(split="train")


def test_matrix_survives_a_checkpoint(tmp_path):
    """Stop after 2 of 3 tasks, resume from the checkpoint: the matrix equals an uninterrupted run's."""
    data = one_hot_data()
    dm = TaskStreamDataModule(data, data, num_tasks=3, class_order=range(6), val_fraction=0)
    uninterrupted = ContinualEvaluation()
    _trainer(tmp_path / "a", dm, [uninterrupted]).fit(Oracle(forget=True), datamodule=dm)

    first = ContinualEvaluation()
    trainer = _trainer(tmp_path / "b", dm, [first], max_steps=2)  # one batch per task: stops after task 2
    trainer.fit(Oracle(forget=True), datamodule=dm)
    assert first.completed_stages == [0, 1, 2]
    trainer.save_checkpoint(tmp_path / "two_tasks.ckpt")
    resumed = ContinualEvaluation()
    _trainer(tmp_path / "c", dm, [resumed]).fit(
        Oracle(forget=True), datamodule=dm, ckpt_path=tmp_path / "two_tasks.ckpt"
    )
    assert resumed.completed_stages == [0, 1, 2, 3]
    assert torch.equal(resumed.matrix.matrix(), uninterrupted.matrix.matrix())


# --------------------------------------------------------------------------------------------------- EWC
def _consolidated_ewc(model, ewc_lambda=10.0):
    ewc = ElasticWeightConsolidation(ewc_lambda=ewc_lambda, fisher_samples=50)
    data = DigitsDataset(train=True)
    loader = [[data.data[i : i + 10], data.targets[i : i + 10]] for i in range(0, 100, 10)]
    ewc.consolidate(model, loader)
    return ewc


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    model = MLPClassifier(hidden=[16])
    ewc = _consolidated_ewc(model)
    assert ewc.penalty(model) == 0.0
    assert all(float(f.sum()) > 0 for f in ewc._fisher.values())
    direction = [torch.randn_like(p) for p in model.parameters()]
    values = []
    for step in (0.0, 0.1, 0.2, 0.4):
        with torch.no_grad():
            for p, d, anchor in zip(model.parameters(), direction, ewc._anchor.values(), strict=True):
                p.copy_(anchor + step * d)
        values.append(float(ewc.penalty(model).detach()))
    assert values[0] == 0.0 and 0 < values[1] < values[2] < values[3]
    assert values[2] == pytest.approx(4 * values[1], rel=1e-4) and values[3] == pytest.approx(16 * values[1], rel=1e-4)


def test_ewc_gradient_is_the_penalty_gradient():
    model = MLPClassifier(hidden=[16])
    ewc = _consolidated_ewc(model, ewc_lambda=3.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = torch.autograd.grad(ewc.penalty(model), list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ewc.add_penalty_gradient(model)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, 1 + g, atol=1e-6)


def test_ewc_in_a_stream_anchors_after_each_task(tmp_path):
    dm = TaskStreamDataModule(DigitsDataset(True), DigitsDataset(False), num_tasks=5, epochs_per_task=1, seed=0)
    ewc = ElasticWeightConsolidation(ewc_lambda=50.0, fisher_samples=20)
    trainer = _trainer(tmp_path, dm, [ewc], log_every_n_steps=1)
    model = MLPClassifier(hidden=[32])
    trainer.fit(model, datamodule=dm)
    assert ewc.tasks_consolidated == 5
    assert float(trainer.callback_metrics["ewc/penalty"]) > 0
    state = ewc.state_dict()
    assert set(state["fisher"]) == {n for n, _ in model.named_parameters()}


def test_ewc_argument_errors(tmp_path):
    with pytest.raises(MisconfigurationException, match="ewc_lambda.*-1"):
        ElasticWeightConsolidation(ewc_lambda=-1)
    with pytest.raises(MisconfigurationException, match="gamma.*1.5"):
        ElasticWeightConsolidation(gamma=1.5)
    with pytest.raises(MisconfigurationException, match="loss_fn.*'nope.missing'"):
        ElasticWeightConsolidation(loss_fn="nope.missing")


def test_ewc_with_manual_boundaries_on_a_causal_lm(tmp_path):
    """Outside a task stream: two fits on text (dict batches), consolidated by hand in between. The default loss is
    the LM's own (`CausalLM.loss`), the Fisher is the mean squared per-sample gradient, and the penalty acts in the
    second fit."""
    from nl_lightning.data import TextDataModule
    from nl_lightning.models import TransformerPP

    def trainer(callbacks, **kwargs):
        return Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu", limit_val_batches=0, callbacks=callbacks,
                       **kwargs)  # fmt: skip

    torch.manual_seed(0)
    model = TransformerPP(vocab_size=256, dim=16, depth=1, heads=2)
    dm = TextDataModule(seq_len=16, batch_size=4, samples_per_epoch=16, seed=0)
    with pytest.raises(MisconfigurationException, match="boundaries='manual'"):
        trainer([ElasticWeightConsolidation()], max_steps=1).fit(model, datamodule=dm)
    ewc = ElasticWeightConsolidation(ewc_lambda=10.0, fisher_samples=3, boundaries="manual")
    trainer([ewc], max_steps=2).fit(model, datamodule=dm)
    assert ewc.tasks_consolidated == 0  # nothing happens at epoch ends
    batch = next(iter(dm.train_dataloader()))
    ewc.consolidate(model, [batch])
    name, param = "blocks.0.mlp.down.weight", model.blocks[0].mlp.down.weight
    want = torch.zeros_like(param)
    for i in range(3):  # the Fisher by hand: per-sample gradients of the LM's loss, squared, averaged
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        (grad,) = torch.autograd.grad(model.sequence_loss(sample["tokens"], sample["targets"])[0], [param])
        want += grad.pow(2) / 3
    torch.testing.assert_close(ewc.state_dict()["fisher"][name], want)
    second = trainer([ewc], max_steps=2, log_every_n_steps=1)
    second.fit(model, datamodule=dm)
    assert float(second.callback_metrics["ewc/penalty"]) > 0
    with pytest.raises(MisconfigurationException, match="boundaries.*'sometimes'"):
        ElasticWeightConsolidation(boundaries="sometimes")


# --------------------------------------------------------------------------------------------------- replay
def test_reservoir_is_bounded_and_uniform():
    """5 items through a 2-slot reservoir: each item is kept with probability 2/5, over 4000 seeds."""
    kept = Counter()
    for seed in range(4000):
        reservoir = Reservoir(capacity=2, seed=seed)
        for start in range(0, 5, 2):  # batches of 2, 2, 1
            reservoir.add([torch.arange(start, min(start + 2, 5))])
            assert reservoir.size <= 2
        assert reservoir.size == 2 and reservoir.seen == 5
        kept.update(reservoir.fields[0].tolist())
    for item in range(5):
        assert kept[item] / 4000 == pytest.approx(0.4, abs=0.035), kept


def test_reservoir_samples_distinct_items():
    reservoir = Reservoir(capacity=10, seed=0)
    reservoir.add([torch.arange(100), torch.arange(100) * 2])
    x, y = reservoir.sample(6)
    assert len(set(x.tolist())) == 6 and torch.equal(y, 2 * x)


def test_replay_mixes_old_samples_into_batches(tmp_path):
    dm = TaskStreamDataModule(DigitsDataset(True), DigitsDataset(False), num_tasks=5, epochs_per_task=1,
                              batch_size=16, seed=0)  # fmt: skip
    replay = ExperienceReplay(buffer_size=50, replay_batch_size=8)
    seen = []

    class Spy(MLPClassifier):
        def training_step(self, batch, batch_idx):
            seen.append((self.trainer.current_epoch, len(batch[0]), set(batch[2].tolist())))
            return super().training_step(batch, batch_idx)

    _trainer(tmp_path, dm, [replay]).fit(Spy(hidden=[16]), datamodule=dm)
    assert seen[0][1] == 16 and all(size in (16 + 8, 16 + 8 - 16 + (size - 8)) for _, size, _ in seen[1:])
    later = [tasks for epoch, _, tasks in seen if epoch == 4]
    assert any(tasks - {4} for tasks in later)  # old tasks' samples come back in task 4's batches
    assert replay.reservoir.size == 50 and replay.reservoir.seen == sum(len(dm.task_dataset(t)) for t in range(5))


def test_replay_refuses_tuple_batches_and_bad_arguments():
    replay = ExperienceReplay()
    with pytest.raises(MisconfigurationException, match="list or dict of tensors.*tuple"):
        replay.on_train_batch_start(None, None, (torch.zeros(2), torch.zeros(2)), 0)
    with pytest.raises(MisconfigurationException, match="buffer_size.*0"):
        ExperienceReplay(buffer_size=0)


class _RanksAgree(Callback):
    """Inside each worker: parameters and EWC's Fisher information are identical on every rank."""

    def on_train_end(self, trainer, pl_module):
        ewc = next(cb for cb in trainer.callbacks if isinstance(cb, ElasticWeightConsolidation))
        assert ewc.tasks_consolidated == 3
        tensors = [p.detach() for p in pl_module.parameters()] + list(ewc._fisher.values())
        for t in tensors:
            rank0 = t.clone()
            torch.distributed.broadcast(rank0, src=0)
            assert torch.equal(rank0, t), "ranks diverged"


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU is not tested on Windows")
def test_ewc_and_replay_keep_ranks_in_sync_under_ddp(tmp_path):
    dm = TaskStreamDataModule(DigitsDataset(True), DigitsDataset(False), num_tasks=3, classes_per_task=2,
                              epochs_per_task=1, batch_size=16, seed=0)  # fmt: skip
    callbacks = [ElasticWeightConsolidation(fisher_samples=10), ExperienceReplay(buffer_size=20), _RanksAgree(),
                 DestroyProcessGroup()]  # fmt: skip
    _trainer(tmp_path, dm, callbacks, strategy="ddp_spawn", devices=2).fit(MLPClassifier(hidden=[16]), datamodule=dm)
