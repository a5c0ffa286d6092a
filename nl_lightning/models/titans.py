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
Titans (MAL)
^^^^^^^^^^^^

The Titans baseline (Behrouz et al., "Titans: Learning to Memorize at Test Time", §4.3, "memory as a layer"): each
block runs the long-term :class:`~nl_lightning.models.neural_memory.NeuralMemory` as a layer, then sliding-window
softmax attention, then a SwiGLU MLP, all pre-norm residual:

.. math::

    h \leftarrow h + \mathrm{LMM}(\mathrm{RMSNorm}(h)), \quad
    h \leftarrow h + \mathrm{SWA}(\mathrm{RMSNorm}(h)), \quad
    h \leftarrow h + \mathrm{SwiGLU}(\mathrm{RMSNorm}(h))

The state carried across segments (and written at test time) holds, per block, the memory's per-sample state and the
attention's key/value cache (:class:`~nl_lightning.models.transformer.KVCache`) of the last ``window - 1`` tokens, so
that every token attends to the ``window`` tokens ending at it wherever the segment boundaries fall: reading a
sequence in segments, or one token at a time when generating, gives the outputs of one pass over it. In training the
cache is detached at segment boundaries like the memory state (truncated backpropagation). MAL is the simplest Titans
variant to stack; the Titans paper (Behrouz et al. 2024, Sec. 4) also defines MAC and MAG. Persistent memory tokens
are not used [ours] (they add a constant prefix to the attention and do not change the memory).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from torch import Tensor, nn
from typing_extensions import override

from nl_lightning._validation import check_int, check_positive
from nl_lightning.models.lm import BlockStackLM
from nl_lightning.models.neural_memory import NeuralMemory, NeuralMemoryState
from nl_lightning.models.transformer import CausalSelfAttention, KVCache, RMSNorm, SwiGLU

__all__ = ["TitansBlock", "TitansConfig", "TitansMAL", "TitansState"]


@dataclass
class TitansState:
    """The state of a :class:`TitansMAL`: per block, the memory's state and the attention's key/value cache.

    Attributes:
        blocks: One :class:`NeuralMemoryState` per block.
        attention: One :class:`~nl_lightning.models.transformer.KVCache` per block (the last ``window - 1`` tokens).

    """

    blocks: list[NeuralMemoryState]
    attention: list[KVCache]

    def detach(self) -> TitansState:
        """Stop gradients here (truncated backpropagation); also usable outside the inference mode that made it."""
        return TitansState([s.detach() for s in self.blocks], [c.detach() for c in self.attention])

    def select(self, index: Tensor) -> TitansState:
        """The states of some samples of the batch."""
        return TitansState([s.select(index) for s in self.blocks], [c.select(index) for c in self.attention])


@dataclass(frozen=True)
class TitansConfig:
    """The architecture of a Titans (MAL) model, which :class:`TitansBlock` and :class:`TitansMAL` are built from.

    The values are checked once, here: a bad one raises a ``ValueError`` naming the field and the value when the
    config is made (:class:`~nl_lightning.models.neural_memory.NeuralMemory` checks the values of ``memory_kwargs``
    when it is built). ``memory_kwargs`` is stored as a dict.

    Attributes:
        vocab_size: Vocabulary size.
        dim: Model width.
        depth: Number of blocks.
        heads: Heads of the memory and the attention.
        window: Sliding-window length of the attention.
        chunk_size: Tokens per memory write.
        memory_depth: Layers of each memory MLP.
        mlp_mult: SwiGLU hidden width as a multiple of ``dim``.
        memory_kwargs: Further :class:`~nl_lightning.models.neural_memory.NeuralMemory` arguments (``lr_max``,
            ``momentum``, ...).
        tie_embeddings: Share the input embedding and the output head.

    Raises:
        ValueError: On sizes below 1, ``dim`` not divisible by ``heads``, ``mlp_mult <= 0`` or a name in
            ``memory_kwargs`` that NeuralMemory does not take (or that is a field here).

    Example::

        config = TitansConfig(dim=64, depth=2, heads=4, window=64, chunk_size=16, mlp_mult=1.5)
        block = TitansBlock(config)
        model = TitansMAL.from_config(config, segment_len=128)

    """

    vocab_size: int = 256
    dim: int = 256
    depth: int = 4
    heads: int = 4
    window: int = 64
    chunk_size: int = 16
    memory_depth: int = 2
    mlp_mult: float = 8 / 3
    memory_kwargs: Optional[dict[str, Any]] = None
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, low=2)
        for name in ("dim", "depth", "heads", "window", "chunk_size", "memory_depth"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(
                f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads}); pick heads among its divisors."
            )
        check_positive("mlp_mult", self.mlp_mult)
        kwargs = {} if self.memory_kwargs is None else self.memory_kwargs
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"`memory_kwargs` must be None or a dict of NeuralMemory arguments, got {kwargs!r}.")
        owned = sorted({"dim", "heads", "chunk_size", "depth"} & set(kwargs))
        if owned:
            raise ValueError(
                f"`memory_kwargs` sets {owned}; set them as fields of the config instead (`depth` is `memory_depth`)."
            )
        taken = set(inspect.signature(NeuralMemory.__init__).parameters) - {
            "self",
            "dim",
            "heads",
            "chunk_size",
            "depth",
        }
        unknown = sorted(set(kwargs) - taken)
        if unknown:
            raise ValueError(
                f"`memory_kwargs` has names NeuralMemory does not take: {unknown}; it takes {sorted(taken)}."
            )
        object.__setattr__(self, "memory_kwargs", dict(kwargs))  # the config is frozen once checked

    def to_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :class:`TitansMAL`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TitansBlock(nn.Module):
    """``h + LMM(norm h)``, then ``h + SWA(norm h)``, then ``h + SwiGLU(norm h)`` (Titans MAL).

    Args:
        config: The architecture (its ``vocab_size``, ``depth`` and ``tie_embeddings`` are the model's and unused here).

    """

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        self.mem_norm, self.attn_norm, self.mlp_norm = RMSNorm(config.dim), RMSNorm(config.dim), RMSNorm(config.dim)
        self.memory = NeuralMemory(
            config.dim, config.heads, config.chunk_size, config.memory_depth, **config.memory_kwargs
        )
        self.attn = CausalSelfAttention(config.dim, config.heads, window=config.window)
        self.mlp = SwiGLU(config.dim, config.mlp_mult)

    def forward(
        self,
        h: Tensor,
        state: Optional[NeuralMemoryState] = None,
        cache: Optional[KVCache] = None,
        write: bool = True,
    ) -> tuple[Tensor, NeuralMemoryState, KVCache]:
        """Continue a stream by ``h`` ``(B, T, D)``.

        Args:
            h: The residual stream of the next tokens ``(B, T, D)``.
            state: The memory's state after the previous tokens (``None``: a new sequence).
            cache: The attention's cache after the previous tokens (``None``: a new sequence).
            write: Let the memory write; ``False`` reads it unchanged. The cache takes the new tokens either way (it is
                the attention's context, not a memory write).

        Returns:
            The new residual stream ``(B, T, D)``, the memory's state and the attention's cache after ``h``.

        """
        y, state = self.memory(self.mem_norm(h), state, write=write)
        h = h + y
        y, cache = self.attn.forward_cached(self.attn_norm(h), cache)
        h = h + y
        return h + self.mlp(self.mlp_norm(h)), state, cache


