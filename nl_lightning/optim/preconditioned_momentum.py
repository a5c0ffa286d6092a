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
Preconditioned Momentum
^^^^^^^^^^^^^^^^^^^^^^^

Momentum is a memory over gradients; Nested Learning changes what it stores by writing a *preconditioned* gradient
``P(g)`` instead of ``g`` (Eq. 20, NL NeurIPS), with the sign convention of Eq. 17-18 (NL NeurIPS):

.. math::

    m_{i+1} = \alpha\, m_i - \eta\, P(g_i), \qquad W_{i+1} = W_i + m_{i+1}

The paper only asks for ``P`` to be "a useful map of gradients (e.g. curvature)"; three are offered:

- ``"identity"``: :math:`P(g) = g`, heavy-ball momentum (``torch.optim.SGD`` with ``dampening=0``: its buffer ``b``
  is ``-m / lr`` when the learning rate is constant);
- ``"rms"`` (default): a diagonal curvature proxy, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
  :math:`\hat v = v / (1-\beta_2^t)`, :math:`P(g) = g / (\sqrt{\hat v} + \epsilon)`;
- ``"newton_schulz"``: :math:`P(g) = \mathrm{NS}_T(g)` on matrices (conv kernels viewed as ``(out, -1)``), the
  orthogonalised gradient of Muon, stored in momentum rather than applied to it; 1-D tensors (biases, norms) have no
  matrix structure and fall back to ``"rms"``.
"""

from __future__ import annotations

from typing import Optional

from torch.optim.optimizer import ParamsT

from nl_lightning.optim._preconditioner import MomentumOptimizer

__all__ = ["PreconditionedMomentum"]


class PreconditionedMomentum(MomentumOptimizer):
    r"""Momentum over preconditioned gradients: ``m <- alpha m - lr P(g)``, ``W <- W + m`` (Eq. 20, NL NeurIPS).

    Every argument but ``params`` and ``foreach`` can be overridden per parameter group. The retention ``alpha`` lives
    in ``group["momentum"]`` (the key ``torch.optim.SGD`` uses), so a rule that schedules momentum finds it there.

    Args:
        params: Parameters or parameter groups.
        lr: The learning rate ``eta >= 0`` (a float or a 0-dim tensor).
        momentum: The retention ``alpha`` in ``[0, 1]``.
        preconditioner: ``"identity"``, ``"rms"`` or ``"newton_schulz"`` (see the module docstring). Under
            ``"newton_schulz"`` a parameter with ``ndim < 2`` uses ``"rms"``.
        beta2: The decay of the second moment ``v`` in ``[0, 1)`` (``"rms"`` only).
        eps: Added to :math:`\sqrt{\hat v}`, ``> 0`` (``"rms"`` only).
        ns_steps: Newton-Schulz iterations ``T >= 0`` (quintic, fp32 inside; ``"newton_schulz"`` only).
        weight_decay: Decoupled weight decay ``>= 0``: ``W <- W (1 - lr weight_decay)`` before the update.
        foreach: Use ``torch._foreach_*`` ops across a group's parameters (same results as the per-tensor path).
            ``None`` picks them when every parameter of the group is on CUDA.

    Raises:
        ValueError: If a hyper-parameter (of the defaults or of a group) is out of range or an option unknown.

    State per parameter: ``step`` (float32 scalar tensor), ``momentum_buffer`` (``m``) and, for ``"rms"``,
    ``exp_avg_sq`` (``v``), in the parameter's dtype.

    Example::

        opt = PreconditionedMomentum(model.parameters(), lr=1e-3, momentum=0.9, preconditioner="rms")
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        preconditioner: str = "rms",
        beta2: float = 0.999,
        eps: float = 1e-8,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            preconditioner=preconditioner,
            beta2=beta2,
            eps=eps,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            foreach=foreach,
        )
        super().__init__(params, defaults)
