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
Titans Neural Memory
^^^^^^^^^^^^^^^^^^^^

The long-term memory of Titans (Titans §3.1-3.2, Eq. 13-14): per head, an MLP :math:`\mathcal{M}` trained *at test
time* to map keys to values, with surprise momentum and a forgetting gate,

.. math::

    \ell(\mathcal{M}; x_t) = \lVert \mathcal{M}(k_t) - v_t \rVert^2, \qquad
    S_t = \eta_t S_{t-1} - \theta_t u_t, \qquad
    \mathcal{M}_t = (1 - \alpha_t)\, \mathcal{M}_{t-1} + S_t, \qquad
    y_t = \mathcal{M}_{\xi(t)}(q_t).

**Chunks.** Every token of a chunk takes its gradient at the chunk-start state (the anchor),
:math:`u_t = \nabla \ell(\mathcal{M}_{\xi(t)}; x_t)`, and reads that same anchor, so tokens of chunk ``j`` read the
state at the end of chunk ``j - 1`` (causal [ours]). A chunk is then computed in parallel.

**Streaming.** Chunks are aligned to the stream, not to the call: a call that ends inside a chunk reads its last
tokens at the anchor and returns them unwritten in the state (their keys, values and gates), and the call that
completes the chunk writes it, prepending them to its own tokens. Carrying the state across calls therefore equals
one pass over the concatenated sequence for any split, token-by-token generation included.

**Chunk-end state (derivation).** Take a chunk of ``n`` tokens ``i = 1..n`` starting from :math:`(\mathcal{M}_0, S_0)`,
with :math:`E_t = \prod_{j \le t} \eta_j` and :math:`\beta_t = \prod_{j \le t} (1 - \alpha_j)` (:math:`E_0 = \beta_0
= 1`). Unrolling the two recurrences,

.. math::

    S_t = E_t S_0 - \sum_{i \le t} \theta_i \tfrac{E_t}{E_i} u_i, \qquad
    \mathcal{M}_n = \beta_n \mathcal{M}_0 + \sum_{t \le n} \tfrac{\beta_n}{\beta_t} S_t ,

and substituting the first into the second and swapping the sums,

.. math::

    S_n = E_n S_0 - \sum_i c^S_i u_i, \qquad
    \mathcal{M}_n = \beta_n \mathcal{M}_0 + a_S S_0 - \sum_i c^M_i u_i,

    a_S = \sum_{t=1}^{n} \tfrac{\beta_n}{\beta_t} E_t, \qquad
    c^S_i = \theta_i \tfrac{E_n}{E_i}, \qquad
    c^M_i = \theta_i \sum_{t=i}^{n} \tfrac{\beta_n}{\beta_t} \tfrac{E_t}{E_i}.

Without momentum (:math:`S_t = -\theta_t u_t`): :math:`\mathcal{M}_n = \beta_n \mathcal{M}_0 - \sum_i \theta_i
\frac{\beta_n}{\beta_i} u_i` (the chunk-parallel form of Titans §3.2). Every coefficient depends on the gates only, so
they are computed for all chunks at once, in log space: each term is
:math:`\exp\big((\log\beta_n - \log\beta_t) + (\log E_t - \log E_i)\big)` with exponent :math:`\le 0` for
:math:`t \ge i` (an ``n x n`` masked matrix per chunk), where :math:`\log \eta` and :math:`\log(1 - \alpha)` come from
``logsigmoid`` of the gate logits and cumulative sums, so they are finite for every finite logit: no product can
overflow or hit ``log 0`` (this replaces clamping the gates away from 0 and 1, without its zero gradient). A token's
gradient is one outer product per layer, :math:`u_i^{(l)} = \delta_{l,i} a_{l-1,i}^\top`
(:mod:`nl_lightning.models._memory_mlp`), so :math:`\sum_i c_i u_i^{(l)} = (c \odot \delta_l)^\top A_{l-1}`: one
batched matmul per layer and chunk (:math:`c^M` and :math:`c^S` stacked), and no per-token gradient tensor is
formed. Only the loop over chunks is sequential; projections, gates and coefficients are computed for the whole
sequence at once.

