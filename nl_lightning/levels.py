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
Levels
^^^^^^

A :class:`Level` names a group of parameters and the period ``C`` at which they learn. :class:`LevelSet` keeps the
bookkeeping that makes the period exact, the optimizer-step reading of the Continuum Memory System's update rule
(Eq. 31, NL NeurIPS):

.. math::

    \theta^{(\ell)}_{i+1} = \theta^{(\ell)}_i - \eta \, \mathrm{reduce}_{t=i-C+1}^{i} \nabla\mathcal{L}(\theta_t)
    \quad \text{if } i \equiv 0 \pmod{C}, \text{ else unchanged}

Between two updates of a level its parameters have no gradient as far as the optimizer can tell (``p.grad is None``),
so their values *and* their optimizer state (Adam moments, step counts, momentum buffers, weight decay) are untouched.
The gradients they received meanwhile wait in side buffers (fp32, or the parameter's dtype for float64 and complex
parameters); on the level's update step the optimizer sees their mean (or sum). The clocks count *committed* optimizer
steps: a step that did not happen (for example one skipped by a ``GradScaler``) is never committed and contributes
nothing. A non-finite gradient never enters a buffer: a level whose gradients on a step are not finite is masked on
that step and left out of its commit (or, with ``nonfinite="raise"``, the step raises).

A resumed run may change its levels (:meth:`LevelSet.load_state_dict`): each parameter's next step still uses the
mean of every gradient it received since its own previous step, whether its period changed, it joined a level, or it
moved from one level to another; held gradients that no level would take are reported, never dropped silently.

Parameters can join an optimizer late (``optimizer.add_param_group``, as when a frozen backbone is unfrozen): tell the
engine with :meth:`LevelSet.sync`, and it leaves alone the parameters no optimizer holds. A level starts its clock
when its first parameters join; a parameter that joins a level in the middle of a chunk takes its first step with the
level, on the mean of the gradients it received since it joined.

Level globs match a parameter's full name, the name without the ``_orig_mod`` segments of ``torch.compile``, and the
name relative to a wrapped model (``root``); a tied weight is one tensor, matched through any of its names, that
follows one level (:class:`ParameterNames`, :attr:`LevelSet.tied`).

This module is plain PyTorch (no Lightning import), so the same engine works in a hand-written loop::

    book = LevelSet([Level("slow", ["backbone.*"], every=8)], model.named_parameters())
    for x, y in loader:
        loss_fn(model(x), y).backward()
        plan = book.prepare()      # hide off-step levels, write the chunk mean for due ones
        optimizer.step()
        book.commit(plan)          # only after a step that really happened
        optimizer.zero_grad()

