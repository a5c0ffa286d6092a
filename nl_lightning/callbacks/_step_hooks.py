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
The Optimizer Step Protocol
^^^^^^^^^^^^^^^^^^^^^^^^^^^

Several callbacks act around each *real* optimizer step, and their order matters: the rules must see the gradients
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates` will hand the optimizer, the monitor must read the learning rate
the rules wrote, the clocks must tick before the rules put the clean values back, and a consolidation must come last.
One :class:`StepProtocol` per Trainer owns that order. Participants (subclasses of :class:`StepHookCallback`)
register once, in ``setup``, for the :class:`Phase` values they take part in, and the protocol calls them, for every
step of every optimizer, in the fixed order

    plan -> modulate -> measure -> *the optimizer step* -> commit -> restore -> consolidate

and, within a phase, in the order they registered (the order of ``trainer.callbacks``). No participant calls another:
the phases before the step run at the first participant's ``on_before_optimizer_step`` (the gradients are final:
accumulated, all-reduced, unscaled), the phases after it in a torch step post-hook, which runs only when
``optimizer.step()`` really ran (Lightning's ``global_step`` and ``on_train_batch_end`` also count steps a
``GradScaler`` skipped). The protocol alone installs the torch hooks, one pre-hook and one post-hook per optimizer, when
training starts, and removes them when it ends.

A real step may still carry no gradient: when ``training_step`` returns ``None`` Lightning runs no backward but calls
the optimizer step all the same. :meth:`StepProtocol.step_has_gradients` tells such a step apart, so that the clocks of
the participants count only the steps that updated something.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from enum import IntEnum
from functools import partial
from typing import Any, ClassVar, Optional, TypeVar, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

__all__ = ["Phase", "StepHookCallback", "StepProtocol", "logging_step", "optimizer_of_params", "should_log"]

P = TypeVar("P", bound="StepHookCallback")


class Phase(IntEnum):
    """The phases of one optimizer step, in the order :class:`StepProtocol` runs them."""

    PLAN = 0  #: decide which levels are due and hold the others' gradients back (``MultiFrequencyUpdates``)
    MODULATE = 1  #: write the effective hyper-parameters (the rules)
    MEASURE = 2  #: read gradients, learning rates and parameters before the update (the monitor)
    COMMIT = 3  #: record what the step did: tick the clocks, measure the drift
    RESTORE = 4  #: observe the update and write the clean hyper-parameters back (the rules)
    CONSOLIDATE = 5  #: count the step towards a consolidation boundary (``CMSConsolidation``)


BEFORE_STEP = (Phase.PLAN, Phase.MODULATE, Phase.MEASURE)
AFTER_STEP = (Phase.COMMIT, Phase.RESTORE, Phase.CONSOLIDATE)


class StepProtocol:
    """The one owner of the per-step protocol of a Trainer: its participants, its optimizers and its torch hooks.

    Get it with :meth:`of`; participants register themselves (:meth:`StepHookCallback.setup`). It also answers, for
    every participant, which optimizer an optimizer is (:meth:`optimizer_index`), whether its pending step carries
    gradients (:meth:`step_has_gradients`), which participants of a kind the Trainer has (:meth:`participants`) and
    which levels are due on the pending step (:meth:`due`).
    """

    _of: ClassVar[weakref.WeakKeyDictionary[pl.Trainer, StepProtocol]] = weakref.WeakKeyDictionary()

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = weakref.ref(trainer)
        self._participants: list[StepHookCallback] = []
        self._by_phase: dict[Phase, list[StepHookCallback]] = {phase: [] for phase in Phase}
        self._optimizers: list[Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._backward: set[int] = set()  # optimizers whose parameters a backward reached since their last step
        self._prepared: set[int] = set()  # optimizers whose pending step went through the phases before the step
        self._due: dict[int, list[str]] = {}  # per optimizer: the levels the plans of its pending step update

    @classmethod
    def of(cls, trainer: pl.Trainer) -> StepProtocol:
        """The protocol of ``trainer``, created on first use."""
        protocol = cls._of.get(trainer)
        if protocol is None:
            protocol = cls._of[trainer] = cls(trainer)
        return protocol

    # ------------------------------------------------------------------------------------------------ participants
    def register(self, participant: StepHookCallback) -> bool:
        """Add ``participant`` for its :attr:`~StepHookCallback.step_phases`.

        Returns:
            ``False`` if it was registered already (it is then left where it is: it takes part once).

        """
        if any(p is participant for p in self._participants):
            return False
        self._participants.append(participant)
        self._sort()
        return True

    def unregister(self, participant: StepHookCallback) -> None:
        """Remove ``participant``; the torch hooks go with the last one."""
        self._participants = [p for p in self._participants if p is not participant]
        self._sort()
        if not self._participants:
            self.detach()

    def participants(self, kind: type[P]) -> list[P]:
        """The registered participants that are instances of ``kind``, in registration order."""
        return [p for p in self._participants if isinstance(p, kind)]

    def _sort(self) -> None:
        self._by_phase = {phase: [p for p in self._participants if phase in p.step_phases] for phase in Phase}

    # ------------------------------------------------------------------------------------------------ optimizers
    @property
    def optimizers(self) -> list[Optimizer]:
        """The optimizers the hooks were attached to (the Trainer's, once training has started)."""
        return self._optimizers

    def attach(self, trainer: pl.Trainer) -> None:
        """Install one torch step pre-hook and one post-hook on each of ``trainer.optimizers`` (idempotent)."""
        optimizers = list(trainer.optimizers)
        if self._handles and len(optimizers) == len(self._optimizers):
            if all(a is b for a, b in zip(optimizers, self._optimizers, strict=True)):
                return
        self.detach()
        self._optimizers = optimizers
        self._backward.clear()
        self._prepared.clear()
        self._due.clear()
        for i, opt in enumerate(optimizers):
            self._handles.append(opt.register_step_pre_hook(partial(self._step_start, i)))
            self._handles.append(opt.register_step_post_hook(partial(self._step_done, i)))

    def detach(self) -> None:
        """Remove the torch hooks (the optimizers stay known, so :meth:`optimizer_index` still answers)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._prepared.clear()
        self._due.clear()

    def optimizer_index(self, optimizer: Any, who: str = "StepProtocol") -> int:
        """The index of ``optimizer`` (or of the optimizer a ``LightningOptimizer`` wraps) in ``trainer.optimizers``.

        Raises:
            RuntimeError: If it is not one of the Trainer's optimizers, or training has not started.

        """
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        for i, opt in enumerate(self._optimizers):
            if opt is optimizer:
                return i
        raise RuntimeError(
            f"{who} got {type(optimizer).__name__}, which is not one of the Trainer's optimizers; pass an optimizer"
            " returned by `configure_optimizers`, once training has started."
        )

    def mark_backward(self) -> None:
        """Record that a backward ran (called from the participants' ``on_after_backward``)."""
        self._backward = set(range(len(self._optimizers)))

    def step_has_gradients(self, index: int) -> bool:
        """Whether the pending step of optimizer ``index`` carries gradients (see
        :meth:`StepHookCallback.step_has_gradients`)."""
        if index in self._backward:
            return True
        return any(p.grad is not None for group in self._optimizers[index].param_groups for p in group["params"])

    def add_due(self, index: int, levels: Iterable[str]) -> None:
        """Record, in the plan phase, levels that update on the pending step of optimizer ``index``."""
        self._due.setdefault(index, []).extend(levels)

    def due(self, index: int) -> tuple[str, ...]:
        """The levels that update on the pending step of optimizer ``index`` (known from the plan phase on)."""
        return tuple(self._due.get(index, ()))

    # ------------------------------------------------------------------------------------------------ a step
    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Run the phases before the step (plan, modulate, measure) once for the pending step of ``optimizer``.

        Every participant's ``on_before_optimizer_step`` calls it; the first call of a step does the work.
        """
        i = self.optimizer_index(optimizer)
        if i in self._prepared:
            return
        self._prepared.add(i)
        self._due.pop(i, None)
        opt = self._optimizers[i]
        for phase in BEFORE_STEP:
            for p in self._by_phase[phase]:
                p.on_step_phase(phase, trainer, pl_module, i, opt)

    def end_batch(self) -> None:
        """Forget what the phases before a step prepared for a step that did not happen (a ``GradScaler`` skip)."""
        self._prepared.clear()
        self._due.clear()

    def _step_start(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> Optional[tuple[Any, Any]]:
        changed = False
        for p in list(self._participants):
            if type(p).on_optimizer_step_start is StepHookCallback.on_optimizer_step_start:
                continue
            result = p.on_optimizer_step_start(index, optimizer, args, kwargs)
            if result is not None:
                args, kwargs = result
                changed = True
        return (args, kwargs) if changed else None

    def _step_done(self, index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer()
        pl_module = trainer.lightning_module if trainer is not None else None
        try:
            for phase in AFTER_STEP:
                for p in self._by_phase[phase]:
                    p.on_step_phase(phase, trainer, pl_module, index, optimizer)
        finally:
            self._backward.discard(index)
            self._prepared.discard(index)
            self._due.pop(index, None)


class StepHookCallback(Callback):
    """A participant of the Trainer's :class:`StepProtocol`.

    A subclass lists its phases in :attr:`step_phases` and implements :meth:`on_step_phase` (and, to act when a torch
    ``optimizer.step()`` starts, before any parameter moves, :meth:`on_optimizer_step_start`). The base registers it
    in ``setup`` and attaches the protocol's hooks in ``on_train_start``; a subclass that overrides these hooks (or
    ``on_before_optimizer_step``, ``on_after_backward``, ``on_train_batch_end``, ``on_train_end``, ``teardown``,
    ``load_state_dict``) must call ``super()``.

    It also holds the pieces the participants share: :meth:`optimizer_index` and :meth:`step_has_gradients` (from the
    protocol), the refusal of unsupported strategies (:attr:`refused_strategies`), and deferred state loading:
    Lightning restores callback states before the optimizers exist, so :meth:`load_state_dict` keeps the state, which
    :meth:`state_dict` returns unchanged until the subclass takes it with :meth:`take_loaded_state` (at train start).
    """

    #: the phases this participant takes part in
    step_phases: ClassVar[tuple[Phase, ...]] = ()
    #: strategies the participant refuses at ``setup``: ``{class: why}``, with :attr:`strategy_fix` naming the fix
    refused_strategies: ClassVar[dict[type, str]] = {}
    strategy_fix: ClassVar[str] = "Use strategy='ddp' (or a single device)."

    def __init__(self) -> None:
        self._protocol: Optional[StepProtocol] = None
        self._loaded_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------------------------------------ the protocol
    def on_step_phase(
        self, phase: Phase, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: Optimizer
    ) -> None:
        """Take part in ``phase`` of the pending (before the step) or completed (after it) step of optimizer ``index``.

        The phases after the step run only when ``optimizer.step()`` really ran (never for a step a ``GradScaler``
        skipped), including a step without gradients (see :meth:`step_has_gradients`, which still answers for it).
        """

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

    def protocol(self, trainer: pl.Trainer) -> StepProtocol:
        """The Trainer's :class:`StepProtocol`, with this callback registered in it."""
        protocol = StepProtocol.of(trainer)
        if self._protocol is not protocol and self._protocol is not None:
            self._protocol.unregister(self)
        protocol.register(self)
        self._protocol = protocol
        return protocol

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.refuse_strategy(trainer)
        self.protocol(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.protocol(trainer).attach(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.protocol(trainer).before_step(trainer, pl_module, optimizer)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.protocol(trainer).mark_backward()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._protocol is not None:
            self._protocol.end_batch()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._protocol is not None:
            self._protocol.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._protocol is not None:
            self._protocol.detach()
            if stage == "fit":
                self._protocol.unregister(self)

    # ------------------------------------------------------------------------------------------------ shared pieces
    def refuse_strategy(self, trainer: pl.Trainer) -> None:
        """Raise if the Trainer's strategy is one of :attr:`refused_strategies`.

        Raises:
            MisconfigurationException: Naming the strategy, why, and :attr:`strategy_fix`.

        """
        strategy = trainer.strategy
        for cls, why in self.refused_strategies.items():
            if isinstance(strategy, cls):
                raise MisconfigurationException(
                    f"{type(self).__name__} does not support {type(strategy).__name__}: {why}. {self.strategy_fix}"
                )

    def optimizer_index(self, optimizer: Any) -> int:
        """The index of ``optimizer`` (or of the optimizer a ``LightningOptimizer`` wraps) in ``trainer.optimizers``.

        Raises:
            RuntimeError: If it is not one of the Trainer's optimizers, or training has not started.

        """
        if self._protocol is None:
            raise RuntimeError(
                f"{type(self).__name__} got {type(optimizer).__name__} before training started; pass an optimizer"
                " returned by `configure_optimizers`, once training has started."
            )
        return self._protocol.optimizer_index(optimizer, who=type(self).__name__)

    @property
    def step_optimizers(self) -> list[Optimizer]:
        """The Trainer's optimizers, as the protocol attached to them (empty before training starts)."""
        return [] if self._protocol is None else self._protocol.optimizers

    def step_has_gradients(self, optimizer: Union[int, Optimizer, Any]) -> bool:
        """Whether the pending step of ``optimizer`` carries gradients (after the step: that step).

        It does if a backward ran since the optimizer's last step (whatever masked the gradients since), or if any of
        its parameters has a gradient. A ``training_step`` that returned ``None`` runs no backward and Lightning sets
        the gradients to ``None`` in the same closure, so, unless an earlier batch of the accumulation window ran a
        backward, its step carries none: it updates nothing and no clock should count it.
        Ask once the gradients are final: from ``on_before_optimizer_step`` on, or in the phases after the step.

        Args:
            optimizer: The optimizer (a ``LightningOptimizer`` is unwrapped) or its index in ``trainer.optimizers``.

        Raises:
            RuntimeError: If it is not one of the Trainer's optimizers, or training has not started.

        """
        i = optimizer if isinstance(optimizer, int) else self.optimizer_index(optimizer)
        assert self._protocol is not None  # `optimizer_index` raised otherwise
        return self._protocol.step_has_gradients(i)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Optimizers do not exist yet when Lightning restores callbacks: the subclass applies the state at train start.
        self._loaded_state = state_dict

    def take_loaded_state(self) -> Optional[dict[str, Any]]:
        """The state :meth:`load_state_dict` kept, once (``None`` if there is none)."""
        state, self._loaded_state = self._loaded_state, None
        return state

    @property
    def has_loaded_state(self) -> bool:
        """Whether a loaded state waits to be applied (:meth:`take_loaded_state`)."""
        return self._loaded_state is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_protocol"] = None
        return state


def optimizer_of_params(optimizers: Sequence[Optimizer]) -> dict[int, int]:
    """The optimizer map: for each parameter of ``optimizers`` (by ``id``), the index of the optimizer holding it."""
    return {id(p): i for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}


def logging_step(trainer: pl.Trainer) -> int:
    """The 1-based index of the current optimizer step on Lightning's logging clock, the step ``self.log`` records.

    Lightning's loggers count ``fit_loop.epoch_loop._batches_that_stepped``: one tick per batch that stepped, whatever
    the number of optimizers, restored on resume. No public attribute holds it: ``trainer.global_step`` equals it with
    automatic optimization, but counts every optimizer's steps in manual optimization (two per batch with two
    optimizers) and does not tick on a batch whose ``training_step`` stepped nothing. This is the one place that reads
    it.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def should_log(trainer: pl.Trainer) -> bool:
    """Whether the current training step is one of the Trainer's logging steps (``log_every_n_steps``).

    The condition of Lightning's own logger connector in the fit loop: the logging step is a multiple of
    ``log_every_n_steps``, or the run is stopping.
    """
    if trainer.log_every_n_steps == 0:
        return False
    return logging_step(trainer) % trainer.log_every_n_steps == 0 or trainer.should_stop
