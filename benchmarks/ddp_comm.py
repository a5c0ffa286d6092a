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
"""Communication of ``NestedDDPStrategy`` against ``DDPStrategy``: bytes all-reduced per optimizer step and step time.

What is measured
----------------
A seeded MLP classifier whose slow levels hold most of the parameters, trained with ``MultiFrequencyUpdates`` and
SGD (lr 0.05, momentum 0.9) on random in-memory data (each process its own batches of 64), 2 processes on the CPU
(gloo), under two strategies:

- ``ddp``: Lightning's ``DDPStrategy``: DDP all-reduces every gradient on every step;
- ``nested``: ``nl_lightning.strategies.NestedDDPStrategy``: the parameters of the levels with ``every > 1`` are left
  out of DDP and each such level is all-reduced once, on the step where it updates.

The model (``--width`` W, default 1024; 256 input features, 10 classes) and its levels:

- ``fast`` (every 1): ``fast.0`` Linear(W/2, W/4) and ``fast.2`` Linear(W/4, 10);
- ``mid`` (every 4): ``mid.0`` Linear(W, W/2);
- ``slow`` (every 16): ``slow.0`` Linear(256, W) and ``slow.2`` Linear(W, W).

Forward: ``slow`` -> ``mid`` -> ``fast`` with ReLU between the layers.

**Bytes** (one counting run per strategy, ``--count-steps`` steps, a multiple of 16, after identical seeding): a DDP
communication hook registered on the wrapped model (Lightning registers DDP hooks on CUDA only, so the script
registers it itself) counts the bytes of every gradient bucket DDP all-reduces, and a wrapper around
``torch.distributed.all_reduce`` counts the all-reduces ``NestedDDPStrategy`` makes itself and any other (Lightning's
own small reductions). The prediction from the level sizes: ``ddp`` sends every parameter on every step,
``4 * sum_l n_l`` bytes; ``nested`` sends ``4 * n_fast`` bytes through DDP on every step plus
``4 * (n_l + k_l)`` bytes once per ``C_l`` steps for each slow level ``l`` (``n_l`` values, ``k_l`` tensors: the
strategy's all-reduce carries one presence flag per tensor), that is ``4 * (n_fast + sum_l (n_l + k_l) / C_l)`` per
step. The counting runs also give the final parameters of both strategies, which must agree to fp32 summation order
(``max_abs_param_diff``). The optimizer is SGD so that this comparison means something: Adam divides each element's
update by the root of its second moment, which turns the rounding differences of elements whose gradient is nearly
zero into steps of the size of the learning rate, so after a few dozen AdamW steps the difference would show the
learning rate rather than the rounding.

**Step time** (timed runs, no hook, no wrapper): a step is timed on rank 0 from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward with DDP's all-reduce, the level all-reduces, the optimizer step). Each run
is ``--warmup`` + ``--steps`` steps; the warm-up steps (a whole chunk of the slow level by default) are dropped. The
two strategies alternate in ``--rounds`` rounds, the order flipping from one round to the next (AB / BA), and the kept
steps are pooled: median, quartiles and mean (the mean counts the rare update steps of the slow levels, so it is the
throughput figure).

Running it
----------
::

    OMP_NUM_THREADS=1 python benchmarks/ddp_comm.py --out benchmarks/results/ddp_comm.json \\
        --markdown benchmarks/results/ddp_comm.md --docs docs/scaling_out_ddp.md
    python benchmarks/ddp_comm.py --quick                      # smoke run, about a minute
    python benchmarks/ddp_comm.py --from benchmarks/results/ddp_comm.json --docs docs/scaling_out_ddp.md

``--out PATH`` writes the JSON and prints the Markdown report; without ``--out`` the JSON goes to stdout.
``--markdown PATH`` also writes the report. ``--docs PATH`` rewrites the figures between the markers
``<!-- ddp_comm:begin -->`` and ``<!-- ddp_comm:end -->`` of that page. ``--from JSON`` renders an existing report
instead of measuring. Progress goes to stderr. Speed is measured here, never asserted; the byte counts are checked
against the prediction and the script exits with an error if they differ.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import emit, environment, num, quartiles, quiet, report_header
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.strategies import NestedDDPStrategy

SEED = 1234
IN_FEATURES, CLASSES, BATCH = 256, 10, 64
LEVELS = (Level("fast", ["fast.*"], every=1), Level("mid", ["mid.*"], every=4), Level("slow", ["slow.*"], every=16))
VARIANTS = ("ddp", "nested")
DEFAULTS = {"rounds": 5, "steps": 48, "warmup": 16, "count_steps": 48}
QUICK = {"rounds": 2, "steps": 16, "warmup": 4, "count_steps": 16}
NESTED_MODULE = "nl_lightning.strategies.nested_ddp"
BEGIN, END = "<!-- ddp_comm:begin -->", "<!-- ddp_comm:end -->"


def log(message: str) -> None:
    print(f"[ddp_comm] {message}", file=sys.__stderr__, flush=True)  # also from inside `quiet`


# ---------------------------------------------------------------------------------------------------- the model
class Net(pl.LightningModule):
    """``slow`` (two layers) -> ``mid`` (one) -> ``fast`` (two), ReLU between; see the module docstring."""

    def __init__(self, width: int, steps: int, rank: int) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.slow = nn.Sequential(nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU())
        self.fast = nn.Sequential(nn.Linear(width // 2, width // 4), nn.ReLU(), nn.Linear(width // 4, CLASSES))
        g = torch.Generator().manual_seed(SEED + 1 + rank)  # each process its own data
        self.data = TensorDataset(
            torch.randn(steps * BATCH, IN_FEATURES, generator=g),
            torch.randint(0, CLASSES, (steps * BATCH,), generator=g),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fast(self.mid(self.slow(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH, shuffle=False)


def level_sizes(width: int) -> dict[str, dict[str, int]]:
    """Per level: its period, values and tensors (computed from a fresh model, on the CPU, no process group)."""
    net = Net(width, 1, 0)
    out = {}
    for lvl in LEVELS:
        params = [p for n, p in net.named_parameters() if n.startswith(lvl.name + ".")]
        out[lvl.name] = {"every": lvl.every, "values": sum(p.numel() for p in params), "tensors": len(params)}
    return out


def predicted_bytes(levels: dict[str, dict[str, int]]) -> dict[str, float]:
    ddp = 4 * sum(lv["values"] for lv in levels.values())
    fast = 4 * sum(lv["values"] for lv in levels.values() if lv["every"] == 1)
    own = sum(4 * (lv["values"] + lv["tensors"]) / lv["every"] for lv in levels.values() if lv["every"] > 1)
    return {"ddp": float(ddp), "nested": fast + own, "nested_ddp_buckets": float(fast), "nested_own": own}


# ---------------------------------------------------------------------------------------------------- measuring
class _StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter() - self._t0) * 1e3)


class _BucketBytes(Callback):
    """A DDP communication hook (plain all-reduce of the averaged bucket, as DDP's default) counting bucket bytes."""

    def __init__(self) -> None:
        self.bytes, self.calls = 0, 0

    def on_fit_start(self, trainer, pl_module):
        def hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks a string annotation against dist.GradBucket
            self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            self.calls += 1
            return default_hooks.allreduce_hook(None, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)


@contextlib.contextmanager
def _counting_all_reduce(counts: dict[str, list[int]]):
    """Count the bytes of ``torch.distributed.all_reduce`` calls: those of NestedDDPStrategy, the DDP hook's, others."""
    original = dist.all_reduce
    hook_module = default_hooks.__name__

    def counting(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__")
        key = "nested_own" if caller == NESTED_MODULE else "hook" if caller == hook_module else "other"
        counts[key].append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield
    finally:
        dist.all_reduce = original


def _fit(variant: str, args: dict[str, Any], steps: int, rank: int, callbacks: list, tmp: str) -> Net:
    cls = NestedDDPStrategy if variant == "nested" else DDPStrategy
    model = Net(args["width"], steps, rank)
    trainer = pl.Trainer(
        default_root_dir=tmp,
        strategy=cls(timeout=timedelta(seconds=120)),
        accelerator="cpu",
        devices=2,
        max_steps=steps,
        use_distributed_sampler=False,
        callbacks=[MultiFrequencyUpdates(list(LEVELS)), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    mfu = next(cb for cb in trainer.callbacks if isinstance(cb, MultiFrequencyUpdates))
    expected = {lvl.name: steps // lvl.every for lvl in LEVELS}
    if mfu.num_updates != expected:
        raise RuntimeError(f"{variant}: level updates {mfu.num_updates}, expected {expected}")
    return model


def _worker(rank: int, port: int, args: dict[str, Any], out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args["threads"])
    sink = io.StringIO()
    result: dict[str, Any] = {
        "bytes": {},
        "times": {v: [] for v in VARIANTS},
        "round_medians": {v: [] for v in VARIANTS},
    }
    params: dict[str, dict[str, Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="nl_ddp_comm_") as tmp, quiet(sink, args["verbose"]):
        for variant in VARIANTS:
            spy = _BucketBytes()
            counts: dict[str, list[int]] = {"nested_own": [], "hook": [], "other": []}
            with _counting_all_reduce(counts):
                model = _fit(variant, args, args["count_steps"], rank, [spy], tmp)
            params[variant] = {n: p.detach().clone() for n, p in model.named_parameters()}
            result["bytes"][variant] = {
                "steps": args["count_steps"],
                "ddp_buckets": spy.bytes,
                "ddp_bucket_calls": spy.calls,
                "nested_own": sum(counts["nested_own"]),
                "nested_own_calls": len(counts["nested_own"]),
                "other": sum(counts["other"]),
                "other_calls": len(counts["other"]),
            }
            if rank == 0:
                log(f"counted {variant}: {result['bytes'][variant]}")
        result["max_abs_param_diff"] = max(
            (params["nested"][n] - p).abs().max().item() for n, p in params["ddp"].items()
        )
        for r in range(args["rounds"]):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                timer = _StepTimer()
                _fit(variant, args, args["warmup"] + args["steps"], rank, [timer], tmp)
                kept = timer.times[args["warmup"] :]
                result["times"][variant].extend(kept)
                result["round_medians"][variant].append(statistics.median(kept))
                if rank == 0:
                    log(f"round {r + 1}/{args['rounds']} {variant}: median {statistics.median(kept):.1f} ms")
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: getattr(args, k) for k in ("width", "rounds", "steps", "warmup", "count_steps", "threads")}
    with tempfile.TemporaryDirectory(prefix="nl_ddp_comm_") as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.start_processes(
            _worker, args=(_free_port(), {**settings, "verbose": args.verbose}, out), nprocs=2, start_method="spawn"
        )
        raw = json.loads(Path(out).read_text())
    levels = level_sizes(args.width)
    predicted = predicted_bytes(levels)
    measured = {}
    for variant, b in raw["bytes"].items():
        n = b["steps"]
        measured[variant] = {
            "ddp_buckets_per_step": b["ddp_buckets"] / n,
            "nested_own_per_step": b["nested_own"] / n,
            "other_per_step": b["other"] / n,
            "total_per_step": (b["ddp_buckets"] + b["nested_own"] + b["other"]) / n,
            "gradient_per_step": (b["ddp_buckets"] + b["nested_own"]) / n,
            "all_reduce_calls_per_step": (b["ddp_bucket_calls"] + b["nested_own_calls"]) / n,
            "raw": b,
        }
    for variant in VARIANTS:
        if abs(measured[variant]["gradient_per_step"] - predicted[variant]) > 1e-6:
            raise RuntimeError(
                f"{variant}: measured {measured[variant]['gradient_per_step']} gradient bytes per step, predicted"
                f" {predicted[variant]}"
            )
    timing = {}
    for variant in VARIANTS:
        times = raw["times"][variant]
        q1, q2, q3 = quartiles(times)
        timing[variant] = {
            "median_ms": q2,
            "p25_ms": q1,
            "p75_ms": q3,
            "mean_ms": statistics.fmean(times),
            "steps": len(times),
            "round_medians_ms": raw["round_medians"][variant],
        }
    ratio = {
        "bytes_measured": measured["nested"]["gradient_per_step"] / measured["ddp"]["gradient_per_step"],
        "bytes_predicted": predicted["nested"] / predicted["ddp"],
        "bytes_predicted_without_flags": (
            predicted["nested_ddp_buckets"]
            + sum(4 * lv["values"] / lv["every"] for lv in levels.values() if lv["every"] > 1)
        )
        / predicted["ddp"],
        "median_step_time": timing["nested"]["median_ms"] / timing["ddp"]["median_ms"],
        "mean_step_time": timing["nested"]["mean_ms"] / timing["ddp"]["mean_ms"],
        "median_of_round_ratios": statistics.median(
            a / b for a, b in zip(timing["nested"]["round_medians_ms"], timing["ddp"]["round_medians_ms"], strict=True)
        ),
    }
    return {
        "levels": levels,
        "parameters": sum(lv["values"] for lv in levels.values()),
        "predicted_bytes_per_step": predicted,
        "measured_bytes": measured,
        "timing": timing,
        "ratios": ratio,
        "max_abs_param_diff": raw["max_abs_param_diff"],
    }


# ---------------------------------------------------------------------------------------------------- reports
def figures(report: dict[str, Any]) -> str:
    """The measured figures as Markdown tables (used by the report and by ``--docs``)."""
    r, args = report["results"], report["args"]
    lines = [
        f"Model: {r['parameters']:,} parameters, width {args['width']}; 2 processes, gloo on CPU,"
        f" {args['threads']} torch thread(s) each; batch {BATCH} per process; SGD with momentum.",
        "",
        "| level | every | parameters | share | fp32 MB | all-reduced per step under NestedDDP |",
        "|---|---|---|---|---|---|",
    ]
    for name, lv in r["levels"].items():
        share = lv["values"] / r["parameters"]
        per_step = "every step (DDP)" if lv["every"] == 1 else f"1/{lv['every']} (one all-reduce per update)"
        lines.append(
            f"| {name} | {lv['every']} | {lv['values']:,} | {share:.1%} | {4 * lv['values'] / 1e6:.2f} | {per_step} |"
        )
    m, p = r["measured_bytes"], r["predicted_bytes_per_step"]
    lines += [
        "",
        f"Gradient bytes all-reduced per optimizer step, counted over {m['ddp']['raw']['steps']} steps:",
        "",
        "| strategy | DDP buckets | level all-reduces | total | predicted | all-reduce calls per step |",
        "|---|---|---|---|---|---|",
    ]
    for variant, label in (("ddp", "DDPStrategy"), ("nested", "NestedDDPStrategy")):
        mv = m[variant]
        lines.append(
            f"| {label} | {mv['ddp_buckets_per_step']:,.0f} | {mv['nested_own_per_step']:,.0f} |"
            f" {mv['gradient_per_step']:,.0f} | {p[variant]:,.0f} | {mv['all_reduce_calls_per_step']:.3g} |"
        )
    ra, t = r["ratios"], r["timing"]
    lines += [
        "",
        f"NestedDDP / DDP bytes: measured {ra['bytes_measured']:.4f}, predicted {ra['bytes_predicted']:.4f}"
        f" ({1 / ra['bytes_measured']:.2f}x fewer bytes; the presence flags are"
        f" {sum(4 * lv['tensors'] / lv['every'] for lv in r['levels'].values() if lv['every'] > 1):.1f} bytes of"
        " them per step)."
        f" Parameters after the counting runs: max |NestedDDP - DDP| = {num(r['max_abs_param_diff'], '.2e')}.",
        "",
        f"Step time on rank 0 (ms; {t['ddp']['steps']} steps per strategy pooled over {args['rounds']} rounds):",
        "",
        "| strategy | median | p25-p75 | mean |",
        "|---|---|---|---|",
    ]
    for variant, label in (("ddp", "DDPStrategy"), ("nested", "NestedDDPStrategy")):
        tv = t[variant]
        lines.append(
            f"| {label} | {tv['median_ms']:.1f} | {tv['p25_ms']:.1f}-{tv['p75_ms']:.1f} | {tv['mean_ms']:.1f} |"
        )
    lines += [
        "",
        f"NestedDDP / DDP step time: median {ra['median_step_time']:.3f} (median of per-round ratios"
        f" {ra['median_of_round_ratios']:.3f}), mean {ra['mean_step_time']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    head = [
        "# NestedDDPStrategy vs DDPStrategy: communication per optimizer step",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['timestamp']}; nl_lightning {env['nl_lightning']}, torch {env['torch']}, lightning"
        f" {env['lightning']}, Python {env['python']}, {env['cpu_count']} CPU core(s); total {report['wall_s']} s."
        " A shared machine: other load inflates wall times.",
        "",
        "",
    ]
    return "\n".join(head) + figures(report)


def write_docs(report: dict[str, Any], path: str) -> None:
    page = Path(path).read_text()
    if page.count(BEGIN) != 1 or page.count(END) != 1:
        raise SystemExit(f"{path} must hold the markers {BEGIN} and {END} once each, in that order.")
    before, rest = page.split(BEGIN)
    _, after = rest.split(END)
    generated = (
        f"{BEGIN}\n<!-- generated by `python benchmarks/ddp_comm.py --from benchmarks/results/ddp_comm.json --docs"
        f" {path}`; do not edit by hand -->\n\n{figures(report)}\n{END}"
    )
    Path(path).write_text(before + generated + after)


# ---------------------------------------------------------------------------------------------------- driver
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="the model's width W (1024)")
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {DEFAULTS['rounds']})")
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=int, help=f"dropped steps per run (default {DEFAULTS['warmup']})")
    parser.add_argument("--count-steps", type=int, help=f"steps of the counting runs ({DEFAULTS['count_steps']})")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per process (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + str(QUICK))
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument("--docs", help="rewrite the generated figures of this page (between the ddp_comm markers)")
    parser.add_argument("--from", dest="from_json", help="render this JSON report instead of measuring")
    parser.add_argument("--verbose", action="store_true", help="let Lightning's output through (to stderr)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.rounds, args.steps, args.threads, args.count_steps) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps, --count-steps and --threads must be >= 1, --warmup >= 0")
    if args.count_steps % 16 or args.width % 4:
        parser.error("--count-steps must be a multiple of 16 (the slow period), --width a multiple of 4")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        if args.markdown:
            Path(args.markdown).write_text(markdown(report))
        if args.docs:
            write_docs(report, args.docs)
        print(markdown(report), end="")
        return report
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json",)}
    report = report_header(
        "NestedDDPStrategy vs DDPStrategy: bytes all-reduced per step and step time",
        "benchmarks/ddp_comm.py",
        argv,
        settings,
        environment(args.threads, backend="gloo", processes=2),
    )
    report["results"] = measure(args)
    report = emit(report, started, markdown, args.out, args.markdown, log)
    if args.docs:
        write_docs(report, args.docs)
    return report


if __name__ == "__main__":
    main()