A batch without a backward (nothing to learn from) should not step, prepare or commit at all: it does not tick a
clock. :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` is the Lightning adapter around it.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from nl_lightning._sharded import is_dtensor, shard_like
from nl_lightning._validation import is_int

__all__ = [
    "GradientReducer",
    "IncompatibleLevels",
    "Level",
    "LevelSet",
    "ParameterNames",
    "StepPlan",
    "TiedParameter",
    "buffer_dtype",
    "resolve_levels",
    "strip_compile_prefix",
]

Reduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")
NonFinite = Literal["skip", "raise"]
_NONFINITE = ("skip", "raise")

#: ``reduce(level, params, grads) -> grads``: an optional step of :meth:`LevelSet.prepare` on a due level of period
#: ``> 1``. It gets the level's name, its parameters (those an optimizer holds, in the model's order) and, for each, the
#: gradient the optimizer is about to see (the chunk's mean or sum, in the buffer dtype, see :func:`buffer_dtype`), or
#: ``None`` where the parameter received no gradient. It returns one tensor (the parameter's shape) or ``None`` per
#: parameter; ``prepare`` writes them into ``p.grad`` in the parameter's dtype (``None`` leaves ``p.grad`` unset). It
#: may modify the tensors it gets. Used to average over processes gradients that each process accumulated locally.
GradientReducer = Callable[[str, Sequence[Tensor], Sequence[Optional[Tensor]]], Sequence[Optional[Tensor]]]


@dataclass(frozen=True)
class Level:
    """A group of parameters that takes one optimizer step every ``every`` committed optimizer steps.

    Args:
        name: A unique name, used in logs (``nested/<name>/...``) and checkpoints.
        params: fnmatch globs over the model's ``named_parameters()`` names, for example ``"backbone.*"`` or
            ``"*.cms.blocks.2.*"``. A single string is taken as one glob. ``torch.compile``'s ``_orig_mod`` segments
            may be left out, and names may be relative to a wrapped model (see :class:`ParameterNames`).
        every: The level's period ``C >= 1``. Parameters matched by no level behave as period 1.

    Raises:
        ValueError: If ``name`` is not a non-empty string, a glob is not a non-empty string, no glob is given, or
            ``every`` is not an integer ``>= 1``.

    Example::

        Level("backbone", ["backbone.*"], every=8)

    """

    name: str
    params: Union[str, Sequence[str]]
    every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Level name must be a non-empty string, got {self.name!r}.")
        params = (self.params,) if isinstance(self.params, str) else self.params
        if not isinstance(params, Iterable):
            raise ValueError(
                f"Level {self.name!r}: `params` must be a list of glob strings such as ['backbone.*'], got {params!r}."
            )
        params = tuple(params)
        if not params:
            raise ValueError(f"Level {self.name!r}: `params` is empty; give at least one glob such as 'backbone.*'.")
        for glob in params:
            if not isinstance(glob, str) or not glob:
                raise ValueError(
                    f"Level {self.name!r}: every glob in `params` must be a non-empty string, got {glob!r}"
                    f" ({type(glob).__name__}). Write parameter names as strings, for example 'backbone.*'."
                )
        if not is_int(self.every) or self.every < 1:
            raise ValueError(
                f"Level {self.name!r}: `every` must be an integer >= 1 (the number of optimizer steps between two"
                f" updates), got {self.every!r}."
            )
        object.__setattr__(self, "params", params)


def as_levels(levels: Sequence[Level] | Mapping[str, int]) -> tuple[Level, ...]:
    """Normalise the accepted level specifications into a tuple of :class:`Level`.

    Args:
        levels: Either a sequence of :class:`Level` (or of dicts with the fields of :class:`Level`), or a mapping
            from glob to period, where each glob becomes a level named after it.

    Raises:
        ValueError: If an entry is not a level, or two levels share a name.

    """
    if isinstance(levels, Mapping):
        out = tuple(Level(name=glob, params=(glob,), every=every) for glob, every in levels.items())
    elif isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise ValueError(
            f"`levels` must be a list of Level objects or a mapping {{glob: every}}, got {levels!r}."
            " Example: [Level('slow', ['backbone.*'], every=8)] or {'backbone.*': 8}."
        )
    else:
        out = tuple(lvl if isinstance(lvl, Level) else _level_from_dict(lvl) for lvl in levels)
    if not out:
        raise ValueError("`levels` is empty; give at least one Level, for example Level('slow', ['backbone.*'], 8).")
    seen: set[str] = set()
    for lvl in out:
        if lvl.name in seen:
            raise ValueError(f"Two levels are named {lvl.name!r}; level names must be unique. Rename one of them.")
        seen.add(lvl.name)
    return out


def _level_from_dict(spec: Any) -> Level:
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "params", "every"}
        if not unknown:
            return Level(**spec)
        raise ValueError(f"Level spec {dict(spec)!r} has unknown keys {sorted(unknown)}; use name, params, every.")
    raise ValueError(f"Each entry of `levels` must be a Level (or a dict name/params/every), got {spec!r}.")


class TiedParameter(NamedTuple):
    """A tensor of a level that the model holds under several names (tied weights, such as GPT-2's ``lm_head`` and
    ``wte``): it follows ``level``'s period under every one of them."""

    level: str  # the level whose period the tensor follows
    names: tuple[str, ...]  # every name of the tensor, the one ``named_parameters()`` gives first
    matched: tuple[str, ...]  # the names the level's globs matched


_COMPILE_SEGMENT = "_orig_mod"


def strip_compile_prefix(name: str) -> str:
    """``name`` without its ``_orig_mod`` segments, the wrapper ``torch.compile`` inserts (``"a._orig_mod.b"`` ->
    ``"a.b"``)."""
    if _COMPILE_SEGMENT not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILE_SEGMENT)


class ParameterNames:
    """The parameters of a model, one entry per tensor, with every name a glob may match.

    A glob matches a parameter if it matches (fnmatch, ``*`` also matches dots) one of its names:

    - its full name, as in ``model.named_parameters()``;
    - that name with every ``_orig_mod`` segment removed (the wrapper ``torch.compile`` inserts), so globs are the
      same with and without compilation;
    - that name relative to ``root``, a sub-module (for a LightningModule that wraps a model, the attribute holding
      it; see :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`), so ``"model.layers.1.*"`` selects
      ``"hf_model.model.layers.1.*"`` when ``root="hf_model"``.

    A tensor reachable under several names (tied weights) is one entry, named as ``named_parameters()`` names it (the
    first name met); a glob matching any of its names selects it.

    Args:
        named_parameters: ``(name, parameter)`` pairs; pass ``model.named_parameters(remove_duplicate=False)`` so
            that the aliases of tied weights are known (with the default ``remove_duplicate=True`` only the first
            name of a tied tensor can be matched).
        root: The dotted name of the sub-module that relative names start from; ``None``: no relative names.

    Raises:
        ValueError: If ``root`` is neither ``None`` nor a non-empty string.

    Example::

        index = ParameterNames(module.named_parameters(remove_duplicate=False), root="hf_model")
        index.match("model.layers.1.*")  # [("hf_model.model.layers.1.self_attn.q_proj.weight", p), ...]

    """

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], root: Optional[str] = None) -> None:
        if root is not None and (not isinstance(root, str) or not root):
            raise ValueError(f"`root` must be None or a module name such as 'hf_model', got {root!r}.")
        self.root = root
        prefix = None if root is None else strip_compile_prefix(root) + "."
        where: dict[int, int] = {}
        self.params: list[Tensor] = []
        self.aliases: list[list[str]] = []  # per tensor: its names, the first being its name
        self.forms: list[list[tuple[str, tuple[str, ...]]]] = []  # per tensor: (alias, the names a glob may match)
        for name, p in named_parameters:
            i = where.get(id(p))
            if i is None:
                i = where[id(p)] = len(self.params)
                self.params.append(p)
                self.aliases.append([])
                self.forms.append([])
            if name in self.aliases[i]:
                continue
            self.aliases[i].append(name)
            plain = strip_compile_prefix(name)
            forms = [name] + ([plain] if plain != name else [])
            if prefix is not None and plain.startswith(prefix):
                forms.append(plain[len(prefix) :])
            self.forms[i].append((name, tuple(forms)))

    @property
    def names(self) -> list[str]:
        """The name of each tensor (the first name ``named_parameters()`` gives it), in the model's order."""
        return [aliases[0] for aliases in self.aliases]

    def match_indices(self, glob: str) -> list[tuple[int, tuple[str, ...]]]:
        """The tensors ``glob`` matches, as ``(index, the aliases it matched)``, in the model's order."""
        out = []
        for i, forms in enumerate(self.forms):
            hit = tuple(alias for alias, names in forms if any(fnmatch.fnmatch(n, glob) for n in names))
            if hit:
                out.append((i, hit))
        return out

    def match(self, glob: str) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs ``glob`` matches (each tensor once, under its name), in the model's order."""
        return [(self.aliases[i][0], self.params[i]) for i, _ in self.match_indices(glob)]

    def display_names(self) -> list[str]:
        """Each name as a user would write it in a glob: relative to ``root`` when under it, without ``_orig_mod``."""
        return [names[-1] for forms in self.forms for _, names in forms]

    def hint(self, glob: str) -> str:
        """A sentence listing the names closest to ``glob``, for an error message about a glob that matches nothing."""
        return _name_hint(glob, self.display_names()) + _legacy_cms_hint(glob)


