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
Synthetic Recall Tasks
^^^^^^^^^^^^^^^^^^^^^^

Generated sequence tasks that test in-context memory, with evaluation at longer lengths than training: multi-query
associative recall (MQAR; Arora et al. 2023, "Zoology") and a key-value needle in a haystack (passkey retrieval,
after RULER S-NIAH, Hsieh et al. 2024, and Titans Table 2, Behrouz et al. 2024). Nothing is downloaded; every sample
is a function of the seed.

**Batch format** (as for text, see :class:`~nl_lightning.models.lm.CausalLM`): ``{"tokens": LongTensor (B, T),
"targets": LongTensor (B, T)}``. Each sample is one generated sequence ``s`` of ``T + 1`` tokens with ``tokens =
s[:-1]``; ``targets[t] = s[t + 1]`` at the scored positions and ``-100`` everywhere else (ignored by the loss and the
accuracy).

**Vocabulary layout** (``V = vocab_size``, ``half = V // 2``): token ``0`` is reserved (the needle's marker; unused
by MQAR), keys are ``1 .. half - 1`` and values ``half .. V - 1``, as in Zoology.

**MQAR** (:class:`MQARDataset`): ``s = k_1 v_1 k_2 v_2 ... k_n v_n | filler | k_{p(1)} v_{p(1)} ... k_{p(q)} v_{p(q)}``.
The ``n`` keys of a sample are distinct, and so are its values; the filler is uniform random *value* tokens, so a key
token never occurs outside the pairs and the queries; the ``q`` queries ask distinct keys in a random order ``p`` and
fill the end of the sequence; the target at each query key is its value (teacher forcing: the value is also the next
input token). At evaluation length ``m T`` the number of pairs and queries stays the same and the filler grows, so the
multiplier adds *distance* between the pairs and the queries (our choice: scaling the pairs instead would outgrow the
key range of small vocabularies).

**Needle** (:class:`NeedleDataset`): ``s`` is uniform random filler from ``1 .. V - 1`` (never the marker), with the
needle ``0 key value`` starting at position ``round(depth (T - 5))`` (``depth`` in ``[0, 1]``: 0 is the first token, 1
puts the needle right before the query) and the query ``0 key`` as the last two tokens; the single scored target, at
the last position, is ``value``. Training depths are uniform random; the evaluation sets spread their depths uniformly
over ``[0, 1]`` (``torch.linspace``), recorded in ``depths``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from nl_lightning._validation import check_int, is_int
from nl_lightning.data.sampling import EpochShuffleSampler

__all__ = ["MQARDataModule", "MQARDataset", "NeedleDataModule", "NeedleDataset"]

IGNORE_INDEX = -100
MARKER = 0


def _mix(seed: int, split: int, multiplier: int) -> int:
    """A separate seed for each (seed, split, length multiplier)."""
    return (seed * 1_000_003 + split * 10_007 + multiplier) % 2**63


def _random_subset(batch: int, low: int, high: int, size: int, g: torch.Generator) -> Tensor:
    """``size`` distinct integers from ``[low, high)`` per row, in random order: ``(batch, size)``."""
    return torch.rand(batch, high - low, generator=g).argsort(dim=1)[:, :size] + low


class _TaskDataset(Dataset):
    tokens: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"tokens": self.tokens[index], "targets": self.targets[index]}


