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
Self-Modifying Titans
^^^^^^^^^^^^^^^^^^^^^

Memories that generate their own keys, values, learning rates and retention gates, and update themselves by delta
gradient descent (A §8, Eq. 76-93, NL arXiv). Per head (width ``d = dim // heads``), with
:math:`\square \in \{k, v, \eta, \alpha, \mathrm{mem}\}` and every memory a residual MLP
:math:`\mathcal{M}(z) = z + W_1\sigma(W_2 z)`:

.. math::

    x_t &= \mathrm{conv}(x)_t, \quad q_t = \mathrm{normalize}(W_q x_t), \quad
    k_t = \mathrm{normalize}(\mathcal{M}_k(x_t)), \quad v_t = \mathcal{M}_v(x_t), \\
    \eta_t &= \eta_{\max}\,\mathrm{sigmoid}(r_\eta^\top \mathcal{M}_\eta(x_t) + b_\eta), \quad
    \alpha_t = \mathrm{sigmoid}(r_\alpha^\top \mathcal{M}_\alpha(x_t) + b_\alpha), \quad
    \hat v_{\square,t} = \mathcal{M}_\square(v_t), \\
    W_{2,\square} &\leftarrow W_{2,\square}(\alpha_t I - \eta_t k_t k_t^\top) - \eta_t \nabla_{W_2} L, \qquad
    W_{1,\square} \leftarrow \alpha_t W_{1,\square} - \eta_t \nabla_{W_1} L, \qquad
    L = \lVert \mathcal{M}_\square(k_t) - \hat v_{\square,t} \rVert^2 ,

(Eq. 88: DGD with retention), and the output :math:`o_t = \mathcal{M}_{\mathrm{mem}}(q_t)`, then a projection over the
heads. Choices the paper leaves open [ours]: the input-side matrix ``W_2`` gets the
:math:`\alpha I - \eta k k^\top` factor and ``W_1`` the plain retention; ``η`` and ``α`` are scalar readouts (per head)
of their memories' outputs, ``α`` starting near ``alpha_init`` and ``η <= eta_max <= 1``, so that with
:math:`\lVert k\rVert = 1` the factor :math:`\alpha I - \eta k k^\top` has its spectrum in ``(-1, 1)``; no inner
momentum; no biases in the memories.

``rule="delta"`` replaces :math:`\nabla L` by the gradient of the dot-product objective
:math:`-\langle \mathcal{M}(k_t), \hat v_t\rangle` (Eq. 92, NL arXiv, with the sign of the gated delta
rule): ``∇_{W1} = -v̂ aᵀ``, ``∇_{W2} = -((W_1ᵀ v̂) ⊙ σ'(u)) kᵀ``. For a linear memory ``M(k) = W k``
this is exactly the gated delta rule :math:`W \leftarrow W(\alpha I - \eta k k^\top) + \eta \hat v k^\top`, whose
fixed point is ``W k = v̂``, where the literal L2 form counts ``W k kᵀ`` twice and settles at ``v̂ / 2``. In the MLP,
``W_1`` has no ``k kᵀ`` term, so under this rule it takes a gated Hebbian step with no error correction.

**Stability** [ours]: ``η_t <= eta_max <= 1`` (a bounded sigmoid, so ``η`` is clamped by construction)
and each token's inner gradient is clipped to ``max_inner_grad_norm`` (default 1; ``None`` turns it off). The clip
matters: ``k`` is normalised but ``v`` is not, so the self-generated target ``M(v)`` can move faster than the
prediction ``M(k)`` it pulls, and at the defaults without the clip both rules overflow within about a hundred tokens
of unit-variance random input. With it each token moves a memory by at most ``η_t * max_inner_grad_norm``.

**Layout and initialisation** [ours]: the per-head inputs ``x_t`` are the convolution's channels of that head (no input
projection; ``W_q`` and the output projection mix the heads); the memories' initial weights use ``nn.Linear``'s
default scale (``U(±1/sqrt(fan_in))``), the readouts too, with biases ``logit(alpha_init)`` and
``logit(eta_init / eta_max)``; the convolution has ``nn.Conv1d``'s default initialisation.

**Chunked training** (Eq. 90): every token of a chunk computes ``k, v, η, α, v̂`` and its gradient from the chunk's
*anchor* (the weights at the end of the previous chunk), then the recurrence, linear in the weights, runs over the
chunk exactly (:func:`~nl_lightning.models._residual_memory.dgd_chunk`), and its end becomes the next anchor. The
``k, v, η, α`` memories use ``chunk_size``, ``M_mem`` uses ``mem_chunk_size``. ``chunk_size=1`` is exact
self-reference. Chunks are aligned to the stream (the state remembers the position), so carrying the state over
segments equals one long pass, mid-chunk included. Gradients flow through every write to the meta-learned initial
weights (:meth:`SelfModifyingState.detach` truncates them between segments). The inner loop runs in fp32 with
autocast disabled (fp64 for fp64 inputs) and needs no autograd, so it works under ``torch.inference_mode()``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nl_lightning._validation import check_float, check_int, check_positive
from nl_lightning.models._residual_memory import clip_factor, dgd_chunk, input_side_factor, residual_forward
from nl_lightning.models.cms_memory import ACTIVATIONS, _portable, piece_lengths

if TYPE_CHECKING:
    from nl_lightning.models.hope import HopeConfig

__all__ = ["MEMORIES", "SelfModifyingState", "SelfModifyingTitans"]

#: The order of the five memories along dimension 1 of the weights.
MEMORIES = ("k", "v", "eta", "alpha", "mem")


@dataclass
class SelfModifyingState:
    """The fast state of a :class:`SelfModifyingTitans`: per-sample, per-head weights of the five memories.

    Pass it back to continue a stream; ``None`` starts every sample from the meta-learned initial weights.

    Attributes:
        w1: Output-side weights after the last token, ``(B, 5, H, d, h)``, memories in :data:`MEMORIES` order.
        w2: Input-side weights after the last token, ``(B, 5, H, h, d)``.
        anchor_w1: ``w1`` at the last chunk boundary (what the current chunk reads with).
        anchor_w2: ``w2`` at the last chunk boundary.
        conv: The last ``conv_size - 1`` inputs ``(B, conv_size - 1, dim)`` (the causal convolution's history).
        count: Tokens read in the current chunk of the ``k, v, η, α`` memories.
        mem_count: Tokens read in the current chunk of ``M_mem``.

    """

    w1: Tensor
    w2: Tensor
    anchor_w1: Tensor
    anchor_w2: Tensor
    conv: Tensor
    count: int = 0
    mem_count: int = 0

    _TENSORS = ("w1", "w2", "anchor_w1", "anchor_w2", "conv")

    def map(self, fn: Callable[[Tensor], Tensor]) -> SelfModifyingState:
        return replace(self, **{name: fn(getattr(self, name)) for name in self._TENSORS})

    def detach(self) -> SelfModifyingState:
        """Stop gradients here (truncated backpropagation between segments); also makes a state computed under
        ``torch.inference_mode`` usable outside it."""
        return self.map(_portable)

    def to(self, *args: Any, **kwargs: Any) -> SelfModifyingState:
        return self.map(lambda t: t.to(*args, **kwargs))

    def select(self, index: Tensor) -> SelfModifyingState:
        """The states of some samples of the batch (e.g. those whose sequence continues)."""
        return self.map(lambda t: t[index])

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loads with ``torch.load(weights_only=True)``); detached."""
        out: dict[str, Any] = {name: getattr(self.detach(), name) for name in self._TENSORS}
        return {**out, "count": self.count, "mem_count": self.mem_count}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SelfModifyingState:
        tensors = {name: state[name] for name in cls._TENSORS}
        return cls(**tensors, count=int(state["count"]), mem_count=int(state["mem_count"]))


def _check_arguments(
    dim: int,
    heads: int,
    chunk_size: int,
    mem_chunk_size: int,
    hidden_mult: float,
    conv_size: int,
    rule: str,
    eta_max: float,
    activation: str,
    alpha_init: float,
    eta_init: float,
    max_inner_grad_norm: Optional[float],
) -> None:
    """The checks of :class:`SelfModifyingTitans`' arguments (``mem_chunk_size`` resolved); see its ``Raises``."""
    for name, value in [("dim", dim), ("heads", heads), ("chunk_size", chunk_size)]:
        check_int(name, value)
    check_int("mem_chunk_size", mem_chunk_size)
    check_int("conv_size", conv_size)
    if dim % heads:
        raise ValueError(f"`dim` ({dim}) must be divisible by `heads` ({heads}); pick heads among its divisors.")
    check_positive("hidden_mult", hidden_mult)
    if rule not in ("paper", "delta"):
        raise ValueError(f"`rule` must be 'paper' or 'delta', got {rule!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    check_float("eta_max", eta_max, 0, 1, low_open=True, hint="it keeps αI - ηkkᵀ a contraction")
    check_float("alpha_init", alpha_init, 0, 1, low_open=True, high_open=True)
    check_float("eta_init", eta_init, 0, eta_max, low_open=True, high_open=True, hint="keep it below `eta_max`")
    if max_inner_grad_norm is not None:
        check_positive("max_inner_grad_norm", max_inner_grad_norm, hint="use None for unclipped inner gradients")


class SelfModifyingTitans(nn.Module):
    r"""Self-modifying Titans (A §8, Eq. 76-93, NL arXiv): five self-referential memories written by DGD (Eq. 88).

    ``y, state = smt(x, state=None, write=True)`` with ``x``, ``y`` ``(batch, seq, dim)``. See the module docstring
    for the equations and choices. With ``write=False`` the memories are only read (every token with the anchor
    weights of ``state``) and the returned state differs from ``state`` only in the convolution's history.

    Parameters: ``w1`` ``(5, H, d, h)`` and ``w2`` ``(5, H, h, d)`` are the meta-learned initial weights of the
    memories (:data:`MEMORIES` order), ``readout_weight`` ``(2, H, d)`` and ``readout_bias`` ``(2, H)`` the ``η`` and
    ``α`` readouts, ``conv`` the depthwise causal convolution, ``q_proj`` ``W_q``, ``out_proj`` the output projection.
    ``last_stats`` holds detached scalars of the last call: ``inner_loss/<memory>`` (mean
    :math:`\lVert\mathcal{M}(k) - \hat v\rVert^2` at the anchors), ``norm/<memory>`` (mean Frobenius norm of the final
    ``(W_1, W_2)``), ``eta`` and ``alpha`` (means). A Hope block builds it from its
    :class:`~nl_lightning.models.hope.HopeConfig` with :meth:`from_config`; :meth:`check_arguments` runs the checks
    below without building it.

    Args:
        dim: Model width; must be divisible by ``heads``.
        heads: Number of heads ``H`` (each with its own memories on ``d = dim // heads`` channels).
        chunk_size: Tokens per chunk of the ``k, v, η, α`` memories (Eq. 90); 1 is exact self-reference.
        mem_chunk_size: Tokens per chunk of ``M_mem`` (default: ``chunk_size``).
        hidden_mult: Hidden width ``h = round(hidden_mult * d)`` of every memory MLP.
        conv_size: Window of the causal depthwise convolution on the input (1: a per-channel affine map).
        rule: ``"paper"`` (Eq. 88 with the L2 gradient, literal) or ``"delta"`` (the gated-delta-rule form).
        eta_max: Upper bound of the inner learning rate ``η_t``, in ``(0, 1]``.
        activation: The memories' ``σ``: ``"silu"``, ``"gelu"``, ``"relu"`` or ``"tanh"``.
        alpha_init: ``α_t`` at initialisation (the readout bias is its logit), in ``(0, 1)``.
        eta_init: ``η_t`` at initialisation, in ``(0, eta_max)``.
        max_inner_grad_norm: Clip each token's inner gradient, per memory and head, to this Frobenius norm (a
            stability measure [ours]; the ``k kᵀ`` term is not clipped); ``None`` turns it off. On by
            default, see "Stability" in the module docstring.

    Raises:
        ValueError: On a non-positive size, ``dim`` not divisible by ``heads``, an unknown ``rule`` or ``activation``,
            or ``eta_max``, ``alpha_init``, ``eta_init``, ``max_inner_grad_norm`` out of range.

    Example::

        smt = SelfModifyingTitans(dim=128, heads=4, chunk_size=16)
        y, state = smt(torch.randn(2, 256, 128))          # writes along the sequence
        y2, state = smt(torch.randn(2, 256, 128), state)  # continues the stream
        y3, _ = smt(torch.randn(2, 64, 128), state.detach(), write=False)  # read only

    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        chunk_size: int = 16,
        mem_chunk_size: Optional[int] = None,
        hidden_mult: float = 1.0,
        conv_size: int = 4,
        rule: str = "paper",
        eta_max: float = 0.5,
        activation: str = "silu",
        alpha_init: float = 0.99,
        eta_init: float = 0.05,
        max_inner_grad_norm: Optional[float] = 1.0,
    ) -> None:
        super().__init__()
        mem_chunk_size = chunk_size if mem_chunk_size is None else mem_chunk_size
        _check_arguments(
            dim,
            heads,
            chunk_size,
            mem_chunk_size,
            hidden_mult,
            conv_size,
            rule,
            eta_max,
            activation,
            alpha_init,
            eta_init,
            max_inner_grad_norm,
        )
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.hidden = max(1, round(hidden_mult * self.head_dim))
        self.chunk_size, self.mem_chunk_size, self.conv_size = chunk_size, mem_chunk_size, conv_size
        self.rule, self.activation, self.eta_max = rule, activation, float(eta_max)
        self.max_inner_grad_norm = None if max_inner_grad_norm is None else float(max_inner_grad_norm)
        d, h = self.head_dim, self.hidden
        self.w1 = nn.Parameter(torch.empty(len(MEMORIES), heads, d, h).uniform_(-1, 1) / math.sqrt(h))
        self.w2 = nn.Parameter(torch.empty(len(MEMORIES), heads, h, d).uniform_(-1, 1) / math.sqrt(d))
        self.readout_weight = nn.Parameter(torch.empty(2, heads, d).uniform_(-1, 1) / math.sqrt(d))
        bias = [math.log(eta_init / (eta_max - eta_init)), math.log(alpha_init / (1 - alpha_init))]
        self.readout_bias = nn.Parameter(torch.tensor(bias).unsqueeze(1).repeat(1, heads))
        self.conv = nn.Conv1d(dim, dim, conv_size, groups=dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.last_stats: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, config: HopeConfig) -> SelfModifyingTitans:
        """The self-modifying Titans of a Hope block: ``config``'s ``dim``, ``heads``, ``chunk_size`` and
        ``titans_kwargs``."""
        return cls(config.dim, config.heads, config.chunk_size, **config.titans_kwargs)

    @classmethod
    def check_arguments(cls, dim: int, heads: int = 4, chunk_size: int = 16, **kwargs: Any) -> None:
        """Raise the ``ValueError`` that ``SelfModifyingTitans(dim, heads, chunk_size, **kwargs)`` would raise, without
        building it (:class:`~nl_lightning.models.hope.HopeConfig` checks its ``titans_kwargs`` with it).

        Args:
            dim: Model width.
            heads: Number of heads.
            chunk_size: Tokens per chunk of the ``k, v, η, α`` memories.
            **kwargs: The other arguments of :class:`SelfModifyingTitans`.

        Raises:
            ValueError: On a name :class:`SelfModifyingTitans` does not take, or a bad value (see the class).

        """
        signature = inspect.signature(cls.__init__)
        unknown = sorted(set(kwargs) - (set(signature.parameters) - {"self"}))
        if unknown:
            allowed = sorted(set(signature.parameters) - {"self", "dim", "heads", "chunk_size"})
            raise ValueError(f"SelfModifyingTitans takes no argument(s) {unknown}; the others are {allowed}.")
        bound = signature.bind(None, dim, heads, chunk_size, **kwargs)
        bound.apply_defaults()
        args = {name: value for name, value in bound.arguments.items() if name != "self"}
        if args["mem_chunk_size"] is None:
            args["mem_chunk_size"] = chunk_size
        _check_arguments(**args)

    def initial_state(
        self, batch: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> SelfModifyingState:
        """The state ``state=None`` stands for: every sample at the initial weights (differentiable w.r.t. them)."""
        w1 = self.w1.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *self.w1.shape)
        w2 = self.w2.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, *self.w2.shape)
        conv = torch.zeros(batch, self.conv_size - 1, self.dim, device=device, dtype=dtype)
        return SelfModifyingState(w1, w2, w1, w2, conv)

    def forward(
        self, x: Tensor, state: Optional[SelfModifyingState] = None, write: bool = True
    ) -> tuple[Tensor, SelfModifyingState]:
        """``x`` ``(batch, seq, dim)`` -> ``(y, state)``; see the class docstring."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Expected x of shape (batch, seq, {self.dim}), got {tuple(x.shape)}.")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        state = self.initial_state(x.shape[0], x.device, dtype) if state is None else state
        if state.w1.shape[0] != x.shape[0]:
            raise ValueError(f"The state holds {state.w1.shape[0]} samples, x {x.shape[0]}; use `state.select`.")
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, conv = self._conv(x.to(dtype), state.conv.to(dtype))  # (B, T, D)
            xh, q = self._heads(xc), F.normalize(self._heads(xc @ self.q_proj.weight.to(dtype).T), dim=-1)
            state = replace(state.map(lambda t: t.to(dtype)), conv=conv)
            if write and x.shape[1] > 0:
                o, state = self._write_pass(xh, q, state)
            else:
                mem_w1, mem_w2 = state.anchor_w1[:, 4], state.anchor_w2[:, 4]  # M_mem (B, H, ., .) at its anchor
                o = residual_forward(q, mem_w1, mem_w2, self.activation)[0]  # (B, H, T, d)
                self.last_stats = self._norm_stats(state)
            o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)  # (B, T, D)
        return self.out_proj(o.to(x.dtype)).to(x.dtype), state

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def _conv(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise convolution continuing ``history``; returns the output and the new history."""
        full = torch.cat([history, x], dim=1)  # (B, K - 1 + T, D)
        w, b = self.conv.weight.to(x.dtype), self.conv.bias.to(x.dtype)
        y = F.conv1d(full.transpose(1, 2), w, b, groups=self.dim).transpose(1, 2)  # (B, T, D)
        return y, full[:, full.shape[1] - (self.conv_size - 1) :]

    def _generate(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``k, v, η, log α`` of a chunk's tokens from the four generators' outputs ``y`` ``(4, B, H, n, d)``."""
        weight, bias = self.readout_weight.to(y.dtype), self.readout_bias.to(y.dtype)  # (2, H, d), (2, H)
        logits = (y[2:] * weight[:, None, :, None]).sum(-1) + bias[:, None, :, None]  # (2, B, H, n)
        eta = self.eta_max * torch.sigmoid(logits[0])
        return F.normalize(y[0], dim=-1), y[1], eta, F.logsigmoid(logits[1])

    def _write(self, w1, w2, anchor1, anchor2, k, v, eta, log_alpha) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk of Eq. 88 for ``G`` memories: targets and gradients at the anchors, then the exact recurrence.

        Shapes: weights ``(G, B, H, ., .)``; ``k``, ``v`` ``(B, H, n, d)``; ``eta``, ``log_alpha`` ``(B, H, n)``.
        Returns the chunk-end weights and the inner losses ``(G, B, H, n)``.
        """
        n = k.shape[-2]
        # the targets M(v) and the predictions M(k) in one pass over the rows [k; v]
        y, u, a = residual_forward(torch.cat([k, v], dim=-2), anchor1, anchor2, self.activation)  # (G, B, H, 2n, .)
        pred, v_hat, u, a = y[..., :n, :], y[..., n:, :], u[..., :n, :], a[..., :n, :]
        error = pred - v_hat
        p = 2 * error if self.rule == "paper" else -v_hat  # grad_W1 = p aᵀ
        delta = input_side_factor(p, u, anchor1, self.activation)  # grad_W2 = δ kᵀ
        step = eta
        if self.max_inner_grad_norm is not None:
            step = eta * clip_factor(p, a, delta, k, self.max_inner_grad_norm)  # (G, B, H, n)
        w1, w2 = dgd_chunk(w1, w2, k, a, p, delta, eta, step, log_alpha)
        return w1, w2, error.detach().pow(2).sum(-1)

    def _write_pass(self, xh: Tensor, q: Tensor, state: SelfModifyingState) -> tuple[Tensor, SelfModifyingState]:
        """Write the five memories along the tokens (Eq. 88, chunked as in Eq. 90) and read ``M_mem`` with ``q``.

        Pass 1 scans the chunks of the generators ``M_k, M_v, M_η, M_α``: each chunk's tokens generate their ``k, v,
        η, α`` with the chunk's anchors, then write the generators. Pass 2 scans ``M_mem``'s chunks: each chunk's
        queries read ``M_mem`` at its anchor (the output ``o_t``), then the chunk writes ``M_mem`` with its tokens' ``k,
        v, η, α`` from pass 1. When both chunkings are the same (equal sizes, same position in the current chunk),
        one scan does both passes, all five memories batched.

        Args:
            xh: The convolution's output per head ``(B, H, T, d)``.
            q: The normalised queries ``(B, H, T, d)``.
            state: The state before the tokens.

        Returns:
            The outputs ``o`` ``(B, H, T, d)`` and the state after the tokens.

        """
        memories = _Memories.from_state(state)  # (5, B, H, ., .): memories first
        if self.mem_chunk_size == self.chunk_size and state.count == state.mem_count:
            memories, out, tokens, loss = self._scan_generators(xh, memories, q=q)  # loss (5, B, H, T)
            generators, memory = memories.generators(), memories.memory()
        else:
            generators, _, tokens, gen_loss = self._scan_generators(xh, memories.generators())  # loss (4, B, H, T)
            memory = replace(memories.memory(), count=state.mem_count)  # M_mem at its own place in its chunk
            memory, out, mem_loss = self._scan_memory(q, tokens, memory)  # loss (1, B, H, T)
            loss = torch.cat([gen_loss, mem_loss])  # (5, B, H, T)
        state = _Memories.to_state(generators, memory, state)
        self.last_stats = self._write_stats(state, loss, tokens)
        return out, state

    def _scan_generators(
        self, xh: Tensor, memories: _Memories, q: Optional[Tensor] = None
    ) -> tuple[_Memories, Optional[Tensor], _Tokens, Tensor]:
        """Pass 1: the generators over their chunks of ``chunk_size`` tokens (Eq. 90).

        Each chunk reads the generators at their anchors, turns their outputs into the tokens' ``k, v, η, α`` (see
        :meth:`_generate`) and writes them (Eq. 88, :meth:`_write`). With ``q``, ``memories`` holds all five memories
        and ``M_mem`` rides along: it reads ``q`` and writes with the same ``k, v, η, α``.

        Args:
            xh: The convolution's output per head ``(B, H, T, d)``.
            memories: The four generators ``(4, B, H, ., .)``, or all five with ``q``.
            q: The queries ``(B, H, T, d)`` when ``M_mem`` rides along.

        Returns:
            The memories after the tokens, ``M_mem``'s outputs ``(B, H, T, d)`` (``None`` without ``q``), every
            token's ``k, v, η, log α`` and the inner losses ``(G, B, H, T)``.

        """
        lengths = piece_lengths(xh.shape[2], memories.count, self.chunk_size)
        x_pieces = xh.split(lengths, dim=2)  # (B, H, n, d) each; split, not slices: a cheap backward
        q_pieces = [None] * len(lengths) if q is None else q.split(lengths, dim=2)
        outs, tokens, losses = [], [], []
        for x, q_chunk in zip(x_pieces, q_pieces, strict=True):
            z = x if q_chunk is None else torch.stack([x, x, x, x, q_chunk])  # (B, H, n, d) or (5, B, H, n, d)
            y = residual_forward(z, memories.anchor_w1, memories.anchor_w2, self.activation)[0]  # (G, B, H, n, d)
            if q_chunk is not None:
                y, out = y[:4], y[4]  # the generators' outputs (4, B, H, n, d); M_mem's read of q (B, H, n, d)
                outs.append(out)
            chunk = _Tokens(*self._generate(y))  # k, v (B, H, n, d); η, log α (B, H, n)
            w1, w2, loss = self._write(memories.w1, memories.w2, memories.anchor_w1, memories.anchor_w2, *chunk)
            memories = memories.advance(w1, w2, x.shape[2], self.chunk_size)
            tokens.append(chunk)
            losses.append(loss)  # (G, B, H, n)
        out = torch.cat(outs, dim=2) if outs else None  # (B, H, T, d)
        return memories, out, _Tokens.cat(tokens), torch.cat(losses, dim=-1)

    def _scan_memory(self, q: Tensor, tokens: _Tokens, memory: _Memories) -> tuple[_Memories, Tensor, Tensor]:
        """Pass 2: ``M_mem`` over its chunks of ``mem_chunk_size`` tokens (Eq. 90).

        Each chunk's queries read ``M_mem`` at its anchor, giving the outputs ``o_t = M_mem(q_t)``; then the chunk
        writes ``M_mem`` (Eq. 88) with its tokens' ``k, v, η, α`` from pass 1.

        Args:
            q: The queries ``(B, H, T, d)``.
            tokens: Every token's ``k, v, η, log α`` from :meth:`_scan_generators`.
            memory: ``M_mem`` ``(1, B, H, ., .)``.

        Returns:
            ``M_mem`` after the tokens, the outputs ``(B, H, T, d)`` and the inner losses ``(1, B, H, T)``.

        """
        lengths = piece_lengths(q.shape[2], memory.count, self.mem_chunk_size)
        outs, losses = [], []
        for q_chunk, chunk in zip(q.split(lengths, dim=2), tokens.split(lengths), strict=True):
            read = residual_forward(q_chunk, memory.anchor_w1[0], memory.anchor_w2[0], self.activation)[0]
            outs.append(read)  # (B, H, n, d)
            w1, w2, loss = self._write(memory.w1, memory.w2, memory.anchor_w1, memory.anchor_w2, *chunk)
            memory = memory.advance(w1, w2, q_chunk.shape[2], self.mem_chunk_size)
            losses.append(loss)  # (1, B, H, n)
        return memory, torch.cat(outs, dim=2), torch.cat(losses, dim=-1)

    @torch.no_grad()
    def _write_stats(self, state: SelfModifyingState, loss: Tensor, tokens: _Tokens) -> dict[str, Tensor]:
        """``last_stats`` of a write pass: the inner losses ``loss`` ``(5, B, H, T)``, the norms, the mean gates."""
        return {
            **{f"inner_loss/{name}": loss[i].mean() for i, name in enumerate(MEMORIES)},
            **self._norm_stats(state),
            "eta": tokens.eta.detach().mean(),
            "alpha": tokens.log_alpha.detach().exp().mean(),
        }

    @torch.no_grad()
    def _norm_stats(self, state: SelfModifyingState) -> dict[str, Tensor]:
        sq = state.w1.detach().pow(2).sum((-1, -2)) + state.w2.detach().pow(2).sum((-1, -2))  # (B, 5, H)
        return {f"norm/{name}": sq[:, i].sqrt().mean() for i, name in enumerate(MEMORIES)}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, hidden={self.hidden}, chunk_size={self.chunk_size},"
            f" mem_chunk_size={self.mem_chunk_size}, rule={self.rule!r}, eta_max={self.eta_max}"
        )


class _Tokens(NamedTuple):
    """The tokens' self-generated keys, values, learning rates and log retention gates (``k, v, η, log α``)."""

    k: Tensor  # (B, H, n, d), normalised
    v: Tensor  # (B, H, n, d)
    eta: Tensor  # (B, H, n)
    log_alpha: Tensor  # (B, H, n)

    @staticmethod
    def cat(chunks: Sequence[_Tokens]) -> _Tokens:
        """The chunks joined along the tokens."""
        return _Tokens(*(torch.cat(parts, dim=2) for parts in zip(*chunks, strict=True)))

    def split(self, lengths: list[int]) -> list[_Tokens]:
        """Pieces of ``lengths`` tokens."""
        return [_Tokens(*parts) for parts in zip(*(t.split(lengths, dim=2) for t in self), strict=True)]


