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
A Needle in Ordinary Text
^^^^^^^^^^^^^^^^^^^^^^^^^

A key-value fact hidden in byte-level text (vocabulary 256, see :mod:`nl_lightning.data.text`) and asked for at the
end, to test whether a model's memory carries the fact over a long stream (passkey retrieval, after RULER S-NIAH,
Hsieh et al. 2024, and Titans Table 2, Behrouz et al. 2024, with ordinary text as the haystack instead of random
tokens). Nothing is downloaded; every sample is a function of the corpus and the seed.

**Layout.** A sample is a sequence ``s`` of ``T + 1`` bytes with ``tokens = s[:-1]`` (batch format of
:class:`~nl_lightning.models.lm.CausalLM`): a contiguous crop of the corpus with the *fact*
``MARKER key SEPARATOR value`` inserted at byte ``p``, followed by the *query* ``MARKER key SEPARATOR value``:

.. code-block:: text

    text[:p]  M k1 k2 S v1 v2 v3 v4  text[p:]  M k1 k2 S v1 v2 v3 v4
              |------- fact -------|  distance |------ query -------|

``MARKER`` (``M``) is the NUL byte and ``SEPARATOR`` (``S``) the byte 1 (SOH), control bytes that do not occur in
text (the datasets check that both are absent from the corpus and raise otherwise), so the fact and the query are the
only places they appear; the ``key_len`` key bytes and ``value_len`` value bytes are drawn uniformly from the 62 ASCII
letters and digits, afresh for every sample. With one fact per sample the value is the bytes after the only other
separator, so the task measures whether the fact survives the distance, not the matching of keys among several. The
scored targets are the value bytes of the query (teacher forcing: at the query's separator the target is ``v1``, at
``v1`` it is ``v2``, ...), ``-100`` everywhere else, so the text itself is never a target and ``val_acc`` is the
per-byte retrieval accuracy (chance 1/62 for a model that has learned the alphabet). The *distance* is the number of
text bytes between the end of the fact and the query's marker.

**Training and evaluation.** Training samples are short (``seq_len`` tokens) with the fact at a uniform random
position, so that the distance ranges from 0 to ``seq_len + 1 - 2 F`` (``F = key_len + value_len + 2``, the fact's
length). Evaluation streams place the fact after ``lead`` bytes of text and the query after ``distance`` more bytes:
a stream of :func:`stream_length` tokens. The text of every sample, training or evaluation, is a random crop of the
whole corpus: no byte of it is scored, and the fact of each sample is new, so what transfers between samples is the
format, not the facts.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from nl_lightning._validation import check_int, is_int
from nl_lightning.data.synthetic import _mix, _SeededLoaders
from nl_lightning.data.text import VOCAB_SIZE, _as_paths, load_corpus

__all__ = [
    "ALPHABET",
    "MARKER",
    "SEPARATOR",
    "TextNeedleDataModule",
    "TextNeedleDataset",
    "fact_length",
    "stream_length",
]

IGNORE_INDEX = -100
#: The byte that opens the fact and the query; it never occurs in the corpus (checked).
MARKER = 0
#: The byte between the key and the value; it never occurs in the corpus either (checked).
SEPARATOR = 1
#: The bytes keys and values are drawn from (ASCII letters and digits).
ALPHABET = torch.tensor(list((string.ascii_letters + string.digits).encode("ascii")), dtype=torch.long)


def fact_length(key_len: int, value_len: int) -> int:
    """Bytes of the fact (and of the query with its value): marker, key, separator, value.

    Example::

        fact_length(2, 4)  # 8

    """
    return key_len + value_len + 2


def stream_length(distance: int, key_len: int = 2, value_len: int = 4, lead: int = 64) -> int:
    """Tokens ``T`` of an evaluation stream: ``lead`` text bytes, the fact, ``distance`` text bytes, the query.

    Args:
        distance: Text bytes between the end of the fact and the query's marker.
        key_len: Key bytes.
        value_len: Value bytes.
        lead: Text bytes before the fact.

    Returns:
        ``lead + 2 F + distance - 1`` (the sequence holds ``T + 1`` bytes; ``F``: :func:`fact_length`).

    Example::

        stream_length(4096)  # 4175

    """
    return lead + 2 * fact_length(key_len, value_len) + distance - 1


def _as_text(text: Union[Tensor, bytes]) -> Tensor:
    if isinstance(text, (bytes, bytearray)):
        text = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    if text.dim() != 1:
        raise ValueError(f"`text` must be a 1-D tensor of bytes, got shape {tuple(text.shape)}.")
    for name, byte in (("marker", MARKER), ("separator", SEPARATOR)):
        if bool((text == byte).any()):
            where = int((text == byte).nonzero()[0, 0])
            raise ValueError(
                f"The corpus holds the {name} byte {byte} at byte {where}; the fact's marker and separator must not"
                f" occur in the haystack. Remove them from the text (e.g. `text[(text != {MARKER}) & (text !="
                f" {SEPARATOR})]`)."
            )
    return text


