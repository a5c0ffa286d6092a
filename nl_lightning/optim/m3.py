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
M3: Multi-scale Momentum Muon
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

M3 (Algorithm 1 and Eq. 75 of arXiv:2512.24695) is Adam + Muon + an independent two-level
Continuum Memory System over gradients: a fast momentum ``M1`` written every step, a slow momentum ``M2`` written
once every ``f = slow_every`` steps from the gradients of the block just finished, both orthogonalised by
Newton-Schulz and divided by Adam's second moment. For a matrix parameter, at step ``t`` (1-based), in the default
EMA form:

.. math::

    M_1 &\leftarrow \beta_1 M_1 + (1-\beta_1)\, g_t, \qquad V \leftarrow \beta_2 V + (1-\beta_2)\, g_t^2,
    \qquad \hat V = V / (1-\beta_2^t) \\
    \theta &\leftarrow \theta - \eta\, \frac{\mathrm{NS}_T(M_1) + \alpha\, O_2}{\sqrt{\hat V} + \epsilon} \\
    \text{if } t \equiv 0 \ (\mathrm{mod}\ f):&\quad M_2 \leftarrow \beta_3 M_2 + (1-\beta_3)\, \frac1f
    \sum_{i=t-f+1}^{t} g_i, \qquad O_2 = \mathrm{NS}_T(M_2)

So ``O2 = 0`` for the first ``f`` steps, and steps ``kf+1 .. (k+1)f`` use the slow momentum built from the gradients
of steps ``(k-1)f+1 .. kf``: the paper's "M2 of block k uses the gradients of block k-1", with exactly ``f`` terms
(its printed sum from ``(k-1)f`` to ``kf`` has ``f + 1``; we use ``f`` [ours]).

Choices where the paper is open [ours]:

- **EMA or plain sums** (``literal``). Algorithm 1 prints plain sums with no decay and no bias correction:
  ``M1 <- M1 + beta1 g``, ``V <- V + beta2 g^2``, ``M2 <- M2 + beta3 sum(g)``, and
  ``theta <- theta - lr (O1 + alpha O2) / (sqrt(V) + eps)``. Adam and Muon, which M3 combines, use EMAs, so the
  default is the EMA form above; ``literal=True`` gives the printed sums (``V`` then only grows, an Adagrad-like
  decaying step). ``M1`` and ``M2`` need no bias correction in either form: ``NS_T`` is scale-invariant.
- **eps outside the root**: ``sqrt(V_hat) + eps``, as Adam; some readings put it inside, ``sqrt(V_hat + eps)``.
- **1-D parameters** (biases, norm gains) have no matrix to orthogonalise; they use AdamW (bias-corrected, with
  ``beta1, beta2`` and decoupled weight decay, in both forms) at learning rate ``adamw_lr`` (default: ``lr``).
- **Scale.** Muon applies ``NS_T(M)``, whose entries are about ``1 / sqrt(max(rows, cols))``; M3 then divides it
  element-wise by ``sqrt(V_hat) ~ |g|``, so its step is neither Muon's (``~lr / sqrt(n)``) nor Adam's (``~lr``): an
  entry moves by about ``lr |O1| / (|g| + eps)``. Orthogonalisation lifts small singular directions to ~1, so an
  entry with a tiny gradient can get a large ``O1`` entry and a huge step; ``eps`` is what bounds it (by
  ``lr |O1| / eps``). Do not reuse a Muon or Adam learning rate.
- **Defaults** ``lr=1e-4`` and ``eps=1e-4`` [ours]. ``eps`` is far larger than Adam's ``1e-8`` because of the
  unbounded step above: it is the gradient size below which an entry's step stops growing, so scale it with your
  gradients. Tune ``lr`` for your model; the rates tuned by ``benchmarks/optimizers.py`` (classifiers and the
  orthogonal-task regression, against the other optimizers) are in ``benchmarks/results/optimizers.md``.
- Newton-Schulz is the quintic of :func:`~nl_lightning.optim.newton_schulz.newton_schulz` in fp32; a conv kernel
  ``(out, in, kh, kw)`` is orthogonalised as the matrix ``(out, in * kh * kw)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import chain
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from nl_lightning._validation import check_int, check_nonnegative, check_positive, check_unit
from nl_lightning.optim._preconditioner import as_matrix, default_foreach
from nl_lightning.optim.newton_schulz import newton_schulz

__all__ = ["M3"]


