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
Memory MLP
^^^^^^^^^^

The closed-form forward and backward of the Titans memory :math:`\mathcal{M}` (Titans §3.1): a bias-free MLP of
``L`` layers on the head width, with per-sample, per-head weights ``W_l`` ``(B, H, out_l, in_l)``,

.. math::

    a_0 = k, \quad z_l = W_l a_{l-1}, \quad a_l = \sigma(z_l)\ (l < L), \quad
    \mathcal{M}(k) = [k +]\, z_L ,

and the layer-wise factors of the gradient of :math:`\ell = \lVert \mathcal{M}(k) - v\rVert^2`. In the column
convention (``y = W x``), :math:`\nabla_{W_l}\ell = \delta_l\, a_{l-1}^\top` with

.. math::

    \delta_L = 2(\mathcal{M}(k) - v), \qquad \delta_{l} = (W_{l+1}^\top \delta_{l+1}) \odot \sigma'(z_l),

so a token's gradient is one outer product per layer, and any weighted sum of tokens' gradients is
``(c * delta_l).T @ a_{l-1}``: a batched matmul, never a per-token gradient tensor. No autograd is used, so the inner
gradient also runs under ``torch.inference_mode()``; the outer gradient flows through these formulas by ordinary
autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from nl_lightning.models.cms_memory import ACTIVATIONS, _activation_backward

__all__ = ["memory_backward", "memory_forward"]


def memory_forward(
    weights: Sequence[Tensor], x: Tensor, activation: str, residual: bool
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Apply the memory MLP to a batch of tokens, keeping what the backward needs.

    Args:
        weights: ``W_1 .. W_L``, each ``(B, H, out_l, in_l)`` (or ``(H, out_l, in_l)``, shared by the batch).
        x: Tokens ``(B, H, n, D)`` in row form.
        activation: A name of :data:`~nl_lightning.models.cms_memory.ACTIVATIONS`.
        residual: Add ``x`` to the last layer's output.

    Returns:
        ``(out (B, H, n, D), inputs, pre)``: ``inputs[l]`` is layer ``l``'s input ``a_{l-1}`` and ``pre[l]`` the
        pre-activation ``z_l`` of each hidden layer (``len(pre) == L - 1``).

    """
    act = ACTIVATIONS[activation][0]
    inputs, pre = [], []
    h = x
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w.transpose(-1, -2)  # (B, H, n, out_l)
        if i < len(weights) - 1:
            pre.append(z)
            z = act(z)
        h = z
    return (x + h if residual else h), inputs, pre


def memory_backward(weights: Sequence[Tensor], pre: Sequence[Tensor], delta: Tensor, activation: str) -> list[Tensor]:
    """Back-propagate the output error through the layers in closed form.

    Args:
        weights: ``W_1 .. W_L`` as in :func:`memory_forward`.
        pre: The hidden pre-activations :func:`memory_forward` returned (for the same tokens).
        delta: ``dl/dM(k)`` ``(B, H, n, D)``, e.g. ``2 * (M(k) - v)``.
        activation: The activation's name.

    Returns:
        ``deltas[l]`` ``(B, H, n, out_l)``: ``dl/dz_l`` of every layer, so that token ``i``'s gradient for ``W_l`` is
        ``deltas[l][..., i, :, None] * inputs[l][..., i, None, :]``.

    """
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        delta = _activation_backward(delta @ weights[i], pre[i - 1], activation)  # (B, H, n, out_{i-1})
        deltas.append(delta)
    return deltas[::-1]
