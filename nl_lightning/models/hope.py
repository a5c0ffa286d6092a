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
Hope
^^^^

Hope (NL NeurIPS Fig. 3; NL arXiv §8.3, Eq. 94-97): self-modifying Titans followed by a Continuum Memory System. The
Titans part has a small state and an expressive, self-generated learning rule (keys, values, learning rates and
retention gates written by delta gradient descent); the CMS has a large state updated at a few fixed frequencies.
Both keep writing while the model reads, at training and at test time.

A :class:`HopeBlock` is, with pre-norm residuals,

.. math::

    h \leftarrow h + \mathrm{SMT}(\mathrm{RMSNorm}(h)), \qquad
    h \leftarrow \mathrm{CMS}(h) = \mathrm{MLP}^{(f_k)}(\cdots \mathrm{MLP}^{(f_1)}(h))

(each CMS level is itself a pre-norm residual MLP, written every ``C_i`` tokens). ``variant="attention"`` is
Hope-Attention: causal softmax attention (RoPE, optionally a sliding window) in place of the self-modifying Titans,
followed by the same CMS. :class:`HopeModule` stacks blocks into a byte-level language model with the segment,
evaluation and generation machinery of :class:`~nl_lightning.models.lm.CausalLM`. Both are built from a
:class:`HopeConfig`, the architecture checked once.

Choices [ours], where the paper leaves the block open: CMS token-axis writes are first order
(``differentiable_writes=False``: the initial weights learn through every read and the value projections through
the targets of every write, while the writes carry no graph through their anchor weights), which keeps memory flat in
the segment length;
the self-modifying Titans writes stay differentiable within a segment; between segments every state is detached
(truncated backpropagation). Hope-Attention carries its attention's key/value cache
(:class:`~nl_lightning.models.transformer.KVCache`) across segments along with its CMS, so each token attends to every
earlier token of the stream (or, with ``window``, to the ``window`` tokens ending at it) wherever the segment
boundaries fall; without a window the cache grows with the stream, so bounded memory needs a window. Each CMS
write keeps ``cms_retention`` (default :data:`DEFAULT_CMS_RETENTION`) of the fast weights' distance from the learned
initial weights, so that streaming far past the training length stays near the states the model was trained on.

``cms_write_signal="task_loss"`` (:class:`HopeModule`'s default for Hope) [ours, the "local surprise signal" reading of
Eq. 31 in the manner of dynamic evaluation] writes the CMS with the gradient of the model's own next-token cross-entropy
instead of the local objective: the pending sum of a level's chunk is the sum over its positions ``t`` of
:math:`\nabla_W \mathrm{CE}(\mathrm{logits}_t, x_{t+1})`, each through position ``t``'s own forward at the chunk's
anchor weights, and the write that closes a chunk is applied when the next chunk's first token arrives (it is the target
of the chunk's last position); see :mod:`nl_lightning.models.task_loss_cms`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from nl_lightning._validation import check_float, check_int, check_positive, is_int
from nl_lightning.models.cms import DEFAULT_MAX_WRITE_NORM, ContinuumMemory
from nl_lightning.models.cms_memory import CMSState
from nl_lightning.models.lm import BlockStackLM
from nl_lightning.models.self_modifying_titans import SelfModifyingState, SelfModifyingTitans
from nl_lightning.models.task_loss_cms import TaskLossContext, task_loss_forward
from nl_lightning.models.transformer import CausalSelfAttention, KVCache, RMSNorm

__all__ = ["DEFAULT_CMS_RETENTION", "HopeBlock", "HopeBlockState", "HopeConfig", "HopeModule", "HopeState"]

Variant = Literal["titans", "attention"]
WriteSignal = Literal["target", "task_loss"]

#: Retention of the CMS fast weights per write in Hope [ours]; see :class:`~nl_lightning.models.cms.CMSBlock`.
DEFAULT_CMS_RETENTION = 0.8