class TitansMAL(BlockStackLM):
    r"""A Titans language model (memory as a layer), the baseline Hope is compared with at equal size.

    ``logits, state = model(tokens, state=None)``; the state (a :class:`TitansState`) carries every block's long-term
    memory and attention cache across segments, like :class:`~nl_lightning.models.hope.HopeModule`'s, so that reading
    a sequence in segments or token by token gives the logits of one pass. Logs ``train_layer<i>/<stat>`` (surprise,
    memory norm, gates) after every training step. The architecture arguments make a :class:`TitansConfig`
    (``model.config``) that every :class:`TitansBlock` is built from; :meth:`from_config` builds the model from one.

    Args:
        vocab_size: Vocabulary size.
        dim: Model width.
        depth: Number of blocks.
        heads: Heads of the memory and the attention.
        window: Sliding-window length of the attention.
        chunk_size: Tokens per memory write.
        memory_depth: Layers of each memory MLP.
        mlp_mult: SwiGLU hidden width as a multiple of ``dim``.
        memory_kwargs: Further :class:`~nl_lightning.models.neural_memory.NeuralMemory` arguments.
        tie_embeddings: Share the input embedding and the output head.
        **lm_kwargs: :class:`~nl_lightning.models.lm.CausalLM` arguments.

    Raises:
        ValueError: On a bad architecture value (see :class:`TitansConfig`), a bad CausalLM argument, and the
            sub-modules' own errors.

    Example::

        model = TitansMAL(vocab_size=256, dim=64, depth=2, heads=4, window=64, segment_len=128)
        logits, state = model(torch.randint(0, 256, (2, 128)))

    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        window: int = 64,
        chunk_size: int = 16,
        memory_depth: int = 2,
        mlp_mult: float = 8 / 3,
        memory_kwargs: Optional[dict[str, Any]] = None,
        tie_embeddings: bool = True,
        **lm_kwargs: Any,
    ) -> None:
        super().__init__(vocab_size, **lm_kwargs)
        self.config = TitansConfig(
            vocab_size=vocab_size,
            dim=dim,
            depth=depth,
            heads=heads,
            window=window,
            chunk_size=chunk_size,
            memory_depth=memory_depth,
            mlp_mult=mlp_mult,
            memory_kwargs=memory_kwargs,
            tie_embeddings=tie_embeddings,
        )
        self.dim = dim
        self.build(dim, [TitansBlock(self.config) for _ in range(depth)], tie_embeddings)

    @classmethod
    def from_config(cls, config: TitansConfig, **lm_kwargs: Any) -> TitansMAL:
        """A :class:`TitansMAL` of architecture ``config``; ``lm_kwargs`` are the
        :class:`~nl_lightning.models.lm.CausalLM` arguments (``lr``, ``segment_len``, ...)."""
        return cls(**config.to_kwargs(), **lm_kwargs)

    @override
    def forward(
        self, tokens: Tensor, state: Optional[TitansState] = None, write: bool = True
    ) -> tuple[Tensor, TitansState]:
        """``tokens`` ``(B, T)`` -> ``(logits (B, T, vocab_size), state)``; ``state`` continues a stream."""
        h = self.embed(tokens)  # (B, T, D)
        memories = [None] * self.depth if state is None else state.blocks
        caches = [None] * self.depth if state is None else state.attention
        new = TitansState([], [])
        for block, memory, cache in zip(self.blocks, memories, caches, strict=True):
            h, memory, cache = block(h, memory, cache, write=write)
            new.blocks.append(memory)
            new.attention.append(cache)
        return self.head(self.norm(h)), new

    @override
    def state_stats(self) -> dict[str, float]:
        return {
            f"layer{i}/{k}": float(v) for i, block in enumerate(self.blocks) for k, v in block.memory.last_stats.items()
        }
