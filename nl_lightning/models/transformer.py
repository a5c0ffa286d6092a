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
Transformer++
^^^^^^^^^^^^^

The Transformer++ baseline of the NL and Titans tables (NL NeurIPS Table 1; Titans Sec. 5): a decoder-only
Transformer with pre-norm RMSNorm blocks, rotary position embeddings (RoPE, Su et al. 2021) on the queries and keys,
a SwiGLU MLP (Shazeer 2020) and tied input/output embeddings:

.. math::

    h \leftarrow h + \mathrm{Attn}(\mathrm{RMSNorm}(h)), \qquad
    h \leftarrow h + W_3\,(\mathrm{SiLU}(W_1 x) \odot W_2 x)\big|_{x = \mathrm{RMSNorm}(h)}

Attention is causal softmax attention over the segment (``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True``), optionally limited to a sliding window of the last ``window`` tokens (an explicit mask; the
Titans MAG/MAL baselines use it). The model is stateless: each segment is attended on its own, so ``segment_len``
limits the context, and ``generate`` re-reads a window of at most ``max_context`` tokens per new token.

Stateful models built on the attention (Titans MAL, Hope-Attention) stream it with
:meth:`CausalSelfAttention.forward_cached` and a :class:`KVCache`: the rotated keys and the values of the tokens a
later token can still attend to, and the position of the next token, so that reading a sequence in pieces gives the
outputs of one pass over it.

:class:`RMSNorm`, :class:`CausalSelfAttention`, :class:`KVCache`, :class:`SwiGLU` and :func:`apply_rope` are reusable
building blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from nl_lightning._validation import check_int, check_positive
from nl_lightning.models.lm import CausalLM

__all__ = [
    "CausalSelfAttention",
    "KVCache",
    "RMSNorm",
    "SwiGLU",
    "TransformerBlock",
    "TransformerPP",
    "apply_rope",
    "rope_angles",
]

#: Root-mean-square layer norm (``torch.nn.RMSNorm``, in torch since 2.4; nl_lightning needs torch >= 2.5).
RMSNorm = nn.RMSNorm


def rope_angles(
    seq_len: int, head_dim: int, base: float = 10000.0, offset: int = 0, device: Any = None, dtype: Any = None
) -> tuple[Tensor, Tensor]:
    r"""Cosines and sines of the rotary angles :math:`\theta_{t,i} = t\, b^{-2i/d}`, ``(seq_len, head_dim // 2)`` each.

    Computed in float32 (float64 if ``dtype`` is float64) for positions ``offset .. offset + seq_len - 1``.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim)  # (D/2,)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=work)  # (T,)
    angles = torch.outer(pos, inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(..., T, D)`` pairwise: dimension ``i`` and ``i + D/2`` by angle ``theta_{t,i}`` (the
    "rotate-half" layout of GPT-NeoX and Llama); ``cos``, ``sin``: ``(T, D/2)``."""
    work = x if x.dtype == torch.float64 else x.float()
    x1, x2 = work.chunk(2, dim=-1)  # (..., T, D/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def _portable(t: Tensor) -> Tensor:
    """Detached, and usable outside ``torch.inference_mode`` even if it was made inside it."""
    t = t.detach()
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


