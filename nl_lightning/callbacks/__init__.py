"""Lightning callbacks: thin adapters around the plain-torch cores of nl_lightning, one callback per file."""

from nl_lightning.callbacks.monitor import NestedLearningMonitor
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates

__all__ = ["MultiFrequencyUpdates", "NestedLearningMonitor"]
