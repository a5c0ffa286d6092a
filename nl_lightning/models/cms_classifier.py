# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
r"""
CMS Classifier
^^^^^^^^^^^^^^

A classifier whose backbone is a :class:`~nl_lightning.models.ContinuumMemory`: an input projection, a chain of MLP
levels meant to learn at different frequencies, and a linear head. Its levels, through
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates` and :class:`~nl_lightning.callbacks.CMSConsolidation`, are the
nested-learning configurations of the continual-learning recipes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import Tensor, nn

from nl_lightning.levels import Level
from nl_lightning.models.classifier import MLPClassifier
from nl_lightning.models.cms import ContinuumMemory

__all__ = ["CMSBackbone", "CMSClassifier"]


class CMSBackbone(nn.Module):
    """``embed`` (a linear projection to ``dim``) -> ``cms`` (a static ContinuumMemory over one token) -> ``norm``."""

    def __init__(self, in_features: int, dim: int, chunk_sizes: Sequence[int], hidden_mult: float) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.cms = ContinuumMemory(dim, chunk_sizes, hidden_mult=hidden_mult)
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, in_features) -> (batch, dim)``; the memory sees each sample as a sequence of one token."""
        return self.norm(self.cms(self.embed(x).unsqueeze(1)).squeeze(1))


class CMSClassifier(MLPClassifier):
    """An :class:`~nl_lightning.models.MLPClassifier` whose backbone is a Continuum Memory System.

    Parameter names: ``backbone.embed.*``, ``backbone.cms.blocks.<i>.*`` (level ``i``, the fastest first),
    ``backbone.norm.*`` and ``head.*``. :meth:`cms_levels` returns the CMS levels as
    :class:`~nl_lightning.Level` objects with periods ``chunk_sizes`` (optimizer steps).

    Args:
        in_features: Input features per sample.
        num_classes: Number of classes.
        dim: Width of the memory.
        chunk_sizes: Period of each CMS level in optimizer steps (the fastest first).
        hidden_mult: Hidden width of every level's MLP, as a multiple of ``dim``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        mask_by_task: As in :class:`~nl_lightning.models.MLPClassifier` (task-incremental learning).

    Example::

        model = CMSClassifier(in_features=64, num_classes=10, dim=128, chunk_sizes=[1, 4, 16])
        updates = MultiFrequencyUpdates(model.cms_levels())   # level i steps every chunk_sizes[i] steps

    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        dim: int = 128,
        chunk_sizes: Sequence[int] = (1, 4, 16),
        hidden_mult: float = 2.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        mask_by_task: bool = False,
    ) -> None:
        super().__init__(in_features, num_classes, [], lr, weight_decay, mask_by_task)  # then replace the network
        self.save_hyperparameters()
        self.hparams.pop("hidden", None)  # the parent's argument: keeps load_from_checkpoint working
        self.backbone = CMSBackbone(in_features, dim, list(chunk_sizes), hidden_mult)
        self.head = nn.Linear(dim, num_classes)

    def cms_levels(self, every: Optional[Sequence[int]] = None) -> list[Level]:
        """The CMS levels, for ``MultiFrequencyUpdates``; ``every`` overrides their periods."""
        return self.backbone.cms.levels("backbone.cms", every)