class MQARDataset(_TaskDataset):
    """Multi-query associative recall samples (see the module docstring for the layout), generated at construction.

    Args:
        num_samples: Number of sequences.
        seq_len: Tokens per sequence ``T``.
        num_pairs: Key-value pairs ``n`` per sequence, at most ``V // 2 - 1`` (distinct keys) and ``V - V // 2``
            (distinct values).
        vocab_size: ``V``, ``>= 4``.
        num_queries: Queries ``q`` per sequence, ``1 <= q <= n``; ``None`` queries every key once.
        seed: Seed of the generator; the samples depend on it only.

    Attributes:
        tokens: ``int64`` ``(num_samples, T)``.
        targets: ``int64`` ``(num_samples, T)``, the value at the ``q`` query positions, ``-100`` elsewhere.
        keys, values: ``int64`` ``(num_samples, n)``, the pairs in sequence order.

    Raises:
        ValueError: If a size is out of range, or ``2 n + 2 q > T + 1`` (the pairs and queries do not fit).

    Example::

        data = MQARDataset(1000, seq_len=64, num_pairs=8, vocab_size=64)
        data[0]["tokens"][:4]  # k_1 v_1 k_2 v_2

    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int = 64,
        num_pairs: int = 8,
        vocab_size: int = 64,
        num_queries: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        num_queries = num_pairs if num_queries is None else num_queries
        _check_mqar(num_samples, seq_len, num_pairs, vocab_size, num_queries)
        check_int("seed", seed, None)
        g = torch.Generator().manual_seed(seed)
        n, q, half, length = num_pairs, num_queries, vocab_size // 2, seq_len + 1
        keys = _random_subset(num_samples, 1, half, n, g)  # (N, n), distinct per row
        values = _random_subset(num_samples, half, vocab_size, n, g)  # (N, n), distinct per row
        seq = torch.randint(half, vocab_size, (num_samples, length), generator=g)  # filler: value tokens only
        seq[:, 0 : 2 * n : 2], seq[:, 1 : 2 * n : 2] = keys, values
        asked = torch.rand(num_samples, n, generator=g).argsort(dim=1)[:, :q]  # (N, q) distinct pair indices
        start = length - 2 * q
        seq[:, start::2], seq[:, start + 1 :: 2] = keys.gather(1, asked), values.gather(1, asked)
        self.tokens = seq[:, :-1].contiguous()
        self.targets = torch.full_like(self.tokens, IGNORE_INDEX)
        self.targets[:, start::2] = values.gather(1, asked)  # at each query key: its value
        self.keys, self.values = keys, values
        self.seq_len, self.num_pairs, self.num_queries, self.vocab_size = seq_len, n, q, vocab_size


def _check_mqar(num_samples: int, seq_len: int, num_pairs: int, vocab_size: int, num_queries: int) -> None:
    check_int("num_samples", num_samples, 1)
    check_int("seq_len", seq_len, 1)
    check_int("vocab_size", vocab_size, 4)
    half = vocab_size // 2
    check_int("num_pairs", num_pairs, 1)
    if num_pairs > min(half - 1, vocab_size - half):
        raise ValueError(
            f"`num_pairs`={num_pairs} needs that many distinct keys (1..{half - 1}) and values"
            f" ({half}..{vocab_size - 1}); use num_pairs <= {min(half - 1, vocab_size - half)} or a larger vocab."
        )
    check_int("num_queries", num_queries, 1, num_pairs, hint="at most num_pairs, or None for num_pairs")
    if 2 * (num_pairs + num_queries) > seq_len + 1:
        raise ValueError(
            f"{num_pairs} pairs and {num_queries} queries need seq_len >= {2 * (num_pairs + num_queries) - 1}, got"
            f" {seq_len}; raise `seq_len` or lower `num_pairs` / `num_queries`."
        )


class NeedleDataset(_TaskDataset):
    """Key-value needle-in-a-haystack samples (see the module docstring for the layout), generated at construction.

    Args:
        num_samples: Number of sequences.
        seq_len: Tokens per sequence ``T``, ``>= 5``.
        vocab_size: ``V``, ``>= 4``.
        depths: Needle depth of each sample in ``[0, 1]`` (``num_samples`` values); ``None`` draws them uniformly.
        seed: Seed of the generator; the samples depend on it (and on ``depths``) only.

    Attributes:
        tokens: ``int64`` ``(num_samples, T)``.
        targets: ``int64`` ``(num_samples, T)``: the value at the last position, ``-100`` elsewhere.
        depths: ``float`` ``(num_samples,)``, the requested depths.
        positions: ``int64`` ``(num_samples,)``, the index of the needle's marker.

    Raises:
        ValueError: If a size is out of range or ``depths`` has the wrong length or values outside ``[0, 1]``.

    Example::

        data = NeedleDataset(100, seq_len=256, depths=torch.linspace(0, 1, 100))
        data[0]["tokens"][-2:]  # marker, key

    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int = 128,
        vocab_size: int = 64,
        depths: Optional[Union[Sequence[float], Tensor]] = None,
        seed: int = 0,
    ) -> None:
        check_int("num_samples", num_samples, 1)
        check_int("seq_len", seq_len, 5)
        check_int("vocab_size", vocab_size, 4)
        check_int("seed", seed, None)
        g = torch.Generator().manual_seed(seed)
        if depths is None:
            depths = torch.rand(num_samples, generator=g, dtype=torch.float64)
        depths = torch.as_tensor(depths, dtype=torch.float64)
        if depths.shape != (num_samples,) or not bool(((depths >= 0) & (depths <= 1)).all()):
            raise ValueError(f"`depths` must hold {num_samples} values in [0, 1], got shape {tuple(depths.shape)}.")
        half, length = vocab_size // 2, seq_len + 1
        seq = torch.randint(1, vocab_size, (num_samples, length), generator=g)  # filler: anything but the marker
        key = torch.randint(1, half, (num_samples,), generator=g)
        value = torch.randint(half, vocab_size, (num_samples,), generator=g)
        pos = torch.round(depths * (length - 6)).long()  # the needle ends before the query's marker at length - 3
        rows = torch.arange(num_samples)
        seq[rows, pos], seq[rows, pos + 1], seq[rows, pos + 2] = MARKER, key, value
        seq[:, -3], seq[:, -2], seq[:, -1] = MARKER, key, value
        self.tokens = seq[:, :-1].contiguous()
        self.targets = torch.full_like(self.tokens, IGNORE_INDEX)
        self.targets[:, -1] = value
        self.depths, self.positions = depths, pos
        self.seq_len, self.vocab_size = seq_len, vocab_size


