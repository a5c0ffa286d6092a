"""Models: LightningModules and the nested-learning building blocks they are made of."""

from nl_lightning.models.classifier import MLPClassifier

__all__ = ["MLPClassifier"]
