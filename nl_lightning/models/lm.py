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
Causal Language Model
^^^^^^^^^^^^^^^^^^^^^

:class:`CausalLM` is the LightningModule base of every causal LM in nl_lightning (Transformer++, Titans, Hope). A
subclass implements only the network:

.. code-block:: python

    def forward(self, tokens, state=None, write=True):  # tokens (B, T) int64
        return logits, new_state                         # logits (B, T, vocab); new_state None if stateless

``state`` is the model's memory (fast weights) after the previous segment, ``None`` at the start of a sequence;
``write=False`` asks the model to read its memory without writing to it (test-time memorization off). A subclass may
override :meth:`CausalLM.state_stats` to log memory statistics, set ``stateful = False`` if it carries no state
(generation then re-reads a window of ``max_context`` tokens), and set ``max_context``.

**Batches** are ``{"tokens": (B, T), "targets": (B, T)}`` (``int64``), ``targets[:, t]`` the token to predict after
``tokens[:, :t + 1]``, ``-100`` where there is none (:mod:`nl_lightning.data.text`, :mod:`nl_lightning.data.synthetic`).

**Segments and truncated backpropagation.** A sequence is cut into segments of ``segment_len`` tokens, run in order
with the state carried from one to the next and detached at every boundary, so gradients flow within a segment only
(the meta-learned initial state still learns from the first segment of every sequence). The loss is one mean
cross-entropy over every target position of the whole sequence; its value in bits (``loss / ln 2``) is bits per byte
for byte-level data.

**Evaluation** runs the same segmentation under Lightning's inference mode with ``write=memorize_at_eval`` (test-time
memorization is on by default: the memory keeps writing while it reads the evaluation sequence) and logs the loss,
bits and the accuracy of the target positions. With several evaluation loaders (a data module with ``eval_lengths``),
each loader's metrics carry its length (``val_acc_len128``); the first loader also logs the plain names
(``val_loss``, ``val_bpc``, ``val_acc``) so that checkpoints and the progress bar can monitor one value.

**Non-finite values.** A training or evaluation loss that is NaN or inf is reported in a warning (once per run) that
names where it started: the first non-finite parameter, else the first non-finite tensor of the memory state in a
re-run of the batch without gradients, segment by segment and block by block (e.g. ``state.blocks[1].cms.levels[0].w1``:
block 1, CMS level 0), else the logits. With ``stop_on_nonfinite=True`` the training step then returns ``None`` (no
optimizer step on the non-finite loss) and sets ``trainer.should_stop``, so the run ends after that step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from nl_lightning._validation import check_int, check_nonnegative, check_positive, check_unit

__all__ = ["IGNORE_INDEX", "BlockStackLM", "CausalLM", "detach_state"]

IGNORE_INDEX = -100


def detach_state(state: Any) -> Any:
    """Stop gradients at a segment boundary: ``None``, ints, floats and strings stay; an object with ``detach()`` (a
    memory state dataclass) or a tensor is detached; lists, tuples, named tuples and dicts are detached element-wise."""
    if state is None:
        return None
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(detach_state(s) for s in state))
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, Mapping):
        return {k: detach_state(v) for k, v in state.items()}
    if hasattr(state, "detach"):
        return state.detach()
    if isinstance(state, (int, float, str)):  # counters and flags carried along with the tensors
        return state
    raise TypeError(f"Cannot detach a memory state of type {type(state).__name__}; give it a `detach()` method.")


def _unpack(batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, Mapping):
        return batch["tokens"], batch.get("targets")
    if isinstance(batch, (list, tuple)):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