def _acc_dtype(p: Tensor) -> torch.dtype:
    """The gradient accumulator's dtype: at least float32 (float64 stays float64)."""
    return torch.promote_types(p.dtype, torch.float32)


class M3(Optimizer):
    r"""Multi-scale Momentum Muon (Algorithm 1, arXiv:2512.24695): Adam + Muon with a fast and a slow momentum.

    See the module docstring for the update and the choices made where the paper is open. Every argument but
    ``params`` and ``foreach`` can be overridden per parameter group. The slow clock is per parameter: ``step`` counts
    the steps at which the parameter had a gradient.

    Args:
        params: Parameters or parameter groups.
        lr: The learning rate ``eta >= 0`` of matrix parameters (a float or a 0-dim tensor).
        betas: ``(beta1, beta2, beta3)``, each in ``[0, 1)``: the decays (EMA form) or scales (``literal``) of the
            fast momentum ``M1``, the second moment ``V`` and the slow momentum ``M2``.
        alpha: The weight ``>= 0`` of the slow momentum's direction ``O2`` in the update.
        eps: Added to :math:`\sqrt{\hat V}`, ``> 0`` (outside the root).
        ns_steps: Newton-Schulz iterations ``T >= 0``.
        slow_every: The slow period ``f >= 1``: ``M2`` is written at steps ``f, 2f, ...``.
        weight_decay: Decoupled weight decay ``>= 0``: ``theta <- theta (1 - lr weight_decay)`` before the update
            (with ``adamw_lr`` for 1-D parameters).
        literal: Use Algorithm 1's printed plain sums and no bias correction instead of EMAs (matrix parameters only).
        adamw_lr: The learning rate ``>= 0`` of the AdamW update of 1-D parameters; ``None`` means ``lr``.
        foreach: Use ``torch._foreach_*`` ops for the element-wise parts (same results as the per-tensor path).
            ``None`` picks them when every parameter of the group is on CUDA.

    Raises:
        ValueError: If a hyper-parameter (of the defaults or of a group) is out of range.

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg`` (``M1``) and ``exp_avg_sq`` (``V``); matrices
    also ``slow_avg`` (``M2``), ``slow_orth`` (``O2 = NS_T(M2)``, cached) and ``slow_acc``, the sum of the current
    block's gradients in float32 (float64 for float64 parameters, kept so by :meth:`load_state_dict`). The rest is in
    the parameter's dtype.

    Example::

        opt = M3(model.parameters(), lr=1e-4, slow_every=100)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        alpha: float = 1.0,
        eps: float = 1e-4,
        ns_steps: int = 5,
        slow_every: int = 100,
        weight_decay: float = 0.0,
        literal: bool = False,
        adamw_lr: Optional[float] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            eps=eps,
            ns_steps=ns_steps,
            slow_every=slow_every,
            weight_decay=weight_decay,
            literal=literal,
            adamw_lr=adamw_lr,
            foreach=foreach,
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"`betas` must be a tuple (beta1, beta2, beta3), got {betas!r}.")
        for i, b in enumerate(betas, 1):
            check_unit(f"betas[{i - 1}] (beta{i})", b, closed=False)
        check_nonnegative("alpha", group["alpha"])
        check_positive("eps", group["eps"])
        check_int("ns_steps", group["ns_steps"], 0, allow_numpy=True)
        check_int("slow_every", group["slow_every"], 1, allow_numpy=True)
        check_nonnegative("weight_decay", group["weight_decay"])
        if not isinstance(group["literal"], bool):
            raise ValueError(f"`literal` must be True or False, got {group['literal']!r}.")
        if group["adamw_lr"] is not None:
            check_nonnegative("adamw_lr", group["adamw_lr"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyper-parameters (those it overrides and the defaults)."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state, keeping ``slow_acc`` in its own dtype (torch would cast it to the parameter's)."""
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for i, p in zip(ids, params, strict=True):
            acc = state_dict["state"].get(i, {}).get("slow_acc")
            if acc is not None:
                self.state[p]["slow_acc"] = acc.to(device=p.device, dtype=_acc_dtype(p), copy=True)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict], list[int]]:
        params, grads, states, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("M3 does not support sparse gradients; use dense ones.")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if p.ndim >= 2:
                    state["slow_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["slow_orth"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["slow_acc"] = torch.zeros_like(p, dtype=_acc_dtype(p), memory_format=torch.preserve_format)
            state["step"] = state["step"] + 1  # a new tensor: never aliases a loaded state_dict's
            params.append(p)
            grads.append(p.grad)
            states.append(state)
            steps.append(int(state["step"].item()))
        return params, grads, states, steps

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
            params, grads, states, steps = self._init_group(group)
            if not params:
                continue
            foreach = default_foreach(params) if group["foreach"] is None else group["foreach"]
            mat = [i for i, p in enumerate(params) if p.ndim >= 2]
            vec = [i for i, p in enumerate(params) if p.ndim < 2]
            if mat:
                _matrix_step(group, *_pick(mat, params, grads, states, steps), foreach)
            if vec:
                _adamw_step(group, *_pick(vec, params, grads, states, steps), foreach)
        return loss


def _pick(idx: list[int], *lists: list) -> list[list]:
    return [[xs[i] for i in idx] for xs in lists]


def _matrix_step(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    steps: list[int],
    foreach: bool,
) -> None:
    """M3 on matrix parameters (Algorithm 1, arXiv:2512.24695; EMA form unless ``literal``)."""
    lr, wd, alpha, eps, f = float(group["lr"]), group["weight_decay"], group["alpha"], group["eps"], group["slow_every"]
    (b1, b2, b3), literal, ns = group["betas"], group["literal"], group["ns_steps"]
    m1s, vs, accs, o2s = ([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "slow_acc", "slow_orth"))
    if foreach:
        if wd > 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(accs, grads)  # the current slow block's gradient sum
        if literal:
            torch._foreach_add_(m1s, grads, alpha=b1)  # M1 <- M1 + b1 g
            torch._foreach_addcmul_(vs, grads, grads, value=b2)  # V <- V + b2 g^2
            den = torch._foreach_sqrt(vs)
        else:
            torch._foreach_lerp_(m1s, grads, 1 - b1)  # M1 <- b1 M1 + (1 - b1) g
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)  # V <- b2 V + (1 - b2) g^2
            den = torch._foreach_div(vs, [1 - b2**t for t in steps])  # V_hat
            torch._foreach_sqrt_(den)
        torch._foreach_add_(den, eps)
        num = [newton_schulz(as_matrix(m1), ns).view_as(m1) for m1 in m1s]  # O1
        torch._foreach_add_(num, o2s, alpha=alpha)  # O1 + alpha O2
        torch._foreach_addcdiv_(params, num, den, value=-lr)
    else:
        for p, g, m1, v, acc, o2, t in zip(params, grads, m1s, vs, accs, o2s, steps, strict=True):
            if wd > 0:
                p.mul_(1 - lr * wd)
            acc.add_(g)
            if literal:
                m1.add_(g, alpha=b1)
                v.addcmul_(g, g, value=b2)
                den = v.sqrt()
            else:
                m1.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                den = (v / (1 - b2**t)).sqrt_()
            den.add_(eps)
            num = newton_schulz(as_matrix(m1), ns).view_as(m1).add_(o2, alpha=alpha)
            p.addcdiv_(num, den, value=-lr)
    for s, t in zip(states, steps, strict=True):  # end of a slow block: write M2 from its f gradients, refresh O2
        if t % f == 0:
            m2, acc = s["slow_avg"], s["slow_acc"]
            if literal:
                m2.add_(acc, alpha=b3)  # M2 <- M2 + b3 sum(g)
            else:
                m2.mul_(b3).add_(acc / f, alpha=1 - b3)  # M2 <- b3 M2 + (1 - b3) mean(g)
            s["slow_orth"].copy_(newton_schulz(as_matrix(m2), ns).view_as(m2))
            acc.zero_()


def _adamw_step(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    steps: list[int],
    foreach: bool,
) -> None:
    """AdamW on 1-D parameters, written as ``torch.optim.AdamW`` (bias-corrected, decoupled weight decay)."""
    lr = float(group["lr"] if group["adamw_lr"] is None else group["adamw_lr"])
    (b1, b2, _), wd, eps = group["betas"], group["weight_decay"], group["eps"]
    ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    step_size = [lr / (1 - b1**t) for t in steps]
    bc2_sqrt = [math.sqrt(1 - b2**t) for t in steps]
    if foreach:
        if wd > 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        den = torch._foreach_sqrt(vs)
        torch._foreach_div_(den, bc2_sqrt)
        torch._foreach_add_(den, eps)
        torch._foreach_addcdiv_(params, ms, den, [-s for s in step_size])
    else:
        for p, g, m, v, s, c in zip(params, grads, ms, vs, step_size, bc2_sqrt, strict=True):
            if wd > 0:
                p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            den = (v.sqrt() / c).add_(eps)
            p.addcdiv_(m, den, value=-s)
