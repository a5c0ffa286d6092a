"""Hope vs Hope-Attention vs Transformer++ vs Titans at tiny CPU sizes: bits per byte, recall, streaming memory.

The four causal LMs of ``nl_lightning.models``, at (nearly) equal parameter counts, in three
parts (``--parts``). Every number is measured in this process or in a subprocess it starts; nothing is copied from the
paper. The sha256 of each model and data source file is recorded in the JSON.

Models (tiny sizes of the CPU recipes ``nl_lightning/recipes/text_*.yaml``; width 64, 4 heads)
------------------------------------------------------------------------------------------------
- ``hope``: ``HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64], cms_hidden_mult=2.5)``,
  self-modifying Titans then a CMS (the parameter reference), with the defaults otherwise: ``cms_retention``
  ``DEFAULT_CMS_RETENTION`` and CMS writes driven by the task loss (``cms_write_signal="task_loss"``). The task-loss
  writes need no value projection, so the CMS is wider than the recipe's (hidden 160 instead of 128) to keep the
  parameters of the other models;
- ``hope_attention``: the same with ``variant="attention"`` (causal softmax attention whose key/value cache is carried
  across segments, then the CMS);
- ``transformer``: ``TransformerPP(dim=64, depth=3, heads=4, mlp_mult=2.0)``. The recipe's ``mlp_mult`` (8/3) gives
  about 22 % more parameters than Hope, so the SwiGLU width is lowered to 128 to match;
- ``titans``: ``TitansMAL(dim=64, depth=2, heads=4, window=64, chunk_size=16, mlp_mult=1.5)`` (MAL, memory depth 2);
  ``mlp_mult`` is lowered from 8/3 for the same reason;
- ``hope_rho1`` (an ablation, in parts 1 and 3 only): ``hope`` with ``cms_retention=1.0``, the CMS writes of Eq. 31 as
  printed, with no pull back towards the learned initial weights;
- ``hope_chunk64`` (an ablation, in part 1 only): ``hope`` with ``chunk_size=64`` for the self-modifying Titans, the
  throughput setting we use [ours] (the same parameters; ``benchmarks/memory_speed.py`` times its step);
- the CMS write signals (ablations, in part 1 only), each ``hope`` with ``cms_write_signal="target"`` (every CMS level
  writes towards a learned target ``W_v k``): ``hope_target`` (first-order writes, the value projections learning
  through the targets), ``hope_value_frozen`` (the value projections frozen at their initialisation, the identity, so
  that every write pulls its level towards autoencoding its normalised input: the target writes without the target
  gradient) and ``hope_cms_second_order`` (``differentiable_writes=True`` in every CMS: the outer loss backpropagates
  through the writes), all with the recipe's CMS width (hidden 128) and so the same parameters as ``hope``. ``hope``
  itself is the fourth signal, the task loss.

The exact parameter counts (all distinct parameters, embeddings tied with the head) and their difference from Hope's
are in the JSON and the report; the script warns when one is more than 5 % off. All models: AdamW, lr 3e-3, weight
decay 0.1 on matrices, betas (0.9, 0.95), linear warm-up over 30 steps (scaled down for short runs), cosine decay to
0.1 x lr at the last step, gradient clipping at 1.0 (the ``CausalLM`` defaults and the recipes' values).

Part 1, ``bpc`` (byte-level language modelling)
-----------------------------------------------
``TextDataModule(seq_len=256, batch_size=8, samples_per_epoch=800, seed=S)`` on the default corpus (the standard
library's ``pydoc_data.topics``; the last 5 % of its bytes validate). ``segment_len=128``: the memory is carried
across the two segments of a training sequence, detached at the boundary. Each (model, seed) trains ``--steps``
(300) optimizer steps through Lightning's ``Trainer`` (``logger=False``, no checkpoints, no progress bar, no
validation during the fit) after ``seed_everything(S)``, so every model sees the same batches: ``steps * 8 * 256``
training tokens. Then a fresh ``Trainer`` validates the trained weights over the whole held-out tail, twice for the
stateful models: with test-time memorization (``memorize_at_eval=True``, the default: the memory keeps writing while
it reads a validation window) and without (``False``: every memory is read, never written, within a window). Reported:
``val_bpc`` (mean cross-entropy in bits per byte over every held-out byte), mean +- std over seeds; the fit's wall
time, training tokens per second, the median wall time of a training step (leaving out the first 5), and the final
training loss (mean of the last 10 steps). A run whose training loss or validation loss is NaN or infinite is
reported as diverged and left out of the means (the step of the first non-finite loss is in the JSON); training stops
there.

Part 2, ``recall`` (MQAR, Arora et al. 2023; needle, Titans Table 2)
--------------------------------------------------------------------
- ``mqar``: ``MQARDataModule(num_pairs=8, seq_len=64, vocab_size=64, batch_size=32, train_samples=6400,
  val_samples=256, seed=S)``: 8 key-value pairs at the start, queries of every key at the end; the evaluation sets at
  1x, 2x and 4x the length keep the pairs and the queries and lengthen the filler between them.
- ``needle``: ``NeedleDataModule(seq_len=128, vocab_size=64, batch_size=32, ...)``: one ``0 key value`` needle at a
  random depth in random filler, queried by ``0 key`` at the end; evaluation sets at 1x, 2x, 4x with depths spread
  evenly over [0, 1].

Models as above with ``vocab_size=64`` and ``segment_len=64`` (the recipes' ``mqar_*`` / ``needle_*``), trained for
``--recall-steps`` steps and validated once (``memorize_at_eval=True``) on every length. Score: ``val_acc_len{L}``,
the argmax accuracy on the scored positions (a query's value; chance is 1/32 for both tasks), mean +- std over
``--recall-seeds``. Transformer++ attends within a 64-token segment and carries nothing across segments, so it can
only answer a query whose evidence (the queried pair, or the needle's value) lies in the query's own segment. The
share of such targets in each evaluation set is computed from the data and reported (``in-segment``): it is the
ceiling of a model without memory across segments, and chance applies to the rest.

Part 3, ``streaming`` (inference memory against length)
-------------------------------------------------------
Each configuration runs in a fresh Python process (``--_stream-probe``; glibc's ``MALLOC_MMAP_THRESHOLD_=131072``
unless set, so that freed blocks leave the resident set, as in ``benchmarks/cms.py``). The probe builds the text-size
model (``vocab_size=256``), loads the weights that seed ``--seeds[0]`` trained in part 1 when part 1 ran in the same
invocation (initial weights otherwise; the JSON says which), and reads the first ``L`` bytes of the corpus under
``torch.inference_mode()`` at batch 1:

- stateful models (``hope``, ``titans``, ``hope_attention``): segment by segment (``--stream-segment``, 512 tokens),
  the state carried from one segment to the next, memory writing (test-time memorization on), for
  ``--stream-lengths`` (4K and 64K tokens). Each segment's logits are reduced to their cross-entropy sum and dropped.
- ``transformer``: the whole sequence in one forward pass (full causal attention over ``L`` tokens; logits ``L x 256``
  kept), for ``--tpp-lengths`` (4K, 8K, ... 64K) in order, stopping before a length whose time, extrapolated
  quadratically from the last one, would pass ``--stream-time-cap`` seconds, or after one whose peak passed
  ``--stream-mem-cap`` MiB; the report says where it stopped and why.

Peak memory: a short untimed warm-up segment runs first (one-time allocations), then the peak resident set size is
reset (``/proc/self/clear_refs``) and the figure is the peak (``VmHWM``) during the stream minus the resident set
(``VmRSS``) just before it. The increase of ``getrusage(RUSAGE_SELF).ru_maxrss`` over the same span is recorded too
(it cannot be reset and also holds the peak of the imports, so it can read 0 for a small increase). For the streamed
models the peak so far is also recorded after every 4K tokens, to show whether it stays flat. Reported as well: the
stream's wall time, tokens/s, and the bits per byte over the first and the last 4K tokens of the stream. These are
training bytes (the first 95 % of the corpus are the training split) and, for the transformer, positions far beyond
the 128-token segments it was trained on: the figure is a check that nothing diverges (NaN, blow-up) along a long
stream, not a held-out score. For a held-out score, every streamed model also reads the whole held-out tail (the
validation bytes of part 1, about 24K) as one stream in the same way, in the main process; its bpc and the bpc of each
4K block are reported.

Running it
----------
::

    OMP_NUM_THREADS=1 python benchmarks/lm.py --out benchmarks/results/lm.json \\
        --markdown benchmarks/results/lm.md          # all parts, ~28 min with 1 thread
    python benchmarks/lm.py --quick                    # smoke run, about a minute
    python benchmarks/lm.py --parts bpc,streaming --seeds 0 1 2
    # the bpc part of different models side by side (one core each), then one report:
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc --models hope titans hope_value_frozen --out A.json &
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc --models hope_attention transformer hope_target \\
        hope_cms_second_order --out B.json
    python benchmarks/lm.py --merge A.json B.json --out benchmarks/results/lm.json --markdown benchmarks/results/lm.md
    # then recall, and the streaming part with the first seed's weights trained again, side by side, added to it
    # (the repeated bpc runs must equal the pooled ones, or the merge refuses):
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts recall --models hope hope_attention transformer titans \
        --out R.json &
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc streaming --seeds 0 \
        --models hope hope_attention transformer titans --out S.json
    python benchmarks/lm.py --merge benchmarks/results/lm.json R.json S.json --out benchmarks/results/lm.json \
        --markdown benchmarks/results/lm.md

Output: ``--out PATH`` writes the JSON (all numbers, settings, versions, thread count, date) and prints the Markdown
report to stdout; without ``--out`` the JSON goes to stdout. ``--markdown PATH`` also writes the report. Progress goes
to stderr. The script is not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import cell as _cell
from _common import (
    emit,
    environment,
    finite,
    num,
    proc_status_kib,
    quiet,
    ranked,
    report_header,
    reset_peak_rss,
    same_sources,
    summary,
)
from torch import Tensor

from nl_lightning.data.synthetic import MQARDataModule, NeedleDataModule
from nl_lightning.data.text import TextDataModule, load_corpus
from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.hope import DEFAULT_CMS_RETENTION, HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.titans import TitansMAL
from nl_lightning.models.transformer import TransformerPP

PARTS = ("bpc", "recall", "streaming")
MODELS = (
    "hope",
    "hope_attention",
    "transformer",
    "titans",
    "hope_rho1",
    "hope_chunk64",
    "hope_target",
    "hope_value_frozen",
    "hope_cms_second_order",
)
STATEFUL = tuple(name for name in MODELS if name != "transformer")
# not in the recall part; only hope_rho1 of them is streamed
ABLATIONS = ("hope_rho1", "hope_chunk64", "hope_target", "hope_value_frozen", "hope_cms_second_order")
# glibc raises its mmap threshold each time a large block is freed, after which freed blocks stay in the heap and
# count in the RSS; pinning it (which turns that off) makes the peak RSS of a probe follow the live bytes.
MALLOC_MMAP_THRESHOLD = "131072"
BLOCK = 4096  # tokens per block of the streaming curves and the first/last bpc

HOPE: dict[str, Any] = {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]}
# the task-loss writes need no value projection (4 x 64 x 64 parameters in the target modes): a wider CMS (hidden 160
# instead of 128) spends them, so that every Hope variant has about the baselines' parameters
HOPE_TASK_LOSS: dict[str, Any] = {**HOPE, "cms_hidden_mult": 2.5}
ARCH: dict[str, tuple[type[CausalLM], dict[str, Any], str]] = {
    "hope": (
        HopeModule,
        HOPE_TASK_LOSS,
        f"HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64], cms_hidden_mult=2.5) (the"
        f" defaults otherwise: cms_retention {DEFAULT_CMS_RETENTION}, cms_write_signal 'task_loss')",
    ),
    "hope_rho1": (
        HopeModule,
        {**HOPE_TASK_LOSS, "cms_retention": 1.0},
        "HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64], cms_hidden_mult=2.5,"
        " cms_retention=1.0) (ablation: the CMS writes of Eq. 31 as printed)",
    ),
    "hope_chunk64": (
        HopeModule,
        {**HOPE_TASK_LOSS, "chunk_size": 64},
        "HopeModule(dim=64, depth=2, heads=4, chunk_size=64, cms_chunk_sizes=[16, 64], cms_hidden_mult=2.5)"
        " (ablation: the self-modifying Titans' throughput chunk size)",
    ),
    "hope_target": (
        HopeModule,
        {**HOPE, "cms_write_signal": "target"},
        "HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64], cms_write_signal='target')"
        " (ablation: CMS writes towards a learned target, first order)",
    ),
    "hope_value_frozen": (
        HopeModule,
        {**HOPE, "cms_write_signal": "target"},
        "HopeModule(..., cms_write_signal='target') with every CMS `value` frozen at its initialisation (ablation:"
        " write targets that do not train)",
    ),
    "hope_cms_second_order": (
        HopeModule,
        {**HOPE, "cms_write_signal": "target"},
        "HopeModule(..., cms_write_signal='target') with `differentiable_writes=True` in every CMS (ablation:"
        " backpropagation through the CMS writes)",
    ),
    "hope_attention": (
        HopeModule,
        {"dim": 64, "depth": 2, "heads": 4, "variant": "attention", "cms_chunk_sizes": [16, 64]},
        f"HopeModule(dim=64, depth=2, heads=4, variant='attention', cms_chunk_sizes=[16, 64]) (cms_retention"
        f" {DEFAULT_CMS_RETENTION})",
    ),
    "transformer": (
        TransformerPP,
        {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0},
        "TransformerPP(dim=64, depth=3, heads=4, mlp_mult=2.0)",
    ),
    "titans": (
        TitansMAL,
        {"dim": 64, "depth": 2, "heads": 4, "window": 64, "chunk_size": 16, "mlp_mult": 1.5},
        "TitansMAL(dim=64, depth=2, heads=4, window=64, chunk_size=16, mlp_mult=1.5)",
    ),
}
OPTIM = {"lr": 3e-3, "warmup_steps": 30}
TEXT = {"seq_len": 256, "batch_size": 8, "samples_per_epoch": 800, "segment_len": 128}
TASKS: dict[str, dict[str, Any]] = {
    "mqar": {
        "title": "MQAR (8 pairs, train length 64)",
        "data": "MQARDataModule(num_pairs=8, seq_len=64, vocab_size=64, batch_size=32, train_samples=6400,"
        " val_samples=V, seed=S)",
        "make": lambda seed, val: MQARDataModule(
            num_pairs=8, seq_len=64, vocab_size=64, batch_size=32, train_samples=6400, val_samples=val, seed=seed
        ),
        "vocab_size": 64,
        "segment_len": 64,
        "chance": 1 / 32,
    },
    "needle": {
        "title": "Needle (train length 128)",
        "data": "NeedleDataModule(seq_len=128, vocab_size=64, batch_size=32, train_samples=6400, val_samples=V,"
        " seed=S)",
        "make": lambda seed, val: NeedleDataModule(
            seq_len=128, vocab_size=64, batch_size=32, train_samples=6400, val_samples=val, seed=seed
        ),
        "vocab_size": 64,
        "segment_len": 64,
        "chance": 1 / 32,
    },
}


# ---------------------------------------------------------------------------------------------------- helpers


def cell(entry: dict[str, Any], spec: str = ".3f", missing: str = "diverged") -> str:
    """:func:`_common.cell` with this report's defaults."""
    return _cell(entry, spec, missing)


