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
Multi-Frequency Updates
^^^^^^^^^^^^^^^^^^^^^^^

Update groups of parameters at different frequencies, the optimizer-step axis of the Continuum Memory System
(Eq. 31, NL NeurIPS): a level with period ``C`` takes one optimizer step per ``C`` committed steps, on the mean (or
sum) of the ``C`` gradients it received, and is invisible to the optimizer in between. A step with no backward (a
``training_step`` that returned ``None``) is not committed; parameters that join an optimizer late
(``BackboneFinetuning``) start their level's clock when they join; stepping an optimizer behind the callback's back
raises before anything moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from nl_lightning._sharded import gather_full
from nl_lightning.callbacks._state import ConfiguredStateKey
from nl_lightning.callbacks._step_hooks import Phase, StepHookCallback, optimizer_of_params
from nl_lightning.levels import Level, LevelSet, StepPlan, as_levels

__all__ = ["MultiFrequencyUpdates", "parameter_root"]

#: The attribute a LightningModule sets to the name of the sub-module that level globs may be written relative to.
PARAMETER_ROOT_ATTRIBUTE = "nl_parameter_root"


def parameter_root(pl_module: pl.LightningModule) -> Optional[str]:
    """The sub-module that ``pl_module``'s level globs may be written relative to: its ``nl_parameter_root``.

    A LightningModule that wraps a model sets the class attribute ``nl_parameter_root`` to the name of the attribute
    holding it (:class:`~nl_lightning.models.hf_lm.HFCausalLM` sets ``"hf_model"``), so that the glob
    ``"model.layers.1.*"`` selects ``"hf_model.model.layers.1.*"``. Full names keep working.

    Args:
        pl_module: The LightningModule.

    Returns:
        The sub-module's dotted name, or ``None`` when the module declares none.

    Raises:
        MisconfigurationException: If ``nl_parameter_root`` is not a string or names no sub-module of ``pl_module``.

    """
    root = getattr(pl_module, PARAMETER_ROOT_ATTRIBUTE, None)
    if root is None:
        return None
    if not isinstance(root, str) or not root:
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.{PARAMETER_ROOT_ATTRIBUTE} must be None or the name of a sub-module such as"
            f" 'hf_model', got {root!r}."
        )
    try:
        pl_module.get_submodule(root)
    except AttributeError as err:
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.{PARAMETER_ROOT_ATTRIBUTE} is {root!r}, which names no sub-module of the"
            f" model ({err}). Set it to the attribute that holds the wrapped model, or to None."
        ) from err
    return root


def _nested_strategy(trainer: pl.Trainer) -> Optional[Any]:
    """The Trainer's strategy if it is a :class:`~nl_lightning.strategies.NestedDDPStrategy`, else ``None``."""
    from nl_lightning.strategies.nested_ddp import NestedDDPStrategy  # the strategy module imports this one

    return trainer.strategy if isinstance(trainer.strategy, NestedDDPStrategy) else None


