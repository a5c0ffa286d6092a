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
Delta Momentum
^^^^^^^^^^^^^^

Momentum as a memory trained with an L2 (delta-rule) objective instead of a dot product (Eq. 21-22, NL NeurIPS).
With :math:`\hat g = g / \max(\lVert g \rVert, 10^{-12})` and :math:`\beta_\Delta \in [0, 1]` (our reading
[ours], explained below):

.. math::

    m_{i+1} = \alpha\, m_i - \beta_\Delta\, \hat g_i \langle \hat g_i, m_i \rangle - \eta\, P(g_i),
    \qquad W_{i+1} = W_i + m_{i+1}

**Why this reading.** The printed rule :math:`m \leftarrow (\alpha I - g_i^\top g_i)\, m - \eta P_i g_i` has shapes
that do not close for a matrix gradient (:math:`g^\top g` is ``in x in`` and cannot left-multiply an ``out x in``
momentum; for a vector it is a scalar or a ``d x d`` outer product depending on the convention), and the appendix
version :math:`m \leftarrow \alpha m - \eta (m g_i - P_i) g_i^\top` has the same problem. What both express is one
gradient step on the L2 objective :math:`\tfrac12 \lVert \langle m, \hat g \rangle - p \rVert^2`, whose gradient
:math:`\hat g \hat g^\top m - p\, \hat g` adds a *gradient-dependent decay* to the retention: the component of
:math:`m` along the new gradient is dropped (by :math:`\beta_\Delta`), the rest is kept (by :math:`\alpha`). We
apply it to ``m`` flattened (``projection="tensor"``) or to each row of its matrix view (``projection="row"``), so no
``d x d`` matrix is ever formed. Normalising ``g`` keeps the decay :math:`\alpha I - \beta_\Delta \hat g \hat g^\top`
a contraction: its eigenvalues are :math:`\alpha` and :math:`\alpha - \beta_\Delta`, both in ``[-1, 1]`` for
:math:`\alpha, \beta_\Delta \in [0, 1]`, where :math:`\alpha - \lVert g \rVert^2` would blow up on a large gradient.

With ``delta=0`` this is exactly :class:`~nl_lightning.optim.preconditioned_momentum.PreconditionedMomentum` with the
same preconditioner; with ``delta=1``, ``momentum=1`` the step keeps only the part of ``m`` orthogonal to ``g``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from nl_lightning._validation import check_choice, check_unit
from nl_lightning.optim._preconditioner import MomentumOptimizer

__all__ = ["DeltaMomentum"]

PROJECTIONS = ("tensor", "row")


def _projection(g: Tensor, m: Tensor, delta: float, projection: str) -> Tensor:
    """``delta * g_hat <g_hat, m>`` over the whole tensor or per row of the matrix view, in ``m``'s shape."""
    rows = g.shape[0] if projection == "row" and g.ndim >= 2 else 1
    g2, m2 = g.reshape(rows, -1), m.reshape(rows, -1)  # (R, n)
    g_hat = g2 / torch.linalg.vector_norm(g2, dim=1, keepdim=True).clamp_min(1e-12)  # (R, n)
    dot = (g_hat * m2).sum(dim=1, keepdim=True)  # (R, 1)
    return (g_hat * (delta * dot)).view_as(m)


class DeltaMomentum(MomentumOptimizer):
    r"""Delta momentum: ``m <- alpha m - delta g_hat <g_hat, m> - lr P(g)``, ``W <- W + m`` (Eq. 21-22, NL NeurIPS).

    The decay term is our reading of the paper's L2-objective momentum (see the module docstring). Every argument
    but ``params`` and ``foreach`` can be overridden per parameter group; the retention ``alpha`` lives in
    ``group["momentum"]``.

    Args:
        params: Parameters or parameter groups.
        lr: The learning rate ``eta >= 0`` (a float or a 0-dim tensor).
        momentum: The retention ``alpha`` in ``[0, 1]``.
        delta: The delta-rule step ``beta_Delta`` in ``[0, 1]``: the fraction of ``m``'s component along the new
            gradient that is removed. ``0`` gives :class:`PreconditionedMomentum`.
        preconditioner: ``"identity"`` (default), ``"rms"`` or ``"newton_schulz"``, as in
            :class:`~nl_lightning.optim.preconditioned_momentum.PreconditionedMomentum`.
        projection: ``"tensor"``: ``g_hat`` and ``<g_hat, m>`` over the whole flattened tensor (default);
            ``"row"``: per row of the matrix view ``(shape[0], -1)`` (1-D parameters: the whole tensor).
        beta2: The decay of the second moment in ``[0, 1)`` (``"rms"`` only).
        eps: Added to :math:`\sqrt{\hat v}`, ``> 0`` (``"rms"`` only).
        ns_steps: Newton-Schulz iterations ``T >= 0`` (``"newton_schulz"`` only).
        weight_decay: Decoupled weight decay ``>= 0``: ``W <- W (1 - lr weight_decay)`` before the update.
        foreach: Use ``torch._foreach_*`` ops for the element-wise parts (same results as the per-tensor path).
            ``None`` picks them when every parameter of the group is on CUDA.

    Raises:
        ValueError: If a hyper-parameter (of the defaults or of a group) is out of range or an option unknown.

    State per parameter: ``step``, ``momentum_buffer`` and, for ``"rms"``, ``exp_avg_sq``.

    Example::

        opt = DeltaMomentum(model.parameters(), lr=1e-2, momentum=0.9, delta=0.5)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        delta: float = 0.5,
        preconditioner: str = "identity",
        projection: str = "tensor",
        beta2: float = 0.999,
        eps: float = 1e-8,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            delta=delta,
            preconditioner=preconditioner,
            projection=projection,
            beta2=beta2,
            eps=eps,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_unit("delta", group["delta"])
        check_choice("projection", group["projection"], PROJECTIONS)

    def _retain_(self, group: dict[str, Any], grads: list[Tensor], bufs: list[Tensor], foreach: bool) -> None:
        """``m <- alpha m - delta g_hat <g_hat, m>`` in place (the projection uses ``m`` before the decay)."""
        proj = [_projection(g, m, group["delta"], group["projection"]) for g, m in zip(grads, bufs, strict=True)]
        if foreach:
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_sub_(bufs, proj)
        else:
            for m, q in zip(bufs, proj, strict=True):
                m.mul_(group["momentum"]).sub_(q)
