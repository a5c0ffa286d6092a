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
Converting a Pretrained Model to CMS
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

The "ad-hoc level stacking" variant of the Continuum Memory System (A §7.3, Eq. 72-74): the FFN blocks of a pretrained
model become CMS chains whose levels start from the pretrained MLP, so that with every inner learning rate at 0 the
converted model computes exactly what the original did, and the levels then learn at their own frequencies.

For an FFN ``y = W_2 \sigma(W_1 x + b_1) + b_2`` of width ``D`` and hidden width ``H``, the chain of ``k`` levels is

.. math::

    h_0 = W_2 \sigma(W_1 x + b_1) + b_2, \qquad
    h_\ell = h_{\ell-1} + W_2^{(\ell)} \sigma(W_1 \mathrm{Norm}_\ell(h_{\ell-1}) + b_1) + b_2^{(\ell)}, \quad
    W_2^{(\ell)} = 0,\ b_2^{(\ell)} = 0 \text{ at conversion}

Level 0 is an exact copy of the FFN (no norm, no residual); levels ``1..k-1`` copy its first layer and start with a
zero output layer, so they add nothing until they learn. A gated FFN (SwiGLU, GeGLU: Llama, Qwen2, Mistral, Gemma)
becomes gated levels, ``\sigma(\cdot)`` then standing for ``act(z_gate) * z_up``; GPT-2's ``Conv1D`` MLPs and the FFNs
of torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` convert too (see :func:`to_cms`).
:func:`to_cms` replaces the FFNs in place by :class:`CMSAdapter` modules, which keep the FFN's call signature;
:func:`cms_levels` returns the step-axis :class:`~nl_lightning.Level` objects of every converted chain for
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates`.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from nl_lightning._validation import check_choice
from nl_lightning.levels import Level
from nl_lightning.models._ffn_spec import FFNSpec, read_ffn, read_torch_layer_ffn
from nl_lightning.models.cms import CMSState, ContinuumMemory
from nl_lightning.models.cms_memory import ACTIVATIONS, GATED

__all__ = ["CMSAdapter", "CMSTransformerDecoderLayer", "CMSTransformerEncoderLayer", "cms_levels", "to_cms"]

# Shaped by the pretrained FFN or fixed by the ad-hoc stacking layout, so not accepted through `cms_kwargs`.
_RESERVED = ("dim", "hidden_dims", "hidden_mult", "residual", "gated")
_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _level_norms(norm: Any, k: int) -> list:
    if isinstance(norm, (list, tuple)):
        norm = list(norm)
        if len(norm) != k or norm[0] is not None:
            raise ValueError(
                f"`norm` given per level must have {k} entries whose first is None (level 0 is the pretrained FFN"
                f" and must not normalise its input), got {norm!r}. Or give one value for levels 1..{k - 1}."
            )
        return norm
    return [None] + [norm] * (k - 1)


