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
Hugging Face Causal Language Models
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`HFCausalLM` wraps any causal language model of Hugging Face ``transformers`` (``AutoModelForCausalLM``: Llama,
Qwen2, Mistral, GPT-2, ...) as a :class:`~nl_lightning.models.lm.CausalLM`, so that ``nl-lightning fit`` trains it on
the ``{"tokens", "targets"}`` batches of :mod:`nl_lightning.data` with levels, rules and monitors from YAML. The model
is built from a config (random weights, e.g. a tiny one on the CPU) or loaded from a local checkpoint directory (never
downloaded). Optionally its FFNs are converted to CMS chains (:func:`~nl_lightning.models.to_cms`) and parameters are
frozen, both in ``__init__``, so that a Lightning checkpoint loads back into the same structure.

**Names.** The wrapped model is ``module.hf_model`` and the class sets ``nl_parameter_root = "hf_model"``, so level
globs of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` and the ``freeze`` / ``train`` globs are written as in
``hf_model.named_parameters()`` (``"model.layers.1.*"``, ``"lm_head.*"``); the full names
(``"hf_model.model.layers.1.*"``) work too.

``transformers`` is an optional dependency: ``pip install "nl-lightning[hf]"``. This module imports it only when a
model is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from nl_lightning._validation import check_int, is_int
from nl_lightning.levels import ParameterNames
from nl_lightning.models.cms import CMSBlock
from nl_lightning.models.hf_checkpoint import from_pretrained_cms, is_cms_checkpoint
from nl_lightning.models.lm import CausalLM

__all__ = ["HFCausalLM", "require_transformers"]

_INSTALL = 'pip install "nl-lightning[hf]"'


def require_transformers(what: str = "This feature") -> Any:
    """Import ``transformers``, or raise an ImportError that says how to install it.

    Args:
        what: What needs it, for the message (``"HFCausalLM"``).

    Returns:
        The ``transformers`` module.

    Raises:
        ImportError: If ``transformers`` is not installed; the message names ``pip install "nl-lightning[hf]"``.

    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"{what} needs the Hugging Face `transformers` package, which is not installed. Install the extra:"
            f" {_INSTALL} (or pip install 'transformers>=4.56')."
        ) from err
    return transformers


def _check_globs(name: str, globs: Any) -> list[str]:
    out = [globs] if isinstance(globs, str) else globs
    if not isinstance(out, Sequence) or any(not isinstance(g, str) or not g for g in out):
        raise MisconfigurationException(
            f"HFCausalLM: `{name}` must be a list of non-empty glob strings such as ['model.layers.*'], got {globs!r}."
        )
    return list(out)


def _build_hf_model(
    config: Optional[Mapping[str, Any]],
    pretrained: Optional[str],
    dtype: Optional[str],
    model_kwargs: Optional[Mapping[str, Any]],
) -> nn.Module:
    """The ``transformers`` causal LM: from a local checkpoint (``pretrained``) or a config (random weights)."""
    if (config is None) == (pretrained is None):
        raise MisconfigurationException(
            "HFCausalLM needs exactly one of `config` (a dict with `model_type`, random weights) and `pretrained` (a"
            f" local checkpoint directory), got config={config!r} and pretrained={pretrained!r}. On the command line,"
            " `--model.init_args.config=null --model.init_args.pretrained=/path` replaces a recipe's config."
        )
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise MisconfigurationException(f"HFCausalLM: `model_kwargs` must be a dict or None, got {model_kwargs!r}.")
    kwargs = dict(model_kwargs or {})
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise MisconfigurationException(
                f"HFCausalLM: `dtype` must be None or a floating dtype name such as 'float32' or 'bfloat16', got"
                f" {dtype!r}."
            )
    transformers = require_transformers("HFCausalLM")
    if config is not None:
        if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
            raise MisconfigurationException(
                "HFCausalLM: `config` must be a dict with a `model_type` (a transformers model type such as 'llama',"
                f" 'qwen2' or 'gpt2') and that model's config fields, got {config!r}."
            )
        fields = {k: v for k, v in config.items() if k != "model_type"}
        try:
            hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
        except ValueError as err:
            raise MisconfigurationException(f"HFCausalLM: cannot build a config from {dict(config)!r}: {err}") from err
        model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        return model if torch_dtype is None else model.to(torch_dtype)
    if not isinstance(pretrained, (str, os.PathLike)) or not os.fspath(pretrained):
        raise MisconfigurationException(
            f"HFCausalLM: `pretrained` must be the path of a local checkpoint directory, got {pretrained!r}."
        )
    if torch_dtype is not None:
        kwargs.setdefault("dtype", torch_dtype)
    if is_cms_checkpoint(pretrained):  # written by save_pretrained_cms: the base model, its CMS and every weight
        return from_pretrained_cms(pretrained, **kwargs).train()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.fspath(pretrained), local_files_only=True, **kwargs
        )
    except OSError as err:
        raise MisconfigurationException(
            f"HFCausalLM: cannot load a causal LM from {os.fspath(pretrained)!r} without downloading ({err}). Give a"
            " local directory holding config.json and the weights (as written by `save_pretrained`, or fetched once"
            " with `hf download <repo> --local-dir <dir>`)."
        ) from err
    return model.train()  # `from_pretrained` returns the model in eval mode; a new LightningModule is in train mode


def _model_vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(model.config.vocab_size)


class HFCausalLM(CausalLM):
    r"""Any ``transformers`` causal LM as a :class:`~nl_lightning.models.lm.CausalLM`, with optional CMS and freezing.

    ``forward(tokens)`` runs ``hf_model(input_ids=tokens, use_cache=False)`` and returns ``(logits, None)``: the model
    is stateless for :class:`CausalLM` (``stateful = False``; generation re-reads the last ``max_context`` tokens, the
    config's ``max_position_embeddings``). Training, evaluation, bits per token, AdamW with warm-up and cosine decay,
    and gradient clipping are :class:`CausalLM`'s; the loss is the mean cross-entropy over the target positions,
    which for a window ``w`` of ``T + 1`` tokens (``tokens = w[:, :-1]``, ``targets = w[:, 1:]``) is the loss
    ``hf_model(input_ids=w, labels=w)`` computes.

    What ``__init__`` does, in order:

    1. builds the model: ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))`` (random weights) or
       ``AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)`` (a local directory; nothing is
       downloaded);
    2. with ``cms``, converts FFNs to CMS chains: ``to_cms(hf_model, **cms)``, targets relative to the HF model
       (``{"targets": "model.layers.*.mlp", "chunk_sizes": [1, 4, 16]}``);
    3. freezes (``requires_grad = False``) the parameters that match a ``freeze`` glob and no ``train`` glob.

    Since the structure is rebuilt from the saved hyperparameters, ``HFCausalLM.load_from_checkpoint(path)`` restores
    a converted, partly frozen model (a ``pretrained`` directory must still exist there; the checkpoint's weights then
    replace the loaded ones).

    **Globs** (``freeze``, ``train`` and the levels of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`) are
    fnmatch patterns (``*`` also matches dots) over ``hf_model.named_parameters()`` names, such as
    ``"model.layers.*.mlp.*"``; full names (``"hf_model.…"``) and, for tied weights, every alias (GPT-2's
    ``"lm_head.weight"`` and ``"transformer.wte.weight"``) match too. "Freeze the backbone, train the CMS levels" is
    ``freeze=["*"], train=["*.cms.blocks.1.*", "*.cms.blocks.2.*", "*.cms.blocks.0.value"]`` (the added levels, and
    the value projection that makes the pretrained level's write targets).

    Args:
        config: A config as a dict: ``model_type`` (``"llama"``, ``"qwen2"``, ``"gpt2"``, ...) and that model's
            fields, e.g. ``{"model_type": "llama", "vocab_size": 256, "hidden_size": 64, ...}``. Random weights.
        pretrained: A local checkpoint directory (``save_pretrained`` output: ``config.json`` and weights), or one
            written by :func:`~nl_lightning.models.hf_checkpoint.save_pretrained_cms` (a converted model: loaded with
            its CMS, so ``cms`` must then be ``None``). Exactly one of ``config`` and ``pretrained`` is given.
        cms: Keyword arguments of :func:`~nl_lightning.models.to_cms` (``targets``, ``chunk_sizes``, ``activation``,
            ``in_context``, ``carry_state`` and the ContinuumMemory arguments such as ``inner_lr``); ``None``: no
            conversion.
        freeze: Globs of the parameters to freeze.
        train: Globs of parameters to keep trainable although a ``freeze`` glob matches them.
        vocab_size: The vocabulary size the data needs; ``None`` takes the model's. If given, it must equal the
            model's output size (a mismatch is an error, not a resize).
        max_context: The window generation re-reads; ``None``: the config's ``max_position_embeddings``.
        dtype: The parameters' dtype: ``"float32"`` (default; a bf16 checkpoint is upcast, and the Trainer's
            ``precision="bf16-mixed"`` computes in bf16), ``"bfloat16"``, ...; ``None`` keeps the default of
            ``transformers`` (for ``from_pretrained``, the checkpoint's dtype).
        model_kwargs: More keyword arguments of ``from_config`` / ``from_pretrained`` (``attn_implementation``, ...).
        **lm_kwargs: :class:`~nl_lightning.models.lm.CausalLM` arguments (``lr``, ``weight_decay``,
            ``warmup_steps``, ``max_steps_schedule``, ``segment_len``, ``grad_clip``, ``optimizer``, ...).

    Raises:
        ImportError: If ``transformers`` is not installed (the message names ``pip install "nl-lightning[hf]"``).
        MisconfigurationException: If not exactly one of ``config`` and ``pretrained`` is given, the config has no
            ``model_type``, ``pretrained`` cannot be loaded locally, ``cms`` is not a dict with ``targets`` and
            ``chunk_sizes`` or ``to_cms`` refuses it, a ``freeze`` / ``train`` glob matches no parameter (the message
            lists close names), a ``train`` glob exempts nothing, ``train`` is given without ``freeze``, nothing is
            left to train, or ``vocab_size`` differs from the model's; at ``setup``, if the data module's
            ``vocab_size`` exceeds the model's (a smaller byte-level one is a warning).

    Example::

        model = HFCausalLM(
            config={"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            cms={"targets": "model.layers.*.mlp", "chunk_sizes": [1, 4, 16]},
            freeze=["*"], train=["*.cms.blocks.1.*", "*.cms.blocks.2.*", "*.cms.blocks.0.value"], lr=3e-3,
        )
        levels = [Level("cms_1", ["*.cms.blocks.1.*"], every=4), Level("cms_2", ["*.cms.blocks.2.*"], every=16)]
        updates = MultiFrequencyUpdates(levels)
        Trainer(max_steps=100, callbacks=[updates]).fit(model, datamodule=TextDataModule())

    """

    stateful = False
    #: Level, ``freeze`` and ``train`` globs may be written relative to this attribute (the wrapped model).
    nl_parameter_root = "hf_model"

    def __init__(
        self,
        config: Optional[dict[str, Any]] = None,
        pretrained: Optional[str] = None,
        cms: Optional[dict[str, Any]] = None,
        freeze: Sequence[str] = (),
        train: Sequence[str] = (),
        vocab_size: Optional[int] = None,
        max_context: Optional[int] = None,
        dtype: Optional[str] = "float32",
        model_kwargs: Optional[dict[str, Any]] = None,
        **lm_kwargs: Any,
    ) -> None:
        freeze_globs, train_globs = _check_globs("freeze", freeze), _check_globs("train", train)
        if train_globs and not freeze_globs:
            raise MisconfigurationException(
                f"HFCausalLM: `train` ({train_globs}) keeps parameters trainable that `freeze` matches, but `freeze` is"
                " empty, so everything trains already. Give `freeze` (['*'] for the whole model) or drop `train`."
            )
        if cms is not None and (not isinstance(cms, Mapping) or not {"targets", "chunk_sizes"} <= set(cms)):
            raise MisconfigurationException(
                "HFCausalLM: `cms` must be a dict of to_cms arguments with at least `targets` and `chunk_sizes`, e.g."
                f" {{'targets': 'model.layers.*.mlp', 'chunk_sizes': [1, 4, 16]}}, got {cms!r}."
            )
        if max_context is not None:
            check_int(
                "max_context", max_context, hint="or None for max_position_embeddings", error=MisconfigurationException
            )
        hf_model = _build_hf_model(config, pretrained, dtype, model_kwargs)
        model_vocab = _model_vocab_size(hf_model)
        if vocab_size is not None and vocab_size != model_vocab:
            raise MisconfigurationException(
                f"HFCausalLM: `vocab_size` is {vocab_size!r} but the model outputs {model_vocab} logits. Set the"
                " config's vocab_size to match the data (256 for byte-level text), use the checkpoint's tokenizer"
                " (nl_lightning.data.HFTextDataModule), or leave `vocab_size` out."
            )
        super().__init__(model_vocab, **lm_kwargs)
        self.hf_model = hf_model
        positions = getattr(hf_model.config, "max_position_embeddings", None)
        self.max_context = max_context if max_context is not None else (positions if is_int(positions) else None)
        if cms is not None:
            self._convert(dict(cms))
        self._freeze(freeze_globs, train_globs)

    def _convert(self, cms: dict[str, Any]) -> None:
        from nl_lightning.models.to_cms import to_cms

        try:
            to_cms(self.hf_model, **cms)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"HFCausalLM: to_cms(hf_model, **{cms!r}) failed: {err}") from err

    def _freeze(self, freeze: list[str], train: list[str]) -> None:
        if not freeze:
            return
        index = ParameterNames(self.named_parameters(remove_duplicate=False), root=self.nl_parameter_root)

        def matched(kind: str, globs: list[str]) -> dict[str, set[int]]:
            hits = {}
            for glob in globs:
                hits[glob] = {i for i, _ in index.match_indices(glob)}
                if not hits[glob]:
                    raise MisconfigurationException(
                        f"HFCausalLM: the `{kind}` glob {glob!r} matches no parameter of the Hugging Face model (globs"
                        f" are relative to it, as in `hf_model.named_parameters()`). {index.hint(glob)}"
                    )
            return hits

        frozen_hits, kept_hits = matched("freeze", freeze), matched("train", train)
        frozen = set().union(*frozen_hits.values())
        kept = set().union(*kept_hits.values()) if kept_hits else set()
        for glob, hits in kept_hits.items():
            if not hits & frozen:
                raise MisconfigurationException(
                    f"HFCausalLM: the `train` glob {glob!r} matches only parameters that no `freeze` glob freezes, so"
                    f" it changes nothing (`freeze` is {freeze}). Fix the glob or remove it."
                )
        if not any(p.requires_grad for i, p in enumerate(index.params) if i not in frozen - kept):
            raise MisconfigurationException(
                f"HFCausalLM: `freeze` {freeze} with `train` {train} leaves no parameter to train. Name the parameters"
                " to keep training in `train`, for example ['*.cms.blocks.1.*']."
            )
        for i in frozen - kept:
            index.params[i].requires_grad_(False)
        total = sum(p.numel() for p in index.params)
        trainable = sum(p.numel() for p in index.params if p.requires_grad)
        rank_zero_info(
            f"HFCausalLM: froze {len(frozen - kept)} of {len(index.params)} parameter tensors; {trainable:,} of"
            f" {total:,} values train."
        )

    @override
    def setup(self, stage: str) -> None:
        """Check the data module's ``vocab_size`` (when it has one) against the model's."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if not is_int(data_vocab) or data_vocab == self.vocab_size:
            return
        if data_vocab > self.vocab_size:
            raise MisconfigurationException(
                f"The data module {type(datamodule).__name__} has {data_vocab} token ids but the model only"
                f" {self.vocab_size}. Tokenize with the model's tokenizer (nl_lightning.data.HFTextDataModule with"
                " tokenizer=<checkpoint directory>), or build the model with the data's vocab_size."
            )
        from nl_lightning.data.hf_text import HFTextDataModule

        if not isinstance(datamodule, HFTextDataModule):  # a tokenizer may have fewer ids than a padded output layer
            rank_zero_warn(
                f"The data module {type(datamodule).__name__} has {data_vocab} token ids and the model"
                f" {self.vocab_size}: its tokens are not the ids the model was trained on. For a pretrained checkpoint,"
                " tokenize with its tokenizer: --data=nl_lightning.data.HFTextDataModule"
                " --data.init_args.tokenizer=<checkpoint directory>."
            )

    @override
    def forward(self, tokens: Tensor, state: Any = None, write: bool = True) -> tuple[Tensor, None]:
        """``tokens`` ``(B, T)`` -> ``(logits (B, T, vocab_size), None)``.

        ``state`` is ignored (the model carries no state between calls). The in-context writes of converted FFNs
        (``cms`` with ``in_context=True``) happen within every call; ``write=False`` (``memorize_at_eval=False``)
        reads every token with the levels' learned weights instead, as if every ``inner_lr`` were 0.
        """
        if write:
            return self.hf_model(input_ids=tokens, use_cache=False).logits, None
        levels = [m for m in self.hf_model.modules() if isinstance(m, CMSBlock)]
        rates = [level.inner_lr for level in levels]
        try:
            for level in levels:
                level.inner_lr = 0.0
            return self.hf_model(input_ids=tokens, use_cache=False).logits, None
        finally:
            for level, rate in zip(levels, rates, strict=True):
                level.inner_lr = rate
