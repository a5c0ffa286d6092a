"""Lightning callbacks: thin adapters around the plain-torch cores of nl_lightning, one callback per file."""

from nl_lightning.callbacks._step_hooks import Phase, StepHookCallback, StepProtocol
from nl_lightning.callbacks.cms_consolidation import CMSConsolidation, ConsolidationPair
from nl_lightning.callbacks.continual_evaluation import ContinualEvaluation
from nl_lightning.callbacks.ewc import ElasticWeightConsolidation
from nl_lightning.callbacks.hypergradient import HypergradientRule
from nl_lightning.callbacks.monitor import NestedLearningMonitor
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates
from nl_lightning.callbacks.replay import ExperienceReplay
from nl_lightning.callbacks.scheduled_rule import ScheduledRule
from nl_lightning.callbacks.self_modifying import RuleTarget, SelfModifyingRule

__all__ = [
    "CMSConsolidation",
    "ConsolidationPair",
    "ContinualEvaluation",
    "ElasticWeightConsolidation",
    "ExperienceReplay",
    "HypergradientRule",
    "MultiFrequencyUpdates",
    "NestedLearningMonitor",
    "Phase",
    "RuleTarget",
    "ScheduledRule",
    "SelfModifyingRule",
    "StepHookCallback",
    "StepProtocol",
]
