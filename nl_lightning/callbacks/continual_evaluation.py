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
Continual Evaluation
^^^^^^^^^^^^^^^^^^^^

Measure forgetting while a task stream trains: evaluate every task before training and after each task, fill the
accuracy matrix ``R[i][j]``, and report ACC, BWT, FWT, forgetting and learning accuracy in TensorBoard and in
``continual_metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

from nl_lightning.callbacks._state import ConfiguredStateKey
from nl_lightning.callbacks._tensorboard import accuracy_matrix_image
from nl_lightning.metrics import AccuracyMatrix

__all__ = ["ContinualEvaluation"]

_METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "aia")


class ContinualEvaluation(ConfiguredStateKey, Callback):
    r"""Fill the accuracy matrix of a task stream and report the continual-learning metrics.

    Before training (the untrained row ``b``) and at the end of each task it evaluates the model on the ``split`` of
    **every** task of the :class:`~nl_lightning.data.TaskStreamDataModule` and stores the accuracies in an
    :class:`~nl_lightning.metrics.AccuracyMatrix` (row ``k``: after ``k`` tasks). After each stage it logs
    ``continual/acc``, ``continual/bwt``, ``continual/fwt``, ``continual/forgetting`` (Chaudhry et al. 2018),
    ``continual/learning_accuracy``, ``continual/aia`` and ``continual/task_<j>`` (defined values only), writes the
    matrix as a labelled heatmap image (rows: after task i, columns: task j, values, colour scale; see
    ``docs/tensorboard.md``) and a Markdown table to TensorBoard, and writes ``continual_metrics.json`` (matrix,
    metrics, method, seed, scenario) into the logger's log directory (``default_root_dir`` without a logger).

    Predictions are ``argmax`` of ``pl_module(x)``; in the task-incremental scenario the logits of other tasks'
    classes are masked first. Evaluation runs in eval mode under ``torch.inference_mode`` and the Trainer's precision
    context; under DDP each rank evaluates a share of every task and the counts are summed across ranks. The matrix
    is saved in checkpoints, so a resumed stream keeps its earlier rows. Its checkpoint key names ``split`` and
    ``filename``, so a ``"test"`` and a ``"val"`` instance (with their own file names) keep their own matrices; a
    checkpoint written with the former key (the class name) still loads.

    Args:
        split: The split the matrix is measured on: ``"test"`` (default) or ``"val"``.
        method: The name written in the JSON; by default derived from the callbacks present: the ``method_tag`` class
            attribute of each (``ewc``, ``replay``, ``multi_frequency``, ``cms_consolidation``; a callback of your own
            may declare one), after ``joint`` for a joint run, joined by ``+``; ``naive`` when there is none.
        filename: The JSON file name.
        log_images: Write the heatmap and the Markdown table when a TensorBoard logger is attached.

    Raises:
        MisconfigurationException: If ``split`` is unknown, or (at ``setup``) the data module is not a task stream or
            another ``ContinualEvaluation`` writes the same ``filename``.

    Example::

        trainer = Trainer(max_epochs=dm.expected_epochs, reload_dataloaders_every_n_epochs=1,
                          callbacks=[ContinualEvaluation()])
        trainer.fit(model, datamodule=dm)   # writes <log_dir>/continual_metrics.json

    """

    def __init__(
        self,
        split: Literal["test", "val"] = "test",
        method: Optional[str] = None,
        filename: str = "continual_metrics.json",
        log_images: bool = True,
    ) -> None:
        if split not in ("test", "val"):
            raise MisconfigurationException(f"`split` must be 'test' or 'val', got {split!r}.")
        self._split = split
        self._method = method
        self._filename = filename
        self._log_images = log_images
        self._matrix: Optional[AccuracyMatrix] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._stages: list[int] = []
        self._start = time.monotonic()
        self.json_path: Optional[Path] = None

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``split`` and ``filename``."""
        return {"split": self._split, "filename": self._filename}

    @property
    def matrix(self) -> AccuracyMatrix:
        """The :class:`~nl_lightning.metrics.AccuracyMatrix` (available from ``setup``)."""
        if self._matrix is None:
            raise RuntimeError("ContinualEvaluation.matrix is available once `trainer.fit` has called `setup`.")
        return self._matrix

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        same_file = [cb for cb in trainer.callbacks if isinstance(cb, ContinualEvaluation) and cb is not self
                     and cb._filename == self._filename]  # fmt: skip
        if same_file:
            raise MisconfigurationException(
                f"Two ContinualEvaluation callbacks write {self._filename!r}; give each its own `filename`, for example"
                f" ContinualEvaluation(split={self._split!r}, filename='continual_metrics_{self._split}.json')."
            )
        dm = trainer.datamodule
        if not all(hasattr(dm, name) for name in ("num_tasks", "stage_at_epoch_end", "eval_dataloader")):
            raise MisconfigurationException(
                "ContinualEvaluation needs a task stream: pass a TaskStreamDataModule (nl_lightning.data) as the"
                f" Trainer's datamodule; got {type(dm).__name__ if dm is not None else 'no data module'}."
            )
        if self._matrix is None or self._matrix.num_tasks != dm.num_tasks:
            self._matrix = AccuracyMatrix(dm.num_tasks)
        self._matrix.to(pl_module.device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        if self._loaded is not None:  # restored after setup: apply now
            self._stages = list(self._loaded.pop("stages", []))
            self.matrix.load_state_dict(self._loaded)
            self.matrix.to(pl_module.device)
            self._loaded = None
        if 0 not in self._stages and trainer.current_epoch == 0:
            self._evaluate(trainer, pl_module, stage=0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = trainer.datamodule.stage_at_epoch_end(trainer.current_epoch)
        if stage is None or stage in self._stages:
            return
        self._evaluate(trainer, pl_module, stage)
        values = self._compute()  # collective under DDP: every rank computes
        scalars = {f"continual/{k}": float(values[k]) for k in _METRICS if not math.isnan(float(values[k]))}
        row = values["accuracy"][stage].tolist()
        scalars.update({f"continual/task_{j}": a for j, a in enumerate(row) if not math.isnan(a)})
        scalars["continual/stage"] = float(stage)
        pl_module.log_dict(scalars, on_step=False, on_epoch=True)
        self._write_images(trainer, stage, values["accuracy"])
        self._write_json(trainer, values, self._folder(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._matrix is None:
            return
        values = self._compute()
        self._write_json(trainer, values, self._folder(trainer))  # also when the run stopped before the last task
        self._print_summary(values)

    def _compute(self) -> dict[str, Tensor]:
        """The matrix and the metrics, summed over ranks; a copy, since ``compute()`` caches its result."""
        return {k: v.detach().cpu() for k, v in self.matrix.compute().items()}

    @rank_zero_only
    def _print_summary(self, values: dict[str, Tensor]) -> None:
        numbers = {k: float(values[k]) for k in _METRICS}
        shown = ", ".join(f"{k.upper() if len(k) == 3 else k} {v:.4f}" for k, v in numbers.items() if not math.isnan(v))
        print(f"continual evaluation: {shown or 'no complete stage'}; matrix in {self.json_path}", flush=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._matrix is None:
            return {}
        return {**self._matrix.state_dict(), "stages": list(self._stages)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    @property
    def completed_stages(self) -> list[int]:
        """The stages evaluated so far: 0 (untrained), then ``k`` after ``k`` tasks."""
        return sorted(self._stages)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int) -> None:
        dm = trainer.datamodule
        mask = dm.logit_mask(pl_module.device) if hasattr(dm, "logit_mask") else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            for task in range(dm.num_tasks):
                loader = dm.eval_dataloader(task, self._split, trainer.global_rank, trainer.world_size)
                for batch in loader:
                    x, y = batch[0].to(pl_module.device), batch[1].to(pl_module.device)
                    with trainer.precision_plugin.forward_context():
                        logits = pl_module(x)
                    if mask is not None:
                        logits = logits.masked_fill(~mask[task], float("-inf"))
                    self.matrix.update(logits.argmax(dim=-1), y, stage=stage, task=task)
        finally:
            pl_module.train(was_training)
        self._stages.append(stage)

    # ------------------------------------------------------------------------------------------------ reports
    def _report(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> dict[str, Any]:
        dm = trainer.datamodule
        accuracy = values["accuracy"]
        seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "method": self._method or _method_of(trainer),
            "scenario": dm.scenario,
            "dataset": type(dm.train_dataset).__name__,
            "num_tasks": dm.num_tasks,
            "epochs_per_task": dm.epochs_per_task,
            "protocol": dm.protocol,
            "seed": int(seed) if seed is not None else None,
            "stream_seed": dm.seed,
            "split": self._split,
            "task_classes": dm.task_classes,
            "untrained": _json_row(accuracy[0]),
            "matrix": [_json_row(row) for row in accuracy[1:]],
            **{k: _json_float(float(v)) for k, v in values.items() if k != "accuracy"},
            "forgetting_definition": "chaudhry",
            "stages_completed": self.completed_stages,
            "global_step": trainer.global_step,
            "wall_time_s": round(time.monotonic() - self._start, 3),
        }

    @staticmethod
    def _folder(trainer: pl.Trainer) -> Path:
        # Every rank asks: `trainer.log_dir` broadcasts under DDP.
        return Path(trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _write_json(self, trainer: pl.Trainer, values: dict[str, Tensor], folder: Path) -> None:
        report = self._report(trainer, values)
        folder.mkdir(parents=True, exist_ok=True)
        self.json_path = folder / self._filename
        self.json_path.write_text(json.dumps(report, indent=2) + "\n")

    @rank_zero_only
    def _write_images(self, trainer: pl.Trainer, stage: int, accuracy: Tensor) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not self._log_images or not loggers:
            return
        for logger in loggers:
            title = f"Accuracy matrix after {stage} of {accuracy.shape[1]} tasks"
            image = accuracy_matrix_image(accuracy, title=title)  # rows: after task i, columns: task j
            logger.experiment.add_image("continual/accuracy_matrix", image, global_step=stage)
            logger.experiment.add_text("continual/accuracy_matrix", markdown_table(accuracy), global_step=stage)


def markdown_table(accuracy: Tensor) -> str:
    """The accuracy matrix as Markdown: row 0 untrained, row k after k tasks."""
    num_tasks = accuracy.shape[1]
    lines = ["| after \\ task | " + " | ".join(str(j) for j in range(num_tasks)) + " |"]
    lines.append("|---" * (num_tasks + 1) + "|")
    for i, row in enumerate(accuracy.tolist()):
        name = "untrained" if i == 0 else f"task {i - 1}"
        lines.append(f"| {name} | " + " | ".join("-" if math.isnan(a) else f"{a:.3f}" for a in row) + " |")
    return "\n".join(lines)


def _method_of(trainer: pl.Trainer) -> str:
    """The method's name: the ``method_tag`` of each callback that has one (in the Trainer's order), ``+``-joined."""
    parts = [tag for cb in trainer.callbacks if isinstance(tag := getattr(cb, "method_tag", None), str) and tag]
    if getattr(trainer.datamodule, "joint", False):
        parts.insert(0, "joint")
    return "+".join(parts) or "naive"


def _json_float(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 6)


def _json_row(row: Tensor) -> list[Optional[float]]:
    return [_json_float(float(v)) for v in row.tolist()]
