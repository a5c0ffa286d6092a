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
Task Streams
^^^^^^^^^^^^

Turn any map-style classification dataset into a sequence of tasks, the standard continual-learning scenarios of
van de Ven, Tuytelaars & Tolias (Nature Machine Intelligence 2022):

- ``class_incremental``: the classes are split into tasks (in a seeded order); one head over all classes, no task id
  needed at test time;
- ``task_incremental``: the same split, and the task id travels with every sample so a model can restrict its
  logits to the task's classes;
- ``permuted``: every task holds all classes with its own fixed pixel permutation (task 0: the identity);
- ``rotated``: every task holds all classes rotated by its own angle.

A whole stream trains in **one** ``trainer.fit``: the training loader of epoch ``e`` serves task
``e // epochs_per_task`` (so the Trainer needs ``reload_dataloaders_every_n_epochs=1`` and
``max_epochs = num_tasks * epochs_per_task``), checkpoints resume mid-stream, and callbacks see the task boundaries
through :meth:`TaskStreamDataModule.stage_at_epoch_end`. Every batch is ``[x, y, task]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from typing_extensions import override

from nl_lightning._validation import check_choice, check_int, check_unit, is_int
from nl_lightning.data.sampling import EpochShuffleSampler

__all__ = ["Scenario", "TaskStreamDataModule"]

Scenario = Literal["class_incremental", "task_incremental", "permuted", "rotated"]
_SCENARIOS = ("class_incremental", "task_incremental", "permuted", "rotated")


def _divisors(n: int) -> list[int]:
    """The task counts that split ``n`` classes evenly."""
    return [k for k in range(1, n + 1) if n % k == 0]


def dataset_targets(dataset: Dataset) -> Tensor:
    """The integer labels of a map-style dataset: its ``targets`` attribute, else read item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(targets, dtype=torch.int64)


class _TaskView(Dataset):
    """The samples ``indices`` of ``base`` as items ``(x, y, task)``; the task's input transform runs per batch."""

    def __init__(self, base: Dataset, indices: Tensor, task: int) -> None:
        self.base, self.indices, self.task = base, indices, task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x, y = self.base[int(self.indices[i])][:2]
        return torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64), self.task


class _TaskCollate:
    """Stack ``(x, y, task)`` items into ``[x, y, task]`` and apply each task's input transform to its rows."""

    def __init__(self, permutations: Optional[Tensor], angles: Optional[Tensor], image_size: Optional[tuple[int, int]]):
        self.permutations, self.angles, self.image_size = permutations, angles, image_size

    def __call__(self, items: list[tuple[Tensor, Tensor, int]]) -> list[Tensor]:
        x = torch.stack([item[0] for item in items])
        y = torch.stack([item[1] for item in items])
        task = torch.tensor([item[2] for item in items], dtype=torch.int64)
        if self.permutations is not None or self.angles is not None:
            x = x.clone()
            for t in task.unique().tolist():
                rows = task == t
                x[rows] = self.transform(x[rows], t)
        return [x, y, task]

    def transform(self, x: Tensor, task: int) -> Tensor:
        """Task ``task``'s input transform on a batch ``x`` (batch, ...)."""
        if self.permutations is not None:
            return permute_pixels(x, self.permutations[task])
        if self.angles is not None:
            assert self.image_size is not None
            return rotate_images(x, float(self.angles[task]), self.image_size)
        return x


def permute_pixels(x: Tensor, permutation: Tensor) -> Tensor:
    """Apply one fixed pixel permutation to every sample of ``x`` (batch, ...)."""
    return x.flatten(1)[:, permutation].view_as(x)


def rotate_images(x: Tensor, degrees: float, image_size: tuple[int, int]) -> Tensor:
    """Rotate every image of ``x`` by ``degrees`` about its centre (bilinear, zero padding).

    ``x`` is ``(batch, H * W)``, ``(batch, H, W)`` or ``(batch, C, H, W)``; the result has the shape of ``x``.
    """
    if degrees == 0.0:
        return x
    h, w = image_size
    images = x.reshape(x.shape[0], -1, h, w).float()  # (batch, C, H, W)
    rad = math.radians(degrees)
    rotation = torch.tensor([[math.cos(rad), -math.sin(rad), 0.0], [math.sin(rad), math.cos(rad), 0.0]])
    grid = F.affine_grid(rotation.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape).to(x.dtype)


