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
Converted Hugging Face Models: Generation, Saving and Loading
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

A ``transformers`` causal LM whose FFNs :func:`~nl_lightning.models.to_cms` turned into token-axis CMS chains
(:class:`~nl_lightning.models.CMSAdapter`) writes fast weights along the sequence. Two things of the Hugging Face
round trip need to know that:

**Generation with the key/value cache.** A cached generation step calls the model with the new token(s) only, while
the CMS fast weights must continue from the tokens read before. :func:`install_generation_hooks` (which
:func:`~nl_lightning.models.to_cms` calls on a ``PreTrainedModel``) makes every in-context adapter carry its state
through a call that continues a cached sequence (the cache it is given holds tokens) and start fresh on a call that
begins one (no cache, or an empty one), so ``model.generate()`` computes what a full forward pass of the whole
sequence computes. It checks that the adapters have read exactly the tokens the cache holds (and that the cache was
not reordered behind their back), and raises otherwise. Beam search is followed: the model's ``_reorder_cache``
(which ``generate`` calls to reorder the cache between beam steps) also reorders the fast weights.

- ``use_cache=False`` re-reads the whole sequence at every step, each call a new sequence: exact as well.
- Padding: the CMS has no attention mask, so pad tokens are read and written like any token. Cached generation still
  equals a full forward of the same padded batch, but a left-padded sample's output differs from the same sample
  unpadded (a warning says so once, when a padded batch meets a level with ``inner_lr > 0``). Generate one prompt at a
  time, or prompts of equal length, where that matters.
- An adapter built with ``carry_state=True`` keeps streaming: a new cached sequence continues its stream instead of
  starting fresh (call ``reset_state()`` for a fresh start), and the consistency check counts the tokens from the
  start of the cached sequence.
- Caches that drop tokens (``cache.crop()``, as in assisted generation) cannot be followed: the next call raises.
- A training-mode call with gradients on, or one that returns no cache, keeps no state behind (nothing continues
  it), so training holds no extra memory; an FFN shared by several layers cannot follow a cache (a continued call
  raises; ``use_cache=False`` works).

**Saving and loading.** ``model.save_pretrained`` writes the CMS parameters under their own names
(``...mlp.cms.levels.0.w1``), which the plain architecture does not have: a plain ``from_pretrained`` of such a
directory builds the original FFNs, initialises them at random (transformers' load report lists them as missing and
the CMS tensors as unexpected) and drops the CMS. Save with :func:`save_pretrained_cms` and load with
:func:`from_pretrained_cms`, which re-applies the recorded conversions and loads every tensor strictly. The directory
is a normal ``save_pretrained`` directory plus ``nl_cms_conversions.json``; its ``config.json`` carries an ``nl_cms``
entry naming the loader, so a model loaded plainly shows it in ``model.config.nl_cms``, and
:func:`is_cms_checkpoint` tells such a directory apart.

Example::

    from transformers import LlamaConfig, LlamaForCausalLM
    from nl_lightning.models import to_cms
    from nl_lightning.models.hf_cms import from_pretrained_cms, save_pretrained_cms

    model = to_cms(LlamaForCausalLM(LlamaConfig(...)), "model.layers.*.mlp", [16, 256], inner_lr=0.01)
    out = model.generate(input_ids, max_new_tokens=32)  # equals greedy decoding by full forward passes
    save_pretrained_cms(model, "ckpt")
    model = from_pretrained_cms("ckpt")  # the same model, CMS levels included

"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from nl_lightning.models.cms import CMSState
from nl_lightning.models.to_cms import CMSAdapter, to_cms

__all__ = [
    "CONVERSIONS_FILE",
    "from_pretrained_cms",
    "install_generation_hooks",
    "is_cms_checkpoint",
    "save_pretrained_cms",
]

#: the file :func:`save_pretrained_cms` writes next to the model's files, and :func:`from_pretrained_cms` reads
CONVERSIONS_FILE = "nl_cms_conversions.json"
_FORMAT = 1
_HOOKS_ATTR = "_nl_cms_generation"
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.x passes `cache`; `past_key_values` is the old name
_LOADER = "nl_lightning.models.hf_cms.from_pretrained_cms"


