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
Residual Memory Math
^^^^^^^^^^^^^^^^^^^^

The closed-form pieces of the self-modifying Titans memories (A §8, Eq. 76-93, NL arXiv): the residual MLP
:math:`\mathcal{M}(z) = z + W_1\sigma(W_2 z)` with per-sample, per-head weights ``W_1`` ``(..., d, h)`` and ``W_2``
``(..., h, d)``, the factors of one token's inner gradient, and the DGD-with-retention recurrence of Eq. 88 over a
chunk.

A token's inner gradient is one outer product per matrix (column convention, ``u = W_2 k``, ``a = σ(u)``):

.. math::

    \nabla_{W_1} = p\,a^\top, \qquad \nabla_{W_2} = \delta\,k^\top, \qquad \delta = (W_1^\top p) \odot \sigma'(u),

with :math:`p = 2(\mathcal{M}(k) - \hat v)` for :math:`L = \lVert\mathcal{M}(k) - \hat v\rVert^2`. Over a chunk
whose gradients are all taken at the anchor (Eq. 90), the recurrence is linear in the weights:

.. math::

    W_{1,s} = \alpha_s W_{1,s-1} - \eta_s c_s\,p_s a_s^\top, \qquad
    W_{2,s} = W_{2,s-1}(\alpha_s I - \eta_s k_s k_s^\top) - \eta_s c_s\,\delta_s k_s^\top .

:func:`dgd_chunk` runs it exactly and in parallel over the chunk: ``W_1`` is a decayed sum (one matmul); ``W_2`` is a
gated delta rule, solved with the WY form of DeltaNet (the inverse of one unit-lower-triangular matrix of size ``n``,
shared by all memories, since ``k``, ``η`` and ``α`` are, then one matmul per memory). No autograd is used, so it runs
under ``torch.inference_mode()``; the outer gradient flows through it by ordinary autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nl_lightning.models.cms_memory import ACTIVATIONS, _activation_backward

__all__ = ["clip_factor", "dgd_chunk", "input_side_factor", "residual_forward"]