@dataclass
class _Memories:
    """``G`` memories' weights during a write pass, memories first (the layout of :func:`dgd_chunk`)."""

    w1: Tensor  # (G, B, H, d, h): after the last token read
    w2: Tensor  # (G, B, H, h, d)
    anchor_w1: Tensor  # (G, B, H, d, h): at the last chunk boundary
    anchor_w2: Tensor  # (G, B, H, h, d)
    count: int  # tokens read in the current chunk

    @staticmethod
    def from_state(state: SelfModifyingState) -> _Memories:
        """All five memories of ``state`` (which keeps ``(B, 5, H, ., .)``), with the generators' ``count``."""
        w1, w2, anchor_w1, anchor_w2 = (
            t.transpose(0, 1).contiguous() for t in (state.w1, state.w2, state.anchor_w1, state.anchor_w2)
        )
        return _Memories(w1, w2, anchor_w1, anchor_w2, state.count)

    def generators(self) -> _Memories:
        """``M_k, M_v, M_η, M_α``: the first four."""
        return _Memories(self.w1[:4], self.w2[:4], self.anchor_w1[:4], self.anchor_w2[:4], self.count)

    def memory(self) -> _Memories:
        """``M_mem``: the last one (with this object's ``count``)."""
        return _Memories(self.w1[4:], self.w2[4:], self.anchor_w1[4:], self.anchor_w2[4:], self.count)

    def advance(self, w1: Tensor, w2: Tensor, n: int, chunk_size: int) -> _Memories:
        """The memories after ``n`` more tokens written to ``(w1, w2)``; at a chunk's end these become the anchor."""
        count = self.count + n
        if count == chunk_size:
            return _Memories(w1, w2, w1, w2, 0)
        return _Memories(w1, w2, self.anchor_w1, self.anchor_w2, count)

    @staticmethod
    def to_state(generators: _Memories, memory: _Memories, state: SelfModifyingState) -> SelfModifyingState:
        """``state`` with the weights and counts of the generators and ``M_mem`` (back to ``(B, 5, H, ., .)``)."""
        w1, w2, anchor_w1, anchor_w2 = (
            torch.cat([a, b]).transpose(0, 1)
            for a, b in [
                (generators.w1, memory.w1),
                (generators.w2, memory.w2),
                (generators.anchor_w1, memory.anchor_w1),
                (generators.anchor_w2, memory.anchor_w2),
            ]
        )
        return replace(
            state,
            w1=w1,
            w2=w2,
            anchor_w1=anchor_w1,
            anchor_w2=anchor_w2,
            count=generators.count,
            mem_count=memory.count,
        )
