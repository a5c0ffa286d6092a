"""Continual-learning data: IDX files, Fashion-MNIST (fake and real), DigitsDataset, slowly-changing regression."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning.data.digits import DigitsDataset
from nl_lightning.data.fashion_mnist import (
    FashionMNIST,
    clear_fashion_mnist_cache,
    fashion_mnist_available,
    read_idx,
)
from nl_lightning.data.regression import SlowlyChangingRegression, SlowlyChangingRegressionDataModule

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _fake_root(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """Tiny Fashion-MNIST look-alike: images with known pixels, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write(root / f"{split}-images-idx3-ubyte{suffix}", _idx_bytes(images), gz)
        _write(root / f"{split}-labels-idx1-ubyte{suffix}", _idx_bytes(labels), gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("NL_FASHION_MNIST_ROOT", raising=False)
    clear_fashion_mnist_cache()
    yield
    clear_fashion_mnist_cache()


# --- read_idx -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gzip_and_raw(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # the name does not decide: compression is detected from the magic bytes
    path = _write(tmp_path / "data.bin", _idx_bytes(array), gz)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(array))
    labels = read_idx(_write(tmp_path / "labels", _idx_bytes(np.array([9, 0, 3], np.uint8)), gz))
    assert labels.tolist() == [9, 0, 3]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "two zero bytes"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8, "type byte 0x0d"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "holds 2 bytes"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 1), "malformed IDX header"),
        (b"\x00\x00", "shorter than"),
    ],
)
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_bad_files_naming_them(tmp_path, payload, match, gz):
    path = _write(tmp_path / "broken-idx-file", payload, gz)
    with pytest.raises(ValueError, match=match) as err:
        read_idx(path)
    assert "broken-idx-file" in str(err.value)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "corrupt.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(ValueError, match="corrupt.gz"):
        read_idx(path)


# --- FashionMNIST on a fake root --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fake_root(tmp_path, gz):
    arrays = _fake_root(tmp_path, gz=gz)
    assert fashion_mnist_available(tmp_path)
    train, test = FashionMNIST(tmp_path, train=True), FashionMNIST(str(tmp_path), train=False)
    assert len(train) == 20 and len(test) == 10
    assert train.data.shape == (20, 784) and train.data.dtype == torch.float32
    assert train.targets.shape == (20,) and train.targets.dtype == torch.int64
    assert 0.0 <= train.data.min() and train.data.max() <= 1.0
    assert train.data[0, 0] == 0.0 and train.data[0, 1] == 1.0
    images, labels = arrays["train"]
    assert torch.allclose(train.data, torch.from_numpy(images).reshape(20, -1).float() / 255)
    assert train.targets.tolist() == labels.tolist()
    assert torch.equal(test.targets, torch.from_numpy(arrays["t10k"][1]).long())
    x, y = train[3]
    assert x.shape == (784,) and isinstance(y, torch.Tensor) and y.dim() == 0 and y.dtype == torch.int64 and y == 3
    assert len(train.classes) == 10 and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.image_size == (28, 28)


def test_fashion_mnist_unflattened_and_cached(tmp_path):
    _fake_root(tmp_path)
    flat = FashionMNIST(tmp_path, flatten=True)
    images = FashionMNIST(tmp_path, flatten=False)
    assert images.data.shape == (20, 1, 28, 28) and images[0][0].shape == (1, 28, 28)
    assert torch.equal(images.data.reshape(20, -1), flat.data)
    # the second instance reused the decoded tensors instead of decoding again
    assert images.data.data_ptr() == flat.data.data_ptr() and images.targets is flat.targets


def test_fashion_mnist_env_var_overrides_default_root(tmp_path, monkeypatch):
    _fake_root(tmp_path / "fmnist", n_train=30)
    assert not fashion_mnist_available(tmp_path / "elsewhere")
    monkeypatch.setenv("NL_FASHION_MNIST_ROOT", str(tmp_path / "fmnist"))
    assert fashion_mnist_available()
    ds = FashionMNIST()
    assert len(ds) == 30 and ds.root == tmp_path / "fmnist"
    # an explicit root wins over the environment variable
    _fake_root(tmp_path / "other", n_train=12)
    assert len(FashionMNIST(tmp_path / "other")) == 12


