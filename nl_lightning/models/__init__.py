"""Models: the Continuum Memory System and LightningModules built on nl_lightning's levels."""

from nl_lightning.models.classifier import MLPClassifier
from nl_lightning.models.cms import CMSLevel, CMSState, ContinuumMemory
from nl_lightning.models.cms_classifier import CMSClassifier
from nl_lightning.models.to_cms import CMSAdapter, cms_levels, to_cms

__all__ = [
    "CMSAdapter",
    "CMSClassifier",
    "CMSLevel",
    "CMSState",
    "ContinuumMemory",
    "MLPClassifier",
    "cms_levels",
    "to_cms",
]
