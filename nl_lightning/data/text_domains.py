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
Text Domains
^^^^^^^^^^^^

A domain-incremental byte-level language-modelling stream: several text domains trained one after the other, every
domain evaluated on its own held-out bytes, for continual-learning measurements on language models (bits per byte on
every domain after each stage).

**Built-in domains** (``domains=None``), all from the running Python's standard library, so nothing is downloaded:

0. ``"prose"``: the help texts of ``pydoc_data.topics`` (:func:`~nl_lightning.data.text.default_corpus`), English
   prose about the language;
1. ``"code"``: standard-library source code with its docstrings and comments removed (:func:`strip_docs`);
2. ``"docstrings"``: the docstrings of the same modules (module, class and function docstrings, found with
   :mod:`ast` and cleaned with :func:`inspect.cleandoc`), English prose about the library.

The source files are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, leaving out ``site-packages``,
``dist-packages``, test directories (``test``, ``tests``, ``idle_test``), ``pydoc_data`` (which holds the prose
domain as a string literal) and files that do not parse. They are
read in the order of the SHA-256 of their path relative to the standard-library root (a fixed, well-mixed order, so
that a byte budget samples the whole library rather than its first modules alphabetically); each file contributes
at most ``bytes_per_file`` bytes of each kind, cut at a line end. Every domain is then cut to ``bytes_per_domain``
bytes. The content is deterministic for a given Python installation (it changes with the Python version, as the
default corpus of :mod:`nl_lightning.data.text` does); :func:`domain_digest` fingerprints it.

**User domains**: ``domains`` is a list with one entry per domain: a file path, a list of paths (read as bytes and
joined by blank lines), or ``bytes``; names come from ``domain_names`` (default ``domain0``, ``domain1``, ...).

**Splits.** The first ``1 - val_fraction`` of each domain's bytes train and the tail validates and tests, so that
held-out bytes never train. Training draws ``samples_per_epoch`` random crops of ``seq_len + 1`` bytes from the
head of the *current* domain (:meth:`TextDomainsDataModule.set_domain`;
:class:`~nl_lightning.data.text.RandomCropSampler` seeded by ``(seed * 1000 + domain, epoch)``). Validation and test
return one loader per domain (in domain order) over its tail as contiguous non-overlapping windows, so a
:class:`~nl_lightning.models.lm.CausalLM` logs ``val_bpc_dl{j}`` for domain ``j``. Batches are
``{"tokens": (B, T), "targets": (B, T)}`` as for :class:`~nl_lightning.data.text.TextDataModule`.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import os
import sysconfig
import tokenize
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from nl_lightning._validation import check_float, check_int, is_int
from nl_lightning.data.text import VOCAB_SIZE, RandomCropSampler, TextDataset, _as_paths, _read, default_corpus

__all__ = [
    "BUILTIN_DOMAINS",
    "TextDomainsDataModule",
    "builtin_domain",
    "docstrings_of",
    "domain_digest",
    "stdlib_source_files",
    "strip_docs",
]

#: The names of the built-in domains, in stream order.
BUILTIN_DOMAINS: tuple[str, ...] = ("prose", "code", "docstrings")
# pydoc_data holds the prose domain as a string literal: left out so that the code domain does not repeat it
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"})

DomainSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], bytes]


def stdlib_source_files(root: Optional[Union[str, os.PathLike]] = None) -> list[Path]:
    """The standard library's ``*.py`` files, in the order of the SHA-256 of their path relative to ``root``.

    Args:
        root: The directory to scan; ``None`` for ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        The files, leaving out ``site-packages``, ``dist-packages``, ``test``, ``tests``, ``idle_test``,
        ``__pycache__`` and ``pydoc_data`` directories.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.

    Example::

        files = stdlib_source_files()
        files[0].read_text()[:80]

    """
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise FileNotFoundError(f"Standard-library directory not found: {os.fspath(base)!r}.")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                rel = path.relative_to(base).as_posix()
                found.append((hashlib.sha256(rel.encode()).hexdigest(), path))
    return [path for _, path in sorted(found)]


_DOC_PARENTS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstring_node(node: ast.AST) -> Optional[ast.Expr]:
    """The docstring statement of a module, class or function (its first statement, a string constant), if any."""
    if isinstance(node, _DOC_PARENTS) and node.body:
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            return first
    return None


