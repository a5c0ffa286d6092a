"""nl_lightning: Nested Learning (Behrouz et al., NeurIPS 2025) for PyTorch Lightning.

The public names are re-exported here and in the subpackages (``nl_lightning.callbacks``, ``nl_lightning.models``,
``nl_lightning.data``).
"""

from nl_lightning.__about__ import __version__
from nl_lightning.levels import Level, LevelSet

__all__ = ["Level", "LevelSet", "__version__"]
