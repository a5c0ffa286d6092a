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

A seeded MLP (``--width`` W; 256 inputs, 10 classes) trained with ``MultiFrequencyUpdates`` and SGD (lr 0.05, momentum
0.9) on random data (batches of 64, each process its own), 2 CPU processes (gloo), under ``ddp`` (every gradient
all-reduced every step) and ``nested`` (levels with ``every > 1`` left out of DDP and all-reduced once, on their update
step). Levels: ``fast`` (every 1: Linear(W/2, W/4), Linear(W/4, 10)), ``mid`` (every 4: Linear(W, W/2)), ``slow``
(every 16: Linear(256, W), Linear(W, W)); forward ``slow -> mid -> fast``, ReLU between.

**Bytes** (one counting run per strategy, ``--count-steps`` steps, identical seeding): a DDP communication hook counts
DDP's gradient buckets, a wrapper around ``torch.distributed.all_reduce`` the strategy's own all-reduces and any other.
Prediction: ``ddp`` ``4 * sum_l n_l`` bytes per step, ``nested`` ``4 * (n_fast + sum_l (n_l + k_l) / C_l)`` (``n_l``
values, ``k_l`` tensors, one presence flag each, period ``C_l``); a count that differs is an error. The final
parameters of the two counting runs must agree to fp32 summation order (``max_abs_param_diff``; SGD keeps that
meaningful, Adam would turn rounding differences of near-zero gradients into steps of size lr).

**Step time** (no hook, no wrapper): rank 0 times each step (``step_stats``) over ``--warmup`` (dropped) + ``--steps``
steps per run; the strategies alternate over ``--rounds`` rounds (AB / BA); kept steps pooled.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/ddp_comm.py --out benchmarks/results/ddp_comm.json
    python benchmarks/render.py ddp_comm                 # the page benchmarks/results/ddp_comm.md
    python benchmarks/ddp_comm.py --quick --out /tmp/ddp_comm.json   # smoke run