def strip_docs(source: str) -> str:
    """``source`` without its docstrings, comments and blank lines.

    Docstring statements (found with :mod:`ast`) are removed, a body left empty gets a ``pass``, comments (found with
    :mod:`tokenize`) are cut off their lines, and lines left empty are dropped.

    Args:
        source: Python source code.

    Returns:
        The stripped code, ending with a newline (empty if nothing is left).

    Raises:
        SyntaxError: If ``source`` does not parse.

    Example::

        strip_docs("def f():\\n    'Doc.'\\n    return 1  # one\\n")  # 'def f():\\n    return 1\\n'

    """
    tree = ast.parse(source)
    lines = source.split("\n")  # ast and tokenize count lines at "\n" only (text read with universal newlines)
    drop: set[int] = set()  # 0-based line numbers
    passes: dict[int, str] = {}  # line -> the indented 'pass' that replaces a body-only docstring
    for parent in ast.walk(tree):
        node = _docstring_node(parent)
        if node is not None:
            span = range(node.lineno - 1, node.end_lineno)
            # ast's columns are UTF-8 byte offsets
            before = lines[node.lineno - 1].encode("utf-8")[: node.col_offset].decode("utf-8", errors="replace")
            after = lines[node.end_lineno - 1].encode("utf-8")[node.end_col_offset :].decode("utf-8", errors="replace")
            after = after.strip()
            if before.strip() or (after and not after.startswith("#") and after != ";"):
                continue  # shares a line with code ("def f(): 'doc'"): keep it
            drop.update(span)
            if len(parent.body) == 1 and not isinstance(parent, ast.Module):
                passes[node.lineno - 1] = before + "pass"
    cut: dict[int, int] = {}  # line -> column where a comment starts
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0] - 1] = tok.start[1]
    out = []
    for i, line in enumerate(lines):
        if i in passes:
            out.append(passes[i])
            continue
        if i in drop:
            continue
        if i in cut:
            line = line[: cut[i]]
        if line.strip():
            out.append(line.rstrip())
    return "\n".join(out) + "\n" if out else ""


def docstrings_of(source: str) -> list[str]:
    """The module, class and function docstrings of ``source`` in source order, cleaned with ``inspect.cleandoc``.

    Args:
        source: Python source code.

    Returns:
        The non-empty docstrings.

    Raises:
        SyntaxError: If ``source`` does not parse.

    Example::

        docstrings_of("def f():\\n    'Add one.'\\n")  # ['Add one.']

    """
    found = (_docstring_node(n) for n in ast.walk(ast.parse(source)))
    nodes = sorted((n for n in found if n is not None), key=lambda n: (n.lineno, n.col_offset))
    docs = [inspect.cleandoc(n.value.value) for n in nodes]  # type: ignore[attr-defined]
    return [d for d in docs if d.strip()]