@dataclass
class KVCache:
    """The keys and values a :class:`CausalSelfAttention` keeps between calls to stream a sequence.

    Pass it back to :meth:`CausalSelfAttention.forward_cached` to continue the sequence; ``None`` there starts one.

    Attributes:
        k: RoPE-rotated keys of the tokens the next token may attend to, ``(B, H, L, Dh)``: the last ``window - 1``
            tokens with a sliding window, every token read so far without one.
        v: Their values, ``(B, H, L, Dh)``.
        pos: Absolute position of the next token (the tokens read so far); its RoPE angle.

    """

    k: Tensor
    v: Tensor
    pos: int = 0

    def detach(self) -> KVCache:
        """Stop gradients here (truncated backpropagation between segments); also makes a cache computed under
        ``torch.inference_mode`` usable outside it."""
        return replace(self, k=_portable(self.k), v=_portable(self.v))

    def to(self, *args: Any, **kwargs: Any) -> KVCache:
        """``Tensor.to`` on the keys and values."""
        return replace(self, k=self.k.to(*args, **kwargs), v=self.v.to(*args, **kwargs))

    def select(self, index: Tensor) -> KVCache:
        """The caches of some samples of the batch (e.g. those whose sequence continues)."""
        return replace(self, k=self.k[index], v=self.v[index])

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loads with ``torch.load(weights_only=True)``); detached."""
        s = self.detach()
        return {"k": s.k, "v": s.v, "pos": s.pos}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KVCache:
        """Inverse of :meth:`state_dict`."""
        return cls(state["k"], state["v"], int(state["pos"]))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on the queries and keys, optionally a sliding window.

    Token ``t`` attends to tokens ``s <= t`` (and, with ``window``, ``s > t - window``: itself and the ``window - 1``
    previous tokens). Without a window it runs ``scaled_dot_product_attention(is_causal=True)`` (flash or
    memory-efficient kernels where available); with one, an explicit boolean mask.

    Args:
        dim: Model width ``D``.
        heads: Attention heads; ``D`` must be divisible by ``heads`` and the head width even (for RoPE).
        window: Sliding-window length (``None``: full causal attention).
        rope_base: RoPE base ``b``.
        bias: Biases in the projections.

    Raises:
        ValueError: If ``dim`` is not divisible by ``heads``, the head width is odd, ``window < 1`` or
            ``rope_base <= 0``.

    Example::

        attn = CausalSelfAttention(dim=64, heads=4, window=16)
        y = attn(torch.randn(2, 100, 64))  # (2, 100, 64)

    """

    def __init__(
        self, dim: int, heads: int, window: Optional[int] = None, rope_base: float = 10000.0, bias: bool = False
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"`dim` ({dim!r}) must be a positive multiple of `heads` ({heads!r}).")
        if (dim // heads) % 2:
            raise ValueError(f"The head width dim / heads = {dim // heads} must be even for RoPE; change dim or heads.")
        if window is not None:
            check_int("window", window, hint="use None for full causal attention")
        check_positive("rope_base", rope_base)
        self.dim, self.heads, self.head_dim, self.window, self.rope_base = dim, heads, dim // heads, window, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def mask(self, seq_len: int, device: Any = None, past: int = 0) -> Optional[Tensor]:
        """The boolean ``(T, past + T)`` mask (``True``: may attend) of ``T`` new tokens over ``past`` cached ones and
        themselves: causal, and within the sliding window if there is one.

        Args:
            seq_len: New tokens ``T`` (the queries).
            device: Device of the mask.
            past: Cached tokens before them (the first keys).

        Returns:
            The mask; ``None`` where plain causal attention needs none (no window and no cached tokens).

        """
        if self.window is None and past == 0:
            return None
        query = torch.arange(past, past + seq_len, device=device)  # (T,): key index of each query's own token
        diff = query[:, None] - torch.arange(past + seq_len, device=device)[None, :]  # (T, past + T)
        allowed = diff >= 0
        return allowed if self.window is None else allowed & (diff < self.window)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, T, D)`` -> ``(B, T, D)``, attending within ``x`` only."""
        q, k, v = self._rotated_qkv(x, offset=0)
        return self._attend(q, k, v, past=0)

    def forward_cached(self, x: Tensor, cache: Optional[KVCache] = None) -> tuple[Tensor, KVCache]:
        """Attend from ``x`` to the cached tokens and to itself, and return the cache to continue from.

        Reading a sequence in pieces, each with the cache the previous piece returned, gives the outputs of
        :meth:`forward` on the whole sequence: the new tokens' RoPE angles start at ``cache.pos`` and the mask is the
        one of their positions in the sequence.

        Args:
            x: The next tokens ``(B, T, D)``.
            cache: The cache after the previous tokens; ``None`` starts a sequence.

        Returns:
            The outputs ``(B, T, D)`` and the cache after ``x``: the last ``window - 1`` tokens' keys and values with
            a sliding window, all of them without one (the cache then grows with the sequence).

        Raises:
            ValueError: If the cache's batch size, heads or head width do not match.

        """
        pos = 0 if cache is None else cache.pos
        q, k, v = self._rotated_qkv(x, offset=pos)  # 3 x (B, H, T, Dh)
        if cache is not None:
            self._check_cache(cache, k)
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, H, L + T, Dh)
        y = self._attend(q, k, v, past=k.shape[2] - q.shape[2])
        keep = k.shape[2] if self.window is None else min(self.window - 1, k.shape[2])
        return y, KVCache(k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], pos + x.shape[1])

    def _rotated_qkv(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys rotated for positions ``offset ..``, and values; each ``(B, H, T, Dh)``."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        cos, sin = rope_angles(T, self.head_dim, self.rope_base, offset=offset, device=x.device, dtype=q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
        """Queries ``(B, H, T, Dh)`` over keys and values ``(B, H, past + T, Dh)`` -> outputs ``(B, T, D)``."""
        B, _, T, _ = q.shape
        mask = self.mask(T, q.device, past)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh): flash / efficient kernels
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.dim))

    def _check_cache(self, cache: KVCache, k: Tensor) -> None:
        B, H, _, Dh = k.shape
        if cache.k.shape[0] != B or cache.k.shape[1] != H or cache.k.shape[3] != Dh:
            raise ValueError(
                f"The cache holds keys of shape {tuple(cache.k.shape)}, this attention needs ({B}, {H}, L, {Dh});"
                " pass the cache this attention returned for the same batch (KVCache.select picks samples)."
            )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window={self.window}, rope_base={self.rope_base}"


class SwiGLU(nn.Module):
    """The SwiGLU MLP ``W_3 (SiLU(W_1 x) * W_2 x)``; hidden width ``mult * dim`` rounded up to a multiple of 8.

    Args:
        dim: Input and output width.
        mult: Hidden width as a multiple of ``dim`` (``8/3`` keeps the parameters of a ``4 x`` GELU MLP).
        bias: Biases in the projections.

    Raises:
        ValueError: If ``mult <= 0``.

    Example::

        mlp = SwiGLU(256)  # hidden 688
        y = mlp(torch.randn(2, 10, 256))

    """

    def __init__(self, dim: int, mult: float = 8 / 3, bias: bool = False) -> None:
        super().__init__()
        check_positive("mult", mult)
        self.hidden = 8 * math.ceil(mult * dim / 8)
        self.gate_up = nn.Linear(dim, 2 * self.hidden, bias=bias)
        self.down = nn.Linear(self.hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + Attn(RMSNorm(h))`` then ``h + SwiGLU(RMSNorm(h))``."""

    def __init__(
        self, dim: int, heads: int, mlp_mult: float = 8 / 3, window: Optional[int] = None, rope_base: float = 10000.0
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, window=window, rope_base=rope_base)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_mult)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class TransformerPP(CausalLM):
    """Transformer++: RMSNorm pre-norm blocks, RoPE causal attention, SwiGLU MLP, tied embeddings (stateless).

    ``logits, state = model(tokens)`` maps ``(B, T)`` tokens to ``(B, T, vocab_size)`` logits; ``state`` is always
    ``None`` (a given state is ignored, and so is ``write``). Initialisation: normal(0, 0.02) weights, the residual
    output projections scaled by ``1 / sqrt(2 depth)`` (GPT-2), RMSNorm gains 1. Training, evaluation, generation and
    the optimizer come from :class:`~nl_lightning.models.lm.CausalLM`.

    Args:
        vocab_size: Vocabulary size (256 for byte-level text).
        dim: Model width.
        depth: Number of blocks.
        heads: Attention heads (``dim / heads`` even).
        mlp_mult: SwiGLU hidden width as a multiple of ``dim``.
        max_context: The window ``generate`` re-reads per new token; longer inputs to ``forward`` still work (RoPE has
            no table to outgrow).
        rope_base: RoPE base.
        tie_embeddings: Share the input embedding and the output head.
        window: Sliding-window attention length (``None``: full causal attention).
        **lm_kwargs: :class:`~nl_lightning.models.lm.CausalLM` arguments (``lr``, ``segment_len``, ...).

    Raises:
        ValueError: On sizes below 1, ``dim`` not divisible by ``heads``, an odd head width, ``mlp_mult <= 0``,
            ``window < 1``, ``rope_base <= 0``, or a bad :class:`CausalLM` argument.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.data.text import TextDataModule, decode, encode

        model = TransformerPP(vocab_size=256, dim=128, depth=2, heads=4, lr=3e-3, max_steps_schedule=2000)
        Trainer(max_steps=2000).fit(model, datamodule=TextDataModule(seq_len=128))
        print(decode(model.generate(encode("The ").unsqueeze(0), 100, temperature=0)[0]))

    """

    stateful = False

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_mult: float = 8 / 3,
        max_context: int = 4096,
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        window: Optional[int] = None,
        **lm_kwargs: Any,
    ) -> None:
        super().__init__(vocab_size, **lm_kwargs)
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads), ("max_context", max_context)):
            check_int(name, value)
        self.dim, self.depth, self.max_context, self.tie_embeddings = dim, depth, max_context, tie_embeddings
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_mult, window, rope_base) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @override
    def forward(self, tokens: Tensor, state: Any = None, write: bool = True) -> tuple[Tensor, None]:
        """``tokens`` ``(B, T)`` -> ``(logits (B, T, vocab_size), None)``."""
        h = self.embed(tokens)  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)), None