class CausalLM(pl.LightningModule):
    r"""Base LightningModule for causal language models: segmented training, evaluation, generation, optimizer.

    Subclasses implement ``forward(tokens, state=None, write=True) -> (logits, state)`` (see the module docstring).
    Training minimises the mean cross-entropy over all target positions (``-100`` ignored) and logs ``train_loss`` and
    ``train_bpc`` (``loss / ln 2``), plus ``train_<key>`` for each entry of :meth:`state_stats`. Validation and test log
    ``{val,test}_loss``, ``_bpc`` and ``_acc`` (argmax accuracy on the target positions), averaged over every target
    position of the loader. The optimizer is AdamW with weight decay on the parameters with two or more dimensions only,
    a linear warm-up over ``warmup_steps`` steps, then a constant rate or, with ``max_steps_schedule``, a cosine decay
    to ``min_lr_ratio * lr`` at that step (constant after it).

    Args:
        vocab_size: Vocabulary size ``V`` (256 for byte-level text).
        lr: Peak learning rate.
        weight_decay: AdamW decoupled weight decay on ``>= 2``-D parameters.
        warmup_steps: Linear warm-up steps (0: none).
        max_steps_schedule: Step at which the cosine decay reaches ``min_lr_ratio * lr``; ``None`` keeps ``lr``.
        betas: AdamW betas.
        segment_len: Tokens per segment (truncated backpropagation and memory carry); ``None``: the whole sequence.
        memorize_at_eval: Let the memory write during validation, test, predict and generation.
        grad_clip: Clip the gradient norm to this value, unless the Trainer sets ``gradient_clip_val`` (which wins);
            ``None`` disables it.
        min_lr_ratio: The cosine schedule's final rate as a fraction of ``lr``.
        optimizer: A callable that builds the optimizer from :meth:`param_groups` (in YAML a ``class_path`` with
            ``init_args``, e.g. ``nl_lightning.optim.M3``); it must set its own learning rate. ``None``: AdamW with
            ``lr``, ``betas`` and the groups' weight decay. The warm-up / cosine schedule applies to either.
        stop_on_nonfinite: On a non-finite training loss, skip that step's optimizer step and stop the run
            (``trainer.should_stop``, agreed across processes) after warning where it started. ``False`` (default)
            warns once and trains on.

    Raises:
        ValueError: On ``vocab_size < 2``, ``lr <= 0``, ``weight_decay < 0``, ``warmup_steps < 0``,
            ``max_steps_schedule <= warmup_steps``, betas outside ``[0, 1)``, ``segment_len < 1``, ``grad_clip <= 0``
            or ``min_lr_ratio`` outside ``[0, 1]``.

    Example::

        class Bigram(CausalLM):
            def __init__(self, vocab_size=256, **lm_kwargs):
                super().__init__(vocab_size, **lm_kwargs)
                self.table = nn.Embedding(vocab_size, vocab_size)

            def forward(self, tokens, state=None, write=True):
                return self.table(tokens), None

        Trainer(max_steps=100).fit(Bigram(lr=1e-2), datamodule=TextDataModule())

    """

    #: Whether the model carries a memory state between calls; a stateless model re-reads a window when generating.
    stateful: bool = True
    #: The longest window a stateless model re-reads per generated token (``None``: the whole sequence).
    max_context: Optional[int] = None

    def __init__(
        self,
        vocab_size: int,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps_schedule: Optional[int] = None,
        betas: tuple[float, float] = (0.9, 0.95),
        segment_len: Optional[int] = None,
        memorize_at_eval: bool = True,
        grad_clip: Optional[float] = 1.0,
        min_lr_ratio: float = 0.1,
        optimizer: Optional[OptimizerCallable] = None,
        stop_on_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, low=2, hint="use 256 for byte-level text")
        check_positive("lr", lr, hint="use e.g. 1e-3")
        check_nonnegative("weight_decay", weight_decay, hint="use 0 to disable it")
        check_int("warmup_steps", warmup_steps, low=0)
        if max_steps_schedule is not None:
            check_int(
                "max_steps_schedule",
                max_steps_schedule,
                low=warmup_steps + 1,
                hint=f"it must exceed warmup_steps={warmup_steps}; use the Trainer's max_steps for a cosine decay",
            )
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        for i, beta in enumerate(betas):
            check_unit(f"betas[{i}]", beta, closed=False)
        if segment_len is not None:
            check_int("segment_len", segment_len, hint="use None for one segment")
        if grad_clip is not None:
            check_positive("grad_clip", grad_clip, hint="use None for no clipping")
        check_unit("min_lr_ratio", min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])  # also the subclass's arguments; a callable is not saved
        self.optimizer_factory = optimizer
        self.vocab_size, self.lr, self.weight_decay, self.betas = vocab_size, float(lr), float(weight_decay), betas
        self.warmup_steps, self.max_steps_schedule, self.min_lr_ratio = warmup_steps, max_steps_schedule, min_lr_ratio
        self.segment_len, self.memorize_at_eval, self.grad_clip = segment_len, bool(memorize_at_eval), grad_clip
        self.stop_on_nonfinite = bool(stop_on_nonfinite)
        #: where the first non-finite loss of this run started (``None``: none seen)
        self.nonfinite_reason: Optional[str] = None

    # ------------------------------------------------------------------------------------------------ the network
    @override
    def forward(self, tokens: Tensor, state: Any = None, write: bool = True) -> tuple[Tensor, Any]:
        """Map ``tokens`` ``(B, T)`` to ``(logits (B, T, V), new_state)``; implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(tokens, state=None, write=True).")

    def state_stats(self) -> dict[str, float]:
        """Memory statistics to log after each training step (e.g. the inner loss); none by default."""
        return {}

    def segment_forward(
        self, tokens: Tensor, state: Any = None, write: bool = True, segment_len: Optional[int] = None
    ) -> tuple[Tensor, Any]:
        """Run ``tokens`` ``(B, T)`` segment by segment, carrying the state and detaching it at every boundary.

        Args:
            tokens: Input tokens ``(B, T)``.
            state: The state to start from (``None``: a new sequence).
            write: Passed to every ``forward`` call.
            segment_len: Tokens per segment; ``None`` uses ``self.segment_len`` (``None`` there: one segment).

        Returns:
            The logits of every position ``(B, T, V)`` and the state after the last segment (not detached).

        """
        seg = segment_len or self.segment_len or tokens.shape[1]
        outs = []
        for start in range(0, tokens.shape[1], seg):
            if start > 0:
                state = detach_state(state)  # truncated backpropagation at the segment boundary
            logits, state = self(tokens[:, start : start + seg], state=state, write=write)
            outs.append(logits)
        return torch.cat(outs, dim=1), state

    # ------------------------------------------------------------------------------------------------ steps
    def sequence_loss(self, tokens: Tensor, targets: Tensor, write: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """The loss of a batch, run with :meth:`segment_forward` from a new sequence.

        Args:
            tokens: Input tokens ``(B, T)``.
            targets: Targets ``(B, T)``, ``-100`` where there is none.
            write: Passed to every ``forward`` call.

        Returns:
            The mean cross-entropy over the target positions (0 if there are none), the number of target positions,
            and the number of them whose argmax prediction is right (0-dim tensors).

        """
        logits, _ = self.segment_forward(tokens, write=write)  # (B, T, V)
        flat_logits, flat_targets = logits.flatten(0, 1).float(), targets.flatten()  # (B*T, V), (B*T,)
        count = (flat_targets != IGNORE_INDEX).sum()
        total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / count.clamp(min=1)
        hits = ((flat_logits.argmax(dim=-1) == flat_targets) & (flat_targets != IGNORE_INDEX)).sum()
        return loss, count, hits

    def loss(self, batch: Any) -> Tensor:
        """The mean next-token cross-entropy of a batch (``{"tokens", "targets"}`` or ``(tokens, targets)``), as in
        training; the per-sample loss callbacks such as :class:`~nl_lightning.callbacks.ElasticWeightConsolidation`
        call."""
        tokens, targets = _unpack(batch)
        return self.sequence_loss(tokens, targets)[0]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        tokens, targets = _unpack(batch)
        loss, _, _ = self.sequence_loss(tokens, targets, write=True)
        bad = not bool(torch.isfinite(loss.detach()))
        if self.stop_on_nonfinite and self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # every process stops together
        if bad:
            self._report_nonfinite(loss, tokens, "training", write=True)
            if self.stop_on_nonfinite:
                if self._trainer is not None:
                    self.trainer.should_stop = True
                return None  # no backward and no optimizer step on a non-finite loss
        n = tokens.shape[0]  # evaluation weights by target positions
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        self.log("train_bpc", loss / math.log(2), prog_bar=True, batch_size=n)
        for key, value in self.state_stats().items():
            self.log(f"train_{key}", value, batch_size=n)
        return loss

    def _evaluate(self, batch: Any, stage: str, dataloader_idx: int) -> Tensor:
        tokens, targets = _unpack(batch)
        loss, count, hits = self.sequence_loss(tokens, targets, write=self.memorize_at_eval)
        if not bool(torch.isfinite(loss)):
            self._report_nonfinite(loss, tokens, stage, write=self.memorize_at_eval)
        n = int(count)  # the epoch value is the mean weighted by target positions
        if n == 0:
            return loss
        values = {"loss": loss, "bpc": loss / math.log(2), "acc": hits.float() / n}
        names = [""]
        if self._num_eval_loaders(stage) > 1:
            names = [self._loader_suffix(dataloader_idx)] + ([""] if dataloader_idx == 0 else [])
        for suffix in names:
            for key, value in values.items():
                self.log(
                    f"{stage}_{key}{suffix}",
                    value,
                    batch_size=n,
                    prog_bar=suffix == "" and key != "acc",
                    add_dataloader_idx=False,
                    sync_dist=True,
                )
        return loss

    def locate_nonfinite(self, tokens: Tensor, write: bool = True) -> Optional[str]:
        """Where a batch's computation first turns non-finite: the first non-finite parameter, else the first
        non-finite tensor of the memory state (re-running ``tokens`` without gradients, segment by segment, as
        :meth:`segment_forward` does), else the first segment with non-finite logits.

        Args:
            tokens: Input tokens ``(B, T)``.
            write: Passed to every ``forward`` call.

        Returns:
            A description such as ``"the memory state state.blocks[1].cms.levels[0].w1 after tokens [0, 64)"``, or
            ``None`` if everything is finite.

        """
        for name, p in self.named_parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                return f"the parameter {name!r}"
        seg = self.segment_len or tokens.shape[1]
        state = None
        with torch.no_grad():
            for start in range(0, tokens.shape[1], seg):
                end = min(start + seg, tokens.shape[1])
                logits, state = self(tokens[:, start:end], state=state, write=write)
                path = _first_nonfinite(state, "state")
                if path is not None:
                    return f"the memory state {path} after tokens [{start}, {end})"
                if not bool(torch.isfinite(logits).all()):
                    return f"the logits of tokens [{start}, {end}) (every parameter and memory state finite)"
        return None

    def _report_nonfinite(self, loss: Tensor, tokens: Tensor, stage: str, write: bool) -> None:
        """Warn, once per run, that the ``stage`` loss is non-finite and where it started."""
        if self.nonfinite_reason is not None:
            return
        where = self.locate_nonfinite(tokens, write=write) or "the loss (every parameter, state and logit finite)"
        step = self._trainer.global_step if self._trainer is not None else None
        self.nonfinite_reason = f"the {stage} loss is {float(loss)} at step {step}; it started in {where}"
        action = (
            "Stopping the run (stop_on_nonfinite=True)."
            if self.stop_on_nonfinite and stage == "training"
            else "Training goes on; pass stop_on_nonfinite=True to stop instead."
        )
        rank_zero_warn(
            f"{type(self).__name__}: {self.nonfinite_reason}. Lower the learning rates (`lr`, the memories' inner"
            f" rates) or keep the inner bounds on (`max_inner_grad_norm`, `max_write_norm`). {action}",
            category=RuntimeWarning,
        )

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, "val", dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, "test", dataloader_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The argmax next-token prediction at every position, ``int64`` ``(B, T)`` (``batch``: a batch dict or the
        tokens); the same segmentation and ``write=memorize_at_eval`` as evaluation. For logits, call
        :meth:`segment_forward`."""
        tokens, _ = _unpack(batch)
        logits, _ = self.segment_forward(tokens, write=self.memorize_at_eval)
        return logits.argmax(dim=-1)

    def _num_eval_loaders(self, stage: str) -> int:
        if self._trainer is None:
            return 1
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        return len(loaders) if isinstance(loaders, (list, tuple, Mapping)) else 1

    def _loader_suffix(self, dataloader_idx: int) -> str:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        lengths = getattr(datamodule, "eval_lengths", None)
        if lengths is not None and dataloader_idx < len(lengths):
            return f"_len{lengths[dataloader_idx]}"
        return f"_dl{dataloader_idx}"

    # ------------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Continue ``prompt`` ``(B, P)`` by ``max_new_tokens`` sampled tokens, returning ``(B, P + max_new_tokens)``.

        A stateful model reads the prompt once (in segments, writing its memory if ``memorize_at_eval``), then one
        token per step, carrying its state. A stateless model (``stateful = False``) re-reads the last ``max_context``
        tokens at every step. The model is put in eval mode for the call and restored after it.

        Args:
            prompt: Prompt tokens ``(B, P)``, ``P >= 1``.
            max_new_tokens: Tokens to generate, ``>= 0``.
            temperature: Softmax temperature; ``0`` picks the argmax (greedy, deterministic).
            top_k: Sample among the ``top_k`` most likely tokens only (``None``: all).
            generator: Random generator of the sampling (``None``: the global one).

        Returns:
            The prompt followed by the generated tokens.

        Raises:
            ValueError: If ``prompt`` is not ``(B, P)`` with ``P >= 1``, ``max_new_tokens < 0``, ``temperature < 0``
                or ``top_k < 1``.

        Example::

            out = model.generate(encode("The ").unsqueeze(0), max_new_tokens=64, temperature=0.8, top_k=20)
            print(decode(out[0]))

        """
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"`prompt` must be (batch, length >= 1) tokens, got shape {tuple(prompt.shape)}.")
        check_int("max_new_tokens", max_new_tokens, low=0)
        check_nonnegative("temperature", temperature, hint="use 0 for greedy decoding")
        if top_k is not None:
            check_int("top_k", top_k, hint="use None to sample from the whole vocabulary")
        was_training = self.training
        self.eval()
        try:
            out = [prompt]
            if max_new_tokens == 0:
                return prompt
            if self.stateful:
                logits, state = self.segment_forward(prompt, write=self.memorize_at_eval)
                for i in range(max_new_tokens):
                    out.append(_sample(logits[:, -1], temperature, top_k, generator))
                    if i + 1 < max_new_tokens:
                        logits, state = self(out[-1], state=state, write=self.memorize_at_eval)
            else:
                seq = prompt
                for _ in range(max_new_tokens):
                    window = seq if self.max_context is None else seq[:, -self.max_context :]
                    logits, _ = self(window)
                    seq = torch.cat([seq, _sample(logits[:, -1], temperature, top_k, generator)], dim=1)
                return seq
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: ``decay`` (parameters with ``>= 2`` dimensions) and ``no_decay`` (biases, norms, gates).

        When the Trainer holds :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`, the parameters of each of its
        levels get groups of their own (``"<level>/decay"``, ``"<level>/no_decay"``, with the same hyper-parameters),
        so that a rule (``HypergradientRule(level=...)``, ``ScheduledRule(level=...)``) can target a level from YAML.
        """
        level_of = self._level_names()
        groups: dict[str, dict[str, Any]] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            kind = "decay" if p.dim() >= 2 else "no_decay"
            name = kind if id(p) not in level_of else f"{level_of[id(p)]}/{kind}"
            decay = self.weight_decay if kind == "decay" else 0.0
            groups.setdefault(name, {"name": name, "params": [], "weight_decay": decay})["params"].append(p)
        return list(groups.values())

    def _level_names(self) -> dict[int, str]:
        """``id(parameter)`` -> the name of its MultiFrequencyUpdates level, for the Trainer this module is attached to
        (empty when none)."""
        from nl_lightning.callbacks.multi_frequency import MultiFrequencyUpdates  # the callbacks import the models

        trainer = getattr(self, "_trainer", None)
        out: dict[int, str] = {}
        for cb in getattr(trainer, "callbacks", None) or []:
            if isinstance(cb, MultiFrequencyUpdates) and cb._book is not None:
                for level in cb.book.levels:
                    out.update((id(p), level.name) for _, p in cb.book.params(level.name))
        return out

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` (0-based): warm-up, then constant or cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.max_steps_schedule is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps_schedule - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.param_groups())
        else:
            optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[Union[int, float]] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        if gradient_clip_val is None and self.grad_clip is not None:
            gradient_clip_val = self.grad_clip  # the Trainer's gradient_clip_val, when set, wins
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------------------ sizes
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters; ``non_embedding=True`` leaves out those of ``nn.Embedding`` modules (and so
        a head tied to the embedding), the usual count for matching model sizes."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    for p in module.parameters():
                        params.pop(id(p), None)
        return sum(p.numel() for p in params.values())


def _first_nonfinite(obj: Any, path: str) -> Optional[str]:
    """The path of the first tensor holding NaN or inf inside a memory state (tensors, dataclasses, named tuples,
    lists, tuples and dicts, in order), or ``None``."""
    if isinstance(obj, Tensor):
        return None if not obj.is_floating_point() or bool(torch.isfinite(obj).all()) else path
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items: Any = ((f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = ((f".{name}", value) for name, value in zip(obj._fields, obj, strict=True))
    elif isinstance(obj, (list, tuple)):
        items = ((f"[{i}]", value) for i, value in enumerate(obj))
    elif isinstance(obj, Mapping):
        items = ((f"[{key!r}]", value) for key, value in obj.items())
    else:
        return None
    for suffix, value in items:
        found = _first_nonfinite(value, path + suffix)
        if found is not None:
            return found
    return None


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` ``(B, V)``, as ``(B, 1)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


