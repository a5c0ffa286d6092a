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
Scheduled Rule
^^^^^^^^^^^^^^

A user function decides, before each real step, by how much to multiply each hyper-parameter of a parameter group or
level: a learning rule written by the user, that can read the step, the level and any logged metric. It is
configurable from YAML by import path::

    callbacks:
      - class_path: nl_lightning.callbacks.ScheduledRule
        init_args:
          fn: nl_lightning.callbacks.scheduled_rule.surprise
          level: backbone
          kwargs: {key: train_loss, reference: 0.5}

Two example functions ship here: :func:`warmup` (a linear warm-up of the target's own updates, e.g. a slow level
that starts cautiously) and :func:`surprise` (learn faster while the loss is high, the surprise signal of Titans).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from nl_lightning.callbacks.self_modifying import RuleTarget, SelfModifyingRule

__all__ = ["ScheduledRule", "surprise", "warmup"]

RuleFn = Callable[..., Union[float, Mapping[str, float]]]


class ScheduledRule(SelfModifyingRule):
    """Multiply hyper-parameters by the output of a user function of the step, the target and the logged metrics.

    Before each real step of each target (not one a ``GradScaler`` skips, nor one without gradients after a
    ``training_step`` that returned ``None``), the rule calls::

        fn(step=..., target=..., metrics=..., **kwargs) -> float | dict[str, float]

    with ``step`` the number of updates the target has taken so far (0 on its first; for a level, the level's own
    clock), ``target`` the level or group name, and ``metrics`` the Trainer's ``callback_metrics`` as floats (what
    ``self.log`` recorded, e.g. ``train_loss``). A float multiplies every hyper-parameter in ``hparams``; a dict
    gives one multiplier per hyper-parameter (missing ones stay 1). The effective value is *schedule x multiplier*.
    Under DDP the multipliers of rank 0 are broadcast, so every rank applies the same values even if local metrics
    differ. Multipliers and update counts are checkpointed; the function must be a picklable module-level function
    (not a lambda) for ``ddp_spawn``.

    Args:
        fn: The function, or its import path ``"package.module.function"`` (the form YAML uses).
        hparams: The group entries to modulate: ``"lr"``, ``"momentum"``, ``"weight_decay"``.
        kwargs: Extra keyword arguments passed to ``fn`` on every call.
        level: Target one level of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` (see
            :class:`~nl_lightning.callbacks.SelfModifyingRule`).
        groups: Target these parameter groups (default: all).
        log_prefix: The prefix of the logged effective values.

    Raises:
        MisconfigurationException: If ``fn`` is not callable or its import path does not resolve (at construction),
            and the errors of :class:`~nl_lightning.callbacks.SelfModifyingRule`.
        ValueError: If ``fn`` returns something other than a finite number ``>= 0`` or a dict of them keyed by
            ``hparams`` (at the step where it does).

    Example::

        from nl_lightning.callbacks import ScheduledRule
        from nl_lightning.callbacks.scheduled_rule import warmup

        rule = ScheduledRule(warmup, level="backbone", kwargs={"steps": 50})

    """

    def __init__(
        self,
        fn: Union[str, RuleFn],
        hparams: Sequence[str] = ("lr",),
        kwargs: Optional[dict[str, Any]] = None,
        level: Optional[str] = None,
        groups: Optional[Sequence[Union[int, str]]] = None,
        log_prefix: str = "scheduled",
    ) -> None:
        super().__init__(hparams, level=level, groups=groups, log_prefix=log_prefix)
        self.fn = _resolve(fn)
        self.kwargs = dict(kwargs or {})

    @override
    def update_multipliers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: RuleTarget) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
        out = self.fn(step=self.num_updates[target.name], target=target.name, metrics=metrics, **self.kwargs)
        mults = self._check(out)
        if trainer.world_size > 1:
            mults = trainer.strategy.broadcast(mults, src=0)
        self.multipliers[target.name].update(mults)

    def _check(self, out: Any) -> dict[str, float]:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        if isinstance(out, Mapping):
            unknown = [k for k in out if k not in self.hparams_to_modify]
            if unknown:
                raise ValueError(
                    f"ScheduledRule: {name} returned multipliers for {unknown}, which are not in"
                    f" hparams={list(self.hparams_to_modify)}; return those keys only, or add them to `hparams`."
                )
            items = dict(out)
        else:
            items = dict.fromkeys(self.hparams_to_modify, out)
        for h, v in items.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(
                    f"ScheduledRule: {name} returned {v!r} for {h!r}; a multiplier must be a finite number >= 0."
                )
        return {h: float(v) for h, v in items.items()}


def _resolve(fn: Union[str, RuleFn]) -> RuleFn:
    if isinstance(fn, str):
        module, _, attr = fn.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), attr) if module else None
        except (ImportError, AttributeError) as err:
            raise MisconfigurationException(
                f"ScheduledRule(fn={fn!r}): cannot import it ({err}). Give 'package.module.function' of a function"
                " importable on every process."
            ) from err
        if fn is None:
            raise MisconfigurationException("ScheduledRule(fn=...): give the full path 'package.module.function'.")
    if not callable(fn):
        raise MisconfigurationException(f"ScheduledRule(fn={fn!r}): it is not callable.")
    return fn


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1)


def warmup(step: int, target: str, metrics: Mapping[str, float], steps: int = 100, start: float = 0.0) -> float:
    """A linear warm-up over the target's first ``steps`` updates: the multiplier goes from ``start`` to 1.

    Args:
        step: The target's number of updates so far.
        target: The target's name (unused).
        metrics: The logged metrics (unused).
        steps: The length of the warm-up, in the target's own updates.
        start: The multiplier of the first update.

    """
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1.0 - start) * step / steps


def surprise(
    step: int,
    target: str,
    metrics: Mapping[str, float],
    key: str = "train_loss",
    reference: float = 1.0,
    power: float = 1.0,
    bounds: tuple[float, float] = (0.1, 10.0),
) -> float:
    """Scale with the loss: ``clip((metrics[key] / reference) ** power, *bounds)``, 1 until ``key`` is logged.

    A high loss (a surprise, e.g. a new task) speeds learning up; a low one slows it down, protecting what was learned.

    Args:
        step: The target's number of updates so far (unused).
        target: The target's name (unused).
        metrics: The logged metrics.
        key: The metric to read.
        reference: The loss at which the multiplier is 1.
        power: The exponent.
        bounds: ``(min, max)`` of the multiplier.

    """
    value = metrics.get(key)
    if value is None or not math.isfinite(value) or value < 0:
        return 1.0
    return min(max((value / reference) ** power, bounds[0]), bounds[1])
