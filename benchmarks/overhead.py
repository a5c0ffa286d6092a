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
"""Step-time overhead of :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` and of the bare ``LevelSet``.

Two seeded models in three levels (``fast`` every 1, ``mid`` every 4, ``slow`` every 16), AdamW (weight decay 0.1):
``mlp`` (~2.6M parameters, 512 -> 1024 x 3 -> 10, random features) and ``transformer`` (a ~2.5M-parameter causal LM,
d_model 256, 4 heads, 3 pre-norm blocks, vocab 256, sequence 128, random tokens). Four variants: ``lightning`` vs
``lightning+mfu`` (a ``Trainer`` without and with the callback, a step timed from ``on_train_batch_start`` to
``on_train_batch_end``) and ``torch`` vs ``torch+levelset`` (a hand-written loop without and with
``LevelSet.prepare()`` / ``commit(plan)``, each phase timed). Every run is a fresh, identically seeded model on the same
batches; pairs interleave (ABAB / BABA), the first ``--warmup`` steps of each run are dropped and the rest pooled. Each
run's schedule is checked first (every level took ``steps // every`` updates, per the engine and per AdamW's step
counts; a mismatch raises). Overhead = ``median(with) / median(without) - 1`` (also per round, for the mean step and
for CPU time), target at most 2%; the "with" variants skip the optimizer work of levels not due, so the engine's own
cost is the ``engine_ms`` phase of ``torch+levelset``.

Running it::

    python benchmarks/overhead.py --threads 1 --out benchmarks/results/overhead_threads1.json   # a few minutes
    python benchmarks/overhead.py --quick --threads 1 --out /tmp/overhead.json                   # smoke run
    python benchmarks/render.py overhead_threads1                                                # the page
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import tempfile
import time
from collections import namedtuple
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import cpu_trainer, environment, make_log, num, quartiles, quiet, report_header, save
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.levels import resolve_levels

TITLE = "MultiFrequencyUpdates / LevelSet step-time overhead"
Batch = tuple[Tensor, Tensor]
SEED, TARGET = 1234, 0.02
PAIRS = (("lightning", "lightning+mfu"), ("torch", "torch+levelset"))
DEFAULTS = {"rounds": 6, "steps": 58, "warmup": 10}  # 48 timed steps: 3 whole chunks of the slow level
QUICK = {"rounds": 2, "steps": 20, "warmup": 4}
PHASES = ("forward_backward_ms", "engine_ms", "optimizer_ms", "zero_grad_ms")
log = make_log("overhead")


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
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(seq, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, 0.0, "gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.blocks(self.tok(x) + self.pos.weight[:t], mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


# A benchmark model: how to build it, its batches from a generator, its three levels (globs over `Task` parameter
# names) and a description of its data.
Spec = namedtuple("Spec", "build make_batch levels data")
next_token = lambda t: (t[:, :-1].contiguous(), t[:, 1:].contiguous())  # noqa: E731 tokens -> (inputs, targets)

SPECS = {
    "mlp": Spec(
        MLP,
        lambda gen: (torch.randn(256, 512, generator=gen), torch.randint(0, 10, (256,), generator=gen)),
        (Level("fast", ["net.head.*"], every=1), Level("mid", ["net.layers.2.*"], every=4),
         Level("slow", ["net.layers.0.*", "net.layers.1.*"], every=16)),
        "random features [256, 512] float32, random labels in [0, 10)",
    ),
    "transformer": Spec(
        TinyLM,
        lambda gen: next_token(torch.randint(0, 256, (4, 129), generator=gen)),
        (Level("fast", ["net.tok.*", "net.pos.*", "net.norm.*", "net.head.*"], every=1),
         Level("mid", ["net.blocks.layers.2.*"], every=4),
         Level("slow", ["net.blocks.layers.0.*", "net.blocks.layers.1.*"], every=16)),
        "random byte tokens [4, 128] (next-token targets), causal mask",
    ),
}  # fmt: skip


class Task(pl.LightningModule):
    """Wraps a seeded network with a cross-entropy loss and AdamW (weight decay 0.1); the torch loops use it too."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.net = spec.build()

    def training_step(self, batch: Batch, batch_idx: int = 0) -> Tensor:
        out = self.net(batch[0])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


class Run(pl.Callback):
    """Per-step wall and process-CPU seconds of one run, phase times (torch variants), verified updates; as a Lightning
    callback (put last in the list) it times ``on_train_batch_start`` to ``on_train_batch_end``."""

    def __init__(self, phases: Sequence[str] = ()) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.phases: dict[str, list[float]] = {k: [] for k in phases}
        self.num_updates: Optional[dict[str, int]] = None
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start[1])
        self.cpu_times.append(time.process_time() - self._start[0])


