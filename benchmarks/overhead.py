"""Step-time overhead of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`, printed as JSON.

What is measured
----------------
Two seeded models, each split into three levels (``fast`` every 1, ``mid`` every 4, ``slow`` every 16):

- ``mlp``: a ~2.6M-parameter MLP (512 -> 1024 -> 1024 -> 1024 -> 10) on random features and labels;
- ``transformer``: a ~2.5M-parameter causal transformer language model (d_model 256, 4 heads, 3 pre-norm blocks,
  vocab 256, sequence 128) on random tokens.

Each model is trained with AdamW (weight decay 0.1) in four variants, all in this one process:

- ``lightning`` vs ``lightning+mfu``: a plain ``Trainer`` against the same ``Trainer`` with ``MultiFrequencyUpdates``.
  A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step and every
  callback's hooks; data loading is outside).
- ``torch`` vs ``torch+levelset``: a hand-written loop (forward, backward, ``AdamW.step``, ``zero_grad``) against the
  same loop with ``LevelSet.prepare()`` / ``LevelSet.commit(plan)``: the engine's cost without Lightning's noise. These
  variants also time the phases of a step (forward+backward, engine, optimizer step, ``zero_grad``) to show where the
  time goes.

Every run is a fresh, identically seeded model on the same in-memory batches. The variants are interleaved: in every
round each variant runs once for ``--steps`` steps, and the order inside each pair flips from one round to the next
(ABAB / BABA), so drift of the machine hits both sides alike. The first ``--warmup`` steps of each run are dropped and
the rest pooled over the rounds. Before a run's times are kept its schedule is checked: every level must have taken
``steps // every`` updates, and the AdamW step count of each of its parameters must agree; a mismatch raises.

The overhead of a pair is ``median(with) / median(without) - 1`` over the pooled steps, also given as the median of
the per-round ratios (more robust to drift) and for the mean step time (throughput, which counts the rare update steps
of the slow levels). Every step's process CPU time is recorded too (``cpu_median_ms``, ``cpu_median_ratio``): on a
shared machine it is less disturbed by other tenants than wall time. The target is an overhead of at most 2%.

Note that the "with" variants do *less* optimizer work: a level that is not due hides its gradients, so AdamW skips its
parameters on those steps. The engine's own cost is the ``engine_ms`` phase of ``torch+levelset`` (``prepare`` +
``commit``); ``optimizer_ms`` shows the saving.

Running it
----------
::

    python benchmarks/overhead.py                      # default setting, a few minutes on a 2-core CPU
    python benchmarks/overhead.py --quick              # smoke run, well under a minute
    python benchmarks/overhead.py --models mlp --rounds 10 --threads 1 --out /tmp/overhead.json

Only the JSON goes to stdout, so ``python benchmarks/overhead.py > overhead.json`` works. The script is not part of
the test suite: speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import report_header
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

import nl_lightning
from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.levels import resolve_levels

Batch = tuple[Tensor, Tensor]

SEED = 1234
TARGET = 0.02
PAIRS: tuple[tuple[str, str], ...] = (("lightning", "lightning+mfu"), ("torch", "torch+levelset"))
DEFAULTS = {"rounds": 6, "steps": 58, "warmup": 10}  # 48 timed steps: 3 whole chunks of the slow level
QUICK = {"rounds": 2, "steps": 20, "warmup": 4}


# ---------------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """A plain MLP classifier: ``inp -> hidden x depth -> classes`` with GELU."""

    def __init__(self, inp: int = 512, hidden: int = 1024, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        sizes = [inp] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


class TinyLM(nn.Module):
    """A small causal transformer language model over bytes (pre-norm ``nn.TransformerEncoder`` blocks)."""

    def __init__(self, vocab: int = 256, d_model: int = 256, heads: int = 4, depth: int = 3, seq: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos.weight[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


@dataclass(frozen=True)
class Spec:
    """A benchmark model: how to build it, its batches and its three levels (globs over ``Task`` parameter names)."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], Batch]
    levels: tuple[Level, ...]
    data: str