class TaskStreamDataModule(pl.LightningDataModule):
    """A sequence of classification tasks built from a map-style dataset, served one task per training phase.

    Args:
        train_dataset: Map-style dataset of ``(x, y)`` items with integer labels (a ``targets`` attribute is used if
            present), for example :class:`~nl_lightning.data.DigitsDataset` or
            :class:`~nl_lightning.data.FashionMNIST`.
        test_dataset: The held-out items, split into tasks the same way; the accuracy matrix is measured on them.
        scenario: ``"class_incremental"``, ``"task_incremental"``, ``"permuted"`` or ``"rotated"``.
        num_tasks: The number of tasks ``T``.
        classes_per_task: For the split scenarios, the classes of each task (default: all classes divided evenly).
        epochs_per_task: Epochs over each task before the next one starts (offline protocol); 1 for online.
        batch_size: Training batch size (online protocol: small, e.g. 10).
        protocol: ``"offline"`` (several epochs allowed) or ``"online"`` (a single pass: ``epochs_per_task`` must
            be 1).
        val_fraction: Share of each task's training samples held out for the validation loaders (0 for none).
        samples_per_task: Keep at most this many training samples per task (drawn by ``seed``); ``None`` keeps all.
        joint: Train on the union of all tasks at once (the upper bound) for ``epochs_per_task`` epochs.
        seed: Seeds the class order of the split scenarios, the permutations, the order of the rotation angles, the
            validation split and the shuffling (epoch ``e`` of a task is shuffled by ``(seed, task, e)`` only, so a
            resumed run keeps the order).
        class_order: An explicit class order for the split scenarios (overrides the seeded one).
        image_size: ``(H, W)`` of the images for ``rotated`` (default: the dataset's ``image_size`` attribute).
        max_rotation: Task ``k`` of ``rotated`` turns by one of the angles ``k * max_rotation / num_tasks``.
        eval_batch_size: Batch size of the validation, test and evaluation loaders.
        num_workers: Worker processes per loader.

    The constructor only checks its arguments; the data are read and split into tasks at ``setup`` (or at the first
    use of a loader or of ``task_classes``, ``permutations``, ``angles``).

    Raises:
        MisconfigurationException: At construction on an unknown scenario or protocol, a non-positive count or
            ``online`` with several epochs; at ``setup`` when the classes do not split into the tasks (the message
            says which ``num_tasks`` or ``classes_per_task`` would), ``rotated`` has no image size, a task has no
            training samples (all went to validation, or ``train_dataset`` holds none of its classes) or no test
            samples, the Trainer does not reload the training loader every epoch, or its ``max_epochs`` does not
            cover the stream.

    Warns:
        UserWarning: At ``setup`` when ``num_tasks * classes_per_task`` is less than the number of classes in the
            order: the left-out classes are named (they are never trained or evaluated). Pass ``class_order``
            listing only the classes to keep to leave classes out on purpose.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.data import DigitsDataset, TaskStreamDataModule

        dm = TaskStreamDataModule(DigitsDataset(train=True), DigitsDataset(train=False), num_tasks=5, epochs_per_task=3)
        trainer = Trainer(max_epochs=dm.expected_epochs, reload_dataloaders_every_n_epochs=1)

    """

    def __init__(
        self,
        train_dataset: Dataset,
        test_dataset: Dataset,
        scenario: Scenario = "class_incremental",
        num_tasks: int = 5,
        classes_per_task: Optional[int] = None,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        protocol: Literal["offline", "online"] = "offline",
        val_fraction: float = 0.1,
        samples_per_task: Optional[int] = None,
        joint: bool = False,
        seed: int = 0,
        class_order: Optional[Sequence[int]] = None,
        image_size: Optional[tuple[int, int]] = None,
        max_rotation: float = 180.0,
        eval_batch_size: int = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        error = MisconfigurationException
        check_choice("scenario", scenario, _SCENARIOS, error=error)
        check_choice("protocol", protocol, ("offline", "online"), error=error)
        for name, value in (("num_tasks", num_tasks), ("epochs_per_task", epochs_per_task),
                            ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):  # fmt: skip
            check_int(name, value, error=error)
        check_int("num_workers", num_workers, 0, hint="use 0 to load in the main process", error=error)
        if protocol == "online" and epochs_per_task != 1:
            raise MisconfigurationException(
                f"The online protocol is a single pass over each task: set epochs_per_task=1, got {epochs_per_task}."
            )
        check_unit("val_fraction", val_fraction, closed=False, error=error)
        if samples_per_task is not None:
            check_int("samples_per_task", samples_per_task, hint="or None to keep every sample", error=error)
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.scenario: Scenario = scenario
        self.num_tasks, self.epochs_per_task = num_tasks, epochs_per_task
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.protocol, self.val_fraction, self.samples_per_task = protocol, float(val_fraction), samples_per_task
        self.joint, self.seed, self.max_rotation = joint, seed, float(max_rotation)
        self._class_order = list(class_order) if class_order is not None else None
        self._classes_per_task = classes_per_task
        self._image_size = tuple(image_size) if image_size is not None else None
        self._built = False
        self._manual_task = 0

    def _build(self) -> None:
        """Split the data into tasks (once). Deferred from ``__init__`` so that building the module reads no data."""
        if self._built:
            return
        train_targets, test_targets = dataset_targets(self.train_dataset), dataset_targets(self.test_dataset)
        self._num_classes = int(max(train_targets.max(), test_targets.max())) + 1
        gen = torch.Generator().manual_seed(self.seed)
        self._task_classes: Optional[list[list[int]]] = None
        self._permutations: Optional[Tensor] = None
        self._angles: Optional[Tensor] = None
        if self._image_size is None:
            self._image_size = getattr(self.train_dataset, "image_size", None)
        if self.scenario in ("class_incremental", "task_incremental"):
            self._task_classes = self._split_classes(self._class_order, self._classes_per_task, gen)
        elif self.scenario == "permuted":
            num_features = torch.as_tensor(self.train_dataset[0][0]).numel()
            shuffled = [torch.randperm(num_features, generator=gen) for _ in range(1, self.num_tasks)]
            self._permutations = torch.stack([torch.arange(num_features), *shuffled])
        else:
            if self._image_size is None:
                raise MisconfigurationException(
                    "scenario='rotated' needs the image size: pass image_size=(H, W) or use a dataset with an"
                    " `image_size` attribute."
                )
            steps = torch.randperm(self.num_tasks, generator=gen)
            self._angles = steps.double() * self.max_rotation / self.num_tasks
        self._collate = _TaskCollate(self._permutations, self._angles, self._image_size)  # type: ignore[arg-type]
        self._train_idx: list[Tensor] = []
        self._val_idx: list[Tensor] = []
        self._test_idx: list[Tensor] = []
        for task in range(self.num_tasks):
            train_idx = self._indices_of(train_targets, task)
            train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)]
            if self.samples_per_task is not None:
                train_idx = train_idx[: self.samples_per_task]
            n_val = int(round(len(train_idx) * self.val_fraction))
            self._val_idx.append(train_idx[:n_val].sort().values)
            self._train_idx.append(train_idx[n_val:].sort().values)
            self._test_idx.append(self._indices_of(test_targets, task))
        self._check_tasks_have_samples()
        self._built = True

    def _describe_task(self, task: int) -> str:
        if self._task_classes is None:
            return f"task {task}"
        return f"task {task} (classes {self._task_classes[task]})"

    def _check_tasks_have_samples(self) -> None:
        """Every task needs training samples (else the sampler fails) and test samples (else it is never measured)."""
        for task in range(self.num_tasks):
            n_train, n_val = len(self._train_idx[task]), len(self._val_idx[task])
            if n_train == 0:
                kept = n_train + n_val
                if kept == 0:
                    cause, fix = (
                        "train_dataset holds no sample of it",
                        "give a train_dataset with samples of every class, or pass `class_order` listing only the"
                        " classes it holds",
                    )
                else:
                    cause = f"all {kept} of its samples went to validation (val_fraction={self.val_fraction}"
                    cause += f", samples_per_task={self.samples_per_task})" if self.samples_per_task else ")"
                    fix = "lower val_fraction (0 keeps every sample for training)"
                    if self.samples_per_task is not None:
                        needed = next(m for m in range(1, 10**9) if m - int(round(m * self.val_fraction)) >= 1)
                        fix += f" or set samples_per_task >= {needed}"
                raise MisconfigurationException(
                    f"TaskStreamDataModule: {self._describe_task(task)} has no training samples: {cause}. Fix: {fix}."
                )
            if len(self._test_idx[task]) == 0:
                raise MisconfigurationException(
                    f"TaskStreamDataModule: {self._describe_task(task)} has no test samples: test_dataset holds no"
                    " sample of it, so it could never be evaluated. Give a test_dataset with samples of every task's"
                    " classes, or pass `class_order` listing only the classes that test_dataset holds."
                )

    @property
    def num_classes(self) -> int:
        """The number of classes (the largest label + 1)."""
        self._build()
        return self._num_classes

    @property
    def task_classes(self) -> Optional[list[list[int]]]:
        """The classes of each task in the split scenarios, ``None`` in the domain-incremental ones."""
        self._build()
        return self._task_classes

    @property
    def permutations(self) -> Optional[Tensor]:
        """``(num_tasks, num_features)``: each task's pixel permutation (``permuted`` only; task 0 the identity)."""
        self._build()
        return self._permutations

    @property
    def angles(self) -> Optional[Tensor]:
        """Each task's rotation in degrees (``rotated`` only)."""
        self._build()
        return self._angles

    @property
    def image_size(self) -> Optional[tuple[int, int]]:
        """``(H, W)`` of the images, if known."""
        self._build()
        return self._image_size  # type: ignore[return-value]

    def _split_classes(
        self, class_order: Optional[Sequence[int]], classes_per_task: Optional[int], gen: torch.Generator
    ) -> list[list[int]]:
        if class_order is None:
            class_order = torch.randperm(self._num_classes, generator=gen).tolist()
        order = list(class_order)
        if sorted(order) != sorted(set(order)) or any(c < 0 or c >= self._num_classes for c in order):
            raise MisconfigurationException(f"`class_order` must list distinct classes in 0..{self._num_classes - 1}.")
        n = len(order)
        if self.num_tasks > n:
            raise MisconfigurationException(
                f"num_tasks={self.num_tasks} is more than the {n} classes: every task of a split scenario needs at"
                f" least one class. Set num_tasks to at most {n} (one that divides {n} evenly: {_divisors(n)}), or use"
                " scenario='permuted' or 'rotated', whose tasks each hold all the classes."
            )
        if classes_per_task is None:
            if n % self.num_tasks:
                raise MisconfigurationException(
                    f"{n} classes do not split evenly into num_tasks={self.num_tasks}: set num_tasks to one of"
                    f" {_divisors(n)}, or set classes_per_task={n // self.num_tasks} to train"
                    f" {n // self.num_tasks * self.num_tasks} of the {n} classes (the others are left out)."
                )
            classes_per_task = n // self.num_tasks
        if not is_int(classes_per_task) or classes_per_task < 1 or classes_per_task * self.num_tasks > n:
            raise MisconfigurationException(
                f"classes_per_task={classes_per_task!r} x num_tasks={self.num_tasks} needs more than the {n} classes"
                f" available: set classes_per_task to an integer in 1..{n // self.num_tasks}, or lower num_tasks."
            )
        used = classes_per_task * self.num_tasks
        if used < n:
            left_out = sorted(order[used:])
            rank_zero_warn(
                f"TaskStreamDataModule: classes_per_task={classes_per_task} x num_tasks={self.num_tasks} uses {used}"
                f" of the {n} classes, so class(es) {left_out} are in no task: never trained and never evaluated. To"
                f" use every class, set num_tasks and classes_per_task so that their product is {n}; to leave classes"
                " out on purpose (and silence this warning), pass `class_order` listing only the classes to keep.",
                category=UserWarning,
            )
        return [sorted(order[k * classes_per_task : (k + 1) * classes_per_task]) for k in range(self.num_tasks)]

    def _indices_of(self, targets: Tensor, task: int) -> Tensor:
        if self._task_classes is None:
            return torch.arange(len(targets))
        return torch.nonzero(torch.isin(targets, torch.tensor(self._task_classes[task]))).flatten()

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def expected_epochs(self) -> int:
        """The ``max_epochs`` that covers the stream: ``num_tasks * epochs_per_task`` (``epochs_per_task`` if joint)."""
        return self.epochs_per_task if self.joint else self.num_tasks * self.epochs_per_task

    def task_at_epoch(self, epoch: int) -> int:
        """The task trained during ``epoch`` (the last task for a joint run)."""
        if self.joint:
            return self.num_tasks - 1
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def stage_at_epoch_end(self, epoch: int) -> Optional[int]:
        """The stage completed at the end of ``epoch``: ``k`` once ``k`` tasks are trained, else ``None``.

        A joint run completes a single stage, ``num_tasks``, at its last epoch.
        """
        if (epoch + 1) % self.epochs_per_task or epoch + 1 > self.expected_epochs:
            return None
        return self.num_tasks if self.joint else (epoch + 1) // self.epochs_per_task

    @property
    def current_task(self) -> int:
        """The task being trained: from the Trainer's epoch when attached to one, else the one set by
        :meth:`set_task`."""
        trainer = self._trainer
        if trainer is not None:
            return self.task_at_epoch(trainer.current_epoch)
        return self._manual_task

    def set_task(self, task: int) -> None:
        """Select the task served by :meth:`train_dataloader` outside a Trainer."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in 0..{self.num_tasks - 1}, got {task}.")
        self._manual_task = task

    # ------------------------------------------------------------------------------------------------ loaders
    @override
    def setup(self, stage: str) -> None:
        self._build()
        trainer = self._trainer
        if stage != "fit" or trainer is None:
            return
        if not self.joint and self.num_tasks > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise MisconfigurationException(
                "TaskStreamDataModule serves one task per phase of epochs, so the Trainer must ask for the training"
                " loader every epoch: set `reload_dataloaders_every_n_epochs=1`."
            )
        if trainer.max_steps == -1 and trainer.max_epochs != self.expected_epochs:
            raise MisconfigurationException(
                f"The stream is {self.expected_epochs} epochs long ({self.num_tasks} tasks x {self.epochs_per_task}"
                f" epochs{', joint' if self.joint else ''}) but the Trainer has max_epochs={trainer.max_epochs}:"
                f" set max_epochs={self.expected_epochs}."
            )

    def task_dataset(self, task: int, split: Literal["train", "val", "test"] = "train") -> Dataset:
        """Task ``task``'s samples of ``split`` as ``(x, y, task)`` items (inputs untransformed; see the loaders)."""
        self._build()
        base = self.test_dataset if split == "test" else self.train_dataset
        indices = {"train": self._train_idx, "val": self._val_idx, "test": self._test_idx}[split][task]
        return _TaskView(base, indices, task)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle_seed: Optional[int] = None) -> DataLoader:
        """A loader over ``dataset``; with ``shuffle_seed``, epoch ``e`` is shuffled by ``(shuffle_seed, e)`` only."""
        self._build()
        sampler = None
        if shuffle_seed is not None:
            sampler = EpochShuffleSampler(len(dataset), shuffle_seed)  # type: ignore[arg-type]
            sampler.set_epoch(self._epoch())  # Lightning sets it again at the epoch's start
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # the loader draws its workers' base seed from this generator, never from the global one
            generator=torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        if self.joint:
            dataset: Dataset = ConcatDataset([self.task_dataset(t) for t in range(self.num_tasks)])
            return self._loader(dataset, self.batch_size, shuffle_seed=self.seed)
        task = self.current_task
        return self._loader(self.task_dataset(task), self.batch_size, shuffle_seed=self.seed + 1000 * task)

    def _epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @override
    def val_dataloader(self) -> list[DataLoader]:
        if self.val_fraction == 0:
            return []
        return [self.eval_dataloader(t, "val") for t in range(self.num_tasks)]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(t, "test") for t in range(self.num_tasks)]

    def eval_dataloader(
        self, task: int, split: Literal["train", "val", "test"] = "test", rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """An unshuffled loader over task ``task``'s ``split``; with ``world_size > 1`` only this rank's share."""
        dataset = self.task_dataset(task, split)
        if world_size > 1:
            view = dataset
            assert isinstance(view, _TaskView)
            dataset = _TaskView(view.base, view.indices[rank::world_size], task)
        return self._loader(dataset, self.eval_batch_size)

    def logit_mask(self, device: Optional[torch.device] = None) -> Optional[Tensor]:
        """For ``task_incremental``, a ``(num_tasks, num_classes)`` bool mask of each task's classes; else ``None``."""
        if self.scenario != "task_incremental" or self.task_classes is None:
            return None
        mask = torch.zeros(self.num_tasks, self.num_classes, dtype=torch.bool, device=device)
        for t, classes in enumerate(self.task_classes):
            mask[t, classes] = True
        return mask

    @property
    def _trainer(self) -> Optional[pl.Trainer]:
        return getattr(self, "trainer", None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"manual_task": self._manual_task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._manual_task = int(state_dict.get("manual_task", 0))