class TextNeedleDataset(Dataset):
    """Text samples with one key-value fact and its query at the end (see the module docstring), generated at
    construction.

    Give ``seq_len`` for training samples (the fact at a uniform random position) or ``distance`` for evaluation
    streams (the fact after ``lead`` text bytes, the query ``distance`` bytes after the fact; ``T`` is then
    :func:`stream_length`).

    Args:
        text: The corpus: a 1-D tensor of bytes or ``bytes``; it must contain neither :data:`MARKER` nor
            :data:`SEPARATOR`.
        num_samples: Number of sequences.
        seq_len: Tokens per training sequence ``T``, at least ``2 F - 1`` (``F``: :func:`fact_length`).
        distance: Text bytes between the fact and the query (evaluation streams), ``>= 0``.
        key_len: Key bytes, ``>= 1``.
        value_len: Value bytes (the scored targets), ``>= 1``.
        lead: Text bytes before the fact of an evaluation stream, ``>= 0``.
        seed: Seed of the generator; the samples depend on it and the corpus only.

    Attributes:
        tokens: ``int64`` ``(num_samples, T)``.
        targets: ``int64`` ``(num_samples, T)``: the value bytes at the last ``value_len`` positions, ``-100``
            elsewhere.
        keys: ``int64`` ``(num_samples, key_len)``.
        values: ``int64`` ``(num_samples, value_len)``.
        positions: ``int64`` ``(num_samples,)``, the index of the fact's marker in ``tokens``.
        distances: ``int64`` ``(num_samples,)``, text bytes between the end of the fact and the query's marker.

    Raises:
        ValueError: If both or neither of ``seq_len`` and ``distance`` are given, a size is out of range, the corpus
            holds the marker or the separator, or it is shorter than the text a sample needs.

    Example::

        data = TextNeedleDataset(load_corpus(), 4, distance=4096)
        decode(data.tokens[0, -7:])  # the query (marker, key, separator) and the first three value bytes

    """

    def __init__(
        self,
        text: Union[Tensor, bytes],
        num_samples: int,
        seq_len: Optional[int] = None,
        distance: Optional[int] = None,
        key_len: int = 2,
        value_len: int = 4,
        lead: int = 64,
        seed: int = 0,
    ) -> None:
        check_int("num_samples", num_samples, 1)
        check_int("key_len", key_len, 1)
        check_int("value_len", value_len, 1)
        check_int("lead", lead, 0)
        check_int("seed", seed, None)
        if (seq_len is None) == (distance is None):
            raise ValueError(
                f"Give exactly one of `seq_len` (training samples) and `distance` (evaluation streams), got"
                f" seq_len={seq_len!r}, distance={distance!r}."
            )
        size = fact_length(key_len, value_len)
        if distance is not None:
            check_int("distance", distance, 0)
            seq_len = stream_length(distance, key_len, value_len, lead)
        check_int("seq_len", seq_len, 2 * size - 1, hint="the fact and the query must fit")
        text = _as_text(text)
        crop = seq_len + 1 - 2 * size  # text bytes per sample
        if len(text) < crop:
            raise ValueError(
                f"A sample needs {crop} bytes of text, the corpus has {len(text)}; use a shorter `seq_len` /"
                " `distance` or more text."
            )
        g = torch.Generator().manual_seed(seed)
        keys = ALPHABET[torch.randint(len(ALPHABET), (num_samples, key_len), generator=g)]
        values = ALPHABET[torch.randint(len(ALPHABET), (num_samples, value_len), generator=g)]
        starts = torch.randint(len(text) - crop + 1, (num_samples,), generator=g)
        if distance is None:
            pos = torch.randint(crop + 1, (num_samples,), generator=g)
        else:
            pos = torch.full((num_samples,), crop - distance, dtype=torch.long)
        sep = torch.full((num_samples, 1), SEPARATOR, dtype=torch.long)
        marker = torch.full((num_samples, 1), MARKER, dtype=torch.long)
        facts = torch.cat([marker, keys, sep, values], dim=1)  # (N, F)
        seq = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
        for i in range(num_samples):
            s, p = int(starts[i]), int(pos[i])
            window = text[s : s + crop].long()
            seq[i] = torch.cat([window[:p], facts[i], window[p:], facts[i]])
        self.tokens = seq[:, :-1].contiguous()
        self.targets = torch.full_like(self.tokens, IGNORE_INDEX)
        self.targets[:, -value_len:] = values
        self.keys, self.values, self.positions, self.distances = keys, values, pos, crop - pos
        self.seq_len, self.key_len, self.value_len = seq_len, key_len, value_len

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"tokens": self.tokens[index], "targets": self.targets[index]}