def _mlp_batch(gen: torch.Generator, batch: int = 256) -> Batch:
    return torch.randn(batch, 512, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _lm_batch(gen: torch.Generator, batch: int = 4, seq: int = 128) -> Batch:
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


SPECS: dict[str, Spec] = {
    "mlp": Spec(
        name="mlp",
        build=MLP,
        make_batch=_mlp_batch,
        levels=(
            Level("fast", ["net.head.*"], every=1),
            Level("mid", ["net.layers.2.*"], every=4),
            Level("slow", ["net.layers.0.*", "net.layers.1.*"], every=16),
        ),
        data="random features [256, 512] float32, random labels in [0, 10)",
    ),
    "transformer": Spec(
        name="transformer",
        build=TinyLM,
        make_batch=_lm_batch,
        levels=(
            Level("fast", ["net.tok.*", "net.pos.*", "net.norm.*", "net.head.*"], every=1),
            Level("mid", ["net.blocks.layers.2.*"], every=4),
            Level("slow", ["net.blocks.layers.0.*", "net.blocks.layers.1.*"], every=16),
        ),
        data="random byte tokens [4, 128] (next-token targets), causal mask",
    ),
}


class Task(pl.LightningModule):
    """Wraps a network with a cross-entropy loss and AdamW (weight decay 0.1); the torch loops use it too."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def loss(self, batch: Batch) -> Tensor:
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self)


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1)


def build_task(spec: Spec) -> Task:
    torch.manual_seed(SEED)
    return Task(spec.build()).train()


def make_batches(spec: Spec, steps: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(SEED + 1)
    return [spec.make_batch(gen) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """Per-step wall and process-CPU times (seconds) of one run, phase times (torch variants), verified updates."""

    times: list[float]
    cpu_times: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    num_updates: dict[str, int] | None = None


class StepTimer(Callback):
    """Times ``on_train_batch_start`` to ``on_train_batch_end`` (wall and process CPU); put it last in the list."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def run_lightning(spec: Spec, batches: list[Batch], with_mfu: bool, root: str) -> Run:
    task = build_task(spec)
    timer = StepTimer()
    mfu = MultiFrequencyUpdates(list(spec.levels)) if with_mfu else None
    trainer = pl.Trainer(
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        callbacks=([mfu] if mfu is not None else []) + [timer],
    )
    trainer.fit(task, train_dataloaders=DataLoader(batches, batch_size=None))
    if len(timer.times) != len(batches):
        raise RuntimeError(f"{spec.name}: Lightning ran {len(timer.times)} steps, expected {len(batches)}.")
    updates = None
    if mfu is not None:
        updates = verify_schedule(spec, mfu.num_updates, trainer.optimizers[0], task, len(batches))
    return Run(timer.times, timer.cpu_times, num_updates=updates)


def run_torch(spec: Spec, batches: list[Batch], with_levelset: bool) -> Run:
    task = build_task(spec)
    opt = make_optimizer(task)
    book = LevelSet(spec.levels, task.named_parameters()) if with_levelset else None
    clock = time.perf_counter
    run = Run([], phases={"forward_backward_ms": [], "engine_ms": [], "optimizer_ms": [], "zero_grad_ms": []})
    for batch in batches:
        cpu0 = time.process_time()
        t0 = clock()
        task.loss(batch).backward()
        t1 = clock()
        plan = book.prepare() if book is not None else None
        t2 = clock()
        opt.step()
        t3 = clock()
        if book is not None:
            book.commit(plan)
            plan = None  # as the callback does: the held gradients are released before the next backward
        t4 = clock()
        opt.zero_grad()
        t5 = clock()
        run.cpu_times.append(time.process_time() - cpu0)
        run.times.append(t5 - t0)
        for key, dt in zip(run.phases, (t1 - t0, (t2 - t1) + (t4 - t3), t3 - t2, t5 - t4), strict=True):
            run.phases[key].append(dt)
    if book is not None:
        run.num_updates = verify_schedule(spec, book.num_updates, opt, task, len(batches))
    return run


def verify_schedule(
    spec: Spec, num_updates: dict[str, int], opt: torch.optim.Optimizer, task: Task, steps: int
) -> dict[str, int]:
    """Check that each level took ``steps // every`` updates, per the engine and per AdamW's own step counts."""
    expected = {lvl.name: steps // lvl.every for lvl in spec.levels}
    if num_updates != expected:
        raise RuntimeError(
            f"{spec.name}: levels took {num_updates} updates, expected {expected}: the engine is broken."
        )
    matched = resolve_levels(spec.levels, task.named_parameters())
    owner = {name: level for level, pairs in matched.items() for name, _ in pairs}
    for name, p in task.named_parameters():
        state_step = opt.state.get(p, {}).get("step")
        taken = 0 if state_step is None else int(state_step)
        want = expected[owner[name]] if name in owner else steps
        if taken != want:
            raise RuntimeError(f"{spec.name}: AdamW stepped {name!r} {taken} times, expected {want}.")
    return dict(num_updates)


VARIANTS: dict[str, Callable[[Spec, list[Batch], str], Run]] = {
    "lightning": lambda spec, batches, root: run_lightning(spec, batches, False, root),
    "lightning+mfu": lambda spec, batches, root: run_lightning(spec, batches, True, root),
    "torch": lambda spec, batches, root: run_torch(spec, batches, False),
    "torch+levelset": lambda spec, batches, root: run_torch(spec, batches, True),
}


def round_order(r: int) -> list[str]:
    """ABAB / BABA: the order inside every pair flips from one round to the next."""
    return [name for pair in PAIRS for name in (pair if r % 2 == 0 else pair[::-1])]


# ---------------------------------------------------------------------------------------------------- statistics
def quartiles_ms(xs: Sequence[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1 * 1e3, q2 * 1e3, q3 * 1e3


def summarize(runs: list[Run], warmup: int) -> dict[str, Any]:
    kept = [run.times[warmup:] for run in runs]
    pooled = [t for times in kept for t in times]
    p25, med, p75 = quartiles_ms(pooled)
    out: dict[str, Any] = {
        "median_ms": round(med, 3),
        "p25_ms": round(p25, 3),
        "p75_ms": round(p75, 3),
        "iqr_ms": round(p75 - p25, 3),
        "mean_ms": round(statistics.fmean(pooled) * 1e3, 3),
        "steps": len(pooled),
        "per_round_median_ms": [round(statistics.median(times) * 1e3, 3) for times in kept],
        "cpu_median_ms": round(statistics.median(t for run in runs for t in run.cpu_times[warmup:]) * 1e3, 3),
    }
    if runs[0].phases:
        out["phases_median_ms"] = {
            key: round(statistics.median(t for run in runs for t in run.phases[key][warmup:]) * 1e3, 4)
            for key in runs[0].phases
        }
        out["phases_mean_ms"] = {
            key: round(statistics.fmean(t for run in runs for t in run.phases[key][warmup:]) * 1e3, 4)
            for key in runs[0].phases
        }
    if runs[0].num_updates is not None:
        out["num_updates"] = runs[0].num_updates
        out["runs_verified"] = len(runs)
    return out


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The overhead of ``other`` (with the engine) over ``base`` (without)."""
    ratio = other["median_ms"] / base["median_ms"] - 1
    per_round = [w / b - 1 for b, w in zip(base["per_round_median_ms"], other["per_round_median_ms"], strict=True)]
    mean_ratio = other["mean_ms"] / base["mean_ms"] - 1
    cpu_ratio = other["cpu_median_ms"] / base["cpu_median_ms"] - 1
    out = {
        "overhead_ratio": round(ratio, 5),
        "overhead_pct": round(100 * ratio, 3),
        "overhead_ms": round(other["median_ms"] - base["median_ms"], 3),
        "per_round_ratios": [round(x, 5) for x in per_round],
        "median_per_round_ratio": round(statistics.median(per_round), 5),
        "mean_step_ratio": round(mean_ratio, 5),
        "cpu_median_ratio": round(cpu_ratio, 5),
        "meets_2pct_target": ratio <= TARGET,
    }
    if "phases_median_ms" in other:  # torch pair: the engine's own cost, apart from the optimizer work it saves
        engine = other["phases_median_ms"]["engine_ms"]
        out["engine_median_ms"] = engine
        out["engine_mean_ms"] = other["phases_mean_ms"]["engine_ms"]
        out["engine_share_of_step"] = round(engine / base["median_ms"], 5)
        saved = base["phases_median_ms"]["optimizer_ms"] - other["phases_median_ms"]["optimizer_ms"]
        out["optimizer_saving_median_ms"] = round(saved, 4)
    return out


# ---------------------------------------------------------------------------------------------------- driver
def bench_model(spec: Spec, args: argparse.Namespace, root: str) -> dict[str, Any]:
    batches = make_batches(spec, args.steps)
    for name in round_order(0):  # untimed pre-warm of every variant (allocator, kernels, imports)
        VARIANTS[name](spec, batches[: args.warmup + 2], root)
    runs: dict[str, list[Run]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in round_order(r):
            gc.collect()
            runs[name].append(VARIANTS[name](spec, batches, root))
        medians = {name: f"{statistics.median(runs[name][-1].times[args.warmup :]) * 1e3:.1f}" for name in runs}
        print(f"[overhead] {spec.name} round {r + 1}/{args.rounds}: median ms {medians}", file=sys.stderr, flush=True)
    variants = {name: summarize(runs[name], args.warmup) for name in VARIANTS}
    task = build_task(spec)
    matched = resolve_levels(spec.levels, task.named_parameters())
    return {
        "parameters": sum(p.numel() for p in task.parameters()),
        "data": spec.data,
        "levels": {
            lvl.name: {
                "every": lvl.every,
                "globs": list(lvl.params),
                "parameters": sum(p.numel() for _, p in matched[lvl.name]),
            }
            for lvl in spec.levels
        },
        "expected_updates": {lvl.name: args.steps // lvl.every for lvl in spec.levels},
        "variants": variants,
        "comparisons": {f"{w} vs {b}": compare(variants[b], variants[w]) for b, w in PAIRS},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    parser.add_argument(
        "--warmup", type=int, help=f"steps dropped at the start of each run (default {DEFAULTS['warmup']})"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=list(SPECS), help="models to run")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's setting)")
    parser.add_argument("--out", help="also write the JSON to this path")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given explicitly")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.warmup < 0 or args.steps - args.warmup < 2:
        parser.error("need --rounds >= 1, --warmup >= 0 and at least 2 timed steps (--steps - --warmup >= 2)")
    return args


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep stdout for the JSON: Lightning's info logs and warnings are silenced, stray prints go to stderr."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "nl_lightning": nl_lightning.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "MultiFrequencyUpdates / LevelSet step-time overhead",
        "benchmarks/overhead.py",
        argv,
        {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "models", "threads", "out", "quick")},
        environment(),
    )
    report |= {"target_overhead_ratio": TARGET, "models": {}}
    with quiet(), tempfile.TemporaryDirectory(prefix="nl_overhead_") as root:
        for name in args.models:
            report["models"][name] = bench_model(SPECS[name], args, root)
    report["summary"] = {
        f"{model}/{key}": {"overhead_pct": c["overhead_pct"], "meets_2pct_target": c["meets_2pct_target"]}
        for model, m in report["models"].items()
        for key, c in m["comparisons"].items()
    }
    report["meets_2pct_target"] = all(s["meets_2pct_target"] for s in report["summary"].values())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
