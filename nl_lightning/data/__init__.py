"""LightningDataModules and datasets: real data available offline, task streams and synthetic streams."""

from nl_lightning.data.digits import DigitsDataModule, DigitsDataset
from nl_lightning.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    clear_fashion_mnist_cache,
    fashion_mnist_available,
    read_idx,
)
from nl_lightning.data.hf_text import HFTextDataModule
from nl_lightning.data.regression import SlowlyChangingRegression, SlowlyChangingRegressionDataModule
from nl_lightning.data.sampling import EpochShuffleSampler
from nl_lightning.data.stream import TaskStreamDataModule
from nl_lightning.data.synthetic import MQARDataModule, MQARDataset, NeedleDataModule, NeedleDataset
from nl_lightning.data.text import TextDataModule, TextDataset
from nl_lightning.data.text_domains import TextDomainsDataModule
from nl_lightning.data.text_needle import TextNeedleDataModule

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DigitsDataModule",
    "DigitsDataset",
    "EpochShuffleSampler",
    "FashionMNIST",
    "HFTextDataModule",
    "MQARDataModule",
    "MQARDataset",
    "NeedleDataModule",
    "NeedleDataset",
    "SlowlyChangingRegression",
    "SlowlyChangingRegressionDataModule",
    "TaskStreamDataModule",
    "TextDataModule",
    "TextDataset",
    "TextDomainsDataModule",
    "TextNeedleDataModule",
    "clear_fashion_mnist_cache",
    "fashion_mnist_available",
    "read_idx",
]
