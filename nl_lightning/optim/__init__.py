"""Deep optimizers of Nested Learning (NL NeurIPS Sec. 4): ``torch.optim.Optimizer`` subclasses usable from YAML.

- :class:`PreconditionedMomentum` (Eq. 20): momentum over preconditioned gradients.
- :class:`DeltaMomentum` (Eq. 21-22): momentum written by a delta rule.
- :class:`DMGD` (Eq. 23-24): deep momentum, a small MLP memory over gradients, optionally orthogonalised (Muon-like).
- :class:`M3` (Algorithm 1, arXiv:2512.24695): multi-scale momentum Muon.
"""

from nl_lightning.optim.delta_momentum import DeltaMomentum
from nl_lightning.optim.dmgd import DMGD
from nl_lightning.optim.m3 import M3
from nl_lightning.optim.newton_schulz import newton_schulz
from nl_lightning.optim.preconditioned_momentum import PreconditionedMomentum

__all__ = ["DMGD", "M3", "DeltaMomentum", "PreconditionedMomentum", "newton_schulz"]
