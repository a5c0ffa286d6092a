"""Lightning strategies that know the levels of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`."""

from nl_lightning.strategies.nested_ddp import NestedDDPStrategy

__all__ = ["NestedDDPStrategy"]