def _legacy_cms_hint(pattern: str) -> str:
    """A ``ContinuumMemory``'s blocks are named ``blocks.<i>``; point a pattern written as ``levels.<i>`` there."""
    if "levels." not in pattern:
        return ""
    return f" A ContinuumMemory's blocks are named `blocks.<i>`: write {pattern.replace('levels.', 'blocks.')!r}."


def resolve_levels(
    levels: Sequence[Level], named_parameters: Iterable[tuple[str, Tensor]], root: Optional[str] = None
) -> dict[str, list[tuple[str, Tensor]]]:
    """Match every level's globs against the parameter names (see :class:`ParameterNames` for what a glob matches).

    Args:
        levels: The levels, with unique names.
        named_parameters: ``(name, parameter)`` pairs, typically ``model.named_parameters()``; with
            ``remove_duplicate=False`` a glob may name any alias of a tied weight.
        root: The sub-module relative names start from (``None``: full names only).

    Returns:
        For each level name, its ``(name, parameter)`` pairs in the model's order, each tensor once under the name
        ``named_parameters()`` gives it.

    Raises:
        ValueError: If a glob matches no parameter, or a parameter (under one name, or a tied tensor under two) is
            matched by two levels.

    """
    return _resolve(levels, ParameterNames(named_parameters, root))[0]


