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
Self-Modifying Rules
^^^^^^^^^^^^^^^^^^^^

Hope "modifies its own learning rules as it runs" (NL NeurIPS, Sec. 5): the hyper-parameters of the outer
optimization are one more level, updated from the training signal. A :class:`SelfModifyingRule` keeps a *multiplier*
per hyper-parameter of each target (a parameter group, or a level of
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates`) and applies it around each real optimizer step:

1. the modulate phase of the step protocol (:class:`~nl_lightning.callbacks.StepProtocol`), from
   ``on_before_optimizer_step``, after :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` planned the step
   (gradients final: accumulated, all-reduced, unscaled): the rule updates its multipliers
   (:meth:`SelfModifyingRule.update_multipliers`), saves the group's value and writes ``value * multiplier``;
2. the restore phase, in a torch step post-hook after the update: the rule observes it
   (:meth:`SelfModifyingRule.after_step`) and the saved value is written back.

So an LR scheduler keeps stepping its own clean value (the effective learning rate is *schedule x rule*), and
checkpoints hold the clean values while the multipliers live in the callback's state. A step a ``GradScaler`` skips
is neither observed nor modulated (the torch post-hook does not run for it), and neither is a step without gradients (a
``training_step`` that returned ``None``, after which Lightning still calls the optimizer step): it counts no update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from nl_lightning._sharded import gather_full, global_sums, is_dtensor
from nl_lightning.callbacks._state import ConfiguredStateKey
from nl_lightning.callbacks._step_hooks import Phase, StepHookCallback, should_log
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates

__all__ = ["RuleTarget", "SelfModifyingRule"]

HPARAMS = ("lr", "momentum", "weight_decay")


@dataclass
class RuleTarget:
    """What a rule modulates: some parameter groups of one optimizer, named for logs and checkpoints.

    Attributes:
        name: The level's name for a level target, else the group's ``"name"`` entry or ``"group<j>"``
            (``"opt<i>/group<j>"`` with several optimizers).
        optimizer: The index of the optimizer in ``trainer.optimizers``.
        groups: Indices of the target's groups in that optimizer's ``param_groups``.
        params: ``(name, parameter)`` pairs of the target.
        level: The level name for a level target, else ``None``: the rule then acts only on the level's update steps.

    """

    name: str
    optimizer: int
    groups: tuple[int, ...]
    params: list[tuple[str, Tensor]]
    level: Optional[str] = None


def get_hparam(group: dict[str, Any], hparam: str) -> float:
    """Read ``hparam`` from a parameter group: ``"momentum"`` falls back to ``betas[0]`` (Adam family)."""
    if hparam == "momentum" and "momentum" not in group and "betas" in group:
        return float(group["betas"][0])
    return float(group[hparam])


def set_hparam(group: dict[str, Any], hparam: str, value: float) -> None:
    """Write ``hparam`` into a parameter group in place (a tensor learning rate is filled, never replaced)."""
    if hparam == "momentum" and "momentum" not in group and "betas" in group:
        group["betas"] = (value, *tuple(group["betas"])[1:])
    elif isinstance(group[hparam], Tensor):
        group[hparam].fill_(value)
    else:
        group[hparam] = value


def has_hparam(group: dict[str, Any], hparam: str) -> bool:
    """Whether ``hparam`` can be read from and written to ``group``."""
    return hparam in group or (hparam == "momentum" and "betas" in group)


class SelfModifyingRule(ConfiguredStateKey, StepHookCallback):
    r"""Base class of the rules that modify an optimizer's hyper-parameters online, around each real step.

    A subclass implements :meth:`update_multipliers`, which reads the step's (final) gradients or any other signal and
    sets ``self.multipliers[target.name][hparam]``. The base class resolves the targets, applies
    ``effective = value * multiplier`` before the step and restores ``value`` after it, logs every effective value as
    ``<log_prefix>/<target>/<hparam>`` (and its multiplier as ``..._multiplier``) at the Trainer's logging steps,
    checkpoints the multipliers (plus :meth:`extra_state`) and refuses two rules on one hyper-parameter of one group.
    The checkpoint key names ``hparams``, ``level`` and ``groups``, so rules on different targets keep their own state.

    Every rank must take the same decisions. Under DDP the gradients are all-reduced before the hook; under FSDP2
    (``ModelParallelStrategy`` with ``fully_shard``) parameters and gradients are sharded (``DTensor``), and a rule
    must reduce over the whole tensors (:func:`cosine` does, with one all-reduce).

    Args:
        hparams: The group entries to modulate: ``"lr"``, ``"momentum"`` (``betas[0]`` for the Adam family) and/or
            ``"weight_decay"``.
        level: The name of a :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` level (of any instance) to
            target: the level's parameters must form whole parameter groups of one optimizer, and the rule acts on the
            level's update steps only. ``None`` targets parameter groups.
        groups: With ``level=None``, the groups to target: indices into the first optimizer's ``param_groups``,
            ``"i/j"`` strings (optimizer ``i``, group ``j``) or group ``"name"`` entries. ``None``: every group of
            every optimizer.
        log_prefix: The prefix of the logged effective values.

    Raises:
        MisconfigurationException: On an unknown or repeated hyper-parameter, or both ``level`` and ``groups`` (at
            construction); at train start on a level that does not exist or shares a group with other parameters, a
            group that does not exist or lacks a hyper-parameter, or a second rule on the same group and
            hyper-parameter.

    """

    step_phases = (Phase.MODULATE, Phase.RESTORE)

    def __init__(
        self,
        hparams: Sequence[str] = ("lr",),
        level: Optional[str] = None,
        groups: Optional[Sequence[Union[int, str]]] = None,
        log_prefix: str = "rule",
    ) -> None:
        super().__init__()
        if isinstance(hparams, str):
            hparams = (hparams,)
        hparams = tuple(hparams)
        unknown = [h for h in hparams if h not in HPARAMS]
        if not hparams or unknown or len(set(hparams)) != len(hparams):
            raise MisconfigurationException(
                f"{type(self).__name__}(hparams={list(hparams)!r}): give one or more distinct entries of {HPARAMS}."
            )
        if level is not None and groups is not None:
            raise MisconfigurationException(
                f"{type(self).__name__} got both level={level!r} and groups={list(groups)!r}: target one or the other."
            )
        if groups is not None and (isinstance(groups, (str, int)) or not groups):
            raise MisconfigurationException(
                f"{type(self).__name__}(groups={groups!r}): pass a non-empty list, for example [0] or ['0/1']."
            )
        self.hparams_to_modify = hparams
        self.level = level
        self.groups = None if groups is None else list(groups)
        self.log_prefix = log_prefix
        self.targets: list[RuleTarget] = []
        self.multipliers: dict[str, dict[str, float]] = {}
        self.num_updates: dict[str, int] = {}
        self._mfu: Optional[MultiFrequencyUpdates] = None  # the instance that defines `level` (or the first one)
        self._known_levels: list[str] = []
        self._saved: dict[int, list[tuple[dict[str, Any], str, float]]] = {}  # optimizer -> (group, hparam, value)
        self._applied: dict[int, list[RuleTarget]] = {}  # optimizer -> targets modulated on the pending step
        self.effective: dict[str, dict[str, float]] = {}  # the last effective values, per target

    # ------------------------------------------------------------------------------------------------ subclass API
    def update_multipliers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: RuleTarget) -> None:
        """Update ``self.multipliers[target.name]`` before a real step of ``target`` (its gradients are final)."""
        raise NotImplementedError

    def after_step(self, target: RuleTarget) -> None:
        """Called after a real step of ``target`` that this rule modulated, before the values are restored."""

    def clamp(self, target: RuleTarget, hparam: str, value: float) -> float:
        """Bound an effective value (the base class keeps a momentum below 1)."""
        return min(value, 0.9999) if hparam == "momentum" else value

    def extra_state(self) -> dict[str, Any]:
        """Additional checkpoint state of a subclass (tensors, primitives, lists and str-keyed dicts only).

        Sharded tensors (``DTensor``, FSDP2) may be returned as they are: the checkpoint holds them whole.
        """
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (called at train start, once targets are resolved).

        Tensors come back whole, also under FSDP2: lay those of sharded parameters out like the parameter again, as
        :class:`~nl_lightning.callbacks.HypergradientRule` does.
        """

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``hparams``, ``level`` and ``groups``."""
        return {"hparams": list(self.hparams_to_modify), "level": self.level, "groups": self.groups}

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mfus = self.protocol(trainer).participants(MultiFrequencyUpdates)
        owners = [cb for cb in mfus if self.level in {lvl.name for lvl in cb.levels}]
        self._mfu = owners[0] if owners else mfus[0] if mfus else None
        self._known_levels = [lvl.name for cb in mfus for lvl in cb.levels]
        self.targets = self._resolve_targets(trainer, pl_module)
        self._check_no_overlap(trainer)
        for t in self.targets:
            self.multipliers.setdefault(t.name, {h: 1.0 for h in self.hparams_to_modify})
            self.num_updates.setdefault(t.name, 0)
        state = self.take_loaded_state()
        if state is not None:
            for name, mults in state.get("multipliers", {}).items():
                if name in self.multipliers:
                    self.multipliers[name].update(
                        {h: float(v) for h, v in mults.items() if h in self.multipliers[name]}
                    )
            for name, n in state.get("num_updates", {}).items():
                if name in self.num_updates:
                    self.num_updates[name] = int(n)
            self.load_extra_state(state.get("extra", {}))
        self._saved.clear()
        self._applied.clear()
        super().on_train_start(trainer, pl_module)

    def _resolve_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[RuleTarget]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        optimizers = trainer.optimizers
        if self.level is not None:
            return [self._level_target(optimizers, names)]
        wanted = None if self.groups is None else [self._parse_group(g, optimizers) for g in self.groups]
        targets = []
        for i, opt in enumerate(optimizers):
            for j, group in enumerate(opt.param_groups):
                if wanted is not None and (i, j) not in wanted:
                    continue
                default = f"group{j}" if len(optimizers) == 1 else f"opt{i}/group{j}"
                params = [(names.get(id(p), f"opt{i}.group{j}.{k}"), p) for k, p in enumerate(group["params"])]
                targets.append(RuleTarget(str(group.get("name") or default), i, (j,), params))
        self._check_hparams(targets, optimizers)
        return targets

    def _parse_group(self, spec: Union[int, str], optimizers: list[Optimizer]) -> tuple[int, int]:
        where = [
            (i, j) for i, o in enumerate(optimizers) for j, g in enumerate(o.param_groups) if g.get("name") == spec
        ]
        if where:
            return where[0]
        i, j = 0, spec
        if isinstance(spec, str) and "/" in spec:
            i, _, j = spec.partition("/")
        try:
            i, j = int(i), int(j)
            optimizers[i].param_groups[j]
        except (ValueError, IndexError, TypeError):
            shape = [len(o.param_groups) for o in optimizers]
            raise MisconfigurationException(
                f"{type(self).__name__}: group {spec!r} does not exist (optimizers have {shape} parameter groups)."
                " Use a group index, 'optimizer/group' or the 'name' entry of a group."
            ) from None
        return i, j

    def _level_target(self, optimizers: list[Optimizer], names: dict[int, str]) -> RuleTarget:
        cls = type(self).__name__
        if self._mfu is None:
            raise MisconfigurationException(
                f"{cls}(level={self.level!r}) needs a MultiFrequencyUpdates callback in the Trainer that defines it."
            )
        known = self._known_levels
        if self.level not in known:
            raise MisconfigurationException(f"{cls}: level {self.level!r} is not one of the levels {known}.")
        params = self._mfu.book.params(self.level)
        mine = {id(p) for _, p in params}
        holders = {
            (i, j)
            for i, o in enumerate(optimizers)
            for j, g in enumerate(o.param_groups)
            for p in g["params"]
            if id(p) in mine
        }
        if not holders:
            raise MisconfigurationException(f"{cls}: the parameters of level {self.level!r} are in no optimizer.")
        if len({i for i, _ in holders}) > 1:
            raise MisconfigurationException(f"{cls}: level {self.level!r} spans several optimizers.")
        i = next(iter(holders))[0]
        for _, j in sorted(holders):
            others = [names.get(id(p), "?") for p in optimizers[i].param_groups[j]["params"] if id(p) not in mine]
            if others:
                raise MisconfigurationException(
                    f"{cls}(level={self.level!r}): parameter group {j} of optimizer {i} also holds {others[:3]}, which"
                    f" are not in the level, so changing its hyper-parameters would change theirs too. Give the"
                    f" level's parameters their own parameter group in `configure_optimizers`."
                )
        target = RuleTarget(self.level, i, tuple(sorted(j for _, j in holders)), list(params), level=self.level)
        self._check_hparams([target], optimizers)
        return target

    def _check_hparams(self, targets: list[RuleTarget], optimizers: list[Optimizer]) -> None:
        for t in targets:
            for j in t.groups:
                group = optimizers[t.optimizer].param_groups[j]
                missing = [h for h in self.hparams_to_modify if not has_hparam(group, h)]
                if missing:
                    raise MisconfigurationException(
                        f"{type(self).__name__}: {type(optimizers[t.optimizer]).__name__} group {j} has no"
                        f" {missing} entry (it has {sorted(k for k in group if k != 'params')}); choose `hparams`"
                        " among those."
                    )

    def _check_no_overlap(self, trainer: pl.Trainer) -> None:
        mine = {(t.optimizer, j, h) for t in self.targets for j in t.groups for h in self.hparams_to_modify}
        for cb in self.protocol(trainer).participants(SelfModifyingRule):
            if cb is self or not cb.targets:
                continue
            theirs = {(t.optimizer, j, h) for t in cb.targets for j in t.groups for h in cb.hparams_to_modify}
            if mine & theirs:
                i, j, h = sorted(mine & theirs)[0]
                raise MisconfigurationException(
                    f"{type(self).__name__} and {type(cb).__name__} both modify {h!r} of group {j} of optimizer {i};"
                    " one rule per hyper-parameter and group (target different groups, levels or hparams)."
                )

    # ------------------------------------------------------------------------------------------------ a step
    @override
    def on_step_phase(
        self, phase: Phase, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: Optimizer
    ) -> None:
        """Modulate the coming step of ``optimizer``; after it, observe the update and restore the clean values."""
        if phase is Phase.MODULATE:
            self._modulate(trainer, pl_module, index)
        elif phase is Phase.RESTORE:
            for t in self._applied.pop(index, []):
                self.after_step(t)
                self.num_updates[t.name] += 1
            self._restore(index)

    def _modulate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, i: int) -> None:
        """Update the multipliers and write the effective values for the coming step of optimizer ``i``.

        A step that a ``GradScaler`` will skip, or that carries no gradient (:meth:`step_has_gradients`), is left
        alone: no multiplier moves, no value is written and no update is counted. A level target is modulated only on
        the steps the plan phase made due for its level.
        """
        if i in self._applied:
            return
        self._applied[i] = []
        targets = [t for t in self.targets if t.optimizer == i]
        if not targets:
            return
        due = self.protocol(trainer).due(i) if self._mfu is not None else ()
        if getattr(trainer.precision_plugin, "scaler", None) is not None and not _grads_finite(targets):
            return  # the GradScaler will skip this step: neither observe nor modulate it
        if not self.step_has_gradients(i):
            return  # a step without gradients (no backward) updates nothing: neither observe nor modulate it
        opt = trainer.optimizers[i]
        saved = self._saved.setdefault(i, [])
        for t in targets:
            if t.level is not None and t.level not in due:
                continue
            self.update_multipliers(trainer, pl_module, t)
            effective = self.effective.setdefault(t.name, {})
            for j in t.groups:
                group = opt.param_groups[j]
                for h in self.hparams_to_modify:
                    value = get_hparam(group, h)
                    saved.append((group, h, value))
                    effective[h] = self.clamp(t, h, value * self.multipliers[t.name][h])
                    set_hparam(group, h, effective[h])
            self._applied[i].append(t)
        self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only on the Trainer's logging steps (`log_every_n_steps`): `self.log` costs more than a small model's step.
        if not should_log(trainer):
            return
        metrics = {
            f"{self.log_prefix}/{name}/{h}": v for name, values in self.effective.items() for h, v in values.items()
        }
        metrics.update(
            {
                f"{self.log_prefix}/{name}/{h}_multiplier": m
                for name, ms in self.multipliers.items()
                for h, m in ms.items()
            }
        )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _restore(self, i: int) -> None:
        for group, h, value in reversed(self._saved.pop(i, [])):
            set_hparam(group, h, value)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Whatever is still applied belongs to a step that did not happen (GradScaler): restore, observe nothing.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for i in list(self._saved):
            self._restore(i)
        self._applied.clear()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for i in list(self._saved):
            self._restore(i)
        self._applied.clear()
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.targets and self._loaded_state is not None:
            return dict(self._loaded_state)
        return {
            "multipliers": {k: dict(v) for k, v in self.multipliers.items()},
            "num_updates": dict(self.num_updates),
            "extra": gather_full(self.extra_state()),  # sharded (FSDP2) tensors whole: rank 0 writes for all ranks
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_saved": {}, "_applied": {}, "_mfu": None, "targets": []}


def _grads_finite(targets: list[RuleTarget]) -> bool:
    grads = [p.grad for t in targets for _, p in t.params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The cosine between two lists of tensors taken as one vector each (fp32; 0 when either is zero).

    Sharded tensors (``DTensor``, FSDP2) count whole: their local sums are all-reduced (a collective, so every rank
    must call it) and every rank gets the same cosine.
    """
    if any(is_dtensor(t) for t in (*a, *b)):
        dot, na2, nb2 = global_sums(list(zip(a, b, strict=True)), [(x, x) for x in a], [(y, y) for y in b])
        na, nb = torch.sqrt(na2), torch.sqrt(nb2)
    else:
        dot = sum((x.float() * y.float()).sum() for x, y in zip(a, b, strict=True))
        na = torch.sqrt(sum(x.float().pow(2).sum() for x in a))
        nb = torch.sqrt(sum(y.float().pow(2).sum() for y in b))
    denom = na * nb
    return torch.where(denom > 0, dot / torch.clamp(denom, min=math.ldexp(1.0, -126)), torch.zeros_like(denom))
