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
"""Token-axis Continuum Memory System vs a plain FFN of the same width: tokens/s and peak memory.

**Throughput.** Batch 4, sequence 1024, width ``D`` 256, hidden ``H = 4 D``, fp32 (``--dtype bf16``: autocast), two
chains (one level with chunk 64; three levels with chunks 16, 64, 256), four variants: ``ffn`` (``k`` pre-norm
residual FFN blocks, ``k`` = the number of levels), ``cms-static`` (``ContinuumMemory(in_context=False)``),
``cms-in-context`` (per-sample fast weights written every ``C`` tokens, backpropagated through the writes) and
``cms-in-context-firstorder`` (``differentiable_writes=False``); modes ``forward`` (``inference_mode``) and
``forward_backward`` (then ``output.sum().backward()``). Interleaved rounds (order reversed every round) of
``--warmup`` untimed and ``--iters`` timed calls; ratios to ``ffn`` pooled and per round.

Checked before timing (a failure raises): the static CMS, loaded into the FFN, gives the FFN's output; the in-context
variants give the static output on the first chunk and a different one after it; every level whose chunk fits has
written (fast weights moved, state position ``seq % C``); first-order and full writes give the same forward; a
backward reaches the value projections with both write modes.

**Peak memory vs chunk size.** Per chunk of ``--chunks-memory``, a one-level CMS runs one step in a fresh process
(``MALLOC_MMAP_THRESHOLD_=131072``, so that freed blocks leave the RSS): on CUDA ``max_memory_allocated`` minus the
allocation before the step, on CPU the peak RSS (``VmHWM`` after a ``/proc/self/clear_refs`` reset; ``ru_maxrss``
where that fails, see ``rss_peak_reset``) minus the RSS before it; next to it the analytic fast state kept for the
backward, ``ceil(S / C)`` per-sample weight sets of ``B (2 D H + H + D) 4`` bytes, and the fitted slope.

Running it::

    python benchmarks/cms.py --threads 1 --out benchmarks/results/cms.json     # ~7 minutes on a 2-core CPU
    python benchmarks/cms.py --quick --threads 1 --out /tmp/cms.json           # smoke run, about a minute
    python benchmarks/render.py cms                                             # the page
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from _common import (
    environment,
    interleaved,
    make_log,
    num,
    proc_status_kib,
    report_header,
    reset_peak_rss,
    save,
    summarize,
)
from torch import Tensor, nn

from nl_lightning.models import ContinuumMemory

TITLE = "Token-axis ContinuumMemory vs a plain FFN: throughput and peak memory"
SEED = 1234
VARIANTS = ("ffn", "cms-static", "cms-in-context", "cms-in-context-firstorder")
MODES = ("forward", "forward_backward")
IN_CONTEXT = (("cms-in-context", "forward_backward"), ("cms-in-context-firstorder", "forward_backward"),
              ("cms-in-context", "forward"))  # fmt: skip
DEFAULTS = {"batch": 4, "seq": 1024, "rounds": 5, "iters": 5, "warmup": 2,
            "chunks_memory": [16, 32, 64, 128, 256, 512, 1024]}  # fmt: skip
QUICK = {"batch": 2, "seq": 256, "rounds": 2, "iters": 2, "warmup": 1, "chunks_memory": [16, 64, 256]}
log = make_log("cms")
MALLOC_MMAP_THRESHOLD = "131072"  # pinned: glibc otherwise keeps freed large blocks in the heap (and the RSS)
Autocast = Callable[[], contextlib.AbstractContextManager]


class FFN(nn.Module):
    """``levels`` chained pre-norm residual FFN blocks ``x + Linear(GELU(Linear(RMSNorm(x))))``."""

    def __init__(self, dim: int, hidden: int, levels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.RMSNorm(dim), "fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
            for _ in range(levels)
        )

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = x + b["fc2"](F.gelu(b["fc1"](b["norm"](x))))
        return x


def hidden_width(dim: int, hidden_mult: float) -> int:
    return max(1, round(dim * hidden_mult))  # as ContinuumMemory computes it


def build(variant: str, chunks: Sequence[int], dim: int, hidden_mult: float, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    if variant == "ffn":
        return FFN(dim, hidden_width(dim, hidden_mult), len(chunks)).to(device).train()
    return ContinuumMemory(dim, list(chunks), hidden_mult=hidden_mult, in_context=variant != "cms-static",
                           differentiable_writes=variant == "cms-in-context").to(device).train()  # fmt: skip


def output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out  # in-context CMS: (y, state)


def setup(batch: int, seq: int, dim: int, device: torch.device, dtype: str) -> tuple[Tensor, Autocast]:
    """The seeded input and a factory of the forward's precision context (``torch.autocast`` to bf16 for bf16)."""
    x = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    return x, contextlib.nullcontext if dtype == "fp32" else lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def step(model: nn.Module, x: Tensor, mode: str, autocast: Autocast) -> None:
    """One forward (``inference_mode``) or one forward + ``output.sum().backward()``."""
    with torch.inference_mode(mode == "forward"), autocast():
        y = output(model, x)
    if mode != "forward":
        y.float().sum().backward()


