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
Converted Hugging Face Models: Generation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

A ``transformers`` causal LM whose FFNs :func:`~nl_lightning.models.to_cms` turned into token-axis CMS chains
(:class:`~nl_lightning.models.CMSAdapter`) writes fast weights along the sequence. A cached generation step calls the
model with the new token(s) only, while the CMS fast weights must continue from the tokens read before.
:func:`install_generation_hooks` (which :func:`~nl_lightning.models.to_cms` calls on a ``PreTrainedModel``) makes every
in-context adapter carry its state through a call that continues a cached sequence (the cache it is given holds
tokens) and start fresh on a call that begins one (no cache, or an empty one), so ``model.generate()`` computes what a
full forward pass of the whole sequence computes. It checks that the adapters have read exactly the tokens the cache
holds (and that the cache was not reordered behind their back), and raises otherwise. Beam search is followed: the
model's ``_reorder_cache`` (which ``generate`` calls to reorder the cache between beam steps) also reorders the fast
weights.

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

Saving and loading a converted model: :mod:`nl_lightning.models.hf_checkpoint`.

Example::

    from transformers import LlamaConfig, LlamaForCausalLM
    from nl_lightning.models import to_cms

    model = to_cms(LlamaForCausalLM(LlamaConfig(...)), "model.layers.*.mlp", [16, 256], inner_lr=0.01)
    out = model.generate(input_ids, max_new_tokens=32)  # equals greedy decoding by full forward passes

"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from nl_lightning.models.cms import CMSState
from nl_lightning.models.to_cms import CMSAdapter

__all__ = ["install_generation_hooks"]

_HOOKS_ATTR = "_nl_cms_generation"
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.x passes `cache`; `past_key_values` is the old name


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
