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
Optimizer Step Hooks
^^^^^^^^^^^^^^^^^^^^

A base for callbacks whose work must follow a *real* optimizer step. Lightning has no callback hook for that:
``global_step`` and ``on_train_batch_end`` also count steps a ``GradScaler`` skipped. A torch step post-hook runs only
when ``optimizer.step()`` really ran, so the base registers one on every optimizer when training starts and removes
them when it ends. A subclass that overrides :meth:`StepHookCallback.on_optimizer_step_start` also gets a torch step
pre-hook, which runs before any parameter moves.

A real step may still carry no gradient: when ``training_step`` returns ``None`` Lightning runs no backward but calls
the optimizer step all the same. :meth:`StepHookCallback.step_has_gradients` tells such a step apart, so that the
clocks of the subclasses count only the steps that updated something.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override


class StepHookCallback(Callback):
    """A callback with a torch step post-hook (and optionally a pre-hook) on each of the Trainer's optimizers.

    Subclasses implement :meth:`on_optimizer_step_done` (and, if they must act before the update,
    :meth:`on_optimizer_step_start`) and call :meth:`attach_step_hooks` from ``on_train_start`` (optimizers exist, and
    checkpointed optimizer state is restored, only then). The hooks are removed at ``on_train_end`` and ``teardown``,
    and they never travel when the callback is pickled (``ddp_spawn``).

    The base also records, in ``on_after_backward``, that a backward ran since each optimizer's last step, which
    :meth:`step_has_gradients` reads; a subclass that overrides ``on_after_backward`` must call ``super()``.
    """

    def __init__(self) -> None:
        self._optimizers: list[Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._backward: set[int] = set()  # optimizers whose parameters a backward reached since their last step

    def attach_step_hooks(self, trainer: pl.Trainer) -> None:
        """Register :meth:`on_optimizer_step_done` as a step post-hook of every optimizer of ``trainer``.

        :meth:`on_optimizer_step_start` is registered as a step pre-hook too, if the subclass overrides it.
        """
        self.detach_step_hooks()
        self._optimizers = list(trainer.optimizers)
        self._backward.clear()
        pre = type(self).on_optimizer_step_start is not StepHookCallback.on_optimizer_step_start
        for i, opt in enumerate(self._optimizers):
            if pre:
                self._handles.append(opt.register_step_pre_hook(partial(self._step_start, i)))
            self._handles.append(opt.register_step_post_hook(partial(self._step_done, i)))

    def detach_step_hooks(self) -> None:
        """Remove the step post-hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _step_start(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> Optional[tuple[Any, Any]]:
        return self.on_optimizer_step_start(index, optimizer, args, kwargs)

    def _step_done(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self.on_optimizer_step_done(index, optimizer)
        finally:
            self._backward.discard(index)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backward = set(range(len(self._optimizers)))

    def step_has_gradients(self, optimizer: Union[int, Optimizer, Any]) -> bool:
        """Whether the pending step of ``optimizer`` carries gradients (in :meth:`on_optimizer_step_done`: that step).

        It does if a backward ran since the optimizer's last step (whatever masked the gradients since), or if any of
        its parameters has a gradient. A ``training_step`` that returned ``None`` runs no backward and Lightning sets
        the gradients to ``None`` in the same closure, so, unless an earlier batch of the accumulation window ran a
        backward, its step carries none: it updates nothing and no clock should count it.
        Ask once the gradients are final: from ``on_before_optimizer_step`` on, or in :meth:`on_optimizer_step_done`.

        Args:
            optimizer: The optimizer (a ``LightningOptimizer`` is unwrapped) or its index in ``trainer.optimizers``.

        Raises:
            RuntimeError: If it is not one of the Trainer's optimizers, or training has not started.

        """
        i = optimizer if isinstance(optimizer, int) else self.optimizer_index(optimizer)
        if i in self._backward:
            return True
        return any(p.grad is not None for group in self._optimizers[i].param_groups for p in group["params"])

    def on_optimizer_step_start(
        self, index: int, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Called when ``trainer.optimizers[index].step(*args, **kwargs)`` starts, before any parameter moves.

        Lightning passes a ``closure`` (which runs ``training_step``, backward and ``on_before_optimizer_step``) to the
        step of the plain precision plugins, so the gradients may not exist yet; under a ``GradScaler`` the closure
        has already run. Return ``(args, kwargs)`` to replace the step's arguments (for example to wrap the closure),
        or ``None``.
        """
        return None

    def on_optimizer_step_done(self, index: int, optimizer: Optimizer) -> None:
        """Called right after ``trainer.optimizers[index]`` really stepped (never for a step a ``GradScaler`` skipped).

        This includes a step without gradients (see :meth:`step_has_gradients`, which still answers for this step).
        """

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
        state.update(_handles=[], _optimizers=[], _backward=set())
        return state
