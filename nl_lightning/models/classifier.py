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
MLP Classifier
^^^^^^^^^^^^^^

A small classifier split into a ``backbone`` and a ``head``, the two levels of the simplest nested learner: the
head learns every step, the backbone (the slow, persistent level) once per ``C`` steps with
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates` and the globs ``"head.*"`` and ``"backbone.*"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from nl_lightning._validation import check_int, check_nonnegative, check_positive

__all__ = ["MLPClassifier"]


class MLPClassifier(pl.LightningModule):
    """An MLP classifier: ``backbone`` (``Linear`` + ``GELU`` blocks) followed by a linear ``head``.

    The parameter names start with ``backbone.`` or ``head.``, so ``Level("backbone", ["backbone.*"], every=8)`` and
    ``Level("head", ["head.*"])`` select the two parts. It trains with AdamW on the cross-entropy, logs
    ``train_loss``, ``val_loss`` / ``val_acc`` and ``test_loss`` / ``test_acc``, and prints the final validation
    accuracy when ``fit`` ends.

    Batches are ``(x, y)`` or, from a :class:`~nl_lightning.data.TaskStreamDataModule`, ``(x, y, task)``. With
    ``mask_by_task=True`` (task-incremental learning) the logits of classes outside a sample's task are masked to
    ``-inf`` in training and evaluation, using the data module's task classes (a shared head with masked logits).

    Args:
        in_features: Input features per sample, ``>= 1``.
        num_classes: Number of classes, ``>= 1``.
        hidden: The widths of the backbone's hidden layers, each ``>= 1``. Empty makes a linear classifier with an
            empty backbone. ``None`` means ``(128, 128)``.
        lr: AdamW learning rate, ``> 0`` (used only when ``optimizer`` is ``None``).
        weight_decay: AdamW (decoupled) weight decay, ``>= 0`` (used only when ``optimizer`` is ``None``).
        mask_by_task: Restrict each sample's logits to its task's classes (needs ``(x, y, task)`` batches and a data
            module with a ``logit_mask()`` method, such as a task-incremental ``TaskStreamDataModule``).
        optimizer: A callable that builds the optimizer from parameter groups; in YAML a ``class_path`` with
            ``init_args``, for example ``nl_lightning.optim.M3`` or ``torch.optim.SGD``. It receives two named groups,
            ``{"name": "backbone", ...}`` and ``{"name": "head", ...}`` (an empty backbone is left out), so a rule or a
            level can target either alone. ``None``: ``AdamW(lr=lr, weight_decay=weight_decay)`` on the same groups.

    Raises:
        MisconfigurationException: If ``in_features`` or ``num_classes`` is below 1, a hidden width is below 1,
            ``lr <= 0`` or ``weight_decay < 0``.

    Example::

        model = MLPClassifier(in_features=64, num_classes=10, hidden=[128, 128])
        logits = model(torch.rand(8, 64))  # (8, 10)
        [name for name, _ in model.named_parameters()]  # ['backbone.0.weight', ..., 'head.weight', 'head.bias']

    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Optional[Sequence[int]] = (128, 128),
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        mask_by_task: bool = False,
        optimizer: Optional[OptimizerCallable] = None,
    ) -> None:
        super().__init__()
        hidden = (128, 128) if hidden is None else tuple(hidden)
        error = MisconfigurationException
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            check_int(name, value, error=error)
        for i, width in enumerate(hidden):
            hint = f"hidden={list(hidden)}; use e.g. [128, 128] (or [] for a linear classifier)"
            check_int(f"hidden[{i}]", width, hint=hint, error=error)
        check_positive("lr", lr, hint="use e.g. 1e-3", error=error)
        check_nonnegative("weight_decay", weight_decay, hint="use 0 to disable it", error=error)
        self.save_hyperparameters(ignore=["optimizer"])  # a callable: checkpoints hold tensors and primitives only
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.mask_by_task = mask_by_task
        self._logit_mask: Optional[Tensor] = None  # (num_tasks, num_classes) bool, from the data module

        blocks: list[nn.Module] = []
        width = in_features
        for out in hidden:
            blocks += [nn.Linear(width, out), nn.GELU()]
            width = out
        self.backbone = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Map inputs ``(batch, in_features)`` to logits ``(batch, num_classes)``."""
        return self.head(self.backbone(x))

    @override
    def setup(self, stage: str) -> None:
        if not self.mask_by_task:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        mask = datamodule.logit_mask() if hasattr(datamodule, "logit_mask") else None
        if mask is None:
            raise MisconfigurationException(
                "mask_by_task=True needs a data module that knows each task's classes, such as"
                " TaskStreamDataModule(scenario='task_incremental'); got"
                f" {type(datamodule).__name__ if datamodule is not None else 'no data module'}."
            )
        self._logit_mask = mask

    def logits(self, x: Tensor, task: Optional[Tensor] = None) -> Tensor:
        """Logits ``(batch, num_classes)``, restricted to each sample's task classes when ``mask_by_task``."""
        logits = self(x)
        if self._logit_mask is not None and task is not None:
            logits = logits.masked_fill(~self._logit_mask.to(logits.device)[task], float("-inf"))
        return logits

    def loss(self, batch: Sequence[Tensor]) -> Tensor:
        """The cross-entropy of a batch ``(x, y)`` or ``(x, y, task)``."""
        x, y, task = _unpack(batch)
        return F.cross_entropy(self.logits(x, task), y)

    @override
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Sequence[Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y, task = _unpack(batch)
        logits = self.logits(x, task)
        loss = F.cross_entropy(logits, y)
        accuracy(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the predicted class of each sample; ``batch`` is the inputs or an ``(inputs, labels)`` pair."""
        if isinstance(batch, (tuple, list)):
            x, _, task = _unpack(batch) if len(batch) > 1 else (batch[0], None, None)
            return self.logits(x, task).argmax(dim=-1)
        return self(batch).argmax(dim=-1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer(self.param_groups())
        return torch.optim.AdamW(self.param_groups(), lr=self.lr, weight_decay=self.weight_decay)

    def param_groups(self) -> list[dict[str, Any]]:
        """The parameter groups the optimizer gets: ``backbone`` (when it has parameters) and ``head``, named."""
        groups = [
            {"name": "backbone", "params": list(self.backbone.parameters())},
            {"name": "head", "params": list(self.head.parameters())},
        ]
        return [g for g in groups if g["params"]]

    @override
    def on_fit_end(self) -> None:
        accuracy = self.trainer.callback_metrics.get("val_acc")
        if accuracy is not None:
            _print(f"final validation accuracy: {float(accuracy):.4f}")


def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Split a batch ``(x, y)`` or ``(x, y, task)``."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


@rank_zero_only
def _print(message: str) -> None:
    print(message, flush=True)
