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

__all__ = [
    "ACTIVATIONS",
    "CMSState",
    "GATED",
    "FastWeights",
    "ReadPiece",
    "WriteRule",
    "check_activation",
    "first_order_reads",
    "hidden_activation",
    "is_gated",
    "mlp_forward",
    "mlp_grads",
    "write_factor",
]


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _gelu_new(z: Tensor) -> Tensor:
    """The tanh approximation of GELU written out, as GPT-2 computes it (op for op, so a converted GPT-2 MLP is
    bitwise the original): ``0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))``."""
    return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * torch.pow(z, 3.0))))


def _tanh_gelu_grad(z: Tensor) -> Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


#: name -> (activation, its derivative): the elementwise activations of the CMS and memory MLPs
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "gelu": (F.gelu, _gelu_grad),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"), _tanh_gelu_grad),
    "gelu_new": (_gelu_new, _tanh_gelu_grad),
    "silu": (F.silu, _silu_grad),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
}

#: prefix of a gated activation's name (``"glu_silu"`` is SwiGLU): the hidden pre-activation ``z`` ``(..., 2H)`` holds
#: the gate's ``H`` units then the up projection's, and the hidden activation is ``act(z_gate) * z_up`` ``(..., H)``
GATED = "glu_"


def is_gated(activation: str) -> bool:
    """Whether ``activation`` names a gated hidden layer (``"glu_<act>"``, e.g. ``"glu_silu"`` for SwiGLU)."""
    return activation.startswith(GATED)


def check_activation(activation: str) -> None:
    """Raise ``ValueError`` unless ``activation`` is a name of :data:`ACTIVATIONS`, or one prefixed with ``"glu_"``."""
    base = activation[len(GATED) :] if isinstance(activation, str) and is_gated(activation) else activation
    if base not in ACTIVATIONS:
        names = sorted(ACTIVATIONS) + [GATED + n for n in sorted(ACTIVATIONS)]
        raise ValueError(f"`activation` must be one of {names}, got {activation!r}.")


def hidden_activation(z: Tensor, activation: str, separate_gate: bool = False) -> Tensor:
    """The hidden activation ``a`` of the pre-activation ``z``: ``act(z)``, or ``act(z_gate) * z_up`` when gated (``z``
    ``(..., 2H)`` -> ``a`` ``(..., H)``). ``separate_gate`` applies it to contiguous copies of the two halves, as an
    FFN with separate gate and up projections does (an elementwise kernel on a strided view can round differently)."""
    if is_gated(activation):
        gate, up = z.chunk(2, dim=-1)
        if separate_gate:
            gate, up = gate.contiguous(), up.contiguous()
        return ACTIVATIONS[activation[len(GATED) :]][0](gate) * up
    return ACTIVATIONS[activation][0](z)


