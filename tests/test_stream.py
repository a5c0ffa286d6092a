"""TaskStreamDataModule: splits, permutations, rotations, the task schedule inside one fit, and its errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import TensorDataset

from nl_lightning.data import DigitsDataset, TaskStreamDataModule
from nl_lightning.data.stream import rotate_images
from nl_lightning.models import MLPClassifier


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(train=True), DigitsDataset(train=False)


def _indices(dm, split):
    return [torch.as_tensor(dm.task_dataset(t, split).indices) for t in range(dm.num_tasks)]


@pytest.mark.parametrize("scenario", ["class_incremental", "task_incremental"])
def test_split_tasks_are_disjoint_and_complete(digits, scenario):
    train, test = digits
    dm = TaskStreamDataModule(train, test, scenario=scenario, num_tasks=5, val_fraction=0.1, seed=3)
    classes = [c for group in dm.task_classes for c in group]
    assert sorted(classes) == list(range(10)) and all(len(g) == 2 for g in dm.task_classes)
    for split, dataset in (("train", train), ("test", test)):
        parts = _indices(dm, split)
        if split == "train":
            parts += _indices(dm, "val")
        everything = torch.cat(parts)
        assert len(everything) == len(dataset) == len(set(everything.tolist()))  # disjoint and complete
    for t in range(5):
        for split in ("train", "val", "test"):
            labels = {int(dataset_label) for _, dataset_label, _ in dm.task_dataset(t, split)}
            assert labels <= set(dm.task_classes[t])


def test_class_order_follows_the_seed(digits):
    train, test = digits
    a = TaskStreamDataModule(train, test, num_tasks=5, seed=1).task_classes
    b = TaskStreamDataModule(train, test, num_tasks=5, seed=1).task_classes
    c = TaskStreamDataModule(train, test, num_tasks=5, seed=2).task_classes
    assert a == b and a != c
    explicit = TaskStreamDataModule(train, test, num_tasks=5, class_order=list(range(10))).task_classes
    assert explicit == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_permutations_are_fixed_per_seed(digits):
    train, test = digits
    dm = TaskStreamDataModule(train, test, scenario="permuted", num_tasks=4, seed=7)
    again = TaskStreamDataModule(train, test, scenario="permuted", num_tasks=4, seed=7)
    other = TaskStreamDataModule(train, test, scenario="permuted", num_tasks=4, seed=8)
    assert torch.equal(dm.permutations, again.permutations)
    assert not torch.equal(dm.permutations[1:], other.permutations[1:])
    assert torch.equal(dm.permutations[0], torch.arange(64))  # task 0 is the unpermuted data
    for perm in dm.permutations:
        assert torch.equal(perm.sort().values, torch.arange(64))  # a bijection
    # every task holds all the data, its inputs permuted
    x, y, task = next(iter(dm.eval_dataloader(2, "test")))
    raw = torch.stack([test[i][0] for i in range(len(x))])
    assert torch.equal(x, raw[:, dm.permutations[2]]) and bool((task == 2).all())
    assert len(dm.task_dataset(3, "train")) + len(dm.task_dataset(3, "val")) == len(train)


def test_rotation_by_90_degrees_is_rot90():
    images = torch.rand(3, 1, 6, 6)
    assert torch.allclose(rotate_images(images, 90.0, (6, 6)), torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)
    flat = images.flatten(1)
    assert torch.equal(rotate_images(flat, 0.0, (6, 6)), flat)


def test_rotated_stream(digits):
    train, test = digits
    dm = TaskStreamDataModule(train, test, scenario="rotated", num_tasks=4, max_rotation=180.0, seed=0)
    assert sorted(dm.angles.tolist()) == [0.0, 45.0, 90.0, 135.0]
    task = int(torch.nonzero(dm.angles == 90.0))
    x, _, _ = next(iter(dm.eval_dataloader(task, "test")))
    raw = torch.stack([test[i][0] for i in range(len(x))]).view(-1, 1, 8, 8)
    assert torch.allclose(x.view(-1, 1, 8, 8), torch.rot90(raw, 1, dims=(2, 3)), atol=1e-5)


def test_samples_per_task_and_online_protocol(digits):
    train, test = digits
    dm = TaskStreamDataModule(train, test, scenario="permuted", num_tasks=3, samples_per_task=100,
                              protocol="online", batch_size=10, val_fraction=0)  # fmt: skip
    assert [len(dm.task_dataset(t)) for t in range(3)] == [100, 100, 100]
    with pytest.raises(MisconfigurationException, match="single pass.*epochs_per_task=1.*got 3"):
        TaskStreamDataModule(train, test, protocol="online", epochs_per_task=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scenario="domain"), "scenario.*'domain'"),
        (dict(batch_size=0), "batch_size.*0"),
        (dict(val_fraction=1.0), "val_fraction.*1.0"),
        (dict(protocol="batch"), "protocol.*'batch'"),
    ],
)
def test_construction_errors(digits, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        TaskStreamDataModule(*digits, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_tasks=3), "10 classes do not split evenly into num_tasks=3"),
        (dict(num_tasks=5, classes_per_task=3), "classes_per_task=3 x num_tasks=5"),
        (dict(class_order=[0, 0, 1]), "distinct classes"),
    ],
)
def test_data_dependent_errors_raise_at_setup(digits, kwargs, match):
    """The constructor reads no data (recipes parse without it); splitting happens, and fails, at setup."""
    dm = TaskStreamDataModule(*digits, **kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        dm.setup("fit")


def test_rotated_needs_an_image_size():
    data = TensorDataset(torch.rand(20, 16), torch.arange(20) % 2)
    with pytest.raises(MisconfigurationException, match="image_size"):
        TaskStreamDataModule(data, data, scenario="rotated", num_tasks=2).setup("fit")
    assert TaskStreamDataModule(data, data, scenario="rotated", num_tasks=2, image_size=(4, 4)).angles is not None


class _SeenLabels(Callback):
    def __init__(self):
        self.labels: dict[int, set[int]] = {}
        self.tasks: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.setdefault(trainer.current_epoch, set()).update(batch[1].tolist())
        self.tasks.setdefault(trainer.current_epoch, set()).update(batch[2].tolist())
        assert trainer.datamodule.current_task == trainer.current_epoch // 2


def _trainer(tmp_path, **kwargs):
    defaults = dict(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", reload_dataloaders_every_n_epochs=1)  # fmt: skip
    defaults.update(kwargs)
    return Trainer(**defaults)


def test_one_fit_trains_the_tasks_in_order(tmp_path, digits):
    dm = TaskStreamDataModule(*digits, num_tasks=5, epochs_per_task=2, batch_size=64, seed=4)
    spy = _SeenLabels()
    _trainer(tmp_path, max_epochs=dm.expected_epochs, callbacks=[spy]).fit(MLPClassifier(), datamodule=dm)
    for epoch in range(10):
        assert spy.labels[epoch] == set(dm.task_classes[epoch // 2])
        assert spy.tasks[epoch] == {epoch // 2}
    assert [dm.stage_at_epoch_end(e) for e in range(10)] == [None, 1, None, 2, None, 3, None, 4, None, 5]


def test_joint_trains_everything_at_once(tmp_path, digits):
    dm = TaskStreamDataModule(*digits, num_tasks=5, epochs_per_task=2, joint=True)
    assert dm.expected_epochs == 2 and dm.stage_at_epoch_end(1) == 5 and dm.stage_at_epoch_end(0) is None
    spy = _SeenLabels()
    spy.on_train_batch_start = lambda trainer, pl_module, batch, batch_idx: spy.labels.setdefault(
        trainer.current_epoch, set()
    ).update(batch[1].tolist())
    _trainer(tmp_path, max_epochs=2, callbacks=[spy]).fit(MLPClassifier(), datamodule=dm)
    assert spy.labels[0] == set(range(10))


def test_setup_errors(tmp_path, digits):
    dm = TaskStreamDataModule(*digits, num_tasks=5, epochs_per_task=2)
    with pytest.raises(MisconfigurationException, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(tmp_path, max_epochs=10, reload_dataloaders_every_n_epochs=0).fit(MLPClassifier(), datamodule=dm)
    with pytest.raises(MisconfigurationException, match="10 epochs long.*max_epochs=4.*set max_epochs=10"):
        _trainer(tmp_path, max_epochs=4).fit(MLPClassifier(), datamodule=dm)


def test_task_incremental_masks_logits(tmp_path, digits):
    dm = TaskStreamDataModule(*digits, scenario="task_incremental", num_tasks=5, seed=0)
    model = MLPClassifier(mask_by_task=True)
    _trainer(tmp_path, max_steps=2, max_epochs=5).fit(model, datamodule=dm)
    x, _, task = next(iter(dm.eval_dataloader(3, "test")))
    predictions = model.logits(x, task).argmax(-1)
    assert set(predictions.tolist()) <= set(dm.task_classes[3])
    with pytest.raises(MisconfigurationException, match="mask_by_task=True needs a data module"):
        plain = TaskStreamDataModule(*digits, scenario="class_incremental", num_tasks=5)
        _trainer(tmp_path, max_steps=1, max_epochs=5).fit(MLPClassifier(mask_by_task=True), datamodule=plain)