def _build_cms(
    spec: FFNSpec, chunk_sizes: Sequence[int], in_context: bool, cms_kwargs: dict[str, Any]
) -> ContinuumMemory:
    reserved = sorted(set(cms_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"to_cms does not accept {reserved}: the widths and the gating come from the pretrained FFN and the layout"
            " (level 0 plain, levels 1.. residual) is fixed so that the converted model reproduces the original."
            " Remove them."
        )
    chunk_sizes = list(chunk_sizes)
    k = len(chunk_sizes)
    kwargs = dict(cms_kwargs)
    norm = _level_norms(kwargs.pop("norm", "rmsnorm"), k)
    gated = spec.activation.startswith(GATED)
    cms = ContinuumMemory(
        dim=spec.dim,
        chunk_sizes=chunk_sizes,
        hidden_dims=[spec.hidden] * k,
        activation=spec.activation[len(GATED) :] if gated else spec.activation,
        gated=gated,
        norm=norm,
        residual=[False] + [True] * (k - 1),
        in_context=in_context,
        **kwargs,
    )
    w1 = spec.w1
    cms.to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        for i, blk in enumerate(cms.blocks):
            if blk.value is not None:
                blk.value.zero_()  # targets start at 0 (see to_cms)
            blk.separate_gate = spec.separate_gate
            blk.w1.copy_(w1)
            blk.b1.copy_(spec.b1) if spec.b1 is not None else blk.b1.zero_()
            blk.w2.copy_(spec.w2) if i == 0 else blk.w2.zero_()
            blk.b2.copy_(spec.b2) if i == 0 and spec.b2 is not None else blk.b2.zero_()
    level0 = cms.blocks[0]
    for param, flag in zip((level0.w1, level0.b1, level0.w2, level0.b2), spec.requires_grad, strict=True):
        param.requires_grad_(flag)
    return cms


class CMSAdapter(nn.Module):
    """A :class:`~nl_lightning.models.ContinuumMemory` with the call signature of the FFN it replaced.

    It takes the FFN's input ``(..., D)`` and returns a tensor of the same shape (never a tuple), so the host
    model's code is unchanged. On the token axis (``in_context=True``) the sequence axis is the second to last one:
    ``(B, S, D)`` is used as is, ``(B, D)`` is ``B`` sequences of one token, and more leading dimensions are flattened
    into the batch. Each call is a new sequence (fresh fast weights) unless ``carry_state=True``: then the state a
    call returns is kept, detached, in :attr:`state` and continues the stream in the next call (so the batch size
    must stay the same; :meth:`reset_state` starts a new stream). With one-token sequences and no carry, no write can
    reach a read, so a 2-D input behaves as the static chain. A carried state is detached (truncated backpropagation):
    a segment that continues a stream reads the carried fast weights, so the levels' parameters (the initial weights)
    learn only from segments that start fresh; call :meth:`reset_state` wherever a new stream begins.

    A level whose ``inner_lr`` is 0 never writes, and reads its whole input with its shared parameters, so a chain
    with every ``inner_lr`` at 0 is bitwise the pretrained FFN. The carried state is runtime state: it is not part
    of ``state_dict``.

    Writes can blow up (an ``inner_lr`` too large for the inputs' scale): with ``check_finite`` (default) a call whose
    writes produced a non-finite output raises ``FloatingPointError`` naming the learning rates, instead of passing
    NaN on silently. The check reads one flag from the device per call; ``check_finite=False`` skips it.

    Args:
        cms: The chain.
        carry_state: Keep the token-axis state between calls (requires ``cms.in_context``).
        dropout: A dropout the replaced FFN applied to its output (GPT-2's), applied after the chain.
        check_finite: Raise on non-finite outputs of a call that wrote.

    Raises:
        ValueError: If ``carry_state`` is set on a static chain.

    Example::

        adapter = CMSAdapter.from_ffn(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), [16, 256])
        y = adapter(torch.randn(2, 512, 64))  # (2, 512, 64)

    """

    def __init__(
        self,
        cms: ContinuumMemory,
        carry_state: bool = False,
        dropout: Optional[nn.Module] = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if carry_state and not cms.in_context:
            raise ValueError("`carry_state=True` needs a token-axis chain; build it with `in_context=True`.")
        self.cms = cms
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.carry_state = carry_state
        self.check_finite = check_finite
        self.state: Optional[CMSState] = None

    @classmethod
    def from_ffn(
        cls,
        ffn: nn.Module,
        chunk_sizes: Sequence[int],
        activation: Optional[str] = None,
        in_context: bool = True,
        carry_state: bool = False,
        **cms_kwargs: Any,
    ) -> CMSAdapter:
        """Convert one pretrained FFN (see :func:`to_cms` for what is accepted and how the levels are initialised).

        Args:
            ffn: The FFN module.
            chunk_sizes: The period of each level, the fastest (the pretrained copy) first.
            activation: The activation of an FFN that calls a functional one (one of ``"gelu"``, ``"silu"``,
                ``"relu"``, ``"tanh"``).
            in_context: Write fast weights along the sequence (token axis); otherwise a static chain.
            carry_state: Keep the token-axis state between calls.
            **cms_kwargs: More :class:`~nl_lightning.models.ContinuumMemory` arguments (``inner_lr``, ``norm``,
                ``reduction``, ``differentiable_writes``).

        Returns:
            The adapter, on the FFN's device and dtype, in the FFN's training mode.

        Raises:
            ValueError: As :func:`to_cms`.

        """
        return _adapter(ffn, "ffn", chunk_sizes, activation, in_context, carry_state, cms_kwargs)

    def reset_state(self) -> None:
        """Forget the carried state: the next call starts a new stream from the learned initial weights."""
        self.state = None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., D)`` -> ``y`` ``(..., D)``."""
        if not self.cms.in_context:
            return self.dropout(self.cms(x))
        state = self.state.detach() if (self.carry_state and self.state is not None) else None
        shape = x.shape
        seq = x.reshape(-1, shape[-2] if x.dim() >= 3 else 1, shape[-1])
        if state is not None and state.levels[0].w1.shape[0] != seq.shape[0]:
            raise ValueError(
                f"The carried state holds {state.levels[0].w1.shape[0]} sequences but this input has {seq.shape[0]}"
                f" (shape {tuple(shape)}). Keep the batch size while carrying, or call `reset_state()` first."
            )
        y, new_state = self.cms(seq, state)
        if self.check_finite and self._writes() and not bool(torch.isfinite(y).all()):
            self._raise_non_finite(seq)
        if self.carry_state:
            self.state = new_state.detach()
        return self.dropout(y.reshape(shape))

    def _writes(self) -> bool:
        return any(blk.inner_lr > 0 for blk in self.cms.blocks)

    def _raise_non_finite(self, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                "The input of this CMSAdapter is already non-finite (NaN or inf): the problem is upstream of the CMS."
            )
        lrs = [blk.inner_lr for blk in self.cms.blocks]
        rhos = [blk.retention for blk in self.cms.blocks]
        raise FloatingPointError(
            f"The CMS writes produced non-finite outputs (NaN or inf) from a finite input: the token-axis steps"
            f" (inner_lr={lrs}, retention={rhos}, chunk_sizes={self.cms.chunk_sizes}) are too large for this model's"
            " activations and the fast weights diverged. Lower inner_lr (for example by 10x), keep max_write_norm set"
            " (or lower it), or set retention < 1 (a bounded drift from the pretrained weights); check_finite=False"
            " turns this check off."
        )

    def extra_repr(self) -> str:
        return f"carry_state={self.carry_state}"


class CMSTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` whose FFN (``linear1``, ``activation``, ``dropout``, ``linear2``) is the
    :class:`CMSAdapter` ``ffn`` (made by :func:`to_cms`; the layer's output dropout ``dropout2`` stays). torch's fused
    inference fast path, which would read ``linear1`` / ``linear2`` directly and bypass the CMS, is off."""

    ffn: CMSAdapter

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.ffn(x))


class CMSTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """An ``nn.TransformerDecoderLayer`` whose FFN is the :class:`CMSAdapter` ``ffn`` (made by :func:`to_cms`; the
    layer's output dropout ``dropout3`` stays)."""

    ffn: CMSAdapter

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.ffn(x))


_CMS_LAYER = {
    nn.TransformerEncoderLayer: CMSTransformerEncoderLayer,
    nn.TransformerDecoderLayer: CMSTransformerDecoderLayer,
}


def _adopt_layer(layer: nn.Module, adapter: CMSAdapter) -> None:
    """Turn a torch transformer layer into its CMS subclass, in place, with ``adapter`` as its FFN."""
    layer.__class__ = _CMS_LAYER[type(layer)]
    for name in ("linear1", "linear2", "dropout"):
        delattr(layer, name)
    if isinstance(layer.activation, nn.Module):
        delattr(layer, "activation")
        layer.activation = None
    layer.activation_relu_or_gelu = 0  # the fast path checks this flag; 0 keeps every call on the _ff_block path
    layer.ffn = adapter


def _nested_tensor_off(model: nn.Module) -> None:
    """Encoders holding converted layers must not take their nested-tensor fast path (it reads ``linear1``)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer, CMSTransformerEncoderLayer) for layer in module.layers
        ):
            module.use_nested_tensor = False


def _adapter(
    ffn: nn.Module,
    name: str,
    chunk_sizes: Sequence[int],
    activation: Optional[str],
    in_context: bool,
    carry_state: bool,
    cms_kwargs: dict[str, Any],
) -> CMSAdapter:
    """The adapter that replaces ``ffn`` (an FFN, or a torch transformer layer whose FFN it replaces)."""
    if activation is not None:
        check_choice("activation", activation, sorted(ACTIVATIONS), hint="or None to read it from the FFN")
    cms_kwargs = dict(cms_kwargs)
    check_finite = cms_kwargs.pop("check_finite", True)
    is_layer = isinstance(ffn, _TORCH_LAYERS)
    spec = read_torch_layer_ffn(ffn, name, activation) if is_layer else read_ffn(ffn, name, activation)
    if spec.dropped:
        warnings.warn(
            f"to_cms drops the hidden dropout {spec.dropped} of {name!r}: the converted model equals the original in"
            " eval mode (and in train mode only with p=0).",
            stacklevel=3,
        )
    cms = _build_cms(spec, chunk_sizes, in_context, cms_kwargs)
    adapter = CMSAdapter(cms, carry_state, spec.output_dropout, check_finite)
    return adapter.train(ffn.training)


def _is_glob(target: str) -> bool:
    return any(c in target for c in "*?[")


def _match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    matched: list[str] = []
    for target in targets:
        if not isinstance(target, str) or target == "":
            raise ValueError(
                f"Each target must be a non-empty module name such as 'blocks.0.ffn' (or a glob such as"
                f" 'blocks.*.ffn'), got {target!r}. To convert a bare FFN use CMSAdapter.from_ffn(ffn, chunk_sizes)."
            )
        hits = fnmatch.filter(names, target) if _is_glob(target) else [n for n in names if n == target]
        if not hits:
            close = difflib.get_close_matches(target, names, n=3, cutoff=0.5)
            shown = (close + [n for n in names if n not in close])[:6]
            raise ValueError(
                f"The target {target!r} matches no sub-module of the model; its modules include {shown}"
                f"{f' (of {len(names)})' if len(names) > len(shown) else ''}. Use names from `model.named_modules()`."
            )
        outermost = [h for h in hits if not any(h.startswith(o + ".") for o in hits)]  # a glob's matches inside its
        matched.extend(h for h in outermost if h not in matched)  # other matches are left out ("layers.*")
    for a in matched:
        for b in matched:
            if b.startswith(a + "."):
                raise ValueError(
                    f"The targets select both {a!r} and its sub-module {b!r}; a module and one inside it cannot both be"
                    " replaced. Narrow the targets."
                )
    return matched


def to_cms(
    model: nn.Module,
    targets: Union[str, Sequence[str]],
    chunk_sizes: Sequence[int],
    activation: Optional[str] = None,
    in_context: bool = True,
    carry_state: bool = False,
    **cms_kwargs: Any,
) -> nn.Module:
    """Replace FFN sub-modules of a pretrained model, in place, by CMS chains initialised from their weights.

    The "ad-hoc level stacking" variant of the CMS (A §7.3): each target becomes a :class:`CMSAdapter` holding a
    :class:`~nl_lightning.models.ContinuumMemory` of ``len(chunk_sizes)`` levels of the FFN's widths ``D`` and ``H``:

    - level 0 is an exact copy of the FFN, ``W_2 a(W_1 x + b_1) + b_2`` (no norm, no residual);
    - levels ``1..k-1`` compute ``h + W_2' a(W_1 Norm(h) + b_1) + b_2'`` with ``W_1, b_1`` copied and
      ``W_2' = 0, b_2' = 0``, so they add nothing until they learn.

    On the token axis every level writes towards the targets ``v_t = W_v k_t`` of its ``value`` projection, which
    starts at zero here: a level that adds nothing has nothing to write until ``W_v`` learns (through the first-order
    targets' gradient, see :class:`~nl_lightning.models.ContinuumMemory`), and level 0's first writes only shrink the
    pretrained output a little. (Identity targets would pull every level towards its input, a pretrained model's
    residual stream, which made the writes of a converted Llama diverge within one 256-token sequence.)

    For a gated FFN (SwiGLU, GeGLU) ``a(z) = act(z_gate) * z_up`` and ``W_1`` stacks the gate's rows over the up
    projection's, so every level is gated: level 0 is the pretrained gated FFN, and the added levels are gated FFNs
    that start from its gate and up projections.

    With every ``inner_lr`` at 0 the converted model's outputs equal the original's exactly (same operations on the
    same weights; in eval mode, and in train mode unless the FFN has a hidden dropout with ``p > 0``). Parameters are
    copied onto the FFN's device and dtype; level 0 keeps the FFN's ``requires_grad`` flags, and a missing bias becomes
    a zero bias with its weight's flag. Writes (``inner_lr > 0``) run in fp32, as in the CMS.

    What is converted (the reader is :mod:`nl_lightning.models._ffn_spec`):

    - two projections, up ``D -> H`` then down ``H -> D`` in registration order: ``nn.Linear`` or GPT-2's ``Conv1D``;
    - gated FFNs: ``gate_proj``, ``up_proj``, ``down_proj`` (Llama, Qwen2, Mistral, Gemma; any names containing
      ``gate`` and ``up``, or Mixtral's ``w1``, ``w3``, ``w2``), or a fused projection ``D -> 2H`` whose name contains
      ``gate`` (``gate_up_proj``, gate first) and :class:`~nl_lightning.models.transformer.SwiGLU`;
    - at most one activation module: ``nn.GELU`` (exact or tanh), ``nn.SiLU``, ``nn.ReLU``, ``nn.Tanh``, or
      ``transformers``' ``GELUActivation``, ``NewGELUActivation`` (GPT-2), ``GELUTanh``, ``SiLUActivation``; a module
      that calls a functional activation (``F.gelu``) names it with ``activation=``;
    - ``nn.Dropout`` / ``nn.Identity``: a dropout on the output (GPT-2's, or after the last layer of an
      ``nn.Sequential``) is kept after the chain; a hidden dropout is dropped, with a warning when ``p > 0``;
    - an ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` given as a target: its FFN (``linear1``,
      ``activation``, ``dropout``, ``linear2``) becomes the adapter ``<layer>.ffn`` and the layer becomes a
      :class:`CMSTransformerEncoderLayer` / :class:`CMSTransformerDecoderLayer`, with torch's fused inference fast path
      off (it would bypass the CMS); encoders holding such layers no longer convert inputs to nested tensors.

    A ``transformers`` model converted with ``in_context=True`` gets the hooks of
    :func:`nl_lightning.models.hf_cms.install_generation_hooks`, so that ``generate()`` carries the CMS state through
    its key/value cache. Each call is recorded in ``model.nl_cms_conversions`` (the resolved targets and the arguments),
    so a converted model can be rebuilt from its base (:func:`nl_lightning.models.hf_checkpoint.from_pretrained_cms`).

    Args:
        model: The pretrained model; modified in place.
        targets: Module names as in ``model.named_modules()`` (``"blocks.0.ffn"``), or fnmatch globs
            (``"blocks.*.ffn"``, where ``*`` also matches dots; a glob selects the outermost modules it matches, so
            ``"layers.*"`` selects the layers, not their sub-modules). A single string is one target. A module shared
            under several names becomes one shared adapter.
        chunk_sizes: The period of each level, the fastest (the pretrained copy) first: tokens per write on the
            token axis, and the default optimizer-step periods of :func:`cms_levels`.
        activation: For FFNs that call a functional activation: one of ``"gelu"``, ``"gelu_tanh"``, ``"gelu_new"``,
            ``"silu"``, ``"relu"``, ``"tanh"`` (the gating is read from the module).
        in_context: Write fast weights along the sequence (token axis); otherwise static chains.
        carry_state: Keep each adapter's token-axis state between calls (streaming; see :class:`CMSAdapter`).
        **cms_kwargs: More :class:`~nl_lightning.models.ContinuumMemory` arguments: ``inner_lr`` (0 everywhere
            reproduces the model; default ``0.01 * 0.3**i``), ``norm`` of levels ``1..k-1`` (``"rmsnorm"`` by
            default; a per-level list must start with ``None``), ``reduction``, ``differentiable_writes``,
            ``retention``; and ``check_finite`` of :class:`CMSAdapter`.

    Returns:
        ``model``, with the targets replaced (each adapter in the replaced module's training mode).

    Raises:
        ValueError: If a target matches no module, or both a module and one inside it, or is already converted; if a
            target is not an FFN as described above (a norm or convolution inside, an unsupported activation,
            parameters of its own, projections whose roles or widths do not fit), has no activation module and no
            ``activation=``, or has different input and output widths; if ``activation`` is unknown or disagrees with
            the module's; if ``cms_kwargs`` sets a widths- or layout-defining argument (``hidden_dims``, ``residual``,
            ``gated``, ...); or if the chain's arguments are invalid (as :class:`~nl_lightning.models.ContinuumMemory`).
            Nothing is replaced when an error is raised.

    Example::

        model = to_cms(model, ["blocks.*.mlp"], chunk_sizes=[16, 256, 4096], inner_lr=0.0)   # same outputs
        for m in model.modules():
            if isinstance(m, CMSAdapter):
                m.cms.blocks[1].inner_lr = 1e-3                                            # now level 1 writes
        trainer = Trainer(callbacks=[MultiFrequencyUpdates(cms_levels(model, every=[1, 4, 16]))])

    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("`targets` is empty; name at least one FFN module, for example ['blocks.0.ffn'].")
    if carry_state and not in_context:
        raise ValueError("`carry_state=True` needs `in_context=True`: a static chain has no state to carry.")
    modules = dict(model.named_modules(remove_duplicate=False))
    adapters: dict[int, CMSAdapter] = {}  # id(ffn) -> its adapter: built for all targets before any is replaced
    names = _match_targets(model, targets)
    for name in names:
        ffn = modules[name]
        if isinstance(ffn, (CMSAdapter, CMSTransformerEncoderLayer, CMSTransformerDecoderLayer)):
            raise ValueError(f"Module {name!r} is already converted to a CMS; convert each FFN once.")
        if id(ffn) not in adapters:
            adapters[id(ffn)] = _adapter(ffn, name, chunk_sizes, activation, in_context, carry_state, cms_kwargs)
    for name in names:
        target = modules[name]
        if isinstance(target, _TORCH_LAYERS):
            if not isinstance(target, tuple(_CMS_LAYER.values())):  # a layer shared under two names: adopt it once
                _adopt_layer(target, adapters[id(target)])
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, adapters[id(target)])
    _nested_tensor_off(model)
    conversion = {
        "targets": names,
        "chunk_sizes": list(chunk_sizes),
        "activation": activation,
        "in_context": in_context,
        "carry_state": carry_state,
        "cms_kwargs": dict(cms_kwargs),
    }
    model.nl_cms_conversions = [*getattr(model, "nl_cms_conversions", []), conversion]
    if in_context and _is_transformers_model(model):
        _install_generation_hooks(model)
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel``, recognised without importing ``transformers``."""
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__) and hasattr(model, "generate")


def _install_generation_hooks(model: nn.Module) -> None:
    """Let ``generate()`` with the key/value cache carry the CMS state (see :mod:`nl_lightning.models.hf_cms`)."""
    try:
        from nl_lightning.models.hf_cms import install_generation_hooks
    except ImportError:  # pragma: no cover - the module ships with the package
        return
    install_generation_hooks(model)


def cms_levels(model: nn.Module, every: Optional[Sequence[int]] = None) -> list[Level]:
    """The step-axis :class:`~nl_lightning.Level` objects of every CMS chain in ``model``.

    Collects ``cms.levels(prefix=<name>)`` of every :class:`~nl_lightning.models.ContinuumMemory` (those inside a
    :class:`CMSAdapter` are named ``<adapter>.cms``), whose globs match ``model.named_parameters()``: level ``i`` of
    the chain ``blocks.0.ffn`` is named ``blocks.0.ffn.cms.level_i`` and owns ``blocks.0.ffn.cms.blocks.i.*``.

    Args:
        model: The model (for example a converted one, or a LightningModule holding it: the names then start with
            the attribute that holds it, as in ``pl_module.named_parameters()``).
        every: Optimizer-step periods, one per level of each chain, instead of the chains' ``chunk_sizes``.

    Returns:
        The levels, chain by chain in module order, the fastest level of each chain first.

    Raises:
        ValueError: If the model has no CMS chain, or ``every`` does not have one period per level of a chain.

    Example::

        MultiFrequencyUpdates(cms_levels(model, every=[1, 8]))

    """
    out: list[Level] = []
    for name, module in model.named_modules():
        if isinstance(module, ContinuumMemory):
            try:
                out.extend(module.levels(prefix=name, every=every))
            except ValueError as err:
                raise ValueError(f"Chain {name!r}: {err}") from err
    if not out:
        raise ValueError(
            f"{type(model).__name__} holds no ContinuumMemory; convert its FFNs with to_cms(model, targets, ...) first."
        )
    return out
