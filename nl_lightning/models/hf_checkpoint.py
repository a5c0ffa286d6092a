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
Converted Hugging Face Models: Saving and Loading
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

``model.save_pretrained`` writes the CMS parameters of a model converted by :func:`~nl_lightning.models.to_cms` under
their own names (``...mlp.cms.blocks.0.w1``), which the plain architecture does not have: a plain ``from_pretrained``
of such a directory builds the original FFNs, initialises them at random (transformers' load report lists them as
missing and the CMS tensors as unexpected) and drops the CMS. Save with :func:`save_pretrained_cms` and load with
:func:`from_pretrained_cms`, which re-applies the recorded conversions and loads every tensor strictly. The directory
is a normal ``save_pretrained`` directory plus ``nl_cms_conversions.json``; its ``config.json`` carries an ``nl_cms``
entry naming the loader, so a model loaded plainly shows it in ``model.config.nl_cms``, and :func:`is_cms_checkpoint`
tells such a directory apart.

Example::

    from nl_lightning.models import from_pretrained_cms, save_pretrained_cms

    save_pretrained_cms(model, "ckpt")
    model = from_pretrained_cms("ckpt")  # the same model, CMS levels included

"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from nl_lightning.models.hf_cms import install_generation_hooks
from nl_lightning.models.to_cms import CMSAdapter, to_cms

__all__ = ["CONVERSIONS_FILE", "from_pretrained_cms", "is_cms_checkpoint", "save_pretrained_cms"]

#: the file :func:`save_pretrained_cms` writes next to the model's files, and :func:`from_pretrained_cms` reads
CONVERSIONS_FILE = "nl_cms_conversions.json"
_FORMAT = 1
_LOADER = "nl_lightning.models.from_pretrained_cms"


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
            " nl_lightning.models.save_pretrained_cms(model, directory)."
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
    install_generation_hooks(model)  # idempotent: to_cms installed them already on a PreTrainedModel
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
