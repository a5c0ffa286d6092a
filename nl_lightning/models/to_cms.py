# Copyright The Lightning AI team.
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
zero output layer, so they add nothing until they learn. :func:`to_cms` replaces the FFNs in place by
:class:`CMSAdapter` modules, which keep the FFN's call signature; :func:`cms_levels` returns the step-axis
:class:`~nl_lightning.Level` objects of every converted chain for
:class:`~nl_lightning.callbacks.MultiFrequencyUpdates`.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from nl_lightning.levels import Level
from nl_lightning.models.cms import CMSState, ContinuumMemory
from nl_lightning.models.cms_memory import ACTIVATIONS

__all__ = ["CMSAdapter", "cms_levels", "to_cms"]

#: activation modules that a CMS level reproduces exactly, and their names in ``ACTIVATIONS``
_ACTIVATION_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.ReLU, "relu"),
    (nn.Tanh, "tanh"),
)
_NO_OPS = (nn.Dropout, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Shaped by the pretrained FFN or fixed by the ad-hoc stacking layout, so not accepted through `cms_kwargs`.
_RESERVED = ("dim", "hidden_dims", "hidden_mult", "residual")
_SUPPORTED = (
    "an FFN made of exactly two nn.Linear (the up projection registered before the down projection), at most one"
    " activation module (nn.GELU(approximate='none'), nn.SiLU, nn.ReLU or nn.Tanh) and optionally nn.Dropout /"
    " nn.Identity"
)


class _FFNSpec(NamedTuple):
    """The pieces of a pretrained FFN that a CMS chain is built from."""

    up: nn.Linear
    down: nn.Linear
    activation: str
    dropped: list[str]  # names of the dropout modules with p > 0 that the chain leaves out


def _activation_name(module: nn.Module, where: str) -> Optional[str]:
    for cls, name in _ACTIVATION_MODULES:
        if isinstance(module, cls):
            if isinstance(module, nn.GELU) and module.approximate != "none":
                raise ValueError(
                    f"{where} is nn.GELU(approximate={module.approximate!r}), which to_cms does not support: CMS levels"
                    " compute the exact GELU (approximate='none'), so the converted model would not reproduce the"
                    " original. Use nn.GELU() in the pretrained model, or do not convert this module."
                )
            return name
    return None


def _extract_ffn(ffn: nn.Module, name: str, activation: Optional[str]) -> _FFNSpec:
    """Find the up projection, the activation and the down projection of ``ffn`` (see :func:`to_cms`)."""
    label = f"Module {name!r} ({type(ffn).__name__})"
    own = [n for n, _ in ffn.named_parameters(recurse=False)] if not isinstance(ffn, nn.Linear) else []
    if own:
        raise ValueError(
            f"{label} holds parameters of its own {own}, which to_cms cannot map; it converts {_SUPPORTED}."
        )
    linears: list[tuple[str, nn.Linear]] = []
    acts: list[tuple[str, str]] = []
    dropped: list[str] = []
    order: list[str] = []  # "linear" / "act" in registration order, for the nn.Sequential check
    for sub_name, sub in ffn.named_modules(prefix=name):
        if sub is ffn and not isinstance(ffn, nn.Linear):
            continue
        if isinstance(sub, nn.Linear):
            linears.append((sub_name, sub))
            order.append("linear")
        elif (act := _activation_name(sub, f"Module {sub_name!r} inside {label}")) is not None:
            acts.append((sub_name, act))
            order.append("act")
        elif isinstance(sub, _NO_OPS):
            if isinstance(sub, nn.Dropout) and sub.p > 0:
                dropped.append(sub_name)
        elif not isinstance(sub, _CONTAINERS):
            raise ValueError(
                f"{label} contains {sub_name!r} ({type(sub).__name__}), which to_cms cannot reproduce; it converts"
                f" {_SUPPORTED}. Target a module that holds only the FFN, or leave this one out of `targets`."
            )
    if len(linears) != 2:
        found = [f"{n} ({type(m).__name__})" for n, m in linears]
        raise ValueError(
            f"{label} contains {len(linears)} nn.Linear {found}, but to_cms converts {_SUPPORTED}. Gated FFNs"
            " (SwiGLU, GeGLU: three projections) and single layers are not supported."
        )
    if len(acts) > 1:
        raise ValueError(
            f"{label} contains {len(acts)} activation modules {[n for n, _ in acts]}; to_cms converts {_SUPPORTED}."
        )
    (up_name, up), (down_name, down) = linears
    if type(ffn) is nn.Sequential and order != ["linear", "act", "linear"]:
        raise ValueError(
            f"{label} applies {order} (dropout and identity left out), but to_cms converts Linear -> activation ->"
            " Linear. A Sequential without an activation is a linear map, which no CMS level computes."
        )
    if acts:
        found_act = acts[0][1]
        if activation is not None and activation != found_act:
            raise ValueError(
                f"{label} applies {found_act!r} ({acts[0][0]!r}), but `activation={activation!r}` was given. Drop"
                " `activation` (it is only needed for FFNs that call a functional activation) or convert these"
                " modules in separate to_cms calls."
            )
        activation = found_act
    elif activation is None:
        raise ValueError(
            f"{label} has no activation module (it probably calls a functional one such as F.gelu in its forward)."
            f" Pass the one it applies between {up_name!r} and {down_name!r} as `activation=`, one of"
            f" {sorted(ACTIVATIONS)}."
        )
    if up.out_features != down.in_features:
        raise ValueError(
            f"{label}: {up_name!r} has out_features={up.out_features} but {down_name!r} has"
            f" in_features={down.in_features}. to_cms takes the first registered nn.Linear as the up projection and"
            " the second as the down projection; register them in that order."
        )
    if up.in_features != down.out_features:
        raise ValueError(
            f"{label} maps width {up.in_features} to width {down.out_features}, but CMS levels are residual and need"
            " equal input and output widths. Convert only FFNs whose input and output widths match."
        )
    return _FFNSpec(up, down, activation, dropped)


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
    spec: _FFNSpec, chunk_sizes: Sequence[int], in_context: bool, cms_kwargs: dict[str, Any]
) -> ContinuumMemory:
    reserved = sorted(set(cms_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"to_cms does not accept {reserved}: the widths come from the pretrained FFN and the layout (level 0"
            " plain, levels 1.. residual) is fixed so that the converted model reproduces the original. Remove them."
        )
    chunk_sizes = list(chunk_sizes)
    k = len(chunk_sizes)
    kwargs = dict(cms_kwargs)
    norm = _level_norms(kwargs.pop("norm", "rmsnorm"), k)
    dim, hidden = spec.up.in_features, spec.up.out_features
    cms = ContinuumMemory(
        dim=dim,
        chunk_sizes=chunk_sizes,
        hidden_dims=[hidden] * k,
        activation=spec.activation,
        norm=norm,
        residual=[False] + [True] * (k - 1),
        in_context=in_context,
        **kwargs,
    )
    weight = spec.up.weight
    cms.to(device=weight.device, dtype=weight.dtype)
    zeros = torch.zeros(hidden, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for i, blk in enumerate(cms.blocks):
            blk.w1.copy_(spec.up.weight)
            blk.b1.copy_(spec.up.bias if spec.up.bias is not None else zeros)
            blk.w2.copy_(spec.down.weight if i == 0 else torch.zeros_like(blk.w2))
            blk.b2.copy_(spec.down.bias if i == 0 and spec.down.bias is not None else torch.zeros_like(blk.b2))
    level0 = cms.blocks[0]
    originals = (spec.up.weight, spec.up.bias, spec.down.weight, spec.down.bias)
    for new, old in zip((level0.w1, level0.b1, level0.w2, level0.b2), originals, strict=True):
        if old is not None:
            new.requires_grad_(old.requires_grad)
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

    Args:
        cms: The chain.
        carry_state: Keep the token-axis state between calls (requires ``cms.in_context``).

    Raises:
        ValueError: If ``carry_state`` is set on a static chain.

    Example::

        adapter = CMSAdapter.from_ffn(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), [16, 256])
        y = adapter(torch.randn(2, 512, 64))  # (2, 512, 64)

    """

    def __init__(self, cms: ContinuumMemory, carry_state: bool = False) -> None:
        super().__init__()
        if carry_state and not cms.in_context:
            raise ValueError("`carry_state=True` needs a token-axis chain; build it with `in_context=True`.")
        self.cms = cms
        self.carry_state = carry_state
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
        adapter = cls(_convert(ffn, "ffn", chunk_sizes, activation, in_context, cms_kwargs), carry_state)
        return adapter.train(ffn.training)

    def reset_state(self) -> None:
        """Forget the carried state: the next call starts a new stream from the learned initial weights."""
        self.state = None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., D)`` -> ``y`` ``(..., D)``."""
        if not self.cms.in_context:
            return self.cms(x)
        state = self.state.detach() if (self.carry_state and self.state is not None) else None
        shape = x.shape
        seq = x.reshape(-1, shape[-2] if x.dim() >= 3 else 1, shape[-1])
        if state is not None and state.levels[0].w1.shape[0] != seq.shape[0]:
            raise ValueError(
                f"The carried state holds {state.levels[0].w1.shape[0]} sequences but this input has {seq.shape[0]}"
                f" (shape {tuple(shape)}). Keep the batch size while carrying, or call `reset_state()` first."
            )
        y, new_state = self.cms(seq, state)
        if self.carry_state:
            self.state = new_state.detach()
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"carry_state={self.carry_state}"


def _convert(
    ffn: nn.Module,
    name: str,
    chunk_sizes: Sequence[int],
    activation: Optional[str],
    in_context: bool,
    cms_kwargs: dict[str, Any],
) -> ContinuumMemory:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    spec = _extract_ffn(ffn, name, activation)
    if spec.dropped:
        warnings.warn(
            f"to_cms drops the dropout modules {spec.dropped} of {name!r}: the converted model equals the original in"
            " eval mode (and in train mode only with p=0).",
            stacklevel=3,
        )
    return _build_cms(spec, chunk_sizes, in_context, cms_kwargs)


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
        matched.extend(h for h in hits if h not in matched)
    for a in matched:
        for b in matched:
            if b.startswith(a + "."):
                raise ValueError(
                    f"The targets select both {a!r} and its sub-module {b!r}; a module and one inside it cannot both be"
                    " replaced. Narrow the targets (a glob '*' also matches dots)."
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

    - level 0 is an exact copy of the FFN, ``W_2 act(W_1 x + b_1) + b_2`` (no norm, no residual);
    - levels ``1..k-1`` compute ``h + W_2' act(W_1 Norm(h) + b_1) + b_2'`` with ``W_1, b_1`` copied and
      ``W_2' = 0, b_2' = 0``, so they add nothing until they learn; their ``value`` projections start at identity.

    With every ``inner_lr`` at 0 the converted model's outputs equal the original's exactly (in eval mode, in any
    dtype). Parameters are copied onto the FFN's device and dtype; level 0 keeps the FFN's ``requires_grad`` flags;
    a missing bias becomes a zero (trainable) bias. Writes (``inner_lr > 0``) run in fp32, as in the CMS.

    What is converted: a module whose sub-modules are exactly two ``nn.Linear`` (the first registered is the up
    projection ``D -> H``, the second the down projection ``H -> D``), at most one activation module among
    ``nn.GELU()`` (exact only), ``nn.SiLU``, ``nn.ReLU`` and ``nn.Tanh``, and optionally ``nn.Dropout`` /
    ``nn.Identity``. Dropout is dropped (with a warning when ``p > 0``): the result is identical in eval mode, and in
    train mode only with ``p = 0``. A plain ``nn.Sequential`` must apply Linear -> activation -> Linear. A custom
    module is trusted to compute ``down(act(up(x)))``; if it calls a functional activation (``F.gelu``), name it
    with ``activation=``.

    Args:
        model: The pretrained model; modified in place.
        targets: Module names as in ``model.named_modules()`` (``"blocks.0.ffn"``), or fnmatch globs
            (``"blocks.*.ffn"``, where ``*`` also matches dots). A single string is one target. A module shared under
            several names becomes one shared adapter.
        chunk_sizes: The period of each level, the fastest (the pretrained copy) first: tokens per write on the
            token axis, and the default optimizer-step periods of :func:`cms_levels`.
        activation: For FFNs that call a functional activation: ``"gelu"``, ``"silu"``, ``"relu"`` or ``"tanh"``.
        in_context: Write fast weights along the sequence (token axis); otherwise static chains.
        carry_state: Keep each adapter's token-axis state between calls (streaming; see :class:`CMSAdapter`).
        **cms_kwargs: More :class:`~nl_lightning.models.ContinuumMemory` arguments: ``inner_lr`` (0 everywhere
            reproduces the model; default ``0.01 * 0.3**i``), ``norm`` of levels ``1..k-1`` (``"rmsnorm"`` by
            default; a per-level list must start with ``None``), ``reduction``, ``differentiable_writes``.

    Returns:
        ``model``, with the targets replaced (each adapter in the replaced module's training mode).

    Raises:
        ValueError: If a target matches no module, or both a module and one inside it; if a target is not an FFN
            as described above (a third ``nn.Linear`` as in SwiGLU, a norm or convolution inside, a tanh-approximate
            GELU, parameters of its own), has no activation module and no ``activation=``, or has different input and
            output widths; if ``activation`` is unknown or disagrees with the module's; if ``cms_kwargs`` sets a
            widths- or layout-defining argument (``hidden_dims``, ``residual``, ...); or if the chain's arguments are
            invalid (as :class:`~nl_lightning.models.ContinuumMemory`). Nothing is replaced when an error is raised.

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
        if id(ffn) not in adapters:
            cms = _convert(ffn, name, chunk_sizes, activation, in_context, cms_kwargs)
            adapters[id(ffn)] = CMSAdapter(cms, carry_state).train(ffn.training)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, adapters[id(modules[name])])
    return model


def cms_levels(model: nn.Module, every: Optional[Sequence[int]] = None) -> list[Level]:
    """The step-axis :class:`~nl_lightning.Level` objects of every CMS chain in ``model``.

    Collects ``cms.levels(prefix=<name>)`` of every :class:`~nl_lightning.models.ContinuumMemory` (those inside a
    :class:`CMSAdapter` are named ``<adapter>.cms``), whose globs match ``model.named_parameters()``: level ``i`` of
    the chain ``blocks.0.ffn`` is named ``blocks.0.ffn.cms.level_i`` and owns ``blocks.0.ffn.cms.levels.i.*``.

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
