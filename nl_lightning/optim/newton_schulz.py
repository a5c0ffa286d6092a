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
Newton-Schulz Orthogonalization
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

``NS_T(G)`` maps a matrix to the nearest semi-orthogonal matrix (its polar factor ``U V^T``) approximately, in ``T``
matrix-multiply iterations. Muon reads each iteration as one gradient step on ``1/2 ||O - G||^2 + 1/2 ||O^T O - I||^2``
(NL NeurIPS, Sec. 4 "Muon"); DMGD uses it as its output nonlinearity and M3 on both of its momenta.

Two polynomials are offered:

- ``"quintic"`` (default [ours]): ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and
  ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, the coefficients Muon uses. In 5 steps it maps every singular value
  of at least 0.01 (after the Frobenius normalisation) into about ``[0.68, 1.14]`` rather than exactly to 1, and
  smaller ones less far (below about 0.002 they stay under the band); that is its design (speed over precision).
- ``"cubic"``: ``X <- 1.5 X - 0.5 X X^T X``, the classical iteration, which converges to exactly orthogonal but needs
  more steps when singular values are small.

The iteration runs in fp32 whatever the input dtype, and works on a batch ``(..., rows, cols)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from nl_lightning._validation import check_choice, check_int

__all__ = ["newton_schulz"]

_QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: Tensor, steps: int = 5, kind: Literal["quintic", "cubic"] = "quintic", eps: float = 1e-7
) -> Tensor:
    """Approximate the orthogonal polar factor of ``g`` with ``steps`` Newton-Schulz iterations.

    Args:
        g: A matrix ``(rows, cols)`` or a batch of them ``(..., rows, cols)``.
        steps: The number of iterations ``T >= 0`` (0 returns ``g`` scaled to unit Frobenius norm).
        kind: ``"quintic"`` (Muon's coefficients) or ``"cubic"``.
        eps: Added to the Frobenius norm before the initial scaling, so that a zero matrix maps to zero.

    Returns:
        A tensor of ``g``'s shape and dtype whose singular values are close to 1 (0 stays 0).

    Raises:
        ValueError: If ``g`` has fewer than 2 dimensions, ``steps`` is not an integer ``>= 0`` or ``kind`` is unknown.

    Example::

        o = newton_schulz(torch.randn(64, 32))
        torch.linalg.svdvals(o)  # all near 1

    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (..., rows, cols), got a tensor of shape {tuple(g.shape)}.")
    check_int("steps", steps, 0, allow_numpy=True)
    check_choice("kind", kind, ("quintic", "cubic"))
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: A = X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # all singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (..., rows, rows)
        if kind == "quintic":
            a, b, c = _QUINTIC
            x = a * x + (b * gram + c * gram @ gram) @ x
        else:
            x = 1.5 * x - 0.5 * gram @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)
