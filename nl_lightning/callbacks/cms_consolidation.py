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
CMS Consolidation
^^^^^^^^^^^^^^^^^

Move knowledge from a faster level of the Continuum Memory System into a slower one (Eq. 30-31, NL NeurIPS: the
slow levels hold what the fast ones learned, at a longer time scale). Two transfers, configured per pair of levels:

- **drift** (Lookahead / fast-slow weights [ours, after Zhang et al., 2019]): with
  :math:`\Delta = \theta_\text{fast} - \bar\theta_\text{fast}` the fast level's change since the last consolidation,

  .. math::

      \theta_\text{slow} \leftarrow \theta_\text{slow} + \alpha\Delta, \qquad
      \theta_\text{fast} \leftarrow \bar\theta_\text{fast} + (1 - \alpha)\Delta, \qquad
      \bar\theta_\text{fast} \leftarrow \theta_\text{fast}

  so the transferred share leaves the fast level (``alpha = 1`` restarts it from its anchor);
- **distill** (replay distillation [ours]): the model's outputs on a buffer of recent training inputs are the teacher;
  the fast level gives up the same share of its drift, then only the slow level is trained to reproduce the teacher.

The transfers are plain functions (:func:`drift_transfer`, :func:`distill_transfer`); *when* a pair consolidates is
:meth:`CMSConsolidation.should_consolidate`, which a subclass may override (as ``WeightAveraging.should_update``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from nl_lightning._validation import is_int
from nl_lightning.callbacks._state import ConfiguredStateKey
from nl_lightning.callbacks._step_hooks import Phase, StepHookCallback, optimizer_of_params
from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates, parameter_root
from nl_lightning.levels import _legacy_cms_hint, strip_compile_prefix

__all__ = ["CMSConsolidation", "ConsolidationPair", "distill_transfer", "drift_transfer"]

_MODES = ("drift", "distill")
# (relative name, fast name, fast parameter, slow name, slow parameter)
_Match = tuple[str, str, Tensor, str, Tensor]


@dataclass(frozen=True)
class ConsolidationPair:
    """A fast level whose knowledge :class:`CMSConsolidation` moves into a slow level.

    Args:
        fast: Module-name prefix of the fast level, for example ``"cms.blocks.0"``. Like level globs, a prefix may
            leave out ``torch.compile``'s ``_orig_mod`` and a wrapping module's parameter root (``HFCausalLM``:
            ``"model.layers.0.mlp.cms.blocks.1"``, see :func:`~nl_lightning.callbacks.multi_frequency.parameter_root`).
        slow: Module-name prefix of the slow level, for example ``"cms.blocks.1"``. Parameters are paired by their
            name relative to the prefixes (``cms.blocks.0.w1`` with ``cms.blocks.1.w1``).
        mode: ``"drift"`` or ``"distill"``.
        alpha: The share of the fast level's drift that is transferred, in ``(0, 1]``.
        every: Consolidate every ``every`` committed steps (steps with gradients) of the optimizer holding the fast
            level. ``None``: a drift pair consolidates when a :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`
            level holding the slow parameters updates, a distill pair at the task boundaries of a task stream.
        params: fnmatch globs over the relative names (``["w1", "w2"]``); ``None`` pairs every relative name.
        name: The name in logs (``cms/<name>/...``) and checkpoints; empty (default): ``"<fast>_to_<slow>"``.

    Raises:
        ValueError: On an empty or equal ``fast`` / ``slow``, an unknown ``mode``, ``alpha`` outside ``(0, 1]``,
            ``every < 1``, or an empty ``params`` list or glob.

    """

    fast: str
    slow: str
    mode: Literal["drift", "distill"] = "drift"
    alpha: float = 0.5
    every: Optional[int] = None
    params: Optional[Sequence[str]] = None
    name: str = ""

    def __post_init__(self) -> None:
        for side in ("fast", "slow"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value.strip("."):
                raise ValueError(f"`{side}` must be a module-name prefix such as 'cms.blocks.0', got {value!r}.")
            object.__setattr__(self, side, value.strip("."))
        if self.fast == self.slow:
            raise ValueError(f"`fast` and `slow` are both {self.fast!r}; pair two different levels.")
        if self.mode not in _MODES:
            raise ValueError(
                f"Pair {self.fast!r} -> {self.slow!r}: `mode` must be 'drift' or 'distill', got {self.mode!r}."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"Pair {self.fast!r} -> {self.slow!r}: `alpha` must be in (0, 1], got {self.alpha!r}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.every is not None and (not is_int(self.every) or self.every < 1):
            raise ValueError(
                f"Pair {self.fast!r} -> {self.slow!r}: `every` must be an integer >= 1 (optimizer steps) or None,"
                f" got {self.every!r}."
            )
        if self.params is not None:
            params = (self.params,) if isinstance(self.params, str) else tuple(self.params)
            if not params or any(not isinstance(p, str) or not p for p in params):
                raise ValueError(
                    f"Pair {self.fast!r} -> {self.slow!r}: `params` must be None or a non-empty list of"
                    f" relative names or globs such as ['w1', 'b1'], got {self.params!r}."
                )
            object.__setattr__(self, "params", params)
        if not isinstance(self.name, str):
            raise ValueError(f"Pair {self.fast!r} -> {self.slow!r}: `name` must be a string, got {self.name!r}.")
        if not self.name:
            object.__setattr__(self, "name", f"{self.fast}_to_{self.slow}")

    @classmethod
    def from_spec(cls, spec: Union[ConsolidationPair, Mapping[str, Any]]) -> ConsolidationPair:
        """A pair from a :class:`ConsolidationPair` or a dict of its fields (a YAML entry)."""
        if isinstance(spec, ConsolidationPair):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"Each pair must be a ConsolidationPair or a dict with `fast` and `slow`, got {spec!r}.")
        known = {f.name for f in fields(cls)}
        if set(spec) - known or not {"fast", "slow"} <= set(spec):
            raise ValueError(f"Pair spec {dict(spec)!r}: needs `fast` and `slow`, and may have only {sorted(known)}.")
        return cls(**spec)


@dataclass
class _PairState:
    anchor: dict[str, Tensor] = field(default_factory=dict)  # fast parameter name -> its value at the last transfer
    count: int = 0  # committed steps (with gradients) of the fast level's optimizer since the last transfer
    transfers: int = 0
    seen_updates: Optional[int] = None  # the trigger level's update count when last checked (MultiFrequencyUpdates)
    last_stage: int = 0  # the last task-stream stage consolidated (distill pairs without `every`)


class CMSConsolidation(ConfiguredStateKey, StepHookCallback):
    r"""Consolidate fast CMS levels into slow ones, per pair of levels (Eq. 30-31, NL NeurIPS).

    **drift** pairs, at each boundary, move the slow level by ``alpha`` times the fast level's change since the
    previous boundary and take the same amount out of the fast level (formula in the module docstring). The anchor is
    the fast level's value at train start, then after each transfer. **distill** pairs keep the last ``buffer_size``
    training inputs (``batch[0]`` of a list / tuple batch, the first value of a dict, the batch itself if it is a
    tensor; or ``batch[input_key]``); at a boundary the model's outputs on them (eval mode, no gradient) are the
    teacher, the fast level is reset like a drift pair's, and a fresh ``Adam(lr=distill_lr)`` trains only the slow
    parameters for ``distill_steps`` full-buffer steps on the MSE to the teacher (eval mode, so no dropout). The
    model must map ``pl_module(x)`` to a tensor (or a tuple whose first item is one). Other parameters, and every
    parameter's ``.grad``, are left as they were.

    Boundaries (:meth:`should_consolidate`, which a subclass may override): with ``every``, every ``every`` committed
    steps of the optimizer holding the fast level (the consolidate phase of the step protocol counts them: steps a
    ``GradScaler`` skipped do not count, nor do steps without gradients, after a ``training_step`` that returned
    ``None``). Otherwise a drift pair consolidates right after each update of the
    :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` level holding all its slow parameters, and a distill pair at
    the end of each task of a :class:`~nl_lightning.data.TaskStreamDataModule`. Consolidation runs in place under
    ``torch.no_grad()`` after the optimizer step, in ``on_train_batch_end`` (task boundaries: ``on_train_epoch_end``).

    The optimizer state of the consolidated parameters (Adam moments, momentum) is *not* changed and so goes stale: it
    describes the trajectory before the jump. Gradients a ``MultiFrequencyUpdates`` level buffers while its weights
    move were taken at the old weights; a drift pair triggered by that level's updates moves them when its buffer has
    just been emptied. Under DDP every rank transfers the same drift; distillation averages its gradients over the
    ranks' buffers, so ranks stay identical. Logged: ``cms/<pair>/transfers``, ``cms/<pair>/drift_norm``
    (:math:`\lVert\Delta\rVert`) and, for distill pairs, ``cms/<pair>/distill_loss_before`` / ``..._after``.
    Anchors, clocks and the buffer are checkpointed by parameter name, under a key that names each pair's name, mode,
    fast and slow prefixes, so several instances keep their own state (a checkpoint written with the former key, the
    class name, still loads). DeepSpeed, FSDP and ModelParallel are refused.

    Args:
        pairs: :class:`ConsolidationPair` objects or dicts of their fields (``fast``, ``slow``, ``mode``, ``alpha``,
            ``every``, ``params``, ``name``).
        buffer_size: Inputs kept for distillation (``>= 1``).
        distill_steps: Adam steps per distillation (``>= 1``).
        distill_lr: Learning rate of the distillation's Adam (``> 0``).
        input_key: Which field of a batch is the model's input (see above).

    Raises:
        MisconfigurationException: At construction on an invalid pair, duplicate pair names or invalid arguments; at
            ``setup`` / train start on a prefix without parameters, unpaired names or shapes, a parameter on the fast
            side of two pairs, an unsupported strategy, a pair without a boundary (unless :meth:`should_consolidate`
            is overridden), or fast parameters spread over several optimizers.

    Example::

        from nl_lightning.callbacks import CMSConsolidation, MultiFrequencyUpdates

        cms_levels = model.cms.levels("cms")  # level_0 every step, level_1 every 4
        consolidation = CMSConsolidation([{"fast": "cms.blocks.0", "slow": "cms.blocks.1", "alpha": 0.5}])
        trainer = Trainer(callbacks=[MultiFrequencyUpdates(cms_levels), consolidation])

    """

    step_phases = (Phase.CONSOLIDATE,)
    refused_strategies = dict.fromkeys(
        (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy),
        "it shards or owns the parameters that the callback edits in place",
    )
    method_tag = "cms_consolidation"  # the name ContinualEvaluation gives this callback in a method's name

    def __init__(
        self,
        pairs: Sequence[Union[ConsolidationPair, Mapping[str, Any]]],
        buffer_size: int = 256,
        distill_steps: int = 50,
        distill_lr: float = 1e-3,
        input_key: Optional[Union[int, str]] = None,
    ) -> None:
        super().__init__()
        if isinstance(pairs, (str, bytes, Mapping)) or not isinstance(pairs, Sequence) or not pairs:
            raise MisconfigurationException(
                f"`pairs` must be a non-empty list of pairs such as [{{'fast': 'cms.blocks.0', 'slow':"
                f" 'cms.blocks.1'}}], got {pairs!r}."
            )
        try:
            self._pairs = tuple(ConsolidationPair.from_spec(p) for p in pairs)
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from err
        names = [p.name for p in self._pairs]
        if len(set(names)) != len(names):
            raise MisconfigurationException(f"Pair names must be unique, got {names}; set `name` on the pairs.")
        for arg, value in (("buffer_size", buffer_size), ("distill_steps", distill_steps)):
            if not is_int(value) or value < 1:
                raise MisconfigurationException(f"`{arg}` must be an integer >= 1, got {value!r}.")
        if isinstance(distill_lr, bool) or not isinstance(distill_lr, (int, float)) or not distill_lr > 0:
            raise MisconfigurationException(f"`distill_lr` must be > 0, got {distill_lr!r}.")
        self.buffer_size, self.distill_steps, self.distill_lr = buffer_size, distill_steps, float(distill_lr)
        self.input_key = input_key
        self._state = {p.name: _PairState() for p in self._pairs}
        self._matches: dict[str, list[_Match]] = {}
        self._trigger: dict[str, tuple[MultiFrequencyUpdates, str]] = {}  # pair -> (callback, level name)
        self._pairs_of: list[list[str]] = []  # per optimizer index: the `every` pairs whose fast level it steps
        self._buffer: Optional[Tensor] = None
        self._buffer_pos = self._buffer_filled = 0

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """``{pair name: "mode:fast->slow"}`` (not ``alpha`` or ``every``, which a resumed run may change)."""
        return {"pairs": {p.name: f"{p.mode}:{p.fast}->{p.slow}" for p in self._pairs}}

    @property
    def pairs(self) -> tuple[ConsolidationPair, ...]:
        """The configured pairs."""
        return self._pairs

    @property
    def transfers(self) -> dict[str, int]:
        """The number of consolidations each pair has done."""
        return {name: s.transfers for name, s in self._state.items()}

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)  # refuses sharding strategies, joins the step protocol
        named = dict(pl_module.named_parameters())
        root = parameter_root(pl_module)
        self._matches = {p.name: _match(p, named, root) for p in self._pairs}
        owner: dict[str, str] = {}
        for pair in self._pairs:
            for _, fast_name, _, _, _ in self._matches[pair.name]:
                if fast_name in owner:
                    raise MisconfigurationException(
                        f"Parameter {fast_name!r} is on the fast side of pairs {owner[fast_name]!r} and {pair.name!r};"
                        " each would reset it against its own anchor. Give a fast level one slow partner."
                    )
                owner[fast_name] = pair.name
        needs_stream = [p.name for p in self._pairs if p.mode == "distill" and p.every is None]
        if needs_stream and self._default_trigger and not hasattr(trainer.datamodule, "stage_at_epoch_end"):
            raise MisconfigurationException(
                f"Distill pairs {needs_stream} consolidate at task boundaries, which come from a TaskStreamDataModule"
                " (nl_lightning.data); with another data source set `every` on these pairs."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded = self.take_loaded_state()
        if loaded is not None:
            self._apply_loaded(loaded, pl_module.device)
        for pair in self._pairs:
            state = self._state[pair.name]
            for _, fast_name, fast, _, _ in self._matches[pair.name]:
                anchor = state.anchor.get(fast_name)
                if anchor is None or anchor.shape != fast.shape:
                    state.anchor[fast_name] = fast.detach().clone()
                else:
                    state.anchor[fast_name] = anchor.to(device=fast.device, dtype=fast.dtype)
            frozen = [m[3] for m in self._matches[pair.name] if not m[4].requires_grad]
            if pair.mode == "distill" and frozen:
                raise MisconfigurationException(
                    f"Pair {pair.name!r} distills into {frozen}, which do not require grad. Unfreeze them, or leave"
                    " them out with the pair's `params`."
                )
        self._trigger = {}
        for pair in self._pairs:
            if pair.mode == "drift" and pair.every is None:
                trigger = self._find_trigger(trainer, pair)
                if trigger is not None:
                    self._trigger[pair.name] = trigger
        self._pairs_of = self._map_pairs_to_optimizers(trainer.optimizers)
        if self._buffer is not None:
            self._buffer = self._buffer.to(pl_module.device)
        super().on_train_start(trainer, pl_module)

    @property
    def _default_trigger(self) -> bool:
        """Whether :meth:`should_consolidate` is this class's (a subclass that overrides it brings its boundaries)."""
        return type(self).should_consolidate is CMSConsolidation.should_consolidate

    def _find_trigger(
        self, trainer: pl.Trainer, pair: ConsolidationPair
    ) -> Optional[tuple[MultiFrequencyUpdates, str]]:
        """The ``MultiFrequencyUpdates`` level whose updates are the boundaries of a drift pair without ``every``
        (``None``: there is none, which only an overridden :meth:`should_consolidate` accepts)."""
        slow = {m[3] for m in self._matches[pair.name]}
        owners = []
        for cb in self.protocol(trainer).participants(MultiFrequencyUpdates):
            for lvl in cb.book.levels:
                held = {n for n, _ in cb.book.params(lvl.name)} & slow
                if held:
                    owners.append((cb, lvl.name, held))
        if len(owners) == 1 and owners[0][2] == slow:
            return owners[0][0], owners[0][1]
        if not self._default_trigger:
            return None
        if not owners:
            raise MisconfigurationException(
                f"Drift pair {pair.name!r} has no boundary: set `every` on it, or add a MultiFrequencyUpdates level"
                f" that holds its slow parameters ({sorted(slow)[:4]}...) and consolidate after that level's updates."
            )
        raise MisconfigurationException(
            f"Drift pair {pair.name!r}: its slow parameters are split over MultiFrequencyUpdates levels"
            f" {[o[1] for o in owners]} (or partly in none), so no single level update marks its boundary. Put them"
            " in one level, or set `every` on the pair."
        )

    def _map_pairs_to_optimizers(self, optimizers: list[Optimizer]) -> list[list[str]]:
        holder = optimizer_of_params(optimizers)
        pairs_of: list[list[str]] = [[] for _ in optimizers]
        for pair in self._pairs:
            if pair.every is None:
                continue
            where = {holder.get(id(m[2])) for m in self._matches[pair.name]}
            if len(where) != 1 or None in where:
                raise MisconfigurationException(
                    f"Pair {pair.name!r} counts the steps of the optimizer holding its fast parameters, but they are"
                    f" in optimizers {sorted(str(i) for i in where)} ('None': in no optimizer). Put the fast level"
                    " into exactly one optimizer."
                )
            pairs_of[where.pop()].append(pair.name)
        return pairs_of

    # ------------------------------------------------------------------------------------------------ boundaries
    def should_consolidate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        pair: ConsolidationPair,
        step_idx: Optional[int] = None,
        epoch_idx: Optional[int] = None,
    ) -> bool:
        """Whether ``pair`` consolidates now; override it for boundaries of your own.

        Called for every pair after each training batch (``step_idx``: ``trainer.global_step - 1``, the index of the
        batch's optimizer step; ``epoch_idx`` ``None``) and at the end of each training epoch (``step_idx`` ``None``,
        ``epoch_idx``: the epoch), like ``WeightAveraging.should_update``. By default: a pair with ``every`` after
        ``every`` committed steps of its fast level's optimizer (:attr:`step_counts`); a drift pair without it after
        an update of the ``MultiFrequencyUpdates`` level holding its slow parameters; a distill pair without it at the
        end of a task of a task stream (the epoch ended on its last batch and completed a stage).

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            pair: The pair.
            step_idx: The optimizer step just taken, after a batch; ``None`` at an epoch's end.
            epoch_idx: The epoch that just ended; ``None`` after a batch.

        Returns:
            ``True`` to consolidate the pair now (at a step boundary this also restarts its step count).

        """
        state = self._state[pair.name]
        if step_idx is not None:
            if pair.every is not None:
                return state.count >= pair.every
            trigger = self._trigger.get(pair.name)
            if trigger is None:
                return False
            cb, level = trigger
            return state.seen_updates is not None and cb.num_updates[level] > state.seen_updates
        if epoch_idx is not None and pair.mode == "distill" and pair.every is None:
            stage = _finished_task(trainer)
            return stage is not None and stage > state.last_stage
        return False

    @property
    def step_counts(self) -> dict[str, int]:
        """Per pair with ``every``: the committed steps (with gradients) of its fast level's optimizer since the pair
        last consolidated at a step boundary."""
        return {p.name: self._state[p.name].count for p in self._pairs if p.every is not None}

    @override
    def on_step_phase(
        self, phase: Phase, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: Optimizer
    ) -> None:
        """Count the step for the ``every`` pairs of ``optimizer``, unless it carried no gradient (no backward)."""
        if phase is not Phase.CONSOLIDATE or not self.step_has_gradients(index):
            return
        for name in self._pairs_of[index]:
            self._state[name].count += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if any(p.mode == "distill" for p in self._pairs):
            self._remember(batch)
        step_idx = trainer.global_step - 1
        for pair in self._pairs:
            state = self._state[pair.name]
            due = self.should_consolidate(trainer, pl_module, pair, step_idx=step_idx, epoch_idx=None)
            trigger = self._trigger.get(pair.name)
            if trigger is not None:
                cb, level = trigger
                state.seen_updates = cb.num_updates[level]
            if due:
                state.count = 0
                self.consolidate(pl_module, pair, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for pair in self._pairs:
            if self.should_consolidate(trainer, pl_module, pair, step_idx=None, epoch_idx=trainer.current_epoch):
                stage = _finished_task(trainer)
                state = self._state[pair.name]
                if stage is not None:
                    state.last_stage = max(state.last_stage, stage)
                self.consolidate(pl_module, pair, on_step=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for name, (cb, level) in self._trigger.items():
            if self._state[name].seen_updates is None:
                self._state[name].seen_updates = cb.num_updates[level]

    # ------------------------------------------------------------------------------------------------ transfers
    def consolidate(
        self, pl_module: pl.LightningModule, pair: Union[str, ConsolidationPair], on_step: bool = True
    ) -> None:
        """Consolidate ``pair`` (or the pair of that name) now, and log it.

        The callback calls it at the pair's boundaries; call it yourself from a training hook for a boundary of your
        own (``on_step=False`` inside epoch-end hooks, where Lightning allows only epoch-level logging).
        """
        pair = pair if isinstance(pair, ConsolidationPair) else next(p for p in self._pairs if p.name == pair)
        state = self._state[pair.name]
        matches = self._matches[pair.name]
        if pair.mode == "drift":
            measured = drift_transfer(matches, state.anchor, pair.alpha)
        else:
            inputs = self._buffered()
            if inputs is None:
                rank_zero_warn(f"CMSConsolidation: pair {pair.name!r} reached a boundary with no buffered input.")
                return
            measured = distill_transfer(
                pl_module, matches, state.anchor, pair.alpha, inputs, self.distill_steps, self.distill_lr
            )
        state.transfers += 1
        values = {"transfers": float(state.transfers), **measured}
        for key, value in values.items():
            pl_module.log(f"cms/{pair.name}/{key}", value, on_step=on_step, on_epoch=not on_step, batch_size=1)

    # ------------------------------------------------------------------------------------------------ the buffer
    def _remember(self, batch: Any) -> None:
        """Keep the batch's inputs in the FIFO ring buffer of the last ``buffer_size`` inputs."""
        x = _inputs_of(batch, self.input_key).detach()
        buf = self._buffer
        if buf is None or (buf.shape[1:], buf.dtype) != (x.shape[1:], x.dtype):
            if buf is not None and self._buffer_filled:
                raise MisconfigurationException(
                    f"CMSConsolidation buffers inputs of one shape and dtype for distillation: got {tuple(x.shape[1:])}"
                    f" {x.dtype} after {tuple(buf.shape[1:])} {buf.dtype}. Pad inputs to one shape."
                )
            buf = self._buffer = torch.empty((self.buffer_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self._buffer_pos = self._buffer_filled = 0
        x = x[-self.buffer_size :].to(buf.device)
        idx = (self._buffer_pos + torch.arange(len(x), device=buf.device)) % self.buffer_size
        buf[idx] = x
        self._buffer_pos = (self._buffer_pos + len(x)) % self.buffer_size
        self._buffer_filled = min(self.buffer_size, self._buffer_filled + len(x))

    def _buffered(self) -> Optional[Tensor]:
        if self._buffer is None or not self._buffer_filled:
            return None
        return self._buffer[: self._buffer_filled]

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.has_loaded_state:  # restored, not applied yet (at train start)
            return dict(self._loaded_state or {})
        pairs = {}
        for pair in self._pairs:
            s = self._state[pair.name]
            pairs[pair.name] = {
                "fast": pair.fast,
                "slow": pair.slow,
                "mode": pair.mode,
                "anchor": dict(s.anchor),
                "count": s.count,
                "transfers": s.transfers,
                "last_stage": s.last_stage,
                "seen_updates": -1 if s.seen_updates is None else s.seen_updates,
            }
        out: dict[str, Any] = {"pairs": pairs}
        if self._buffer is not None:
            out["buffer"] = {"data": self._buffer, "pos": self._buffer_pos, "filled": self._buffer_filled}
        return out

    def _apply_loaded(self, loaded: dict[str, Any], device: torch.device) -> None:
        saved = loaded.get("pairs", {})
        for pair in self._pairs:
            s = saved.get(pair.name)
            if s is None or (s.get("fast"), s.get("slow"), s.get("mode")) != (pair.fast, pair.slow, pair.mode):
                rank_zero_warn(f"CMSConsolidation: no saved state for pair {pair.name!r}; it starts afresh.")
                self._state[pair.name] = _PairState()
                continue
            seen = int(s["seen_updates"])
            self._state[pair.name] = _PairState(
                anchor={n: a.to(device) for n, a in s["anchor"].items()},
                count=int(s["count"]),
                transfers=int(s["transfers"]),
                seen_updates=None if seen < 0 else seen,
                last_stage=int(s["last_stage"]),
            )
        dropped = sorted(set(saved) - {p.name for p in self._pairs})
        if dropped:
            rank_zero_warn(f"CMSConsolidation: the checkpoint holds state for pairs {dropped}, not configured now.")
        buffer = loaded.get("buffer")
        if buffer is not None and len(buffer["data"]) == self.buffer_size:
            self._buffer = buffer["data"].to(device)
            self._buffer_pos, self._buffer_filled = int(buffer["pos"]), int(buffer["filled"])
        elif buffer is not None:
            rank_zero_warn(
                f"CMSConsolidation: the saved buffer holds {len(buffer['data'])} slots, not buffer_size="
                f"{self.buffer_size}; it starts empty."
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_matches": {}, "_trigger": {}, "_pairs_of": []}


# ---------------------------------------------------------------------------------------------------- transfers
@torch.no_grad()
def _shift(matches: list[_Match], anchors: dict[str, Tensor], alpha: float, move_slow: bool) -> float:
    """``slow += alpha * delta`` (if ``move_slow``), ``fast = anchor + (1 - alpha) * delta``; the drift norm^2."""
    total = 0.0
    for _, fast_name, fast, _, slow in matches:
        anchor = anchors[fast_name]
        dtype = torch.promote_types(fast.dtype, torch.float32)
        delta = fast.detach().to(dtype) - anchor.to(dtype)
        total += float(delta.double().pow(2).sum())
        if move_slow:
            slow.copy_(slow.detach().to(dtype) + alpha * delta)
        fast.copy_(anchor if alpha == 1.0 else anchor.to(dtype) + (1.0 - alpha) * delta)
        anchor.copy_(fast.detach())  # distillation leaves the fast level alone: its anchor is final already
    return total


def drift_transfer(matches: list[_Match], anchors: dict[str, Tensor], alpha: float) -> dict[str, float]:
    r"""The drift transfer: the slow level moves by ``alpha`` times the fast level's change since its anchor, the fast
    level keeps ``1 - alpha`` of that change, and the anchor moves to the fast level (module docstring).

    Args:
        matches: The paired parameters, ``(relative name, fast name, fast, slow name, slow)``.
        anchors: The fast parameters' values at the previous transfer, by fast name (updated in place).
        alpha: The share of the change transferred, in ``(0, 1]``.

    Returns:
        ``{"drift_norm": ||delta||}``, what is logged besides the transfer count.

    """
    return {"drift_norm": float(_shift(matches, anchors, alpha, move_slow=True)) ** 0.5}


def distill_transfer(
    pl_module: pl.LightningModule,
    matches: list[_Match],
    anchors: dict[str, Tensor],
    alpha: float,
    inputs: Tensor,
    steps: int,
    lr: float,
) -> dict[str, float]:
    """The distill transfer: the model's outputs on ``inputs`` are the teacher, the fast level gives up ``alpha`` of
    its change since its anchor, then only the slow parameters are trained on the MSE to the teacher.

    Args:
        pl_module: The model; ``pl_module(inputs)`` returns a tensor or a tuple starting with one.
        matches: The paired parameters, ``(relative name, fast name, fast, slow name, slow)``.
        anchors: The fast parameters' values at the previous transfer, by fast name (updated in place).
        alpha: The share of the change the fast level gives up, in ``(0, 1]``.
        inputs: The buffered training inputs.
        steps: Full-buffer Adam steps on the slow parameters.
        lr: Adam's learning rate.

    Returns:
        ``drift_norm``, ``distill_loss_before`` and ``distill_loss_after`` (the losses averaged over ranks).

    """
    with torch.no_grad():
        teacher = _as_output(_forward_eval(pl_module, inputs)).detach().float()
    drift_sq = _shift(matches, anchors, alpha, move_slow=False)
    before, after = _distill(pl_module, inputs, teacher, [m[4] for m in matches], steps, lr)
    return {"drift_norm": float(drift_sq) ** 0.5, "distill_loss_before": before, "distill_loss_after": after}


def _distill(
    pl_module: pl.LightningModule, inputs: Tensor, teacher: Tensor, slow: list[Tensor], steps: int, lr: float
) -> tuple[float, float]:
    """Train only ``slow`` on the MSE to ``teacher``; returns the loss before and after (averaged over ranks)."""
    saved_grads = [p.grad for p in slow]
    optimizer = torch.optim.Adam(slow, lr=lr)
    was_training = pl_module.training
    pl_module.eval()
    n = float(len(inputs))
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = F.mse_loss(_as_output(pl_module(inputs)).float(), teacher)
                grads = torch.autograd.grad(loss, slow, allow_unused=True)
                if step == 0:
                    before = loss.detach()
                grads = _average_over_ranks(list(grads), n)
                for p, g in zip(slow, grads, strict=True):
                    p.grad = None if g is None else g.to(p.dtype)
                optimizer.step()
        with torch.no_grad():
            after = F.mse_loss(_as_output(pl_module(inputs)).float(), teacher)
    finally:
        for p, g in zip(slow, saved_grads, strict=True):
            p.grad = g
        pl_module.train(was_training)
    before, after = _average_over_ranks([before, after], n)
    return float(before), float(after)


def _finished_task(trainer: pl.Trainer) -> Optional[int]:
    """The stage of the task stream the epoch that just ended completed, if it ended on its last batch."""
    if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return None  # stopped inside the epoch (max_steps): the task is not complete
    stage_at_epoch_end = getattr(trainer.datamodule, "stage_at_epoch_end", None)
    return None if stage_at_epoch_end is None else stage_at_epoch_end(trainer.current_epoch)


# ---------------------------------------------------------------------------------------------------- helpers
def _forms(name: str, root: Optional[str]) -> list[str]:
    """The names a prefix may be written against: the full name, without ``torch.compile``'s ``_orig_mod``
    segments, and relative to the module's parameter root (as for level globs, see ``MultiFrequencyUpdates``)."""
    plain = strip_compile_prefix(name)
    forms = [name, plain]
    if root is not None and plain.startswith(strip_compile_prefix(root) + "."):
        forms.append(plain[len(strip_compile_prefix(root)) + 1 :])
    return forms


def _match(pair: ConsolidationPair, named: Mapping[str, Tensor], root: Optional[str] = None) -> list[_Match]:
    """Pair the parameters under ``pair.fast`` and ``pair.slow`` by relative name (``MisconfigurationException``);
    the prefixes may leave out ``_orig_mod`` segments and the module's parameter root."""
    sides = []
    for prefix in (pair.fast, pair.slow):
        under = {}
        for n in named:
            form = next((f for f in _forms(n, root) if f.startswith(prefix + ".")), None)
            if form is not None:
                under.setdefault(form[len(prefix) + 1 :], n)
        if not under:
            tops = sorted({n.rsplit(".", 1)[0] for n in named})[:8]
            raise MisconfigurationException(
                f"Pair {pair.name!r}: no parameter is named {prefix!r}.*; module prefixes include {tops}."
                + _legacy_cms_hint(prefix)
            )
        sides.append(under)
    fast, slow = sides
    if set(fast.values()) & set(slow.values()):
        raise MisconfigurationException(
            f"Pair {pair.name!r}: {pair.fast!r} and {pair.slow!r} share parameters (one contains the other)."
        )
    if pair.params is None:
        rels = sorted(set(fast) | set(slow))
    else:
        rels = sorted({r for r in set(fast) | set(slow) if any(fnmatch.fnmatchcase(r, g) for g in pair.params)})
        unused = [g for g in pair.params if not any(fnmatch.fnmatchcase(r, g) for r in set(fast) | set(slow))]
        if unused:
            raise MisconfigurationException(
                f"Pair {pair.name!r}: `params` {unused} match no relative name; available: {sorted(set(fast))[:8]}."
            )
    alone = [f"{pair.fast}.{r}" if r in fast else f"{pair.slow}.{r}" for r in rels if (r in fast) != (r in slow)]
    if alone:
        raise MisconfigurationException(
            f"Pair {pair.name!r}: {alone} have no partner on the other side; restrict the pair with `params`."
        )
    shapes = [
        f"{r}: {tuple(named[fast[r]].shape)} vs {tuple(named[slow[r]].shape)}"
        for r in rels
        if named[fast[r]].shape != named[slow[r]].shape
    ]
    if shapes:
        raise MisconfigurationException(
            f"Pair {pair.name!r}: paired parameters differ in shape ({shapes}); leave them out with `params`."
        )
    return [(r, fast[r], named[fast[r]], slow[r], named[slow[r]]) for r in rels]


def _inputs_of(batch: Any, key: Optional[Union[int, str]]) -> Tensor:
    if key is not None:
        x = batch[key]
    elif isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    elif isinstance(batch, Mapping) and batch:
        x = next(iter(batch.values()))
    else:
        x = batch
    if not isinstance(x, Tensor):
        raise MisconfigurationException(
            f"CMSConsolidation needs the model's input tensor from each batch, got {type(x).__name__}; set `input_key`"
            " to the index or key of the input field."
        )
    return x


def _as_output(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise MisconfigurationException(
            f"CMSConsolidation distills `pl_module(x)`, which must return a tensor (or a tuple starting with one);"
            f" got {type(out).__name__}."
        )
    return out


def _forward_eval(pl_module: pl.LightningModule, inputs: Tensor) -> Any:
    was_training = pl_module.training
    pl_module.eval()
    try:
        return pl_module(inputs)
    finally:
        pl_module.train(was_training)


def _average_over_ranks(tensors: list[Optional[Tensor]], weight: float) -> list[Optional[Tensor]]:
    """The ``weight``-weighted mean of each tensor over the ranks (no-op outside a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    present = [t for t in tensors if t is not None]
    total = torch.tensor(weight, device=present[0].device if present else None)
    dist.all_reduce(total)
    out: list[Optional[Tensor]] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t * weight
        dist.all_reduce(t)
        out.append(t / total)
    return out