# ----------------------------------------------------------------------------------------------------------- generation
def install_generation_hooks(model: nn.Module) -> None:
    """Make the in-context CMS adapters of ``model`` follow its key/value cache (see the module docstring).

    Registers a forward pre-hook and a forward hook on ``model`` and a pre-hook on each in-context
    :class:`~nl_lightning.models.CMSAdapter`, and sets ``model._reorder_cache`` (the method ``generate`` calls to
    reorder the cache in beam search) so that it also reorders the fast weights. Idempotent: a second call replaces
    the hooks of the first (and picks up adapters converted since). A model without in-context adapters gets no
    hooks. :func:`~nl_lightning.models.to_cms` calls it on a ``transformers`` ``PreTrainedModel``; call it yourself on
    another model whose forward takes the cache as the keyword ``cache`` or ``past_key_values``.

    Per call of ``model`` (nested calls are left alone):

    - a call given a cache that holds tokens continues that sequence: every in-context adapter carries its state
      through the call, after a check that it has read as many tokens as the cache holds since the sequence began
      (and that the cache rows are in the order of the adapters' states, where the cache lets this be checked);
    - any other call begins a sequence: adapters with ``carry_state=False`` start from fresh fast weights, and keep
      the state the call ends with if a following call may continue it (the call returned a cache, and was not a
      training-mode call with gradients on); adapters with ``carry_state=True`` continue their stream.

    An adapter that the model holds under several names (one FFN shared by several layers) runs several times per
    forward pass; it keeps its configured behaviour, and a call that continues a cache raises.

    After the call every adapter's ``carry_state`` is as it was configured.

    Args:
        model: The converted model (a ``transformers`` causal LM, or the base model inside one).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Example::

        install_generation_hooks(model)  # after to_cms(model, ...) on a model that is not a PreTrainedModel

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    old = model.__dict__.get(_HOOKS_ATTR)
    if old is not None:
        old.remove()
    found: dict[int, tuple[CMSAdapter, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CMSAdapter) and module.cms.in_context:
            found.setdefault(id(module), (module, []))[1].append(name)
    adapters = [(names[0], m) for m, names in found.values() if len(names) == 1]
    shared = [names for _, names in found.values() if len(names) > 1]
    if adapters or shared:
        _GenerationHooks(model, adapters, shared)


class _GenerationHooks:
    """The hooks of one model (see :func:`install_generation_hooks`) and what they track between its calls."""

    def __init__(self, model: nn.Module, adapters: list[tuple[str, CMSAdapter]], shared: list[list[str]]) -> None:
        self.adapters = adapters
        self.shared = shared  # adapters called under several names: each call continues no other, so none is followed
        self.tokens: dict[int, int] = {}  # id(adapter) -> tokens read since the cached sequence began
        self.configured: dict[int, bool] = {}  # id(adapter) -> its carry_state, during a call
        self.fingerprint: Optional[Tensor] = None  # the newest cached key of the last call's cache, per row
        self.depth = 0
        self.warned_padding = False
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]
        self.handles += [a.register_forward_pre_hook(self._count) for _, a in adapters]
        self.model = model
        # `generate` calls `model._reorder_cache(cache, beam_idx)` when the model has one (else `cache.reorder_cache`)
        self.replaced = model.__dict__.get("_reorder_cache")  # an instance attribute of the user's, restored on remove
        self.inner_reorder = getattr(model, "_reorder_cache", None)
        model.__dict__["_reorder_cache"] = self._reorder_cache
        model.__dict__[_HOOKS_ATTR] = self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.replaced is not None:
            self.model.__dict__["_reorder_cache"] = self.replaced
        else:
            self.model.__dict__.pop("_reorder_cache", None)
        self.model.__dict__.pop(_HOOKS_ATTR, None)

    # -- hooks
    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.depth:
            self.depth += 1
            return
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        past = _cached_tokens(cache)
        if past and self.shared:
            raise ValueError(
                f"The CMS adapter shared by the modules {self.shared[0]} runs several times per forward pass, so its"
                " fast weights cannot follow a key/value cache (each run would continue the previous run's state)."
                " Generate with `use_cache=False`: every step then re-reads the whole sequence."
            )
        if past:
            self._check_continuation(cache, past)  # raises before anything changes
        else:
            self._warn_on_padding(kwargs.get("attention_mask"))
        self.depth = 1
        for _, adapter in self.adapters:
            key = id(adapter)
            self.configured[key] = adapter.carry_state
            if not past:
                self.tokens[key] = 0
                if not adapter.carry_state:
                    adapter.reset_state()
            adapter.carry_state = True

    def _after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self.depth:  # `_before` raised: nothing was changed
            return
        self.depth -= 1
        if self.depth:
            return
        for _, adapter in self.adapters:
            adapter.carry_state = self.configured.pop(id(adapter), adapter.carry_state)
        cache = _output_cache(output)
        if cache is None:
            cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        opaque = not isinstance(output, dict) and not hasattr(output, "__dataclass_fields__")  # a tuple: keep
        if output is None or (model.training and torch.is_grad_enabled()) or (cache is None and not opaque):
            # Nothing can continue this call (it raised part way, returned no cache, or was a training step): drop
            # the states that only the hooks kept, so that they do not hold memory until the next call.
            for _, adapter in self.adapters:
                if not adapter.carry_state:
                    adapter.reset_state()
            self.tokens.clear()
            self.fingerprint = None
            return
        self.fingerprint = _fingerprint(cache)

    def _count(self, adapter: nn.Module, args: tuple) -> None:
        if self.depth:
            x = args[0]
            key = id(adapter)
            self.tokens[key] = self.tokens.get(key, 0) + (x.shape[-2] if x.dim() >= 3 else 1)

    def _reorder_cache(self, cache: Any, beam_idx: Tensor) -> Any:
        """Reorder the cache (as ``generate`` would) and the adapters' fast weights by the same rows."""
        if self.inner_reorder is not None:
            cache = self.inner_reorder(cache, beam_idx)
        elif hasattr(cache, "reorder_cache"):
            cache.reorder_cache(beam_idx)
        else:
            raise ValueError(
                f"{type(self.model).__name__} cannot use beam search with this cache ({type(cache).__name__}): it"
                " cannot be reordered."
            )
        for _, adapter in self.adapters:
            if adapter.state is not None:
                adapter.state = _select_rows(adapter.state, beam_idx.to(adapter.state.levels[0].w1.device))
        if self.fingerprint is not None:
            self.fingerprint = self.fingerprint.index_select(0, beam_idx.to(self.fingerprint.device))
        return cache

    # -- checks
    def _check_continuation(self, cache: Any, past: int) -> None:
        fix = (
            " The CMS fast weights can only continue the sequence the adapters read last. Continue the cache that the"
            " model's previous call returned, without other calls in between, or re-read the whole sequence without a"
            " cache (`use_cache=False`)."
        )
        for name, adapter in self.adapters:
            carried = self.tokens.get(id(adapter))
            if adapter.state is None or carried != past:
                read = "no state" if adapter.state is None or carried is None else f"read {carried} tokens"
                raise ValueError(
                    f"The key/value cache holds {past} tokens, but the CMS adapter {name!r} has {read} of this sequence"
                    " (another call, `reset_state()`, or a cache that dropped tokens, such as `cache.crop()` in"
                    " assisted generation, came in between; a call in training mode with gradients on, or one that"
                    f" returned no cache, keeps no state).{fix}"
                )
        if self.fingerprint is not None:
            now = _fingerprint(cache)
            if now is not None and (now.shape != self.fingerprint.shape or not torch.equal(now, self.fingerprint)):
                raise ValueError(
                    "The key/value cache is not the one the model's previous call returned, or its rows were reordered"
                    " (beam search calling `cache.reorder_cache` directly rather than the model's `_reorder_cache`)"
                    f" after the CMS adapters read them.{fix}"
                )

    def _warn_on_padding(self, mask: Any) -> None:
        if self.warned_padding or not isinstance(mask, Tensor) or mask.dim() != 2:
            return
        writes = any(blk.inner_lr > 0 for _, a in self.adapters for blk in a.cms.blocks)
        if writes and bool((mask == 0).any()):
            self.warned_padding = True
            warnings.warn(
                "The attention mask has padding, but the CMS adapters have no mask: their levels with inner_lr > 0"
                " read and write the pad tokens like any token, so a padded sample's output differs from the same"
                " sample unpadded (cached generation still equals a full forward of the padded batch). Generate"
                " prompts of equal length, or one at a time, where that matters.",
                stacklevel=2,
            )


