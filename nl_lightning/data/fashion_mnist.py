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
Fashion-MNIST
^^^^^^^^^^^^^

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017: 60,000 training and 10,000 test images of 28x28 grey pixels, 10 classes
of clothing, 6,000 training images per class) read from local IDX files. Nothing is ever downloaded: the files come
from the Debian package ``dataset-fashion-mnist``, which installs them in ``/usr/share/datasets/fashion-mnist``::

    apt-get install dataset-fashion-mnist
    # or, without root:
    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR
    export NL_FASHION_MNIST_ROOT=DIR/usr/share/datasets/fashion-mnist

The root directory holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzipped (``NAME.gz``, as Debian ships
them) or not (``NAME``). It is, in this order, the ``root`` argument, the environment variable
``NL_FASHION_MNIST_ROOT``, or ``/usr/share/datasets/fashion-mnist``.

IDX is big-endian: two zero bytes, a type byte (``0x08`` for ``uint8``, the only type used here), the number of
dimensions, one 32-bit size per dimension, then the values in row-major order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "clear_fashion_mnist_cache",
    "fashion_mnist_available",
    "read_idx",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV_VAR = "NL_FASHION_MNIST_ROOT"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES = (*_FILES[True], *_FILES[False])
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UINT8 = 0x08

# (resolved root, train) -> (images float32 (N, 784) in [0, 1], labels int64 (N,)); shared by every dataset.
_CACHE: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}

PathLike = Union[str, "os.PathLike[str]"]


