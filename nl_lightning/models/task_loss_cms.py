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
Task-Loss CMS Writes
^^^^^^^^^^^^^^^^^^^^

Hope's CMS token-axis writes driven by the model's own next-token loss (``HopeModule(cms_write_signal="task_loss")``):
Eq. 31 (NL NeurIPS) with the error term the gradient of the task loss, the "local surprise signal" reading, in the
manner of dynamic evaluation. With ``x_t`` the token at stream position ``t`` and :math:`\ell_t =
\mathrm{CE}(\mathrm{logits}_t, x_{t+1})`:

- **Reads.** Stream positions are global. Level ``l`` of a block, with chunk ``C_l``, reads the tokens of its chunk
  ``j`` with its anchor weights :math:`W_l`, the weights after the write that closed chunk ``j - 1``.
- **Pending sums.** :math:`P_l = \sum_{t \in \text{chunk } j} \nabla_{W_l} \ell_t`, each gradient taken at the anchor
  :math:`W_l` of position ``t`` and through the forward of position ``t`` only: every other quantity (the other
  levels' weights, the self-modifying Titans states, the activations of earlier tokens, the convolution's history
  included) is held fixed. It is first order: no gradient flows into earlier positions' computation.
- **Write** (Eq. 31): :math:`W_l \leftarrow \mathrm{lerp}(W_{0,l}, W_l, \rho_l) - (\eta_l / C_l) P_l` (``reduction
  ="sum"``: ``η_l P_l``), as :meth:`~nl_lightning.models.cms_memory.FastWeights.write`.
- **Causality and laziness.** The term of the last position ``t`` of a chunk needs ``x_{t+1}``, the first token of
  the next chunk, so the write that closes chunk ``j`` is applied when that token arrives, before it is read (it may
  be the target of ``t``: every position from ``t + 1`` on reads it anyway). A call ends with its last position's term
  open: the state keeps what the next call needs to add it (a :class:`TaskLossContext` of that position, and the
  level's ``count == C_l`` where its write is due); the next call adds
  :math:`\nabla \mathrm{CE}(\mathrm{logits}_{t}, x_{t+1})` with its first token, applies the due writes, then reads. At
  the end of a stream the last position has no target and its term is never added. So one pass over a sequence equals
  any split of it into calls, token by token included, and ``generate()`` stays exact.

**Computation.** A call runs in *steps*: the tokens up to the next chunk end of any CMS level or of the self-modifying
Titans' output memory ``M_mem`` (within a step every level and every ``M_mem`` reads one anchor). A step runs two
streams:

- the *outer* stream, the model's forward as usual (self-modifying Titans with their state, the CMS reads, the norm and
  the head), gives the logits and the outer gradient. The CMS reads are first order, as with
  ``differentiable_writes=False``: each step reads
  ``W = value + (W_in - W_in.detach()) + (c - c_in)(W_0 - W_0.detach())`` (``W_in``, ``c_in``: the state the call
  started from and its :attr:`~nl_lightning.models.cms_memory.FastWeights.initial_share`; ``c``: the share of the
  current weights), so the gradient reaches the starting state and the initial weights ``W_0`` (the parameters) with
  the shares the retention gives them, and the writes' updates carry no graph;
- the *probe* stream recomputes, from the values of the outer stream, the same logits through each position's own
  forward only: every CMS level reads ``W + probe`` (``probe`` a zeros tensor shaped like the per-sample weights, with
  ``requires_grad``, so :math:`\partial L / \partial \mathrm{probe} = \partial L / \partial W`), and each
  self-modifying Titans reads its input through the current token's tap of its causal convolution only, the earlier
  tokens' taps and the ``M_mem`` anchor held at their values. Then ``torch.autograd.grad`` of the summed
  cross-entropy of the positions whose next token the call holds (summed over the batch: per-sample probes get
  per-sample gradients) w.r.t. the probes gives every level's term of the pending sums at once (``create_graph=False``).

