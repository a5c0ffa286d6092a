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
"""Bad data and bad paths are reported early, by name, with a fix: task streams, IDX files, recipes, checkpoints."""

from __future__ import annotations

import gzip
import re
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import TensorDataset

import nl_lightning
from nl_lightning import cli
from nl_lightning.cli import list_recipes, main
from nl_lightning.data import TaskStreamDataModule, TextDataModule, read_idx
from nl_lightning.data.text import load_corpus

DIGITS = Path(nl_lightning.__file__).parent / "recipes" / "digits_multifrequency.yaml"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _labelled(num_classes: int, per_class: int, skip: tuple[int, ...] = ()) -> TensorDataset:
    """``per_class`` samples (4 features) of each class in ``0..num_classes-1`` except ``skip``."""
    y = torch.tensor([c for c in range(num_classes) if c not in skip for _ in range(per_class)])
    return TensorDataset(torch.randn(len(y), 4), y)


# --------------------------------------------------------------------------------------------------- task streams
def test_left_out_classes_are_named_in_a_warning():
    dm = TaskStreamDataModule(_labelled(10, 3), _labelled(10, 2), num_tasks=3, classes_per_task=3, val_fraction=0)
    with pytest.warns(UserWarning, match="uses 9 of the 10 classes") as record:
        dm.setup("fit")
    (left_out,) = set(range(10)) - {c for task in dm.task_classes for c in task}
    message = str(record[0].message)
    assert f"class(es) [{left_out}] are in no task" in message
    assert "never trained and never evaluated" in message and "class_order" in message
    # Leaving classes out on purpose, through `class_order`, is silent.
    dm = TaskStreamDataModule(
        _labelled(10, 3), _labelled(10, 2), num_tasks=3, classes_per_task=3, class_order=list(range(9)), val_fraction=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    assert dm.task_classes == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_task_without_training_samples_fails_at_setup_with_a_working_fix():
    data = _labelled(10, 20)
    dm = TaskStreamDataModule(data, _labelled(10, 2), num_tasks=5, samples_per_task=1, val_fraction=0.9)
    with pytest.raises(MisconfigurationException, match=r"task 0 \(classes \[.*\]\) has no training samples") as err:
        dm.setup("fit")
    message = str(err.value)
    assert "val_fraction=0.9" in message and "samples_per_task=1" in message
    needed = int(re.search(r"samples_per_task >= (\d+)", message).group(1))
    fixed = TaskStreamDataModule(data, _labelled(10, 2), num_tasks=5, samples_per_task=needed, val_fraction=0.9)
    fixed.setup("fit")  # the advice works: every task keeps a training sample
    assert all(len(fixed.task_dataset(t)) >= 1 for t in range(5))
    assert next(iter(fixed.train_dataloader()))[0].shape[0] >= 1


def test_task_with_no_test_samples_fails_at_setup():
    dm = TaskStreamDataModule(_labelled(10, 4), _labelled(10, 2, skip=(8, 9)), num_tasks=5, class_order=range(10))
    with pytest.raises(MisconfigurationException, match=r"task 4 \(classes \[8, 9\]\) has no test samples"):
        dm.setup("fit")


def test_more_tasks_than_classes_gives_advice_that_can_work():
    dm = TaskStreamDataModule(_labelled(10, 2), _labelled(10, 2), num_tasks=12)
    with pytest.raises(MisconfigurationException, match="num_tasks=12 is more than the 10 classes") as err:
        dm.setup("fit")
    assert "set classes_per_task" not in str(err.value)  # no classes_per_task can give 12 tasks of 10 classes
    assert "at most 10" in str(err.value) and "permuted" in str(err.value)


def test_uneven_split_names_the_task_counts_that_divide():
    dm = TaskStreamDataModule(_labelled(10, 2), _labelled(10, 2), num_tasks=3)
    with pytest.raises(MisconfigurationException, match=r"num_tasks to one of \[1, 2, 5, 10\].*classes_per_task=3"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------------- IDX files
def test_damaged_gzip_names_the_file(tmp_path):
    payload = bytes([0, 0, 8, 1]) + (4000).to_bytes(4, "big") + bytes(range(200)) * 20
    raw = bytearray(gzip.compress(payload, mtime=0))
    raw[10] ^= 0xFF  # the first byte after the 10-byte gzip header: the deflate stream is invalid (a zlib.error)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz' is damaged") as err:
        read_idx(path)
    assert "Replace it" in str(err.value)


# --------------------------------------------------------------------------------------------------- text paths
def test_directory_as_text_path_says_it_is_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    for call in (lambda: load_corpus(tmp_path), lambda: load_corpus([tmp_path / "a.txt", tmp_path]),
                 lambda: TextDataModule(paths=str(tmp_path))):  # fmt: skip
        with pytest.raises(IsADirectoryError, match="is a directory, not a text file") as err:
            call()
        assert str(tmp_path) in str(err.value) and "list" in str(err.value)


# --------------------------------------------------------------------------------------------------- command line
@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize("flag", [["--config", "no_such_recipe"], ["--config=no_such_recipe.yaml"]])
def test_unknown_config_lists_the_bundled_recipes(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage" not in err.lower() and len(err.strip().splitlines()) == 1  # one line, not the whole usage
    assert "no_such_recipe" in err and "is neither a file nor a bundled recipe" in err
    assert all(name in err for name in list_recipes())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint of a 1-step digits fit through the CLI."""
    root = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["nl-lightning"])
        mp.chdir(root)
        main(["fit", "--config", str(DIGITS), "--trainer.max_steps=1", *QUIET, f"--trainer.default_root_dir={root}"])
    (path,) = root.rglob("*.ckpt")
    return path


def _damage(good: Path, kind: str, folder: Path) -> Path:
    raw = bytearray(good.read_bytes())
    if kind == "truncated":
        raw = raw[: len(raw) // 2]
    elif kind == "corrupt":  # flip bytes inside the largest stored tensor; torch.load itself would accept this
        with zipfile.ZipFile(good) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
        raw[start : start + 16] = bytes(b ^ 0xFF for b in raw[start : start + 16])
    else:  # "empty"
        raw = bytearray()
    path = folder / f"{kind}.ckpt"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.usefixtures("_isolated")
@pytest.mark.parametrize("kind", ["truncated", "corrupt", "empty"])
def test_damaged_ckpt_path_is_named_before_fit(checkpoint, tmp_path, kind):
    bad = _damage(checkpoint, kind, tmp_path)
    args = ["fit", "--config", str(DIGITS), "--trainer.max_steps=2", *QUIET, f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(ValueError, match=rf"The checkpoint '.*{kind}\.ckpt' is damaged") as err:
        main([*args, f"--ckpt_path={bad}"])
    assert "leave ckpt_path out" in str(err.value)


def test_check_checkpoint_intact_legacy_and_directory(checkpoint, tmp_path):
    cli.check_checkpoint(checkpoint)  # an intact Lightning checkpoint passes
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.arange(1000.0)}, legacy, _use_new_zipfile_serialization=False)
    cli.check_checkpoint(legacy)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"legacy\.ckpt' is damaged"):
        cli.check_checkpoint(legacy)
    with pytest.raises(IsADirectoryError, match="is a directory: pass a checkpoint file inside it"):
        cli.check_checkpoint(tmp_path)
    cli.check_checkpoint(tmp_path / "missing.ckpt")  # missing files and names like 'last' are Lightning's to resolve
    cli.check_checkpoint("last")