def residual_forward(z: Tensor, w1: Tensor, w2: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``M(z) = z + W1 σ(W2 z)`` on rows, returning ``(M(z), u, a)`` with ``u = W2 z`` and ``a = σ(u)``.

    Args:
        z: Inputs ``(..., n, d)``, broadcast against the weights' leading dimensions.
        w1: Output-side weights ``(..., d, h)``.
        w2: Input-side weights ``(..., h, d)``.
        activation: A name of :data:`~nl_lightning.models.cms_memory.ACTIVATIONS`.

    Returns:
        ``(y (..., n, d), u (..., n, h), a (..., n, h))``.

    """
    u = z @ w2.transpose(-1, -2)  # (..., n, h)
    a = ACTIVATIONS[activation][0](u)
    return z + a @ w1.transpose(-1, -2), u, a


def input_side_factor(p: Tensor, u: Tensor, w1: Tensor, activation: str) -> Tensor:
    """``δ = (W1ᵀ p) ⊙ σ'(u)``, so that ``∇_{W2} = δ kᵀ`` when ``∇_{W1} = p aᵀ``.

    Args:
        p: Output-side error factors ``(..., n, d)`` (``2(M(k) - v̂)`` for the L2 objective).
        u: Pre-activations ``W2 k`` ``(..., n, h)``.
        w1: The output-side weights the tokens were read with ``(..., d, h)``.
        activation: The activation's name.

    Returns:
        ``δ`` ``(..., n, h)``.

    """
    return _activation_backward(p @ w1, u, activation)


def clip_factor(p: Tensor, a: Tensor, delta: Tensor, k: Tensor, max_norm: float) -> Tensor:
    """Each token's gradient-clipping factor ``min(1, max_norm / |g|)``, shape ``(..., n)``.

    The token's gradient ``(p aᵀ, δ kᵀ)`` has Frobenius norm ``|g| = sqrt(|p|²|a|² + |δ|²|k|²)``; no matrix is formed.
    """
    sq = p.pow(2).sum(-1) * a.pow(2).sum(-1) + delta.pow(2).sum(-1) * k.pow(2).sum(-1)
    return (max_norm / sq.clamp_min(1e-30).sqrt()).clamp(max=1.0)


def dgd_chunk(
    w1: Tensor, w2: Tensor, k: Tensor, a: Tensor, p: Tensor, delta: Tensor, eta: Tensor, step: Tensor, log_alpha: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Eq. 88 over one chunk: ``G`` memories from their running weights to the chunk-end weights.

    Token ``s`` applies :math:`W_1 \leftarrow \alpha_s W_1 - \mathrm{step}_s\, p_s a_s^\top` and
    :math:`W_2 \leftarrow W_2(\alpha_s I - \eta_s k_s k_s^\top) - \mathrm{step}_s\, \delta_s k_s^\top`, where
    ``step = η`` (times the clipping factor) and ``p, a, δ`` were computed at the anchor. With
    :math:`\gamma_s = \prod_{i \le s}\alpha_i` and :math:`r_s = -\mathrm{step}_s\delta_s - \eta_s W_{2,s-1}k_s`,

    .. math::

        W_{2,n} = \gamma_n W_{2,0} + \sum_j \tfrac{\gamma_n}{\gamma_j} r_j k_j^\top, \qquad
        (I + L)\,R = -\mathrm{step}\odot\Delta - \eta\,\gamma_{s-1}\, K W_{2,0}^\top, \quad
        L_{sj} = \eta_s \tfrac{\gamma_{s-1}}{\gamma_j} k_s^\top k_j\ (j < s),

    which is exact (no truncation); decay ratios are taken in log space. ``(I + L)^{-1}`` is formed once per sample and
    head and applied to the ``G`` memories' right-hand sides by a batched matmul. This equals a triangular solve per
    memory to fp32 rounding and runs faster on CPU, where batched solves of many small systems are slow. The
    memories lead the shapes (``G`` first), so that any range of memories is a contiguous view of the weights; ``k``,
    ``η`` and ``α`` are shared by the ``G`` memories and broadcast.

    Args:
        w1: Running output-side weights ``(G, B, H, d, h)``.
        w2: Running input-side weights ``(G, B, H, h, d)``.
        k: Keys ``(B, H, n, d)``, shared by the ``G`` memories.
        a: Activations ``σ(W2_anchor k)`` ``(G, B, H, n, h)``.
        p: Output-side error factors ``(G, B, H, n, d)``.
        delta: Input-side factors ``(G, B, H, n, h)``.
        eta: Learning rates ``(B, H, n)`` (the ``k kᵀ`` term).
        step: Gradient step sizes ``(G, B, H, n)`` or ``(B, H, n)`` (``η`` times the clipping factor, if any).
        log_alpha: ``log α`` ``(B, H, n)``, all ``<= 0``.

    Returns:
        The chunk-end ``(w1, w2)``.

    """
    n = k.shape[-2]
    lg = log_alpha.cumsum(-1)  # (B, H, n): log γ_s
    lg_end = lg[..., -1:]  # (B, H, 1): log γ_n
    to_end = torch.exp(lg_end - lg)  # (B, H, n): γ_n / γ_s
    decay_all = torch.exp(lg_end).unsqueeze(-1)  # (B, H, 1, 1)
    # W1: a decayed sum of rank-1 terms
    w1 = decay_all * w1 - (p * (step * to_end).unsqueeze(-1)).transpose(-1, -2) @ a  # (G, B, H, d, h)
    # W2: gated delta rule in WY form
    lg_prev = lg - log_alpha  # (B, H, n): log γ_{s-1}
    rhs = -step.unsqueeze(-1) * delta - (eta * torch.exp(lg_prev)).unsqueeze(-1) * (k @ w2.transpose(-1, -2))
    if n > 1:
        strict = torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)
        ratio = (lg_prev.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(~strict, float("-inf")).exp()  # (B, H, n, n)
        lower = eta.unsqueeze(-1) * ratio * (k @ k.transpose(-1, -2))  # (B, H, n, n), strictly lower
        eye = torch.eye(n, dtype=k.dtype, device=k.device)
        inverse = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)  # (B, H, n, n)
        rhs = inverse @ rhs  # R, (G, B, H, n, h)
    w2 = decay_all * w2 + rhs.transpose(-1, -2) @ (k * to_end.unsqueeze(-1))  # (G, B, H, h, d)
    return w1, w2