@dataclass
class HopeBlockState:
    """One block's memory.

    Attributes:
        titans: The self-modifying Titans state (``None`` for Hope-Attention).
        cms: The CMS state.
        attention: Hope-Attention's key/value cache (``None`` for Hope).

    """

    titans: Optional[SelfModifyingState]
    cms: CMSState
    attention: Optional[KVCache] = None

    def detach(self) -> HopeBlockState:
        """Stop gradients here (truncated backpropagation); also usable outside the inference mode that made it."""
        return HopeBlockState(_maybe(self.titans, "detach"), self.cms.detach(), _maybe(self.attention, "detach"))

    def select(self, index: Tensor) -> HopeBlockState:
        """The states of some samples of the batch."""
        titans, attention = _maybe(self.titans, "select", index), _maybe(self.attention, "select", index)
        return HopeBlockState(titans, self.cms.select(index), attention)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists, ints and ``None`` only (loads with ``torch.load(weights_only=True)``); detached."""
        titans, attention = _maybe(self.titans, "state_dict"), _maybe(self.attention, "state_dict")
        return {"titans": titans, "cms": self.cms.state_dict(), "attention": attention}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HopeBlockState:
        """Inverse of :meth:`state_dict`."""
        titans = None if state["titans"] is None else SelfModifyingState.from_state_dict(state["titans"])
        attention = None if state["attention"] is None else KVCache.from_state_dict(state["attention"])
        return cls(titans, CMSState.from_state_dict(state["cms"]), attention)


@dataclass(frozen=True)
class HopeConfig:
    """The architecture of a Hope model, which :class:`HopeBlock` and :class:`HopeModule` are built from.

    The values are checked once, here: a bad one raises a ``ValueError`` naming the field and the value when the
    config is made (the sub-modules' own checks, such as the CMS's inner learning rates and write bound, run when they
    are built). Sequences are stored as tuples and ``titans_kwargs`` as a dict, and ``cms_write_signal=None`` resolves
    to the variant's default, so two configs describing the same model compare equal.

    Attributes:
        vocab_size: Vocabulary size (256 for bytes).
        dim: Model width.
        depth: Number of Hope blocks.
        heads: Heads of the self-modifying Titans (or the attention).
        chunk_size: Tokens per write of the self-modifying Titans memories.
        cms_chunk_sizes: CMS levels' periods ``C_i`` in tokens, the fastest first.
        cms_hidden_mult: CMS MLP hidden width as a multiple of ``dim``.
        cms_inner_lr: Token-axis learning rate of the CMS levels (``None``: the ContinuumMemory default).
        variant: ``"titans"`` (Hope) or ``"attention"`` (Hope-Attention).
        window: The attention variant's sliding window (``None``: full causal attention over the whole stream).
        titans_kwargs: Further :class:`~nl_lightning.models.self_modifying_titans.SelfModifyingTitans` arguments
            (``hidden_mult``, ``rule``, ``eta_max``, ...); checked with the Titans variant, unused with the other.
        tie_embeddings: Share the input embedding and the output head.
        cms_retention: Share of their distance from the learned initial weights that the CMS fast weights keep at
            every write (one value or one per level, in ``(0, 1]``; see :class:`~nl_lightning.models.cms.CMSBlock`).
            Below 1 keeps a long stream's fast weights near the state the model was trained to read; 1 is Eq. 31 as
            printed.
        cms_write_signal: What writes the CMS on the token axis (see :class:`HopeModule`): ``"target"``, the
            gradient of each level's local objective ``0.5 ||MLP(k_t) - W_v k_t||^2``; ``"task_loss"``, the gradient
            of the model's next-token loss (Titans variant only); ``None``: ``"task_loss"`` for Hope, ``"target"`` for
            Hope-Attention.
        cms_max_write_norm: Bound on the norm of each CMS write's step, per sample and level (see
            :class:`~nl_lightning.models.ContinuumMemory`); ``None``: unbounded, Eq. 31 as printed (it warns).

    Raises:
        ValueError: On sizes below 1, ``dim`` not divisible by ``heads``, an unknown ``variant`` or
            ``cms_write_signal``, ``"task_loss"`` with the attention variant, a ``cms_retention`` outside ``(0, 1]``
            or with a length other than the levels', or a bad ``titans_kwargs`` name or value.

    Example::

        config = HopeConfig(dim=64, depth=2, heads=4, cms_chunk_sizes=[16, 64])
        block = HopeBlock(config)
        model = HopeModule.from_config(config, segment_len=128)

    """

    vocab_size: int = 256
    dim: int = 256
    depth: int = 4
    heads: int = 4
    chunk_size: int = 16
    cms_chunk_sizes: Sequence[int] = (16, 64, 256)
    cms_hidden_mult: float = 2.0
    cms_inner_lr: Optional[float] = None
    variant: Variant = "titans"
    window: Optional[int] = None
    titans_kwargs: Optional[dict[str, Any]] = None
    tie_embeddings: bool = True
    cms_retention: Union[float, Sequence[float]] = DEFAULT_CMS_RETENTION
    cms_write_signal: Optional[WriteSignal] = None
    cms_max_write_norm: Optional[float] = DEFAULT_MAX_WRITE_NORM

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, low=2)
        for name in ("dim", "depth", "heads", "chunk_size"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(
                f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads}); pick heads among its divisors."
            )
        sizes = self.cms_chunk_sizes
        if (
            isinstance(sizes, (str, bytes))
            or not isinstance(sizes, Sequence)
            or not sizes
            or not all(is_int(c) and c >= 1 for c in sizes)
        ):
            raise ValueError(f"`cms_chunk_sizes` must be a non-empty list of integers >= 1, got {sizes!r}.")
        self._set("cms_chunk_sizes", tuple(sizes))
        check_positive("cms_hidden_mult", self.cms_hidden_mult)
        if self.variant not in ("titans", "attention"):
            raise ValueError(
                f"`variant` must be 'titans' (Hope) or 'attention' (Hope-Attention), got {self.variant!r}."
            )
        if self.window is not None:
            check_int("window", self.window, hint="use None for full causal attention")
        self._set("cms_retention", _check_retention(self.cms_retention, len(sizes)))
        signal = self.cms_write_signal
        if signal is None:
            signal = "task_loss" if self.variant == "titans" else "target"
        _check_write_signal(signal, self.variant)
        self._set("cms_write_signal", signal)
        self._set("titans_kwargs", self._checked_titans_kwargs())

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the config is frozen once checked

    def _checked_titans_kwargs(self) -> dict[str, Any]:
        kwargs = self.titans_kwargs
        if kwargs is None:
            return {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(
                f"`titans_kwargs` must be None or a dict of SelfModifyingTitans arguments, got {kwargs!r}."
            )
        kwargs = dict(kwargs)
        if self.variant != "titans":
            return kwargs
        owned = sorted({"dim", "heads", "chunk_size"} & set(kwargs))
        if owned:
            raise ValueError(f"`titans_kwargs` sets {owned}; set them as fields of the config instead.")
        try:
            SelfModifyingTitans.check_arguments(self.dim, self.heads, self.chunk_size, **kwargs)
        except ValueError as err:
            raise ValueError(f"`titans_kwargs`: {err}") from None
        if "max_inner_grad_norm" in kwargs and kwargs["max_inner_grad_norm"] is None:
            rank_zero_warn(
                "Hope with `titans_kwargs={'max_inner_grad_norm': None}`: the self-modifying Titans memories"
                " write with unclipped inner gradients (the printed rule) and can diverge to NaN. Leave"
                " `max_inner_grad_norm` at its default (1.0) to bound them.",
                category=UserWarning,
            )
        return kwargs

    def to_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :class:`HopeModule` (tuples as lists, as YAML writes them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _check_retention(value: Any, levels: int) -> Union[float, tuple[float, ...]]:
    """``cms_retention`` checked: one value for every level, or one per level, each in ``(0, 1]``."""
    many = isinstance(value, Sequence) and not isinstance(value, str)
    values = list(value) if many else [value]
    if many and len(values) != levels:
        raise ValueError(
            f"`cms_retention` needs one value per level ({levels}), got {values!r}; or give one value for all levels."
        )
    hint = "1: Eq. 31, no pull back to the initial weights"
    values = [check_float("cms_retention", v, 0, 1, low_open=True, hint=hint) for v in values]
    return tuple(values) if many else values[0]


def _block_config(
    dim: int,
    heads: int = 4,
    chunk_size: int = 16,
    cms_chunk_sizes: Sequence[int] = (16, 64, 256),
    cms_hidden_mult: float = 2.0,
    cms_inner_lr: Optional[float] = None,
    variant: Variant = "titans",
    window: Optional[int] = None,
    titans_kwargs: Optional[dict[str, Any]] = None,
    cms_retention: Union[float, Sequence[float]] = DEFAULT_CMS_RETENTION,
    cms_write_signal: WriteSignal = "target",
    cms_max_write_norm: Optional[float] = DEFAULT_MAX_WRITE_NORM,
) -> HopeConfig:
    """The config of ``HopeBlock(dim, heads, ...)``, the keyword form (whose ``cms_write_signal`` is ``"target"``)."""
    return HopeConfig(
        dim=dim,
        heads=heads,
        chunk_size=chunk_size,
        cms_chunk_sizes=cms_chunk_sizes,
        cms_hidden_mult=cms_hidden_mult,
        cms_inner_lr=cms_inner_lr,
        variant=variant,
        window=window,
        titans_kwargs=titans_kwargs,
        cms_retention=cms_retention,
        cms_write_signal=cms_write_signal,
        cms_max_write_norm=cms_max_write_norm,
    )


def _check_write_signal(signal: Any, variant: str) -> None:
    if signal not in ("target", "task_loss"):
        raise ValueError(f"`cms_write_signal` must be 'target' or 'task_loss', got {signal!r}.")
    if signal == "task_loss" and variant != "titans":
        raise ValueError(
            "`cms_write_signal='task_loss'` needs the self-modifying Titans variant (variant='titans'), got"
            f" variant={variant!r}."
        )


def _maybe(state: Any, method: str, *args: Any) -> Any:
    """``state.method(*args)``, or ``None`` for a missing state."""
    return None if state is None else getattr(state, method)(*args)


@dataclass
class HopeState:
    """The memory of a :class:`HopeModule`: one :class:`HopeBlockState` per block. Pass it back to continue a stream.

    Attributes:
        blocks: The blocks' states.
        deferred: With ``cms_write_signal="task_loss"``, the context of the last position read, whose loss term (and
            the CMS writes that wait for it, the levels whose ``count`` equals their chunk size) the next call adds
            with its first token as the target; ``None`` otherwise. It holds values only: :meth:`detach` keeps it,
            :meth:`select` indexes its batch and :meth:`state_dict` stores it.

    """

    blocks: list[HopeBlockState]
    deferred: Optional[TaskLossContext] = None

    def detach(self) -> HopeState:
        """Stop gradients here (truncated backpropagation); also usable outside the inference mode that made it."""
        return HopeState([b.detach() for b in self.blocks], _maybe(self.deferred, "detach"))

    def select(self, index: Tensor) -> HopeState:
        """The states of some samples of the batch."""
        return HopeState([b.select(index) for b in self.blocks], _maybe(self.deferred, "select", index))

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists, ints and ``None`` only (loads with ``torch.load(weights_only=True)``); detached."""
        return {"blocks": [b.state_dict() for b in self.blocks], "deferred": _maybe(self.deferred, "state_dict")}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HopeState:
        """Inverse of :meth:`state_dict`."""
        deferred = None if state["deferred"] is None else TaskLossContext.from_state_dict(state["deferred"])
        return cls([HopeBlockState.from_state_dict(b) for b in state["blocks"]], deferred)