class _SeededLoaders(pl.LightningDataModule):
    """The loaders of a data module whose ``setup`` builds ``train_set`` and ``val_sets`` from ``seed``: training
    shuffled by ``(seed, epoch)`` (resumes are exact), one evaluation loader per set."""

    seed: int
    batch_size: int
    train_set: Optional[Dataset] = None
    val_sets: list[Dataset]

    def _check_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call `setup()` (the Trainer does) before asking for data.")

    @override
    def train_dataloader(self) -> DataLoader:
        self._check_setup()
        seed = _mix(self.seed, 2, 0)
        sampler = EpochShuffleSampler(len(self.train_set), seed)  # epoch e's order depends on (seed, e) only
        g = torch.Generator().manual_seed(seed)  # the loader's own draws stay off the global generator
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, generator=g)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation length (``eval_lengths``), in order."""
        self._check_setup()
        return [DataLoader(ds, batch_size=self.batch_size, shuffle=False) for ds in self.val_sets]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


class _SyntheticDataModule(_SeededLoaders):
    """Loaders shared by the synthetic tasks: a training set shuffled by ``(seed, epoch)`` and one evaluation set per
    length multiplier."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        batch_size: int,
        train_samples: int,
        val_samples: int,
        eval_multipliers: Sequence[int],
        seed: int,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("train_samples", train_samples, 1)
        check_int("val_samples", val_samples, 1)
        multipliers = list(eval_multipliers)
        if (
            not multipliers
            or any(not is_int(m) or m < 1 for m in multipliers)
            or len(set(multipliers)) != len(multipliers)
        ):
            raise ValueError(f"`eval_multipliers` must be distinct integers >= 1, got {list(eval_multipliers)!r}.")
        check_int("seed", seed, None)
        self.seq_len, self.vocab_size, self.batch_size = seq_len, vocab_size, batch_size
        self.train_samples, self.val_samples, self.seed = train_samples, val_samples, seed
        self.eval_multipliers = multipliers
        #: Sequence length of each evaluation loader, in loader order (CausalLM names its metrics after them).
        self.eval_lengths = [seq_len * m for m in multipliers]
        self.train_set: Optional[Dataset] = None
        self.val_sets: list[Dataset] = []

    def _make(self, num_samples: int, seq_len: int, seed: int, evaluation: bool) -> Dataset:
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._make(self.train_samples, self.seq_len, _mix(self.seed, 0, 1), evaluation=False)
        self.val_sets = [
            self._make(self.val_samples, self.seq_len * m, _mix(self.seed, 1, m), evaluation=True)
            for m in self.eval_multipliers
        ]


