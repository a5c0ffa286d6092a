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
r"""
Digits
^^^^^^

scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes) as a
:class:`~lightning.pytorch.core.LightningDataModule` (:class:`DigitsDataModule`) and as a map-style
:class:`~torch.utils.data.Dataset` of one split (:class:`DigitsDataset`, for building continual-learning tasks). The
data ship inside scikit-learn, so nothing is downloaded: it is the real data set of the default recipe and of the
tests.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from nl_lightning._validation import check_float, check_int
from nl_lightning.data.sampling import EpochShuffleSampler

__all__ = ["DigitsDataModule", "DigitsDataset", "load_digits_tensors"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """Load scikit-learn's digits as tensors, scaled to ``[0, 1]``.

    Returns:
        The inputs, ``float32`` of shape ``(1797, 64)`` with values in ``[0, 1]``, and the labels, ``int64`` of shape
        ``(1797,)`` with values in ``0..9``.

    Example::

        x, y = load_digits_tensors()
        x.shape, y.shape  # (torch.Size([1797, 64]), torch.Size([1797]))

    """
    from sklearn.datasets import load_digits  # deferred: scikit-learn takes a moment to import

    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x, dtype=torch.float32) / 16.0, torch.as_tensor(y, dtype=torch.int64)


def stratified_split(labels: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split sample indices into train and validation, drawing ``val_fraction`` of every class into validation.

    Each class keeps at least one sample on each side (when it has two or more).

    Args:
        labels: The integer labels, shape ``(N,)``.
        val_fraction: The share of every class that goes to validation, in ``(0, 1)``.
        generator: The random generator that draws the split.

    Returns:
        The sorted train indices and the sorted validation indices.

    Example::

        train_idx, val_idx = stratified_split(y, 0.2, torch.Generator().manual_seed(0))

    """
    train, val = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = min(max(round(len(idx) * val_fraction), 1), max(len(idx) - 1, 0))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


class DigitsDataset(Dataset):
    """One split of scikit-learn's digits: 64 features in ``[0, 1]`` (8x8 pixels), labels ``0..9``, no download.

    The 1797 samples are split once per class (stratified): ``test_fraction`` of every class goes to the test part,
    drawn by a :class:`torch.Generator` seeded by ``seed``, never by the global seed. ``train=True`` and
    ``train=False`` with the same ``test_fraction`` and ``seed`` are disjoint and together hold all 1797 samples. The
    split is the one :class:`DigitsDataModule` makes with ``val_fraction=test_fraction`` and the same ``seed``.

    Args:
        train: The training part if ``True``, the test part otherwise.
        test_fraction: The share of every class in the test part, in ``(0, 1)``.
        seed: The seed of the split.

    Attributes:
        data: ``float32`` inputs in ``[0, 1]``, shape ``(N, 64)``, in the order of scikit-learn's data set.
        targets: ``int64`` labels in ``0..9``, shape ``(N,)``.
        classes: The class labels ``(0, 1, ..., 9)``.
        image_size: ``(8, 8)``.

    Raises:
        ValueError: If ``train`` is not a bool, ``test_fraction`` is not a number strictly between 0 and 1, or
            ``seed`` is not an integer.

    Example::

        from torch.utils.data import DataLoader

        train, test = DigitsDataset(train=True), DigitsDataset(train=False)
        x, y = train[0]  # x: float32 (64,), y: int64 0-dim tensor
        loader = DataLoader(train, batch_size=32, shuffle=True)

    """

    classes: tuple[int, ...] = tuple(range(10))
    image_size: tuple[int, int] = (8, 8)
    num_classes: int = 10

    def __init__(self, train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> None:
        if not isinstance(train, bool):
            raise ValueError(f"`train` must be a bool, got {train!r}; use True for the training part, False for test.")
        check_float("test_fraction", test_fraction, 0, 1, low_open=True, high_open=True, hint="use e.g. 0.2")
        check_int("seed", seed, None)
        self.train = train
        self.test_fraction = float(test_fraction)
        self.seed = seed
        x, y = load_digits_tensors()
        train_idx, test_idx = stratified_split(y, self.test_fraction, torch.Generator().manual_seed(seed))
        self.indices = train_idx if train else test_idx
        self.data = x[self.indices]
        self.targets = y[self.indices]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's handwritten digits: 64 features in ``[0, 1]`` (8x8 pixels), 10 classes, no download.

    The 1797 samples are split once, per class (stratified), with a :class:`torch.Generator` seeded by ``seed``: the
    split depends on ``seed`` only, never on the global seed. The training loader shuffles with an
    :class:`~nl_lightning.data.sampling.EpochShuffleSampler`: epoch ``e``'s order depends on ``(seed, e)`` only, so a
    run resumed at an epoch boundary sees the order the uninterrupted run would have seen. The validation, test (the
    validation split) and predict (its inputs) loaders do not shuffle.

    Args:
        batch_size: Samples per batch, ``>= 1``.
        val_fraction: The share of every class held out for validation and test, in ``(0, 1)``.
        seed: The seed of the split and of the training shuffle.
        num_workers: Worker processes per loader, ``>= 0``.

    Raises:
        MisconfigurationException: If ``batch_size < 1``, ``val_fraction`` is not in ``(0, 1)`` or
            ``num_workers < 0``.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.data import DigitsDataModule
        from nl_lightning.models import MLPClassifier

        dm = DigitsDataModule(batch_size=32)
        model = MLPClassifier(in_features=dm.num_features, num_classes=dm.num_classes)
        Trainer(max_epochs=20).fit(model, datamodule=dm)

    """

    num_features: int = 64
    num_classes: int = 10

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        error = MisconfigurationException
        check_int("batch_size", batch_size, hint="use e.g. 32", error=error)
        check_float("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True, hint="use e.g. 0.2", error=error)
        check_int("seed", seed, None, error=error)
        check_int("num_workers", num_workers, 0, hint="use 0 to load in the main process", error=error)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Optional[DigitsDataset] = None
        self.val_set: Optional[DigitsDataset] = None

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        self.train_set = DigitsDataset(train=True, test_fraction=self.val_fraction, seed=self.seed)
        self.val_set = DigitsDataset(train=False, test_fraction=self.val_fraction, seed=self.seed)

    def _loader(self, dataset: Optional[DigitsDataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DigitsDataModule: call `setup()` (the Trainer does) before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            # the loader draws its workers' base seed from this generator, never from the global one
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
