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
Experience Replay
^^^^^^^^^^^^^^^^^

The strongest simple baseline of continual learning (e.g. Chaudhry et al., 2019, "On Tiny Episodic Memories"): keep
a small uniform sample of everything seen so far and mix it into every new batch.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from nl_lightning._validation import is_int
from nl_lightning.callbacks._state import ConfiguredStateKey

__all__ = ["ExperienceReplay", "Reservoir"]


class Reservoir:
    """A bounded buffer holding a uniform sample of a stream of batches (Vitter's algorithm R).

    After ``n`` items have been offered, each of them is in the buffer with probability ``min(1, capacity / n)``.

    Args:
        capacity: The most items kept.
        seed: Seeds the generator that decides replacements and draws replay samples.

    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.fields: list[Tensor] = []  # one tensor per batch field, (capacity, ...)
        self.size = 0
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, fields: list[Tensor]) -> None:
        """Offer a batch: ``fields`` are tensors sharing their first (batch) dimension."""
        if not self.fields:
            self.fields = [torch.empty((self.capacity, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in fields]
        n = len(fields[0])
        fill = min(n, self.capacity - self.size)  # while not full, items take the next free slots
        for buf, f in zip(self.fields, fields, strict=True):
            buf[self.size : self.size + fill] = f[:fill]
        self.size += fill
        # Item i (0-based over the whole stream) replaces slot j ~ U{0..i} when j < capacity.
        offered = self.seen + fill + torch.arange(n - fill, dtype=torch.float64)
        slots = (torch.rand(n - fill, generator=self.generator, dtype=torch.float64) * (offered + 1)).floor().long()
        for i in torch.nonzero(slots < self.capacity).flatten().tolist():
            for buf, f in zip(self.fields, fields, strict=True):
                buf[slots[i]] = f[fill + i]
        self.seen += n

    def sample(self, n: int) -> list[Tensor]:
        """``n`` distinct items drawn uniformly from the buffer (fewer if it holds fewer)."""
        idx = torch.randperm(self.size, generator=self.generator)[:n].to(self.fields[0].device)
        return [buf[idx] for buf in self.fields]

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive ddp_spawn's shared-memory pickling: send its state as plain bytes.
        return {**self.__dict__, "generator": self.generator.get_state().numpy().tobytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "generator": generator})

    def state_dict(self) -> dict[str, Any]:
        return {"fields": [f[: self.size] for f in self.fields], "seen": self.seen,
                "generator": self.generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        saved = state["fields"]
        self.size, self.seen = int(saved[0].shape[0]) if saved else 0, int(state["seen"])
        self.fields = [torch.empty((self.capacity, *f.shape[1:]), dtype=f.dtype, device=device) for f in saved]
        for buf, f in zip(self.fields, saved, strict=True):
            buf[: self.size] = f.to(device)
        self.generator.set_state(state["generator"])


class ExperienceReplay(ConfiguredStateKey, Callback):
    """Mix a uniform sample of past training data into every batch, for any LightningModule.

    A :class:`Reservoir` of ``buffer_size`` samples keeps a uniform sample of all training samples seen so far
    (reservoir sampling: bounded memory, no task boundaries needed). Before each training batch,
    ``replay_batch_size`` stored samples are appended to it in place (every field: inputs, labels, task ids), so the
    ``training_step`` sees new and old data together; after the batch, its new samples are offered to the reservoir.
    Batches must be lists of tensors sharing the batch dimension (what a ``DataLoader`` yields for tuple samples),
    or dicts of such tensors. Under DDP each rank keeps its own reservoir of its own shard. The buffer is
    checkpointed under a key that names ``buffer_size``, ``replay_batch_size`` and ``seed`` (a checkpoint written with
    the former key, the class name, still loads).

    Args:
        buffer_size: Samples kept (``>= 1``).
        replay_batch_size: Stored samples added to each batch; default: as many as the batch holds.
        seed: Seeds the reservoir's generator (offset by the global rank under DDP); ``None`` (default) takes the
            seed of ``seed_everything`` (``PL_GLOBAL_SEED``), or 0 without one.

    Raises:
        MisconfigurationException: On ``buffer_size < 1`` or ``replay_batch_size < 1``; on the first batch, if it is
            not a list or dict of tensors.

    Example::

        trainer = Trainer(callbacks=[ExperienceReplay(buffer_size=500)], ...)

    """

    method_tag = "replay"  # the name ContinualEvaluation gives this callback in a method's name

    def __init__(
        self, buffer_size: int = 200, replay_batch_size: Optional[int] = None, seed: Optional[int] = None
    ) -> None:
        if not is_int(buffer_size) or buffer_size < 1:
            raise MisconfigurationException(f"`buffer_size` must be an integer >= 1, got {buffer_size!r}.")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise MisconfigurationException(f"`replay_batch_size` must be >= 1 or None, got {replay_batch_size!r}.")
        self.buffer_size, self.replay_batch_size, self.seed = buffer_size, replay_batch_size, seed
        self.reservoir = Reservoir(buffer_size, seed or 0)
        self._loaded: Optional[dict[str, Any]] = None
        self._num_new = 0

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``buffer_size``, ``replay_batch_size`` and ``seed``."""
        return {"buffer_size": self.buffer_size, "replay_batch_size": self.replay_batch_size, "seed": self.seed}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.reservoir.seen == 0:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            self.reservoir = Reservoir(self.buffer_size, seed + trainer.global_rank)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            self.reservoir.load_state_dict(self._loaded, pl_module.device)
            self._loaded = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        keys, fields = _fields(batch)
        self._num_new = len(fields[0])
        if self.reservoir.size == 0:
            return
        old = self.reservoir.sample(self.replay_batch_size or self._num_new)
        for key, new, past in zip(keys, fields, old, strict=True):
            batch[key] = torch.cat([new, past.to(new.device)])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _, fields = _fields(batch)
        self.reservoir.add([f[: self._num_new].detach() for f in fields])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, **self.reservoir.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict


def _fields(batch: Any) -> tuple[list[Any], list[Tensor]]:
    if isinstance(batch, list) and batch and all(isinstance(f, Tensor) for f in batch):
        return list(range(len(batch))), batch
    if isinstance(batch, dict) and batch and all(isinstance(f, Tensor) for f in batch.values()):
        return list(batch), list(batch.values())
    raise MisconfigurationException(
        f"ExperienceReplay mixes stored samples into the batch in place, so the batch must be a list or dict of tensors"
        f" sharing their first dimension; got {type(batch).__name__}. Return tuples from your Dataset (the default"
        " collate turns them into lists) or a dict."
    )
