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
Gradient Preconditioners (private)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

The pieces that :class:`~nl_lightning.optim.preconditioned_momentum.PreconditionedMomentum`,
:class:`~nl_lightning.optim.delta_momentum.DeltaMomentum` and :class:`~nl_lightning.optim.m3.M3` share:

- :func:`precondition`, the map :math:`P(g)` of the preconditioned momentum (Eq. 20, NL NeurIPS):
  ``"identity"`` (:math:`g`), ``"rms"`` (:math:`g / (\sqrt{\hat v} + \epsilon)` with Adam's bias-corrected second
  moment) or ``"newton_schulz"`` (:math:`\mathrm{NS}_T(g)` for matrices, ``"rms"`` for 1-D tensors);
- :class:`MomentumOptimizer`, the step ``W <- W + m`` with ``m <- retain(m) - lr P(g)`` (Eq. 17-18), whose
  ``retain`` is ``alpha m`` for the preconditioned momentum and the delta rule's projection for delta momentum;
- the hyper-parameter checks of :meth:`MomentumOptimizer._check_group` (with :mod:`nl_lightning._validation`),
  which raise ``ValueError`` naming the bad value and the allowed range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from nl_lightning._validation import check_choice, check_int, check_nonnegative, check_positive, check_unit
from nl_lightning.optim.newton_schulz import newton_schulz

PRECONDITIONERS = ("identity", "rms", "newton_schulz")


# ----------------------------------------------------------------------------------------------------------- tensors
def as_matrix(t: Tensor) -> Tensor:
    """``t`` (``ndim >= 2``) as a matrix ``(shape[0], numel // shape[0])``; a conv kernel ``(out, in, kh, kw)``
    becomes ``(out, in * kh * kw)``."""
    return t.reshape(t.shape[0], -1)


def default_foreach(params: Sequence[Tensor]) -> bool:
    """``foreach=None`` means: the multi-tensor path when every parameter is on CUDA, the per-tensor path otherwise."""
    return all(p.is_cuda for p in params)


def uses_rms(p: Tensor, kind: str) -> bool:
    """Whether ``p`` needs the second moment ``exp_avg_sq``: ``"rms"``, and ``"newton_schulz"`` on a 1-D tensor."""
    return kind == "rms" or (kind == "newton_schulz" and p.ndim < 2)


def precondition(
    grads: Sequence[Tensor],
    exp_avg_sqs: Sequence[Optional[Tensor]],
    steps: Sequence[int],
    kind: str,
    beta2: float,
    eps: float,
    ns_steps: int,
    foreach: bool,
) -> list[Tensor]:
    r"""Return :math:`P(g)` for each gradient and update the second moments in place (Eq. 20, NL NeurIPS).

    Args:
        grads: The gradients ``g``.
        exp_avg_sqs: The second moments ``v`` (``None`` where ``uses_rms`` is false), updated in place.
        steps: The 1-based step count ``t`` of each parameter, for the bias correction ``1 - beta2**t``.
        kind: ``"identity"``, ``"rms"`` or ``"newton_schulz"``.
        beta2: The decay of ``v``.
        eps: Added to :math:`\sqrt{\hat v}`.
        ns_steps: The Newton-Schulz iterations ``T``.
        foreach: Whether to update ``v`` with ``torch._foreach_*`` ops (same results as the per-tensor path).

    Returns:
        One tensor per gradient, of the gradient's shape (the gradient itself for ``"identity"``).

    """
    if kind == "identity":
        return list(grads)
    out = list(grads)
    rms = [i for i, g in enumerate(grads) if uses_rms(g, kind)]
    for i, g in enumerate(grads):
        if not uses_rms(g, kind):  # "newton_schulz" on a matrix (or a conv kernel viewed as one)
            out[i] = newton_schulz(as_matrix(g), ns_steps).view_as(g)
    if not rms:
        return out
    gs = [grads[i] for i in rms]
    vs = [exp_avg_sqs[i] for i in rms]
    bias = [1 - beta2 ** steps[i] for i in rms]  # v_hat = v / (1 - beta2^t)
    if foreach:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
        den = torch._foreach_div(vs, bias)
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, eps)
        pg = torch._foreach_div(gs, den)
    else:
        pg = []
        for g, v, c in zip(gs, vs, bias, strict=True):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            pg.append(g / (v / c).sqrt().add_(eps))
    for i, p in zip(rms, pg, strict=True):
        out[i] = p
    return out


# ----------------------------------------------------------------------------------------------------------- step
class MomentumOptimizer(Optimizer):
    r"""Base of the momentum optimizers of NL NeurIPS Sec. 4: ``W <- W + m`` with ``m <- retain(m) - lr P(g)``.

    Subclasses set the signature, :meth:`_check_group` and, for a decay other than ``alpha m``, :meth:`_retain_`.
    State per parameter: ``step`` (a float32 scalar tensor), ``momentum_buffer`` (``m``) and, where a second moment
    is used, ``exp_avg_sq`` (``v``), all but ``step`` in the parameter's dtype.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_unit("momentum", group["momentum"])
        check_choice("preconditioner", group["preconditioner"], PRECONDITIONERS)
        check_unit("beta2", group["beta2"], closed=False)
        check_positive("eps", group["eps"])
        check_int("ns_steps", group["ns_steps"], 0, allow_numpy=True)
        check_nonnegative("weight_decay", group["weight_decay"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyper-parameters (those it overrides and the defaults)."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _retain_(self, group: dict[str, Any], grads: list[Tensor], bufs: list[Tensor], foreach: bool) -> None:
        """The decay part of the momentum update, in place: ``m <- alpha m`` (Eq. 20, NL NeurIPS)."""
        if foreach:
            torch._foreach_mul_(bufs, group["momentum"])
        else:
            for m in bufs:
                m.mul_(group["momentum"])

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list, list[int]]:
        params, grads, bufs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use dense ones.")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if uses_rms(p, group["preconditioner"]) and "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = state["step"] + 1  # a new tensor: never aliases a loaded state_dict's
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
            sqs.append(state.get("exp_avg_sq") if uses_rms(p, group["preconditioner"]) else None)
            steps.append(int(state["step"].item()))
        return params, grads, bufs, sqs, steps

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model and returns the loss (run with gradients enabled).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If a gradient is sparse.

        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs, sqs, steps = self._init_group(group)
            if not params:
                continue
            foreach = default_foreach(params) if group["foreach"] is None else group["foreach"]
            lr, wd = float(group["lr"]), group["weight_decay"]
            pg = precondition(
                grads, sqs, steps, group["preconditioner"], group["beta2"], group["eps"], group["ns_steps"], foreach
            )
            self._retain_(group, grads, bufs, foreach)
            if foreach:
                if wd > 0:
                    torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay
                torch._foreach_add_(bufs, pg, alpha=-lr)  # m <- retain(m) - lr P(g)
                torch._foreach_add_(params, bufs)  # W <- W + m
            else:
                for p, m, u in zip(params, bufs, pg, strict=True):
                    if wd > 0:
                        p.mul_(1 - lr * wd)
                    m.add_(u, alpha=-lr)
                    p.add_(m)
        return loss
