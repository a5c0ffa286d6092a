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
Byte-Level Text
^^^^^^^^^^^^^^^

Byte-level language-modelling data: every UTF-8 byte is a token (vocabulary 256), so no tokenizer is downloaded and
the loss in nats divided by :math:`\ln 2` is bits per byte.

**Batch format** (shared by every causal LM of nl_lightning, see :class:`~nl_lightning.models.lm.CausalLM`): a dict
``{"tokens": LongTensor (B, T), "targets": LongTensor (B, T)}`` where ``targets[:, t]`` is the token that follows
``tokens[:, :t + 1]``. For text, ``targets`` is ``tokens`` shifted by one: both come from one window of ``T + 1``
bytes. (``-100`` marks positions without a target; text has none.)

**Default corpus.** With ``paths=None`` the corpus is the standard library's ``pydoc_data.topics.topics`` (the help
texts of ``help("topics")``), its values joined in sorted-key order with blank lines: 79 topics, 466,273 bytes of
UTF-8 on Python 3.11.7. The exact size varies with the Python version; it needs nothing installed or downloaded.

**Splits.** The first ``1 - val_fraction`` of the bytes train, the rest (the tail) validates and tests, so the two
never share a byte. Training draws ``samples_per_epoch`` random crops of ``T + 1`` bytes per epoch from the head
(:class:`RandomCropSampler`, seeded by ``(seed, epoch)``); validation and test read the tail as contiguous
non-overlapping windows (:class:`TextDataset` with ``stride = T``: window ``i`` holds tokens
``tail[i T : (i + 1) T]`` and its targets ``tail[i T + 1 : (i + 1) T + 1]``), so every held-out byte after the first
is predicted exactly once, up to the last partial window, which is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from nl_lightning._validation import check_float, check_int

__all__ = [
    "RandomCropSampler",
    "TextDataModule",
    "TextDataset",
    "decode",
    "default_corpus",
    "encode",
    "load_corpus",
]

VOCAB_SIZE = 256


def default_corpus() -> bytes:
    """The default corpus: ``pydoc_data.topics.topics`` values in sorted-key order, joined by blank lines, as UTF-8.

    Returns:
        The corpus bytes (466,273 on Python 3.11.7; the size varies with the Python version).

    Example::

        data = default_corpus()
        decode(data[:60])

    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus(paths: Optional[Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]] = None) -> Tensor:
    """Read a byte corpus: the files of ``paths`` joined by blank lines (``b"\\n\\n"``), or the default corpus.

    Args:
        paths: One path or a sequence of paths; ``None`` for :func:`default_corpus`.

    Returns:
        The bytes as a 1-D ``uint8`` tensor.

    Raises:
        IsADirectoryError: If a path is a directory (the message says to pass the files inside it).
        FileNotFoundError: If a path is not a file (the message names it).
        ValueError: If ``paths`` is empty or the corpus has no bytes.

    Example::

        data = load_corpus(["shakespeare.txt", "kjv.txt"])  # uint8 (N,)

    """
    if paths is None:
        raw = default_corpus()
    else:
        files = _as_paths(paths)
        raw = b"\n\n".join(_read(p) for p in files)
    if not raw:
        raise ValueError(f"The corpus {paths!r} is empty; give files that hold text.")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _as_paths(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[str]:
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not files:
        raise ValueError("`paths` is an empty list; give at least one file, or None for the default corpus.")
    for path in files:
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{os.fspath(path)!r} is a directory, not a text file: pass the files themselves, one path or a list"
                f" of paths (for example sorted(glob.glob({os.path.join(os.fspath(path), '*.txt')!r})))."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Text file not found: {os.fspath(path)!r}.")
    return [os.fspath(p) for p in files]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def encode(text: str) -> Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D ``int64`` tensor of tokens in ``0..255``.

    Example::

        prompt = encode("The with statement").unsqueeze(0)  # (1, P), for CausalLM.generate

    """
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: Union[Tensor, Sequence[int], bytes]) -> str:
    """Turn byte tokens back into text; invalid UTF-8 becomes U+FFFD (``errors="replace"``).

    Args:
        tokens: A 1-D tensor or a sequence of ints in ``0..255``, or ``bytes``.

    Returns:
        The decoded string.

    Raises:
        ValueError: If ``tokens`` is not 1-D or holds a value outside ``0..255`` (e.g. the ``-100`` of a target).

    Example::

        decode(model.generate(encode("def ").unsqueeze(0), 40)[0])

    """
    if isinstance(tokens, (bytes, bytearray)):
        return bytes(tokens).decode("utf-8", errors="replace")
    values = torch.as_tensor(tokens)
    if values.dim() != 1:
        raise ValueError(f"`decode` takes one sequence (1-D), got shape {tuple(values.shape)}; decode rows one by one.")
    values = values.tolist()
    if any(not 0 <= v < VOCAB_SIZE for v in values):
        raise ValueError("`decode` takes byte tokens in 0..255; drop -100 (no-target) entries first.")
    return bytes(values).decode("utf-8", errors="replace")


