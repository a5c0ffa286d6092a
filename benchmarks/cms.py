"""Token-axis Continuum Memory System vs a plain FFN of the same width: tokens/s and peak memory, printed as JSON.

What is measured
----------------
**Throughput.** For one setting (default: batch 4, sequence 1024, width ``D`` 256, hidden ``H = 4 D``, fp32) and
two chains (one level with chunk 64, and three levels with chunks 16, 64, 256; ``--levels`` picks), four variants of
the same widths, all in this one process:

- ``ffn``: ``k`` chained plain pre-norm residual FFN blocks, ``x + Linear(GELU(Linear(RMSNorm(x))))`` (``nn.Linear``,
  ``nn.RMSNorm``), with ``k`` the number of CMS levels; the baseline;
- ``cms-static``: :class:`~nl_lightning.models.ContinuumMemory` with ``in_context=False``, the same computation through
  the CMS code (it should cost about what ``ffn`` costs);
- ``cms-in-context``: ``in_context=True`` with ``differentiable_writes=True`` (the default): per-sample fast weights,
  written every ``C`` tokens, backpropagated through the writes;
- ``cms-in-context-firstorder``: the same with ``differentiable_writes=False`` (writes computed without a graph).

Each variant is timed in two modes: ``forward`` (one forward pass under ``torch.inference_mode()``) and
``forward_backward`` (forward, then ``output.sum().backward()``; gradients are reset to ``None`` outside the timed
region). ``tokens/s = batch * seq / seconds``. The variants are interleaved: in every round each (variant, mode) runs
``--warmup`` untimed iterations and then ``--iters`` timed ones, and the order of the whole round is reversed from one
round to the next (ABCD / DCBA), so drift of the machine hits every variant alike. The timed iterations are pooled over
the rounds; medians, quartiles and IQR are reported, plus each variant's ratio to ``ffn`` (pooled and the median of
the per-round ratios) and the cost of full over first-order writes.

Before anything is timed, the setting is checked: the static CMS, loaded into the FFN, gives the FFN's output (same
shape, same values); the in-context variants, with the same parameters, give the static output on the first chunk and
a different one after it; every level whose chunk fits in the sequence has written (its fast weights in the returned
state differ from its parameters, and the state's position is ``seq % C``); first-order and full writes give the same
forward output; and a backward pass reaches the value projections with both write modes (first-order writes keep the
targets' graph). A failed check raises.

**Peak memory vs chunk size.** For each chunk size of ``--chunks-memory`` (default 16 ... 1024), a one-level token-axis
CMS runs one ``forward_backward`` (both write modes) and one ``forward`` (``inference_mode``, where both write modes run
the same code), each in a fresh Python process. On CUDA the figure is ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the step (peak stats reset). On CPU it is the peak resident set size of the process during
the step minus its resident set size before it: the peak is reset just before the step (``/proc/self/clear_refs``,
Linux) and read from ``VmHWM`` in ``/proc/self/status`` (``ru_maxrss`` is recorded too, but it also keeps the peak of
exited threads, which the reset does not clear); where the reset is not possible the figure is ``ru_maxrss`` and the
baseline is the peak so far (after imports, model and input), which can hide part of the increase (``rss_peak_reset``
in the JSON says which). The probes run with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set already): by default
glibc raises that threshold whenever a large block is freed, after which freed blocks stay in the heap and in the RSS,
and the peak would count that slack too (about 7 MiB per chunk state instead of 4 in the quick setting).
A tiny untimed step runs first so that one-time allocations stay out of the figure. ``ffn`` and ``cms-static`` are
probed the same way as references. Next to each figure stands an analytic estimate of the fast state the backward pass
keeps: per-sample weights of ``B * (2 D H + H + D) * 4`` bytes per level, one per chunk read, ``ceil(S / C)`` of them;
a least-squares slope of the measured peak against ``ceil(S / C)`` is given to compare with it.

Running it
----------
::

    python benchmarks/cms.py --threads 1 --out /tmp/cms.json     # default setting, ~7 minutes on a 2-core CPU
    python benchmarks/cms.py --quick                               # smoke run, about a minute
    python benchmarks/cms.py --levels 1 --skip memory --rounds 9   # throughput of the one-level chain only

Only the JSON goes to stdout; progress goes to stderr. The script is not part of the test suite: speed and memory are
measured here, never asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from _common import proc_status_kib, quartiles, report_header, reset_peak_rss
from torch import Tensor, nn

import nl_lightning
from nl_lightning.models import ContinuumMemory

SEED = 1234
VARIANTS: tuple[str, ...] = ("ffn", "cms-static", "cms-in-context", "cms-in-context-firstorder")
MODES: tuple[str, ...] = ("forward", "forward_backward")
DEFAULTS: dict[str, Any] = {
    "batch": 4,
    "seq": 1024,
    "rounds": 5,
    "iters": 5,
    "warmup": 2,
    "chunks_memory": [16, 32, 64, 128, 256, 512, 1024],
}
# glibc raises its mmap threshold each time a large block is freed, after which freed blocks stay in the heap and
# count in the RSS; pinning it (which turns that off) makes the peak RSS of a probe follow the live bytes.
MALLOC_MMAP_THRESHOLD = "131072"
QUICK: dict[str, Any] = {"batch": 2, "seq": 256, "rounds": 2, "iters": 2, "warmup": 1, "chunks_memory": [16, 64, 256]}


# ---------------------------------------------------------------------------------------------------- models
class FFNBlock(nn.Module):
    """A plain pre-norm residual FFN block: ``x + Linear(GELU(Linear(RMSNorm(x))))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class FFN(nn.Module):
    """``levels`` chained :class:`FFNBlock`, the counterpart of a ``levels``-level CMS chain."""

    def __init__(self, dim: int, hidden: int, levels: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(FFNBlock(dim, hidden) for _ in range(levels)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def hidden_width(dim: int, hidden_mult: float) -> int:
    return max(1, round(dim * hidden_mult))  # as ContinuumMemory computes it


def build(variant: str, chunks: Sequence[int], dim: int, hidden_mult: float, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    if variant == "ffn":
        model: nn.Module = FFN(dim, hidden_width(dim, hidden_mult), len(chunks))
    else:
        model = ContinuumMemory(
            dim,
            list(chunks),
            hidden_mult=hidden_mult,
            in_context=variant != "cms-static",
            differentiable_writes=variant == "cms-in-context",
        )
    return model.to(device).train()


@torch.no_grad()
def copy_cms_into_ffn(cms: ContinuumMemory, ffn: FFN) -> None:
    """Give the FFN the CMS's (static) weights, so that both compute the same function."""
    for level, block in zip(cms.blocks, ffn.blocks, strict=True):
        block.norm.weight.copy_(level.norm.weight)
        block.fc1.weight.copy_(level.w1)
        block.fc1.bias.copy_(level.b1)
        block.fc2.weight.copy_(level.w2)
        block.fc2.bias.copy_(level.b2)


def output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out  # in-context CMS: (y, state)


def make_input(batch: int, seq: int, dim: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(batch, seq, dim, generator=gen).to(device)


def precision(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's precision context: nothing for fp32, ``torch.autocast`` to bf16 for bf16."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def step(model: nn.Module, x: Tensor, mode: str, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """One forward (``inference_mode``) or one forward + ``output.sum().backward()``."""
    if mode == "forward":
        with torch.inference_mode(), autocast():
            output(model, x)
        return
    with autocast():
        y = output(model, x)
    y.float().sum().backward()


# ---------------------------------------------------------------------------------------------------- verification
def verify(models: dict[str, nn.Module], x: Tensor, chunks: Sequence[int]) -> dict[str, Any]:
    """Check that the variants compute what they claim (fp32, no autocast); raise on a failure."""
    ffn, static = models["ffn"], models["cms-static"]
    full, first_order = models["cms-in-context"], models["cms-in-context-firstorder"]
    seq = x.shape[1]
    failures: list[str] = []
    with torch.no_grad():
        y_ffn, y_static = ffn(x), static(x)
        y_full, state_full = full(x)
        y_first, state_first = first_order(x)
    for name, y in (("ffn", y_ffn), ("cms-static", y_static), ("cms-in-context", y_full)):
        if tuple(y.shape) != tuple(x.shape):
            failures.append(f"{name} output shape {tuple(y.shape)} != input shape {tuple(x.shape)}")
    static_vs_ffn = (y_static - y_ffn).abs().max().item()
    if not torch.allclose(y_static, y_ffn, rtol=1e-5, atol=1e-5):
        failures.append(f"cms-static differs from the FFN with the same weights (max abs diff {static_vs_ffn:.3g})")
    first = min(chunks)
    first_chunk_diff = (y_full[:, :first] - y_static[:, :first]).abs().max().item()
    if not torch.allclose(y_full[:, :first], y_static[:, :first], rtol=1e-5, atol=1e-5):
        failures.append(f"in-context first chunk differs from the static output (max abs diff {first_chunk_diff:.3g})")
    later_diff = (y_full[:, first:] - y_static[:, first:]).abs().max().item() if seq > first else None
    if later_diff is not None and not later_diff > 0:
        failures.append("in-context output after the first chunk equals the static output: nothing was read back")
    full_vs_first = (y_full - y_first).abs().max().item()
    if not torch.allclose(y_full, y_first, rtol=1e-6, atol=1e-6):
        failures.append(f"first-order and full writes give different forwards (max abs diff {full_vs_first:.3g})")
    writes = []
    for i, (level, fast) in enumerate(zip(full.blocks, state_full.levels, strict=True)):
        params = (level.w1, level.b1, level.w2, level.b2)
        moved = max((w - p.detach()).abs().max().item() for w, p in zip(fast.weights, params, strict=True))
        expected = seq // level.chunk_size
        writes.append(
            {
                "level": i,
                "chunk": level.chunk_size,
                "writes": expected,
                "fast_weight_change_max": moved,
                "state_count": fast.count,
            }
        )
        if fast.count != seq % level.chunk_size:
            failures.append(f"level {i}: state position {fast.count}, expected {seq % level.chunk_size}")
        if expected > 0 and not moved > 0:
            failures.append(f"level {i}: {expected} writes due but the fast weights equal the parameters")
    if not any(w["writes"] for w in writes):
        failures.append(f"the sequence ({seq}) is shorter than every chunk size {list(chunks)}: nothing is written")
    del state_first
    grads: dict[str, Any] = {}
    for name, model in (("cms-in-context", full), ("cms-in-context-firstorder", first_order)):
        model.zero_grad(set_to_none=True)
        output(model, x).sum().backward()
        value = [lvl.value.grad for lvl in model.blocks]
        value_norm = sum(g.norm().item() for g in value if g is not None)
        w1_norm = sum(lvl.w1.grad.norm().item() for lvl in model.blocks if lvl.w1.grad is not None)
        grads[name] = {"value_grad_norm": value_norm, "w1_grad_norm": w1_norm}
        model.zero_grad(set_to_none=True)
        if not w1_norm > 0:
            failures.append(f"{name}: no gradient reaches the initial weights w1")
    if not grads["cms-in-context"]["value_grad_norm"] > 0:
        failures.append("cms-in-context: no gradient reaches the value projections through the writes")
    if not grads["cms-in-context-firstorder"]["value_grad_norm"] > 0:
        failures.append("cms-in-context-firstorder: no gradient reaches the value projections through the targets")
    if failures:
        raise RuntimeError("verification failed:\n  " + "\n  ".join(failures))
    return {
        "passed": True,
        "output_shape": list(x.shape),
        "static_vs_ffn_max_abs_diff": static_vs_ffn,
        "in_context_vs_static_first_chunk_max_abs_diff": first_chunk_diff,
        "in_context_vs_static_after_first_chunk_max_abs_diff": later_diff,
        "firstorder_vs_full_forward_max_abs_diff": full_vs_first,
        "writes": writes,
        "gradients": grads,
    }


# ---------------------------------------------------------------------------------------------------- throughput


def summarize(rounds: list[list[tuple[float, float]]], tokens: int) -> dict[str, Any]:
    """Pooled statistics of one (variant, mode): ``rounds`` holds the timed ``(wall, cpu)`` seconds of each round."""
    wall = [w for r in rounds for w, _ in r]
    p25, med, p75 = quartiles(wall)
    return {
        "median_ms": round(med * 1e3, 3),
        "p25_ms": round(p25 * 1e3, 3),
        "p75_ms": round(p75 * 1e3, 3),
        "iqr_ms": round((p75 - p25) * 1e3, 3),
        "tokens_per_s": round(tokens / med, 1),
        "tokens_per_s_p25": round(tokens / p75, 1),  # the slow quartile of the times is the low one of the rates
        "tokens_per_s_p75": round(tokens / p25, 1),
        "iterations": len(wall),
        "per_round_median_ms": [round(statistics.median(w for w, _ in r) * 1e3, 3) for r in rounds],
        "cpu_median_ms": round(statistics.median(c for r in rounds for _, c in r) * 1e3, 3),
    }


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` against ``base``: time ratio (> 1: slower) and throughput ratio (< 1: fewer tokens/s)."""
    ratio = other["median_ms"] / base["median_ms"]
    per_round = [o / b for b, o in zip(base["per_round_median_ms"], other["per_round_median_ms"], strict=True)]
    return {
        "time_ratio": round(ratio, 4),
        "throughput_ratio": round(1 / ratio, 4),
        "median_per_round_time_ratio": round(statistics.median(per_round), 4),
        "per_round_time_ratios": [round(r, 4) for r in per_round],
        "cpu_time_ratio": round(other["cpu_median_ms"] / base["cpu_median_ms"], 4),
    }


def bench_setting(chunks: list[int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    label = f"{len(chunks)} level(s), chunks {chunks}"
    models = {v: build(v, chunks, args.dim, args.hidden_mult, device) for v in VARIANTS}
    copy_cms_into_ffn(models["cms-static"], models["ffn"])
    for v in ("cms-in-context", "cms-in-context-firstorder"):
        # the same MLP weights; a static level may have no value projection (the in-context ones keep their identity)
        result = models[v].load_state_dict(models["cms-static"].state_dict(), strict=False)
        if result.unexpected_keys or any(not key.endswith(".value") for key in result.missing_keys):
            raise RuntimeError(f"{v}: the static CMS's parameters do not fit: {result}")
    x = make_input(args.batch, args.seq, args.dim, device)
    print(f"[cms] {label}: verifying", file=sys.stderr, flush=True)
    checks = verify(models, x, chunks)
    autocast = precision(device, args.dtype)
    tokens = args.batch * args.seq
    pairs = [(v, m) for v in VARIANTS for m in MODES]

    def run(variant: str, mode: str, n: int) -> list[tuple[float, float]]:
        model, out = models[variant], []
        for _ in range(n):
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            step(model, x, mode, autocast)
            synchronize(device)
            out.append((time.perf_counter() - t0, time.process_time() - c0))
            model.zero_grad(set_to_none=True)
        return out

    for v, m in pairs:  # untimed pre-warm of every variant and mode
        run(v, m, 1)
    times: dict[tuple[str, str], list[list[tuple[float, float]]]] = {p: [] for p in pairs}
    for r in range(args.rounds):
        for v, m in pairs if r % 2 == 0 else pairs[::-1]:
            gc.collect()
            times[(v, m)].append(run(v, m, args.warmup + args.iters)[args.warmup :])
        med = {f"{v}/{m}": f"{statistics.median(w for w, _ in times[(v, m)][-1]) * 1e3:.0f}" for v, m in pairs}
        print(f"[cms] {label} round {r + 1}/{args.rounds}: median ms {med}", file=sys.stderr, flush=True)
    variants = {v: {m: summarize(times[(v, m)], tokens) for m in MODES} for v in VARIANTS}
    comparisons = {
        m: {
            **{f"{v} vs ffn": compare(variants["ffn"][m], variants[v][m]) for v in VARIANTS[1:]},
            "cms-in-context vs cms-in-context-firstorder": compare(
                variants["cms-in-context-firstorder"][m], variants["cms-in-context"][m]
            ),
        }
        for m in MODES
    }
    return {
        "chunk_sizes": chunks,
        "levels": len(chunks),
        "parameters": {v: sum(p.numel() for p in models[v].parameters()) for v in VARIANTS},
        "tokens_per_iteration": tokens,
        "verification": checks,
        "variants": variants,
        "comparisons": comparisons,
    }


# ---------------------------------------------------------------------------------------------------- memory


def memory_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one step of one configuration; runs in a fresh process (``--_memory-probe``)."""
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model = build(cfg["variant"], cfg["chunks"], cfg["dim"], cfg["hidden_mult"], device)
    x = make_input(cfg["batch"], cfg["seq"], cfg["dim"], device)
    autocast = precision(device, cfg["dtype"])
    step(model, x[:1, : min(8, x.shape[1])], cfg["mode"], autocast)  # one-time allocations (kernels, autograd engine)
    model.zero_grad(set_to_none=True)
    gc.collect()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, x, cfg["mode"], autocast)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(method="torch.cuda.max_memory_allocated", baseline_mib=base / 2**20, peak_mib=peak / 2**20)
        out["peak_increase_mib"] = (peak - base) / 2**20
    else:
        # ru_maxrss also keeps the peak of exited threads (here: one reached during the imports), which the reset
        # does not clear; the memory map's own high-water mark (VmHWM) is reset, so it is read where that worked.
        reset = reset_peak_rss()
        base = proc_status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(model, x, cfg["mode"], autocast)
        peak = proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        method = "VmHWM (reset by /proc/self/clear_refs)" if reset else "ru_maxrss"
        out.update(method=method, rss_peak_reset=reset, baseline_mib=base / 1024, peak_mib=peak / 1024)
        out["peak_increase_mib"] = (peak - base) / 1024
        out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["step_s"] = time.perf_counter() - t0
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def fast_state_mib(batch: int, dim: int, hidden: int, states: int) -> float:
    """``states`` per-sample fast-weight sets of one level: ``B * (2 D H + H + D)`` fp32 values each."""
    return batch * (2 * dim * hidden + hidden + dim) * 4 * states / 2**20


def _run_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    if cfg["threads"] is not None:
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-probe", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def bench_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    hidden = hidden_width(args.dim, args.hidden_mult)
    base = {k: getattr(args, k) for k in ("batch", "seq", "dim", "hidden_mult", "threads", "dtype")}
    base["device"] = str(device)
    probes: list[tuple[str, dict[str, Any]]] = []
    for c in args.chunks_memory:
        for variant, mode in (
            ("cms-in-context", "forward_backward"),
            ("cms-in-context-firstorder", "forward_backward"),
            ("cms-in-context", "forward"),
        ):
            probes.append((f"{variant}/{mode}/{c}", {**base, "variant": variant, "mode": mode, "chunks": [c]}))
    ref_chunk = args.chunks_memory[0]
    for variant in ("ffn", "cms-static"):
        for mode in MODES:
            probes.append((f"{variant}/{mode}", {**base, "variant": variant, "mode": mode, "chunks": [ref_chunk]}))
    jobs = args.memory_jobs if args.memory_jobs is not None else (2 if device.type == "cpu" else 1)
    results: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_run_probe, cfg): key for key, cfg in probes}
        for fut in concurrent.futures.as_completed(futures):
            key = futures[fut]
            results[key] = fut.result()
            shown = results[key].get("peak_increase_mib", results[key].get("error"))
            print(f"[cms] memory {key}: peak increase {shown} MiB", file=sys.stderr, flush=True)
    sweep: dict[str, list[dict[str, Any]]] = {}
    fits: dict[str, Any] = {}
    for variant, mode in (
        ("cms-in-context", "forward_backward"),
        ("cms-in-context-firstorder", "forward_backward"),
        ("cms-in-context", "forward"),
    ):
        key = f"{variant}/{mode}"
        rows = []
        for c in args.chunks_memory:
            states = math.ceil(args.seq / c)
            row = {"chunk": c, "chunk_states": states, **results[f"{key}/{c}"]}
            if mode == "forward_backward":
                row["analytic_fast_state_mib"] = round(fast_state_mib(args.batch, args.dim, hidden, states), 3)
            rows.append(row)
        sweep[key] = rows
        ok = [r for r in rows if "peak_increase_mib" in r]
        fit = slope([r["chunk_states"] for r in ok], [r["peak_increase_mib"] for r in ok])
        fits[key] = {"measured_mib_per_chunk_state": None if fit is None else round(fit, 3)}
    per_state = fast_state_mib(args.batch, args.dim, hidden, 1)
    return {
        "method": (
            "torch.cuda.max_memory_allocated, fresh process"
            if device.type == "cuda"
            else "peak RSS minus RSS before the step, fresh process"
        ),
        "probe_jobs": jobs,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD),
        "analytic_mib_per_chunk_state": round(per_state, 3),
        "analytic_formula": "B * (2*D*H + H + D) * 4 bytes per chunk state, ceil(S / C) states kept for backward",
        "sweep": sweep,
        "fits": fits,
        "references": {f"{v}/{m}": results[f"{v}/{m}"] for v in ("ffn", "cms-static") for m in MODES},
        "note": (
            "forward runs under torch.inference_mode, where both write modes run the same code; forward_backward "
            "keeps one set of per-sample fast weights per chunk for the backward pass"
        ),
    }


# ---------------------------------------------------------------------------------------------------- driver
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, help=f"batch size (default {DEFAULTS['batch']}, quick {QUICK['batch']})")
    parser.add_argument("--seq", type=int, help=f"sequence length (default {DEFAULTS['seq']}, quick {QUICK['seq']})")
    parser.add_argument("--dim", type=int, default=256, help="width D (default 256)")
    parser.add_argument("--hidden-mult", type=float, default=4.0, help="hidden width H = round(D * mult) (default 4)")
    parser.add_argument(
        "--levels", type=int, nargs="+", choices=(1, 3), default=[1, 3], help="chains to time: 1 and/or 3 levels"
    )
    parser.add_argument("--chunk", type=int, default=64, help="chunk size of the one-level chain (default 64)")
    parser.add_argument(
        "--chain-chunks", type=int, nargs=3, default=[16, 64, 256], help="chunk sizes of the 3-level chain"
    )
    parser.add_argument(
        "--chunks-memory", type=int, nargs="+", help=f"memory sweep chunk sizes (default {DEFAULTS['chunks_memory']})"
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})")
    parser.add_argument("--iters", type=int, help=f"timed iterations per round (default {DEFAULTS['iters']})")
    parser.add_argument("--warmup", type=int, help=f"untimed iterations per round (default {DEFAULTS['warmup']})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's setting)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: torch.autocast (default fp32)")
    parser.add_argument("--skip", nargs="+", choices=("throughput", "memory"), default=[], help="parts to skip")
    parser.add_argument("--memory-jobs", type=int, help="memory probes run at once (default 2 on CPU, 1 elsewhere)")
    parser.add_argument("--out", help="also write the JSON to this path")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given explicitly")
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe is not None:
        return args
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.chunks_memory = [c for c in args.chunks_memory if c <= args.seq] or [args.seq]
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("need --rounds >= 1, --iters >= 1 and --warmup >= 0")
    if min([args.batch, args.seq, args.dim, args.chunk, *args.chain_chunks, *args.chunks_memory]) < 1:
        parser.error("sizes must be >= 1")
    args.levels = sorted(set(args.levels))
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nl_lightning": nl_lightning.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_probe is not None:
        with stdout_to_stderr():
            result = memory_probe(json.loads(args.memory_probe))
        print(json.dumps(result))
        return result
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    hidden = hidden_width(args.dim, args.hidden_mult)
    report = report_header(
        "token-axis ContinuumMemory vs plain FFN: throughput and peak memory",
        "benchmarks/cms.py",
        argv,
        {k: v for k, v in vars(args).items() if k != "memory_probe"},
        environment(device),
    )
    report |= {
        "setting": {
            "batch": args.batch,
            "seq": args.seq,
            "dim": args.dim,
            "hidden": hidden,
            "dtype": args.dtype,
            "tokens_per_iteration": args.batch * args.seq,
            "inner_lr": "ContinuumMemory default, 0.01 * 0.3**level",
            "reduction": "mean",
        },
    }
    with stdout_to_stderr():
        if "throughput" not in args.skip:
            chains = {1: [args.chunk], 3: list(args.chain_chunks)}
            report["throughput"] = {f"levels_{k}": bench_setting(chains[k], args, device) for k in args.levels}
            report["summary"] = {
                setting: {
                    mode: {
                        v: {
                            "tokens_per_s": res["variants"][v][mode]["tokens_per_s"],
                            "time_ratio_vs_ffn": (
                                1.0 if v == "ffn" else res["comparisons"][mode][f"{v} vs ffn"]["time_ratio"]
                            ),
                        }
                        for v in VARIANTS
                    }
                    for mode in MODES
                }
                for setting, res in report["throughput"].items()
            }
        if "memory" not in args.skip:
            report["memory"] = bench_memory(args, device)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
