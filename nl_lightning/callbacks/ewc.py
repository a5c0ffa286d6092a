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
Elastic Weight Consolidation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^

The classic regularisation baseline of continual learning (Kirkpatrick et al., PNAS 2017), in its online form
(Schwarz et al., ICML 2018): after each task, remember the weights and a diagonal Fisher information; afterwards
penalise moving the important weights, :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i - \theta^*_i)^2`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from nl_lightning._validation import is_int
from nl_lightning.callbacks._state import ConfiguredStateKey

__all__ = ["ElasticWeightConsolidation"]

LossFn = Callable[[pl.LightningModule, Any], Tensor]


def default_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """``pl_module.loss(batch)`` if the module has one (the causal LMs of :mod:`nl_lightning.models` do), else the
    cross-entropy of ``pl_module(x)`` against ``y`` for a batch ``(x, y, ...)``."""
    loss = getattr(pl_module, "loss", None)
    if callable(loss):
        return loss(batch)
    return F.cross_entropy(pl_module(batch[0]), batch[1])


class ElasticWeightConsolidation(ConfiguredStateKey, Callback):
    r"""Online EWC for any LightningModule: a quadratic penalty that keeps important weights near their old values.

    At the end of every task of a :class:`~nl_lightning.data.TaskStreamDataModule` it estimates the diagonal
    empirical Fisher information :math:`F = \mathbb{E}[(\nabla_\theta \ell)^2]` from ``fisher_samples`` training
    samples of that task, one sample at a time, accumulates it as :math:`F \leftarrow \gamma F + F_\text{task}`, and
    anchors :math:`\theta^*` at the current weights. While later tasks train, it adds the penalty's gradient
    :math:`\lambda F (\theta - \theta^*)` to each parameter's gradient right after backward, which is exactly what
    adding :math:`\frac{\lambda}{2}\sum F(\theta - \theta^*)^2` to the loss would do (scaled for a ``GradScaler`` and
    for gradient accumulation). The penalty is logged as ``ewc/penalty``. Fisher and anchor are checkpointed by
    parameter name, under a key that names ``ewc_lambda``, ``fisher_samples`` and ``gamma`` (a lone instance whose
    configuration changed still restores its state, with a warning; so does a checkpoint written with the former key,
    the class name). Outside a task stream (``boundaries="manual"``), call :meth:`consolidate` yourself at each task
    boundary, for example between the ``fit`` calls of successive tasks.

    Args:
        ewc_lambda: The penalty strength :math:`\lambda \ge 0`.
        fisher_samples: Samples per task used to estimate the Fisher information.
        gamma: Decay of the previous tasks' Fisher in online EWC, in ``[0, 1]`` (1 sums the tasks' Fishers).
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``, or its import path (``"package.module.function"``), the
            per-sample negative log-likelihood; default: ``pl_module.loss(batch)`` if defined, else cross-entropy.
            ``batch`` is one sample, in the dataloader's layout (a sequence or a mapping of tensors).
        boundaries: ``"task_stream"`` (default): consolidate at the task ends of a
            :class:`~nl_lightning.data.TaskStreamDataModule`; ``"manual"``: only where you call :meth:`consolidate`
            (any data).

    Raises:
        MisconfigurationException: On a negative ``ewc_lambda``, ``fisher_samples < 1``, ``gamma`` outside [0, 1], a
            ``loss_fn`` path that does not import or an unknown ``boundaries``; at ``setup`` with
            ``boundaries="task_stream"`` when the data module is not a task stream.

    Example::

        trainer = Trainer(callbacks=[ElasticWeightConsolidation(ewc_lambda=100.0)], ...)

    """

    method_tag = "ewc"  # the name ContinualEvaluation gives this callback in a method's name

    def __init__(
        self,
        ewc_lambda: float = 100.0,
        fisher_samples: int = 200,
        gamma: float = 1.0,
        loss_fn: Optional[Union[str, LossFn]] = None,
        boundaries: Literal["task_stream", "manual"] = "task_stream",
    ) -> None:
        if not ewc_lambda >= 0:
            raise MisconfigurationException(f"`ewc_lambda` must be >= 0, got {ewc_lambda!r}.")
        if not is_int(fisher_samples) or fisher_samples < 1:
            raise MisconfigurationException(f"`fisher_samples` must be an integer >= 1, got {fisher_samples!r}.")
        if not 0.0 <= gamma <= 1.0:
            raise MisconfigurationException(f"`gamma` must be in [0, 1], got {gamma!r}.")
        if boundaries not in ("task_stream", "manual"):
            raise MisconfigurationException(f"`boundaries` must be 'task_stream' or 'manual', got {boundaries!r}.")
        self.ewc_lambda, self.fisher_samples, self.gamma = float(ewc_lambda), fisher_samples, float(gamma)
        self.boundaries = boundaries
        self._loss_fn: LossFn = _import_loss(loss_fn) if isinstance(loss_fn, str) else (loss_fn or default_loss)
        self._fisher: dict[str, Tensor] = {}
        self._anchor: dict[str, Tensor] = {}
        self.tasks_consolidated = 0

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``ewc_lambda``, ``fisher_samples`` and ``gamma``."""
        return {"ewc_lambda": self.ewc_lambda, "fisher_samples": self.fisher_samples, "gamma": self.gamma}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            stage == "fit"
            and self.boundaries == "task_stream"
            and not hasattr(trainer.datamodule, "stage_at_epoch_end")
        ):
            raise MisconfigurationException(
                "ElasticWeightConsolidation finds task boundaries through a TaskStreamDataModule (nl_lightning.data);"
                " with other data pass `boundaries='manual'` and call `consolidate(pl_module, dataloader)` yourself"
                " at each boundary."
            )

    # ------------------------------------------------------------------------------------------------ the penalty
    def penalty(self, pl_module: torch.nn.Module) -> Tensor:
        r"""The penalty :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i - \theta^*_i)^2` at the current weights."""
        total = torch.zeros((), device=next(pl_module.parameters()).device)
        for name, p in self._anchored(pl_module):
            total = total + (self._fisher[name] * (p - self._anchor[name]).pow(2)).sum()
        return 0.5 * self.ewc_lambda * total

    def _anchored(self, module: torch.nn.Module) -> Iterable[tuple[str, Tensor]]:
        return ((n, p) for n, p in module.named_parameters() if n in self._anchor)

    def add_penalty_gradient(self, pl_module: torch.nn.Module, scale: float = 1.0) -> None:
        r"""Add ``scale`` times the penalty's gradient :math:`\lambda F (\theta - \theta^*)` to each ``p.grad``."""
        with torch.no_grad():
            for name, p in self._anchored(pl_module):
                grad = self._fisher[name] * (p - self._anchor[name]) * (self.ewc_lambda * scale)
                if p.grad is None:
                    p.grad = grad.to(p.dtype)
                else:
                    p.grad.add_(grad)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._anchor or self.ewc_lambda == 0:
            return
        # on_after_backward sees each micro-batch's (scaled) gradient: add the matching share of the penalty's.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        if pl_module.automatic_optimization:
            scale /= trainer.accumulate_grad_batches
        self.add_penalty_gradient(pl_module, scale)
        with torch.no_grad():
            pl_module.log("ewc/penalty", self.penalty(pl_module), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------------------ consolidation
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.boundaries == "manual":
            return
        dm = trainer.datamodule
        stage = dm.stage_at_epoch_end(trainer.current_epoch)
        if stage is None or getattr(dm, "joint", False) or stage <= self.tasks_consolidated:
            return
        task = stage - 1
        self.consolidate(pl_module, dm.eval_dataloader(task, "train", trainer.global_rank, trainer.world_size))

    def consolidate(self, pl_module: pl.LightningModule, dataloader: Iterable[Any]) -> None:
        """Estimate the Fisher information of the task just trained and anchor the current weights.

        Args:
            pl_module: The model.
            dataloader: Batches of the task's training data (sequences or mappings of tensors, batch first); up to
                ``fisher_samples`` samples are used, one by one.
                Under DDP every rank passes its own shard (up to ``fisher_samples`` each) and the estimates are
                averaged over all ranks' samples, so every rank holds the same Fisher information.

        """
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = pl_module.training
        pl_module.eval()
        seen = 0
        with torch.enable_grad():
            for batch in dataloader:
                for i in range(_batch_size(batch)):
                    if seen >= self.fisher_samples:
                        break
                    sample = _sample(batch, i, pl_module.device)
                    grads = torch.autograd.grad(self._loss_fn(pl_module, sample), list(params.values()),
                                                allow_unused=True)  # fmt: skip
                    for (name, _), g in zip(params.items(), grads, strict=True):
                        if g is not None:
                            fisher[name] += g.float().pow(2)
                    seen += 1
                if seen >= self.fisher_samples:
                    break
        pl_module.train(was_training)
        count = torch.tensor(float(seen), device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank saw its own shard: sum the squared gradients and the counts, so every rank holds the same F.
            for f in fisher.values():
                torch.distributed.all_reduce(f)
            torch.distributed.all_reduce(count)
        if count.item() == 0:
            raise MisconfigurationException("ElasticWeightConsolidation.consolidate got an empty dataloader.")
        for name, p in params.items():
            new = fisher[name] / count
            self._fisher[name] = self.gamma * self._fisher[name] + new if name in self._fisher else new
            self._anchor[name] = p.detach().float().clone()
        self.tasks_consolidated += 1

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self._fisher, "anchor": self._anchor, "tasks_consolidated": self.tasks_consolidated}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fisher = dict(state_dict.get("fisher", {}))
        self._anchor = dict(state_dict.get("anchor", {}))
        self.tasks_consolidated = int(state_dict.get("tasks_consolidated", 0))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._fisher = {n: f.to(device) for n, f in self._fisher.items()}
        self._anchor = {n: a.to(device) for n, a in self._anchor.items()}


def _batch_size(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return len(first)


def _sample(batch: Any, i: int, device: torch.device) -> Any:
    """Sample ``i`` of a batch (a sequence or a mapping of batch-first tensors), as a batch of one on ``device``."""
    if isinstance(batch, Mapping):
        return {k: v[i : i + 1].to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return [field[i : i + 1].to(device) for field in batch]


def _import_loss(path: str) -> LossFn:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise MisconfigurationException(
            f"`loss_fn` {path!r} does not import; give 'package.module.function' taking (pl_module, batch)."
        ) from err