class BlockStackLM(CausalLM):
    """A :class:`CausalLM` made of token embeddings, a stack of stateful blocks, RMSNorm and a (tied) output head.

    Each block is called as ``h, block_state = block(h, block_state, write=write)``; the model's state is
    ``state_type(list_of_block_states)`` (a dataclass with a ``blocks`` field and ``detach()``). Subclasses call
    :meth:`build` in ``__init__`` and set ``state_type``, or override :meth:`forward` for blocks that carry more than
    one state.
    """

    #: Built from the list of block states; needs a ``blocks`` attribute.
    state_type: Any = None

    def build(self, dim: int, blocks: list[nn.Module], tie_embeddings: bool = True) -> None:
        """Create ``embed``, ``blocks``, ``norm`` and ``head`` (normal(0, 0.02) embeddings, the head scaled by
        ``1 / sqrt(2 depth)``; tied to the embeddings when ``tie_embeddings``)."""
        self.depth = len(blocks)
        self.embed = nn.Embedding(self.vocab_size, dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, self.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02 / math.sqrt(2 * self.depth))
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @override
    def forward(self, tokens: Tensor, state: Any = None, write: bool = True) -> tuple[Tensor, Any]:
        """``tokens`` ``(B, T)`` -> ``(logits (B, T, vocab_size), state)``."""
        h = self.embed(tokens)  # (B, T, D)
        states = [None] * self.depth if state is None else state.blocks
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            h, s = block(h, s, write=write)
            new.append(s)
        return self.head(self.norm(h)), self.state_type(new)