def _elementwise_backward(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if activation == "silu" and not (torch.is_grad_enabled() and (grad.requires_grad or z.requires_grad)):
        return torch.ops.aten.silu_backward(grad, z)
    return grad * ACTIVATIONS[activation][1](z)


def _activation_backward(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """The gradient w.r.t. the pre-activation ``z`` of a loss whose gradient w.r.t. the hidden activation is ``grad``:
    ``grad * act'(z)`` (one fused op for GELU, and for SiLU where no graph is recorded: aten's SiLU backward has no
    derivative of its own, so a differentiable SiLU path takes the written-out derivative). Gated: ``grad`` ``(..., H)``
    -> ``(..., 2H)``, ``[grad * z_up * act'(z_gate), grad * act(z_gate)]``."""
    if is_gated(activation):
        base = activation[len(GATED) :]
        gate, up = z.chunk(2, dim=-1)
        return torch.cat([_elementwise_backward(grad * up, gate, base), grad * ACTIVATIONS[base][0](gate)], dim=-1)
    return _elementwise_backward(grad, z, activation)


def _activation_jvp(tangent: Tensor, z: Tensor, activation: str) -> Tensor:
    """The change of the hidden activation for a change ``tangent`` of the pre-activation ``z``: ``act'(z) * tangent``
    (the same as :func:`_activation_backward` for an elementwise activation). Gated: ``tangent`` ``(..., 2H)`` ->
    ``(..., H)``, ``act'(z_gate) * t_gate * z_up + act(z_gate) * t_up``."""
    if is_gated(activation):
        base = activation[len(GATED) :]
        gate, up = z.chunk(2, dim=-1)
        t_gate, t_up = tangent.chunk(2, dim=-1)
        return _elementwise_backward(t_gate * up, gate, base) + ACTIVATIONS[base][0](gate) * t_up
    return _elementwise_backward(tangent, z, activation)


def mlp_forward(
    k: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, separate_gate: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = W2 act(W1 k + b1) + b2``, returning ``(y, z, a)`` (pre-activation and activation kept for the gradient).

    Shared weights (``w1`` ``(H, D)``) take ``k`` of any shape ``(..., D)``; per-sample weights (``w1`` ``(B, H, D)``)
    take ``k`` ``(B, n, D)``. A gated ``activation`` (``"glu_<act>"``) has ``w1`` ``(2H, D)`` (the gate's rows, then the
    up projection's), ``z`` ``(..., 2H)`` and ``a = act(z_gate) * z_up`` ``(..., H)``; with shared weights,
    ``separate_gate`` computes it as an FFN with separate gate and up projections does (see :func:`hidden_activation`).
    """
    if w1.dim() == 2:
        z = F.linear(k, w1, b1)
        a = hidden_activation(z, activation, separate_gate)
        return F.linear(a, w2, b2), z, a
    z = torch.baddbmm(b1.unsqueeze(1), k, w1.transpose(1, 2))  # (B, n, H), (B, n, 2H) gated
    a = hidden_activation(z, activation)  # (B, n, H)
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
    dz = _activation_backward(error @ w2, z, activation)  # (B, n, H)
    g_w1 = dz.transpose(1, 2) @ k  # (B, H, D)
    g_b1 = dz.sum(dim=1)  # (B, H)
    return g_w1, g_b1, g_w2, g_b2


@dataclass
class ReadPiece:
    """One piece of a first-order pass (tokens read with the same fast weights), as :func:`first_order_reads` needs it.

    Attributes:
        w1: The per-sample weights the piece was read with, ``(B, H, D)`` (values, no graph); also the anchor of the
            piece's gradients in the write that closes its chunk.
        w2: Likewise ``(B, D, H)``.
        share: :attr:`FastWeights.initial_share` of those weights.
        z: The piece's pre-activations ``(B, n, H)``.
        writes: The piece closes its chunk, so a write follows it in the same call.
        factor: The per-sample factor ``(B,)`` that bounded that write's step (:func:`write_factor`), ``None``: 1.

    """

    w1: Tensor
    w2: Tensor
    share: float
    z: Tensor
    writes: bool = False
    factor: Optional[Tensor] = None


@dataclass(frozen=True)
class WriteRule:
    """How a write uses its pending gradient sums: ``w <- w0 + retention * (w - w0) - scale * pending``.

    Attributes:
        scale: ``s``, the step on the pending sums (``inner_lr / C`` for the mean, ``inner_lr`` for the sum).
        retention: ``ρ``, the share of the distance from the initial weights ``w0`` the weights keep.

    """

    scale: float
    retention: float = 1.0


def _weight_grads(k: Tensor, a: Tensor, grad: Tensor, gz: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample gradients ``(w1 (B, H, D), b1 (B, H), w2 (B, D, H), b2 (B, D))`` of the fast weights a piece was read
    with, from the reads' gradient ``grad`` ``(B, n, D)`` and the pre-activations' ``gz`` ``(B, n, H)``."""
    return gz.transpose(1, 2) @ k, gz.sum(1), grad.transpose(1, 2) @ a, grad.sum(1)


def _target_grads(
    after: tuple[Tensor, ...], k: Tensor, a: Tensor, z: Tensor, w2: Tensor, activation: str, scale: Any
) -> Tensor:
    """``dL/dv_t = s [A_w2 a_t + A_b2 + W2 (act'(z_t) * (A_w1 k_t + A_b1))]`` ``(B, n, D)``: the gradient of the targets
    of the tokens ``k`` ``(B, n, D)`` of a chunk whose write is followed by reads whose gradient w.r.t. the written
    weights is ``A = after``. The write subtracts ``s`` times the pending sums, which are linear in ``v_t``:
    ``g_w2 = sum_t (y_t - v_t) a_t^T``, ``g_b2 = sum_t (y_t - v_t)`` and ``g_w1 = sum_t dz_t k_t^T``, ``g_b1 = sum_t
    dz_t`` with ``dz_t = act'(z_t) * (W2^T (y_t - v_t))``, ``W2`` ``(B, D, H)`` the anchor. ``scale``: a number, or
    per sample ``(B, 1, 1)`` where the write's step was bounded (its factor taken as a constant)."""
    a_w1, a_b1, a_w2, a_b2 = after
    u = torch.baddbmm(a_b1.unsqueeze(1), k, a_w1.transpose(1, 2))  # (B, n, H): A_w1 k_t + A_b1
    du = _activation_jvp(u, z, activation)  # (B, n, H)
    dv = torch.baddbmm(a_b2.unsqueeze(1), a, a_w2.transpose(1, 2))  # (B, n, D): A_w2 a_t + A_b2
    return dv.baddbmm_(du, w2.transpose(1, 2)).mul_(scale)  # + W2 du_t


def _value_grads(
    pieces: list[ReadPiece],
    keys: tuple[Tensor, ...],
    acts: tuple[Tensor, ...],
    grads: tuple[Tensor, ...],
    g_z: list[Tensor],
    activation: str,
    rule: WriteRule,
    route: list[float],
) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]]]:
    """The targets' gradient ``(B, S, D)`` by a reverse scan over the pieces, with the weights' gradients on the way.

    ``after`` is ``dL/dW`` of the weights read after the current piece (within this call), the gradient ``A`` of the
    write the piece closes; the weights read before that write get ``G_q + ρ A`` (``G_q`` the piece's own per-sample
    weight gradients, formed one piece at a time so that memory does not grow with the number of pieces). The tokens of
    a chunk whose write falls in a later call get no gradient.

    Returns:
        The targets' gradient, the gradients of the weights the pass started from (``sum_q G_q``), and those of the
        initial weights (``sum_q route_q G_q`` summed over the batch; ``None`` where no piece routes to them).

    """
    after: Optional[tuple[Tensor, ...]] = None
    total: Optional[list[Tensor]] = None
    routed: list[Optional[Tensor]] = [None] * 4
    out = []
    for q in reversed(range(len(pieces))):
        piece, k, a = pieces[q], keys[q], acts[q]
        own = _weight_grads(k, a, grads[q], g_z[q])  # G_q: (B, H, D), (B, H), (B, D, H), (B, D)
        total = list(own) if total is None else [t + g for t, g in zip(total, own, strict=True)]
        if route[q]:
            routed = [route[q] * g.sum(0) + (0 if r is None else r) for g, r in zip(own, routed, strict=True)]
        if piece.writes and after is not None:
            scale = rule.scale if piece.factor is None else rule.scale * piece.factor.view(-1, 1, 1)
            out.append(_target_grads(after, k, a, piece.z, piece.w2, activation, scale))
            after = tuple(g + rule.retention * w for g, w in zip(own, after, strict=True))
        else:  # no write in this call after this piece (only the last piece), or no reads after the write
            out.append(torch.zeros_like(k))
            after = own if after is None else tuple(g + w for g, w in zip(own, after, strict=True))
    assert total is not None
    return torch.cat(out[::-1], dim=1), total, routed


class _FirstOrderReads(torch.autograd.Function):
    """The reads of a pass whose writes are first order; see :func:`first_order_reads`."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, pieces: list[ReadPiece], activation: str, share: float, rule: WriteRule, *inputs: Tensor
    ) -> Tensor:
        keys, a = inputs[0], inputs[9]
        ctx.pieces, ctx.activation, ctx.share, ctx.rule = pieces, activation, share, rule
        ctx.save_for_backward(keys, a)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        keys, a = ctx.saved_tensors  # (B, S, D), (B, S, H)
        pieces: list[ReadPiece] = ctx.pieces
        needs = ctx.needs_input_grad[5:]  # keys, the 4 weights read from, the 4 initial weights, a, the targets
        lengths = [p.z.shape[1] for p in pieces]
        grads = grad.split(lengths, dim=1)
        g_z = [_activation_backward(g @ p.w2, p.z, ctx.activation) for p, g in zip(pieces, grads, strict=True)]
        out: list[Optional[Tensor]] = [None] * 11
        if needs[0]:
            out[0] = torch.cat([gz @ p.w1 for gz, p in zip(g_z, pieces, strict=True)], dim=1)  # (B, S, D)
        route = [p.share - ctx.share for p in pieces]  # the initial weights' extra share, per piece (write routes)
        if needs[10]:  # the targets: every piece's per-sample weight gradients, in a reverse scan
            ks, acts = keys.split(lengths, dim=1), a.split(lengths, dim=1)
            out[10], total, routed = _value_grads(pieces, ks, acts, grads, g_z, ctx.activation, ctx.rule, route)
            if any(needs[1:5]):
                out[1:5] = total
            if any(needs[5:9]) and any(route):
                out[5:9] = routed
            return (None,) * 5 + tuple(out)
        # the fast weights' gradients of every token: rank-1 per token, one GEMM over all tokens
        gz = torch.cat(g_z, dim=1)  # (B, S, H)
        if any(needs[1:5]):  # the weights the pass started from: each piece's weights are them plus a constant
            out[1:5] = _weight_grads(keys, a, grad, gz)
        if any(needs[5:9]) and any(route):
            r = torch.tensor(route, dtype=grad.dtype, device=grad.device)
            r = r.repeat_interleave(torch.tensor(lengths, device=grad.device))  # (S,)
            gz_r, grad_r = (gz * r[:, None]).flatten(0, 1), (grad * r[:, None]).flatten(0, 1)  # (B S, .)
            out[5:9] = [gz_r.T @ keys.flatten(0, 1), gz_r.sum(0), grad_r.T @ a.flatten(0, 1), grad_r.sum(0)]
        return (None,) * 5 + tuple(out)


def first_order_reads(
    y: Tensor,
    keys: Tensor,
    a: Tensor,
    pieces: list[ReadPiece],
    activation: str,
    share: float,
    weights: tuple[Tensor, ...],
    initial: tuple[Tensor, ...],
    values: Optional[Tensor] = None,
    rule: Optional[WriteRule] = None,
) -> Tensor:
    r"""Give the reads of a first-order pass (computed without a graph) their gradients, in one autograd node.

    With first-order writes each piece ``j`` reads ``W_j = W + (c_j - c) W_0 - s \sum_{i<j} ρ^{j-1-i} P_i(v) +
    const``: the weights ``W`` the pass started from, the initial weights ``W_0`` at the share the writes' retention
    routed to them since (``c_j`` and ``c`` are :attr:`FastWeights.initial_share`), and the pending sums ``P_i`` of
    the writes before it, linear in the targets ``v`` at fixed anchors. So the gradients of ``W`` and ``W_0`` are sums
    over all tokens of rank-1 terms, each one GEMM over the whole sequence, where autograd of the per-piece reads
    forms every piece's per-sample weight gradient and adds them up; only the keys' gradient is taken piece by piece.
    Where the targets need a gradient, the per-piece weight gradients are formed, and a reverse scan over the pieces
    gives each write's ``A = dL/dW`` (its later reads, each later write scaling it by ``ρ``) and each token's
    ``dL/dv_t = s [A_w2 a_t + A_b2 + W2 (act'(z_t) * (A_w1 k_t + A_b1))]``. A write whose step was bounded
    (:attr:`ReadPiece.factor` ``f``, :func:`write_factor`) moves the weights by ``f s P``: its tokens' targets get
    ``f`` times that gradient, ``f`` taken as a constant (its own dependence on the targets is dropped).

    Args:
        y: The reads ``(B, S, D)``, computed without a graph.
        keys: The inputs ``(B, S, D)`` (with their graph).
        a: The hidden activations of all tokens ``(B, S, H)``, without a graph.
        pieces: The pieces, in order (their lengths sum to ``S``).
        activation: The MLP's activation.
        share: ``c`` of ``weights``.
        weights: ``(w1, b1, w2, b2)`` per sample, the state the pass started from (with its graph).
        initial: The initial weights ``(w1, b1, w2, b2)`` (the parameters, with their graph).
        values: The targets ``v`` ``(B, S, D)`` of the writes (with their graph), or ``None``: no gradient to them.
        rule: The writes' scale and retention; needed with ``values``.

    Returns:
        ``y`` as a tensor whose gradient reaches ``keys``, ``weights``, ``initial`` and ``values``.

    Raises:
        ValueError: If ``values`` is given without ``rule``.

    """
    if values is not None and rule is None:
        raise ValueError("The targets' gradient needs the `rule` (scale, retention) of the writes.")
    return _FirstOrderReads.apply(y, pieces, activation, share, rule, keys, *weights, *initial, a, values)


def write_factor(pending: Optional[tuple[Tensor, ...]], scale: float, max_norm: Optional[float]) -> Optional[Tensor]:
    """The per-sample factor that bounds a write's step: ``min(1, max_norm / ||scale * P_b||)`` ``(B,)``, with
    ``||.||`` the Frobenius norm of the step over all four weights of sample ``b`` together (``P`` the pending sums,
    batch first). ``None`` where there is no bound, nothing pending or no step (``scale == 0``): the step as it is.

    It is computed from the pending sums with their graph, so a differentiable write backpropagates through the bound
    too; a first-order write treats it as a constant (see :func:`first_order_reads`). A non-finite step gives a
    non-finite factor: the bound does not hide it.
    """
    if max_norm is None or pending is None or scale == 0:
        return None
    sq = sum(p.flatten(1).square().sum(1) for p in pending)  # (B,)
    norm = abs(scale) * sq.clamp_min(1e-30).sqrt()  # clamped before the root: a finite gradient at a zero step
    return (max_norm / norm).clamp(max=1.0)


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
        w1, b1, w2, b2: The fast weights, ``(B, H, D)``, ``(B, H)``, ``(B, D, H)``, ``(B, D)``, fp32 (fp64 for a
            float64 input).
        pending: Summed gradients of the tokens read so far in the current chunk (``None`` when none).
        count: Tokens read so far in the current chunk (``0 <= count < chunk_size`` between calls; ``chunk_size`` in
            a state whose write is due, with task-loss writes, :mod:`nl_lightning.models.task_loss_cms`).
        initial_share: ``c`` such that, under first-order writes, the weights depend on the learned initial weights
            ``w0`` as ``c * w0`` plus a constant: 1 for a fresh state, 0 after :meth:`detach`, ``ρ c + 1 - ρ`` after
            a write with retention ``ρ``. It lets a first-order pass route the retention's gradient exactly (see
            :func:`first_order_reads`).

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
        factor: Optional[Tensor] = None,
    ) -> FastWeights:
        """Close the chunk: ``w <- w0 + retention * (w - w0) - factor * scale * pending``.

        Args:
            scale: The step on the pending gradient sums (none pending: no step).
            retention: The share of the distance from ``initial`` (``w0``) the weights keep; 1 keeps all of it, the
                plain ``w <- w - scale * pending`` of Eq. 31.
            initial: ``w0`` (``w1, b1, w2, b2``, broadcast against the weights); needed when ``retention < 1``.
            factor: A per-sample factor ``(B,)`` on the step (:func:`write_factor`, which bounds its norm); ``None``:
                1.

        Raises:
            ValueError: If ``retention < 1`` and ``initial`` is missing.

        """
        if retention != 1.0 and initial is None:
            raise ValueError("A write with `retention` < 1 needs the `initial` weights it decays towards.")
        new = list(self.weights)
        if retention != 1.0:
            new = [torch.lerp(w0, w, retention) for w, w0 in zip(new, initial, strict=True)]  # one op and node each
        if self.pending is not None:
            pending = self.pending
            if factor is not None:
                pending = tuple(g * factor.view(-1, *([1] * (g.dim() - 1))) for g in pending)
            new = [torch.add(w, g, alpha=-scale) for w, g in zip(new, pending, strict=True)]
        share = retention * self.initial_share + 1 - retention
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