def test_fashion_mnist_missing_files_message(tmp_path):
    root = tmp_path / "nothing-here"
    assert not fashion_mnist_available(root)
    dataset = FashionMNIST(root)  # the files are read on first access, not by the constructor
    with pytest.raises(FileNotFoundError) as err:
        len(dataset)
    message = str(err.value)
    assert str(root) in message
    assert "dataset-fashion-mnist" in message and "apt-get install" in message and "dpkg -x" in message
    assert "NL_FASHION_MNIST_ROOT" in message
    for name in FILES:
        assert name in message
    # one file missing: still not available, and the error names it
    _fake_root(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert not fashion_mnist_available(tmp_path / "partial")
    assert len(FashionMNIST(tmp_path / "partial", train=True)) == 20
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        len(FashionMNIST(tmp_path / "partial", train=False))


def test_fashion_mnist_mismatched_files(tmp_path):
    _fake_root(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(7, np.uint8)), gz=True)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        FashionMNIST(tmp_path)[0]
    with pytest.raises(ValueError, match="`train` must be a bool"):
        FashionMNIST(tmp_path, train="yes")


# Read at import, before ``_fresh_cache`` clears the variable for each test (CI points it at the Debian package).
REAL_ROOT = os.environ.get("NL_FASHION_MNIST_ROOT") or None


@pytest.mark.skipif(
    not fashion_mnist_available(REAL_ROOT),
    reason="Fashion-MNIST not found: install the Debian package dataset-fashion-mnist (apt-get install "
    "dataset-fashion-mnist) or set NL_FASHION_MNIST_ROOT",
)
def test_fashion_mnist_real_files():
    train, test = FashionMNIST(REAL_ROOT, train=True), FashionMNIST(REAL_ROOT, train=False, flatten=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.data.shape == (60000, 784) and test.data.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.targets, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.targets, minlength=10), torch.full((10,), 1000))
    assert train.targets[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.targets[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert train.data.min() == 0.0 and train.data.max() == 1.0
    assert round(float(train.data[0].sum() * 255)) == 76247  # sum of the first image's bytes


# --- DigitsDataset ----------------------------------------------------------------------------------------------------


def test_digits_dataset_split_is_disjoint_complete_and_stratified():
    train, test = DigitsDataset(train=True), DigitsDataset(train=False)
    assert len(train) + len(test) == 1797
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(1797))
    per_class = torch.bincount(torch.cat([train.targets, test.targets]), minlength=10)
    assert torch.all((torch.bincount(test.targets, minlength=10) - 0.2 * per_class).abs() <= 1)
    assert train.data.shape == (len(train), 64) and train.data.dtype == torch.float32
    assert 0.0 <= train.data.min() and train.data.max() <= 1.0
    x, y = train[0]
    assert x.shape == (64,) and y.dim() == 0 and y.dtype == torch.int64
    assert train.classes == tuple(range(10)) and train.image_size == (8, 8)
    assert len(DigitsDataset(train=False, test_fraction=0.5)) == pytest.approx(1797 / 2, abs=10)


def test_digits_dataset_reproducible_per_seed():
    torch.manual_seed(1)
    a = DigitsDataset(train=False, seed=0)
    torch.manual_seed(2)
    b = DigitsDataset(train=False, seed=0)
    c = DigitsDataset(train=False, seed=1)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.data, b.data)
    assert not torch.equal(a.indices, c.indices)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1}, "test_fraction"),
        ({"test_fraction": True}, "test_fraction"),
        ({"seed": 1.5}, "seed"),
        ({"train": 1}, "train"),
    ],
)
def test_digits_dataset_argument_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataset(**kwargs)


# --- slowly-changing regression ---------------------------------------------------------------------------------------