"""

from __future__ import annotations

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
from unittest import mock

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import arguments, cpu_trainer, environment, make_log, quartiles, quiet, report_header, save, step_stats
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.strategies import NestedDDPStrategy

TITLE = "NestedDDPStrategy vs DDPStrategy: communication per optimizer step"
SEED, IN_FEATURES, CLASSES, BATCH = 1234, 256, 10, 64
LEVELS = (Level("fast", ["fast.*"], every=1), Level("mid", ["mid.*"], every=4), Level("slow", ["slow.*"], every=16))
VARIANTS, LABELS = ("ddp", "nested"), {"ddp": "DDPStrategy", "nested": "NestedDDPStrategy"}
DEFAULTS = {"rounds": 5, "steps": 48, "warmup": 16, "count_steps": 48}
QUICK = {"rounds": 2, "steps": 16, "warmup": 4, "count_steps": 16}
log = make_log("ddp_comm")


class Net(pl.LightningModule):
    """``slow`` (two layers) -> ``mid`` (one) -> ``fast`` (two), ReLU between; ``steps`` batches of its own data."""

    def __init__(self, width: int, steps: int, rank: int) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.slow = nn.Sequential(nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU())
        self.fast = nn.Sequential(nn.Linear(width // 2, width // 4), nn.ReLU(), nn.Linear(width // 4, CLASSES))
        g, n = torch.Generator().manual_seed(SEED + 1 + rank), steps * BATCH
        self.data = TensorDataset(
            torch.randn(n, IN_FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.fast(self.mid(self.slow(batch[0]))), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH, shuffle=False)


class _BucketBytes(pl.Callback):
    """A DDP communication hook (DDP's default all-reduce) counting the bucket bytes; Lightning registers hooks on
    CUDA only, so this does it."""

    def __init__(self) -> None:
        self.bytes, self.calls = 0, 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks a string annotation against dist.GradBucket
            self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            self.calls += 1
            return default_hooks.allreduce_hook(None, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)


def _fit(variant: str, args: dict[str, Any], steps: int, rank: int, callbacks: list, tmp: str) -> Net:
    model, mfu = Net(args["width"], steps, rank), MultiFrequencyUpdates(list(LEVELS))
    strategy = (NestedDDPStrategy if variant == "nested" else DDPStrategy)(timeout=timedelta(seconds=120))
    kwargs = {"max_steps": steps, "use_distributed_sampler": False, "callbacks": [mfu, *callbacks]}
    cpu_trainer(default_root_dir=tmp, strategy=strategy, devices=2, **kwargs).fit(model)
    if mfu.num_updates != (expected := {lvl.name: steps // lvl.every for lvl in LEVELS}):
        raise RuntimeError(f"{variant}: level updates {mfu.num_updates}, expected {expected}")
    return model


def _worker(rank: int, port: int, args: dict[str, Any], out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args["threads"])
    res: dict[str, Any] = {"bytes": {}, "times": {v: [] for v in VARIANTS}, "round_medians": {v: [] for v in VARIANTS}}
    params: dict[str, dict[str, Tensor]] = {}
    all_reduce = dist.all_reduce

    def counting(tensor: Tensor, *a: Any, **kw: Any) -> Any:  # bytes of NestedDDPStrategy's, the hook's, others
        caller = sys._getframe(1).f_globals.get("__name__")
        own = caller == "nl_lightning.strategies.nested_ddp"
        key = "nested_own" if own else "hook" if caller == default_hooks.__name__ else "other"
        counts[key].append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *a, **kw)

    with tempfile.TemporaryDirectory(prefix="nl_ddp_comm_") as tmp, quiet(io.StringIO(), args["verbose"]):
        for variant in VARIANTS:
            spy, counts = _BucketBytes(), {"nested_own": [], "hook": [], "other": []}
            with mock.patch.object(dist, "all_reduce", counting):
                model = _fit(variant, args, args["count_steps"], rank, [spy], tmp)
            params[variant] = {n: p.detach().clone() for n, p in model.named_parameters()}
            b = res["bytes"][variant] = {"steps": args["count_steps"], "ddp_buckets": spy.bytes}
            b["ddp_bucket_calls"] = spy.calls
            for key in ("nested_own", "other"):
                b.update({key: sum(counts[key]), f"{key}_calls": len(counts[key])})
            if rank == 0:
                log(f"counted {variant}: {b}")
        res["max_abs_param_diff"] = max((params["nested"][n] - p).abs().max().item() for n, p in params["ddp"].items())
        for r in range(args["rounds"]):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                stats = step_stats()
                _fit(variant, args, args["warmup"] + args["steps"], rank, [stats], tmp)
                kept = [1e3 * t for t in stats.times[args["warmup"] :]]
                res["times"][variant].extend(kept)
                res["round_medians"][variant].append(statistics.median(kept))
                if rank == 0:
                    log(f"round {r + 1}/{args['rounds']} {variant}: median {statistics.median(kept):.1f} ms")
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def measure(args: Any) -> dict[str, Any]:
    """Run the two processes, then check the byte counts against the prediction and pool the step times."""
    settings = {k: getattr(args, k) for k in ("width", "rounds", "steps", "warmup", "count_steps", "threads")}
    with tempfile.TemporaryDirectory(prefix="nl_ddp_comm_") as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = str(Path(tmp) / "rank0.json")
        worker_args = (port, {**settings, "verbose": args.verbose}, out)
        mp.start_processes(_worker, args=worker_args, nprocs=2, start_method="spawn")
        raw = json.loads(Path(out).read_text())
    named = list(Net(args.width, 1, 0).named_parameters())
    levels = {}
    for lvl in LEVELS:
        params = [p for n, p in named if n.startswith(lvl.name + ".")]
        levels[lvl.name] = {"every": lvl.every, "values": sum(p.numel() for p in params), "tensors": len(params)}
    fast = 4 * sum(lv["values"] for lv in levels.values() if lv["every"] == 1)
    own = sum(4 * (lv["values"] + lv["tensors"]) / lv["every"] for lv in levels.values() if lv["every"] > 1)
    ddp = float(4 * sum(lv["values"] for lv in levels.values()))
    predicted = {"ddp": ddp, "nested": fast + own, "nested_ddp_buckets": float(fast), "nested_own": own}
    measured = {}
    for variant, b in raw["bytes"].items():
        n, grad = b["steps"], b["ddp_buckets"] + b["nested_own"]
        measured[variant] = {f"{k}_per_step": b[k] / n for k in ("ddp_buckets", "nested_own", "other")}
        calls = (b["ddp_bucket_calls"] + b["nested_own_calls"]) / n
        measured[variant].update(total_per_step=(grad + b["other"]) / n, gradient_per_step=grad / n)
        measured[variant].update(all_reduce_calls_per_step=calls, raw=b)
        if abs(grad / n - predicted[variant]) > 1e-6:
            raise RuntimeError(
                f"{variant}: measured {grad / n} gradient bytes per step, predicted {predicted[variant]}"
            )
    timing = {}
    for variant in VARIANTS:
        q1, q2, q3 = quartiles(times := raw["times"][variant])
        timing[variant] = {"median_ms": q2, "p25_ms": q1, "p75_ms": q3, "mean_ms": statistics.fmean(times)}
        timing[variant].update(steps=len(times), round_medians_ms=raw["round_medians"][variant])
    unflagged = sum(4 * lv["values"] / lv["every"] for lv in levels.values() if lv["every"] > 1)
    rounds = zip(timing["nested"]["round_medians_ms"], timing["ddp"]["round_medians_ms"], strict=True)
    ratio = {
        "bytes_measured": measured["nested"]["gradient_per_step"] / measured["ddp"]["gradient_per_step"],
        "bytes_predicted": predicted["nested"] / predicted["ddp"],
        "bytes_predicted_without_flags": (predicted["nested_ddp_buckets"] + unflagged) / predicted["ddp"],
        "median_step_time": timing["nested"]["median_ms"] / timing["ddp"]["median_ms"],
        "mean_step_time": timing["nested"]["mean_ms"] / timing["ddp"]["mean_ms"],
        "median_of_round_ratios": statistics.median(a / b for a, b in rounds),
    }
    out = {"levels": levels, "parameters": sum(lv["values"] for lv in levels.values())}
    out.update(predicted_bytes_per_step=predicted, measured_bytes=measured, timing=timing, ratios=ratio)
    return {**out, "max_abs_param_diff": raw["max_abs_param_diff"]}


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``): levels, bytes per step, step time."""
    r, a = report["results"], report["args"]
    m, p, ra, t, lvs = r["measured_bytes"], r["predicted_bytes_per_step"], r["ratios"], r["timing"], r["levels"]
    flags = sum(4 * lv["tensors"] / lv["every"] for lv in lvs.values() if lv["every"] > 1)
    title = f"Model: {r['parameters']:,} parameters, width {a['width']}; 2 processes, gloo on CPU, {a['threads']} torch"
    title += f" thread(s) each; batch {BATCH} per process; SGD with momentum"
    columns = ["level", "every", "parameters", "share", "fp32 MB", "all-reduced per step under NestedDDP"]
    rows = [
        [n, lv["every"], lv["values"], f"{lv['values'] / r['parameters']:.1%}", f"{4 * lv['values'] / 1e6:.2f}"]
        + ["every step (DDP)" if lv["every"] == 1 else f"1/{lv['every']} (one all-reduce per update)"]
        for n, lv in lvs.items()
    ]
    out = [{"title": title, "columns": columns, "rows": rows}]
    title = f"Gradient bytes all-reduced per optimizer step, counted over {m['ddp']['raw']['steps']} steps"
    columns = ["strategy", "DDP buckets", "level all-reduces", "total", "predicted", "all-reduce calls/step"]
    keys = ("ddp_buckets_per_step", "nested_own_per_step", "gradient_per_step")
    rows = [[LABELS[v], *(f"{m[v][k]:,.0f}" for k in keys), f"{p[v]:,.0f}"] for v in VARIANTS]
    rows = [row + [f"{m[v]['all_reduce_calls_per_step']:.3g}"] for row, v in zip(rows, VARIANTS, strict=True)]
    note = f"NestedDDP / DDP bytes: measured {ra['bytes_measured']:.4f}, predicted {ra['bytes_predicted']:.4f}"
    note += f" ({1 / ra['bytes_measured']:.2f}x fewer bytes; the presence flags are {flags:.1f} bytes of them per"
    note += f" step). Parameters after the counting runs: max |NestedDDP - DDP| = {r['max_abs_param_diff']:.2e}."
    out.append({"title": title, "columns": columns, "rows": rows, "note": note})
    title = f"Step time on rank 0 (ms; {t['ddp']['steps']} steps per strategy pooled over {a['rounds']} rounds)"
    rows = [[LABELS[v], *(f"{t[v][k]:.1f}" for k in ("median_ms", "p25_ms", "p75_ms", "mean_ms"))] for v in VARIANTS]
    rows = [[label, median, f"{p25}-{p75}", mean] for label, median, p25, p75, mean in rows]
    note = f"NestedDDP / DDP step time: median {ra['median_step_time']:.3f} (median of per-round ratios"
    note += f" {ra['median_of_round_ratios']:.3f}), mean {ra['mean_step_time']:.3f}."
    return out + [{"title": title, "columns": ["strategy", "median", "p25-p75", "mean"], "rows": rows, "note": note}]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__)
    parser.add_argument("--width", type=int, default=1024, help="the model's width W (1024)")
    for key, text in (
        ("rounds", "timed rounds"),
        ("steps", "timed steps per run"),
        ("warmup", "dropped steps per run"),
    ):
        parser.add_argument(f"--{key}", type=int, help=f"{text} (default {DEFAULTS[key]}; {QUICK[key]} with --quick)")
    parser.add_argument("--count-steps", type=int, help=f"steps of the counting runs ({DEFAULTS['count_steps']})")
    parser.add_argument("--verbose", action="store_true", help="let Lightning's output through (to stderr)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if min(args.rounds, args.steps, args.threads, args.count_steps) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps, --count-steps and --threads must be >= 1, --warmup >= 0")
    if args.count_steps % 16 or args.width % 4:
        parser.error("--count-steps must be a multiple of 16 (the slow period), --width a multiple of 4")
    started = time.perf_counter()
    env = environment(args.threads, backend="gloo", processes=2)
    report = report_header(TITLE, "benchmarks/ddp_comm.py", argv, vars(args), env)
    report["results"] = measure(args)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