def verify_schedule(spec: Spec, num_updates: dict[str, int], opt: torch.optim.Optimizer, task: Task,
                    steps: int) -> dict[str, int]:  # fmt: skip
    """Check that each level took ``steps // every`` updates, per the engine and per AdamW's own step counts."""
    expected = {lvl.name: steps // lvl.every for lvl in spec.levels}
    if num_updates != expected:
        raise RuntimeError(f"Levels took {num_updates} updates, expected {expected}: the engine is broken.")
    owner = {n: lvl for lvl, pairs in resolve_levels(spec.levels, task.named_parameters()).items() for n, _ in pairs}
    for name, p in task.named_parameters():
        taken = int(opt.state.get(p, {}).get("step", 0))
        if taken != (want := expected[owner[name]] if name in owner else steps):
            raise RuntimeError(f"AdamW stepped {name!r} {taken} times, expected {want}.")
    return dict(num_updates)


def run_variant(variant: str, spec: Spec, batches: list[Batch], root: str) -> Run:
    """One run of ``variant`` from a fresh, seeded model over ``batches``."""
    task, engine = Task(spec).train(), variant.endswith(("+mfu", "+levelset"))
    if variant.startswith("lightning"):
        run, mfu = Run(), MultiFrequencyUpdates(list(spec.levels)) if engine else None
        trainer = cpu_trainer(max_steps=len(batches), default_root_dir=root, callbacks=[mfu, run] if mfu else [run])
        trainer.fit(task, train_dataloaders=DataLoader(batches, batch_size=None))
        if len(run.times) != len(batches):
            raise RuntimeError(f"Lightning ran {len(run.times)} steps, expected {len(batches)}.")
        if mfu is not None:
            run.num_updates = verify_schedule(spec, mfu.num_updates, trainer.optimizers[0], task, len(batches))
        return run
    opt, run, clock = task.configure_optimizers(), Run(PHASES), time.perf_counter
    book = LevelSet(spec.levels, task.named_parameters()) if engine else None
    for batch in batches:
        cpu0, t0 = time.process_time(), clock()
        task.training_step(batch).backward()
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
        for key, dt in zip(PHASES, (t1 - t0, (t2 - t1) + (t4 - t3), t3 - t2, t5 - t4), strict=True):
            run.phases[key].append(dt)
    if book is not None:
        run.num_updates = verify_schedule(spec, book.num_updates, opt, task, len(batches))
    return run


def summarize(runs: list[Run], warmup: int) -> dict[str, Any]:
    kept = [run.times[warmup:] for run in runs]
    pooled = [t * 1e3 for times in kept for t in times]
    p25, med, p75 = quartiles(pooled)
    out: dict[str, Any] = {
        "median_ms": med, "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25, "mean_ms": statistics.fmean(pooled),
        "steps": len(pooled), "per_round_median_ms": [statistics.median(times) * 1e3 for times in kept],
        "cpu_median_ms": statistics.median(t for run in runs for t in run.cpu_times[warmup:]) * 1e3,
    }  # fmt: skip
    for stat, fn in (("median", statistics.median), ("mean", statistics.fmean)) if runs[0].phases else ():
        out[f"phases_{stat}_ms"] = {k: fn([t for r in runs for t in r.phases[k][warmup:]]) * 1e3
                                    for k in runs[0].phases}  # fmt: skip
    if runs[0].num_updates is not None:
        out["num_updates"], out["runs_verified"] = runs[0].num_updates, len(runs)
    return out


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The overhead of ``other`` (with the engine) over ``base`` (without)."""
    ratio = other["median_ms"] / base["median_ms"] - 1
    per_round = [w / b - 1 for b, w in zip(base["per_round_median_ms"], other["per_round_median_ms"], strict=True)]
    out = {
        "overhead_ratio": ratio, "overhead_pct": 100 * ratio, "overhead_ms": other["median_ms"] - base["median_ms"],
        "per_round_ratios": per_round, "median_per_round_ratio": statistics.median(per_round),
        "mean_step_ratio": other["mean_ms"] / base["mean_ms"] - 1,
        "cpu_median_ratio": other["cpu_median_ms"] / base["cpu_median_ms"] - 1, "meets_2pct_target": ratio <= TARGET,
    }  # fmt: skip
    if "phases_median_ms" in other:  # torch pair: the engine's own cost, apart from the optimizer work it saves
        engine = other["phases_median_ms"]["engine_ms"]
        out |= {"engine_median_ms": engine, "engine_mean_ms": other["phases_mean_ms"]["engine_ms"],
                "engine_share_of_step": engine / base["median_ms"],
                "optimizer_saving_median_ms": base["phases_median_ms"]["optimizer_ms"]
                - other["phases_median_ms"]["optimizer_ms"]}  # fmt: skip
    return out


def bench_model(name: str, args: Any, root: str) -> dict[str, Any]:
    spec, gen = SPECS[name], torch.Generator().manual_seed(SEED + 1)
    batches = [spec.make_batch(gen) for _ in range(args.steps)]
    order = lambda r: [v for pair in PAIRS for v in (pair if r % 2 == 0 else pair[::-1])]  # noqa: E731 ABAB / BABA
    for variant in order(0):  # untimed pre-warm of every variant (allocator, kernels, imports)
        run_variant(variant, spec, batches[: args.warmup + 2], root)
    runs: dict[str, list[Run]] = {v: [] for pair in PAIRS for v in pair}
    for r in range(args.rounds):
        for variant in order(r):
            gc.collect()
            runs[variant].append(run_variant(variant, spec, batches, root))
        medians = {v: f"{statistics.median(runs[v][-1].times[args.warmup :]) * 1e3:.1f}" for v in runs}
        log(f"{name} round {r + 1}/{args.rounds}: median ms {medians}")
    variants = {variant: summarize(r, args.warmup) for variant, r in runs.items()}
    task = Task(spec)
    matched = resolve_levels(spec.levels, task.named_parameters())
    return {
        "parameters": sum(p.numel() for p in task.parameters()),
        "data": spec.data,
        "levels": {lvl.name: {"every": lvl.every, "globs": list(lvl.params),
                              "parameters": sum(p.numel() for _, p in matched[lvl.name])} for lvl in spec.levels},
        "expected_updates": {lvl.name: args.steps // lvl.every for lvl in spec.levels},
        "variants": variants,
        "comparisons": {f"{w} vs {b}": compare(variants[b], variants[w]) for b, w in PAIRS},
    }  # fmt: skip


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and variant the step times; per pair the overhead; the phases of the torch loops."""
    models, a = report["models"], report["args"]
    pct = lambda ratio: num(None if ratio is None else 100 * ratio, "+.2f")  # noqa: E731
    rows = [[m, v, num(s["median_ms"], ".2f"), f"{num(s['p25_ms'], '.2f')}–{num(s['p75_ms'], '.2f')}",
             num(s["mean_ms"], ".2f"), num(s["cpu_median_ms"], ".2f"), s["steps"],
             " / ".join(f"{k} {n}" for k, n in s["num_updates"].items()) if "num_updates" in s else None]
            for m, d in models.items() for v, s in d["variants"].items()]  # fmt: skip
    out = [{"title": "Step time per variant", "rows": rows,
            "note": f"{a['rounds']} interleaved rounds of {a['steps']} steps, the first {a['warmup']} of each run"
            " dropped.", "columns": ["model", "variant", "median ms", "IQR ms", "mean ms", "CPU median ms", "steps",
                                     "updates (verified)"]}]  # fmt: skip
    rows = [[m, pair, pct(c["overhead_ratio"]), pct(c["median_per_round_ratio"]), pct(c["mean_step_ratio"]),
             pct(c["cpu_median_ratio"]), num(c.get("engine_median_ms"), ".3f"),
             num(c.get("optimizer_saving_median_ms"), ".2f"), c["meets_2pct_target"]]
            for m, d in models.items() for pair, c in d["comparisons"].items()]  # fmt: skip
    out.append({"title": "Overhead of the engine (with / without − 1, %)", "rows": rows,
                "note": "The \"with\" variants skip the optimizer work of levels not due; `engine ms` is the median"
                " of `prepare` + `commit` alone, `optimizer saving` the median optimizer time saved.",
                "columns": ["model", "pair", "median", "median of rounds", "mean step", "CPU", "engine ms",
                            "optimizer saving ms", f"≤ {100 * report['target_overhead_ratio']:g}%"]})  # fmt: skip
    rows = [[m, v, *(num(s["phases_median_ms"][k], ".3f") for k in s["phases_median_ms"])]
            for m, d in models.items() for v, s in d["variants"].items() if "phases_median_ms" in s]  # fmt: skip
    out.append({"title": "Phases of the torch loops, median ms", "rows": rows,
                "columns": ["model", "variant", "forward+backward", "engine", "optimizer", "zero_grad"]})  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's setting)")
    for key, text in (("rounds", "interleaved rounds"), ("steps", "steps per run"), ("warmup", "steps dropped")):
        parser.add_argument(f"--{key}", type=int, help=f"{text} ({DEFAULTS[key]}; {QUICK[key]} with --quick)")
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.rounds < 1 or args.warmup < 0 or args.steps - args.warmup < 2:
        parser.error(f"need --rounds >= 1, --warmup >= 0, --steps - --warmup >= 2; got {vars(args)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(TITLE, "benchmarks/overhead.py", argv, vars(args), environment(torch.get_num_threads()))
    report |= {"target_overhead_ratio": TARGET, "models": {}}
    with quiet(io.StringIO()), tempfile.TemporaryDirectory(prefix="nl_overhead_") as root:
        for name in args.models:
            report["models"][name] = bench_model(name, args, root)
    report["summary"] = {f"{model}/{key}": {k: c[k] for k in ("overhead_pct", "meets_2pct_target")}
                         for model, m in report["models"].items() for key, c in m["comparisons"].items()}  # fmt: skip
    report["meets_2pct_target"] = all(s["meets_2pct_target"] for s in report["summary"].values())
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