**Choices [ours].**

- Input: ``RMSNorm``, then ``q, k, v = W_Q x, W_K x, W_V x`` (no bias), a causal depthwise convolution over time
  (``conv_size`` taps, 0 disables it; initialised to the identity, i.e. the current token only), SiLU, and
  ℓ2-normalisation of ``q`` and ``k`` per head (Titans §4.4).
- Memory: ``depth`` bias-free layers, hidden width ``round(expansion * head_dim)``, ``M(k) = k + MLP(k)`` when
  ``depth >= 2`` (``residual``; a depth-1 memory is the plain linear map ``W``). Initial weights are meta-learned
  parameters ``(heads, out, in)``, normal with std ``1 / sqrt(in)``, one memory per head, copied per sample.
- Gates, per token and head, linear in the normalised input: ``theta = lr_max * sigmoid(.)`` (inner learning rate,
  starts at ``init_lr = lr_max / 2``), ``eta = sigmoid(.)`` (momentum decay, starts near 0.9), ``alpha = sigmoid(.)``
  (forget fraction, starts near 0.01), through the biases.
- Output: per-head ``RMSNorm`` of the reads, times ``2 * sigmoid(W_G x)`` with ``W_G = 0`` at init (``output_gate``;
  it starts as the identity, whereas a randomly initialised ``SiLU`` gate would start by multiplying the reads by
  noise), then ``W_O``. The output is not added to ``x``: the residual belongs to the block.
