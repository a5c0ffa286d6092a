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
Nested Learning Monitor
^^^^^^^^^^^^^^^^^^^^^^^

Watch each level of a nested learner: how often it updated, how large its gradient was when it did, how far the
update moved it and at which learning rate; and whether the token-axis states of its Continuum Memory Systems stayed
finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from nl_lightning._sharded import global_sums, is_dtensor
from nl_lightning.callbacks._state import ConfiguredStateKey
from nl_lightning.callbacks._step_hooks import Phase, StepHookCallback, logging_step, optimizer_of_params, should_log
from nl_lightning.callbacks._tensorboard import custom_scalars_layout, write_custom_scalars
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates
from nl_lightning.models.cms import CMSState, ContinuumMemory

__all__ = ["NestedLearningMonitor"]


@dataclass
class _Watch:
    """What the monitor knows about one level."""

    name: str
    every: int
    params: list[tuple[str, Tensor]]
    updates: int = 0  # counted here only when no MultiFrequencyUpdates owns the clocks
    grad_norm: Optional[float] = None
    drift: Optional[float] = None
    drift_rel: Optional[float] = None
    lr: Optional[float] = None
    snapshot: Optional[list[Tensor]] = None  # parameter values just before a measured update
    pending: bool = False  # measured before the step (the protocol's measure phase), waiting for it
    histograms: dict[str, Tensor] = field(default_factory=dict)


