# Copyright The Lightning AI team.
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
Optimizer Step Hooks
^^^^^^^^^^^^^^^^^^^^

A base for callbacks whose work must follow a *real* optimizer step. Lightning has no callback hook for that:
``global_step`` and ``on_train_batch_end`` also count steps a ``GradScaler`` skipped. A torch step post-hook runs only
when ``optimizer.step()`` really ran, so the base registers one on every optimizer when training starts and removes
them when it ends.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override


class StepHookCallback(Callback):
    """A callback with a torch step post-hook on each of the Trainer's optimizers.

    Subclasses implement :meth:`on_optimizer_step_done` and call :meth:`attach_step_hooks` from ``on_train_start``
    (optimizers exist, and checkpointed optimizer state is restored, only then). The hooks are removed at
    ``on_train_end`` and ``teardown``, and they never travel when the callback is pickled (``ddp_spawn``).
    """

    def __init__(self) -> None:
        self._optimizers: list[Optimizer] = []
        self._handles: list[RemovableHandle] = []

    def attach_step_hooks(self, trainer: pl.Trainer) -> None:
        """Register :meth:`on_optimizer_step_done` as a step post-hook of every optimizer of ``trainer``."""
        self.detach_step_hooks()
        self._optimizers = list(trainer.optimizers)
        self._handles = [
            opt.register_step_post_hook(partial(self._step_done, i)) for i, opt in enumerate(self._optimizers)
        ]

    def detach_step_hooks(self) -> None:
        """Remove the step post-hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _step_done(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.on_optimizer_step_done(index, optimizer)

    def on_optimizer_step_done(self, index: int, optimizer: Optimizer) -> None:
        """Called right after ``trainer.optimizers[index]`` really stepped (never for a skipped step)."""

    def optimizer_index(self, optimizer: Any) -> int:
        """The index of ``optimizer`` (or of the optimizer a ``LightningOptimizer`` wraps) in ``trainer.optimizers``.

        Raises:
            RuntimeError: If it is not one of the Trainer's optimizers, or training has not started.

        """
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        for i, opt in enumerate(self._optimizers):
            if opt is optimizer:
                return i
        raise RuntimeError(
            f"{type(self).__name__} got {type(optimizer).__name__}, which is not one of the Trainer's optimizers;"
            " pass an optimizer returned by `configure_optimizers`, once training has started."
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach_step_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach_step_hooks()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handles=[], _optimizers=[])
        return state