def _resolve(
    levels: Sequence[Level], index: ParameterNames
) -> tuple[dict[str, list[tuple[str, Tensor]]], list[TiedParameter]]:
    owner: dict[int, tuple[str, str, tuple[str, ...]]] = {}  # tensor index -> (level name, glob, aliases matched)
    named: dict[int, set[str]] = {}  # tensor index -> the aliases its level's globs matched
    for lvl in levels:
        for glob in lvl.params:
            hits = index.match_indices(glob)
            if not hits:
                raise ValueError(
                    f"Level {lvl.name!r}: the glob {glob!r} matches no parameter of the model. {index.hint(glob)}"
                )
            for i, aliases in hits:
                prev = owner.get(i)
                if prev is not None and prev[0] != lvl.name:
                    shared = [a for a in aliases if a in named[i]]
                    if shared:
                        raise ValueError(
                            f"Parameter {shared[0]!r} is matched by level {prev[0]!r} (glob {prev[1]!r}) and by level"
                            f" {lvl.name!r} (glob {glob!r}); a parameter may belong to one level only. Narrow one of"
                            " the globs."
                        )
                    raise ValueError(
                        f"Parameters {prev[2][0]!r} (level {prev[0]!r}, glob {prev[1]!r}) and {aliases[0]!r} (level"
                        f" {lvl.name!r}, glob {glob!r}) are one tensor (tied weights), which can follow one period"
                        " only. Put its names in one level, or narrow one of the globs."
                    )
                owner.setdefault(i, (lvl.name, glob, aliases))
                named.setdefault(i, set()).update(aliases)
    out: dict[str, list[tuple[str, Tensor]]] = {lvl.name: [] for lvl in levels}
    tied: list[TiedParameter] = []
    for i, p in enumerate(index.params):
        if i in owner:
            level, aliases = owner[i][0], index.aliases[i]
            out[level].append((aliases[0], p))
            if len(aliases) > 1:
                tied.append(TiedParameter(level, tuple(aliases), tuple(a for a in aliases if a in named[i])))
    return out, tied


def _name_hint(glob: str, names: list[str]) -> str:
    close = difflib.get_close_matches(glob.replace("*", ""), names, n=3, cutoff=0.5)
    shown = (close + [n for n in names if n not in close])[:6]
    more = "" if len(names) <= len(shown) else f" (of {len(names)})"
    return f"The model's parameters include {shown}{more}; fix the glob or remove it."


def _local(t: Tensor) -> Tensor:
    """This process's part of ``t``: its local shard for a ``DTensor`` (FSDP2), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _not_finite(grad: Optional[Tensor]) -> bool:
    return grad is not None and not bool(torch.isfinite(_local(grad)).all())


def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of ``dtype`` is buffered in: fp32 for fp16 / bf16 / fp32, else ``dtype`` (float64)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _Clock:
    """The runtime state of one level: its clock, its update count and its partial gradient sums."""

    level: Level
    params: list[tuple[str, Tensor]]
    count: int = 0  # committed contributions since the level's last update
    updates: int = 0  # updates taken
    buffers: dict[str, Tensor] = field(default_factory=dict)  # sums (see `buffer_dtype`), reused every chunk
    fresh: set[str] = field(default_factory=set)  # names whose buffer holds this chunk's sum
    members: Optional[set[str]] = None  # names an optimizer holds (`LevelSet.sync`); None: all, never declared
    joined: dict[str, int] = field(default_factory=dict)  # member -> the count when it joined the running chunk
    active: list[tuple[str, Tensor]] = field(default_factory=list)  # the members' (name, parameter) pairs

    def __post_init__(self) -> None:
        self.active = list(self.params)

    @property
    def due(self) -> bool:
        return self.count + 1 >= self.level.every

    @property
    def idle(self) -> bool:
        """No optimizer holds any of the level's parameters: it neither steps nor ticks."""
        return self.members is not None and not self.members


class StepPlan(NamedTuple):
    """What :meth:`LevelSet.prepare` did to the gradients of one step, kept until :meth:`LevelSet.commit`.

    ``due`` lists the levels updating on this step. ``held`` maps each level that is not due to the ``(name,
    gradient)`` pairs of its parameters (references, not copies), to be added to its buffers once the step is
    committed. ``skipped`` lists the levels whose gradients on this step were not finite: their parameters are masked
    (``p.grad = None``) and the commit leaves them as they were (no tick, nothing added, a due level stays due). A
    plan with none of these (a step with no gradient at all) commits nothing.
    """

    due: tuple[str, ...]
    held: dict[str, list[tuple[str, Optional[Tensor]]]]
    written: tuple[tuple[Tensor, Optional[Tensor]], ...]  # (param, the grad object it was left with)
    skipped: tuple[str, ...] = ()  # levels whose gradients were not finite: masked, and left out of the commit

    def is_current(self) -> bool:
        """Whether the gradients are still those this plan left (no backward or ``zero_grad`` happened since)."""
        return all(p.grad is g for p, g in self.written)


class IncompatibleLevels(NamedTuple):
    """Differences found by :meth:`LevelSet.load_state_dict` between a saved state and the configured levels."""

    missing: list[str]  # configured levels with no saved state: they start a fresh chunk
    unexpected: list[str]  # saved levels that are not configured, and "level/parameter" for held gradients dropped
    changed: list[str]  # changed periods, memberships ("level: joined [...]", "level: left [...]") and reduction