class TextDataset(Dataset):
    """Windows of ``seq_len + 1`` bytes of a corpus as ``{"tokens", "targets"}`` samples (usable without Lightning).

    Item ``i`` is the window that starts at byte ``i * stride``: ``tokens = data[s : s + seq_len]`` and
    ``targets = data[s + 1 : s + seq_len + 1]`` (both ``int64``, shape ``(seq_len,)``). ``stride = seq_len`` (default)
    gives contiguous non-overlapping windows (evaluation); ``stride = 1`` gives every crop position, for random crops
    with :class:`RandomCropSampler`.

    Args:
        data: The corpus: a 1-D tensor of bytes (any integer dtype) or ``bytes``.
        seq_len: Tokens per sample ``T``, ``>= 1``.
        stride: Bytes between consecutive windows, ``>= 1``; ``None`` means ``seq_len``.

    Raises:
        ValueError: If ``seq_len`` or ``stride`` is below 1, or the corpus is shorter than ``seq_len + 1`` bytes.

    Example::

        from torch.utils.data import DataLoader

        val = TextDataset(load_corpus()[-20_000:], seq_len=128)
        batch = next(iter(DataLoader(val, batch_size=8)))  # {"tokens": (8, 128), "targets": (8, 128)}

    """

    def __init__(self, data: Union[Tensor, bytes], seq_len: int, stride: Optional[int] = None) -> None:
        check_int("seq_len", seq_len)
        stride = seq_len if stride is None else stride
        check_int("stride", stride, hint="or None for seq_len")
        if isinstance(data, (bytes, bytearray)):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data.dim() != 1:
            raise ValueError(f"`data` must be a 1-D tensor of bytes, got shape {tuple(data.shape)}.")
        if len(data) < seq_len + 1:
            raise ValueError(
                f"The corpus has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; use a shorter `seq_len` or"
                " more text."
            )
        self.data, self.seq_len, self.stride = data, seq_len, stride

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Window {index} is out of range for {len(self)} windows.")
        start = (index % len(self)) * self.stride
        window = self.data[start : start + self.seq_len + 1].long()  # (T + 1,)
        return {"tokens": window[:-1], "targets": window[1:]}