def verify(models: dict[str, nn.Module], x: Tensor, chunks: Sequence[int]) -> dict[str, Any]:
    """Check that the variants compute what they claim (fp32, no autocast); raise on a failure."""
    full, first_order = models["cms-in-context"], models["cms-in-context-firstorder"]
    seq, first, failures = x.shape[1], min(chunks), []
    with torch.no_grad():
        y_ffn, y_static = models["ffn"](x), models["cms-static"](x)
        (y_full, state), (y_first, _) = full(x), first_order(x)
    failures += [f"{name} output shape {tuple(y.shape)} != input shape {tuple(x.shape)}"
                 for name, y in (("ffn", y_ffn), ("cms-static", y_static), ("cms-in-context", y_full))
                 if y.shape != x.shape]  # fmt: skip
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    diffs = {
        "static_vs_ffn_max_abs_diff": diff(y_static, y_ffn),
        "in_context_vs_static_first_chunk_max_abs_diff": diff(y_full[:, :first], y_static[:, :first]),
        "in_context_vs_static_after_first_chunk_max_abs_diff":
            diff(y_full[:, first:], y_static[:, first:]) if seq > first else None,
        "firstorder_vs_full_forward_max_abs_diff": diff(y_full, y_first),
    }  # fmt: skip
    for ok, text in ((torch.allclose(y_static, y_ffn, rtol=1e-5, atol=1e-5), "cms-static differs from the FFN with"
                      " the same weights"),
                     (torch.allclose(y_full[:, :first], y_static[:, :first], rtol=1e-5, atol=1e-5), "in-context first"
                      " chunk differs from the static output"),
                     (torch.allclose(y_full, y_first, rtol=1e-6, atol=1e-6), "first-order and full writes give"
                      " different forwards")):  # fmt: skip
        failures += [] if ok else [f"{text}: {diffs}"]
    if seq > first and not diffs["in_context_vs_static_after_first_chunk_max_abs_diff"] > 0:
        failures.append("in-context output after the first chunk equals the static output: nothing was read back")
    writes = []
    for i, (level, fast) in enumerate(zip(full.blocks, state.levels, strict=True)):
        params = (level.w1, level.b1, level.w2, level.b2)
        moved = max((w - p.detach()).abs().max().item() for w, p in zip(fast.weights, params, strict=True))
        due = seq // level.chunk_size
        writes.append({"level": i, "chunk": level.chunk_size, "writes": due, "fast_weight_change_max": moved,
                       "state_count": fast.count})  # fmt: skip
        if fast.count != seq % level.chunk_size:
            failures.append(f"level {i}: state position {fast.count}, expected {seq % level.chunk_size}")
        if due > 0 and not moved > 0:
            failures.append(f"level {i}: {due} writes due but the fast weights equal the parameters")
    if not any(w["writes"] for w in writes):
        failures.append(f"the sequence ({seq}) is shorter than every chunk size {list(chunks)}: nothing is written")
    grads: dict[str, Any] = {}
    for name, model in (("cms-in-context", full), ("cms-in-context-firstorder", first_order)):
        model.zero_grad(set_to_none=True)
        output(model, x).sum().backward()
        grads[name] = {f"{a}_grad_norm": sum(getattr(lv, a).grad.norm().item() for lv in model.blocks
                                             if getattr(lv, a).grad is not None) for a in ("value", "w1")}  # fmt: skip
        model.zero_grad(set_to_none=True)
        if not grads[name]["w1_grad_norm"] > 0 or not grads[name]["value_grad_norm"] > 0:
            failures.append(f"{name}: no gradient reaches the initial weights w1 or the value projections: {grads}")
    if failures:
        raise RuntimeError("verification failed:\n  " + "\n  ".join(failures))
    return {"passed": True, "output_shape": list(x.shape), **diffs, "writes": writes, "gradients": grads}


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` against ``base``: time ratio (> 1: slower) and throughput ratio (< 1: fewer tokens/s)."""
    ratio = other["median_ms"] / base["median_ms"]
    per_round = [o / b for b, o in zip(base["per_round_median_ms"], other["per_round_median_ms"], strict=True)]
    return {"time_ratio": ratio, "throughput_ratio": 1 / ratio, "per_round_time_ratios": per_round,
            "median_per_round_time_ratio": statistics.median(per_round),
            "cpu_time_ratio": other["cpu_median_ms"] / base["cpu_median_ms"]}  # fmt: skip


def bench_setting(chunks: list[int], args: Any, device: torch.device) -> dict[str, Any]:
    models = {v: build(v, chunks, args.dim, args.hidden_mult, device) for v in VARIANTS}
    with torch.no_grad():  # the FFN gets the CMS's (static) weights, so that both compute the same function
        for level, b in zip(models["cms-static"].blocks, models["ffn"].blocks, strict=True):
            for dst, src in zip(
                b.parameters(), (level.norm.weight, level.w1, level.b1, level.w2, level.b2), strict=True
            ):
                dst.copy_(src)
    for v in ("cms-in-context", "cms-in-context-firstorder"):  # the same MLP weights; static levels have no value
        result = models[v].load_state_dict(models["cms-static"].state_dict(), strict=False)
        if result.unexpected_keys or any(not key.endswith(".value") for key in result.missing_keys):
            raise RuntimeError(f"{v}: the static CMS's parameters do not fit: {result}")
    x, autocast = setup(args.batch, args.seq, args.dim, device, args.dtype)
    checks, tokens = verify(models, x, chunks), args.batch * args.seq

    def after() -> None:
        for model in models.values():
            model.zero_grad(set_to_none=True)
        synchronize(device)

    fns = {f"{v}/{m}": (lambda v=v, m=m: (step(models[v], x, m, autocast), synchronize(device))) for v in VARIANTS
           for m in MODES}  # fmt: skip
    label = f"{len(chunks)} level(s), chunks {chunks}"
    times = interleaved(fns, args.rounds, args.warmup, args.iters, label, after, log)
    variants: dict[str, Any] = {v: {} for v in VARIANTS}
    for key, rounds in times.items():
        v, m = key.split("/")
        s = summarize(rounds, tokens)
        variants[v][m] = {**s, "iqr_ms": s["p75_ms"] - s["p25_ms"], "tokens_per_s_p25": tokens / s["p75_ms"] * 1e3,
                          "tokens_per_s_p75": tokens / s["p25_ms"] * 1e3}  # fmt: skip
    pairs = [(f"{v} vs ffn", "ffn", v) for v in VARIANTS[1:]]
    pairs.append(("cms-in-context vs cms-in-context-firstorder", "cms-in-context-firstorder", "cms-in-context"))
    return {"chunk_sizes": chunks, "levels": len(chunks), "tokens_per_iteration": tokens,
            "parameters": {v: sum(p.numel() for p in models[v].parameters()) for v in VARIANTS},
            "verification": checks, "variants": variants,
            "comparisons": {m: {k: compare(variants[b][m], variants[o][m]) for k, b, o in pairs}
                            for m in MODES}}  # fmt: skip


def memory_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one step of one configuration; runs in a fresh process (``--_memory-probe``)."""
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model = build(cfg["variant"], cfg["chunks"], cfg["dim"], cfg["hidden_mult"], device)
    x, autocast = setup(cfg["batch"], cfg["seq"], cfg["dim"], device, cfg["dtype"])
    step(model, x[:1, : min(8, x.shape[1])], cfg["mode"], autocast)  # one-time allocations (kernels, autograd engine)
    model.zero_grad(set_to_none=True)
    gc.collect()
    t0 = time.perf_counter()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, x, cfg["mode"], autocast)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out = {"method": "torch.cuda.max_memory_allocated", "baseline_mib": base / 2**20, "peak_mib": peak / 2**20,
               "peak_increase_mib": (peak - base) / 2**20}  # fmt: skip
    else:  # ru_maxrss keeps the peak of exited threads, which the reset does not clear; VmHWM is reset
        reset = reset_peak_rss()
        base = proc_status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(model, x, cfg["mode"], autocast)
        peak = proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        out = {"method": "VmHWM (reset by /proc/self/clear_refs)" if reset else "ru_maxrss", "rss_peak_reset": reset,
               "baseline_mib": base / 1024, "peak_mib": peak / 1024, "peak_increase_mib": (peak - base) / 1024,
               "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    return {**out, "step_s": time.perf_counter() - t0}


def run_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)}
    env |= {} if cfg["threads"] is None else {"OMP_NUM_THREADS": str(cfg["threads"])}
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-probe", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def bench_memory(args: Any, device: torch.device) -> dict[str, Any]:
    hidden = hidden_width(args.dim, args.hidden_mult)
    fast_state_mib = lambda states: args.batch * (2 * args.dim * hidden + hidden + args.dim) * 4 * states / 2**20  # noqa: E731
    base = {k: getattr(args, k) for k in ("batch", "seq", "dim", "hidden_mult", "threads", "dtype")}
    base["device"] = str(device)
    probes = {f"{v}/{m}/{c}": {**base, "variant": v, "mode": m, "chunks": [c]}
              for c in args.chunks_memory for v, m in IN_CONTEXT}  # fmt: skip
    probes |= {f"{v}/{m}": {**base, "variant": v, "mode": m, "chunks": args.chunks_memory[:1]}
               for v in ("ffn", "cms-static") for m in MODES}  # fmt: skip
    jobs = args.memory_jobs if args.memory_jobs is not None else (2 if device.type == "cpu" else 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(probes, pool.map(run_probe, probes.values()), strict=True))
    sweep, fits = {}, {}
    for v, m in IN_CONTEXT:
        rows = [{"chunk": c, "chunk_states": math.ceil(args.seq / c), **results[f"{v}/{m}/{c}"]}
                for c in args.chunks_memory]  # fmt: skip
        for r in rows if m == "forward_backward" else ():
            r["analytic_fast_state_mib"] = fast_state_mib(r["chunk_states"])
        sweep[f"{v}/{m}"], ok = rows, [r for r in rows if "peak_increase_mib" in r]
        fits[f"{v}/{m}"] = {"measured_mib_per_chunk_state": slope([r["chunk_states"] for r in ok],
                                                                  [r["peak_increase_mib"] for r in ok])}  # fmt: skip
    return {
        "method": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS minus RSS before the step")
        + ", fresh process",
        "probe_jobs": jobs,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD),
        "analytic_mib_per_chunk_state": fast_state_mib(1),
        "analytic_formula": "B * (2*D*H + H + D) * 4 bytes per chunk state, ceil(S / C) states kept for backward",
        "sweep": sweep, "fits": fits,
        "references": {f"{v}/{m}": results[f"{v}/{m}"] for v in ("ffn", "cms-static") for m in MODES},
        "note": "forward runs under torch.inference_mode, where both write modes run the same code; forward_backward"
        " keeps one set of per-sample fast weights per chunk for the backward pass",
    }  # fmt: skip


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Throughput per chain, variant and mode; the checks run before timing; peak memory against chunk size."""
    s, a, out, mem = report["setting"], report["args"], [], report.get("memory")
    chains = {f"{r['levels']} ({', '.join(map(str, r['chunk_sizes']))})": r
              for r in report.get("throughput", {}).values()}  # fmt: skip
    rows = [[chain, v, m, num(r["median_ms"], ".1f"), f"{num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')}",
             num(r["tokens_per_s"], ",.0f"),
             "1" if c is None else f"{c['time_ratio']:.2f} ({c['median_per_round_time_ratio']:.2f})"]
            for chain, res in chains.items() for v in VARIANTS for m in MODES
            for r, c in [(res["variants"][v][m], res["comparisons"][m].get(f"{v} vs ffn"))]]  # fmt: skip
    if rows:
        out.append({"title": "Throughput", "rows": rows,
                    "note": f"Batch {s['batch']}, sequence {s['seq']}, D {s['dim']}, H {s['hidden']}, {s['dtype']};"
                    f" {a['rounds']} interleaved rounds of {a['warmup']} untimed + {a['iters']} timed calls.",
                    "columns": ["levels (chunks)", "variant", "mode", "median ms", "IQR ms", "tokens/s",
                                "time × ffn (median of rounds)"]})  # fmt: skip
        out.append({"title": "Checks before timing (max abs differences)",
                    "rows": [[chain, c["passed"], *(num(c[k], ".2g") for k in list(c)[2:6]),
                              ", ".join(f"C={w['chunk']}: {w['writes']}" for w in c["writes"])]
                             for chain, res in chains.items() for c in [res["verification"]]],
                    "columns": ["levels (chunks)", "passed", "static vs ffn", "in-context vs static, 1st chunk",
                                "after 1st chunk (must differ)", "first-order vs full", "writes"]})  # fmt: skip
    if mem:
        rows = [[key, r["chunk"], r["chunk_states"], num(r.get("peak_increase_mib"), ".1f"),
                 num(r.get("analytic_fast_state_mib"), ".1f")]
                for key, sweep in mem["sweep"].items() for r in sweep]  # fmt: skip
        rows += [[key, None, None, num(r.get("peak_increase_mib"), ".1f"), None]
                 for key, r in mem["references"].items()]  # fmt: skip
        fits = "; ".join(f"{k} {num(f['measured_mib_per_chunk_state'], '.2f')}" for k, f in mem["fits"].items())
        out.append({"title": f"Peak memory increase of one step ({mem['method']})", "rows": rows,
                    "columns": ["variant/mode", "chunk", "chunk states", "measured MiB", "analytic fast state MiB"],
                    "note": f"Analytic: {mem['analytic_formula']} = {mem['analytic_mib_per_chunk_state']:.2f} MiB per"
                    f" state; fitted MiB per chunk state: {fits}. MALLOC_MMAP_THRESHOLD_"
                    f"={mem['malloc_mmap_threshold']}."})  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", help="write the JSON here (default: stdout)")
    add("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's setting)")
    for key in ("batch", "seq", "rounds", "iters", "warmup"):
        add(f"--{key}", type=int, help=f"{DEFAULTS[key]}; {QUICK[key]} with --quick")
    add("--chunks-memory", type=int, nargs="+", help=f"memory sweep ({DEFAULTS['chunks_memory']})")
    add("--dim", type=int, default=256, help="width D (256)")
    add("--hidden-mult", type=float, default=4.0, help="hidden width H = round(D * mult) (4)")
    add("--levels", type=int, nargs="+", choices=(1, 3), default=[1, 3], help="chains to time")
    add("--chunk", type=int, default=64, help="chunk size of the one-level chain (64)")
    add("--chain-chunks", type=int, nargs=3, default=[16, 64, 256], help="of the 3-level chain")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: torch.autocast")
    add("--skip", nargs="+", choices=("throughput", "memory"), default=[], help="parts to skip")
    add("--memory-jobs", type=int, help="memory probes at once (2 on CPU, 1 elsewhere)")
    add("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = memory_probe(json.loads(args.memory_probe))
        print(json.dumps(result))
        return result
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.quick:
        args.chunks_memory = [c for c in args.chunks_memory if c <= args.seq] or [args.seq]
    if min(args.batch, args.seq, args.dim, args.chunk, *args.chain_chunks, *args.chunks_memory, args.rounds,
           args.iters) < 1 or args.warmup < 0:  # fmt: skip
        parser.error(f"sizes, --rounds and --iters must be >= 1 and --warmup >= 0; got {vars(args)}")
    args.levels, args.device = sorted(set(args.levels)), args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, started = torch.device(args.device), time.perf_counter()
    extra = {"device": str(device)} | ({"device_name": torch.cuda.get_device_name()} if device.type == "cuda" else {})
    args_out = {k: v for k, v in vars(args).items() if k != "memory_probe"}
    report = report_header(TITLE, "benchmarks/cms.py", argv, args_out, environment(torch.get_num_threads(), **extra))
    report["setting"] = {"batch": args.batch, "seq": args.seq, "dim": args.dim,
                         "hidden": hidden_width(args.dim, args.hidden_mult), "dtype": args.dtype,
                         "tokens_per_iteration": args.batch * args.seq,
                         "inner_lr": "ContinuumMemory default, 0.01 * 0.3**level", "reduction": "mean"}  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):
        if "throughput" not in args.skip:
            chains = {1: [args.chunk], 3: list(args.chain_chunks)}
            report["throughput"] = {f"levels_{k}": bench_setting(chains[k], args, device) for k in args.levels}
            report["summary"] = {chain: {m: {v: {
                "tokens_per_s": res["variants"][v][m]["tokens_per_s"],
                "time_ratio_vs_ffn": res["comparisons"][m].get(f"{v} vs ffn", {"time_ratio": 1.0})["time_ratio"]}
                for v in VARIANTS} for m in MODES} for chain, res in report["throughput"].items()}  # fmt: skip
        if "memory" not in args.skip:
            report["memory"] = bench_memory(args, device)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
