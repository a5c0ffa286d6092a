"""Models: the Continuum Memory System, the Titans memory, self-modifying Titans, Hope and their baselines.

:class:`HFCausalLM` wraps a Hugging Face ``transformers`` model; ``transformers`` (``pip install "nl-lightning[hf]"``)
is imported only when one is built.
"""

from nl_lightning.models.classifier import MLPClassifier
from nl_lightning.models.cms import CMSBlock, CMSState, ContinuumMemory
from nl_lightning.models.cms_classifier import CMSClassifier
from nl_lightning.models.hf_checkpoint import from_pretrained_cms, is_cms_checkpoint, save_pretrained_cms
from nl_lightning.models.hf_cms import install_generation_hooks
from nl_lightning.models.hf_lm import HFCausalLM
from nl_lightning.models.hope import HopeBlock, HopeBlockState, HopeConfig, HopeModule, HopeState
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.neural_memory import NeuralMemory, NeuralMemoryState
from nl_lightning.models.self_modifying_titans import SelfModifyingState, SelfModifyingTitans
from nl_lightning.models.task_loss_cms import TaskLossContext
from nl_lightning.models.titans import TitansBlock, TitansConfig, TitansMAL, TitansState
from nl_lightning.models.to_cms import (
    CMSAdapter,
    CMSTransformerDecoderLayer,
    CMSTransformerEncoderLayer,
    cms_levels,
    to_cms,
)
from nl_lightning.models.transformer import KVCache, TransformerPP

__all__ = [
    "CMSAdapter",
    "CMSClassifier",
    "CMSBlock",
    "CMSState",
    "CMSTransformerDecoderLayer",
    "CMSTransformerEncoderLayer",
    "CausalLM",
    "ContinuumMemory",
    "HFCausalLM",
    "HopeBlock",
    "HopeBlockState",
    "HopeConfig",
    "HopeModule",
    "HopeState",
    "KVCache",
    "MLPClassifier",
    "NeuralMemory",
    "NeuralMemoryState",
    "SelfModifyingState",
    "SelfModifyingTitans",
    "TaskLossContext",
    "TitansBlock",
    "TitansConfig",
    "TitansMAL",
    "TitansState",
    "TransformerPP",
    "cms_levels",
    "from_pretrained_cms",
    "install_generation_hooks",
    "is_cms_checkpoint",
    "save_pretrained_cms",
    "to_cms",
]