A single forward with the probes in the outer stream would also carry each position's gradient through the later
positions of the step (a later block's Titans mixes positions), which a token-by-token stream never sees; the probe
stream keeps the sums independent of how the stream is split.

**Inference.** Lightning validates under ``torch.inference_mode()`` and ``generate()`` runs under ``torch.no_grad()``.
The outer stream runs in the caller's mode (so its logits carry no graph there); the probe stream runs under
``torch.inference_mode(False)`` and ``torch.enable_grad()`` on clones of the inference tensors it saves for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nl_lightning.models._residual_memory import residual_forward
from nl_lightning.models.cms import CMSBlock, inner_dtype
from nl_lightning.models.cms_memory import CMSState, FastWeights, _portable
from nl_lightning.models.self_modifying_titans import MEMORIES, SelfModifyingState, SelfModifyingTitans

__all__ = ["TaskLossContext", "task_loss_forward"]

_MEM = MEMORIES.index("mem")
Weights = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class TaskLossContext:
    """The values the task-loss gradient of some positions needs besides the CMS weights (no graph).

    Held in :attr:`~nl_lightning.models.hope.HopeState.deferred` for the last position of a call, whose term waits
    for the next token.

    Attributes:
        embedded: The embedded tokens, the first block's input ``(B, n, D)``.
        conv: Per block, the self-modifying Titans' causal convolution output ``(B, n, D)``, in its inner dtype.
        anchors: Per block, the ``M_mem`` anchor weights the positions read, ``(B, H, d, h)`` and ``(B, H, h, d)``.

    """

    embedded: Tensor
    conv: list[Tensor]
    anchors: list[tuple[Tensor, Tensor]]

    def map(self, fn: Callable[[Tensor], Tensor]) -> TaskLossContext:
        """``fn`` applied to every tensor."""
        anchors = [(fn(a1), fn(a2)) for a1, a2 in self.anchors]
        return TaskLossContext(fn(self.embedded), [fn(c) for c in self.conv], anchors)

    def positions(self, start: int, length: int) -> TaskLossContext:
        """The context of positions ``start .. start + length - 1`` (the anchors are shared by the positions)."""
        conv = [c.narrow(1, start, length) for c in self.conv]
        return TaskLossContext(self.embedded.narrow(1, start, length), conv, list(self.anchors))

    def detach(self) -> TaskLossContext:
        """Detached, and usable outside the ``torch.inference_mode`` that made it."""
        return self.map(_portable)

    def select(self, index: Tensor) -> TaskLossContext:
        """The contexts of some samples of the batch."""
        return self.map(lambda t: t[index])

    def to(self, *args: Any, **kwargs: Any) -> TaskLossContext:
        return self.map(lambda t: t.to(*args, **kwargs))

    def state_dict(self) -> dict[str, Any]:
        """Tensors and lists only (loads with ``torch.load(weights_only=True)``); detached."""
        s = self.detach()
        return {"embedded": s.embedded, "conv": list(s.conv), "anchors": [list(a) for a in s.anchors]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TaskLossContext:
        """Inverse of :meth:`state_dict`."""
        return cls(state["embedded"], list(state["conv"]), [(a1, a2) for a1, a2 in state["anchors"]])


@dataclass
class _Level:
    """One CMS level during a task-loss call.

    Attributes:
        module: The level.
        fast: Its fast weights as values (no graph), pending sums and position in the chunk.
        start: The weights the call started from (with their graph): the first-order reads route gradients to them.
        share: Their :attr:`~nl_lightning.models.cms_memory.FastWeights.initial_share`.

    """

    module: CMSBlock
    fast: FastWeights
    start: Weights
    share: float

    @property
    def writes(self) -> bool:
        return self.module.inner_lr > 0

    def weights(self) -> Weights:
        """The read weights: the values, plus the routing terms of the first-order path (``CMSBlock._first_order``)."""
        if not torch.is_grad_enabled():
            return self.fast.weights
        extra = self.fast.initial_share - self.share
        out = []
        for w, w_in, w0 in zip(self.fast.weights, self.start, self.module._initial(self.fast.w1.dtype), strict=True):
            if w_in.requires_grad:
                w = w + (w_in - w_in.detach())  # value unchanged, gradient to the state the call started from
            if extra and w0.requires_grad:
                w = w + extra * (w0 - w0.detach())  # the share of the initial weights the writes routed to them
            out.append(w)
        return tuple(out)

    def add(self, grads: Optional[Weights]) -> None:
        if grads is not None:
            self.fast = self.fast.add_pending(grads)

    def advance(self, tokens: int) -> None:
        count = self.fast.count + tokens
        self.fast = replace(self.fast, count=count if self.writes else count % self.module.chunk_size)

    def close_if_due(self) -> None:
        """Apply the write of a complete chunk (Eq. 31), without a graph."""
        if self.fast.count == self.module.chunk_size:
            with torch.no_grad():
                self.fast = self.module.close_chunk(self.fast)

    def state(self) -> FastWeights:
        w1, b1, w2, b2 = self.weights()
        return replace(self.fast, w1=w1, b1=b1, w2=w2, b2=b2)


def _levels(block: nn.Module, state: Optional[CMSState], batch: int, like: Tensor) -> list[_Level]:
    """The block's CMS levels from ``state`` (``None``: the initial weights), in the inner dtype of ``like``."""
    dtype = inner_dtype(like)
    state = state if state is not None else block.cms.initial_state(batch, like.device, dtype)
    out = []
    for module, fast in zip(block.cms.blocks, state.levels, strict=True):
        if any(w.dtype != dtype for w in fast.weights):
            fast = fast.map(lambda t: t.to(dtype))
        values = fast.map(torch.Tensor.detach)
        out.append(_Level(module, replace(values, initial_share=fast.initial_share), fast.weights, fast.initial_share))
    return out


def _titans_state(
    mixer: SelfModifyingTitans, state: Optional[SelfModifyingState], batch: int, like: Tensor
) -> SelfModifyingState:
    return state if state is not None else mixer.initial_state(batch, like.device, inner_dtype(like))


def _titans_context(mixer: SelfModifyingTitans, u: Tensor, state: SelfModifyingState) -> tuple[Tensor, tuple]:
    """The convolution's output ``(B, n, D)`` and the ``M_mem`` anchor of the positions ``u`` ``(B, n, D)`` (values)."""
    with torch.no_grad(), torch.autocast(device_type=u.device.type, enabled=False):
        dtype = inner_dtype(u)
        conv = mixer._conv(u.detach().to(dtype), state.conv.detach().to(dtype))[0]
        anchor = (state.anchor_w1[:, _MEM].detach().to(dtype), state.anchor_w2[:, _MEM].detach().to(dtype))
    return conv, anchor


def _titans_own(mixer: SelfModifyingTitans, u: Tensor, conv: Tensor, anchor: tuple[Tensor, Tensor]) -> Tensor:
    """The self-modifying Titans' output at each position ``(B, n, D)`` with a gradient through that position's own
    input ``u`` ``(B, n, D)`` only: the convolution's current-token tap; its earlier taps (``conv``) and the ``M_mem``
    ``anchor`` stay values. Its value is the Titans' output (its read of ``q_t = normalize(W_q conv_t)``)."""
    with torch.autocast(device_type=u.device.type, enabled=False):
        x = u.to(conv.dtype)
        tap = mixer.conv.weight[:, 0, -1].to(conv.dtype)  # (D,): the weight of the current token in conv_t
        xc = conv + tap * (x - x.detach())  # (B, n, D)
        q = F.normalize(mixer._heads(xc @ mixer.q_proj.weight.to(conv.dtype).T), dim=-1)  # (B, H, n, d)
        o = residual_forward(q, anchor[0], anchor[1], mixer.activation)[0]  # (B, H, n, d)
        o = o.transpose(1, 2).reshape(u.shape[0], u.shape[1], mixer.dim)  # (B, n, D)
    return mixer.out_proj(o.to(u.dtype)).to(u.dtype)


def _probe_logits(
    model: nn.Module, context: TaskLossContext, weights: list[list[Weights]], probes: list[list[Optional[Weights]]]
) -> Tensor:
    """The logits ``(B, n, V)`` of the context's positions, each through its own forward only, every CMS level read
    with its weights plus its probe (where it has one)."""
    p = context.embedded
    for i, block in enumerate(model.blocks):
        p = p + _titans_own(block.mixer, block.norm(p), context.conv[i], context.anchors[i])
        for level, w, probe in zip(block.cms.blocks, weights[i], probes[i], strict=True):
            p = level.read(p, w if probe is None else tuple(a + b for a, b in zip(w, probe, strict=True)))
    return model.head(model.norm(p))


def _probe(level: _Level, weights: Weights) -> Optional[Weights]:
    """Zeros shaped like the per-sample ``weights``, with ``requires_grad``: their gradient is the weights' (``None``
    for a level that does not write)."""
    return tuple(torch.zeros_like(w, requires_grad=True) for w in weights) if level.writes else None


def _inner_grads(model: nn.Module, context: TaskLossContext, levels: list[list[_Level]], targets: Tensor) -> None:
    """Add ``∇_W Σ_t CE(logits_t, targets_t)`` of the context's positions (``targets`` ``(B, n)``), each through its
    own forward, to the pending sums of every writing level."""
    if not any(lvl.writes for block in levels for lvl in block):
        return
    with torch.inference_mode(False), torch.enable_grad():
        context = context.detach()
        weights = [[tuple(_portable(w) for w in lvl.fast.weights) for lvl in block] for block in levels]
        probes = [[_probe(lvl, w) for lvl, w in zip(*pair, strict=True)] for pair in zip(levels, weights, strict=True)]
        logits = _probe_logits(model, context, weights, probes)  # (B, n, V)
        logits = logits.flatten(0, 1).to(inner_dtype(logits))
        loss = F.cross_entropy(logits, _portable(targets).flatten(), reduction="sum")  # summed over positions, batch
        flat = [t for block in probes for probe in block if probe is not None for t in probe]
        grads = iter(torch.autograd.grad(loss, flat))
    for block in levels:
        for lvl in block:
            if lvl.writes:
                lvl.add(tuple(next(grads) for _ in range(4)))


def _step_length(
    remaining: int, titans: Sequence[SelfModifyingState], levels: list[list[_Level]], blocks: nn.ModuleList
) -> int:
    """Tokens up to the next chunk end of any writing CMS level or any ``M_mem`` (at most ``remaining``)."""
    ends = [remaining]
    ends += [lvl.module.chunk_size - lvl.fast.count for block in levels for lvl in block if lvl.writes]
    ends += [block.mixer.mem_chunk_size - s.mem_count for block, s in zip(blocks, titans, strict=True)]
    return min(ends)


def _step(
    model: nn.Module, h: Tensor, titans: list[SelfModifyingState], levels: list[list[_Level]]
) -> tuple[Tensor, TaskLossContext]:
    """The outer stream over one step ``h`` ``(B, n, D)`` (embedded): its logits ``(B, n, V)`` and the context of its
    positions for the probe stream. Updates ``titans`` in place."""
    embedded, conv, anchors = h.detach(), [], []
    for i, block in enumerate(model.blocks):
        u = block.norm(h)
        c, a = _titans_context(block.mixer, u, titans[i])
        conv.append(c)
        anchors.append(a)
        out, titans[i] = block.mixer(u, titans[i], write=True)
        h = h + out
        for lvl in levels[i]:
            h = lvl.module.read(h, lvl.weights())
    return model.head(model.norm(h)), TaskLossContext(embedded, conv, anchors)


def _check_parameters(model: nn.Module) -> None:
    """Refuse parameters made under ``torch.inference_mode``: the inner gradients need autograd, which cannot save
    them."""
    inference = [name for name, p in model.named_parameters() if p.is_inference()]
    if inference:
        raise RuntimeError(
            f"The CMS writes of this HopeModule follow the task loss (cms_write_signal='task_loss'), whose gradients"
            f" need autograd, but parameters such as {inference[0]!r} were created under torch.inference_mode()"
            " (inference tensors cannot be saved for backward). Build or load the model outside"
            " torch.inference_mode(), then read under it, or use cms_write_signal='target'."
        )


def task_loss_forward(
    model: nn.Module, tokens: Tensor, blocks: Optional[Sequence[Any]], deferred: Optional[TaskLossContext]
) -> tuple[Tensor, list[tuple[SelfModifyingState, CMSState]], TaskLossContext]:
    """Continue a stream by ``tokens`` with the CMS written by the task loss (see the module docstring).

    Args:
        model: A :class:`~nl_lightning.models.hope.HopeModule` (``embed``, ``blocks`` of self-modifying Titans Hope
            blocks, ``norm``, ``head``).
        tokens: The next tokens ``(B, T)``, ``T >= 1``.
        blocks: Per block, the state after the previous tokens (with ``titans`` and ``cms``), or ``None``: a new
            sequence.
        deferred: The context of the previous call's last position, whose term takes ``tokens[:, 0]`` as its target
            (``None``: none).

    Returns:
        The logits ``(B, T, V)``, per block the self-modifying Titans and CMS states after the tokens (a level whose
        chunk ends at the last token keeps ``count == C``: its write is due), and the context of the last position.

    """
    _check_parameters(model)
    batch, length = tokens.shape
    h = model.embed(tokens)  # (B, T, D)
    states = list(blocks) if blocks is not None else [None] * len(model.blocks)
    pairs = list(zip(model.blocks, states, strict=True))
    titans = [_titans_state(b.mixer, None if s is None else s.titans, batch, h) for b, s in pairs]
    levels = [_levels(b, None if s is None else s.cms, batch, h) for b, s in pairs]
    if deferred is not None:
        _inner_grads(model, deferred, levels, tokens[:, :1])
    outs, pos = [], 0
    while pos < length:
        for block in levels:
            for lvl in block:
                lvl.close_if_due()
        n = _step_length(length - pos, titans, levels, model.blocks)
        logits, context = _step(model, h[:, pos : pos + n], titans, levels)
        known = min(n, length - 1 - pos)  # positions whose next token this call holds
        if known > 0:
            _inner_grads(model, context.positions(0, known), levels, tokens[:, pos + 1 : pos + 1 + known])
        for block in levels:
            for lvl in block:
                lvl.advance(n)
        outs.append(logits)
        pos += n
    cms = [CMSState([lvl.state() for lvl in block]) for block in levels]
    return torch.cat(outs, dim=1), list(zip(titans, cms, strict=True)), context.positions(n - 1, 1)