def test_regression_shapes_and_values():
    ds = SlowlyChangingRegression(num_steps=2500, change_every=100, seed=0)
    assert len(ds) == 2500 and ds.data.shape == (2500, 21) and ds.targets.shape == (2500, 1)
    assert ds.data.dtype == torch.float32 and ds.targets.dtype == torch.float32
    assert set(ds.data.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(ds.data[:, 20] == 1.0)  # the bias bit
    assert torch.equal(ds.targets, ds.targets.round()) and ds.targets.abs().max() <= 101
    assert ds.targets.unique().numel() > 3  # not a constant target
    x, y = ds[5]
    assert x.shape == (21,) and y.shape == (1,)
    assert ds.hidden_weights.shape == (100, 21) and set(ds.hidden_weights.unique().tolist()) == {-1.0, 1.0}
    neg = (ds.hidden_weights < 0).sum(dim=1).float()
    assert torch.allclose(ds.thresholds, 21 * 0.7 - neg)  # theta_i = (m + 1) beta - S_i
    no_bias = SlowlyChangingRegression(num_steps=2500, change_every=100, seed=0, bias_bit=False)
    assert no_bias.data.shape == (2500, 20)
    assert torch.equal(no_bias.data, ds.data[:, :20]) and torch.equal(no_bias.targets, ds.targets)


def test_regression_deterministic_per_seed_and_prefix_stable():
    torch.manual_seed(0)
    np.random.seed(0)
    a = SlowlyChangingRegression(num_steps=3000, change_every=100, seed=3)
    torch.manual_seed(1)
    np.random.seed(1)
    b = SlowlyChangingRegression(num_steps=3000, change_every=100, seed=3)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    c = SlowlyChangingRegression(num_steps=3000, change_every=100, seed=4)
    assert not torch.equal(a.data, c.data) and not torch.equal(a.hidden_weights, c.hidden_weights)
    longer = SlowlyChangingRegression(num_steps=9000, change_every=100, seed=3)  # crosses a random block boundary
    assert torch.equal(longer.data[:3000], a.data) and torch.equal(longer.targets[:3000], a.targets)


def test_regression_slow_bits_flip_one_per_boundary_and_noise_varies():
    ds = SlowlyChangingRegression(num_steps=5000, change_every=250, seed=1)
    slow, noise = ds.data[:, :15], ds.data[:, 15:20]
    assert ds.num_regimes == 20
    flipped_bits = set()
    for r in range(ds.num_regimes):
        block = slow[ds.regime == r]
        assert len(block) == 250
        assert torch.all(block == block[0]), f"slow bits change inside regime {r}"
        if r:
            changed = torch.nonzero(block[0] != slow[r * 250 - 1]).flatten().tolist()
            assert len(changed) == 1, f"boundary {r}: bits {changed} changed"
            flipped_bits.add(changed[0])
    assert len(flipped_bits) > 5  # the flipped bit is drawn at random
    # noise bits are fresh fair coins at every step
    assert 0.45 < noise.mean() < 0.55
    assert (noise[1:] != noise[:-1]).any(dim=1).float().mean() > 0.9
    for r in range(3):
        assert noise[ds.regime == r].unique(dim=0).shape[0] > 20


def test_regression_target_is_a_function_of_the_input():
    ds = SlowlyChangingRegression(num_steps=4000, change_every=1000, seed=2)
    assert torch.equal(ds.target_function(ds.data), ds.targets)
    uniq, inverse = ds.data.unique(dim=0, return_inverse=True)
    assert len(uniq) < len(ds)  # inputs recur (32 noise patterns per regime)
    for k in range(len(uniq)):
        ys = ds.targets[inverse == k]
        assert torch.all(ys == ys[0])
    # the LTU definition, written out for one sample
    x = ds.data[7]
    features = (ds.hidden_weights @ x > ds.thresholds).float()
    assert ds.targets[7].item() == float(features @ ds.output_weights + ds.output_bias)


def test_regression_regime_indices_and_datamodule_order():
    dm = SlowlyChangingRegressionDataModule(num_steps=1050, change_every=100, batch_size=10, seed=5)
    assert torch.equal(dm.regime, torch.arange(1050) // 100)
    assert dm.regime[99] == 0 and dm.regime[100] == 1 and dm.regime[-1] == 10
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    assert dm.num_features == 21 and dm.num_outputs == 1
    assert torch.equal(dm.train_set.regime, dm.regime)
    batches = list(dm.train_dataloader())
    assert len(batches) == 105
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(xs, dm.train_set.data) and torch.equal(ys, dm.train_set.targets)  # in order, never shuffled
    assert torch.equal(dm.train_set.data, SlowlyChangingRegression(1050, 100, seed=5).data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"change_every": 0}, "change_every"),
        ({"change_every": 2.5}, "change_every"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"num_workers": -1}, "num_workers"),
        ({"bias_bit": 1}, "bias_bit"),
    ],
)
def test_regression_datamodule_argument_checks(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        SlowlyChangingRegressionDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": True}, "num_steps"),
        ({"num_slow_bits": 0}, "num_slow_bits"),
        ({"num_slow_bits": 21}, "num_slow_bits"),
        ({"beta": 1.5}, "beta"),
        ({"num_target_features": 0}, "num_target_features"),
        ({"seed": -3}, "seed"),
    ],
)
def test_regression_dataset_argument_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlowlyChangingRegression(**kwargs)