- Stability: with momentum the effective inner learning rate is about ``theta / (1 - eta)`` (``10 theta`` at
  ``eta = 0.9``) on a loss whose gradient carries a factor 2, so keep ``lr_max`` around 0.1 (the default); at
  ``lr_max = 1`` the memory can blow up within a few chunks (cf. lucidrains/titans-pytorch issues #22 and #29).
- Memory state and inner computation in fp32 (fp64 for a float64 input) with autocast disabled; outer gradients
  (to the projections, gates, convolution and initial memory) flow through the writes within a call and across calls
  until :meth:`NeuralMemoryState.detach`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from nl_lightning._validation import check_choice, check_float, check_int, check_positive
from nl_lightning.models._memory_mlp import memory_backward, memory_forward
from nl_lightning.models.cms_memory import ACTIVATIONS, _portable

__all__ = ["NeuralMemory", "NeuralMemoryState", "chunk_coefficients"]


@dataclass
class NeuralMemoryState:
    """The per-sample state of a :class:`NeuralMemory`: memory weights, surprise momenta, the convolution's inputs and
    the unwritten tokens of the current chunk.

    Pass it back to continue a stream; ``None`` starts a new sequence from the learned initial memory.

    Attributes:
        weights: ``W_1 .. W_L`` of every sample and head at the last chunk boundary (the anchor the tokens of the
            current chunk read), each ``(B, H, out_l, in_l)``, fp32.
        momentum: The surprise ``S`` of each layer at the same boundary (same shapes); ``()`` when the memory has no
            momentum.
        conv: The last ``conv_size - 1`` projected inputs ``(B, conv_size - 1, 3 * dim)`` (``None`` without a
            convolution).
        pending_keys: Keys of the ``p`` tokens read so far in the current chunk, ``(B, H, p, head_dim)`` with
            ``0 <= p < chunk_size`` (``None`` when none); written when the chunk completes.
        pending_values: Their values, ``(B, H, p, head_dim)`` (``None`` when none).
        pending_gates: Their gates ``(B, H, p, G)``: ``theta``, ``log(1 - alpha)`` and, with momentum, ``log(eta)``
            (``None`` when none).

    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] = ()
    conv: Optional[Tensor] = None
    pending_keys: Optional[Tensor] = None
    pending_values: Optional[Tensor] = None
    pending_gates: Optional[Tensor] = None

    _OPTIONAL = ("conv", "pending_keys", "pending_values", "pending_gates")

    @property
    def pending_count(self) -> int:
        """Tokens read in the current chunk and not written yet (``p``)."""
        return 0 if self.pending_keys is None else self.pending_keys.shape[2]

    def map(self, fn: Callable[[Tensor], Tensor]) -> NeuralMemoryState:
        """Apply ``fn`` to every tensor."""
        optional = {name: _apply(fn, getattr(self, name)) for name in self._OPTIONAL}
        return NeuralMemoryState(tuple(fn(w) for w in self.weights), tuple(fn(s) for s in self.momentum), **optional)

    def detach(self) -> NeuralMemoryState:
        """Stop gradients here (truncated backpropagation between segments); also makes a state computed under
        ``torch.inference_mode`` usable outside it."""
        return self.map(_portable)

    def to(self, *args: Any, **kwargs: Any) -> NeuralMemoryState:
        """``Tensor.to`` on every tensor (device moves; keep the dtype fp32)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def select(self, index: Tensor) -> NeuralMemoryState:
        """The states of some samples of the batch (e.g. those whose sequence continues)."""
        return self.map(lambda t: t[index])

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists and ``None`` only (loads with ``torch.load(weights_only=True)``); detached."""
        s = self.detach()
        return {"weights": list(s.weights), "momentum": list(s.momentum), **{n: getattr(s, n) for n in self._OPTIONAL}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NeuralMemoryState:
        """Inverse of :meth:`state_dict`."""
        optional = {name: state.get(name) for name in cls._OPTIONAL}
        return cls(tuple(state["weights"]), tuple(state["momentum"]), **optional)


def _apply(fn: Callable[[Tensor], Tensor], t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else fn(t)


def _shape(t: Optional[Tensor]) -> Optional[tuple[int, ...]]:
    return None if t is None else tuple(t.shape)


def chunk_coefficients(lr: Tensor, log_keep: Tensor, log_decay: Optional[Tensor]) -> dict[str, Tensor]:
    r"""The scalar coefficients of the chunk-end state (module docstring), for chunks along the last axis.

    Args:
        lr: :math:`\theta_i` ``(..., n)``.
        log_keep: :math:`\log(1 - \alpha_i)` ``(..., n)``.
        log_decay: :math:`\log \eta_i` ``(..., n)``, or ``None`` without momentum.

    Returns:
        ``keep`` :math:`\beta_n` ``(...)`` and ``c_M`` ``(..., n)``; with momentum also ``decay`` :math:`E_n`, ``a_S``
        ``(...)`` and ``c_S`` ``(..., n)``.

    """
    log_beta = log_keep.cumsum(-1)  # (..., n)
    to_end = log_beta[..., -1:] - log_beta  # log(beta_n / beta_t)
    out = {"keep": log_beta[..., -1].exp()}
    if log_decay is None:
        out["c_M"] = lr * to_end.exp()
        return out
    log_e = log_decay.cumsum(-1)
    n = lr.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=lr.device).tril()  # [t, i]: t >= i
    expo = to_end.unsqueeze(-1) + (log_e.unsqueeze(-1) - log_e.unsqueeze(-2))  # (..., t, i)
    out["c_M"] = lr * expo.masked_fill(~causal, -math.inf).exp().sum(-2)
    out["c_S"] = lr * (log_e[..., -1:] - log_e).exp()
    out["decay"] = log_e[..., -1].exp()
    out["a_S"] = (to_end + log_e).exp().sum(-1)
    return out


def _l2_normalize(t: Tensor) -> Tensor:
    """``t / ||t||`` over the last axis (a multiply by ``rsqrt``: a cheaper backward than ``F.normalize``)."""
    return t * t.square().sum(-1, keepdim=True).clamp_min(1e-12).rsqrt()


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class NeuralMemory(nn.Module):
    r"""The Titans long-term memory: a deep MLP per head, written at test time with momentum and forgetting.

    ``y, state = mem(x, state)``: ``x`` and ``y`` are ``(batch, seq, dim)``; ``state=None`` starts every sample from the
    learned initial memory, a returned :class:`NeuralMemoryState` continues the stream. The stream is processed in
    chunks of ``chunk_size`` tokens that read the state of the end of the previous chunk and are written in parallel
    (Titans Eq. 13-14 and §3.2; the derivation is in the module docstring). The chunks are aligned to the stream: the
    returned state holds the unwritten tokens of the current chunk, so carrying it across calls equals one pass for
    any split. ``mem.last_stats`` holds detached logging figures of the last call: ``surprise`` (mean inner loss of the
    call's tokens at their anchor), ``grad_norm`` (mean Frobenius norm of the inner gradient of the tokens written,
    only when the call completes a chunk), ``weight_norm`` (mean norm of the memories at the last chunk boundary), and
    the mean gates ``lr``, ``forget`` and, with momentum, ``mom_decay``.

    Args:
        dim: Model width ``D``.
        heads: Number of heads ``H``; each has its own memory on ``head_dim = dim // heads``.
        chunk_size: Tokens per chunk ``C``: tokens of a chunk read its anchor and write together at its end (in the
            call that completes it).
        depth: Layers of the memory MLP (1: a linear map).
        expansion: Hidden width of the memory MLP as a multiple of ``head_dim``.
        activation: ``"silu"``, ``"gelu"``, ``"relu"`` or ``"tanh"``, between the memory's layers.
        residual: ``M(k) = k + MLP(k)``; default ``depth >= 2``.
        momentum: Keep the surprise momentum ``S`` (``False``: ``S_t = -theta_t u_t``).
        lr_max: Cap ``theta_max`` of the inner learning rate.
        init_lr: Initial inner learning rate, in ``(0, lr_max)``; default ``lr_max / 2``.
        init_mom_decay: Initial momentum decay ``eta``, in ``(0, 1)``.
        init_forget: Initial forget fraction ``alpha``, in ``(0, 1)``.
        conv_size: Taps of the causal depthwise convolution after the projections (0: none).
        output_gate: Multiply the normalised reads by ``2 * sigmoid(W_G x)`` (``W_G = 0`` at init) before ``W_O``.
        max_inner_grad_norm: Clip each token's inner gradient ``u_i`` (all layers together) to this Frobenius norm
            before the scan (a per-token scalar, so the chunk stays a weighted matmul); ``None`` is the printed
            equation (it warns). Without it, a chunk of similar keys sums many gradients taken at the same anchor,
            and nothing bounds the write: on ordinary text the memory can diverge to NaN within a few hundred tokens
            at the default gates, a failure public implementations report too (lucidrains/titans-pytorch issues #22
            and #29).

    Raises:
        ValueError: If ``dim`` is not divisible by ``heads``, a size is below 1 (``conv_size`` below 0),
            ``expansion``, ``lr_max`` or ``max_inner_grad_norm`` is not positive, an initial gate is out of range, or
            the activation is unknown.

    Example::

        mem = NeuralMemory(dim=256, heads=4, chunk_size=64, depth=2)
        y, state = mem(torch.randn(2, 1000, 256))      # 15 chunks written, the last 40 tokens pending in the state
        y2, state = mem(torch.randn(2, 512, 256), state)  # continues the stream (writes those 40 with 24 new ones)
        mem.last_stats["surprise"]

    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        chunk_size: int = 64,
        depth: int = 2,
        expansion: float = 2.0,
        activation: str = "silu",
        residual: Optional[bool] = None,
        momentum: bool = True,
        lr_max: float = 0.1,
        init_lr: Optional[float] = None,
        init_mom_decay: float = 0.9,
        init_forget: float = 0.01,
        conv_size: int = 4,
        output_gate: bool = True,
        max_inner_grad_norm: Optional[float] = 1.0,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        if max_inner_grad_norm is not None:
            check_positive("max_inner_grad_norm", max_inner_grad_norm, hint="or None for no clipping")
        self.max_inner_grad_norm = max_inner_grad_norm
        if max_inner_grad_norm is None:
            rank_zero_warn(
                "NeuralMemory with `max_inner_grad_norm=None` writes with unclipped inner gradients (the printed"
                " equation): on ordinary text its weights can diverge to NaN within a few hundred tokens. Set"
                " `max_inner_grad_norm` (default 1.0) to bound them.",
                category=UserWarning,
            )
        check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads}); choose a divisor of dim.")
        check_int("chunk_size", chunk_size)
        check_int("depth", depth, 1, hint="1 is a linear memory")
        check_positive("expansion", expansion)
        check_choice("activation", activation, sorted(ACTIVATIONS))
        check_positive("lr_max", lr_max)
        init_lr = lr_max / 2 if init_lr is None else init_lr
        check_float("init_lr", init_lr, 0, lr_max, low_open=True, high_open=True, hint="the upper bound is lr_max")
        check_float("init_mom_decay", init_mom_decay, 0, 1, low_open=True, high_open=True)
        check_float("init_forget", init_forget, 0, 1, low_open=True, high_open=True)
        check_int("conv_size", conv_size, 0, hint="0 for no convolution")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.depth, self.activation = chunk_size, depth, activation
        self.residual = depth >= 2 if residual is None else bool(residual)
        self.momentum, self.lr_max, self.conv_size = momentum, float(lr_max), conv_size
        self.hidden = max(1, round(expansion * self.head_dim))

        self.norm = nn.RMSNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.conv = None  # taps (3D, K) of the causal depthwise convolution; the last tap is the current token
        if conv_size:
            self.conv = nn.Parameter(torch.zeros(3 * dim, conv_size))
            with torch.no_grad():
                self.conv[:, -1] = 1.0  # identity
        # gate logits per head, in this order: lr (theta), forget (alpha), mom_decay (eta, with momentum)
        self.to_gates = nn.Linear(dim, (3 if momentum else 2) * heads)
        with torch.no_grad():
            biases = [_logit(init_lr / lr_max), _logit(init_forget), _logit(init_mom_decay)]
            self.to_gates.bias.copy_(torch.tensor(biases[: 3 if momentum else 2]).repeat_interleave(heads))
        sizes = [self.head_dim] + [self.hidden] * (depth - 1) + [self.head_dim]
        shapes = [(heads, n_out, n_in) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]  # W_l: (H, out, in)
        self.memory = nn.ParameterList(nn.Parameter(torch.randn(shape) / math.sqrt(shape[-1])) for shape in shapes)
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.to_out_gate = None
        if output_gate:  # 2 * sigmoid(W_G x), zero-initialised: the gate starts as the identity
            self.to_out_gate = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.to_out_gate.weight)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.last_stats: dict[str, Tensor] = {}

    def initial_state(
        self, batch: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> NeuralMemoryState:
        """The state ``state=None`` stands for: every sample at the learned initial memory, zero momentum and
        convolution inputs, no pending token (differentiable w.r.t. the initial memory)."""
        weights = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *w.shape) for w in self.memory)
        momentum = tuple(torch.zeros_like(w) for w in weights) if self.momentum else ()
        conv = None
        if self.conv_size > 1:
            conv = torch.zeros(batch, self.conv_size - 1, 3 * self.dim, device=device, dtype=dtype)
        return NeuralMemoryState(weights, momentum, conv)

    def forward(
        self, x: Tensor, state: Optional[NeuralMemoryState] = None, write: bool = True
    ) -> tuple[Tensor, NeuralMemoryState]:
        """Read (and write) the memory along ``x``.

        Args:
            x: Input ``(batch, seq, dim)``.
            state: The state to continue from; ``None`` starts from the learned initial memory.
            write: ``False`` reads only: every token reads ``state`` and the same ``state`` is returned (as if the
                segment had not been seen; the convolution's inputs are not advanced either).

        Returns:
            ``(y (batch, seq, dim), new_state)``.

        Raises:
            ValueError: If ``x`` or ``state`` has the wrong shape, or ``x`` has no token.

        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must be (batch, seq, dim={self.dim}), got shape {tuple(x.shape)}.")
        batch, seq, _ = x.shape
        if seq == 0:
            raise ValueError("`x` is an empty sequence (seq = 0); pass at least one token.")
        inner = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is None:
            state = self.initial_state(batch, x.device, inner)
        self._check_state(state, batch)
        h = self.norm(x)
        proj = F.linear(h, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))  # (B, T, 3D)
        conv = state.conv
        if self.conv is not None:
            past = state.conv.to(proj.dtype) if state.conv is not None else proj[:, :0]
            full = torch.cat([past, proj], dim=1)  # (B, K - 1 + T, 3D)
            taps = self.conv.to(proj.dtype).t().contiguous()  # (K, 3D)
            proj = sum(full[:, j : j + seq] * taps[j] for j in range(self.conv_size))  # t sees t-K+1 .. t
            conv = full[:, full.shape[1] - (self.conv_size - 1) :].to(inner) if self.conv_size > 1 else None
        logits = self.to_gates(h)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = F.silu(proj.to(inner)).view(batch, seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = _l2_normalize(q), _l2_normalize(k)  # (B, H, T, hd)
            gates = logits.to(inner).view(batch, seq, -1, self.heads).permute(2, 0, 3, 1)  # (G, B, H, T)
            lr = self.lr_max * torch.sigmoid(gates[0])
            log_keep = F.logsigmoid(-gates[1])  # log(1 - alpha)
            log_decay = F.logsigmoid(gates[2]) if self.momentum else None  # log(eta)
            if write:
                steps = torch.stack([lr, log_keep, *([] if log_decay is None else [log_decay])], dim=-1)  # (B, H, T, G)
                y, weights, moms, pending, stats = self._stream(q, k, v, steps, state, inner)
                new_state = NeuralMemoryState(weights, moms, conv, *pending)
            else:
                weights = tuple(w.to(inner) for w in state.weights)
                y, _, _ = memory_forward(weights, torch.cat([q, k], dim=2), self.activation, self.residual)
                y, pred = y.split(seq, dim=2)
                stats = {"surprise": (pred - v).detach().square().sum(-1).mean()}
                new_state = state
            self.last_stats = self._stats(stats, new_state, lr, log_keep, log_decay)
        y = self.out_norm(y.transpose(1, 2).to(x.dtype)).reshape(batch, seq, self.dim)  # (B, T, D)
        if self.to_out_gate is not None:
            y = y * (2 * torch.sigmoid(self.to_out_gate(h)))
        return self.to_out(y), new_state

    def _stream(
        self, q: Tensor, k: Tensor, v: Tensor, steps: Tensor, state: NeuralMemoryState, inner: torch.dtype
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple[Optional[Tensor], ...], dict[str, Tensor]]:
        """Write every chunk this call completes, the state's pending tokens first, and keep the rest pending.

        Args:
            q: This call's queries ``(B, H, T, hd)``.
            k: Its keys ``(B, H, T, hd)``.
            v: Its values ``(B, H, T, hd)``.
            steps: Its gates ``(B, H, T, G)``: ``theta``, ``log(1 - alpha)`` (, ``log(eta)``).
            state: The state to continue.
            inner: The dtype of the inner computation.

        Returns:
            ``(reads (B, H, T, hd), weights, momenta, (keys, values, gates) pending or three None, stats)``.

        """
        skip = state.pending_count  # tokens of the current chunk read by earlier calls
        if skip:  # they join this call's tokens; their reads are not repeated
            pending = (state.pending_keys, state.pending_values, state.pending_gates)
            k, v, steps = (torch.cat([p.to(t.dtype), t], dim=2) for p, t in zip(pending, (k, v, steps), strict=True))
        full = k.shape[2] // self.chunk_size * self.chunk_size  # positions [0, full) of (pending + call) are written
        weights = tuple(w.to(inner) for w in state.weights)
        moms = tuple(s.to(inner) for s in state.momentum)
        reads, surprise, grad_norm = [], [], []
        if full:
            chunks = (k[:, :, :full], v[:, :, :full], steps[:, :, :full])
            reads, weights, moms, surprise, grad_norm = self._scan(q, *chunks, weights, moms, skip)
        own = max(full, skip)  # the first unwritten position read by this call
        if own < k.shape[2]:  # the unfinished chunk reads the anchor
            reads.append(memory_forward(weights, q[:, :, own - skip :], self.activation, self.residual)[0])
            with torch.no_grad():
                pred = memory_forward(weights, k[:, :, own:], self.activation, self.residual)[0]
                surprise.append((pred - v[:, :, own:]).square().sum(-1).flatten())
        pending = (None, None, None)
        if full < k.shape[2]:  # a copy, so that the state does not hold this call's tensors
            pending = tuple(t[:, :, full:].clone() for t in (k, v, steps))
        stats = {"surprise": torch.cat(surprise).mean()}
        if grad_norm:  # only when a chunk was written
            stats["grad_norm"] = torch.cat(grad_norm).mean()
        return torch.cat(reads, dim=2), weights, moms, pending, stats

    def _scan(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        steps: Tensor,
        weights: tuple[Tensor, ...],
        moms: tuple[Tensor, ...],
        skip: int,
    ) -> tuple[list[Tensor], tuple[Tensor, ...], tuple[Tensor, ...], list[Tensor], list[Tensor]]:
        """Read and write whole chunks: coefficients of all chunks at once, then one step per chunk.

        Args:
            q: The queries of this call ``(B, H, T, hd)``; the first ``skip`` positions of the chunks have none.
            k: Keys of the chunks ``(B, H, N * C, hd)``, the ``skip`` pending tokens first.
            v: Their values ``(B, H, N * C, hd)``.
            steps: Their gates ``(B, H, N * C, G)``.
            weights: The anchor of the first chunk.
            moms: Its momenta.
            skip: Pending tokens at the front (read by earlier calls).

        Returns:
            ``(reads, weights, momenta, surprise, grad_norm)``: the reads of this call's tokens per chunk, the state at
            the end of the last chunk, and the flat inner losses (this call's tokens) and gradient norms (all written).

        """
        c = self.chunk_size
        k_, v_, steps_ = (t.unflatten(2, (-1, c)) for t in (k, v, steps))  # (B, H, N, C, ...)
        lr, log_keep, *log_decay = steps_.unbind(-1)
        coef = chunk_coefficients(lr, log_keep, log_decay[0] if log_decay else None)  # (B, H, N, C) and (B, H, N)
        names = ("c_M", "c_S") if self.momentum else ("c_M",)
        cs = torch.stack([coef[name] for name in names], dim=-1)  # (B, H, N, C, K)
        names = ("keep", "a_S", "decay") if self.momentum else ("keep",)
        scalars = torch.stack([coef[name] for name in names], dim=-1)  # (B, H, N, 1 or 3)
        reads, surprise, grad_norm = [], [], []
        for j, (k_j, v_j, c_j, s_j) in enumerate(zip(*(t.unbind(2) for t in (k_, v_, cs, scalars)), strict=True)):
            q_j = q[:, :, max(j * c - skip, 0) : (j + 1) * c - skip]  # this call's queries of chunk j
            reads.append(memory_forward(weights, q_j, self.activation, self.residual)[0])  # at the anchor
            pred, inputs, pre = memory_forward(weights, k_j, self.activation, self.residual)
            error = pred - v_j  # (B, H, C, hd): M(k) - v at the anchor
            deltas = memory_backward(weights, pre, 2 * error, self.activation)
            sq = sum(d.square().sum(-1) * a.square().sum(-1) for d, a in zip(deltas, inputs, strict=True))
            norm = sq.sqrt()  # (B, H, C): ||u_i||_F over all layers, since ||d a^T|| = ||d|| ||a||
            if self.max_inner_grad_norm is not None:  # clip u_i by scaling its coefficients
                c_j = c_j * (self.max_inner_grad_norm / norm.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(-1)
            weights, moms = self._write(weights, moms, deltas, inputs, c_j, s_j)
            with torch.no_grad():
                surprise.append(error[:, :, max(skip - j * c, 0) :].square().sum(-1).flatten())
                grad_norm.append(norm.flatten())
        return reads, weights, moms, surprise, grad_norm

    def _write(
        self,
        weights: tuple[Tensor, ...],
        moms: tuple[Tensor, ...],
        deltas: list[Tensor],
        inputs: list[Tensor],
        coefs: Tensor,
        scalars: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The chunk-end state: ``M = keep M_0 + a_S S_0 - sum_i c^M_i u_i`` and ``S = decay S_0 - sum_i c^S_i u_i``."""
        keep, *momentum_scalars = scalars[..., None, None].unbind(2)  # (B, H, 1, 1): keep (, a_S, decay)
        new_weights, new_moms = [], []
        for i, (w, d, a) in enumerate(zip(weights, deltas, inputs, strict=True)):
            weighted = (d.unsqueeze(-2) * coefs.unsqueeze(-1)).flatten(-2)  # (B, H, n, K * out): c^M_i d_i, c^S_i d_i
            g = (weighted.transpose(-1, -2) @ a).unflatten(-2, (-1, d.shape[-1]))  # (B, H, K, out, in): sum_i c_i u_i
            if self.momentum:
                a_s, decay = momentum_scalars
                new_weights.append(keep * w + a_s * moms[i] - g[:, :, 0])
                new_moms.append(decay * moms[i] - g[:, :, 1])
            else:
                new_weights.append(keep * w - g[:, :, 0])
        return tuple(new_weights), tuple(new_moms)

    def _stats(
        self,
        stats: dict[str, Tensor],
        state: NeuralMemoryState,
        lr: Tensor,
        log_keep: Tensor,
        log_decay: Optional[Tensor],
    ) -> dict[str, Tensor]:
        with torch.no_grad():
            norm = sum(w.detach().square().sum((-1, -2)) for w in state.weights).sqrt().mean()
            stats.update(weight_norm=norm, lr=lr.detach().mean(), forget=-torch.expm1(log_keep.detach()).mean())
            if log_decay is not None:
                stats["mom_decay"] = log_decay.detach().exp().mean()
        return {name: value.detach().float() for name, value in stats.items()}

    def _check_state(self, state: NeuralMemoryState, batch: int) -> None:
        expected = [(batch, *w.shape) for w in self.memory]
        shapes = [tuple(w.shape) for w in state.weights]
        moms = len(expected) if self.momentum else 0
        conv = (batch, self.conv_size - 1, 3 * self.dim) if self.conv_size > 1 else None
        got_conv = _shape(state.conv)
        got_pending = [_shape(t) for t in (state.pending_keys, state.pending_values, state.pending_gates)]
        count, gates = state.pending_count, 3 if self.momentum else 2
        pending = [(batch, self.heads, count, self.head_dim)] * 2 + [(batch, self.heads, count, gates)]
        pending_ok = got_pending == [None] * 3 or (got_pending == pending and count < self.chunk_size)
        if shapes != expected or len(state.momentum) != moms or got_conv != conv or not pending_ok:
            raise ValueError(
                f"The state does not fit this memory and batch: weights {shapes}, {len(state.momentum)} momenta, conv"
                f" {got_conv}, pending keys, values and gates {got_pending}; expected weights {expected}, {moms}"
                f" momenta, conv {conv}, pending None or ({batch}, {self.heads}, p, {self.head_dim}) twice and"
                f" ({batch}, {self.heads}, p, {gates}) with 0 <= p < chunk_size = {self.chunk_size}. Pass the state"
                " this module returned for the same batch, or None."
            )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, chunk_size={self.chunk_size}, depth={self.depth},"
            f" hidden={self.hidden}, residual={self.residual}, momentum={self.momentum}, lr_max={self.lr_max}"
        )
