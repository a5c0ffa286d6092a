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
"""Reading the FFN of a pretrained model: which weights, which activation, which dropout.

:func:`read_ffn` turns an FFN module into an :class:`FFNSpec`, the weights of ``y = W_2 a(W_1 x + b_1) + b_2`` (with
``a(z) = act(z_gate) * z_up`` for a gated FFN) that :func:`~nl_lightning.models.to_cms` copies into CMS levels, or
raises a ``ValueError`` that names what it cannot reproduce. It recognises:

- two projections, up then down (``nn.Linear``, or GPT-2's ``Conv1D``, a transposed linear), with one activation;
- gated FFNs: three projections ``gate``, ``up``, ``down`` (Llama, Qwen2, Mistral, Gemma: ``gate_proj``, ``up_proj``,
  ``down_proj``; Mixtral's ``w1``, ``w3``, ``w2``), or one fused ``gate_up`` projection to ``2H`` whose first half is
  the gate (Phi-3's ``gate_up_proj``, :class:`~nl_lightning.models.transformer.SwiGLU`);
- activation modules of torch (``nn.GELU``, ``nn.SiLU``, ``nn.ReLU``, ``nn.Tanh``) and of Hugging Face
  ``transformers`` (``GELUActivation``, ``NewGELUActivation``, ``GELUTanh``, ``SiLUActivation``: the entries of
  ``ACT2FN`` for ``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``, ``silu``, ``relu``), matched by class name, so
  ``transformers`` is never imported here;
- the FFN of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``linear1``, ``activation``,
  ``linear2``; :func:`read_torch_layer_ffn`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nl_lightning.models.cms_memory import ACTIVATIONS, GATED

__all__ = ["FFNSpec", "read_ffn", "read_torch_layer_ffn"]

SUPPORTED = (
    "an FFN of two projections (nn.Linear or transformers' Conv1D: up, then down) or of three (gate, up and down, as"
    " in Llama / Qwen2 / Mistral), or a fused gate_up projection (gate first), with at most one activation module"
    " (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, or transformers' GELUActivation, NewGELUActivation, GELUTanh,"
    " SiLUActivation) and optionally nn.Dropout / nn.Identity"
)
_NO_OPS = (nn.Dropout, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_ACTIVATIONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.SiLU, "silu"),
    (nn.ReLU, "relu"),
    (nn.Tanh, "tanh"),
)
#: transformers' activation classes (by name) -> the CMS activation that computes them op for op
_HF_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_new",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
}
_FUNCTIONS = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu", F.tanh: "tanh"}


@dataclass
class FFNSpec:
    """The weights of a pretrained FFN in the layout of a CMS level.

    Attributes:
        w1: Up weights ``(H, D)``, or ``(2H, D)`` for a gated FFN (the gate's rows first), a view of the original.
        b1: Up bias ``(H)`` / ``(2H)``, or ``None`` (no bias).
        w2: Down weights ``(D, H)``.
        b2: Down bias ``(D)`` or ``None``.
        activation: The CMS activation name (``"glu_silu"`` for SwiGLU).
        requires_grad: The original ``requires_grad`` of ``(w1, b1, w2, b2)``.
        dropped: Names of the dropout modules inside the FFN with ``p > 0`` that a CMS chain leaves out.
        output_dropout: A dropout module the FFN applies to its output, kept after the chain.
        separate_gate: The gate and up projections are separate modules (see
            :func:`~nl_lightning.models.cms_memory.hidden_activation`).

    """

    w1: Tensor
    b1: Optional[Tensor]
    w2: Tensor
    b2: Optional[Tensor]
    activation: str
    requires_grad: tuple[bool, bool, bool, bool]
    dropped: list[str] = field(default_factory=list)
    output_dropout: Optional[nn.Module] = None
    separate_gate: bool = False

    @property
    def dim(self) -> int:
        return self.w1.shape[1]

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]


@dataclass
class _Proj:
    name: str
    module: nn.Module
    weight: Tensor  # (out, in), a view for Conv1D
    bias: Optional[Tensor]

    @property
    def shape(self) -> tuple[int, int]:  # (in, out)
        return self.weight.shape[1], self.weight.shape[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]


def _projection(name: str, module: nn.Module) -> Optional[_Proj]:
    if isinstance(module, nn.Linear):
        return _Proj(name, module, module.weight, module.bias)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return _Proj(name, module, module.weight.T, module.bias)  # transformers' Conv1D: y = x @ W + b, W (in, out)
    return None


def _is_activation_module(module: nn.Module) -> bool:
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")


def activation_of(module: nn.Module, where: str) -> Optional[str]:
    """The CMS activation that computes ``module`` exactly, ``None`` if it is not an activation module.

    Raises:
        ValueError: If it is an activation module (torch's or transformers') that no CMS activation reproduces.

    """
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    for cls, name in _TORCH_ACTIVATIONS:
        if isinstance(module, cls):
            return name
    kind = type(module).__name__
    if kind in _HF_ACTIVATIONS:
        act = getattr(module, "act", None)
        if act is not None and not (act is F.gelu or (isinstance(act, functools.partial) and act.func is F.gelu)):
            raise ValueError(
                f"{where} is {kind} computed in Python (use_gelu_python / use_gelu_tanh_python), which no CMS level"
                " reproduces bitwise. Build the model with the default (torch's gelu) or leave this module out."
            )
        return _HF_ACTIVATIONS[kind]
    if _is_activation_module(module):
        raise ValueError(
            f"{where} applies the activation {kind}, which no CMS level computes; the supported activation modules are"
            f" nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh and transformers' {sorted(_HF_ACTIVATIONS)}. Leave this module out"
            " of `targets`."
        )
    return None


def _is_gate(name: str) -> bool:
    return "gate" in name or name == "w1"


def _split_gated(projs: list[_Proj], label: str) -> tuple[_Proj, _Proj, _Proj]:
    """``(gate, up, down)`` of a gated FFN's three projections, recognised by their names."""
    by_role: dict[str, list[_Proj]] = {"gate": [], "up": [], "down": []}
    for p in projs:
        leaf = p.leaf
        role = "gate" if _is_gate(leaf) else "up" if ("up" in leaf or leaf == "w3") else "down"
        by_role[role].append(p)
    if any(len(v) != 1 for v in by_role.values()):
        found = {role: [p.name for p in v] for role, v in by_role.items()}
        raise ValueError(
            f"{label} has three projections {[p.name for p in projs]} but to_cms cannot tell the gate, the up and the"
            f" down projection apart (read by name: {found}). It recognises a gated FFN by names containing 'gate'"
            " and 'up' (gate_proj, up_proj, down_proj) or Mixtral's w1 (gate), w3 (up), w2 (down)."
        )
    gate, up, down = by_role["gate"][0], by_role["up"][0], by_role["down"][0]
    if gate.shape != up.shape or down.shape != (up.shape[1], up.shape[0]):
        raise ValueError(
            f"{label}: the gate {gate.name!r} maps {gate.shape[0]} -> {gate.shape[1]}, the up projection {up.name!r}"
            f" {up.shape[0]} -> {up.shape[1]} and the down projection {down.name!r} {down.shape[0]} -> {down.shape[1]};"
            " a gated FFN needs gate and up D -> H and down H -> D."
        )
    return gate, up, down


def _cat_bias(parts: Sequence[Optional[Tensor]], sizes: Sequence[int], like: Tensor) -> Optional[Tensor]:
    if all(b is None for b in parts):
        return None
    return torch.cat([b.detach() if b is not None else like.new_zeros(n) for b, n in zip(parts, sizes, strict=True)])


def _resolve_activation(found: list[tuple[str, str]], activation: Optional[str], label: str, between: str) -> str:
    if found:
        name, act = found[0]
        if activation is not None and activation != act:
            raise ValueError(
                f"{label} applies {act!r} ({name!r}), but `activation={activation!r}` was given. Drop `activation` (it"
                " is only needed for FFNs that call a functional activation) or convert these modules in separate"
                " to_cms calls."
            )
        return act
    if activation is None:
        raise ValueError(
            f"{label} has no activation module (it probably calls a functional one such as F.gelu in its forward)."
            f" Pass the one it applies between {between} as `activation=`, one of {sorted(ACTIVATIONS)}."
        )
    return activation


def read_ffn(ffn: nn.Module, name: str, activation: Optional[str] = None) -> FFNSpec:
    """Read the FFN ``ffn`` (named ``name`` in its model) into an :class:`FFNSpec`; see the module docstring.

    Args:
        ffn: The FFN module.
        name: Its name, for messages.
        activation: The activation of an FFN that calls a functional one (a name of ``ACTIVATIONS``).

    Raises:
        ValueError: Naming the first thing that a CMS chain cannot reproduce: parameters of the module's own, a
            sub-module that is neither a projection, an activation nor a dropout, an unsupported activation, a wrong
            number of projections, mismatched widths.

    """
    label = f"Module {name!r} ({type(ffn).__name__})"
    own = [n for n, _ in ffn.named_parameters(recurse=False)] if _projection(name, ffn) is None else []
    if own:
        raise ValueError(
            f"{label} holds parameters of its own {own}, which to_cms cannot map; it converts {SUPPORTED}."
        )
    projs: list[_Proj] = []
    acts: list[tuple[str, str]] = []
    dropouts: list[tuple[str, nn.Dropout, int]] = []  # (name, module, number of projections registered before it)
    order: list[str] = []  # "proj" / "act" in registration order, for the nn.Sequential check
    foreign: list[str] = []
    for sub_name, sub in ffn.named_modules(prefix=name):
        if sub is ffn and _projection(name, ffn) is None:
            continue
        if (proj := _projection(sub_name, sub)) is not None:
            projs.append(proj)
            order.append("proj")
        elif (act := activation_of(sub, f"Module {sub_name!r} inside {label}")) is not None:
            acts.append((sub_name, act))
            order.append("act")
        elif isinstance(sub, nn.Dropout):
            dropouts.append((sub_name, sub, len(projs)))
        elif not isinstance(sub, _NO_OPS + _CONTAINERS):
            foreign.append(f"{sub_name!r} ({type(sub).__name__})")
    if foreign:
        raise ValueError(
            f"{label} contains {', '.join(foreign)} besides its projections and activation; a CMS chain cannot"
            f" reproduce it. to_cms converts {SUPPORTED}: target the FFN sub-module itself (for a transformer block,"
            " its MLP), or leave this one out of `targets`."
        )
    if len(acts) > 1:
        raise ValueError(
            f"{label} contains {len(acts)} activation modules {[n for n, _ in acts]}; to_cms converts {SUPPORTED}."
        )
    if type(ffn) is nn.Sequential and [o for o in order if o == "act" or o == "proj"] != ["proj", "act", "proj"]:
        raise ValueError(
            f"{label} applies {['linear' if o == 'proj' else o for o in order]} (dropout and identity left out), but"
            " to_cms converts Linear -> activation -> Linear. A Sequential without an activation is a linear map, which"
            " no CMS level computes."
        )
    if len(projs) == 3:
        gate, up, down = _split_gated(projs, label)
        act = _resolve_activation(acts, activation, label, f"{gate.name!r} and {up.name!r}")
        w1 = torch.cat([gate.weight.detach(), up.weight.detach()])  # (2H, D): the gate's rows first
        b1 = _cat_bias([gate.bias, up.bias], [gate.shape[1], up.shape[1]], w1)
        first = (gate, up)
        act = GATED + act
    elif len(projs) == 2:
        up, down = projs
        gated = up.shape[1] == 2 * down.shape[0] and (_is_gate(up.leaf) or _is_swiglu(ffn))
        if _is_swiglu(ffn) and activation is None:
            activation = "silu"
        act = _resolve_activation(acts, activation, label, f"{up.name!r} and {down.name!r}")
        w1, b1, first = up.weight, up.bias, (up,)
        if gated:
            act = GATED + act
    else:
        found = [f"{p.name} ({type(p.module).__name__})" for p in projs]
        raise ValueError(
            f"{label} contains {len(projs)} projections {found}, but to_cms converts {SUPPORTED}; a single layer is not"
            " an FFN."
        )
    hidden = w1.shape[0] // (2 if act.startswith(GATED) else 1)
    if down.shape[0] != hidden:
        raise ValueError(
            f"{label}: {first[-1].name!r} has {w1.shape[0]} outputs but {down.name!r} has {down.shape[0]} inputs."
            " to_cms takes the first registered projection as the up projection and the second as the down"
            " projection (a fused gate_up projection of 2H outputs needs 'gate' in its name); register them in that"
            " order."
        )
    if w1.shape[1] != down.shape[1]:
        raise ValueError(
            f"{label} maps width {w1.shape[1]} to width {down.shape[1]}, but CMS levels are residual and need equal"
            " input and output widths. Convert only FFNs whose input and output widths match."
        )
    # dropout: before the down projection it acts on the hidden units (dropped); after it on the output (kept)
    sequential_or_conv = type(ffn) is nn.Sequential or any(type(p.module).__name__ == "Conv1D" for p in projs)
    dropped, output_dropout = [], None
    for sub_name, module, before in dropouts:
        if sequential_or_conv and before == len(projs) and output_dropout is None:
            output_dropout = module
        elif module.p > 0:
            dropped.append(sub_name)
    spec = FFNSpec(w1, b1, down.weight, down.bias, act, _flags(first, down), dropped, output_dropout)
    spec.separate_gate = len(first) == 2
    return spec


def _flags(first: Sequence[_Proj], down: _Proj) -> tuple[bool, bool, bool, bool]:
    """``requires_grad`` of the level-0 ``(w1, b1, w2, b2)``; a missing bias (a zero bias in the chain) follows its
    weight, so a frozen FFN stays frozen."""
    w1 = any(p.weight.requires_grad for p in first)
    b1 = any(p.bias.requires_grad if p.bias is not None else p.weight.requires_grad for p in first)
    b2 = down.bias.requires_grad if down.bias is not None else down.weight.requires_grad
    return w1, b1, down.weight.requires_grad, b2


def _is_swiglu(ffn: nn.Module) -> bool:
    from nl_lightning.models.transformer import SwiGLU

    return type(ffn) is SwiGLU


def read_torch_layer_ffn(layer: nn.Module, name: str, activation: Optional[str] = None) -> FFNSpec:
    """The FFN ``linear2(dropout(activation(linear1(x))))`` of an ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` (its output dropout stays in the layer).

    Raises:
        ValueError: If the layer's activation is a function other than ``F.relu`` / ``F.gelu`` / ``F.silu`` /
            ``F.tanh`` and no ``activation`` is given, or as :func:`read_ffn`.

    """
    act_fn = layer.activation
    if isinstance(act_fn, nn.Module):
        found = activation_of(act_fn, f"The activation of {name!r}")
        if found is None:
            raise ValueError(
                f"The activation of {name!r} is {type(act_fn).__name__}, which no CMS level computes; use"
                " activation='relu' or 'gelu' (or an nn.GELU / nn.ReLU / nn.SiLU / nn.Tanh module) in the layer."
            )
    else:
        found = _FUNCTIONS.get(act_fn)
        if found is None and activation is None:
            raise ValueError(
                f"The activation of {name!r} is the function {getattr(act_fn, '__name__', act_fn)!r}, which to_cms"
                f" cannot identify; pass the activation it computes as `activation=`, one of {sorted(ACTIVATIONS)}."
            )
    act = found if found is not None else activation
    if activation is not None and found is not None and activation != found:
        raise ValueError(f"{name!r} applies {found!r}, but `activation={activation!r}` was given. Drop `activation`.")
    up = _Proj(f"{name}.linear1", layer.linear1, layer.linear1.weight, layer.linear1.bias)
    down = _Proj(f"{name}.linear2", layer.linear2, layer.linear2.weight, layer.linear2.bias)
    dropped = [f"{name}.dropout"] if layer.dropout.p > 0 else []
    return FFNSpec(up.weight, up.bias, down.weight, down.bias, act, _flags([up], down), dropped)