class TextNeedleDataModule(_SeededLoaders):
    """A key-value fact in byte-level text, queried at the end: short training samples, evaluation at long distances.

    Training: ``train_samples`` sequences of ``seq_len`` tokens with the fact at a uniform random position, shuffled
    by ``(seed, epoch)`` (an :class:`~nl_lightning.data.sampling.EpochShuffleSampler`). Validation and test: one loader
    of ``val_samples`` such sequences, then one per entry of ``eval_distances``, each of ``val_samples`` streams with
    the fact after ``lead`` bytes and the query that many bytes later (:func:`stream_length` tokens). Every set is a
    distinct, fixed function of ``seed``; the text is random crops of the whole corpus (see the module docstring).
    ``val_acc`` is the per-byte accuracy on the value bytes.

    Args:
        paths: Text files, read as bytes and joined by blank lines; ``None`` for the standard library's doc topics
            (:func:`~nl_lightning.data.text.default_corpus`). The text must contain neither the NUL byte nor
            the byte 1.
        seq_len: Training length ``T``, at least ``2 F - 1``.
        key_len: Key bytes.
        value_len: Value bytes (scored).
        batch_size: Samples per batch.
        train_samples: Training sequences.
        val_samples: Sequences per evaluation set.
        eval_distances: Distinct distances (text bytes between fact and query) of the extra evaluation loaders.
        lead: Text bytes before the fact in the evaluation streams.
        seed: Seed of every set.

    Attributes:
        vocab_size: 256.
        eval_lengths: The sequence length of each val / test loader: ``seq_len``, then one per distance
            (CausalLM names its metrics after them, ``val_acc_len256``).

    Raises:
        ValueError: On out-of-range sizes, distances that are not distinct integers ``>= 0``, or (in ``setup``) a
            corpus that holds the marker or the separator, or is too short.
        FileNotFoundError: If a path is not a file (at construction).

    Example::

        dm = TextNeedleDataModule(seq_len=256, eval_distances=(1024,))
        dm.setup("fit")
        dm.eval_lengths  # [256, 1103]

    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        paths: Optional[Sequence[str]] = None,
        seq_len: int = 256,
        key_len: int = 2,
        value_len: int = 4,
        batch_size: int = 16,
        train_samples: int = 8000,
        val_samples: int = 128,
        eval_distances: Sequence[int] = (),
        lead: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("train_samples", train_samples), ("val_samples", val_samples)):
            check_int(name, value, 1)
        check_int("key_len", key_len, 1)
        check_int("value_len", value_len, 1)
        check_int("seq_len", seq_len, 2 * fact_length(key_len, value_len) - 1, hint="the fact and the query must fit")
        check_int("lead", lead, 0)
        check_int("seed", seed, None)
        distances = list(eval_distances)
        if any(not is_int(d) or d < 0 for d in distances) or len(set(distances)) != len(distances):
            raise ValueError(f"`eval_distances` must be distinct integers >= 0, got {list(eval_distances)!r}.")
        self.paths = None if paths is None else _as_paths(paths)  # fails early on a missing file
        self.save_hyperparameters()
        self.seq_len, self.key_len, self.value_len, self.lead = seq_len, key_len, value_len, lead
        self.batch_size, self.train_samples, self.val_samples, self.seed = batch_size, train_samples, val_samples, seed
        self.eval_distances = distances
        self.eval_lengths = [seq_len] + [stream_length(d, key_len, value_len, lead) for d in distances]
        self.corpus: Optional[Tensor] = None
        self.train_set: Optional[TextNeedleDataset] = None
        self.val_sets: list[TextNeedleDataset] = []

    def _make(self, num_samples: int, seed: int, distance: Optional[int] = None) -> TextNeedleDataset:
        seq_len = self.seq_len if distance is None else None
        lengths = {"key_len": self.key_len, "value_len": self.value_len, "lead": self.lead}
        return TextNeedleDataset(self.corpus, num_samples, seq_len, distance, **lengths, seed=seed)

    def stream(self, distance: int, num_samples: Optional[int] = None, index: int = 0) -> TextNeedleDataset:
        """An evaluation set of streams at ``distance`` (needs ``setup``), the same as the loader of that distance
        for ``index=0``; another ``index`` gives another set (e.g. one per evaluation seed).

        Args:
            distance: Text bytes between the fact and the query.
            num_samples: Streams (``None``: ``val_samples``).
            index: Which set of that distance.

        Returns:
            The dataset.

        """
        self._check_setup()
        return self._make(num_samples or self.val_samples, _mix(self.seed, 3 + index, distance), distance)

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        self.corpus = _as_text(load_corpus(self.paths))
        self.train_set = self._make(self.train_samples, _mix(self.seed, 0, 0))
        self.val_sets = [self._make(self.val_samples, _mix(self.seed, 1, 0))]
        self.val_sets += [self.stream(d) for d in self.eval_distances]