def _cap(text: str, limit: int) -> str:
    """The longest prefix of whole lines of ``text`` within ``limit`` UTF-8 bytes (at least the cut first line)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    cut = data[:limit]
    end = cut.rfind(b"\n")
    cut = cut[: end + 1] if end > 0 else cut
    return cut.decode("utf-8", errors="ignore")


@lru_cache(maxsize=8)
def _stdlib_domain(kind: str, budget: int, bytes_per_file: int, root: Optional[str]) -> bytes:
    pieces: list[bytes] = []
    total = 0
    for path in stdlib_source_files(root):
        try:
            with tokenize.open(path) as f:
                source = f.read()
            text = strip_docs(source) if kind == "code" else "\n\n".join(docstrings_of(source))
        except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
            continue
        text = _cap(text.strip("\n"), bytes_per_file)
        if not text.strip():
            continue
        piece = text.encode("utf-8") + b"\n\n"
        pieces.append(piece)
        total += len(piece)
        if total >= budget:
            break
    return b"".join(pieces)[:budget]


def builtin_domain(
    name: str, bytes_per_domain: int = 300_000, bytes_per_file: int = 6_000, stdlib_root: Optional[str] = None
) -> bytes:
    """The bytes of a built-in domain (see the module docstring).

    Args:
        name: One of :data:`BUILTIN_DOMAINS`: ``"prose"``, ``"code"`` or ``"docstrings"``.
        bytes_per_domain: The domain's size in bytes (fewer if the source has fewer).
        bytes_per_file: The most bytes one source file contributes (``code`` and ``docstrings``).
        stdlib_root: The standard-library directory to read (``None``: the running Python's).

    Returns:
        The domain's UTF-8 bytes (possibly cut inside a character at the very end).

    Raises:
        ValueError: On an unknown name or a budget below 1.

    Example::

        code = builtin_domain("code", 100_000)

    """
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"Unknown built-in domain {name!r}; choose among {list(BUILTIN_DOMAINS)}.")
    for arg, value in (("bytes_per_domain", bytes_per_domain), ("bytes_per_file", bytes_per_file)):
        check_int(arg, value)
    if name == "prose":
        return default_corpus()[:bytes_per_domain]
    root = None if stdlib_root is None else os.fspath(stdlib_root)
    return _stdlib_domain(name, bytes_per_domain, bytes_per_file, root)


def domain_digest(data: Union[bytes, Tensor]) -> str:
    """The first 16 hex digits of the SHA-256 of a domain's bytes (to record which text a measurement used)."""
    raw = bytes(data.to(torch.uint8).tolist()) if isinstance(data, Tensor) else bytes(data)
    return hashlib.sha256(raw).hexdigest()[:16]


class TextDomainsDataModule(pl.LightningDataModule):
    """Byte-level text domains trained one at a time and all evaluated: a domain-incremental LM stream.

    :meth:`set_domain` selects the domain the training loader serves (one ``trainer.fit`` per stage); the validation
    and test loaders are one per domain, over each domain's held-out tail (see the module docstring).

    Args:
        domains: ``None`` for the built-in domains (prose, code, docstrings), or one entry per domain: a path, a list
            of paths (joined by blank lines) or ``bytes``.
        domain_names: A name per domain (default: the built-in names, or ``domain0``, ``domain1``, ...).
        seq_len: Tokens per sample ``T``.
        batch_size: Samples per batch.
        val_fraction: Share of each domain (its tail) held out, in ``(0, 1)``.
        samples_per_epoch: Training crops per epoch.
        bytes_per_domain: Cut every domain to at most this many bytes (``None``: keep all; the built-in domains
            need a number).
        bytes_per_file: The most bytes one standard-library file contributes to a built-in domain.
        train_domain: The domain the training loader serves first.
        seed: Seed of the training crops.
        num_workers: Worker processes per loader.

    Raises:
        MisconfigurationException: On an empty ``domains``, a missing file, names that do not match the domains or
            repeat, a non-positive size, a ``val_fraction`` outside ``(0, 1)``, a ``train_domain`` out of range, or
            (at ``setup``) a split shorter than ``seq_len + 1`` bytes.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning.models.transformer import TransformerPP

        dm = TextDomainsDataModule(seq_len=128, batch_size=8)
        model = TransformerPP(vocab_size=dm.vocab_size, dim=64, depth=2)
        for domain in range(dm.num_domains):
            dm.set_domain(domain)
            Trainer(max_steps=200, limit_val_batches=0).fit(model, datamodule=dm)
            Trainer().validate(model, datamodule=dm)  # val_bpc_dl0, val_bpc_dl1, val_bpc_dl2

    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        domains: Optional[Sequence[DomainSource]] = None,
        domain_names: Optional[Sequence[str]] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        samples_per_epoch: int = 2000,
        bytes_per_domain: Optional[int] = 300_000,
        bytes_per_file: int = 6_000,
        train_domain: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        error = MisconfigurationException
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch),
                            ("bytes_per_file", bytes_per_file)):  # fmt: skip
            check_int(name, value, error=error)
        if bytes_per_domain is not None:
            check_int("bytes_per_domain", bytes_per_domain, hint="or None to keep every byte", error=error)
        check_float("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True, hint="use e.g. 0.1", error=error)
        check_int("seed", seed, None, error=error)
        check_int("num_workers", num_workers, 0, hint="use 0 to load in the main process", error=error)
        if domains is None:
            if bytes_per_domain is None:
                raise MisconfigurationException(
                    "The built-in domains need a byte budget: set `bytes_per_domain` (e.g. 300_000)."
                )
            self.sources: list[DomainSource] = list(BUILTIN_DOMAINS)
            default_names = list(BUILTIN_DOMAINS)
        else:
            if isinstance(domains, (str, bytes, os.PathLike)) or not isinstance(domains, Sequence) or not domains:
                raise MisconfigurationException(
                    f"`domains` must be None (the built-in domains) or a non-empty list with one entry per domain (a"
                    f" path, a list of paths or bytes), got {domains!r}."
                )
            self.sources = []
            for i, src in enumerate(domains):
                if isinstance(src, (bytes, bytearray)):
                    if not src:
                        raise MisconfigurationException(f"Domain {i} is empty bytes; give text.")
                    self.sources.append(bytes(src))
                    continue
                try:
                    self.sources.append(_as_paths(src))
                except (FileNotFoundError, ValueError) as err:
                    raise MisconfigurationException(f"Domain {i}: {err}") from err
            default_names = [f"domain{i}" for i in range(len(self.sources))]
        names = default_names if domain_names is None else list(domain_names)
        valid = all(isinstance(n, str) and n for n in names)
        if len(names) != len(self.sources) or len(set(names)) != len(names) or not valid:
            raise MisconfigurationException(
                f"`domain_names` must be {len(self.sources)} distinct non-empty strings (one per domain), got"
                f" {names!r}."
            )
        self.domain_names = names
        self.builtin = domains is None
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, float(val_fraction)
        self.samples_per_epoch, self.bytes_per_domain, self.bytes_per_file = (
            samples_per_epoch,
            bytes_per_domain,
            bytes_per_file,
        )
        self.seed, self.num_workers = seed, num_workers
        self._train_domain = 0
        self.set_domain(train_domain)
        self.corpora: Optional[list[Tensor]] = None
        self.train_sets: list[TextDataset] = []
        self.val_sets: list[TextDataset] = []

    @property
    def num_domains(self) -> int:
        """The number of domains."""
        return len(self.sources)

    @property
    def train_domain(self) -> int:
        """The domain the training loader serves."""
        return self._train_domain

    def set_domain(self, domain: int) -> None:
        """Serve domain ``domain`` from the next :meth:`train_dataloader` on (call it before each stage's fit).

        Raises:
            MisconfigurationException: If ``domain`` is not an integer in ``0..num_domains - 1``.
        """
        if not is_int(domain) or not 0 <= domain < self.num_domains:
            raise MisconfigurationException(
                f"`domain` must be an integer in 0..{self.num_domains - 1} ({self.domain_names}), got {domain!r}."
            )
        self._train_domain = domain

    def _load(self, i: int) -> Tensor:
        src = self.sources[i]
        if self.builtin:
            raw = builtin_domain(str(src), self.bytes_per_domain, self.bytes_per_file)  # type: ignore[arg-type]
        elif isinstance(src, bytes):
            raw = src
        else:
            raw = b"\n\n".join(_read(p) for p in src)  # type: ignore[union-attr]
        if self.bytes_per_domain is not None:
            raw = raw[: self.bytes_per_domain]
        if not raw:
            raise MisconfigurationException(f"Domain {self.domain_names[i]!r} has no bytes; give text.")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    def split_index(self, domain: int) -> int:
        """Bytes ``[0, split_index)`` of ``domain`` train, the rest are held out (needs ``setup``)."""
        if self.corpora is None:
            raise RuntimeError("TextDomainsDataModule: call `setup()` (the Trainer does) first.")
        return int(round(len(self.corpora[domain]) * (1.0 - self.val_fraction)))

    def domain_bytes(self, domain: int, split: str = "train") -> Tensor:
        """The ``uint8`` bytes of ``domain``'s ``"train"`` or ``"val"`` split (``"all"``: both); runs ``setup``."""
        self.setup("fit")
        assert self.corpora is not None
        if not is_int(domain) or not 0 <= domain < self.num_domains:
            raise ValueError(f"`domain` must be an integer in 0..{self.num_domains - 1}, got {domain!r}.")
        data, cut = self.corpora[domain], self.split_index(domain)
        if split == "train":
            return data[:cut]
        if split == "val":
            return data[cut:]
        if split == "all":
            return data
        raise ValueError(f"`split` must be 'train', 'val' or 'all', got {split!r}.")

    @override
    def setup(self, stage: str) -> None:
        if self.corpora is not None:
            return
        corpora = [self._load(i) for i in range(self.num_domains)]
        self.corpora = corpora
        train_sets, val_sets = [], []
        for i, data in enumerate(corpora):
            cut = self.split_index(i)
            for name, part in (("training", data[:cut]), ("held-out", data[cut:])):
                if len(part) < self.seq_len + 1:
                    self.corpora = None
                    raise MisconfigurationException(
                        f"The {name} split of domain {self.domain_names[i]!r} has {len(part)} bytes, fewer than"
                        f" seq_len + 1 = {self.seq_len + 1}; lower `seq_len`, change `val_fraction` or give more text."
                    )
            train_sets.append(TextDataset(data[:cut], self.seq_len, stride=1))
            val_sets.append(TextDataset(data[cut:], self.seq_len))
        self.train_sets, self.val_sets = train_sets, val_sets

    def _loader(self, dataset: TextDataset, sampler: Optional[Sampler] = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _require_setup(self) -> None:
        if self.corpora is None:
            raise RuntimeError("TextDomainsDataModule: call `setup()` (the Trainer does) before asking for a loader.")

    @override
    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        data = self.train_sets[self._train_domain]
        sampler = RandomCropSampler(len(data), self.samples_per_epoch, self.seed * 1000 + self._train_domain)
        return self._loader(data, sampler)

    def domain_val_dataloader(self, domain: int) -> DataLoader:
        """The held-out windows of one domain, in order."""
        self._require_setup()
        return self._loader(self.val_sets[domain])

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return [self.domain_val_dataloader(i) for i in range(self.num_domains)]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