def _output_cache(output: Any) -> Any:
    """The cache a model output holds, if any (read by field, so that no deprecated alias warns)."""
    fields = getattr(output, "__dataclass_fields__", None)
    if fields is not None:  # a transformers ModelOutput
        return next((getattr(output, k) for k in _CACHE_KWARGS if k in fields), None)
    if isinstance(output, dict):
        return next((output[k] for k in _CACHE_KWARGS if output.get(k) is not None), None)
    return None


def _cached_tokens(cache: Any) -> int:
    """The number of tokens a key/value cache holds (0 for ``None``)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # the legacy format: per layer (keys, values), keys (B, heads, S, hd)
        first = next((layer for layer in cache if layer is not None and len(layer) > 0), None)
        return 0 if first is None else int(first[0].shape[-2])
    raise ValueError(
        f"The cache passed to the model is a {type(cache).__name__}, whose length the CMS generation hooks cannot"
        " read; pass a transformers Cache (such as DynamicCache) or no cache."
    )


def _fingerprint(cache: Any) -> Optional[Tensor]:
    """The newest cached key of the last attention layer, per row ``(B, heads, head_dim)``: it depends on the whole
    history of its row, so a reordered or foreign cache shows. ``None`` where the cache layout is not a growing one."""
    if cache is None:
        return None
    keys = None
    layers = getattr(cache, "layers", None)
    if layers is not None:
        try:
            from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
        except ImportError:  # pragma: no cover - a transformers without these layers: no fingerprint
            return None
        for layer in reversed(list(layers)):
            if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
                keys = getattr(layer, "keys", None)
                break
    elif isinstance(cache, (tuple, list)) and cache and cache[-1] is not None and len(cache[-1]) > 0:
        keys = cache[-1][0]
    if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[-2] == 0:
        return None
    return keys[:, :, -1].detach().clone()


def _select_rows(state: CMSState, index: Tensor) -> CMSState:
    """The state's rows ``index`` (as ``CMSState.select``), keeping rows that are one broadcast tensor broadcast, so
    that levels still at their initial weights read them as one shared matrix (bitwise the static MLP)."""

    def pick(t: Tensor) -> Tensor:
        if t.dim() and t.shape[0] and t.stride(0) == 0:
            return t[:1].expand(index.numel(), *t.shape[1:])
        return t.index_select(0, index)

    return CMSState([lvl.map(pick) for lvl in state.levels])


# ------------------------------------------------------------------------------------------------------ save and load
def save_pretrained_cms(model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a model converted by :func:`~nl_lightning.models.to_cms` so that :func:`from_pretrained_cms` restores it.

    Calls ``model.save_pretrained(directory, **kwargs)`` (every CMS parameter is in the saved weights, under its own
    name) with an ``nl_cms`` entry in the saved ``config.json`` that names the loader, and writes
    ``nl_cms_conversions.json``: the conversions ``to_cms`` recorded in ``model.nl_cms_conversions`` and, per adapter,
    what is not in the weights: its ``carry_state``, ``check_finite`` and ``differentiable_writes`` and each level's
    ``inner_lr``, ``retention`` and ``reduction``, as they are now (they may have been changed since the conversion).
    The carried token-axis state is not saved.

    Args:
        model: A ``transformers`` ``PreTrainedModel`` converted with ``to_cms``.
        directory: The directory to write (created if needed).
        **kwargs: More ``save_pretrained`` arguments (``max_shard_size``, ...).

    Raises:
        ValueError: If the model has no recorded conversion (not converted with ``to_cms``) or no
            ``save_pretrained``, or a recorded conversion argument cannot be written as JSON.

    Example::

        save_pretrained_cms(model, "checkpoints/llama-cms")

    """
    conversions = getattr(model, "nl_cms_conversions", None)
    if not conversions:
        raise ValueError(
            f"{type(model).__name__} has no recorded CMS conversion (`model.nl_cms_conversions`): convert it with"
            " nl_lightning.models.to_cms first, or save an unconverted model with `model.save_pretrained`."
        )
    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(
            f"{type(model).__name__} has no `save_pretrained`: save_pretrained_cms saves transformers models. Save"
            " other models with `torch.save(model.state_dict(), path)` and re-apply to_cms before loading."
        )
    record = {
        "format": _FORMAT,
        "model_class": type(model).__name__,
        "conversions": [_jsonable(dict(c), f"model.nl_cms_conversions[{i}]") for i, c in enumerate(conversions)],
        "adapters": {name: _adapter_record(a) for name, a in _adapters(model)},
    }
    directory = Path(directory)
    config = getattr(model, "config", None)
    had_marker = config is not None and hasattr(config, "nl_cms")
    previous = getattr(config, "nl_cms", None)
    if config is not None:
        config.nl_cms = {"format": _FORMAT, "loader": _LOADER, "conversions_file": CONVERSIONS_FILE}
    try:
        model.save_pretrained(directory, **kwargs)
    finally:
        if config is not None:
            if had_marker:
                config.nl_cms = previous
            else:
                del config.nl_cms
    (directory / CONVERSIONS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def from_pretrained_cms(directory: str | os.PathLike, model_class: Optional[type] = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained_cms`: the base model, its CMS conversions and every weight.

    Builds the base model from the saved config (local files only), re-applies the recorded ``to_cms`` conversions,
    restores what each adapter held outside its weights (``carry_state``, ``check_finite``, ``differentiable_writes``,
    and its levels' ``inner_lr``, ``retention`` and ``reduction``), and loads
    the saved weights strictly: a tensor missing from the files (other than one tied to a loaded one, as GPT-2's
    ``lm_head``), an unexpected one or a shape mismatch raises, so nothing is silently re-initialised.

    Args:
        directory: The directory :func:`save_pretrained_cms` wrote.
        model_class: The ``transformers`` model class to build (``LlamaForCausalLM``, ...); by default the class
            named in the saved config's ``architectures``, else ``AutoModelForCausalLM``.
        **kwargs: Passed to the model's construction from the config (``dtype``, ``attn_implementation``, ...).

    Returns:
        The model, in eval mode (as ``from_pretrained`` returns it).

    Raises:
        FileNotFoundError: If ``directory`` or its ``nl_cms_conversions.json`` does not exist.
        ValueError: If the conversions file is of an unknown format, or the weights do not match the converted model.

    Example::

        model = from_pretrained_cms("checkpoints/llama-cms", dtype=torch.bfloat16)

    """
    import transformers

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not a directory; give the directory save_pretrained_cms wrote.")
    path = directory / CONVERSIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONVERSIONS_FILE}, so it was not saved by save_pretrained_cms and holds no"
            " CMS conversion to re-apply. Load a plain model with `from_pretrained`, or save the converted model with"
            " nl_lightning.models.hf_cms.save_pretrained_cms(model, directory)."
        )
    record = json.loads(path.read_text())
    if record.get("format") != _FORMAT:
        raise ValueError(
            f"{path} has format {record.get('format')!r}; this version of nl_lightning reads format {_FORMAT}."
        )
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if model_class is None:
        names = list(getattr(config, "architectures", None) or [])
        model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if hasattr(config, "nl_cms"):  # the marker describes the directory, not the model
        del config.nl_cms
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    build = model_class._from_config if hasattr(model_class, "_from_config") else model_class.from_config
    model = build(config, **kwargs)
    for conv in record["conversions"]:
        to_cms(
            model,
            conv["targets"],
            conv["chunk_sizes"],
            activation=conv.get("activation"),
            in_context=conv.get("in_context", True),
            carry_state=conv.get("carry_state", False),
            **conv.get("cms_kwargs", {}),
        )
    adapters = dict(_adapters(model))
    for name, saved in record.get("adapters", {}).items():
        if name not in adapters:
            raise ValueError(
                f"{path} describes the CMS adapter {name!r}, which re-applying the recorded conversions did not"
                f" create (adapters: {sorted(adapters)[:6]}); the file does not belong to this model."
            )
        _restore_adapter(adapters[name], saved)
    _load_strict(model, directory)
    if getattr(model, _HOOKS_ATTR, None) is None:  # to_cms installs them on a PreTrainedModel
        install_generation_hooks(model)
    return model.eval()


def is_cms_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` was written by :func:`save_pretrained_cms` (and so needs :func:`from_pretrained_cms`).

    Args:
        directory: A local directory.

    Returns:
        ``True`` if it holds ``nl_cms_conversions.json``.

    Example::

        model = from_pretrained_cms(path) if is_cms_checkpoint(path) else AutoModelForCausalLM.from_pretrained(path)

    """
    return (Path(directory) / CONVERSIONS_FILE).is_file()


def _adapters(model: nn.Module) -> list[tuple[str, CMSAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CMSAdapter)]


def _adapter_record(adapter: CMSAdapter) -> dict[str, Any]:
    levels = [
        {"inner_lr": blk.inner_lr, "retention": blk.retention, "reduction": blk.reduction} for blk in adapter.cms.blocks
    ]
    return {
        "carry_state": adapter.carry_state,
        "check_finite": getattr(adapter, "check_finite", True),
        "differentiable_writes": adapter.cms.differentiable_writes,
        "levels": levels,
    }


def _restore_adapter(adapter: CMSAdapter, saved: dict[str, Any]) -> None:
    adapter.carry_state = bool(saved.get("carry_state", adapter.carry_state))
    if hasattr(adapter, "check_finite"):
        adapter.check_finite = bool(saved.get("check_finite", adapter.check_finite))
    adapter.cms.differentiable_writes = bool(saved.get("differentiable_writes", adapter.cms.differentiable_writes))
    levels = saved.get("levels", [])
    if len(levels) != len(adapter.cms.blocks):
        raise ValueError(
            f"The saved adapter has {len(levels)} levels, the re-converted one {len(adapter.cms.blocks)}; the"
            f" {CONVERSIONS_FILE} does not match its conversions."
        )
    for blk, lvl in zip(adapter.cms.blocks, levels, strict=True):
        blk.inner_lr = float(lvl["inner_lr"])
        blk.retention = float(lvl["retention"])
        blk.reduction = lvl["reduction"]


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as JSON types (tuples become lists), or a ValueError naming where it sits."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}, which JSON cannot hold.")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ValueError(
        f"{where} is a {type(value).__name__} ({value!r}), which save_pretrained_cms cannot write as JSON; convert with"
        " to_cms arguments made of numbers, strings, None and lists."
    )


def _load_strict(model: nn.Module, directory: Path) -> None:
    state = _read_weights(directory)
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    loaded = {id(expected[k]) for k in expected if k in state}
    untied = [k for k in missing if id(expected[k]) not in loaded]  # a tied tensor is loaded through its twin
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if untied or unexpected or mismatched:
        raise ValueError(
            f"The weights in {str(directory)!r} do not match the re-converted model: missing {untied[:5]}"
            f"{' ...' if len(untied) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''},"
            f" shape mismatches {mismatched[:5]}. The directory's weights and {CONVERSIONS_FILE} must come from the"
            " same save_pretrained_cms call."
        )
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the ``save_pretrained`` weight files in ``directory`` (safetensors, sharded or not)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{str(directory)!r} has no model.safetensors (or sharded index); save_pretrained_cms writes one."
        )
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state