class MQARDataModule(_SyntheticDataModule):
    """Multi-query associative recall (Zoology) with evaluation at several lengths.

    Training: ``train_samples`` sequences of ``seq_len`` tokens, shuffled by ``(seed, epoch)`` (an
    :class:`~nl_lightning.data.sampling.EpochShuffleSampler`, so a resumed run keeps the order). Evaluation: one
    loader of ``val_samples`` sequences per multiplier ``m``, of length ``m * seq_len`` with the same numbers of pairs
    and queries (longer filler, so more distance to recall over). All sets are distinct, fixed functions of ``seed``.
    Batches are ``{"tokens", "targets"}``; the metric of the query positions is the recall accuracy.

    Args:
        num_pairs: Key-value pairs per sequence.
        seq_len: Training length ``T``.
        vocab_size: ``V``: keys ``1 .. V//2 - 1``, values ``V//2 .. V - 1``.
        num_queries: Queries per sequence (``None``: every key once).
        batch_size: Samples per batch.
        train_samples: Training sequences.
        val_samples: Sequences per evaluation length.
        eval_multipliers: Distinct length multipliers of the evaluation loaders.
        seed: Seed of every set.

    Attributes:
        vocab_size: ``V``.
        eval_lengths: ``[m * seq_len for m in eval_multipliers]``, the length of each val / test loader.

    Raises:
        ValueError: On out-of-range sizes (see :class:`MQARDataset`) or multipliers that are not distinct integers
            ``>= 1``.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.models.transformer import TransformerPP

        dm = MQARDataModule(num_pairs=8, seq_len=64, vocab_size=64)
        model = TransformerPP(vocab_size=dm.vocab_size, dim=64, depth=2)
        Trainer(max_epochs=5).fit(model, datamodule=dm)  # logs val_acc_len64, val_acc_len128, val_acc_len256

    """

    def __init__(
        self,
        num_pairs: int = 8,
        seq_len: int = 64,
        vocab_size: int = 64,
        num_queries: Optional[int] = None,
        batch_size: int = 32,
        train_samples: int = 10000,
        val_samples: int = 500,
        eval_multipliers: Sequence[int] = (1, 2, 4),
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len, vocab_size, batch_size, train_samples, val_samples, eval_multipliers, seed)
        self.num_pairs = num_pairs
        self.num_queries = num_pairs if num_queries is None else num_queries
        _check_mqar(1, seq_len, num_pairs, vocab_size, self.num_queries)
        self.save_hyperparameters()

    def _make(self, num_samples: int, seq_len: int, seed: int, evaluation: bool) -> MQARDataset:
        return MQARDataset(num_samples, seq_len, self.num_pairs, self.vocab_size, self.num_queries, seed)


class NeedleDataModule(_SyntheticDataModule):
    """Key-value needle in a haystack, evaluated at several lengths with depths spread uniformly over ``[0, 1]``.

    Training: ``train_samples`` sequences of ``seq_len`` tokens with uniform random needle depths, shuffled by
    ``(seed, epoch)`` (an :class:`~nl_lightning.data.sampling.EpochShuffleSampler`). Evaluation: one loader per
    multiplier ``m`` of ``val_samples`` sequences of length ``m * seq_len``, sample ``i`` at depth
    ``i / (val_samples - 1)`` (its dataset's ``depths``). The only target of a sequence, at its last position, is the
    needle's value, so ``val_acc`` is the exact-match retrieval rate.

    Args:
        seq_len: Training length ``T``, ``>= 5``.
        vocab_size: ``V``: marker ``0``, keys ``1 .. V//2 - 1``, values ``V//2 .. V - 1``.
        batch_size: Samples per batch.
        train_samples: Training sequences.
        val_samples: Sequences per evaluation length.
        eval_multipliers: Distinct length multipliers of the evaluation loaders.
        seed: Seed of every set.

    Attributes:
        vocab_size: ``V``.
        eval_lengths: ``[m * seq_len for m in eval_multipliers]``, the length of each val / test loader.

    Raises:
        ValueError: On ``seq_len < 5``, ``vocab_size < 4``, non-positive sizes, or bad multipliers.

    Example::

        dm = NeedleDataModule(seq_len=128, eval_multipliers=(1, 4, 16))
        dm.setup("validate")
        dm.val_sets[2].depths[:3]  # tensor([0.0000, 0.0020, 0.0040], dtype=torch.float64)

    """

    def __init__(
        self,
        seq_len: int = 128,
        vocab_size: int = 64,
        batch_size: int = 32,
        train_samples: int = 10000,
        val_samples: int = 500,
        eval_multipliers: Sequence[int] = (1, 2, 4),
        seed: int = 0,
    ) -> None:
        check_int("seq_len", seq_len, 5)
        check_int("vocab_size", vocab_size, 4)
        super().__init__(seq_len, vocab_size, batch_size, train_samples, val_samples, eval_multipliers, seed)
        self.save_hyperparameters()

    def _make(self, num_samples: int, seq_len: int, seed: int, evaluation: bool) -> NeedleDataset:
        depths = torch.linspace(0, 1, num_samples, dtype=torch.float64) if evaluation else None
        return NeedleDataset(num_samples, seq_len, self.vocab_size, depths, seed)