def read_idx(path: PathLike) -> Tensor:
    """Read an IDX file of unsigned bytes (the MNIST family's format), gzipped or not.

    Compression is detected from the content (the gzip magic bytes ``1f 8b``), not from the file name.

    Args:
        path: The file to read.

    Returns:
        A ``uint8`` tensor of the shape declared in the header, for example ``(60000, 28, 28)`` for training images.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the header is malformed (the first two bytes are not zero, the type byte is not ``0x08``
            (``uint8``), there are no dimensions or the header is truncated), the payload size does not match the
            dimensions, or the gzip stream is damaged (truncated or corrupt). The message names the file.

    Example::

        labels = read_idx("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
        labels.shape, labels.dtype  # (torch.Size([60000]), torch.uint8)

    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: damaged deflate data (neither of the others)
            raise ValueError(
                f"{str(path)!r} is damaged: it starts like a gzip file but cannot be decompressed ({err}). Replace it"
                " with an intact copy (reinstall the Debian package `dataset-fashion-mnist`, or extract it again)."
            ) from err
    if len(raw) < 4:
        raise ValueError(f"{str(path)!r} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number.")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{str(path)!r} is not an IDX file: its magic number starts with bytes {raw[0]:#04x} {raw[1]:#04x}, "
            "expected two zero bytes."
        )
    if raw[2] != _IDX_UINT8:
        raise ValueError(
            f"{str(path)!r} has IDX type byte {raw[2]:#04x}; only {_IDX_UINT8:#04x} (unsigned bytes) is supported."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(
            f"{str(path)!r} has a malformed IDX header: {ndim} dimension(s) declared, {len(raw)} bytes in the file."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(path)!r} declares shape {shape} ({expected} values) but holds {len(raw) - header} bytes of data; "
            "the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(data.copy())


def _resolve_root(root: Optional[PathLike]) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def _find(root: Path, name: str) -> Optional[Path]:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_files_error(root: Path, missing: list[str]) -> FileNotFoundError:
    where = f"{str(root)!r}" + ("" if root.is_dir() else " (the directory does not exist)")
    return FileNotFoundError(
        f"Fashion-MNIST files not found in {where}: missing {', '.join(missing)}. The root must hold "
        f"{', '.join(_ALL_FILES)}, each as NAME.gz or NAME. Nothing is downloaded at run time; get them from the "
        "Debian package `dataset-fashion-mnist`: `apt-get install dataset-fashion-mnist` (installs them in "
        f"{DEFAULT_ROOT}), or without root `apt-get download dataset-fashion-mnist && dpkg -x "
        "dataset-fashion-mnist_*.deb DIR`, then pass root=DIR/usr/share/datasets/fashion-mnist or set "
        f"{ROOT_ENV_VAR}=DIR/usr/share/datasets/fashion-mnist."
    )


def fashion_mnist_available(root: Optional[PathLike] = None) -> bool:
    """Whether all four Fashion-MNIST files are present (gzipped or not); nothing is read or decoded.

    Args:
        root: The directory of the files; ``None`` means ``$NL_FASHION_MNIST_ROOT`` if set, else
            ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``True`` if the training and test images and labels are all found.

    Example::

        import pytest

        needs_fashion_mnist = pytest.mark.skipif(
            not fashion_mnist_available(), reason="install the Debian package dataset-fashion-mnist"
        )

    """
    path = _resolve_root(root)
    return all(_find(path, name) is not None for name in _ALL_FILES)


def clear_fashion_mnist_cache() -> None:
    """Forget the decoded tensors that :class:`FashionMNIST` shares between instances, freeing their memory.

    Example::

        clear_fashion_mnist_cache()

    """
    _CACHE.clear()


def _load(root: Path, train: bool) -> tuple[Tensor, Tensor]:
    key = (str(root.resolve()), train)
    if key in _CACHE:
        return _CACHE[key]
    images_name, labels_name = _FILES[train]
    paths = {name: _find(root, name) for name in (images_name, labels_name)}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        raise _missing_files_error(root, missing)
    images_path, labels_path = paths[images_name], paths[labels_name]
    assert images_path is not None and labels_path is not None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{str(images_path)!r} holds shape {tuple(images.shape)}; expected (N, 28, 28) images.")
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"{str(labels_path)!r} holds shape {tuple(labels.shape)}; expected ({len(images)},), one label per image "
            f"of {str(images_path)!r}."
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{str(labels_path)!r} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9.")
    data = images.reshape(len(images), -1).to(torch.float32).div_(255.0)
    targets = labels.to(torch.int64)
    _CACHE[key] = (data, targets)
    return data, targets


class FashionMNIST(Dataset):
    """Fashion-MNIST from local IDX files, as float pixels in ``[0, 1]`` and ``int64`` labels; no download, ever.

    The decoded tensors are cached per (resolved root, split) in this module, so further instances (one per task of
    a continual-learning benchmark, say) cost no decoding and no memory: their ``data`` and ``targets`` are views of
    the same tensors. Do not modify them in place; clone first (``ds.data.clone()``), or call
    :func:`clear_fashion_mnist_cache` to free the memory.

    Args:
        root: The directory of the four files (``NAME.gz`` or ``NAME``). ``None`` means the environment variable
            ``NL_FASHION_MNIST_ROOT`` if it is set and not empty, else ``/usr/share/datasets/fashion-mnist`` (where
            the Debian package ``dataset-fashion-mnist`` installs them).
        train: The 60,000 training images if ``True``, the 10,000 test images otherwise.
        flatten: Images of shape ``(784,)`` if ``True``, ``(1, 28, 28)`` otherwise.

    Attributes:
        data: ``float32`` images in ``[0, 1]``, shape ``(N, 784)`` or ``(N, 1, 28, 28)``.
        targets: ``int64`` labels in ``0..9``, shape ``(N,)``.
        classes: The 10 class names, indexed by label.
        image_size: ``(28, 28)``.

    The files are read on first access to the data (``len``, indexing, ``data``, ``targets``), not by the
    constructor, so that a recipe naming this dataset can be parsed without them.

    Raises:
        FileNotFoundError: On first access, if the split's files are missing; the message names the root, the expected
            files and how to get them (the Debian package ``dataset-fashion-mnist``).
        ValueError: If a file is not a valid IDX file of unsigned bytes or the shapes do not match, or ``train`` or
            ``flatten`` is not a bool.

    Example::

        from torch.utils.data import DataLoader

        train = FashionMNIST(train=True)  # or FashionMNIST(root="DIR/usr/share/datasets/fashion-mnist")
        x, y = train[0]  # x: float32 (784,), y: tensor(9), an ankle boot
        loader = DataLoader(train, batch_size=128, shuffle=True)

    """

    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    image_size: tuple[int, int] = (28, 28)
    num_classes: int = 10

    def __init__(self, root: Optional[PathLike] = None, train: bool = True, flatten: bool = True) -> None:
        if not isinstance(train, bool):
            raise ValueError(f"`train` must be a bool, got {train!r}; use True (60,000 images) or False (10,000).")
        if not isinstance(flatten, bool):
            raise ValueError(
                f"`flatten` must be a bool, got {flatten!r}; use True for (784,) or False for (1, 28, 28)."
            )
        self.root = _resolve_root(root)
        self.train = train
        self.flatten = flatten
        self._tensors: Optional[tuple[Tensor, Tensor]] = None

    def _loaded(self) -> tuple[Tensor, Tensor]:
        # Read on first access, not in __init__: a recipe naming this dataset instantiates (and a data module's
        # constructor validates) without the files; a missing file raises at the data module's setup.
        if self._tensors is None:
            data, targets = _load(self.root, self.train)
            self._tensors = (data if self.flatten else data.view(-1, 1, *self.image_size), targets)
        return self._tensors

    @property
    def data(self) -> Tensor:
        """``float32`` images in ``[0, 1]``, shape ``(N, 784)`` or ``(N, 1, 28, 28)`` (read on first access)."""
        return self._loaded()[0]

    @property
    def targets(self) -> Tensor:
        """``int64`` labels in ``0..9``, shape ``(N,)`` (read on first access)."""
        return self._loaded()[1]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"{type(self).__name__}(root={str(self.root)!r}, split={split}, samples={len(self)})"