def log(message: str) -> None:
    print(f"[lm] {message}", file=sys.stderr, flush=True)


def _freeze_cms_values(model: CausalLM) -> None:
    for param_name, param in model.named_parameters():
        if param_name.endswith(".value"):
            param.requires_grad_(False)  # CausalLM.param_groups leaves it out of the optimizer


def _cms_second_order(model: CausalLM) -> None:
    for module in model.modules():
        if isinstance(module, ContinuumMemory):
            module.differentiable_writes = True


#: Changes applied to a model after it is built (the ablations that are not constructor arguments).
AFTER_BUILD: dict[str, Callable[[CausalLM], None]] = {
    "hope_value_frozen": _freeze_cms_values,
    "hope_cms_second_order": _cms_second_order,
}


def build(name: str, vocab_size: int, segment_len: Optional[int], steps: int) -> CausalLM:
    """One of :data:`MODELS` at the tiny size, with the shared optimizer settings and a cosine decay to ``steps``."""
    cls, kwargs, _ = ARCH[name]
    warmup = min(OPTIM["warmup_steps"], max(1, steps // 10))
    model = cls(
        vocab_size=vocab_size,
        segment_len=segment_len,
        lr=OPTIM["lr"],
        warmup_steps=warmup,
        max_steps_schedule=max(steps, warmup + 1),
        **kwargs,
    )
    if name in AFTER_BUILD:
        AFTER_BUILD[name](model)
    return model


def parameter_counts(vocab_size: int) -> dict[str, dict[str, Any]]:
    counts = {}
    for name in MODELS:
        model = build(name, vocab_size, None, 10)
        counts[name] = {
            "total": model.num_parameters(),
            "non_embedding": model.num_parameters(non_embedding=True),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    ref = counts["hope"]["total"]
    for c in counts.values():
        c["vs_hope"] = c["total"] / ref - 1
    return counts


# ---------------------------------------------------------------------------------------------------- training
class StepStats(pl.Callback):
    """Wall time and loss of every training step; stops the fit at the first non-finite loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.first_nonfinite: Optional[int] = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._t0)
        loss = float(outputs["loss"])
        self.losses.append(loss)
        if not math.isfinite(loss) and self.first_nonfinite is None:
            self.first_nonfinite = len(self.losses)
            trainer.should_stop = True


def fit(model: CausalLM, dm: pl.LightningDataModule, steps: int) -> tuple[StepStats, float, int]:
    """``steps`` optimizer steps, no validation; returns the step stats, the fit's wall seconds and the steps done."""
    stats = StepStats()
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        callbacks=[stats],
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    return stats, time.perf_counter() - t0, trainer.global_step


def validate(model: CausalLM, dm: pl.LightningDataModule, memorize: bool) -> tuple[dict[str, float], float]:
    """One pass over every validation loader with ``memorize_at_eval=memorize``; the metrics of all loaders merged."""
    model.memorize_at_eval = memorize
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    t0 = time.perf_counter()
    results = trainer.validate(model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    merged: dict[str, float] = {}
    for res in results:
        merged.update({k: float(v) for k, v in res.items()})
    model.memorize_at_eval = True
    return merged, seconds


def train_run(
    name: str,
    make_dm: Callable[[], pl.LightningDataModule],
    vocab_size: int,
    segment_len: int,
    steps: int,
    seed: int,
    tokens_per_step: int,
    memorize_off: bool,
    save_to: Optional[str] = None,
) -> dict[str, Any]:
    """Train one (model, seed) and validate it; ``save_to`` keeps the trained weights for the streaming part."""
    pl.seed_everything(seed, verbose=False)
    model = build(name, vocab_size, segment_len, steps)
    dm = make_dm()
    sink = io.StringIO()
    with quiet(sink):
        stats, seconds, done = fit(model, dm, steps)
        diverged = stats.first_nonfinite is not None
        on, on_s = validate(model, dm, True) if not diverged else ({}, 0.0)
        off, off_s = validate(model, dm, False) if memorize_off and not diverged else ({}, 0.0)
    if save_to is not None and not diverged:
        torch.save(model.state_dict(), save_to)
    val_loss = on.get("val_loss")
    if not diverged and not finite(val_loss):
        diverged = True
    tail = [v for v in stats.losses[-10:] if math.isfinite(v)]
    times = stats.times[5:] or stats.times
    return {
        "seed": seed,
        "steps": done,
        "diverged": diverged,
        "first_nonfinite_train_step": stats.first_nonfinite,
        "train_tokens": done * tokens_per_step,
        "fit_s": seconds,
        "tokens_per_s": done * tokens_per_step / seconds if seconds > 0 else None,
        "median_step_ms": 1e3 * statistics.median(times) if times else None,
        "final_train_loss": statistics.fmean(tail) if tail else None,
        "train_loss_every_10": stats.losses[::10],
        "val_memorize_on": on,
        "val_memorize_off": off,
        "validate_s": on_s + off_s,
    }


# ---------------------------------------------------------------------------------------------------- part 1: bpc
def part_bpc(args: argparse.Namespace, weights_dir: Optional[str]) -> dict[str, Any]:
    tokens_per_step = TEXT["batch_size"] * TEXT["seq_len"]
    models: dict[str, Any] = {}
    saved: dict[str, str] = {}
    for name in args.models:
        runs = []
        for seed in args.seeds:
            save_to = None
            if weights_dir is not None and seed == args.seeds[0]:
                save_to = os.path.join(weights_dir, f"{name}.pt")
            run = train_run(
                name,
                lambda seed=seed: TextDataModule(
                    seq_len=TEXT["seq_len"],
                    batch_size=TEXT["batch_size"],
                    samples_per_epoch=TEXT["samples_per_epoch"],
                    seed=seed,
                ),
                256,
                TEXT["segment_len"],
                args.steps,
                seed,
                tokens_per_step,
                memorize_off=name in STATEFUL,
                save_to=save_to,
            )
            if save_to is not None and os.path.exists(save_to):
                saved[name] = save_to
            on, off = run["val_memorize_on"].get("val_bpc"), run["val_memorize_off"].get("val_bpc")
            log(
                f"bpc {name} seed {seed}: val_bpc {num(on, '.4f')} (memorize off {num(off, '.4f')}),"
                f" {run['fit_s']:.0f} s, {num(run['tokens_per_s'], '.0f')} tok/s"
                + (f", DIVERGED at step {run['first_nonfinite_train_step']}" if run["diverged"] else "")
            )
            runs.append(run)

        def values(key: str, runs: list[dict[str, Any]] = runs) -> list[Optional[float]]:
            return [None if r["diverged"] else r[key] for r in runs]

        models[name] = {
            "architecture": ARCH[name][2],
            "runs": runs,
            "aggregate": {
                "val_bpc": summary([None if r["diverged"] else r["val_memorize_on"].get("val_bpc") for r in runs]),
                "val_bpc_memorize_off": summary(
                    [None if r["diverged"] else r["val_memorize_off"].get("val_bpc") for r in runs]
                ),
                "val_acc": summary([None if r["diverged"] else r["val_memorize_on"].get("val_acc") for r in runs]),
                "final_train_bpc": summary(
                    [None if v is None else v / math.log(2) for v in values("final_train_loss")]
                ),
                "fit_s": summary([r["fit_s"] for r in runs]),
                "tokens_per_s": summary([r["tokens_per_s"] for r in runs]),
                "median_step_ms": summary([r["median_step_ms"] for r in runs]),
                "diverged": sum(r["diverged"] for r in runs),
                "train_tokens": runs[0]["train_tokens"],
            },
        }
    return {
        "setting": {
            "data": "TextDataModule(seq_len=256, batch_size=8, samples_per_epoch=800, val_fraction=0.05, seed=S),"
            " default corpus (pydoc_data.topics)",
            "corpus_bytes": int(len(load_corpus())),
            "segment_len": TEXT["segment_len"],
            "steps": args.steps,
            "tokens_per_step": tokens_per_step,
            "optimizer": {**OPTIM, "warmup_steps": min(OPTIM["warmup_steps"], max(1, args.steps // 10))},
            "seeds": args.seeds,
        },
        "parameters": parameter_counts(256),
        "models": models,
        "saved_weights": saved,
    }


# ---------------------------------------------------------------------------------------------------- part 2: recall
def in_segment_share(task: str, dataset: Any, segment_len: int) -> float:
    """The share of scored targets whose evidence lies in the query's own segment (``segment_len`` tokens)."""
    targets = dataset.targets
    if task == "needle":
        value_pos = dataset.positions + 2  # the needle is "0 key value"; the query's target is at the last position
        query_pos = torch.full_like(value_pos, targets.shape[1] - 1)
        return float(((value_pos // segment_len) == (query_pos // segment_len)).float().mean())
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # query key positions
    keys = dataset.tokens[rows, cols]
    pair_keys = dataset.keys[rows]  # (Q, n) keys in sequence order: key j at 2j, value at 2j + 1
    j = (pair_keys == keys[:, None]).float().argmax(dim=1)
    value_pos = 2 * j + 1
    return float(((value_pos // segment_len) == (cols // segment_len)).float().mean())


def part_recall(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, spec in TASKS.items():
        probe = spec["make"](0, args.val_samples)
        probe.setup("validate")
        lengths = list(probe.eval_lengths)
        shares = {
            str(L): in_segment_share(task, ds, spec["segment_len"])
            for L, ds in zip(lengths, probe.val_sets, strict=True)
        }
        tokens_per_step = probe.batch_size * probe.seq_len
        models: dict[str, Any] = {}
        for name in (m for m in args.models if m not in ABLATIONS):
            runs = []
            for seed in args.recall_seeds:
                run = train_run(
                    name,
                    lambda seed=seed, spec=spec: spec["make"](seed, args.val_samples),
                    spec["vocab_size"],
                    spec["segment_len"],
                    args.recall_steps,
                    seed,
                    tokens_per_step,
                    memorize_off=False,
                )
                val = run["val_memorize_on"]
                # an accuracy read from NaN logits (argmax 0) means nothing: left out, and the length recorded
                run["nonfinite_eval_lengths"] = [L for L in lengths if not finite(val.get(f"val_loss_len{L}"))]
                accs = {
                    str(L): None if L in run["nonfinite_eval_lengths"] else val.get(f"val_acc_len{L}") for L in lengths
                }
                run["acc"] = accs
                log(
                    f"recall {task} {name} seed {seed}: acc "
                    + ", ".join(f"{L}: {num(a, '.3f')}" for L, a in accs.items())
                    + f" ({run['fit_s']:.0f} s)"
                    + (f", DIVERGED at step {run['first_nonfinite_train_step']}" if run["diverged"] else "")
                    + (
                        f", non-finite val loss at {run['nonfinite_eval_lengths']}"
                        if run["nonfinite_eval_lengths"] and not run["diverged"]
                        else ""
                    )
                )
                runs.append(run)
            models[name] = {
                "runs": runs,
                "aggregate": {
                    "acc": {
                        str(L): summary([None if r["diverged"] else r["acc"][str(L)] for r in runs]) for L in lengths
                    },
                    "fit_s": summary([r["fit_s"] for r in runs]),
                    "diverged": sum(r["diverged"] for r in runs),
                    "nonfinite_eval": {
                        str(L): sum(L in r["nonfinite_eval_lengths"] for r in runs if not r["diverged"])
                        for L in lengths
                    },
                },
            }
        out[task] = {
            "setting": {
                "title": spec["title"],
                "data": spec["data"].replace("val_samples=V", f"val_samples={args.val_samples}"),
                "segment_len": spec["segment_len"],
                "train_length": probe.seq_len,
                "eval_lengths": lengths,
                "steps": args.recall_steps,
                "seeds": args.recall_seeds,
                "chance": spec["chance"],
                "in_segment_share": shares,
            },
            "parameters": parameter_counts(spec["vocab_size"]),
            "models": models,
        }
    return out


# ---------------------------------------------------------------------------------------------------- part 3: streaming


def trained(name: str, weights: Optional[str]) -> CausalLM:
    """The text-size model ``name`` in eval mode, with the weights saved at ``weights`` (if any)."""
    model = build(name, 256, None, 10)
    if weights:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def stream_nll(
    model: CausalLM, tokens: Tensor, targets: Tensor, segment: int, after: Optional[Callable[[int], None]] = None
) -> Tensor:
    """Per-token cross-entropy of ``tokens`` ``(1, L)`` read ``segment`` tokens at a time, the state carried and the
    memory writing (call under ``torch.inference_mode()``); ``after(end)`` runs after each segment."""
    nll, state = torch.zeros(tokens.shape[1], dtype=torch.float64), None
    for start in range(0, tokens.shape[1], segment):
        logits, state = model(tokens[:, start : start + segment], state=state, write=True)
        nll[start : start + logits.shape[1]] = F.cross_entropy(
            logits[0].float(), targets[0, start : start + segment], reduction="none"
        ).double()
        del logits
        if after is not None:
            after(start + segment)
    return nll


def stream_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and time of one streaming configuration; runs in a fresh process (``--_stream-probe``)."""
    torch.set_num_threads(cfg["threads"])
    model = trained(cfg["model"], cfg["weights"])
    length, seg = cfg["length"], cfg["segment"]
    data = load_corpus()[: length + 1].long()
    tokens, targets = data[:-1].unsqueeze(0), data[1:].unsqueeze(0)  # (1, L)
    with torch.inference_mode():
        model(tokens[:, : min(64, length)])  # one-time allocations (kernels, caches)
    gc.collect()
    reset = reset_peak_rss()
    base = proc_status_kib("VmRSS") if reset else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    curve: list[dict[str, float]] = []

    def record(end: int) -> None:
        if reset and end % BLOCK == 0:
            curve.append(
                {
                    "tokens": end,
                    "peak_increase_mib": (proc_status_kib("VmHWM") - base) / 1024,
                    "rss_increase_mib": (proc_status_kib("VmRSS") - base) / 1024,
                }
            )

    t0 = time.perf_counter()
    with torch.inference_mode():
        if cfg["mode"] == "whole":
            logits, _ = model(tokens)
            nll = F.cross_entropy(logits[0].float(), targets[0], reduction="none").double()
            del logits
        else:
            nll = stream_nll(model, tokens, targets, seg, record)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {
        "model": cfg["model"],
        "mode": cfg["mode"],
        "length": length,
        "segment": seg if cfg["mode"] == "stream" else None,
        "weights": "trained (part 1, first seed)" if cfg["weights"] else "initial (untrained)",
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "rss_peak_reset": reset,
        "method": "VmHWM (reset by /proc/self/clear_refs) - VmRSS before the stream" if reset else "ru_maxrss",
        "ru_maxrss_increase_mib": (ru1 - ru0) / 1024,
        "ru_maxrss_mib": ru1 / 1024,
        "nonfinite_nll": int((~torch.isfinite(nll)).sum()),
        "bpc_first_block": float(nll[:BLOCK].mean() / math.log(2)),
        "bpc_last_block": float(nll[-BLOCK:].mean() / math.log(2)),
        "bpc_all": float(nll.mean() / math.log(2)),
        "bpc_first_256": float(nll[:256].mean() / math.log(2)),
        "bpc_blocks": [float(b.mean() / math.log(2)) for b in nll.split(BLOCK)],
        "curve": curve,
    }
    if reset:
        out["baseline_rss_mib"] = base / 1024
        out["peak_increase_mib"] = (proc_status_kib("VmHWM") - base) / 1024
    else:
        out["peak_increase_mib"] = out["ru_maxrss_increase_mib"]
    return out


def run_stream_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cmd = [sys.executable, os.path.abspath(__file__), "--_stream-probe", json.dumps(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {**cfg, "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def held_out_stream(name: str, weights: Optional[str], segment: int) -> dict[str, Any]:
    """Bits per byte of the whole held-out tail read as one stream (state carried, memory writing), per 4K block."""
    dm = TextDataModule(seq_len=TEXT["seq_len"], val_fraction=0.05)
    dm.setup("validate")
    data = dm.corpus[dm.split_index :].long()
    tokens, targets = data[:-1].unsqueeze(0), data[1:].unsqueeze(0)  # (1, L)
    model = trained(name, weights)  # outside inference mode: the task-loss writes need autograd on the parameters
    with torch.inference_mode():
        nll = stream_nll(model, tokens, targets, segment)
    return {
        "model": name,
        "tokens": int(tokens.shape[1]),
        "weights": "trained (part 1, first seed)" if weights else "initial (untrained)",
        "bpc": float(nll.mean() / math.log(2)),
        "bpc_blocks": [float(b.mean() / math.log(2)) for b in nll.split(BLOCK)],
        "nonfinite_nll": int((~torch.isfinite(nll)).sum()),
    }


def part_streaming(args: argparse.Namespace, weights: dict[str, str]) -> dict[str, Any]:
    base = {"threads": args.threads, "segment": args.stream_segment}
    rows: list[dict[str, Any]] = []
    held_out = [held_out_stream(name, weights.get(name), args.stream_segment) for name in args.stream_models]
    for r in held_out:
        log(f"held-out stream {r['model']}: {r['bpc']:.3f} bpc over {r['tokens']} tokens")
    for name in args.stream_models:
        for length in args.stream_lengths:
            cfg = {**base, "model": name, "mode": "stream", "length": length, "weights": weights.get(name)}
            res = run_stream_probe(cfg)
            rows.append(res)
            log(
                f"streaming {name} {length}: peak +{num(res.get('peak_increase_mib'), '.1f')} MiB,"
                f" {num(res.get('seconds'), '.1f')} s" + (f" ERROR {res['error']}" if "error" in res else "")
            )
    stop: Optional[str] = None
    last: Optional[dict[str, Any]] = None
    for length in args.tpp_lengths if "transformer" in args.models else []:
        if last is not None:
            projected = last["seconds"] * (length / last["length"]) ** 2
            if projected > args.stream_time_cap:
                stop = (
                    f"stopped before {length} tokens: the forward at {last['length']} took {last['seconds']:.1f} s,"
                    f" so {length} would take about {projected:.0f} s (quadratic extrapolation) > the"
                    f" {args.stream_time_cap:.0f} s cap"
                )
                break
        cfg = {**base, "model": "transformer", "mode": "whole", "length": length, "weights": weights.get("transformer")}
        res = run_stream_probe(cfg)
        rows.append(res)
        log(
            f"streaming transformer whole {length}: peak +{num(res.get('peak_increase_mib'), '.1f')} MiB,"
            f" {num(res.get('seconds'), '.1f')} s" + (f" ERROR {res['error']}" if "error" in res else "")
        )
        if "error" in res:
            stop = f"stopped at {length} tokens: the probe failed ({res['error']})"
            break
        last = res
        if res["peak_increase_mib"] > args.stream_mem_cap:
            stop = (
                f"stopped after {length} tokens: its peak increase {res['peak_increase_mib']:.0f} MiB passed the"
                f" {args.stream_mem_cap:.0f} MiB cap"
            )
            break
    if "transformer" not in args.models:
        stop = "not run (--models)"
    elif stop is None:
        stop = f"reached the longest length asked for ({args.tpp_lengths[-1]} tokens) within both caps"
    return {
        "setting": {
            "batch": 1,
            "segment": args.stream_segment,
            "stream_lengths": args.stream_lengths,
            "tpp_lengths": args.tpp_lengths,
            "time_cap_s": args.stream_time_cap,
            "mem_cap_mib": args.stream_mem_cap,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD),
            "architectures": {n: ARCH[n][2] for n in MODELS},
            "weights": {n: f"trained (part 1, seed {args.seeds[0]})" if n in weights else "initial" for n in MODELS},
        },
        "rows": rows,
        "held_out_stream": held_out,
        "transformer_stop": stop,
    }


# ---------------------------------------------------------------------------------------------------- report
def bpc_markdown(part: dict[str, Any]) -> list[str]:
    s = part["setting"]
    lines = [
        "## 1. Bits per byte on the default corpus",
        "",
        f"{s['data']}; {s['steps']} steps of {s['tokens_per_step']} tokens ({s['steps'] * s['tokens_per_step']:,}"
        f" training tokens per run), segments of {s['segment_len']} tokens, AdamW lr {s['optimizer']['lr']:g},"
        f" warm-up {s['optimizer']['warmup_steps']}, cosine to the last step. val bpc over the whole held-out tail"
        " (5 % of the corpus), with test-time memorization (memory writes while reading) and without it (stateful"
        " models only). Mean ± std over seeds " + " ".join(map(str, s["seeds"])) + ". Time: the fit alone, 1 thread"
        " on a shared 2-core machine.",
        "",
        "| model | params (non-emb.) | trainable | vs Hope | val bpc | val bpc, memorize off | final train bpc |"
        " train tokens | fit s | tokens/s | ms/step (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, block in part["models"].items():
        agg, p = block["aggregate"], part["parameters"][name]
        flag = f" ({agg['diverged']} diverged)" if agg["diverged"] else ""
        off = cell(agg["val_bpc_memorize_off"], ".4f", "non-finite") if name in STATEFUL else "n/a (stateless)"
        lines.append(
            f"| {name}{flag} | {p['total']:,} ({p['non_embedding']:,}) | {p.get('trainable', p['total']):,} |"
            f" {p['vs_hope']:+.1%} |"
            f" {cell(agg['val_bpc'], '.4f')} | {off} | {cell(agg['final_train_bpc'], '.3f')} |"
            f" {agg['train_tokens']:,} | {cell(agg['fit_s'], '.0f')} | {cell(agg['tokens_per_s'], '.0f')} |"
            f" {cell(agg['median_step_ms'], '.0f')} |"
        )
    lines += ["", "Architectures: " + "; ".join(f"`{n}`: `{b['architecture']}`" for n, b in part["models"].items())]
    return lines


def recall_markdown(part: dict[str, Any]) -> list[str]:
    lines = ["## 2. Recall at 1x, 2x and 4x the training length", ""]
    first = next(iter(part.values()))["setting"]
    lines += [
        f"{first['steps']} steps per run, seeds {' '.join(map(str, first['seeds']))}; accuracy on the scored positions"
        " (argmax), validated once with test-time memorization on, mean ± std over seeds. Chance is 1/32 = 0.031."
        " In-segment: the share of scored targets whose evidence lies in the query's own segment of"
        f" {first['segment_len']} tokens, the ceiling of a model that carries nothing across segments"
        " (Transformer++).",
        "",
    ]
    for block in part.values():
        s = block["setting"]
        lengths = [str(L) for L in s["eval_lengths"]]
        lines += [
            f"### {s['title']}",
            "",
            f"`{s['data']}`, segments of {s['segment_len']} tokens.",
            "",
            "| model | params | " + " | ".join(f"acc @ {L}" for L in lengths) + " | fit s |",
            "|---|---|" + "---|" * len(lengths) + "---|",
        ]
        for name, m in block["models"].items():
            agg = m["aggregate"]
            flags = [f"{agg['diverged']} diverged in training"] if agg["diverged"] else []
            nan_at = [L for L in lengths if agg["nonfinite_eval"][L]]
            if nan_at:
                flags.append("non-finite val loss at " + ", ".join(f"{L} ({agg['nonfinite_eval'][L]})" for L in nan_at))
            flag = f" ({'; '.join(flags)})" if flags else ""
            lines.append(
                f"| {name}{flag} | {block['parameters'][name]['total']:,} | "
                + " | ".join(cell(agg["acc"][L], ".3f", "no finite value") for L in lengths)
                + f" | {cell(agg['fit_s'], '.0f')} |"
            )
        lines.append(
            "| *in-segment share* | | " + " | ".join(f"*{s['in_segment_share'][L]:.3f}*" for L in lengths) + " | |"
        )
        lines.append("")
    return lines[:-1]


def streaming_markdown(part: dict[str, Any]) -> list[str]:
    s = part["setting"]
    shown = {r["model"] for r in part["rows"]}  # the weights of the models streamed here
    lines = [
        "## 3. Streaming inference: peak memory against length",
        "",
        "Batch 1, `torch.inference_mode()`, one fresh process per row. Stateful models stream segments of"
        f" {s['segment']} tokens with the state carried and the memory writing; Transformer++ reads the whole"
        " sequence in one forward pass. Peak: the peak resident set during the stream minus the resident set just"
        " before it (after the model and a warm-up). bpc over the first / last 4K tokens: training bytes, a check that"
        " nothing diverges along the stream, not a held-out score (the transformer was trained on 128-token segments,"
        " so every longer position is out of its training range). Weights: "
        + ", ".join(f"{n} {w}" for n, w in s["weights"].items() if n in shown)
        + ".",
        "",
        "| model | mode | tokens | peak increase MiB | ru_maxrss increase MiB | s | tokens/s | bpc first 4K |"
        " bpc last 4K | non-finite |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        mode = f"stream ({r.get('segment')})" if r.get("mode") == "stream" else "whole sequence"
        if "error" in r:
            lines.append(f"| {r['model']} | {mode} | {r['length']:,} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {mode} | {r['length']:,} | {num(r['peak_increase_mib'], '.1f')} |"
            f" {num(r['ru_maxrss_increase_mib'], '.1f')} | {num(r['seconds'], '.1f')} |"
            f" {num(r['tokens_per_s'], ',.0f')} |"
            f" {num(r['bpc_first_block'], '.3f')} | {num(r['bpc_last_block'], '.3f')} | {r['nonfinite_nll']} |"
        )
    lines += ["", f"Transformer++: {part['transformer_stop']}."]
    if part.get("held_out_stream"):
        lines += [
            "",
            "The held-out tail (the validation bytes of part 1) read as one stream in the same way, state carried over"
            f" every segment of {s['segment']} tokens (part 1 reads it in separate {TEXT['seq_len']}-token windows):",
            "",
            "| model | tokens | bpc | bpc of each 4K block | non-finite |",
            "|---|---|---|---|---|",
        ]
        for r in part["held_out_stream"]:
            blocks = ", ".join(num(b, ".2f") for b in r["bpc_blocks"])
            lines.append(
                f"| {r['model']} | {r['tokens']:,} | {num(r['bpc'], '.3f')} | {blocks} | {r['nonfinite_nll']} |"
            )
    longest = [r for r in part["rows"] if "error" not in r and len(r.get("bpc_blocks", [])) > 1]
    if longest:
        lines += [
            "",
            f"bpc of each {BLOCK}-token block along the stream (training bytes; the first 256 tokens, the training"
            " length, in brackets):",
            "",
        ]
        for r in longest:
            pts = r["bpc_blocks"]
            step = max(1, len(pts) // 8)
            idx = list(range(0, len(pts), step)) + ([len(pts) - 1] if (len(pts) - 1) % step else [])
            mode = "stream" if r["mode"] == "stream" else "whole"
            lines.append(
                f"- {r['model']} ({mode}, {r['length'] // 1024}K) [{num(r['bpc_first_256'], '.3f')}]: "
                + ", ".join(f"{(i + 1) * BLOCK // 1024}K {num(pts[i], '.3f')}" for i in idx)
            )
    curves = [r for r in part["rows"] if r.get("curve") and r["length"] == max(s["stream_lengths"])]
    if curves:
        lines += ["", f"Peak increase (MiB) so far, every {BLOCK} tokens, in the longest stream:", ""]
        for r in curves:
            pts = r["curve"]
            step = max(1, len(pts) // 8)
            shown = pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else [])
            lines.append(
                f"- {r['model']}: " + ", ".join(f"{p['tokens'] // 1024}K {p['peak_increase_mib']:.1f}" for p in shown)
            )
    return lines


def reading(report: dict[str, Any]) -> list[str]:
    """Plain-English sentences generated from the measured numbers (no claim is written by hand)."""
    lines = ["## Reading (generated from the numbers above)", ""]
    parts = report["parts"]
    if "bpc" in parts:
        agg = {n: b["aggregate"] for n, b in parts["bpc"]["models"].items()}
        order = ranked({n: a["val_bpc"]["mean"] for n, a in agg.items()})
        if order:
            lines.append(
                "- val bpc from lowest to highest: "
                + ", ".join(f"{n} {v:.4f}" for n, v in order)
                + f"; the spread between best and worst is {order[-1][1] - order[0][1]:.4f} bits per byte."
            )
            stds = [a["val_bpc"]["std"] for a in agg.values() if a["val_bpc"]["std"] is not None]
            if stds:
                lines.append(f"- The largest seed-to-seed std of val bpc is {max(stds):.4f}.")
        diffs = []
        for n in (n for n in STATEFUL if n in agg):
            on, off = agg[n]["val_bpc"]["mean"], agg[n]["val_bpc_memorize_off"]["mean"]
            if on is not None and off is not None:
                diffs.append(f"{n} {off - on:+.4f}")
        if diffs:
            lines.append(
                "- Switching test-time memorization off changes val bpc by (off − on; positive: memorization helps): "
                + ", ".join(diffs)
                + "."
            )
        speed = {n: a["tokens_per_s"]["mean"] for n, a in agg.items()}
        if speed.get("transformer"):
            lines.append(
                "- Training throughput relative to Transformer++: "
                + ", ".join(f"{n} {v / speed['transformer']:.2f}×" for n, v in ranked(speed, reverse=True))
                + "."
            )
        bad = [n for n, a in agg.items() if a["diverged"]]
        if bad:
            lines.append(f"- Runs that diverged (NaN or infinite loss): {', '.join(bad)}.")
    if "recall" in parts:
        for task, block in parts["recall"].items():
            lengths = [str(L) for L in block["setting"]["eval_lengths"]]
            accs = {n: [m["aggregate"]["acc"][L]["mean"] for L in lengths] for n, m in block["models"].items()}
            text = (
                f"- {task}: accuracy at "
                + "/".join(lengths)
                + ": "
                + "; ".join(f"{n} " + "/".join(num(a, ".2f") for a in v) for n, v in accs.items())
            )
            shares = block["setting"]["in_segment_share"]
            text += "; in-segment share " + "/".join(f"{shares[L]:.2f}" for L in lengths)
            best = ranked({n: v[-1] for n, v in accs.items()}, reverse=True)
            if best:
                text += (
                    f"; best at {lengths[-1]}: {best[0][0]} ({best[0][1]:.2f}; chance {block['setting']['chance']:.3f})"
                )
            nan = [
                f"{n} at {', '.join(L for L in lengths if m['aggregate']['nonfinite_eval'][L])}"
                for n, m in block["models"].items()
                if any(m["aggregate"]["nonfinite_eval"].values())
            ]
            if nan:
                text += "; non-finite validation loss (NaN/inf logits) for " + "; ".join(nan)
            lines.append(text + ".")
    if "streaming" in parts:
        rows = [r for r in parts["streaming"]["rows"] if "error" not in r]
        for name in ("hope", "titans", "hope_attention", "hope_rho1"):
            mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["length"])
            if len(mine) >= 2:
                a, b = mine[0], mine[-1]
                lines.append(
                    f"- Streaming {name}: peak increase {a['peak_increase_mib']:.1f} MiB at {a['length']:,} tokens and"
                    f" {b['peak_increase_mib']:.1f} MiB at {b['length']:,} ({b['length'] // a['length']}× the tokens,"
                    f" {b['peak_increase_mib'] - a['peak_increase_mib']:+.1f} MiB); bpc first / last 4K of the"
                    f" longest stream {num(b['bpc_first_block'], '.3f')} / {num(b['bpc_last_block'], '.3f')}"
                    + (f"; {b['nonfinite_nll']} non-finite losses" if b["nonfinite_nll"] else "")
                    + "."
                )
        tpp = sorted((r for r in rows if r["model"] == "transformer"), key=lambda r: r["length"])
        if tpp:
            lines.append(
                "- Transformer++ whole-sequence peak increase: "
                + ", ".join(
                    f"{r['length'] // 1024}K {r['peak_increase_mib']:.1f} MiB ({r['seconds']:.1f} s)" for r in tpp
                )
                + f"; {parts['streaming']['transformer_stop']}."
            )
        bad = [f"{r['model']} {r['length']}" for r in rows if r["nonfinite_nll"]]
        if bad:
            lines.append(f"- Non-finite losses along a stream: {', '.join(bad)}.")
        held = {r["model"]: r["bpc"] for r in parts["streaming"].get("held_out_stream", [])}
        if held:
            lines.append(
                "- Held-out tail read as one stream, bpc from lowest to highest: "
                + ", ".join(f"{n} {v:.3f}" for n, v in ranked(held))
                + "."
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    runs = report.get("merged_from") or [report]
    lines = ["# Hope vs Hope-Attention vs Transformer++ vs Titans (tiny CPU sizes)", ""]
    if "merged_from" in report:
        lines.append(f"Pooled with `--merge` from {len(runs)} runs of the same sources, side by side:  ")
    lines += [f"Command: `{r['command']}` ({r['timestamp']}, {r['wall_s']:.0f} s)  " for r in runs]
    for entry in report.get("reproduced_runs", []):
        lines.append(
            f"Repeated in `{entry['path']}` (not pooled twice), with validation figures equal to the pooled runs':"
            f" {', '.join(entry['runs'])}.  "
        )
    lines.append(
        f"nl_lightning {env['nl_lightning']}, torch {env['torch']}, lightning {env['lightning']}, Python"
        f" {env['python']}, {env['cpu_count']} CPU core(s), {report['threads']} torch thread(s) per run."
    )
    builders = {"bpc": bpc_markdown, "recall": recall_markdown, "streaming": streaming_markdown}
    for number, (name, part) in enumerate(report["parts"].items(), 1):
        body = builders[name](part)
        body[0] = f"## {number}. " + body[0].split(". ", 1)[1]
        lines += ["", *body, "", f"Part time: {report['part_seconds'][name]:.0f} s."]
    lines += ["", *reading(report)]
    return "\n".join(lines) + "\n"


SOURCES = [
    "models/lm.py",
    "models/hope.py",
    "models/transformer.py",
    "models/titans.py",
    "models/neural_memory.py",
    "models/_memory_mlp.py",
    "models/_residual_memory.py",
    "models/self_modifying_titans.py",
    "models/cms.py",
    "models/cms_memory.py",
    "models/task_loss_cms.py",
    "data/text.py",
    "data/synthetic.py",
]


# ---------------------------------------------------------------------------------------------------- driver
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="bpc, recall, streaming (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="bpc seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument("--recall-seeds", nargs="+", type=int, help="recall seeds (default 0 1; 0 with --quick)")
    parser.add_argument("--steps", type=int, help="bpc: optimizer steps per run (default 300; 10 with --quick)")
    parser.add_argument("--recall-steps", type=int, help="recall: steps per run (default 300; 10 with --quick)")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to run (default: all)")
    parser.add_argument("--val-samples", type=int, help="recall: samples per evaluation set (default 256; 32 quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--stream-segment", type=int, default=512, help="streaming: tokens per segment (512)")
    parser.add_argument("--stream-lengths", nargs="+", type=int, help="streaming lengths (default 4096 65536)")
    parser.add_argument("--tpp-lengths", nargs="+", type=int, help="Transformer++ lengths (default 4096 ... 65536)")
    parser.add_argument("--stream-time-cap", type=float, default=60.0, help="Transformer++ time cap, s (60)")
    parser.add_argument("--stream-mem-cap", type=float, default=4096.0, help="Transformer++ memory cap, MiB (4096)")
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10-step runs, seed 0, small evaluation sets, short streams of Hope",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="pool the reports of runs of the same code (e.g. bpc runs of different"
        " models side by side) into one report, written like a run's",
    )
    parser.add_argument("--_stream-probe", dest="stream_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_probe is not None:
        return args
    parts = [p for item in args.parts for p in item.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    q = args.quick
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if q else [0, 1, 2])))
    args.recall_seeds = list(dict.fromkeys(args.recall_seeds or ([0] if q else [0, 1])))
    args.models = [m for m in MODELS if m in (args.models or MODELS)]
    args.val_samples = args.val_samples or (32 if q else 256)
    streamed = ("hope",) if q else ("hope", "titans", "hope_attention", "hope_rho1")
    args.stream_models = [m for m in streamed if m in args.models]
    args.steps = args.steps or (10 if q else 300)
    args.recall_steps = args.recall_steps or (10 if q else 300)
    args.stream_lengths = sorted(args.stream_lengths or ([4096, 8192] if q else [4096, 65536]))
    args.tpp_lengths = sorted(args.tpp_lengths or ([4096] if q else [4096, 8192, 16384, 32768, 65536]))
    if min(args.steps, args.recall_steps, args.threads, args.stream_segment) < 1:
        parser.error("--steps, --recall-steps, --threads and --stream-segment must be >= 1")
    if any(L % args.stream_segment for L in args.stream_lengths):
        parser.error("--stream-lengths must be multiples of --stream-segment")
    return args


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """One report from several of this script's JSON reports run on the same sources, e.g. the ``bpc`` part of
    different models run side by side in separate processes: their ``bpc`` models are pooled (the settings must agree);
    a ``bpc`` part of other seeds only (run again for the weights the ``streaming`` part loads) must repeat pooled runs
    exactly and is recorded as ``reproduced_runs``; any other part may come from one report only. Raises
    ``ValueError`` on disagreeing sources, settings or figures."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    merged = {key: value for key, value in reports[0].items() if key not in ("parts", "part_seconds", "wall_s")}
    merged["merged_from"] = [  # a merged report passes on the runs it was merged from
        entry
        for path, r in zip(paths, reports, strict=True)
        for entry in r.get("merged_from")
        or [{"path": path, "command": r["command"], "timestamp": r["timestamp"], "wall_s": r["wall_s"]}]
    ]
    merged.pop("reproduced_runs", None)
    merged.update(parts={}, part_seconds={})
    for path, report in zip(paths, reports, strict=True):
        if not same_sources(report["environment"]["sources"], merged["environment"]["sources"]):
            raise ValueError(f"{path} was measured on other sources than {paths[0]}; merge runs of the same code only.")
        for name, part in report["parts"].items():
            seconds = report["part_seconds"].get(name, 0.0)
            if name not in merged["parts"]:
                merged["parts"][name], merged["part_seconds"][name] = part, seconds
            elif name == "bpc" and part["setting"] == merged["parts"]["bpc"]["setting"]:
                merged["parts"]["bpc"]["models"].update(part["models"])
                merged["parts"]["bpc"]["parameters"].update(part["parameters"])
                merged["part_seconds"]["bpc"] += seconds
            elif name == "bpc":
                reproduced = _check_reproduced(part, merged["parts"]["bpc"], path)
                merged.setdefault("reproduced_runs", []).append({"path": path, "runs": reproduced})
            else:
                raise ValueError(f"Part {name!r} of {path} cannot be merged (only bpc parts with equal settings).")
        if report.get("reproduced_runs"):
            merged.setdefault("reproduced_runs", []).extend(report["reproduced_runs"])
    return merged


def _check_reproduced(part: dict[str, Any], pooled: dict[str, Any], path: str) -> list[str]:
    """A bpc part run again only for what another part needs (e.g. seed 0's weights for the streaming part): each of
    its runs must repeat a pooled run of the same model and seed, with the same validation figures; they are not
    pooled twice. Returns the ``model/seed`` names checked; raises ``ValueError`` where one differs or is missing."""
    settings = {k: v for k, v in part["setting"].items() if k != "seeds"}
    if settings != {k: v for k, v in pooled["setting"].items() if k != "seeds"}:
        raise ValueError(f"The bpc part of {path} has other settings than the pooled one; it cannot be merged.")
    checked = []
    for model, entry in part["models"].items():
        runs = {r["seed"]: r for r in pooled["models"].get(model, {}).get("runs", [])}
        for run in entry["runs"]:
            want = runs.get(run["seed"])
            keys = ("val_memorize_on", "val_memorize_off")
            if want is None or any(run[k] != want[k] for k in keys) or run["diverged"] != want["diverged"]:
                raise ValueError(
                    f"{path}: bpc {model} seed {run['seed']} does not repeat the pooled run (figures differ or the"
                    " pooled report lacks it); merge runs of the same code only."
                )
            checked.append(f"{model}/seed{run['seed']}")
    return checked


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return emit(merge_reports(args.merge), time.perf_counter(), markdown, args.out, args.markdown, log)
    if args.stream_probe is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = stream_probe(json.loads(args.stream_probe))
        print(json.dumps(result))
        return result
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "Hope vs Hope-Attention vs Transformer++ vs Titans: bpc, recall, streaming memory",
        "benchmarks/lm.py",
        argv,
        {k: v for k, v in vars(args).items() if k != "stream_probe"},
        environment(args.threads, SOURCES),
    )
    report.update(threads=args.threads, parts={}, part_seconds={})
    counts = parameter_counts(256)
    for name, (_, _, arch) in ARCH.items():
        p = counts[name]
        if abs(p["vs_hope"]) > 0.05:
            log(f"WARNING: {name} ({arch}) has {p['total']} parameters, {p['vs_hope']:+.1%} vs Hope")
    with tempfile.TemporaryDirectory(prefix="nl_lm_bench_") as tmp:
        weights: dict[str, str] = {}
        for name in args.parts:
            t0 = time.perf_counter()
            log(f"part {name} ...")
            if name == "bpc":
                report["parts"][name] = part_bpc(args, tmp if "streaming" in args.parts else None)
                weights = report["parts"][name].pop("saved_weights")
            elif name == "recall":
                report["parts"][name] = part_recall(args)
            else:
                report["parts"][name] = part_streaming(args, weights)
            report["part_seconds"][name] = round(time.perf_counter() - t0, 1)
            log(f"part {name}: {report['part_seconds'][name]:.0f} s")
    return emit(report, started, markdown, args.out, args.markdown, log)


if __name__ == "__main__":
    main()
