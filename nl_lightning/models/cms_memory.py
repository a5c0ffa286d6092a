# Copyright The Lightning AI team.
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
CMS Fast Weights
^^^^^^^^^^^^^^^^

The token-axis machinery of the Continuum Memory System: per-sample fast weights of a two-layer MLP, their pending
chunk gradients, and the closed-form gradient of the local objective
:math:`\tfrac12\lVert W_2\,\sigma(W_1 k + b_1) + b_2 - v\rVert^2`. Closed forms need no autograd, so writes work under
``torch.inference_mode()``, and a chunk's gradients are a few batched matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "CMSState", "FastWeights", "mlp_forward", "mlp_grads"]


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


#: name -> (activation, its derivative)
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, _gelu_grad),
    "silu": (F.silu, _silu_grad),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
}


def mlp_forward(
    k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = W2 act(W1 k + b1) + b2``, returning ``(y, z, a)`` (pre-activation and activation kept for the gradient).

    Shared weights (``w1`` ``(H, D)``) take ``k`` of any shape ``(..., D)``; per-sample weights (``w1`` ``(B, H, D)``)
    take ``k`` ``(B, n, D)``.
    """
    act = ACTIVATIONS[activation][0]
    if w1.dim() == 2:
        z = F.linear(k, w1, b1)
        a = act(z)
        return F.linear(a, w2, b2), z, a
    z = torch.baddbmm(b1.unsqueeze(1), k, w1.transpose(1, 2))  # (B, n, H)
    a = act(z)
    return torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2)), z, a  # (B, n, D)


def mlp_grads(
    k: Tensor, z: Tensor, a: Tensor, error: Tensor, w2: Tensor, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample gradients of ``sum_t 0.5 * ||y_t - v_t||^2`` w.r.t. ``(w1, b1, w2, b2)``, summed over the tokens.

    Args:
        k: Inputs ``(B, n, D)``.
        z: Pre-activations ``(B, n, H)``.
        a: Activations ``(B, n, H)``.
        error: ``y - v`` ``(B, n, D)``.
        w2: The per-sample output weights ``(B, D, H)`` the tokens were read with.
        activation: The activation's name.

    Returns:
        ``(g_w1 (B, H, D), g_b1 (B, H), g_w2 (B, D, H), g_b2 (B, D))``.

    """
    g_w2 = error.transpose(1, 2) @ a  # (B, D, H)
    g_b2 = error.sum(dim=1)  # (B, D)
    dz = (error @ w2) * ACTIVATIONS[activation][1](z)  # (B, n, H)
    g_w1 = dz.transpose(1, 2) @ k  # (B, H, D)
    g_b1 = dz.sum(dim=1)  # (B, H)
    return g_w1, g_b1, g_w2, g_b2


def piece_lengths(seq: int, count: int, size: int) -> list[int]:
    """Lengths of the pieces of ``seq`` tokens cut at the chunk ends of a stream whose current chunk of ``size`` tokens
    has ``count`` tokens read (``0 <= count < size``)."""
    first = min(size - count, seq)
    rest = seq - first
    return [first] + [size] * (rest // size) + ([rest % size] if rest % size else [])


def _portable(t: Tensor) -> Tensor:
    """Detached, and usable outside ``torch.inference_mode`` even if it was made inside it."""
    t = t.detach()
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


@dataclass
class FastWeights:
    """One CMS level's token-axis state: per-sample MLP weights, the pending chunk gradients and the chunk position.

    Attributes:
        w1, b1, w2, b2: The fast weights, ``(B, H, D)``, ``(B, H)``, ``(B, D, H)``, ``(B, D)``, fp32.
        pending: Summed gradients of the tokens read so far in the current chunk (``None`` when none).
        count: Tokens read so far in the current chunk (``0 <= count < chunk_size`` between calls).
        initial_share: ``c`` such that, under first-order writes, the weights depend on the learned initial weights
            ``w0`` as ``c * w0`` plus a constant: 1 for a fresh state, 0 after :meth:`detach`, ``ρ c + 1 - ρ`` after
            a write with retention ``ρ``. It lets such a write route the retention's gradient exactly (see
            :meth:`write`).

    """

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    pending: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None
    count: int = 0
    initial_share: float = 0.0

    @property
    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.w1, self.b1, self.w2, self.b2

    def advance(self, tokens: int) -> FastWeights:
        return replace(self, count=self.count + tokens)

    def add_pending(self, grads: tuple[Tensor, Tensor, Tensor, Tensor]) -> FastWeights:
        if self.pending is None:
            return replace(self, pending=grads)
        return replace(self, pending=tuple(p + g for p, g in zip(self.pending, grads, strict=True)))

    def write(
        self,
        scale: float,
        retention: float = 1.0,
        initial: Optional[tuple[Tensor, ...]] = None,
        first_order: bool = False,
    ) -> FastWeights:
        """Close the chunk: ``w <- w0 + retention * (w - w0) - scale * pending``.

        Args:
            scale: The step on the pending gradient sums (none pending: no step).
            retention: The share of the distance from ``initial`` (``w0``) the weights keep; 1 keeps all of it, the
                plain ``w <- w - scale * pending`` of Eq. 31.
            initial: ``w0`` (``w1, b1, w2, b2``, broadcast against the weights); needed when ``retention < 1``.
            first_order: The pending gradients carry no graph (``differentiable_writes=False``). Then the update is
                computed without a graph and added as a constant, and the retention's gradient to ``w0``, exactly
                ``(1 - retention)(1 - initial_share)`` times the weights' gradient, is added as one broadcast term:
                the same gradient as the plain formula with fewer and cheaper backward steps.

        """
        share = retention * self.initial_share + 1 - retention
        if retention != 1.0 and initial is None:
            raise ValueError("A write with `retention` < 1 needs the `initial` weights it decays towards.")
        if retention != 1.0 and first_order:
            return self._first_order_write(scale, retention, initial, share)
        new = list(self.weights)
        if retention != 1.0:
            new = [torch.lerp(w0, w, retention) for w, w0 in zip(new, initial, strict=True)]  # one op and node each
        if self.pending is not None:
            new = [torch.add(w, g, alpha=-scale) for w, g in zip(new, self.pending, strict=True)]
        return FastWeights(*new, pending=None, count=0, initial_share=share)

    def _first_order_write(
        self, scale: float, retention: float, initial: tuple[Tensor, ...], share: float
    ) -> FastWeights:
        with torch.no_grad():
            delta = [torch.lerp(w0, w, retention).sub_(w) for w, w0 in zip(self.weights, initial, strict=True)]
            if self.pending is not None:
                delta = [d.sub_(g, alpha=scale) for d, g in zip(delta, self.pending, strict=True)]
        new = [w + d for w, d in zip(self.weights, delta, strict=True)]  # d is a constant: the gradient passes through
        route = (1 - retention) * (1 - self.initial_share)
        if route and torch.is_grad_enabled() and any(w0.requires_grad for w0 in initial):
            new = [w + route * (w0 - w0.detach()) for w, w0 in zip(new, initial, strict=True)]  # value 0, gradient
        return FastWeights(*new, pending=None, count=0, initial_share=share)

    def map(self, fn: Callable[[Tensor], Tensor]) -> FastWeights:
        pending = tuple(fn(p) for p in self.pending) if self.pending is not None else None
        return FastWeights(*(fn(w) for w in self.weights), pending, self.count, self.initial_share)

    def detach(self) -> FastWeights:
        """:func:`_portable` weights and pending sums; they no longer depend on the initial weights."""
        return replace(self.map(_portable), initial_share=0.0)


@dataclass
class CMSState:
    """The token-axis state of a :class:`~nl_lightning.models.ContinuumMemory`: one :class:`FastWeights` per level.

    Pass it back to continue a stream; ``None`` starts a new sequence from the learned initial weights.
    """

    levels: list[FastWeights] = field(default_factory=list)

    def detach(self) -> CMSState:
        """Stop gradients here (truncated backpropagation between segments); also makes a state computed under
        ``torch.inference_mode`` usable outside it."""
        return CMSState([lvl.detach() for lvl in self.levels])

    def to(self, *args: Any, **kwargs: Any) -> CMSState:
        return CMSState([lvl.map(lambda t: t.to(*args, **kwargs)) for lvl in self.levels])

    def select(self, index: Tensor) -> CMSState:
        """The states of some samples of the batch (e.g. those whose sequence continues)."""
        return CMSState([lvl.map(lambda t: t[index]) for lvl in self.levels])

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists and ints only (loads with ``torch.load(weights_only=True)``); detached."""
        out = []
        for lvl in self.detach().levels:
            out.append({"weights": list(lvl.weights), "pending": list(lvl.pending or []), "count": lvl.count})
        return {"levels": out}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CMSState:
        levels = []
        for s in state["levels"]:
            pending = tuple(s["pending"]) if s["pending"] else None
            levels.append(FastWeights(*s["weights"], pending=pending, count=int(s["count"])))
        return cls(levels)
