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
Hypergradient Rule
^^^^^^^^^^^^^^^^^^

Adapt the learning rate (and optionally the momentum) of each parameter group or level online from the hypergradient
of the loss with respect to it: the optimizer's hyper-parameters become one more, slower, level of the nested
optimization (NL NeurIPS, Sec. 3-5: a learner whose context flow is the training signal of the level below).

For an update :math:`\theta_t = \theta_{t-1} + \Delta_{t-1}` proportional to the learning rate :math:`\eta`
(SGD, Adam, AdamW, ...), Baydin et al. (2018, "Online Learning Rate Adaptation with Hypergradient Descent") give

.. math::

    \frac{\partial \mathcal{L}(\theta_t)}{\partial \log \eta_{t-1}} = \langle g_t, \Delta_{t-1} \rangle,
    \qquad g_t = \nabla \mathcal{L}(\theta_t)

We descend it in log space with a scale-free (cosine-normalised) step, so that ``hyper_lr`` is dimensionless:

.. math::

    \log s_\eta \leftarrow \operatorname{clip}\big(\log s_\eta - \kappa \cos(g_t, \Delta_{t-1}),
    \log s_\text{min}, \log s_\text{max}\big), \qquad \eta_\text{eff} = s_\eta \, \eta_\text{schedule}

The last step kept going downhill (:math:`\cos < 0`): the rate grows; it overshot (:math:`\cos > 0`): it shrinks. For
heavy-ball momentum :math:`\Delta_{t-1} \approx \mu \Delta_{t-2} - \eta g_{t-1}`, so
:math:`\partial \mathcal{L}(\theta_t) / \partial \mu \approx \langle g_t, \Delta_{t-2} \rangle` and the momentum
multiplier follows the same rule with :math:`\cos(g_t, \Delta_{t-2})`, the effective momentum clipped to
``momentum_bounds``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from nl_lightning._sharded import shard_like
from nl_lightning.callbacks.self_modifying import RuleTarget, SelfModifyingRule, cosine, get_hparam

__all__ = ["HypergradientRule"]


