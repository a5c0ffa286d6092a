"""LightningDataModules: real data available offline (scikit-learn's digits) and synthetic tasks."""

from nl_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
