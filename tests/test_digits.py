"""DigitsDataModule (split, stratification, reproducibility, argument checks) and MLPClassifier on real digits."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.data import DigitsDataModule
from nl_lightning.data.digits import load_digits_tensors, stratified_split
from nl_lightning.models import MLPClassifier

N_SAMPLES = 1797


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_split_sizes_and_stratification():
    dm = _setup(val_fraction=0.2)
    x_train, y_train = dm.train_set.data, dm.train_set.targets
    x_val, y_val = dm.val_set.data, dm.val_set.targets
    assert len(y_train) + len(y_val) == N_SAMPLES
    assert abs(len(y_val) - 0.2 * N_SAMPLES) <= 10  # one rounding per class at most
    assert x_train.shape == (len(y_train), dm.num_features) == (len(y_train), 64)
    assert x_val.shape == (len(y_val), 64)
    assert dm.num_classes == 10
    per_class = torch.bincount(torch.cat([y_train, y_val]), minlength=10)
    val_per_class = torch.bincount(y_val, minlength=10)
    # every class is split 80/20 up to the rounding of one sample
    assert torch.all((val_per_class - 0.2 * per_class).abs() <= 1), val_per_class


def test_train_and_val_are_disjoint():
    x, y = load_digits_tensors()
    train_idx, val_idx = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(N_SAMPLES))
    dm = _setup(val_fraction=0.2, seed=0)  # the data module uses exactly this split
    assert torch.equal(dm.train_set.data, x[train_idx]) and torch.equal(dm.val_set.targets, y[val_idx])


def test_split_is_reproducible_per_seed_and_independent_of_global_seed():
    torch.manual_seed(123)
    a = _setup(seed=0)
    torch.manual_seed(456)
    b = _setup(seed=0)
    c = _setup(seed=1)
    assert torch.equal(a.val_set.data, b.val_set.data)
    assert torch.equal(a.train_set.targets, b.train_set.targets)
    assert not torch.equal(a.val_set.data, c.val_set.data)


def test_loaders_values_and_order():
    dm = _setup(batch_size=50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (50, 64) and y.shape == (50,)
    full = dm.train_set.data
    assert full.min() >= 0.0 and full.max() <= 1.0 and full.max() == 1.0
    # the training shuffle has its own seeded generator: the same order whatever the global seed
    torch.manual_seed(1)
    first = next(iter(dm.train_dataloader()))[1]
    torch.manual_seed(2)
    assert torch.equal(first, next(iter(dm.train_dataloader()))[1])
    # validation and test (the validation split) are not shuffled
    val_y = torch.cat([b[1] for b in dm.val_dataloader()])
    assert torch.equal(val_y, dm.val_set.targets)
    assert torch.equal(torch.cat([b[1] for b in dm.test_dataloader()]), val_y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size.*got 0"),
        ({"val_fraction": 0.0}, "val_fraction.*got 0.0"),
        ({"val_fraction": 1.0}, "val_fraction.*got 1.0"),
        ({"num_workers": -1}, "num_workers.*got -1"),
    ],
)
def test_datamodule_argument_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        DigitsDataModule(**kwargs)


def test_loader_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_classifier_shapes_and_parameter_names():
    model = MLPClassifier(in_features=64, num_classes=10, hidden=[32, 16])
    assert model(torch.rand(5, 64)).shape == (5, 10)
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
        "backbone.2.bias",
        "head.weight",
        "head.bias",
    ]
    assert model.hparams.hidden == (32, 16)
    assert MLPClassifier(hidden=[])(torch.rand(2, 64)).shape == (2, 10)  # a linear classifier
    assert MLPClassifier(hidden=None).head.in_features == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, "in_features.*got 0"),
        ({"num_classes": 0}, "num_classes.*got 0"),
        ({"hidden": [16, 0]}, "hidden.*got 0"),
        ({"lr": 0.0}, "lr.*got 0.0"),
        ({"weight_decay": -0.1}, "weight_decay.*got -0.1"),
    ],
)
def test_classifier_argument_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        MLPClassifier(**kwargs)


def _mean_loss(model: MLPClassifier, dm: DigitsDataModule) -> float:
    x, y = (dm.train_set.data, dm.train_set.targets)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def test_training_on_digits_reduces_loss_with_a_slow_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    dm = _setup(batch_size=64)
    model = MLPClassifier(hidden=[32], lr=1e-2)
    before = _mean_loss(model, dm)
    updates = MultiFrequencyUpdates([Level("head", ["head.*"]), Level("backbone", ["backbone.*"], every=4)])
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=40,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[updates],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert updates.num_updates == {"head": 40, "backbone": 10}
    assert _mean_loss(model, dm) < 0.5 * before
    assert "val_acc" in trainer.callback_metrics
    assert "final validation accuracy: " in capsys.readouterr().out
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test_loss", "test_acc"} and 0.0 <= result["test_acc"] <= 1.0