class HypergradientRule(SelfModifyingRule):
    r"""Adapt learning rates (and momenta) online by multiplicative hypergradient descent (Baydin et al., 2018).

    Each target (a parameter group, or a :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` level with its own
    group) keeps a multiplier :math:`s` of its scheduled learning rate, updated before each of its real steps from the
    cosine between the new gradient and the target's previous update (module docstring). The multiplier stays in
    ``lr_bounds``; the effective momentum in ``momentum_bounds``. All ranks compute the same cosine (under DDP the
    gradients are all-reduced before ``on_before_optimizer_step``; under FSDP2 the cosine is taken over the whole
    sharded gradients and updates; it is averaged across ranks besides). Effective values and multipliers are logged
    as ``hypergradient/<target>/{lr,lr_multiplier,momentum,...}``; multipliers and the last updates are checkpointed,
    keyed by parameter name (whole tensors, also under FSDP2).

    The hypergradient is exact for optimizers whose step is proportional to the learning rate (SGD, Adam, AdamW,
    :class:`~nl_lightning.optim.M3`); for optimizers that put the rate inside a momentum
    (:class:`~nl_lightning.optim.PreconditionedMomentum`) it is the usual one-step approximation. A level target is
    updated on the level's update steps only, with the chunk gradient and the level's own previous update.

    Args:
        hparams: ``("lr",)``, ``("momentum",)`` or both. ``"momentum"`` is the group's ``momentum`` entry, or
            ``betas[0]`` for the Adam family.
        hyper_lr: :math:`\kappa`, the step of the learning-rate multiplier in log space (``0.02``: at most 2 % per
            step).
        momentum_hyper_lr: The same for the momentum multiplier (default: ``hyper_lr``).
        lr_bounds: ``(min, max)`` of the learning-rate multiplier.
        momentum_bounds: ``(min, max)`` of the effective momentum.
        level: Target one level of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` (see
            :class:`~nl_lightning.callbacks.SelfModifyingRule`).
        groups: Target these parameter groups (default: all).
        log_prefix: The prefix of the logged values.

    Raises:
        MisconfigurationException: On ``hyper_lr < 0``, bounds that are not ``0 < min <= 1 <= max`` for the learning
            rate or ``0 <= min <= max < 1`` for the momentum, ``"weight_decay"`` in ``hparams``, and the errors of
            :class:`~nl_lightning.callbacks.SelfModifyingRule`.

    Example::

        from nl_lightning.callbacks import HypergradientRule

        trainer = Trainer(callbacks=[HypergradientRule(hyper_lr=0.02, lr_bounds=(0.1, 10.0))])

    """

    def __init__(
        self,
        hparams: Sequence[str] = ("lr",),
        hyper_lr: float = 0.02,
        momentum_hyper_lr: Optional[float] = None,
        lr_bounds: tuple[float, float] = (0.1, 10.0),
        momentum_bounds: tuple[float, float] = (0.0, 0.99),
        level: Optional[str] = None,
        groups: Optional[Sequence[Union[int, str]]] = None,
        log_prefix: str = "hypergradient",
    ) -> None:
        super().__init__(hparams, level=level, groups=groups, log_prefix=log_prefix)
        if "weight_decay" in self.hparams_to_modify:
            raise MisconfigurationException(
                "HypergradientRule adapts 'lr' and 'momentum'; for 'weight_decay' use a ScheduledRule."
            )
        momentum_hyper_lr = hyper_lr if momentum_hyper_lr is None else momentum_hyper_lr
        for name, value in (("hyper_lr", hyper_lr), ("momentum_hyper_lr", momentum_hyper_lr)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise MisconfigurationException(f"HypergradientRule(`{name}`={value!r}): give a finite number >= 0.")
        lo, hi = _pair("lr_bounds", lr_bounds)
        if not 0 < lo <= 1 <= hi or not math.isfinite(hi):
            raise MisconfigurationException(
                f"HypergradientRule(lr_bounds={tuple(lr_bounds)!r}): the multiplier bounds must satisfy"
                " 0 < min <= 1 <= max < inf, for example (0.1, 10.0)."
            )
        mlo, mhi = _pair("momentum_bounds", momentum_bounds)
        if not 0 <= mlo <= mhi < 1:
            raise MisconfigurationException(
                f"HypergradientRule(momentum_bounds={tuple(momentum_bounds)!r}): the effective momentum bounds must"
                " satisfy 0 <= min <= max < 1, for example (0.0, 0.99)."
            )
        self.hyper_lr = float(hyper_lr)
        self.momentum_hyper_lr = float(momentum_hyper_lr)
        self.lr_bounds = (lo, hi)
        self.momentum_bounds = (mlo, mhi)
        # per target, keyed by parameter name: the parameters before the pending step, the last two updates (fp32)
        self._before: dict[str, dict[str, Tensor]] = {}
        self._last: dict[str, dict[str, Tensor]] = {}
        self._last2: dict[str, dict[str, Tensor]] = {}
        self.hypergradients: dict[str, dict[str, float]] = {}  # the last cosines, per target and hyper-parameter

    @override
    def update_multipliers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: RuleTarget) -> None:
        mults = self.multipliers[target.name]
        group = trainer.optimizers[target.optimizer].param_groups[target.groups[0]]
        hyper = self.hypergradients.setdefault(target.name, {})
        if "lr" in mults:
            cos = self._cosine(trainer, target, self._last.get(target.name))
            if cos is not None:
                hyper["lr"] = cos
                log_s = math.log(mults["lr"]) - self.hyper_lr * cos
                mults["lr"] = math.exp(min(max(log_s, math.log(self.lr_bounds[0])), math.log(self.lr_bounds[1])))
        if "momentum" in mults:
            cos = self._cosine(trainer, target, self._last2.get(target.name))
            if cos is not None:
                hyper["momentum"] = cos
                base = get_hparam(group, "momentum")
                mults["momentum"] = math.exp(math.log(max(mults["momentum"], 1e-12)) - self.momentum_hyper_lr * cos)
                if base > 0:
                    lo, hi = self.momentum_bounds
                    mults["momentum"] = min(max(mults["momentum"], lo / base), hi / base)
        self._before[target.name] = {n: p.detach().clone() for n, p in target.params if p.grad is not None}

    def _cosine(self, trainer: pl.Trainer, target: RuleTarget, last: Optional[dict[str, Tensor]]) -> Optional[float]:
        """``cos(g_t, last)`` over the target's parameters that have both, averaged across ranks (None: no past)."""
        if not last:
            return None
        pairs = [(p.grad, last[n]) for n, p in target.params if p.grad is not None and n in last]
        if not pairs:
            return None
        cos = cosine([g for g, _ in pairs], [d for _, d in pairs])
        cos = trainer.strategy.reduce(cos, reduce_op="mean")
        return float(cos)

    @override
    def after_step(self, target: RuleTarget) -> None:
        before = self._before.pop(target.name, {})
        update = {n: (p.detach() - before[n]).float() for n, p in target.params if n in before}
        if "momentum" in self.multipliers[target.name] and target.name in self._last:
            self._last2[target.name] = self._last[target.name]
        self._last[target.name] = update

    @override
    def clamp(self, target: RuleTarget, hparam: str, value: float) -> float:
        if hparam == "momentum":
            return min(max(value, self.momentum_bounds[0]), self.momentum_bounds[1])
        return value

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"last": self._last, "last2": self._last2}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        params = {t.name: dict(t.params) for t in self.targets}
        for key, into in (("last", self._last), ("last2", self._last2)):
            for name, updates in state.get(key, {}).items():
                if name in params:  # on the parameter's device, sharded as it is (FSDP2)
                    mine = params[name]
                    into[name] = {n: shard_like(u, mine[n]) for n, u in updates.items() if n in mine}


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise MisconfigurationException(f"HypergradientRule(`{name}`={value!r}): give a pair (min, max).") from None
    return lo, hi
