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
Sharded Tensors
^^^^^^^^^^^^^^^

Helpers that let the engine and the callbacks treat parameters and gradients sharded as ``DTensor`` (FSDP2's
``fully_shard``, Lightning's ``ModelParallelStrategy``) like whole tensors:

- :func:`global_sums` computes sums of elementwise products (dot products, squared norms) over the *whole* tensors,
  with one all-reduce per device mesh and layout, so every rank gets the same value;
- :func:`gather_full` turns the sharded tensors of a (nested) state into whole CPU tensors, the form a checkpoint that
  one rank writes needs;
- :func:`shard_like` lays a whole tensor out as a given ``DTensor`` (each rank keeps its own shard, no communication).

For plain tensors they do what the unsharded code did, without any communication. Functions that communicate must be
called on every rank, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["gather_full", "global_sums", "is_dtensor", "shard_like"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def gather_full(obj: Any) -> Any:
    """``obj`` with every ``DTensor`` (in nested dicts, lists and tuples) replaced by the whole tensor, on the CPU.

    Collective for every ``DTensor`` it meets: call it on every rank, with states of the same structure. Other values
    are returned as they are (plain tensors are not copied).
    """
    if is_dtensor(obj):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v) for v in obj)
    return obj


def shard_like(value: Tensor, ref: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A copy of ``value`` on ``ref``'s device, in ``dtype`` (default: ``value``'s), laid out as ``ref``.

    If ``ref`` is a ``DTensor`` and ``value`` a whole tensor of its global shape, each rank keeps its own shard of
    ``value`` (no communication: every rank must hold the same ``value``, as when each loads the same checkpoint). A
    ``DTensor`` ``value`` is redistributed to ``ref``'s layout.

    Raises:
        ValueError: If ``value``'s shape is not ``ref``'s (global) shape.
    """
    dtype = value.dtype if dtype is None else dtype
    if tuple(value.shape) != tuple(ref.shape):
        raise ValueError(
            f"A saved tensor of shape {tuple(value.shape)} cannot restore one of shape {tuple(ref.shape)}: the model"
            " changed since the state was saved."
        )
    if not is_dtensor(ref):
        if is_dtensor(value):
            value = value.full_tensor()
        return value.detach().to(device=ref.device, dtype=dtype, copy=True)
    if is_dtensor(value):
        value = value.detach().redistribute(ref.device_mesh, ref.placements)
        return value.to(dtype=dtype, copy=True)
    local = value.detach().to(device=ref.device, dtype=dtype)
    return distribute_tensor(local, ref.device_mesh, ref.placements, src_data_rank=None)


def global_sums(*pair_lists: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """For each list of pairs ``(x, y)``, ``sum((x * y).sum())`` over the whole tensors, in fp32.

    ``global_sums(list(zip(a, b)), [(x, x) for x in a])`` gives ``<a, b>`` and ``||a||^2`` at once. Sharded pairs
    (``DTensor``) add their local products and are all-reduced once per device mesh and layout, so the result is the
    same on every rank and equals the unsharded computation (up to fp32 summation order).

    Args:
        pair_lists: Lists of ``(x, y)`` tensors of equal shapes. A ``DTensor`` paired with a plain tensor is gathered
            whole first (collective).

    Returns:
        A 1-D fp32 tensor with one sum per list, on the tensors' device (CPU when all lists are empty).
    """
    k = len(pair_lists)
    plain: Optional[Tensor] = None
    sharded: dict[tuple[Any, tuple[Any, ...]], list[Tensor]] = {}  # (mesh, placements) -> per list, local sums
    for i, pairs in enumerate(pair_lists):
        for x, y in pairs:
            if is_dtensor(x) and is_dtensor(y) and _reducible(x):
                if y.device_mesh != x.device_mesh or tuple(y.placements) != tuple(x.placements):
                    y = y.redistribute(x.device_mesh, x.placements)
                key = (x.device_mesh, tuple(x.placements))
                sums = sharded.get(key)
                if sums is None:
                    sums = sharded[key] = [torch.zeros((), device=x.to_local().device) for _ in range(k)]
                sums[i] = sums[i] + (x.to_local().float() * y.to_local().float()).sum()
                continue
            x = x.full_tensor() if is_dtensor(x) else x
            y = y.full_tensor() if is_dtensor(y) else y
            if plain is None:
                plain = torch.zeros(k, device=x.device)
            plain[i] += (x.float() * y.float()).sum()
    total = plain
    for (mesh, placements), sums in sharded.items():
        partial = [Partial("sum") if p.is_shard() else Replicate() for p in placements]
        reduced = DTensor.from_local(torch.stack(sums), mesh, partial, run_check=False).full_tensor()
        total = reduced if total is None else total + reduced.to(total.device)
    return torch.zeros(k) if total is None else total


def _reducible(x: Tensor) -> bool:
    """Whether a sum over ``x``'s local shard is a partial sum along each mesh dimension (sharded or replicated)."""
    return all(p.is_shard() or p.is_replicate() for p in x.placements)
