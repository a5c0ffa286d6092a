"""Models: the Continuum Memory System, the Titans memory, self-modifying Titans, Hope and their baselines."""

from nl_lightning.models.classifier import MLPClassifier
from nl_lightning.models.cms import CMSLevel, CMSState, ContinuumMemory
from nl_lightning.models.cms_classifier import CMSClassifier
from nl_lightning.models.hope import HopeBlock, HopeBlockState, HopeModule, HopeState
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.neural_memory import NeuralMemory, NeuralMemoryState
from nl_lightning.models.self_modifying_titans import SelfModifyingState, SelfModifyingTitans
from nl_lightning.models.task_loss_cms import TaskLossContext
from nl_lightning.models.titans import TitansMAL, TitansState
from nl_lightning.models.to_cms import CMSAdapter, cms_levels, to_cms
from nl_lightning.models.transformer import KVCache, TransformerPP

__all__ = [
    "CMSAdapter",
    "CMSClassifier",
    "CMSLevel",
    "CMSState",
    "CausalLM",
    "ContinuumMemory",
    "HopeBlock",
    "HopeBlockState",
    "HopeModule",
    "HopeState",
    "KVCache",
    "MLPClassifier",
    "NeuralMemory",
    "NeuralMemoryState",
    "SelfModifyingState",
    "SelfModifyingTitans",
    "TaskLossContext",
    "TitansMAL",
    "TitansState",
    "TransformerPP",
    "cms_levels",
    "to_cms",
]
