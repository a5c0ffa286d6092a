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
Epoch-Seeded Shuffling
^^^^^^^^^^^^^^^^^^^^^^

:class:`EpochShuffleSampler` gives every epoch its own permutation, a function of ``(seed, epoch)`` only. A
``DataLoader(shuffle=True, generator=...)`` instead draws each epoch's permutation from one generator that advances
from epoch to epoch (and with every iterator the loader creates); a resumed run builds a fresh loader whose generator
starts over, so it replays epoch 0's order. With this sampler a run resumed at epoch ``e`` sees exactly the order an
uninterrupted run sees at epoch ``e``: Lightning calls :meth:`~EpochShuffleSampler.set_epoch` on the training loader's
sampler at the start of every epoch, after a resume too (and forwards it through its distributed sampler wrapper).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from nl_lightning._validation import check_int

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` per epoch; epoch ``e``'s depends on ``(seed, e)`` only.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for a ``DistributedSampler``), also after a
    resume, so a resumed run continues with the order the uninterrupted run would have used. In a plain loop, call it
    yourself, or every epoch repeats epoch 0's order. The sampler runs in the main process, so the order is the same
    with any ``num_workers``, and it never touches the global random generator.

    Args:
        num_samples: The dataset's length, ``>= 1``.
        seed: The seed of the permutations, an integer.

    Raises:
        ValueError: If ``num_samples < 1`` or ``seed`` is not an integer.

    Example::

        sampler = EpochShuffleSampler(len(train), seed=0)
        loader = DataLoader(train, batch_size=32, sampler=sampler)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader: ...

    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        check_int("num_samples", num_samples)
        check_int("seed", seed, None)
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch ``epoch``'s permutation.

        Raises:
            ValueError: If ``epoch`` is not an integer ``>= 0``.
        """
        check_int("epoch", epoch, 0)
        self.epoch = epoch

    def indices(self) -> Tensor:
        """This epoch's permutation, ``int64`` ``(num_samples,)``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
