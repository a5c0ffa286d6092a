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
Configured State Keys
^^^^^^^^^^^^^^^^^^^^^

A base for stateful callbacks whose checkpoint key names their configuration (``Callback._generate_state_key``, as
``ModelCheckpoint`` does), so that differently configured instances each save and restore their own state and
Lightning refuses identical duplicates when the Trainer is built. A checkpoint that holds the state under another key of
the same class (the bare class name, as written before the keys named the configuration, or the key of a differently
configured run) still restores it when exactly one instance of the class lacks its state.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override


class ConfiguredStateKey(Callback):
    """A stateful callback keyed in checkpoints by :meth:`state_key_fields`.

    Subclasses return the fields that tell two instances apart from :meth:`state_key_fields` (strings, numbers and lists
    or dicts of them, so the key's ``repr`` is stable). A field a resumed run may reasonably change (a period, a
    strength) is better left out: a changed key is still restored, but with a warning.
    """

    def state_key_fields(self) -> dict[str, Any]:
        """The configuration that identifies this instance's state; ``{}`` keys it by the class name alone."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        fields = self.state_key_fields()
        return self._generate_state_key(**fields) if fields else type(self).__qualname__

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore a state saved under another key of this class when it is unambiguous (see the module docstring)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        cls = type(self).__qualname__
        claimed = {cb.state_key for cb in trainer.callbacks}
        unclaimed = [
            k for k in states if isinstance(k, str) and k not in claimed and (k == cls or k.startswith(cls + "{"))
        ]
        if not unclaimed:
            return
        orphans = [cb for cb in trainer.callbacks if type(cb) is type(self) and cb.state_key not in states]
        if len(unclaimed) == 1 and len(orphans) == 1:
            (key,) = unclaimed
            if key != cls:
                rank_zero_warn(
                    f"{cls}: the checkpoint holds no state under {self.state_key!r}; restoring the state saved under"
                    f" {key!r} (the same callback, configured differently)."
                )
            self.load_state_dict(copy.deepcopy(states[key]))
            return
        if self is orphans[0]:  # warn once
            rank_zero_warn(
                f"The checkpoint holds {cls} states under {unclaimed}, which no callback claims, and there are"
                f" {len(orphans)} {cls} callbacks without a state: none of them is restored. Configure the callbacks"
                " as in the run that saved the checkpoint."
            )
