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
Nested DDP
^^^^^^^^^^

Data-parallel training that pays for a slow level's communication only when the level updates.

Under :class:`~lightning.pytorch.strategies.DDPStrategy` every gradient is all-reduced on every step, also those of
the slow levels of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`, which only wait in buffers until their
level updates. :class:`NestedDDPStrategy` leaves the parameters of every level with ``every > 1`` out of DDP: each
process accumulates their local gradients in the level's buffers, and on the step where the level updates the chunk's
gradients are all-reduced (averaged over processes) once, in one flat buffer per level. A level of period ``C`` then
costs ``1/C`` of its communication, and the update is the one DDP would give, up to the order of the fp32 sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from nl_lightning.callbacks._step_hooks import StepProtocol
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates
from nl_lightning.levels import buffer_dtype

__all__ = ["NestedDDPStrategy"]

_UNSET = object()


class NestedDDPStrategy(DDPStrategy):
    r"""A :class:`~lightning.pytorch.strategies.DDPStrategy` that all-reduces each slow level once per update.

    It reads the levels from the Trainer's :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` callbacks (one or
    several, as registered in the Trainer's step protocol) and, when ``fit`` wraps the model:

    - leaves the parameters of every level with ``every > 1`` out of DDP (``DistributedDataParallel`` neither
      all-reduces their gradients nor broadcasts them), and broadcasts them from rank 0 itself, so every process
      starts from the same values;
    - has the callback hand it each due slow level's chunk gradient (the mean or sum of the gradients the process
      accumulated in the level's fp32 buffers) before the optimizer step, and all-reduces it (the mean over processes):
      one all-reduce per due level, in the buffer dtype, so a level of period ``C`` costs ``1/C`` of what DDP spends
      on it. Gradient clipping, the rules and the monitor see the all-reduced gradient, the same on every process;
    - under a ``GradScaler`` (``16-mixed``), takes the maximum over processes of the scaler's found-inf flags of an
      optimizer that holds slow parameters, when the callback prepares the step (Lightning has unscaled the gradients
      by then, and the scaler has not stepped yet): a non-finite local gradient on one process makes
      every process skip the step, so the level clocks, which count the steps that happened, never disagree;
    - when a checkpoint is saved, replaces the slow levels' buffers (local sums, different on each process) by their
      mean over processes, the sum the next all-reduce would have produced: the checkpoint, written by rank 0, is
      the same whichever process wrote it, and a run resumed from it in the middle of a chunk gives the uninterrupted
      run's result (up to the order of the fp32 sums) on every process.

    Levels with ``every == 1`` and parameters in no level stay in DDP and are all-reduced on every step as usual (if
    every trainable parameter is in a slow level, the smallest slow tensor stays in DDP too, which refuses a model with
    nothing to all-reduce; the result is the same). The
    slow levels' all-reduce goes through ``torch.distributed.all_reduce`` (gloo on CPU, NCCL on GPU); a DDP
    communication hook (``ddp_comm_hook``) applies to the parameters DDP still holds only.

    A process whose backward gave a parameter no gradient contributes zeros for it, as DDP does for an unused
    parameter; a parameter with no gradient on any process keeps ``p.grad = None``.

    Args:
        \*args, \*\*kwargs: Passed to :class:`~lightning.pytorch.strategies.DDPStrategy`, for example
            ``start_method="spawn"`` (what ``strategy="ddp_spawn"`` selects), ``find_unused_parameters``,
            ``process_group_backend`` or ``timeout``.

    Raises:
        MisconfigurationException: At ``fit``, if the Trainer has no
            :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` callback.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning import Level
        from nl_lightning.callbacks import MultiFrequencyUpdates
        from nl_lightning.strategies import NestedDDPStrategy

        levels = [Level("mid", ["blocks.0.*"], every=4), Level("slow", ["blocks.1.*"], every=16)]
        trainer = Trainer(
            accelerator="gpu", devices=8, strategy=NestedDDPStrategy(), callbacks=[MultiFrequencyUpdates(levels)]
        )

    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._updates: list[MultiFrequencyUpdates] = []  # the running fit's callbacks, registered in its step protocol
        self._ignored: list[tuple[str, Tensor]] = []  # the parameters left out of DDP, under their first name
        self._ignored_ids: set[int] = set()
        self._restore: Optional[tuple[Module, Any, list[Tensor]]] = None  # to undo the DDP ignore marks at teardown
        self._synced_inf: dict[int, Tensor] = {}  # per optimizer: the found-inf tensor already reduced

    @property
    def ignored_parameters(self) -> list[str]:
        """The names of the parameters left out of DDP in the running ``fit`` (each tensor once, under its first
        name); empty before ``fit`` wraps the model and after it ends."""
        return [n for n, _ in self._ignored]

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._updates = self._find_updates(trainer)
        super().setup(trainer)

    @staticmethod
    def _find_updates(trainer: pl.Trainer) -> list[MultiFrequencyUpdates]:
        # The callbacks' `setup` (which registers them) runs before the strategy's.
        updates = StepProtocol.of(trainer).participants(MultiFrequencyUpdates)
        if not updates:
            raise MisconfigurationException(
                "NestedDDPStrategy leaves the slow levels of MultiFrequencyUpdates out of DDP and all-reduces them"
                " when they update, so it needs that callback to know the levels, but the Trainer has no"
                " MultiFrequencyUpdates callback. Add one, e.g. `Trainer(strategy=NestedDDPStrategy(),"
                " callbacks=[MultiFrequencyUpdates([Level('slow', ['backbone.*'], every=8)])])`, or use"
                " strategy='ddp'."
            )
        return updates

    @override
    def _setup_model(self, model: Module) -> DistributedDataParallel:
        """Leave the slow levels' parameters out of DDP, broadcast them from rank 0, then wrap the model."""
        self._ignore_slow_levels(model)
        return super()._setup_model(model)

    def _ignore_slow_levels(self, model: Module) -> None:
        slow = {
            id(p): lvl.name
            for mfu in self._updates
            for lvl in mfu.book.levels
            if lvl.every > 1
            for _, p in mfu.book.params(lvl.name)
        }
        self._ignored = [(n, p) for n, p in model.named_parameters() if id(p) in slow]
        self._ignored_ids = {id(p) for _, p in self._ignored}
        if not self._ignored:
            rank_zero_warn(
                "NestedDDPStrategy: no MultiFrequencyUpdates level has every > 1, so every parameter stays in DDP and"
                " nothing is saved; use strategy='ddp', or give a level a period."
            )
            return
        previous = getattr(model, "_ddp_params_and_buffers_to_ignore", _UNSET)
        already = set(previous) if previous is not _UNSET and previous is not None else set()
        trainable = [(n, p) for n, p in self._ignored if p.requires_grad]
        if trainable and not any(
            p.requires_grad and id(p) not in slow and n not in already for n, p in model.named_parameters()
        ):
            # DDP refuses a module with nothing to all-reduce: keep the smallest slow tensor in it. Its gradients are
            # then averaged by DDP on every step, and the level's all-reduce averages equal values.
            name, keep = min(trainable, key=lambda np: np[1].numel())
            self._ignored = [(n, p) for n, p in self._ignored if p is not keep]
            self._ignored_ids.discard(id(keep))
            rank_zero_info(
                f"NestedDDPStrategy: every trainable parameter is in a level with every > 1, and DDP needs one to"
                f" all-reduce; {name!r} ({keep.numel():,} values) stays in DDP."
            )
        # DDP matches the names of every alias (tied weights), relative to the module it wraps.
        names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in self._ignored_ids}
        marked = [p for _, p in self._ignored if not hasattr(p, "_ddp_ignored")]
        self._restore = (model, previous, marked)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(already | names))
        self._broadcast_from_rank_zero([p for _, p in self._ignored])
        total = sum(p.numel() for _, p in self._ignored)
        rank_zero_info(
            f"NestedDDPStrategy: {len(self._ignored)} parameter tensors ({total:,} values) of the levels"
            f" {sorted(set(slow.values()))} are all-reduced when their level updates, not on every step."
        )

    @property
    def _group(self) -> Optional[Any]:
        """The process group DDP communicates in (``None``: the default group)."""
        group = self._ddp_kwargs.get("process_group")
        mesh = self._ddp_kwargs.get("device_mesh")
        return mesh.get_group() if group is None and mesh is not None else group

    def _broadcast_from_rank_zero(self, params: list[Tensor]) -> None:
        if not dist.is_available() or not dist.is_initialized():
            return
        group = self._group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.no_grad():
            for idx in _by_kind([(p.dtype, p.device) for p in params]).values():
                flat = torch.cat([params[i].detach().reshape(-1) for i in idx])
                dist.broadcast(flat, src=src, group=group)
                offset = 0
                for i in idx:
                    n = params[i].numel()
                    params[i].copy_(flat[offset : offset + n].view_as(params[i]))
                    offset += n

    # ------------------------------------------------------------------------------------------------ a step
    def reduce_level_gradients(
        self, level: str, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]
    ) -> list[Optional[Tensor]]:
        """Average a due level's chunk gradients over the processes: one all-reduce per level (and dtype).

        :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` passes it to
        :meth:`~nl_lightning.levels.LevelSet.prepare` (a :data:`~nl_lightning.levels.GradientReducer`); every process
        calls it for the same levels in the same order. The flat buffer carries one flag per parameter besides the
        gradients, so that a parameter without a gradient on some processes counts as zeros there, and as ``None``
        if it has none anywhere.

        Args:
            level: The level's name.
            params: The level's parameters.
            grads: For each parameter, its chunk gradient in the buffer dtype, or ``None``.

        Returns:
            For each parameter, the mean over processes (``None`` where no process had a gradient): views into the
            all-reduced buffer.

        """
        if not dist.is_available() or not dist.is_initialized():
            return list(grads)
        return self._mean_over_processes(params, grads)

    def _mean_over_processes(
        self, params: Sequence[Tensor], tensors: Sequence[Optional[Tensor]]
    ) -> list[Optional[Tensor]]:
        group = self._group
        world = dist.get_world_size(group)
        out: list[Optional[Tensor]] = [None] * len(params)
        kinds = _by_kind([(buffer_dtype(p.dtype), p.device) for p in params])
        for (dtype, device), idx in kinds.items():
            sizes = [params[i].numel() for i in idx]
            total = sum(sizes)
            flat = torch.zeros(total + len(idx), dtype=dtype, device=device)
            offset, missing, flags = 0, False, []
            for i, n in zip(idx, sizes, strict=True):
                t = tensors[i]
                if t is None:
                    missing = True
                else:
                    flat[offset : offset + n].copy_(t.reshape(-1))
                offset += n
                flags.append(0.0 if t is None else 1.0)
            flat[total:] = torch.tensor(flags, dtype=dtype)
            dist.all_reduce(flat, group=group)
            values = flat[:total].div_(world)
            # Read the flags (a device sync) only when this process lacks a gradient: otherwise all are present.
            present = flat[total:].tolist() if missing else [1.0] * len(idx)
            offset = 0
            for i, n, count in zip(idx, sizes, present, strict=True):
                if count > 0:
                    out[i] = values[offset : offset + n].view_as(params[i])
                offset += n
        return out

    def sync_found_inf(self, optimizer: Any) -> None:
        """Make a ``GradScaler``'s found-inf flags of ``optimizer`` the maximum over processes (one scalar all-reduce).

        The scaler skips the step of an optimizer whose unscaled gradients are not finite. The gradients of the slow
        levels are local to each process, so one process may find an inf the others do not: after this call every
        process skips the same steps. :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` calls it when it prepares
        a step, after Lightning unscaled the gradients; it does nothing without a scaler, before unscaling, for an
        optimizer that holds no slow parameter, or a second time for the same unscaling.

        Args:
            optimizer: The optimizer about to step (a ``LightningOptimizer`` is unwrapped).

        """
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or not self._ignored_ids:
            return
        if not dist.is_available() or not dist.is_initialized():
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if not any(id(p) in self._ignored_ids for g in optimizer.param_groups for p in g["params"]):
            return
        state = scaler._per_optimizer_states.get(id(optimizer))
        if state is None or state["stage"] is not OptState.UNSCALED or not state["found_inf_per_device"]:
            return
        found = list(state["found_inf_per_device"].values())
        if self._synced_inf.get(id(optimizer)) is found[0]:
            return
        flag = torch.stack([f.reshape(()).to(found[0].device) for f in found]).amax()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        for f in found:
            f.copy_(flag)
        self._synced_inf[id(optimizer)] = found[0]

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Average the slow levels' buffers over processes in ``checkpoint``, then save it (rank 0 writes).

        Lightning calls it on every process; the buffers of the running callbacks are not touched (the checkpoint
        gets copies).
        """
        self._average_level_buffers(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _average_level_buffers(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks")
        if not states or not dist.is_available() or not dist.is_initialized():
            return
        for mfu in self._updates:
            if mfu._book is None:
                continue
            state = states.get(mfu.state_key)
            if not isinstance(state, dict) or "levels" not in state:
                continue
            for lvl in mfu.book.levels:
                saved = state["levels"].get(lvl.name)
                if lvl.every == 1 or saved is None:
                    continue
                names = [n for n, _ in mfu.book.params(lvl.name)]
                params = [p for _, p in mfu.book.params(lvl.name)]
                mean = self._mean_over_processes(params, [saved["buffers"].get(n) for n in names])
                saved["buffers"] = {n: t.clone() for n, t in sorted(zip(names, mean, strict=True)) if t is not None}

    # ------------------------------------------------------------------------------------------------ tear-down
    @override
    def teardown(self) -> None:
        if self._restore is not None:
            model, previous, marked = self._restore
            if previous is _UNSET:
                if hasattr(model, "_ddp_params_and_buffers_to_ignore"):
                    del model._ddp_params_and_buffers_to_ignore
            else:
                model._ddp_params_and_buffers_to_ignore = previous
            for p in marked:
                if hasattr(p, "_ddp_ignored"):
                    del p._ddp_ignored
            self._restore = None
        self._ignored, self._ignored_ids = [], set()
        self._synced_inf.clear()
        super().teardown()


def _by_kind(kinds: Sequence[tuple[torch.dtype, torch.device]]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """The indices of ``kinds`` grouped by (dtype, device), in first-seen order."""
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, kind in enumerate(kinds):
        out.setdefault(kind, []).append(i)
    return out