class RandomCropSampler(Sampler[int]):
    """Draws ``num_samples`` window indices uniformly (with replacement) from ``range(num_positions)`` per epoch.

    Epoch ``e``'s draw depends on ``(seed, e)`` only. Lightning calls :meth:`set_epoch` at the start of every epoch (as
    for a ``DistributedSampler``); in a plain loop, call it yourself or every epoch repeats epoch 0's crops. The
    sampler runs in the main process, so the crops are the same with any ``num_workers``.

    Args:
        num_positions: Number of windows to draw from (``len`` of a ``stride=1`` :class:`TextDataset`).
        num_samples: Indices per epoch.
        seed: The seed of the draws.

    Example::

        train = TextDataset(load_corpus(), seq_len=256, stride=1)
        sampler = RandomCropSampler(len(train), num_samples=2000, seed=0)
        loader = DataLoader(train, batch_size=16, sampler=sampler)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader: ...

    """

    def __init__(self, num_positions: int, num_samples: int, seed: int = 0) -> None:
        check_int("num_positions", num_positions)
        check_int("num_samples", num_samples)
        self.num_positions, self.num_samples, self.seed, self.epoch = num_positions, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> Tensor:
        """This epoch's window indices, ``int64`` ``(num_samples,)``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randint(self.num_positions, (self.num_samples,), generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class TextDataModule(pl.LightningDataModule):
    """Byte-level text for causal language models: random training crops from the head, held-out windows at the tail.

    Batches are ``{"tokens": (B, T), "targets": (B, T)}`` (``int64``, targets shifted by one); ``vocab_size = 256``. The
    training loader draws ``samples_per_epoch`` crops of ``seq_len + 1`` bytes from the first ``1 - val_fraction`` of
    the corpus, seeded by ``(seed, epoch)``; the validation, test and predict loaders read the held-out tail as
    contiguous non-overlapping windows, in order. See the module docstring for the default corpus.

    Args:
        paths: Text files, read as bytes and joined by blank lines; ``None`` for the standard library's doc topics.
        seq_len: Tokens per sample ``T``.
        batch_size: Samples per batch.
        val_fraction: Share of the corpus (its tail) held out for validation and test, in ``(0, 1)``.
        samples_per_epoch: Training crops per epoch.
        seed: Seed of the crops.
        num_workers: Worker processes per loader.

    Raises:
        IsADirectoryError: If a path is a directory (at construction; pass the files inside it).
        FileNotFoundError: If a path is not a file (at construction).
        ValueError: On a non-positive ``seq_len``, ``batch_size`` or ``samples_per_epoch``, a ``val_fraction`` outside
            ``(0, 1)``, a negative ``num_workers``, or (in ``setup``) a split shorter than ``seq_len + 1`` bytes.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.models.transformer import TransformerPP

        dm = TextDataModule(seq_len=256, batch_size=16)
        Trainer(max_steps=1000).fit(TransformerPP(vocab_size=dm.vocab_size), datamodule=dm)  # logs val_bpc

    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        paths: Optional[Sequence[str]] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        samples_per_epoch: int = 2000,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch)):
            check_int(name, value)
        check_float("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True, hint="use e.g. 0.05")
        check_int("seed", seed, None)
        check_int("num_workers", num_workers, 0, hint="use 0 to load in the main process")
        self.paths = None if paths is None else _as_paths(paths)  # fails early on a missing file
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, float(val_fraction)
        self.samples_per_epoch, self.seed, self.num_workers = samples_per_epoch, seed, num_workers
        self.corpus: Optional[Tensor] = None
        self.train_set: Optional[TextDataset] = None
        self.val_set: Optional[TextDataset] = None

    @property
    def split_index(self) -> int:
        """Bytes ``[0, split_index)`` train, ``[split_index, N)`` validate (needs ``setup``)."""
        if self.corpus is None:
            raise RuntimeError("TextDataModule: call `setup()` (the Trainer does) first.")
        return int(round(len(self.corpus) * (1.0 - self.val_fraction)))

    #: what one token of the corpus is, for messages
    unit = "bytes"

    def load_tokens(self) -> Tensor:
        """The whole corpus as a 1-D tensor of token ids (here its bytes); a subclass may tokenize it otherwise."""
        return load_corpus(self.paths)

    @override
    def setup(self, stage: str) -> None:
        if self.corpus is not None:
            return
        self.corpus = self.load_tokens()
        cut = self.split_index
        head, tail = self.corpus[:cut], self.corpus[cut:]
        for name, part in (("training", head), ("held-out", tail)):
            if len(part) < self.seq_len + 1:
                raise ValueError(
                    f"The {name} split has {len(part)} {self.unit}, fewer than seq_len + 1 = {self.seq_len + 1};"
                    " lower `seq_len`, change `val_fraction` or give more text."
                )
        self.train_set = TextDataset(head, self.seq_len, stride=1)
        self.val_set = TextDataset(tail, self.seq_len)

    def _loader(self, dataset: Optional[TextDataset], sampler: Optional[Sampler] = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("TextDataModule: call `setup()` (the Trainer does) before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        n = len(self.train_set) if self.train_set is not None else 1
        return self._loader(self.train_set, RandomCropSampler(n, self.samples_per_epoch, self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