class LevelSet:
    """The bookkeeping of a set of levels over one model: clocks, gradient buffers and gradient masking.

    Buffers are fp32 for fp16, bf16 and fp32 parameters, and in the parameter's dtype for float64 (and complex) ones.

    Globs match full names, names without ``torch.compile``'s ``_orig_mod`` segments, and names relative to ``root``
    (see :class:`ParameterNames`). A tensor is one entry under the name ``named_parameters()`` gives it (clocks and
    checkpoints use that name); given ``named_parameters(remove_duplicate=False)``, a glob may name any alias of a
    tied weight, and :attr:`tied` lists the levelled tensors that have several names.

    Args:
        levels: The levels (see :func:`as_levels` for the accepted forms).
        named_parameters: ``(name, parameter)`` pairs of the model, typically ``model.named_parameters()``, or
            ``model.named_parameters(remove_duplicate=False)`` to let globs name the aliases of tied weights.
        reduction: ``"mean"`` (default) steps on the mean of the ``C`` gradients of a chunk; ``"sum"`` on their sum,
            as printed in Eq. 31.
        root: The dotted name of a sub-module that globs may also be written relative to (``None``: none).
        nonfinite: What :meth:`prepare` does when a level's gradients on a step are not finite (inf or NaN, as after
            an overflow under ``bf16-mixed`` or ``16-mixed`` without a ``GradScaler``): ``"skip"`` (default) masks the
            level on that step and leaves it out of the commit, so a non-finite gradient never enters a buffer nor
            reaches the level's parameters; ``"raise"`` raises a ``FloatingPointError`` before anything moves.

    Raises:
        ValueError: On an invalid level, an unknown reduction or ``nonfinite``, a glob that matches nothing, a
            parameter claimed by two levels, or a tied tensor claimed by two levels through different names.

    """

    def __init__(
        self,
        levels: Sequence[Level] | Mapping[str, int],
        named_parameters: Iterable[tuple[str, Tensor]],
        reduction: Reduction = "mean",
        root: Optional[str] = None,
        nonfinite: NonFinite = "skip",
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"`nonfinite` must be one of {_NONFINITE}, got {nonfinite!r}.")
        self.levels = as_levels(levels)
        self.reduction = reduction
        self.nonfinite = nonfinite
        matched, tied = _resolve(self.levels, ParameterNames(named_parameters, root))
        #: The levelled tensors that the model holds under several names, and the level each follows.
        self.tied: list[TiedParameter] = tied
        self._clocks = {lvl.name: _Clock(lvl, matched[lvl.name]) for lvl in self.levels}

    # ------------------------------------------------------------------------------------------------ queries
    def params(self, level: str) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs owned by ``level``."""
        return self._clocks[level].params

    @property
    def num_updates(self) -> dict[str, int]:
        """The number of updates each level has taken."""
        return {name: c.updates for name, c in self._clocks.items()}

    @property
    def counts(self) -> dict[str, int]:
        """For each level, the committed steps since its last update (its position inside the current chunk)."""
        return {name: c.count for name, c in self._clocks.items()}

    def is_due(self, level: str) -> bool:
        """Whether ``level`` updates on the next committed step."""
        return self._clocks[level].due

    def members(self, level: str) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs of ``level`` that an optimizer holds (all of them until :meth:`sync`)."""
        return self._clocks[level].active

    # ------------------------------------------------------------------------------------------------ membership
    def sync(self, held: Iterable[Tensor]) -> dict[str, tuple[list[str], list[str]]]:
        """Declare which parameters the optimizers hold now; the engine leaves the others alone.

        Call it whenever the optimizers' parameter groups change (``optimizer.add_param_group``). The first call adopts
        the holding as it is (a resumed run keeps its saved buffers). After that, for each level:

        - a parameter that joins starts with an empty buffer. If the level was inside a chunk, the parameter takes its
          first step with the level, on the mean of the gradients it received since it joined; if none of the level's
          parameters were held before, the level starts a new chunk (its clock starts when its parameters join);
        - a parameter that leaves drops its partial sum;
        - a level none of whose parameters are held neither steps nor ticks.

        Args:
            held: Every parameter of every optimizer, for example
                ``[p for g in optimizer.param_groups for p in g["params"]]``.

        Returns:
            For each level whose holding changed (never on the first call): the names that joined and those that left.

        """
        ids = {id(p) for p in held}
        changes: dict[str, tuple[list[str], list[str]]] = {}
        for name, clock in self._clocks.items():
            now = {n for n, p in clock.params if id(p) in ids}
            before, clock.members = clock.members, now
            clock.active = [(n, p) for n, p in clock.params if n in now]
            for n in [n for n in clock.buffers if n not in now]:
                clock.buffers.pop(n)
                clock.fresh.discard(n)
                clock.joined.pop(n, None)
            if before is None or before == now:
                continue
            if not before:  # the level's clock starts when its first parameters join
                clock.count = 0
                clock.joined.clear()
            elif clock.count:
                clock.joined.update({n: clock.count for n in now - before})
            order = [n for n, _ in clock.params]
            changes[name] = ([n for n in order if n in now - before], [n for n in order if n in before - now])
        return changes

    # ------------------------------------------------------------------------------------------------ a step
    def prepare(
        self,
        levels: Optional[Iterable[str]] = None,
        reduce: Optional[GradientReducer] = None,
        nonfinite: Optional[NonFinite] = None,
    ) -> StepPlan:
        """Rewrite the gradients before an optimizer step.

        A level that is not due gets ``p.grad = None`` on all its parameters, so the optimizer skips them; a due level
        gets the mean (or sum) of its buffered gradients and the current one. Call it once per step, after backward
        (and after unscaling, under a ``GradScaler``), before clipping and ``optimizer.step()``. Only the parameters an
        optimizer holds (see :meth:`sync`) are touched.

        A level whose current gradients are not all finite is masked on this step (``p.grad = None``) and listed in
        the plan's ``skipped``: the commit neither ticks its clock nor adds to its buffers, and a due level stays due,
        so its next update is the mean over the finite gradients. With ``nonfinite="raise"`` a ``FloatingPointError``
        is raised instead. When ``torch.distributed`` is initialized with several processes, the finiteness flags are
        all-reduced (one small all-reduce per call), so every process skips the same levels: call it on every process.

        Args:
            levels: Restrict the step to these levels (for example those whose parameters the stepping optimizer
                holds). ``None`` means all levels that an optimizer holds parameters of.
            reduce: Called once for each due level of period ``> 1`` (see :data:`GradientReducer`), with the level's
                chunk gradients before they are written, for example to average over processes gradients that were
                accumulated locally (:class:`~nl_lightning.strategies.NestedDDPStrategy`). ``None``: written as they
                are.
            nonfinite: ``"skip"`` or ``"raise"`` for this call; ``None``: the engine's ``nonfinite``.

        Returns:
            The plan to pass to :meth:`commit` once the step has really happened.

        Raises:
            FloatingPointError: With ``nonfinite="raise"``, if a level's gradients are not finite (nothing was
                modified).

        """
        policy = self.nonfinite if nonfinite is None else nonfinite
        if policy not in _NONFINITE:
            raise ValueError(f"`nonfinite` must be one of {_NONFINITE}, got {policy!r}.")
        names = [n for n in (self._clocks if levels is None else levels) if not self._clocks[n].idle]
        bad = self._nonfinite_levels(names)
        if bad and policy == "raise":
            where = {name: [n for n, p in self._clocks[name].active if _not_finite(p.grad)][:5] for name in bad}
            raise FloatingPointError(
                f"Non-finite gradients (inf or NaN) in level(s) {where}; they would enter the level's buffer and its"
                " parameters. Lower the learning rate, use precision='16-mixed' on a GPU (its GradScaler skips such"
                " steps) or 32-true, or set nonfinite='skip' to mask the level on such steps."
            )
        due: list[str] = []
        held: dict[str, list[tuple[str, Optional[Tensor]]]] = {}
        written: list[tuple[Tensor, Optional[Tensor]]] = []
        for name in names:
            clock = self._clocks[name]
            if name in bad:
                for _, p in clock.active:
                    p.grad = None
                    written.append((p, None))
                continue
            if clock.due:
                due.append(name)
                if clock.level.every > 1:
                    reduced = self._write_reduced(clock) if reduce is None else self._write_all_reduced(clock, reduce)
                    written.extend(reduced)
                elif clock.count or clock.fresh or clock.joined:
                    # a period-1 level holds gradients only after a resume changed its levels: they join this step
                    # (without `reduce`: its gradients are averaged by DDP, and the loaded buffers agree across ranks)
                    written.extend(self._write_reduced(clock))
                continue
            grads = []
            for pname, p in clock.active:
                grads.append((pname, p.grad))
                p.grad = None
                written.append((p, None))
            held[name] = grads
        return StepPlan(tuple(due), held, tuple(written), tuple(bad))

    def _nonfinite_levels(self, names: Sequence[str]) -> list[str]:
        """The levels among ``names`` whose current gradients are not all finite (agreed over processes)."""
        flags: list[Tensor] = []
        device: Optional[torch.device] = None
        for name in names:
            grads = [_local(p.grad) for _, p in self._clocks[name].active if p.grad is not None]
            grads = [g for g in grads if g.numel()]
            if device is None and self._clocks[name].active:
                device = _local(self._clocks[name].active[0][1]).device
            if grads:  # the max-norm is inf or NaN exactly when an element is
                norms = torch._foreach_norm(grads, float("inf"))
                flags.append(torch.stack([n.float().to(device) for n in norms]).isfinite().all().logical_not())
            else:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))
        if not flags:
            return []
        found = torch.stack([f.to(device) for f in flags]).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return [name for name, f in zip(names, found.tolist(), strict=True) if f]

    def _write_reduced(self, clock: _Clock) -> list[tuple[Tensor, Optional[Tensor]]]:
        """Write ``reduce(buffer + grad)`` into the gradients of a due level (Eq. 31)."""
        written = []
        for name, p in clock.active:
            n = clock.count + 1 - clock.joined.get(name, 0)  # the steps since the chunk began, or since it joined
            g = p.grad
            buf = clock.buffers[name] if name in clock.fresh else None
            if buf is None:
                if g is not None and self.reduction == "mean" and n > 1:
                    g.div_(n)
            else:
                if g is None:
                    total = buf.clone()
                else:
                    total = g.add_(buf) if g.dtype == buf.dtype else g.to(buf.dtype).add_(buf)
                if self.reduction == "mean":
                    total.div_(n)
                if g is None:
                    p.grad = total.to(p.dtype)
                elif total is not g:
                    g.copy_(total)
            written.append((p, p.grad))
        return written

    def _write_all_reduced(self, clock: _Clock, reduce: GradientReducer) -> list[tuple[Tensor, Optional[Tensor]]]:
        """Like :meth:`_write_reduced`, with the chunk gradients (in the buffer dtype) passed through ``reduce``."""
        params = [p for _, p in clock.active]
        totals: list[Optional[Tensor]] = []
        for name, p in clock.active:
            n = clock.count + 1 - clock.joined.get(name, 0)  # the steps since the chunk began, or since it joined
            g = p.grad
            buf = clock.buffers[name] if name in clock.fresh else None
            dtype = buffer_dtype(p.dtype)
            if g is None and buf is None:
                totals.append(None)
                continue
            if buf is None:
                total = g if g.dtype == dtype else g.to(dtype)
            elif g is None:
                total = buf.clone()
            else:
                total = g.add_(buf) if g.dtype == dtype else g.to(dtype).add_(buf)
            if self.reduction == "mean" and n > 1:
                total.div_(n)
            totals.append(total)
        reduced = list(reduce(clock.level.name, params, totals))
        if len(reduced) != len(params):
            raise ValueError(
                f"The gradient reducer returned {len(reduced)} gradients for the {len(params)} parameters of level"
                f" {clock.level.name!r}; it must return one (or None) per parameter, in order."
            )
        written = []
        for p, total in zip(params, reduced, strict=True):
            if total is None:
                p.grad = None
            elif p.grad is None:
                p.grad = total.to(p.dtype, copy=True)
            elif total is not p.grad:
                p.grad.copy_(total)
            written.append((p, p.grad))
        return written

    def commit(self, plan: StepPlan) -> None:
        """Advance the clocks after a step that really happened.

        Due levels restart their chunk; the others add the held gradients to their buffers (see :func:`buffer_dtype`);
        skipped levels (non-finite gradients) are left as they were.
        """
        for name in plan.due:
            clock = self._clocks[name]
            clock.count = 0
            clock.updates += 1
            clock.fresh.clear()
            clock.joined.clear()
        for name, grads in plan.held.items():
            clock = self._clocks[name]
            for pname, g in grads:
                if g is None or (clock.members is not None and pname not in clock.members):
                    continue
                if pname in clock.fresh:
                    clock.buffers[pname].add_(g)
                    continue
                buf = clock.buffers.get(pname)
                dtype = buffer_dtype(g.dtype)
                if buf is None or buf.device != g.device or buf.dtype != dtype:
                    buf = clock.buffers[pname] = torch.empty_like(g, dtype=dtype)
                buf.copy_(g)
                clock.fresh.add(pname)
            clock.count += 1
        plan.held.clear()  # the held gradients now live in the buffers: release them before the next backward

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The clocks, update counts, members and partial sums, keyed by level and parameter name.

        ``params`` lists the level's parameters, so that a resumed run whose globs select other parameters can tell
        who joined and who left, and ``held`` those an optimizer held (all of them until :meth:`sync`). ``joined``
        holds, for a parameter whose held gradients do not span the whole running chunk (it joined inside it, or
        brought gradients from another level on a resume), the level's count minus the number of steps it holds.

        The result holds only tensors, strings, integers, lists and dicts, so it loads with
        ``torch.load(weights_only=True)``.
        """
        return {
            "reduction": self.reduction,
            "levels": {
                name: {
                    "every": c.level.every,
                    "count": c.count,
                    "updates": c.updates,
                    "params": [n for n, _ in c.params],
                    "held": [n for n, _ in c.active],
                    "buffers": {n: c.buffers[n] for n in sorted(c.fresh)},
                    "joined": dict(sorted(c.joined.items())),
                }
                for name, c in self._clocks.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleLevels:
        """Restore clocks and buffers saved by :meth:`state_dict`, also when the levels changed since.

        Buffers are copied to the device of their parameter, in its buffer dtype (fp32, or float64 for a float64
        parameter), and sharded as the parameter when it is a ``DTensor`` (FSDP2): a saved whole tensor is cut into
        each rank's shard locally, so every rank must load the same state.

        Changed levels follow one rule: a parameter's next step uses the mean (or sum) of every gradient it received
        since its own previous step, and held gradients are never dropped silently.

        - A level that kept its name keeps its clock (count and updates); a new level starts a fresh chunk.
        - A period that changed keeps the level's position: it updates as soon as its count reaches the new period
          (at once when the period shrank below it, a period of 1 included), on the reduction of what it holds and
          the current gradient.
        - A parameter new to a level (its glob widened, or the globs now select other parameters) that was in no level
          joins like a parameter added to an optimizer mid-chunk: its first step with the level uses the mean of the
          gradients it received since the resume. A parameter that moved from another level brings its held
          gradients and their count, so its first step in its new level is the mean over all of them.
        - Held gradients of a parameter that is now in no level (or no longer in the model) cannot be applied: they
          are reported in ``unexpected`` as ``"level/parameter"`` (and dropped, unless ``strict``).

        States saved before ``params`` was recorded are taken to have the configured membership.

        Args:
            state_dict: A state from :meth:`state_dict`.
            strict: Raise if the saved levels, periods, memberships or parameter names differ from the configured
                ones, or the reduction changed. With ``strict=False`` the differences are returned instead.

        Returns:
            The differences (all empty when the configuration is the saved one).

        Raises:
            ValueError: If ``strict`` and the state does not match the configuration.

        """
        result, origin = self._differences(state_dict)
        if strict and any(result):
            raise ValueError(
                f"The saved level state does not match the configured levels: missing {result.missing}, unexpected"
                f" {result.unexpected}, changed {result.changed}. Configure the same levels as the run that saved it,"
                " or load with strict=False to continue with the changed levels."
            )
        saved = state_dict.get("levels", {})
        for name, clock in self._clocks.items():
            s = saved.get(name)
            clock.count, clock.updates = (int(s["count"]), int(s["updates"])) if s is not None else (0, 0)
            clock.fresh.clear()
            clock.joined = {}
            for n, p in clock.params:
                lvl, steps, buf = origin.get(n, (None, 0, None))
                start = clock.count - (steps if lvl is not None else 0)  # the count when its held gradients began
                if start:
                    clock.joined[n] = start
                if buf is not None:
                    clock.buffers[n] = shard_like(buf, p, buffer_dtype(p.dtype))  # a DTensor if p is one
                    clock.fresh.add(n)
        return result

    def compare_state_dict(self, state_dict: Mapping[str, Any]) -> IncompatibleLevels:
        """The differences :meth:`load_state_dict` would report for ``state_dict``, without loading anything."""
        return self._differences(state_dict)[0]

    def _differences(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[IncompatibleLevels, dict[str, tuple[str, int, Optional[Tensor]]]]:
        saved = state_dict.get("levels", {})
        missing = [name for name in self._clocks if name not in saved]
        unexpected = [name for name in saved if name not in self._clocks]
        changed = []
        if state_dict.get("reduction", self.reduction) != self.reduction:
            changed.append(f"reduction {state_dict.get('reduction')!r} -> {self.reduction!r}")
        # Where each saved parameter was: (saved level, steps it holds, its buffer or None).
        origin: dict[str, tuple[str, int, Optional[Tensor]]] = {}
        for name, s in saved.items():
            count, joined = int(s["count"]), s.get("joined", {})
            clock = self._clocks.get(name)
            members = s.get("params")
            if members is None:  # saved before memberships were recorded: assume the configured one
                members = [n for n, _ in clock.params] if clock is not None else list(s["buffers"])
            held = set(s.get("held", members))
            for n in dict.fromkeys([*members, *s["buffers"]]):
                steps = count - int(joined.get(n, 0)) if n in held else 0
                origin[n] = (name, steps, s["buffers"].get(n))
        owner = {n: name for name, c in self._clocks.items() for n, _ in c.params}
        for name, s in saved.items():
            clock = self._clocks.get(name)
            if clock is not None and s["every"] != clock.level.every:
                changed.append(f"{name}: every {s['every']} -> {clock.level.every}")
        for name, clock in self._clocks.items():
            was = {n for n, (lvl, _, _) in origin.items() if lvl == name}
            now = [n for n, _ in clock.params]
            joined = [n for n in now if n not in was]
            if name in saved and joined:
                changed.append(f"{name}: joined {joined}")
            if name in saved:
                left = sorted(n for n in was if n not in now)
                if left:
                    changed.append(f"{name}: left {left}")
        for n, (name, _, buf) in origin.items():
            if n not in owner and buf is not None:
                unexpected.append(f"{name}/{n}")
        return IncompatibleLevels(missing, unexpected, changed), origin