class HopeBlock(nn.Module):
    """Self-modifying Titans (or softmax attention) then a Continuum Memory System, each with a residual.

    Built from a :class:`HopeConfig` (its ``vocab_size``, ``depth`` and ``tie_embeddings`` are the model's and unused
    here): ``HopeBlock(config)``. The keyword form ``HopeBlock(dim, heads=4, chunk_size=16, cms_chunk_sizes=(16, 64,
    256), cms_hidden_mult=2.0, cms_inner_lr=None, variant="titans", window=None, titans_kwargs=None,
    cms_retention=DEFAULT_CMS_RETENTION, cms_write_signal="target", cms_max_write_norm=DEFAULT_MAX_WRITE_NORM)`` makes
    that config from the same names (see :class:`HopeConfig`), with the block's own default write signal,
    ``"target"``.

    With ``cms_write_signal="task_loss"`` the CMS levels are built without value projections and the block's own
    :meth:`forward` reads only (``write=False``): only the :class:`HopeModule` holding the block computes the
    next-token loss that writes them (:mod:`nl_lightning.models.task_loss_cms`).

    Args:
        config: The architecture; or, in the keyword form, ``dim``.
        *args: The keyword form's further positional arguments (``heads``, ``chunk_size``, ...).
        **kwargs: The keyword form's arguments.

    Raises:
        ValueError: On a bad value (see :class:`HopeConfig`, and the sub-modules' own errors).
        TypeError: On further arguments after a :class:`HopeConfig`, or an unknown keyword.

    Example::

        block = HopeBlock(HopeConfig(dim=64, heads=4, cms_chunk_sizes=[16, 64], cms_write_signal="target"))
        # the same block: HopeBlock(dim=64, heads=4, cms_chunk_sizes=[16, 64])
        y, state = block(torch.randn(2, 128, 64))
        y2, state = block(torch.randn(2, 128, 64), state)  # continues the stream

    """

    def __init__(self, config: Union[HopeConfig, int, None] = None, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(config, HopeConfig):
            config = _block_config(*([] if config is None else [config]), *args, **kwargs)
        elif args or kwargs:
            raise TypeError(f"HopeBlock(config) takes no further arguments, got {args or ''}{kwargs or ''}.")
        self.config = config
        self.variant, self.cms_write_signal = config.variant, config.cms_write_signal
        self.norm = RMSNorm(config.dim)
        if config.variant == "titans":
            self.mixer: nn.Module = SelfModifyingTitans.from_config(config)
        else:
            self.mixer = CausalSelfAttention(config.dim, config.heads, window=config.window)
        cms_kwargs: dict[str, Any] = {} if config.cms_inner_lr is None else {"inner_lr": config.cms_inner_lr}
        self.cms = ContinuumMemory(
            config.dim,
            list(config.cms_chunk_sizes),
            hidden_mult=config.cms_hidden_mult,
            in_context=True,
            differentiable_writes=False,
            retention=config.cms_retention,
            value_projection=config.cms_write_signal == "target",
            max_write_norm=config.cms_max_write_norm,
            **cms_kwargs,
        )

    def forward(
        self, x: Tensor, state: Optional[HopeBlockState] = None, write: bool = True
    ) -> tuple[Tensor, HopeBlockState]:
        """Continue a stream by ``x``.

        Args:
            x: The residual stream of the next tokens ``(B, T, D)``.
            state: The block's state after the previous tokens (``None``: a new sequence).
            write: Let the memories write; ``False`` reads them unchanged. Hope-Attention's key/value cache takes the
                new tokens either way (it is the attention's context, not a memory write).

        Returns:
            The new residual stream ``(B, T, D)`` and the block's state after ``x``.

        Raises:
            RuntimeError: If ``write`` and the CMS is written by the task loss (``cms_write_signal="task_loss"``):
                :class:`HopeModule` drives those writes.

        """
        if write and self.cms_write_signal == "task_loss" and x.shape[1] > 0:
            raise RuntimeError(
                "This HopeBlock's CMS is written by the model's next-token loss (cms_write_signal='task_loss'): run it"
                " inside HopeModule, or call it with write=False to read only."
            )
        titans_state = None if state is None else state.titans
        cache = None if state is None else state.attention
        if self.variant == "titans":
            h, titans_state = self.mixer(self.norm(x), titans_state, write=write)
        else:
            h, cache = self.mixer.forward_cached(self.norm(x), cache)
        x, cms_state = self.cms(x + h, None if state is None else state.cms, write=write)
        return x, HopeBlockState(titans_state, cms_state, cache)

    def stats(self) -> dict[str, float]:
        """The last call's memory statistics: the self-modifying memories' inner losses, norms and mean gates (none for
        Hope-Attention)."""
        out = {}
        if self.variant == "titans":
            out.update({k: float(v) for k, v in self.mixer.last_stats.items()})
        return out


class HopeModule(BlockStackLM):
    r"""The Hope language model: byte embeddings, :class:`HopeBlock` s, RMSNorm and a tied output head.

    ``logits, state = model(tokens, state=None)`` maps ``(batch, seq)`` tokens to ``(batch, seq, vocab_size)`` logits
    and the memory after the last token (a :class:`HopeState`); pass it back to continue a stream, which gives the
    logits of one pass over the whole stream. The state has a constant size, except Hope-Attention's key/value cache
    without a ``window``, which grows with the stream. Training cuts sequences into ``segment_len`` segments, carries
    the memory and detaches it at every boundary (truncated backpropagation); validation, test and predict keep
    writing (test-time memorization, ``memorize_at_eval=True``, switchable); ``generate`` carries the state token by
    token (see :class:`~nl_lightning.models.lm.CausalLM`). After every training step it logs, per layer ``i``,
    ``train_layer<i>/<stat>``: the inner (surprise) loss of each self-modifying memory and their weight norms.

    The architecture arguments (``vocab_size`` to ``cms_max_write_norm``) make a :class:`HopeConfig`
    (``model.config``, checked once there) that every :class:`HopeBlock` is built from; :meth:`from_config` builds the
    model from one. The hyper-parameters saved in checkpoints are the keyword arguments, as passed.

    Args:
        vocab_size: Vocabulary size (256 for bytes).
        dim: Model width.
        depth: Number of Hope blocks.
        heads: Heads per block.
        chunk_size: Tokens per write of the self-modifying Titans memories.
        cms_chunk_sizes: CMS levels' periods in tokens, the fastest first.
        cms_hidden_mult: CMS MLP hidden width as a multiple of ``dim``.
        cms_inner_lr: Token-axis learning rate of the CMS levels (``None``: the ContinuumMemory default).
        variant: ``"titans"`` (Hope) or ``"attention"`` (Hope-Attention).
        window: The attention variant's sliding window (``None``: full causal attention over the whole stream).
        titans_kwargs: Further SelfModifyingTitans arguments (``hidden_mult``, ``rule``, ``eta_max``, ...).
        tie_embeddings: Share the input embedding and the output head.
        cms_retention: Share of their distance from the learned initial weights that the CMS fast weights keep at
            every write (see :class:`HopeBlock`); 1 is Eq. 31 as printed, under which the bits per byte of a stream
            far longer than the training sequences climb towards chance.
        cms_write_signal: What drives the CMS token-axis writes. ``"task_loss"``: the gradient of the model's
            next-token cross-entropy, the target of position ``t`` being input token ``t + 1`` (so ``forward`` needs
            no extra argument), each position's term through its own forward at the chunk's anchor weights, the write
            that closes a chunk applied when the next token arrives (:mod:`nl_lightning.models.task_loss_cms`);
            streaming stays exact, the state carrying the last position's open term (:attr:`HopeState.deferred`).
            Titans variant only. ``"target"``: the gradient of each level's local objective towards a learned target
            ``W_v k`` (first order, the value projections learning through the targets). ``None`` (default):
            ``"task_loss"`` for Hope, ``"target"`` for Hope-Attention. We chose ``"task_loss"`` for Hope because it
            gave the lowest held-out bits per byte of the write signals compared in ``benchmarks/lm.py`` (part 1,
            three seeds: learned target, target projection frozen, second-order writes, task loss; the figures are in
            ``benchmarks/results/lm.md``), at the price of a training step about twice as long and an inference pass
            several times as long as ``"target"``: take ``"target"`` where speed matters more.
        cms_max_write_norm: Bound on the norm of each CMS write's step, per sample and level (both write signals; see
            :class:`~nl_lightning.models.ContinuumMemory`); ``None``: unbounded, Eq. 31 as printed (it warns).
        **lm_kwargs: :class:`~nl_lightning.models.lm.CausalLM` arguments (``lr``, ``segment_len``,
            ``memorize_at_eval``, ...).

    Raises:
        ValueError: On a bad architecture value (see :class:`HopeConfig`: sizes below 1, an unknown variant or
            ``cms_write_signal``, ``"task_loss"`` with the attention variant, ...) or a bad sub-module / CausalLM
            argument.

    Example::

        model = HopeModule(vocab_size=256, dim=64, depth=2, heads=4, segment_len=128)
        logits, state = model(torch.randint(0, 256, (2, 128)))
        logits, state = model(torch.randint(0, 256, (2, 128)), state)   # the next segment
        model.generate(torch.randint(0, 256, (1, 8)), max_new_tokens=16)  # (1, 24)

    """

    state_type = HopeState

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        chunk_size: int = 16,
        cms_chunk_sizes: Sequence[int] = (16, 64, 256),
        cms_hidden_mult: float = 2.0,
        cms_inner_lr: Optional[float] = None,
        variant: Variant = "titans",
        window: Optional[int] = None,
        titans_kwargs: Optional[dict[str, Any]] = None,
        tie_embeddings: bool = True,
        cms_retention: Union[float, Sequence[float]] = DEFAULT_CMS_RETENTION,
        cms_write_signal: Optional[WriteSignal] = None,
        cms_max_write_norm: Optional[float] = DEFAULT_MAX_WRITE_NORM,
        **lm_kwargs: Any,
    ) -> None:
        super().__init__(vocab_size, **lm_kwargs)
        self.config = HopeConfig(
            vocab_size=vocab_size,
            dim=dim,
            depth=depth,
            heads=heads,
            chunk_size=chunk_size,
            cms_chunk_sizes=cms_chunk_sizes,
            cms_hidden_mult=cms_hidden_mult,
            cms_inner_lr=cms_inner_lr,
            variant=variant,
            window=window,
            titans_kwargs=titans_kwargs,
            tie_embeddings=tie_embeddings,
            cms_retention=cms_retention,
            cms_write_signal=cms_write_signal,
            cms_max_write_norm=cms_max_write_norm,
        )
        self.dim, self.variant, self.cms_write_signal = dim, variant, self.config.cms_write_signal
        self.build(dim, [HopeBlock(self.config) for _ in range(depth)], tie_embeddings)

    @classmethod
    def from_config(cls, config: HopeConfig, **lm_kwargs: Any) -> HopeModule:
        """A :class:`HopeModule` of architecture ``config``; ``lm_kwargs`` are the
        :class:`~nl_lightning.models.lm.CausalLM` arguments (``lr``, ``segment_len``, ...). Its hyper-parameters are
        the config's fields and ``lm_kwargs``, as if they had been passed as keywords."""
        return cls(**config.to_kwargs(), **lm_kwargs)

    @override
    def forward(self, tokens: Tensor, state: Optional[HopeState] = None, write: bool = True) -> tuple[Tensor, Any]:
        """Continue a stream by ``tokens``.

        With ``cms_write_signal="task_loss"`` and ``write``, the CMS writes with the task loss
        (:func:`~nl_lightning.models.task_loss_cms.task_loss_forward`; under ``torch.no_grad`` or inference mode the
        logits carry no graph). ``write=False`` reads the memories as the target mode does and keeps the state's open
        term (:attr:`HopeState.deferred`) and due writes for a later call.

        Args:
            tokens: The next tokens ``(B, T)``.
            state: The state after the previous tokens (``None``: a new sequence).
            write: Let the memories write.

        Returns:
            The logits ``(B, T, vocab_size)`` and the :class:`HopeState` after the tokens.

        """
        if self.cms_write_signal == "target":
            return super().forward(tokens, state, write=write)
        deferred = None if state is None else state.deferred
        if not write or tokens.shape[1] == 0:
            logits, new = super().forward(tokens, state, write=False)
            return logits, HopeState(new.blocks, deferred)
        logits, blocks, last = task_loss_forward(self, tokens, None if state is None else state.blocks, deferred)
        if not torch.is_grad_enabled():
            logits = logits.detach()
        return logits, HopeState([HopeBlockState(t, c) for t, c in blocks], last)

    @override
    def state_stats(self) -> dict[str, float]:
        return {f"layer{i}/{k}": v for i, block in enumerate(self.blocks) for k, v in block.stats().items()}
