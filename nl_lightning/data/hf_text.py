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
Tokenized Text
^^^^^^^^^^^^^^

:class:`HFTextDataModule` is :class:`~nl_lightning.data.TextDataModule` with a pretrained model's tokenizer instead of
bytes: the same corpus (local text files, or the standard library's ``pydoc_data.topics`` help texts by default), the
same split (the tail of the token stream held out), the same random training crops and contiguous held-out windows, and
the same ``{"tokens", "targets"}`` batches, with token ids of the tokenizer (``vocab_size = len(tokenizer)``). Use it
with :class:`~nl_lightning.models.hf_lm.HFCausalLM` loaded from the same checkpoint directory.

The tokenizer is read from a local directory (``AutoTokenizer.from_pretrained(path, local_files_only=True)``); nothing
is downloaded. The whole corpus is tokenized once, without special tokens, at ``setup``. ``transformers`` is needed
(``pip install "nl-lightning[hf]"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from nl_lightning.data.text import TextDataModule, load_corpus

__all__ = ["HFTextDataModule"]


def _load_tokenizer(path: str) -> Any:
    from nl_lightning.models.hf_lm import require_transformers

    transformers = require_transformers("HFTextDataModule")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`tokenizer` must be the path of a local tokenizer (or checkpoint) directory, got {path!r}.")
    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Cannot load a tokenizer from {os.fspath(path)!r} without downloading ({err}). Give a local directory"
            " holding the tokenizer files (a checkpoint directory written by `save_pretrained` has them)."
        ) from err


class HFTextDataModule(TextDataModule):
    """Text tokenized with a local Hugging Face tokenizer, in the windows and batches of :class:`TextDataModule`.

    Batches are ``{"tokens": (B, T), "targets": (B, T)}`` (``int64`` token ids, targets shifted by one). The corpus
    (the files of ``paths`` joined by blank lines, or the default corpus) is decoded as UTF-8 and tokenized once
    without special tokens; the first ``1 - val_fraction`` of the tokens train (``samples_per_epoch`` random crops of
    ``seq_len + 1`` tokens per epoch), the tail validates and tests (contiguous windows). The loss in nats divided by
    ``ln 2`` is bits per token.

    Args:
        tokenizer: A local directory holding the tokenizer (a checkpoint directory written by ``save_pretrained``).
        paths: Text files (UTF-8), joined by blank lines; ``None`` for the standard library's doc topics.
        seq_len: Tokens per sample ``T``.
        batch_size: Samples per batch.
        val_fraction: Share of the tokens (their tail) held out for validation and test, in ``(0, 1)``.
        samples_per_epoch: Training crops per epoch.
        seed: Seed of the crops.
        num_workers: Worker processes per loader.

    Raises:
        ImportError: If ``transformers`` is not installed.
        ValueError: If the tokenizer cannot be loaded from ``tokenizer`` without a download, or on the arguments
            :class:`TextDataModule` refuses.
        FileNotFoundError: If a path is not a file.

    Example::

        dm = HFTextDataModule("/models/llama-3.2-1b", seq_len=512, batch_size=8)
        model = HFCausalLM(pretrained="/models/llama-3.2-1b", vocab_size=dm.vocab_size)
        Trainer(max_steps=1000, precision="bf16-mixed").fit(model, datamodule=dm)

    """

    def __init__(
        self,
        tokenizer: str,
        paths: Optional[Sequence[str]] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        samples_per_epoch: int = 2000,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(paths, seq_len, batch_size, val_fraction, samples_per_epoch, seed, num_workers)
        self.tokenizer = _load_tokenizer(tokenizer)
        self.vocab_size = len(self.tokenizer)

    unit = "tokens"

    @override
    def load_tokens(self) -> Tensor:
        text = load_corpus(self.paths).numpy().tobytes().decode("utf-8", errors="replace")
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int32 if self.vocab_size < 2**31 else torch.int64)