class MultiFrequencyUpdates(ConfiguredStateKey, StepHookCallback):
    r"""Give groups of parameters their own update period: the optimizer-step axis of Eq. 31 (NL NeurIPS).

    For every parameter ``p`` of a level with period ``C``:

    - ``p`` takes exactly one optimizer step per ``C`` *committed* optimizer steps. A step a ``GradScaler`` skipped
      is not committed and contributes nothing; nor is a step without any gradient (a ``training_step`` that returned
      ``None``, so Lightning ran no backward): it ticks no clock;
    - that step uses the mean (``reduction="mean"``) or the sum (``"sum"``, as printed in Eq. 31) of the ``C``
      gradients ``p`` received since its previous step, kept in fp32 buffers (float64 for float64 parameters);
    - on the other steps ``p``'s value and its optimizer state (moments, step count, momentum, weight decay) are
      untouched: the optimizer never sees a gradient for ``p``;
    - clocks and partial buffers are saved in checkpoints, keyed by parameter name, so a run resumed in the middle of a
      chunk continues bit-for-bit.

    Parameters matched by no level are updated on every step, as usual. Clocks count committed optimizer steps, never
    ``global_step``: with ``accumulate_grad_batches=k`` a period ``C`` spans ``C * k`` batches.

    **Parameters that join late.** The callback follows the optimizers' parameter groups at every step, so parameters
    added with ``optimizer.add_param_group`` (as :class:`~lightning.pytorch.callbacks.BackboneFinetuning` does when it
    unfreezes a backbone) are masked like the others. A level whose parameters are in no optimizer neither steps nor
    ticks; its clock starts, with empty buffers, when its first parameters join, so it first updates ``C`` committed
    steps later. A parameter that joins a level in the middle of a chunk takes its first step with the level, on the
    mean of the gradients it received since it joined. ``num_updates`` counts each level's updates.

    It composes with gradient clipping (off-step gradients are unclipped while they wait; the chunk mean joins the
    global norm on the update step), 32-true / bf16-mixed / 16-mixed / 64-true, several optimizers (a level must live
    in one optimizer), manual optimization, DDP and ``torch.compile``, and with FSDP2: ``ModelParallelStrategy`` with
    ``fully_shard`` applied in ``configure_model`` (levels are resolved at fit start, on the sharded parameters;
    buffers are sharded like their gradients and gathered whole into the checkpoint, which rank 0 writes). DeepSpeed
    and FSDP1 (``FSDPStrategy``) are refused, and so is a fused optimizer under a ``GradScaler`` (it unscales inside
    ``step()``, out of this callback's reach).

    **Data parallel.** Under ``DDPStrategy`` every gradient, a slow level's included, is all-reduced on every step.
    :class:`~nl_lightning.strategies.NestedDDPStrategy` leaves the levels with ``every > 1`` out of DDP: their buffers
    hold each process's local sums, and :meth:`prepare_step` has the strategy all-reduce a level's chunk gradient once,
    on its update step (and, under a ``GradScaler``, agree across processes on skipping a step).

    **Names.** A glob matches a parameter's full name (``pl_module.named_parameters()``), that name without the
    ``_orig_mod`` segments ``torch.compile`` inserts, and, when the LightningModule sets ``nl_parameter_root`` (the
    attribute holding a wrapped model, see :func:`parameter_root`), the name relative to it: for
    :class:`~nl_lightning.models.hf_lm.HFCausalLM`, ``"model.layers.1.*"`` selects ``"hf_model.model.layers.1.*"``.
    A tied weight (one tensor under several names, as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) is
    matched through any of its names and follows one period: the callback reports it at ``setup`` (a warning when
    the level's globs named only some of the names), and two levels claiming it through different names is an error.

    **Several instances.** The checkpoint key names the levels and their globs (not their periods, so a resumed run
    may change a period), so differently configured instances each save and restore their own state; two instances
    with the same levels are refused by Lightning, and instances sharing a parameter or a level name are refused at
    train start. A checkpoint written with the former key (the class name) still loads.

    **Manual optimization.** ``opt.step()`` on the optimizer returned by ``self.optimizers()`` needs nothing more:
    Lightning calls ``on_before_optimizer_step`` inside it. If you read or clip gradients *before* ``opt.step()``
    (for example with ``self.clip_gradients``), call :meth:`prepare_step` first (on every instance), so that you act
    on the gradients the optimizer will see. Stepping the raw ``torch.optim.Optimizer`` bypasses the hook: unless
    :meth:`prepare_step` was called, a torch step pre-hook raises a ``RuntimeError`` before any parameter moves (for
    ``step(closure)``, right after the closure ran).

    **Non-finite gradients.** A non-finite gradient (inf or NaN) never enters a level's buffer nor reaches its
    parameters. Under a ``GradScaler`` (``16-mixed`` on a GPU) the scaler skips such a step and nothing is committed.
    Without one (``bf16-mixed``, ``32-true``, or ``16-mixed`` on a CPU, which Lightning runs as ``bf16-mixed``), a
    level whose gradients on a step are not finite is masked on that step and left out of its commit: its clock does
    not tick, its buffers keep what they held and a due level stays due (a warning names it the first time).
    Parameters in no level are the optimizer's business and step as usual. With ``nonfinite="raise"`` the run stops
    with a ``FloatingPointError`` instead.

    **Resuming with changed levels.** The checkpoint records each level's period, count, parameters and held
    gradients, and a resumed run continues by one rule: a parameter's next step uses the mean (or sum) of every
    gradient it received since its own previous step (see :meth:`~nl_lightning.levels.LevelSet.load_state_dict`). A
    changed period keeps the level's position (a shortened period updates as soon as the count reaches it, on the
    gradients held so far and the current one); a parameter new to a level joins it like a parameter added
    mid-chunk; one that moved from another level brings its held gradients. Each change is reported with a warning.
    A resume that would drop held gradients (their parameter is now in no level) is refused, naming the parameters.

    Args:
        levels: A list of :class:`~nl_lightning.Level` (in YAML, dicts with ``name``, ``params``, ``every``; ``params``
            a glob or a list of globs), or a mapping ``{glob: every}`` that makes one level per glob, named after it.
        reduction: ``"mean"`` (default) or ``"sum"`` of the chunk's gradients.
        nonfinite: ``"skip"`` (default) masks a level on a step whose gradients for it are not finite and leaves the
            step out of its clock and buffers; ``"raise"`` stops the run with a ``FloatingPointError``.

    Raises:
        MisconfigurationException: On an empty or malformed ``levels``, duplicate level names, a non-string glob,
            ``every < 1``, an unknown ``reduction`` or ``nonfinite`` (at construction); on a glob that matches no
            parameter, a parameter claimed by two levels (of this or another instance, or a tied tensor through two of
            its names), an invalid ``nl_parameter_root``, a level name used by two instances, DeepSpeed or FSDP1, or a
            fused optimizer under a ``GradScaler`` (at ``setup`` / train start); on a resume that would drop held
            gradients (at train start); on a level spread over two optimizers (at train start, or at the step where
            added parameter groups spread it).
        RuntimeError: When an optimizer is about to step on gradients the callback has not prepared (a raw
            ``torch.optim.Optimizer`` stepped without :meth:`prepare_step`), before any parameter moves.
        FloatingPointError: With ``nonfinite="raise"``, on a step whose gradients for a level are not finite (without
            a ``GradScaler``), before any parameter moves.

    Example::

        from lightning.pytorch import Trainer
        from nl_lightning import Level
        from nl_lightning.callbacks import MultiFrequencyUpdates

        updates = MultiFrequencyUpdates([Level("head", ["head.*"]), Level("backbone", ["backbone.*"], every=8)])
        trainer = Trainer(callbacks=[updates], max_epochs=10)
        trainer.fit(model, datamodule=dm)
        updates.num_updates  # {'head': ..., 'backbone': ...}

    """

    step_phases = (Phase.PLAN, Phase.COMMIT)
    refused_strategies = {
        DeepSpeedStrategy: "it owns backward, the optimizer step and gradient accumulation (under ZeRO-2/3 the"
        " gradients are not in `p.grad`), so it cannot hold back a level's gradients between its updates",
        FSDPStrategy: "FSDP1 keeps each wrapped module's gradients in one flat parameter, not per parameter, so it"
        " cannot hold back a level's gradients between its updates",
    }
    strategy_fix = (
        "Use FSDP2: strategy=ModelParallelStrategy() with `torch.distributed.fsdp.fully_shard` applied in the"
        " LightningModule's `configure_model` (it shards per parameter); or strategy='ddp' (or a single device)."
    )
    method_tag = "multi_frequency"  # the name ContinualEvaluation gives this callback in a method's name

    def __init__(
        self,
        levels: Union[Sequence[Level], dict[str, int]],
        reduction: Literal["mean", "sum"] = "mean",
        nonfinite: Literal["skip", "raise"] = "skip",
    ) -> None:
        super().__init__()
        try:
            self._levels = as_levels(levels)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if reduction not in ("mean", "sum"):
            raise MisconfigurationException(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
        self._reduction = reduction
        if nonfinite not in ("skip", "raise"):
            raise MisconfigurationException(
                f"`nonfinite` must be 'skip' (mask a level on a step with inf/NaN gradients) or 'raise', got"
                f" {nonfinite!r}."
            )
        self._nonfinite = nonfinite
        self._scaled = False  # a GradScaler skips non-finite steps itself
        self._warned_nonfinite: set[str] = set()
        self._global_step = 0  # the Trainer's global step at the current batch, for messages
        self._book: Optional[LevelSet] = None
        self._levels_of: list[list[str]] = []  # per optimizer index: the levels whose parameters it holds
        self._plans: dict[int, StepPlan] = {}  # per optimizer index: the prepared step awaiting its commit
        self._groups_seen: Optional[tuple[Any, ...]] = None  # the optimizers' parameter groups `_levels_of` reflects
        self._nested: Optional[Any] = None  # the NestedDDPStrategy of the running fit, which all-reduces slow levels

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """The levels' names and globs (not their periods: a resumed run may change a period)."""
        return {"levels": {lvl.name: list(lvl.params) for lvl in self._levels}}

    @property
    def levels(self) -> tuple[Level, ...]:
        """The configured levels."""
        return self._levels

    @property
    def book(self) -> LevelSet:
        """The :class:`~nl_lightning.levels.LevelSet` holding clocks and buffers (available from ``setup``)."""
        if self._book is None:
            raise RuntimeError("MultiFrequencyUpdates.book is available once `trainer.fit` has called `setup`.")
        return self._book

    @property
    def num_updates(self) -> dict[str, int]:
        """The number of updates each level has taken."""
        if self._book is None:
            return {lvl.name: 0 for lvl in self._levels}
        return self._book.num_updates

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)  # refuses DeepSpeed and FSDP1, joins the step protocol
        if trainer.accumulate_grad_batches > 1:
            rank_zero_warn(
                f"MultiFrequencyUpdates counts optimizer steps: with accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} a level with every=C updates once per"
                f" C * {trainer.accumulate_grad_batches} batches."
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            return  # `configure_model` has not run yet: it creates and shards the parameters (resolved at fit start)
        self._resolve_book(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # FSDP2's `fully_shard` (in `configure_model`, after `setup`) replaces the parameters by sharded ones.
        self._resolve_book(pl_module)

    def _resolve_book(self, pl_module: pl.LightningModule) -> None:
        """Match the levels against the module's parameters, unless the book already holds them (a second ``fit``
        keeps its clocks and buffers)."""
        if self._book is not None and self._book_belongs_to(pl_module):
            return
        root = parameter_root(pl_module)
        try:
            named = pl_module.named_parameters(remove_duplicate=False)
            self._book = LevelSet(self._levels, named, self._reduction, root=root, nonfinite=self._nonfinite)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self._report_ties(self._book)

    def _report_ties(self, book: LevelSet) -> None:
        """Say which levelled tensors are tied (one tensor, several names) and whose period they follow."""
        every = {lvl.name: lvl.every for lvl in book.levels}
        for tie in book.tied:
            others = [n for n in tie.names if n not in tie.matched]
            if others:
                rank_zero_warn(
                    f"Level {tie.level!r} (every={every[tie.level]}) matched {list(tie.matched)}, which is tied to"
                    f" {others}: one tensor under {len(tie.names)} names, so {others} also follow that level's period."
                    f" Name {others} in the level's globs to make this explicit, or untie the weights."
                )
            else:
                rank_zero_info(
                    f"MultiFrequencyUpdates: {list(tie.names)} are one tensor (tied weights); it follows level"
                    f" {tie.level!r} (every={every[tie.level]})."
                )

    def _book_belongs_to(self, pl_module: pl.LightningModule) -> bool:
        """Whether the book was resolved on this module's parameters (a second ``fit`` keeps clocks and buffers)."""
        named = dict(pl_module.named_parameters())
        return all(named.get(n) is p for lvl in self.book.levels for n, p in self.book.params(lvl.name))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        book = self.book
        loaded = self.take_loaded_state()
        if loaded is not None:
            self._load_level_state(book, loaded)
        self._check_other_instances(trainer)
        self._follow_param_groups(trainer.optimizers, force=True)
        self._warn_long_periods(trainer, book)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaled = scaler is not None
        for opt in trainer.optimizers:
            if scaler is not None and getattr(opt, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"{type(opt).__name__} unscales gradients inside `step()` (a fused optimizer), so the gradients"
                    " MultiFrequencyUpdates buffers would still be scaled. Use the non-fused optimizer (fused=False)"
                    " or precision='bf16-mixed', which needs no GradScaler."
                )
        self._plans.clear()
        self._nested = _nested_strategy(trainer)
        super().on_train_start(trainer, pl_module)

    @staticmethod
    def _load_level_state(book: LevelSet, state: dict[str, Any]) -> None:
        """Restore the saved levels into ``book``, reporting each change; refuse to drop held gradients."""
        result = book.compare_state_dict(state)  # check first: a refused resume leaves the book untouched
        lost = [entry for entry in result.unexpected if "/" in entry]
        if lost:
            raise MisconfigurationException(
                f"MultiFrequencyUpdates cannot resume: the checkpoint holds gradients of {lost} (level/parameter) that"
                " their levels have not applied yet, and those parameters are in no configured level now, so the"
                " gradients would be dropped. Keep them in a level (for example the saved one) for this resume; once"
                " that level has taken its next update, save a checkpoint and change the levels then."
            )
        book.load_state_dict(state, strict=False)
        for what, names in zip(("not in the checkpoint", "no longer configured", "changed"), result, strict=True):
            if names:
                rank_zero_warn(
                    f"MultiFrequencyUpdates resumed with levels {what}: {names}. Each parameter's next step uses the"
                    " mean of the gradients it received since its previous step (or since it joined its level)."
                )

    @staticmethod
    def _warn_long_periods(trainer: pl.Trainer, book: LevelSet) -> None:
        """Warn about a level whose period is longer than the run: it would never update."""
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # an infinite or unsized loader: the run's length is unknown
            return
        if not isinstance(total, (int, float)) or total == float("inf"):
            return
        for lvl in book.levels:
            if lvl.every > total:
                rank_zero_warn(
                    f"Level {lvl.name!r} has every={lvl.every}, but this run takes {int(total)} optimizer steps in all"
                    f" (max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}), so it will never update."
                    f" Lower its `every` to at most {int(total)}, or train for at least {lvl.every} steps."
                )

    def _check_other_instances(self, trainer: pl.Trainer) -> None:
        """Refuse a parameter or a level name shared with another ``MultiFrequencyUpdates`` of the Trainer."""
        book = self.book
        mine = {id(p): (lvl.name, n) for lvl in book.levels for n, p in book.params(lvl.name)}
        for other in self.protocol(trainer).participants(MultiFrequencyUpdates):
            if other is self or other._book is None:
                continue
            clash = sorted({lvl.name for lvl in self._levels} & {lvl.name for lvl in other.levels})
            if clash:
                raise MisconfigurationException(
                    f"The level name {clash[0]!r} is used by two MultiFrequencyUpdates callbacks; level names name"
                    " logs, rule targets and checkpoint entries, so they must be unique across callbacks. Rename one."
                )
            for lvl in other.book.levels:
                for n, p in other.book.params(lvl.name):
                    if id(p) in mine:
                        raise MisconfigurationException(
                            f"Parameter {n!r} is in level {mine[id(p)][0]!r} of one MultiFrequencyUpdates callback and"
                            f" in level {lvl.name!r} of another; a parameter may belong to one level only. Narrow one"
                            " of the globs."
                        )

    def _follow_param_groups(self, optimizers: list[Optimizer], force: bool = False) -> None:
        """Re-resolve which levels each optimizer holds if its parameter groups changed (``add_param_group``)."""
        seen = tuple(tuple((id(g["params"]), len(g["params"])) for g in opt.param_groups) for opt in optimizers)
        if not force and seen == self._groups_seen:
            return
        self._levels_of = self._map_levels_to_optimizers(self.book, optimizers, warn=force)
        self.book.sync(p for opt in optimizers for g in opt.param_groups for p in g["params"])
        self._groups_seen = seen

    @staticmethod
    def _map_levels_to_optimizers(book: LevelSet, optimizers: list[Optimizer], warn: bool) -> list[list[str]]:
        holder = optimizer_of_params(optimizers)
        levels_of: list[list[str]] = [[] for _ in optimizers]
        for lvl in book.levels:
            where = {holder.get(id(p)) for _, p in book.params(lvl.name)}
            if len(where - {None}) > 1:
                raise MisconfigurationException(
                    f"Level {lvl.name!r} has parameters in optimizers {sorted(where - {None})}; a level's clock counts"
                    " the steps of one optimizer. Split it into one level per optimizer."
                )
            if None in where and warn:
                orphans = [n for n, p in book.params(lvl.name) if id(p) not in holder]
                rank_zero_warn(
                    f"Level {lvl.name!r}: parameters {orphans[:5]} are in no optimizer. They stay untouched until an"
                    " optimizer holds them (for example once `BackboneFinetuning` adds them); a level whose parameters"
                    " are all outside the optimizers starts its clock when they join."
                )
            for i in where - {None}:
                levels_of[i].append(lvl.name)
        return levels_of

    # ------------------------------------------------------------------------------------------------ a step
    def prepare_step(self, optimizer: Union[Optimizer, Any]) -> StepPlan:
        """Mask and reduce the gradients of ``optimizer``'s levels for the coming step.

        The step protocol calls it in its plan phase (from ``on_before_optimizer_step``), so you need it only in
        manual optimization when you read or clip gradients before ``opt.step()``, or step a raw
        ``torch.optim.Optimizer``. It is idempotent: until the step happens, or a new backward replaces the gradients,
        further calls return the same plan. It first catches up with parameter groups added since the previous step.
        If no backward reached the optimizer's parameters since its last step and none of them has a gradient (a
        ``training_step`` that returned ``None``), the plan is empty: nothing is masked and the step ticks no clock.

        Under :class:`~nl_lightning.strategies.NestedDDPStrategy` it communicates (the due slow levels' all-reduce,
        and the ``GradScaler``'s found-inf flags once they exist): call it on every process, at the same point.

        Args:
            optimizer: The optimizer about to step (a ``LightningOptimizer`` is unwrapped).

        Returns:
            The :class:`~nl_lightning.levels.StepPlan`: which levels update on this step.

        Raises:
            RuntimeError: If called before training started or with an optimizer the Trainer does not know.

        """
        i = self.optimizer_index(optimizer)
        optimizers = self.step_optimizers
        if self._nested is not None:  # a non-finite local gradient on one process makes every process skip the step
            self._nested.sync_found_inf(optimizers[i])
        self._follow_param_groups(optimizers)
        plan = self._plans.get(i)
        if plan is None or not plan.is_current():
            if not self.step_has_gradients(i):  # no backward and no gradient: the plan commits nothing
                params = [p for g in optimizers[i].param_groups for p in g["params"]]
                plan = StepPlan((), {}, tuple((p, None) for p in params))
            else:
                reduce = None if self._nested is None else self._nested.reduce_level_gradients
                # under a GradScaler a non-finite step is the scaler's to skip: mask the level, never raise
                plan = self.book.prepare(self._levels_of[i], reduce=reduce, nonfinite="skip" if self._scaled else None)
                self._warn_skipped(plan)
            self._plans[i] = plan
        return plan

    def _warn_skipped(self, plan: StepPlan) -> None:
        """Name, once per level, a level masked on a step for its non-finite gradients (without a GradScaler)."""
        new = [name for name in plan.skipped if name not in self._warned_nonfinite]
        if not new or self._scaled:
            return
        self._warned_nonfinite.update(new)
        step = self._global_step
        rank_zero_warn(
            f"MultiFrequencyUpdates: non-finite gradients (inf or NaN) in level(s) {new} at optimizer step {step}; the"
            " step is skipped for them (their parameters, clocks and buffers are unchanged; warned once per level)."
            " This usually means an overflow: lower the learning rate, use precision='16-mixed' on a GPU (a GradScaler"
            " skips such steps) or '32-true', or pass nonfinite='raise' to stop the run."
        )

    @override
    def on_step_phase(
        self, phase: Phase, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: Optimizer
    ) -> None:
        """Plan the step (mask, reduce, publish the due levels); after it, commit the plan."""
        if phase is Phase.PLAN:
            plan = self.prepare_step(optimizer)
            self.protocol(trainer).add_due(index, plan.due)
        elif phase is Phase.COMMIT:
            self._commit(index)

    def _has_slow_level(self, i: int) -> bool:
        return any(lvl.every > 1 for lvl in self.book.levels if lvl.name in self._levels_of[i])

    def _refuse_unprepared(self, i: int) -> None:
        raise RuntimeError(
            f"Optimizer {i} is about to step without MultiFrequencyUpdates seeing its gradients, which would move its"
            " slow levels off their schedule (no parameter has moved yet). In manual optimization step the optimizer"
            " returned by `self.optimizers()`, or call `MultiFrequencyUpdates.prepare_step(opt)` after the last"
            " backward and before `opt.step()`."
        )

    @override
    def on_optimizer_step_start(
        self, index: int, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Refuse, before any parameter moves, a step whose gradients this callback has not prepared.

        With a ``closure`` (Lightning's own steps pass one that runs ``on_before_optimizer_step``) the check runs
        right after the closure, still before the update.
        """
        self._follow_param_groups(self.step_optimizers)
        plan = self._plans.get(index)
        if (plan is not None and plan.is_current()) or not self._has_slow_level(index):
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if not callable(closure):
            self._refuse_unprepared(index)
        checked = self._checked_closure(index, closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": checked}
        return (checked, *args[1:]), kwargs

    def _checked_closure(self, index: int, closure: Callable[[], Any]) -> Callable[[], Any]:
        def checked() -> Any:
            result = closure()
            plan = self._plans.get(index)
            if plan is None or not plan.is_current():
                self._refuse_unprepared(index)
            return result

        return checked

    def _commit(self, i: int) -> None:
        """The step really happened (the protocol's commit phase, in a torch step post-hook): commit its plan."""
        plan = self._plans.pop(i, None)
        if plan is None:
            if self._has_slow_level(i):  # the pre-hook refuses such a step: only reachable if it was bypassed
                raise RuntimeError(
                    f"Optimizer {i} stepped without MultiFrequencyUpdates seeing its gradients, so its slow levels"
                    " just moved off their schedule. In manual optimization step the optimizer returned by"
                    " `self.optimizers()`, or call `MultiFrequencyUpdates.prepare_step(opt)` before `opt.step()`."
                )
            plan = self.book.prepare(self._levels_of[i])  # every level is due: only the update counts move
        self.book.commit(plan)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A plan still pending here belongs to a step that did not happen (a GradScaler skipped it): drop it, the
        # held gradients contribute nothing and a due level stays due.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._plans.clear()

    # ------------------------------------------------------------------------------------------------ tear-down
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._plans.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._plans.clear()
        self._nested = None

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._book is None:
            return dict(self._loaded_state or {})
        # Sharded (FSDP2) buffers are gathered whole: rank 0 writes the callback state for all ranks.
        return gather_full(self._book.state_dict())

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_plans": {}, "_groups_seen": None, "_nested": None}
