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
Continuum Memory System
^^^^^^^^^^^^^^^^^^^^^^^

A chain of MLP blocks, each holding knowledge at its own time scale (Eq. 30-31, NL NeurIPS):

.. math::

    y_t = \mathrm{MLP}^{(f_k)}(\cdots \mathrm{MLP}^{(f_1)}(x_t)), \qquad
    \theta^{(\ell)} \leftarrow \theta^{(\ell)}
        - \eta^{(\ell)} \sum_{t \in \text{chunk}} \nabla \ell(\theta^{(\ell)}_\xi; x_t)
    \ \text{every } C^{(\ell)} \text{ tokens}

Level ``i`` computes ``h <- h + MLP_i(Norm_i(h))`` (pre-norm residual). The rule is read on two axes:

- **optimizer-step axis**: :meth:`ContinuumMemory.levels` returns :class:`~nl_lightning.Level` objects, so that
  :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` steps level ``i`` once per ``C_i`` training steps;
- **token axis** (``in_context=True``): inside one forward pass each level keeps per-sample *fast weights*, starting
  from its parameters (the meta-learned initial state), and writes them every ``C_i`` tokens. A chunk is read with the
  weights of the end of the previous chunk (causal), and its write is the mean (or sum) of the per-token gradients
  of a local objective taken at that anchor, so a whole chunk is computed in parallel
  (:mod:`nl_lightning.models.cms_memory` has the closed-form gradients).

The local objective [ours, following the paper's L2 associative-memory ("surprise") objective]: level ``i`` is a
memory that maps its normalised input ``k_t = Norm_i(h_t)`` to a value ``v_t = W_v k_t`` made by a learned (slow)
projection, :math:`\ell_t = \tfrac12 \lVert \mathrm{MLP}_i(k_t) - v_t \rVert^2`; the surprise is
:math:`\lVert \mathrm{MLP}_i(k_t) - v_t \rVert`. Writes need no labels and no autograd, so they also run under
``torch.inference_mode()`` (Lightning's validate and predict).

**Retention** [ours, the retention gate of Eq. 88 applied towards the meta-learned state]: with ``retention=ρ < 1`` a
write is :math:`\theta \leftarrow \theta_0 + \rho(\theta - \theta_0) - \eta\,\bar g`, where :math:`\theta_0` are the
parameters. Eq. 31 as printed (``ρ = 1``) has no pull back: nothing bounds how far the fast weights drift from
:math:`\theta_0` over a stream far longer than the training sequences, to where the rest of the model was never trained
to read them. With ``ρ < 1`` their distance from :math:`\theta_0` is a geometric sum of the steps, below
:math:`\eta \max\lVert\bar g\rVert / (1 - \rho)` however long the stream, and a write's step shrinks by ``ρ`` at every
later write, so a level forgets what it wrote after about ``1 / (1 - ρ)`` writes, ``C_i`` tokens each: slower levels
remember longer.

Precision: the token-axis state and computation are fp32 with autocast disabled (fp64 for a float64 input), so a bf16
model keeps fp32 fast weights and a float64 model reads and writes in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from nl_lightning._validation import check_choice, check_float, check_int, check_nonnegative, check_positive
from nl_lightning.levels import Level
from nl_lightning.models.cms_memory import (
    GATED,
    CMSState,
    FastWeights,
    ReadPiece,
    WriteRule,
    check_activation,
    first_order_reads,
    mlp_forward,
    mlp_grads,
    piece_lengths,
    write_factor,
)

__all__ = ["DEFAULT_MAX_WRITE_NORM", "CMSBlock", "CMSState", "ContinuumMemory", "FastWeights"]

#: default bound on the Frobenius norm of one write's step, per sample and level (all four weights together)
DEFAULT_MAX_WRITE_NORM = 10.0


def _check_max_write_norm(value: Optional[float], writes: bool) -> Optional[float]:
    if value is not None:
        check_positive("max_write_norm", value, hint="or None for unbounded writes (Eq. 31 as printed)")
    if value is None and writes:
        rank_zero_warn(
            "CMS token-axis writes with `max_write_norm=None` are unbounded (Eq. 31 as printed): a large inner or outer"
            " learning rate can make the fast weights diverge to NaN. Set `max_write_norm` (default"
            f" {DEFAULT_MAX_WRITE_NORM}) to bound each write's step.",
            category=UserWarning,
        )
    return None if value is None else float(value)


NormKind = Optional[Literal["rmsnorm", "layernorm"]]


def _norm(kind: NormKind, dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"`norm` must be 'rmsnorm', 'layernorm' or None, got {kind!r}.")


class CMSBlock(nn.Module):
    """One level of the chain: ``h <- h + MLP(Norm(h))`` with fast weights written every ``chunk_size`` tokens.

    The parameters ``w1 (H, D)``, ``b1 (H)``, ``w2 (D, H)``, ``b2 (D)`` are the MLP's weights on the optimizer-step axis
    and its initial fast weights on the token axis; ``value`` (``D x D``, token axis only) makes the targets
    ``v_t = W_v k_t`` of the local objective, and learns through the writes, which depend on the targets with
    differentiable and with first-order writes alike (see :class:`ContinuumMemory` for which gradients each keeps).
    A static level has no ``value``, so DDP finds no unused parameter in it. Token-axis state and computation are fp32
    (fp64 for a float64 input) with autocast disabled.

    Args:
        dim: Input and output width ``D``.
        hidden: Hidden width ``H``.
        chunk_size: Tokens per write ``C``.
        activation: ``"gelu"``, ``"gelu_tanh"`` (tanh approximation), ``"gelu_new"`` (the same, written out as in
            GPT-2), ``"silu"``, ``"relu"`` or ``"tanh"``.
        norm: ``"rmsnorm"``, ``"layernorm"`` or ``None``.
        residual: Add the MLP's output to its input (``False``: the level outputs the MLP alone).
        inner_lr: Learning rate ``eta`` of the token-axis writes (0 disables them).
        reduction: Each write uses the ``"mean"`` or the ``"sum"`` (as printed in Eq. 31) of the chunk's gradients.
        in_context: Create the ``value`` projection the token-axis writes need.
        retention: Share ``ρ`` of their distance from the initial weights (the parameters) that the fast weights keep
            at every write, in ``(0, 1]``: ``θ <- θ_0 + ρ (θ - θ_0) - η ḡ``. 1 (default) is Eq. 31 as printed; below 1
            the fast weights stay within about ``η |ḡ| / (1 - ρ)`` of the parameters however long the stream.
        gated: A gated MLP ``W_2 (act(W_g k + b_g) * (W_u k + b_u)) + b_2`` (SwiGLU with ``"silu"``, GeGLU with
            ``"gelu"``): ``w1`` ``(2H, D)`` and ``b1`` ``(2H)`` hold the gate's rows, then the up projection's, and
            :attr:`activation` reads ``"glu_<act>"``.
        max_write_norm: Bound on the Frobenius norm of each write's step ``η ḡ`` (the four weights together), per
            sample: a larger step is scaled down to it (:func:`~nl_lightning.models.cms_memory.write_factor`), as
            :class:`~nl_lightning.models.NeuralMemory` clips its inner gradients. Steps below it are unchanged.
            ``None`` is Eq. 31 as printed (unbounded; it warns): with a large inner or outer learning rate the fast
            weights can grow without limit and turn NaN.

    Raises:
        ValueError: On an unknown ``activation`` or ``reduction``, a negative ``inner_lr``, ``retention`` outside
            ``(0, 1]``, or a ``max_write_norm`` that is not ``None`` or positive.

    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        chunk_size: int,
        activation: str = "gelu",
        norm: NormKind = "rmsnorm",
        residual: bool = True,
        inner_lr: float = 1e-2,
        reduction: Literal["mean", "sum"] = "mean",
        in_context: bool = True,
        retention: float = 1.0,
        gated: bool = False,
        max_write_norm: Optional[float] = DEFAULT_MAX_WRITE_NORM,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if gated and not activation.startswith(GATED):
            activation = GATED + activation
        check_choice("reduction", reduction, ("mean", "sum"))
        check_nonnegative("inner_lr", inner_lr, hint="0 disables the token-axis writes")
        check_float("retention", retention, 0, 1, low_open=True, hint="1 is no pull back to the initial weights")
        self.retention = float(retention)
        self.max_write_norm = _check_max_write_norm(max_write_norm, inner_lr > 0)
        self.dim, self.hidden, self.chunk_size = dim, hidden, chunk_size
        self.activation, self.residual, self.reduction = activation, residual, reduction
        self.gated = activation.startswith(GATED)
        #: with shared weights, gate the hidden units as an FFN with separate gate and up projections does (set by
        #: :func:`~nl_lightning.models.to_cms` for such FFNs, so that the pretrained level is bitwise the original)
        self.separate_gate = False
        self.inner_lr = float(inner_lr)
        self.norm = _norm(norm, dim)
        first, second = nn.Linear(dim, 2 * hidden if self.gated else hidden), nn.Linear(hidden, dim)
        self.w1, self.b1 = nn.Parameter(first.weight.detach()), nn.Parameter(first.bias.detach())
        self.w2, self.b2 = nn.Parameter(second.weight.detach()), nn.Parameter(second.bias.detach())
        self.value = nn.Parameter(torch.eye(dim)) if in_context else None

    def initial_state(
        self, batch: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> FastWeights:
        """Per-sample fast weights equal to the parameters, in ``dtype`` (the inner dtype: fp32, or fp64 for a
        float64 input); differentiable w.r.t. the parameters."""
        params = [p.to(device) for p in self._initial(dtype)]
        return FastWeights(*(p.unsqueeze(0).expand(batch, *p.shape) for p in params), initial_share=1.0)

    def forward(
        self, h: Tensor, state: Optional[FastWeights] = None, differentiable: bool = True, write: bool = True
    ) -> tuple:
        """Apply the level to ``h`` ``(batch, seq, dim)``.

        Without ``state``: the static MLP (parameters only), returning ``(out, None)``. With ``state``: the token axis,
        chunk by chunk, returning ``(out, new_state)``; ``write=False`` reads every token with the state's current
        weights and returns the state unchanged (test-time memorization off).
        """
        if state is None:
            out = mlp_forward(self.norm(h), *self._initial(None), self.activation, self.separate_gate)[0]
            return (h + out if self.residual else out), None
        return self._in_context(h, state, differentiable, write)

    def _in_context(
        self, h: Tensor, state: FastWeights, differentiable: bool, write: bool = True
    ) -> tuple[Tensor, FastWeights]:
        inner = inner_dtype(h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.to(inner)  # (B, S, D): fast state and writes in fp32 (fp64 for a float64 input), also under autocast
            if any(w.dtype != inner for w in state.weights):
                state = state.map(lambda t: t.to(inner))
            if self.inner_lr == 0 or not write:  # nothing is written: one read of the whole input
                y = mlp_forward(self.norm(x).to(inner), *_shared(state.weights), self.activation, self.separate_gate)[0]
                if write:
                    state = replace(state, count=(state.count + x.shape[1]) % self.chunk_size)
            else:
                y, state = self._write_pass(x, state, differentiable)
            out = x + y if self.residual else y
        return out.to(h.dtype), state

    def _write_pass(self, x: Tensor, state: FastWeights, differentiable: bool) -> tuple[Tensor, FastWeights]:
        """Read and write along ``x`` ``(B, S, D)`` chunk by chunk; returns the reads ``(B, S, D)`` and the state."""
        if self.value is None:
            raise RuntimeError(
                "This CMSBlock has no value projection (built static, in_context=False, or for writes driven by an"
                " outside signal, value_projection=False), so it cannot write with its local objective."
            )
        lengths = piece_lengths(x.shape[1], state.count, self.chunk_size)
        keys = self.norm(x).to(x.dtype)  # (B, S, D): norm and targets are per token, so computed for the whole input
        # v = W_v k (B, S, D); first-order writes take the targets' gradient to W_v only, not to the keys
        values = (keys if differentiable else keys.detach()) @ self.value.to(x.dtype).T
        if not differentiable:
            return self._first_order(keys, values, lengths, state)
        ys = []
        for k, v in zip(keys.split(lengths, dim=1), values.split(lengths, dim=1), strict=True):  # (B, n, D)
            y, _, _, state, _ = self._piece(state, k, v)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def _first_order(
        self, keys: Tensor, values: Tensor, lengths: list[int], state: FastWeights
    ) -> tuple[Tensor, FastWeights]:
        """The token axis with first-order writes: the whole pass runs without a graph, then one autograd node
        (:func:`~nl_lightning.models.cms_memory.first_order_reads`) gives the reads their gradients (w.r.t. the keys,
        the starting and initial weights, and the targets), and the returned weights keep the dependence on ``state``
        and the initial weights that the writes' retention routed to them."""
        fast = state.map(torch.Tensor.detach)
        ys, acts, pieces = [], [], []
        with torch.no_grad():
            for k, v in zip(keys.detach().split(lengths, dim=1), values.detach().split(lengths, dim=1), strict=True):
                w1, w2, share = fast.w1, fast.w2, fast.initial_share
                y, z, a, fast, factor = self._piece(fast, k, v)  # (B, n, D), (B, n, H), (B, n, H), (B,) or None
                ys.append(y)
                acts.append(a)
                writes = fast.count == 0 and k.shape[1] > 0
                pieces.append(ReadPiece(w1, w2, share, z, writes=writes, factor=factor if writes else None))
            y = torch.cat(ys, dim=1)
        if not torch.is_grad_enabled():
            return y, fast
        initial = self._initial(keys.dtype)
        rule = WriteRule(self._scale(), self.retention)
        acts = torch.cat(acts, dim=1)  # (B, S, H)
        y = first_order_reads(
            y, keys, acts, pieces, self.activation, state.initial_share, state.weights, initial, values, rule
        )
        # the returned weights: W + (c' - c) W_0 + const, as the graph-carrying writes would have them
        extra = fast.initial_share - state.initial_share
        weights = []
        for w, w_in, w0 in zip(fast.weights, state.weights, initial, strict=True):
            if w_in.requires_grad:
                w = w + (w_in - w_in.detach())  # value unchanged, gradient to the state the pass started from
            if extra and w0.requires_grad:
                w = w + extra * (w0 - w0.detach())
            weights.append(w)
        return y, replace(fast, w1=weights[0], b1=weights[1], w2=weights[2], b2=weights[3])

    def _piece(
        self, state: FastWeights, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, FastWeights, Optional[Tensor]]:
        """Read a piece of a chunk ``k`` ``(B, n, D)`` with the anchor weights, add the gradients of
        ``0.5 * ||MLP(k) - v||^2`` to the pending sums, and write if the chunk is complete. Returns the read, its
        pre-activations and activations, the new state, and the bound's factor ``(B,)`` of the write (``None``: no
        write, or no bound)."""
        y, z, a = mlp_forward(k, *state.weights, self.activation)
        state = state.add_pending(mlp_grads(k, z, a, y - v, state.w2, self.activation)).advance(k.shape[1])
        factor = None
        if state.count == self.chunk_size:
            factor = self.write_factor(state)
            state = self._close(state, factor)
        return y, z, a, state, factor

    def write_factor(self, state: FastWeights) -> Optional[Tensor]:
        """The per-sample factor ``(B,)`` that bounds the step of the write of ``state``'s pending sums to
        :attr:`max_write_norm` (``None``: no bound or nothing pending)."""
        return write_factor(state.pending, self._scale(), self.max_write_norm)

    def close_chunk(self, state: FastWeights) -> FastWeights:
        """The write that closes a chunk (Eq. 31): ``W <- lerp(W_0, W, ρ) - f s P`` with the level's step ``s`` and
        retention ``ρ``, ``P`` the pending sums and ``f`` the per-sample factor that bounds the step's norm to
        :attr:`max_write_norm` (1 without a bound); it keeps the graph of its inputs (wrap it in ``torch.no_grad()``
        for a first-order write).

        Args:
            state: The level's fast weights with the chunk's pending gradient sums.

        Returns:
            The written weights, with no pending sums and ``count = 0``.

        """
        return self._close(state, self.write_factor(state))

    def _close(self, state: FastWeights, factor: Optional[Tensor]) -> FastWeights:
        if self.retention == 1.0:
            return state.write(self._scale(), factor=factor)
        return state.write(self._scale(), self.retention, self._initial(state.w1.dtype), factor)

    def read(self, h: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """``h + MLP(Norm(h))`` (the MLP alone without ``residual``) read with the given weights, with their graph.

        Args:
            h: The input ``(B, n, D)``.
            weights: ``(w1 (B, H, D), b1 (B, H), w2 (B, D, H), b2 (B, D))`` per sample, in the inner dtype (fp32, or
                fp64 for a float64 input); the computation runs in it with autocast disabled.

        Returns:
            The output ``(B, n, D)`` in ``h``'s dtype.

        """
        inner = weights[0].dtype
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.to(inner)
            y = mlp_forward(self.norm(x).to(inner), *weights, self.activation)[0]  # (B, n, D)
            out = x + y if self.residual else y
        return out.to(h.dtype)

    def _scale(self) -> float:
        """``s``, the step of a write on its pending gradient sums (Eq. 31 with the mean or the sum)."""
        return self.inner_lr / (self.chunk_size if self.reduction == "mean" else 1)

    def _initial(self, dtype: Optional[torch.dtype] = torch.float32) -> tuple[Tensor, ...]:
        """The initial fast weights (the parameters) in the inner ``dtype`` (``None``: as they are)."""
        params = (self.w1, self.b1, self.w2, self.b2)
        return params if dtype is None else tuple(p.to(dtype) for p in params)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, chunk_size={self.chunk_size}, activation={self.activation},"
            f" residual={self.residual}, inner_lr={self.inner_lr}"
            + (f", retention={self.retention}" if self.retention != 1.0 else "")
            + (f", max_write_norm={self.max_write_norm}" if self.max_write_norm != DEFAULT_MAX_WRITE_NORM else "")
        )


class ContinuumMemory(nn.Module):
    r"""The Continuum Memory System: a chain of MLP levels, each updated at its own frequency (Eq. 30-31, NL NeurIPS).

    Level ``i`` (the fastest first) computes ``h <- h + MLP_i(Norm_i(h))``. ``chunk_sizes[i]`` is its period ``C_i``:
    in tokens on the token axis (``in_context=True``), and, through :meth:`levels`, in optimizer steps for
    :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`.

    Token axis: ``y, state = cms(x, state)``. ``state=None`` starts every sample from the learned initial weights (the
    parameters); a :class:`CMSState` returned by a call continues the stream in the next call (carrying it over two
    segments equals one long segment, mid-chunk included). Each sample has its own fast weights. The state and the
    token-axis computation are fp32 with autocast disabled, fp64 for a float64 input.

    Gradients flow through the reads and, with ``differentiable_writes=True`` (default), through the writes too
    (second order: through each write's anchor weights, keys and targets), back to the initial weights, the norms and
    the value projections; they stop where you ``state.detach()`` (truncated backpropagation between segments).

    With ``differentiable_writes=False`` a write ``w <- w0 + ρ (w - w0) - s g`` (``s = inner_lr / C`` for the mean,
    ``inner_lr`` for the sum) is first order. The gradient keeps every read's dependence on its keys and on the
    weights it reads: the state the call started from, the initial weights (the share the retention routed to them)
    and the earlier writes of the call. It keeps every write's dependence on its targets ``v_t = W_v k_t`` through the
    value projections ``W_v`` (the keys count as constants there, as everywhere else in the writes): the pending
    sums ``g_w2 = Σ_t (y_t - v_t) a_t^T``, ``g_b2 = Σ_t (y_t - v_t)``, ``g_w1 = Σ_t dz_t k_t^T``,
    ``g_b1 = Σ_t dz_t`` with ``dz_t = act'(z_t) * (W2^T (y_t - v_t))``
    are linear in ``v_t`` at a fixed anchor, so with ``A = dL/dW_j`` the
    gradient of the weights ``W_j`` that the write of ``t``'s chunk produces, summed over every later read of the call
    (each later write scaling it by ``ρ``),

    .. math::

        \frac{\partial L}{\partial v_t} = s \left[A_{w_2} a_t + A_{b_2}
            + W_2 \left(\sigma'(z_t) \odot (A_{w_1} k_t + A_{b_1})\right)\right]

    (``z_t``, ``a_t``: the hidden pre-activation and activation of ``k_t`` at the anchor ``W_1, b_1, W_2``). It drops
    the rest of the writes' dependence (second order): through the anchor weights, and through ``k_t``, ``z_t``,
    ``a_t`` and ``y_t`` inside the pending sums, and through ``k_t`` inside ``v_t``. It is first order
    across calls too: the state a call returns keeps the dependence of
    its weights on the initial weights and on the state the call started from, not on the targets written in the
    call, and its pending sums carry no graph, so tokens whose chunk is written in a later call give their targets no
    gradient. The whole pass then runs without a graph, and one autograd node
    (:func:`~nl_lightning.models.cms_memory.first_order_reads`) gives the reads their gradients: the fast weights'
    gradients are one GEMM over all tokens where the value projections need no gradient, else one per-sample
    gradient per chunk and a reverse scan over the chunks for the targets.

    **Bounded writes.** With ``max_write_norm`` (default :data:`DEFAULT_MAX_WRITE_NORM`) each write's step is
    ``f_b s P_b`` with ``f_b = min(1, max_write_norm / ||s P_b||)`` per sample ``b`` (the Frobenius norm over the four
    weights together), so no write moves a sample's fast weights further than the bound. Differentiable writes
    backpropagate through ``f_b`` too; first-order writes treat ``f_b`` as a constant: the targets' gradient above
    is multiplied by it, and its own dependence on the targets is dropped with the rest of the second-order terms.

    Args:
        dim: Width ``D`` of the input and output.
        chunk_sizes: ``C_i`` of each level, the fastest first (token axis: tokens per write).
        hidden_mult: Hidden width of each MLP as a multiple of ``dim`` (ignored where ``hidden_dims`` is given).
        in_context: Return ``(y, state)`` and write fast weights along the sequence; otherwise ``y`` only, static.
        hidden_dims: Explicit hidden width of each level.
        activation: One activation name, or one per level (``gelu``, ``gelu_tanh``, ``gelu_new``, ``silu``, ``relu``,
            ``tanh``).
        gated: Gated MLP levels (SwiGLU with ``"silu"``, GeGLU with ``"gelu"``; see :class:`CMSBlock`); one value or one
            per level.
        norm: ``"rmsnorm"`` (default), ``"layernorm"`` or ``None``; one value or one per level.
        residual: Whether each level adds its input back; one value or one per level.
        inner_lr: Token-axis learning rate of each level (one value or one per level); default ``0.01 * 0.3**i``,
            smaller for slower levels.
        reduction: A write uses the mean (default) or the sum of its chunk's gradients.
        differentiable_writes: Backpropagate through the writes (see above).
        retention: Share of their distance from the initial weights that each level's fast weights keep at every
            write, in ``(0, 1]`` (one value or one per level; see :class:`CMSBlock`). 1 (default): Eq. 31 as printed,
            with no pull back, so the fast weights can wander arbitrarily far over a long stream.
        value_projection: Give each token-axis level its value projection ``W_v`` (the targets of the local
            objective). ``False`` builds levels without it, for writes driven by an outside signal (Hope's
            ``cms_write_signal="task_loss"``, :mod:`nl_lightning.models.task_loss_cms`): their own write pass then
            raises, and reads with ``write=False`` work as usual.
        max_write_norm: Bound on the norm of each write's step, per sample and level (see "Bounded writes" above);
            ``None``: Eq. 31 as printed, unbounded (it warns once).

    Raises:
        ValueError: On an empty ``chunk_sizes``, a chunk size below 1, per-level lists of the wrong length, or an
            unknown activation, norm or reduction, a ``retention`` outside ``(0, 1]``, or a ``max_write_norm`` that is
            not ``None`` or positive.

    Example::

        cms = ContinuumMemory(dim=64, chunk_sizes=[16, 256], in_context=True)
        y, state = cms(torch.randn(2, 512, 64))          # writes every 16 and every 256 tokens
        y2, state = cms(torch.randn(2, 512, 64), state)  # continues the stream
        levels = cms.levels("cms")                       # for MultiFrequencyUpdates on the step axis

    """

    def __init__(
        self,
        dim: int,
        chunk_sizes: Sequence[int],
        hidden_mult: float = 4.0,
        in_context: bool = False,
        hidden_dims: Optional[Sequence[int]] = None,
        activation: Union[str, Sequence[str]] = "gelu",
        norm: Union[NormKind, Sequence[NormKind]] = "rmsnorm",
        residual: Union[bool, Sequence[bool]] = True,
        inner_lr: Optional[Union[float, Sequence[float]]] = None,
        reduction: Literal["mean", "sum"] = "mean",
        differentiable_writes: bool = True,
        retention: Union[float, Sequence[float]] = 1.0,
        value_projection: bool = True,
        gated: Union[bool, Sequence[bool]] = False,
        max_write_norm: Optional[float] = DEFAULT_MAX_WRITE_NORM,
    ) -> None:
        super().__init__()
        chunk_sizes = list(chunk_sizes)
        if not chunk_sizes:
            raise ValueError("`chunk_sizes` must be a non-empty list of integers >= 1, got [].")
        for i, c in enumerate(chunk_sizes):
            check_int(f"chunk_sizes[{i}]", c, hint=f"chunk_sizes={chunk_sizes!r}")
        check_int("dim", dim)
        k = len(chunk_sizes)
        hidden = list(hidden_dims) if hidden_dims is not None else max(1, round(dim * hidden_mult))
        lrs = [0.01 * 0.3**i for i in range(k)] if inner_lr is None else _per_level(inner_lr, k, "inner_lr")
        # one check (and one warning) for the whole memory; the levels take the checked value silently
        max_write_norm = _check_max_write_norm(max_write_norm, in_context and any(lr > 0 for lr in lrs))
        self.in_context, self.differentiable_writes = in_context, differentiable_writes
        self.chunk_sizes = chunk_sizes
        specs = zip(
            _per_level(hidden, k, "hidden_dims"),
            _per_level(activation, k, "activation"),
            _per_level(norm, k, "norm"),
            _per_level(residual, k, "residual"),
            lrs,
            chunk_sizes,
            _per_level(retention, k, "retention"),
            _per_level(gated, k, "gated"),
            strict=True,
        )
        blocks = [
            CMSBlock(dim, h, c, act, nm, res, lr, reduction, in_context and value_projection, rho, glu)
            for h, act, nm, res, lr, c, rho, glu in specs
        ]
        for blk in blocks:
            blk.max_write_norm = max_write_norm
        self.blocks = nn.ModuleList(blocks)  # parameters read "blocks.<i>.w1"; globs like "*.cms.blocks.2.*"
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def levels(self, prefix: str = "", every: Optional[Sequence[int]] = None) -> list[Level]:
        """The step-axis :class:`~nl_lightning.Level` of each CMS level, for ``MultiFrequencyUpdates``.

        Level ``i`` owns only CMS level ``i``'s parameters and has ``every=chunk_sizes[i]`` (or ``every[i]``).

        Args:
            prefix: This module's name inside the model (``"cms"`` or ``"blocks.0.ffn"``); ``""`` at the top.
            every: Step-axis periods that differ from ``chunk_sizes`` (e.g. ``[1, 4, 16]`` with ``[16, 256, 2048]``).

        """
        prefix = f"{prefix}." if prefix and not prefix.endswith(".") else prefix
        periods = list(every) if every is not None else self.chunk_sizes
        if len(periods) != len(self.chunk_sizes):
            raise ValueError(f"`every` needs {len(self.chunk_sizes)} periods, got {periods!r}.")
        return [Level(f"{prefix}level_{i}", [f"{prefix}blocks.{i}.*"], every=int(c)) for i, c in enumerate(periods)]

    def initial_state(
        self, batch: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> CMSState:
        """The state ``state=None`` stands for: every level at its learned initial weights, in the inner ``dtype``
        (fp32, or fp64 for a float64 input)."""
        return CMSState([blk.initial_state(batch, device, dtype) for blk in self.blocks])

    def forward(
        self, x: Tensor, state: Optional[CMSState] = None, write: bool = True
    ) -> Union[Tensor, tuple[Tensor, CMSState]]:
        """``x`` ``(batch, seq, dim)`` -> ``y`` (static) or ``(y, state)`` (``in_context=True``).

        ``write=False`` (token axis only) reads with the state's current fast weights and returns the state unchanged:
        test-time memorization switched off.
        """
        if not self.in_context:
            if state is not None:
                raise ValueError("This ContinuumMemory is static (in_context=False): it takes no state.")
            for blk in self.blocks:
                x = blk(x)[0]
            return x
        state = state if state is not None else self.initial_state(x.shape[0], x.device, inner_dtype(x))
        if len(state.levels) != len(self.blocks):
            raise ValueError(f"The state has {len(state.levels)} levels, this memory {len(self.blocks)}.")
        new = []
        for blk, fast in zip(self.blocks, state.levels, strict=True):
            x, fast = blk(x, fast, self.differentiable_writes, write)
            new.append(fast)
        return x, CMSState(new)


def _rename_legacy_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Rename the keys ``levels.<i>.*`` of checkpoints in the older layout to ``blocks.<i>.*`` before loading."""
    legacy = f"{prefix}levels."
    for key in [k for k in state_dict if k.startswith(legacy)]:
        state_dict[f"{prefix}blocks.{key[len(legacy) :]}"] = state_dict.pop(key)


def inner_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the token-axis state and computation for an input ``x``: fp64 for a float64 input, else fp32 (also
    under bf16 / fp16 autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shared(weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per-sample weights that are still the broadcast parameters read as one shared matrix (bitwise the static MLP)."""
    if all(w.stride(0) == 0 for w in weights):
        return tuple(w[0] for w in weights)
    return weights


def _per_level(value, k: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"`{name}` needs one value per level ({k}), got {list(value)!r}.")
        return list(value)
    return [value] * k