class NestedLearningMonitor(ConfiguredStateKey, StepHookCallback):
    r"""Log, per level, the number of updates, the gradient norm at update, the drift and the effective learning rate.

    With :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` callbacks in the Trainer the levels are their levels
    (a level whose parameters join an optimizer late is watched from its first update on); without one, each
    optimizer's parameters form a level (``all``, or ``optimizer_<i>`` with several optimizers).
    For every level it logs, with ``self.log`` at the Trainer's logging steps (``log_every_n_steps``):

    - ``nested/<level>/updates``: updates taken so far (committed optimizer steps of the level; a step without
      gradients, after a ``training_step`` that returned ``None``, is none);
    - ``nested/<level>/grad_norm``: L2 norm of the gradient the optimizer used at the level's latest update (the chunk
      mean for a slow level), before clipping;
    - ``nested/<level>/drift`` and ``drift_rel``: ``||theta_after - theta_before||`` of that update, absolute and
      relative to ``||theta_before||``. A slow level does not move between its updates, so this is its drift since
      the previous update;
    - ``nested/<level>/lr``: the learning rate of the level's parameter group at that update, as the optimizer used
      it (after any :class:`~nl_lightning.callbacks.SelfModifyingRule`).

    With token-axis Continuum Memory Systems in the model (:class:`~nl_lightning.models.ContinuumMemory` with
    ``in_context=True``, as in Hope or in FFNs converted by :func:`~nl_lightning.models.to_cms`) it also logs

    - ``nested/nonfinite_states``: how many of them returned fast weights or pending gradient sums holding NaN or inf
      in a training step, a forward hook checking each one's returned state (one ``isfinite().all()`` per tensor) at
      logging steps only. The first time a module reports, a warning names it (an ``inner_lr`` too large for the
      activations' scale makes the writes diverge: lower it, or set ``retention < 1``).

    At train start it writes a TensorBoard custom-scalars layout (the CUSTOM SCALARS tab) with one chart per quantity
    holding every level, so the multi-frequency picture shows in one view (``docs/tensorboard.md``).

    It checks the training loss (the ``loss`` that ``training_step`` returned) at logging steps, and at every step with
    ``stop_on_nonfinite=True``: the first time it is NaN or inf a warning says so and names where it started (the CMS
    modules whose states were non-finite in that step, and the first non-finite parameter). With
    ``stop_on_nonfinite=True`` a non-finite loss or CMS state also sets ``trainer.should_stop`` (agreed across
    processes), so the run ends after that step, and :attr:`stop_reason` says why.

    A level is measured at its last update at or before each logging step, so a slow level reports the values of its
    latest update and a fast one costs a measurement only at logging steps. With a
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` it also writes histograms of the gradient
    (``nested/<level>/grad``) and of the update (``nested/<level>/update``) of each measured update. It works with any
    logger, or none (the values are in ``trainer.callback_metrics``). Its checkpoint key names ``prefix``, so monitors
    with different prefixes keep their own counts.

    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) norms and drifts are those of the whole sharded
    tensors (one all-reduce per measurement, the same value on every rank), and histograms gather the whole gradient
    and update of a measured level on every rank (at logging steps only): set ``log_histograms=False`` for levels too
    large to gather.

    Args:
        log_histograms: Write TensorBoard histograms when a TensorBoard logger is attached.
        prefix: The first part of every logged name.
        stop_on_nonfinite: Check the loss and the CMS states at every training step and stop the run at the first
            non-finite one. ``False`` (default): check at logging steps, warn and train on.

    Raises:
        MisconfigurationException: If ``prefix`` is empty or ``stop_on_nonfinite`` is not a bool.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor

        trainer = Trainer(callbacks=[MultiFrequencyUpdates({"backbone.*": 8}), NestedLearningMonitor()])

    """

    step_phases = (Phase.MEASURE, Phase.COMMIT)

    def __init__(self, log_histograms: bool = True, prefix: str = "nested", stop_on_nonfinite: bool = False) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise MisconfigurationException(f"`prefix` must be a non-empty string such as 'nested', got {prefix!r}.")
        if not isinstance(stop_on_nonfinite, bool):
            raise MisconfigurationException(f"`stop_on_nonfinite` must be True or False, got {stop_on_nonfinite!r}.")
        super().__init__()
        self._stop_on_nonfinite = stop_on_nonfinite
        #: why this monitor stopped the run (``None``: it did not)
        self.stop_reason: Optional[str] = None
        self._loss_reported = False
        self._log_histograms = log_histograms
        self._prefix = prefix
        self._mfus: list[MultiFrequencyUpdates] = []
        self._watches: list[dict[str, _Watch]] = []  # per optimizer index: its levels
        self._levels: dict[str, tuple[int, list[tuple[str, Tensor]]]] = {}  # every MultiFrequencyUpdates level
        self._loaded_updates: dict[str, int] = {}
        self._state_hooks: list[RemovableHandle] = []  # forward hooks on the token-axis ContinuumMemory modules
        self._state_checks: dict[str, Tensor] = {}  # module name -> all of its states finite, in this logging step
        self._check_states = False  # set for the training batches of logging steps
        self._reported: set[str] = set()  # modules already named in a warning

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``prefix``."""
        return {"prefix": self._prefix}

    @property
    def watches(self) -> dict[str, _Watch]:
        """The monitored levels by name, with their latest measurements."""
        return {name: w for per_opt in self._watches for name, w in per_opt.items()}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._remove_state_hooks()
        for name, module in pl_module.named_modules():
            if isinstance(module, ContinuumMemory) and module.in_context:
                self._state_hooks.append(module.register_forward_hook(self._state_hook(name)))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_state_hooks()

    def _remove_state_hooks(self) -> None:
        for handle in self._state_hooks:
            handle.remove()
        self._state_hooks = []
        self._state_checks = {}
        self._check_states = False

    def _state_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._check_states or not isinstance(output, tuple) or len(output) != 2:
                return
            state = output[1]
            if not isinstance(state, CMSState) or not state.levels:
                return
            tensors = [t.detach() for lvl in state.levels for t in (*lvl.weights, *(lvl.pending or ()))]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()  # stays on the device until logged
            previous = self._state_checks.get(name)
            self._state_checks[name] = finite if previous is None else previous & finite

        return hook

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check = self._stop_on_nonfinite or should_log(trainer)
        self._check_states = bool(self._state_hooks) and check

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mfus = self.protocol(trainer).participants(MultiFrequencyUpdates)
        optimizers = trainer.optimizers
        names = {id(p): n for n, p in pl_module.named_parameters()}
        owner = optimizer_of_params(optimizers)
        self._watches = [{} for _ in optimizers]
        self._levels = {lvl.name: (lvl.every, mfu.book.params(lvl.name)) for mfu in self._mfus for lvl in mfu.levels}
        if self._mfus:
            for name, (every, params) in self._levels.items():
                where = {owner[id(p)] for _, p in params if id(p) in owner}
                for i in where:
                    self._watches[i][name] = _Watch(name, every, params)
        else:
            for i, opt in enumerate(optimizers):
                name = "all" if len(optimizers) == 1 else f"optimizer_{i}"
                params = [(names.get(id(p), f"param_{j}"), p) for j, p in enumerate(_params_of(opt))]
                watch = _Watch(name, 1, params, updates=self._loaded_updates.get(name, 0))
                self._watches[i][name] = watch
        levels = list(self._levels) if self._mfus else list(self.watches)
        write_custom_scalars(trainer.loggers, custom_scalars_layout(levels, prefix=self._prefix))
        super().on_train_start(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ a step
    @override
    def on_step_phase(
        self, phase: Phase, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: Optimizer
    ) -> None:
        """Measure the due levels before the step (after the rules wrote the learning rates); after it, count the
        step and measure the drift."""
        if phase is Phase.MEASURE:
            self._measure(trainer, index, optimizer)
        elif phase is Phase.COMMIT:
            self._record(index)

    def _measure(self, trainer: pl.Trainer, i: int, optimizer: Optimizer) -> None:
        watches = self._watches[i]
        if not self.step_has_gradients(i):
            due: tuple[str, ...] = ()  # no backward (`training_step` returned None): the step updates no level
        elif self._mfus:
            due = self.protocol(trainer).due(i)  # the plan phase made them due
        else:
            due = tuple(watches)
        step = logging_step(trainer)
        interval = max(trainer.log_every_n_steps, 1)
        next_log = math.ceil(step / interval) * interval
        for name in due:
            w = watches.get(name)
            if w is None and name in self._levels:  # its parameters joined this optimizer after train start
                w = watches[name] = _Watch(name, *self._levels[name])
            # Measure the level's last update at or before the next logging step.
            if w is not None and (step == next_log or step + w.every > next_log):
                self._measure_before(w, optimizer, trainer)

    def _measure_before(self, w: _Watch, optimizer: Optimizer, trainer: pl.Trainer) -> None:
        grads = [p.grad.detach() for _, p in w.params if p.grad is not None]
        scale = _unscale_factor(trainer, optimizer)
        w.grad_norm = _norm(grads) * scale if grads else 0.0
        w.lr = _lr_of(optimizer, w.params[0][1]) if w.params else None
        w.snapshot = [p.detach().clone() for _, p in w.params]
        w.pending = True
        if self._wants_histograms(trainer) and grads:
            w.histograms["grad"] = _flat(grads) * scale

    def _record(self, i: int) -> None:
        """Count the real step (the commit phase) and measure the drift of the levels measured before it.

        Without ``MultiFrequencyUpdates`` every level of the optimizer counts the step, if it carried gradients.
        """
        counts = not self._mfus and self.step_has_gradients(i)
        for w in self._watches[i].values():
            if counts:
                w.updates += 1
            if not w.pending or w.snapshot is None:
                continue
            deltas = [p.detach() - before for (_, p), before in zip(w.params, w.snapshot, strict=True)]
            w.drift = _norm(deltas)
            before = _norm(w.snapshot)
            w.drift_rel = w.drift / before if before > 0 else math.inf if w.drift > 0 else 0.0
            if "grad" in w.histograms:
                w.histograms["update"] = _flat(deltas)
            w.snapshot, w.pending = None, False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        histograms: dict[str, Tensor] = {}
        for w in self.watches.values():
            if w.pending:  # the step was skipped (GradScaler): forget the measurement
                w.snapshot, w.pending = None, False
                w.histograms.clear()
            for kind, values in w.histograms.items():
                histograms[f"{self._prefix}/{w.name}/{kind}"] = values
            w.histograms = {}
        if histograms:
            self._write_histograms(trainer, histograms)
        logs = should_log(trainer)
        bad_states: list[str] = []
        if logs or self._stop_on_nonfinite:
            bad_states = self._report_nonfinite_states() if self._state_hooks else []
            self._check_nonfinite(trainer, pl_module, outputs, bad_states)
        if not logs:
            return
        updates = {name: n for mfu in self._mfus for name, n in mfu.num_updates.items()}
        metrics: dict[str, float] = {}
        for w in self.watches.values():
            metrics[f"{self._prefix}/{w.name}/updates"] = float(updates.get(w.name, w.updates))
            for key in ("grad_norm", "drift", "drift_rel", "lr"):
                value = getattr(w, key)
                if value is not None:
                    metrics[f"{self._prefix}/{w.name}/{key}"] = float(value)
        if self._state_hooks:
            metrics[f"{self._prefix}/nonfinite_states"] = float(len(bad_states))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _report_nonfinite_states(self) -> list[str]:
        """The modules whose states were non-finite in this step (warning once per module); clears the checks."""
        bad = [name for name, finite in self._state_checks.items() if not bool(finite)]
        self._state_checks = {}
        self._check_states = False
        new = [name for name in bad if name not in self._reported]
        if new:
            self._reported.update(new)
            rank_zero_warn(
                f"{type(self).__name__}: the token-axis CMS states of {new} hold NaN or inf: their writes diverged"
                " (an inner_lr too large for the activations' scale). Lower the inner_lr of these modules' levels, or"
                " set retention < 1 to bound how far the fast weights drift.",
                category=RuntimeWarning,
            )
        return bad

    def _check_nonfinite(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, bad_states: list[str]
    ) -> None:
        """Warn (once) on a non-finite training loss, naming where it started; stop the run if asked to."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        bad_loss = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
        bad = bad_loss or bool(bad_states)
        if self._stop_on_nonfinite:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # every process stops together
        if not bad:
            return
        step = trainer.global_step
        where = [f"the token-axis CMS states of {bad_states}"] if bad_states else []
        param = next((n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
        if param is not None:
            where.append(f"the parameter {param!r} (the first non-finite one)")
        what = f"the training loss is {float(loss)}" if bad_loss else "the training loss is finite"
        found = ", ".join(where) or "the loss only (states and parameters finite)"
        reason = f"at step {step} {what}; non-finite: {found}"
        if self._stop_on_nonfinite:
            if self.stop_reason is None:
                self.stop_reason = reason
                trainer.should_stop = True
                rank_zero_warn(
                    f"{type(self).__name__} stops the run (stop_on_nonfinite=True): {reason}.", category=RuntimeWarning
                )
        elif bad_loss and not self._loss_reported:
            self._loss_reported = True
            rank_zero_warn(
                f"{type(self).__name__}: {reason}. Pass stop_on_nonfinite=True to stop the run instead.",
                category=RuntimeWarning,
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Name the modules whose states went non-finite in the failed step, if it was checked (a CMSAdapter raises
        ``FloatingPointError`` on the outputs of diverged writes)."""
        if self._state_checks:
            self._report_nonfinite_states()

    # ------------------------------------------------------------------------------------------------ helpers
    def _wants_histograms(self, trainer: pl.Trainer) -> bool:
        return self._log_histograms and any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)

    @rank_zero_only
    def _write_histograms(self, trainer: pl.Trainer, histograms: dict[str, Tensor]) -> None:
        step = logging_step(trainer) - 1  # the step self.log uses for this batch
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, values in histograms.items():
                    logger.experiment.add_histogram(tag, values.cpu(), global_step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._mfus:
            return {}  # MultiFrequencyUpdates checkpoints the clocks
        return {"updates": {w.name: w.updates for w in self.watches.values()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_updates = dict(state_dict.get("updates", {}))  # the counts need no optimizer: kept as they come

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_watches": [], "_levels": {}, "_state_hooks": [], "_state_checks": {}}


def _params_of(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _lr_of(optimizer: Optimizer, param: Tensor) -> Optional[float]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            lr = group.get("lr")
            return float(lr) if lr is not None else None
    return None


def _norm(tensors: list[Tensor]) -> float:
    """The L2 norm of a list of tensors taken as one vector, computed in fp32.

    Sharded tensors (``DTensor``, FSDP2) count whole: one all-reduce, the same value on every rank.
    """
    if not tensors:
        return 0.0
    if any(is_dtensor(t) for t in tensors):
        return math.sqrt(float(global_sums([(t, t) for t in tensors])[0]))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


def _flat(tensors: list[Tensor]) -> Tensor:
    """The tensors as one flat fp32 vector, sharded ones gathered whole (a collective) for a histogram."""
    return torch.cat([(t.full_tensor() if is_dtensor(t) else t).float().flatten() for t in tensors])


def _unscale_factor(trainer: pl.Trainer, optimizer: Optimizer) -> float:
    """Gradients of a fused optimizer are still scaled in ``on_before_optimizer_step`` under a GradScaler."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0 / float(scaler.get_scale())
    return 1.0
