# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Resumed runs see the data in the order of the uninterrupted run: epoch ``e``'s shuffle depends on ``(seed, e)``.

A run killed at an epoch boundary and resumed from its checkpoint builds fresh loaders; each bundled data module must
give them epoch ``e``'s order once Lightning calls ``set_epoch(e)`` on their samplers (as its fit loop does at every
epoch start, after a resume too), not epoch 0's.
"""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils._pytree import tree_leaves

from nl_lightning.cli import main
from nl_lightning.data import (
    DigitsDataModule,
    DigitsDataset,
    MQARDataModule,
    NeedleDataModule,
    SlowlyChangingRegressionDataModule,
    TaskStreamDataModule,
    TextDataModule,
    TextDomainsDataModule,
)
from nl_lightning.data.sampling import EpochShuffleSampler

EPOCHS = 3


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run from an empty directory with a bare ``sys.argv``: no logs or ``config.yaml`` land in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])


def _epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
    """Every tensor of ``loader``'s epoch ``epoch``, after the ``set_epoch`` Lightning's fit loop makes."""
    _set_sampler_epoch(loader, epoch)
    return [t for batch in loader for t in tree_leaves(batch)]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _check_resumed_order(make_loader, shuffles: bool = True) -> None:
    """A fresh loader at epoch ``e`` (a resume) yields what one loader kept over epochs ``0..e`` yields at ``e``."""
    kept = make_loader()
    uninterrupted = [_epoch_batches(kept, e) for e in range(EPOCHS)]
    for e in range(EPOCHS):
        _assert_same(_epoch_batches(make_loader(), e), uninterrupted[e])
    if shuffles:  # the shuffle changes from epoch to epoch (else the check above proves nothing)
        first = torch.cat([t.flatten().float() for t in uninterrupted[0]])
        assert all(not torch.equal(first, torch.cat([t.flatten().float() for t in u])) for u in uninterrupted[1:])


def _ready(dm):
    dm.setup("fit")
    return dm


def test_sampler_is_a_permutation_keyed_by_seed_and_epoch():
    s = EpochShuffleSampler(50, seed=3)
    first = list(s)
    assert sorted(first) == list(range(50)) and len(s) == 50
    assert list(s) == first  # no hidden state advances between iterations
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(50)) and second != first
    fresh = EpochShuffleSampler(50, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == second
    assert list(EpochShuffleSampler(50, seed=4)) != first
    with pytest.raises(ValueError, match="num_samples"):
        EpochShuffleSampler(0)
    with pytest.raises(ValueError, match="seed"):
        EpochShuffleSampler(5, seed=1.5)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_digits_resumes_the_order():
    dm = _ready(DigitsDataModule(batch_size=64, seed=2))
    _check_resumed_order(dm.train_dataloader)


def test_digits_order_does_not_touch_the_global_generator():
    dm = _ready(DigitsDataModule(batch_size=256))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch_batches(dm.train_dataloader(), 1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("cls", [MQARDataModule, NeedleDataModule])
def test_synthetic_resumes_the_order(cls):
    dm = _ready(cls(seq_len=32, vocab_size=32, batch_size=8, train_samples=40, val_samples=4, seed=1))
    _check_resumed_order(dm.train_dataloader)


def test_regression_stream_is_in_order_every_epoch():
    dm = _ready(SlowlyChangingRegressionDataModule(num_steps=30, change_every=10, batch_size=4))
    _check_resumed_order(dm.train_dataloader, shuffles=False)


def test_text_resumes_the_crops():
    dm = _ready(TextDataModule(seq_len=16, batch_size=4, samples_per_epoch=12, seed=1))
    _check_resumed_order(dm.train_dataloader)


def test_text_domains_resume_the_crops(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 40)
    (tmp_path / "b.txt").write_text("one two three four five " * 40)
    dm = TextDomainsDataModule(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], seq_len=8, batch_size=4, samples_per_epoch=12, seed=1
    )
    _ready(dm)
    _check_resumed_order(dm.train_dataloader)


@pytest.mark.parametrize("joint", [False, True], ids=["per_task", "joint"])
def test_task_stream_resumes_the_order(joint):
    train, test = DigitsDataset(train=True), DigitsDataset(train=False)
    dm = TaskStreamDataModule(train, test, num_tasks=2, batch_size=64, joint=joint, seed=1)
    _ready(dm)
    _check_resumed_order(dm.train_dataloader)


def _fit(recipe: str, args: list[str]) -> dict[str, torch.Tensor]:
    cli = main(["fit", "--config", recipe, *args])
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.mark.parametrize(
    ("recipe", "epochs", "data_args"),
    [
        ("digits_multifrequency", 3, ["--data.init_args.batch_size=128"]),
        # one loader per epoch (the stream reloads it): 5 tasks of 1 epoch
        ("split_digits_class_il_naive", 5, ["--data.init_args.epochs_per_task=1"]),
    ],
    ids=["digits", "task_stream"],
)
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resume writes there too
def test_cli_resume_at_an_epoch_boundary_is_bit_exact(tmp_path, recipe, epochs, data_args):
    """Kill after epoch 1 (its checkpoint is all that is left) and resume: the parameters match bit for bit."""
    common = [
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_val_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=true",
        *data_args,
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpts'}",
        "--trainer.callbacks.filename={epoch}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.every_n_epochs=1",
    ]
    uninterrupted = _fit(recipe, common)
    at_boundary = tmp_path / "ckpts" / "epoch=1.ckpt"  # written at the end of epoch 1, with epochs left to run
    start = torch.load(at_boundary, map_location="cpu", weights_only=False)["state_dict"]
    resumed = _fit(recipe, [*common, f"--ckpt_path={at_boundary}"])
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # The resume did change the parameters (it trained the remaining epochs rather than stopping at once).
    assert any(not torch.equal(start[k], uninterrupted[k]) for k in uninterrupted)
