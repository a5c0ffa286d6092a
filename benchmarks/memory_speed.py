"""Speed of our Titans NeuralMemory against titans-pytorch's, and of a Hope training step against Transformer++.

Two parts (``--parts``), every number measured in this process; the sha256 of the measured sources is in the JSON.

Part 1, ``memory``: ``nl_lightning`` ``NeuralMemory`` vs ``titans-pytorch`` ``NeuralMemory``
----------------------------------------------------------------------------------------------
Batch 4, sequence 1024, width 256, 4 heads, chunk 64, a depth-2 memory MLP with hidden width 2 x the head width,
fp32 on CPU:

- ``ours``: ``nl_lightning.models.neural_memory.NeuralMemory(256, heads=4, chunk_size=64, depth=2, expansion=2.0)``;
- ``titans-pytorch``: ``titans_pytorch.NeuralMemory(dim=256, dim_head=64, heads=4, chunk_size=64,
  default_model_kwargs=dict(depth=2, expansion_factor=2.0))``. ``dim_head=64`` is passed so that each head's memory
  has our shape (64 -> 128 -> 64); titans-pytorch's default ``dim_head`` is ``dim``, i.e. four 256-wide memories (a
  different, ~16x larger inner problem). That default is also timed, on fewer iterations and not interleaved, as
  ``titans-pytorch (dim_head=dim)``, for reference only (``--skip-default-head`` leaves it out).

Both modules see the same input ``x`` (normal, seeded). Modes: ``forward_backward`` (forward from a fresh state, then
``y.sum().backward()``; gradients reset outside the timed region), the figure the target is stated in, and
``forward`` (under ``torch.inference_mode()``). Tokens/s = ``batch * seq / seconds``. The variants are interleaved:
each round runs ``--warmup`` untimed and ``--iters`` timed iterations of every (variant, mode), and the order is
reversed from one round to the next (ABBA), so drift of a shared machine hits both alike; medians over the pooled
timed iterations, per-round medians and the ratio ``ours / titans-pytorch`` of tokens/s (> 1: ours is faster) are
reported. Parameter counts (all parameters, and those that receive a gradient) and the memory-MLP shapes of both are
recorded. The two modules do **not** compute the same function; the differences found in their code are listed in
the report (``DIFFERENCES``), the main one being where the inner gradient is taken: titans-pytorch 0.5.5 takes every
chunk's gradient at the weights the call started from (all chunks in parallel, momentum and forgetting then scanned
over the chunks), ours at the running memory at the start of each chunk (one sequential step per chunk).

``torch.compile``: both modules are then wrapped in ``torch.compile(module, dynamic=False)`` (inductor, default
mode) and ``forward_backward`` is timed again, interleaved as above; reported per module: the wall time of the first
compiled call (compilation included), the largest absolute difference of the compiled output from the eager one, the
compiled median and its speed-up over the eager median of the same run, and ours ÷ titans-pytorch compiled. This asks
whether a compiler's fusion closes the gap to the 2x target (``--skip-compile`` leaves it out; several minutes).

If ``titans_pytorch`` cannot be imported, ours is measured alone and the report says so.

Part 2, ``lm_step``: Hope vs Transformer++ training step
---------------------------------------------------------
A full training step of ``CausalLM.sequence_loss`` (segments with the memory carried and detached at boundaries,
cross-entropy over every position), ``backward``, gradient-norm clipping at 1.0 and ``torch.optim.AdamW`` (lr 1e-3,
weight decay 0.1 on matrices): ``step`` mode; and ``forward`` (``sequence_loss`` under ``torch.inference_mode()``,
memory writing). Interleaved rounds as in part 1. Two sizes:

- ``tiny`` (the CPU text recipes): batch 8, sequence 256, segments of 128; ``hope`` = ``HopeModule(dim=64, depth=2,
  heads=4, chunk_size=16, cms_chunk_sizes=[16, 64])``, ``transformer`` = ``TransformerPP(dim=64, depth=3, heads=4,
  mlp_mult=2.0)`` (parameters matched within 2 %, as in ``benchmarks/lm.py``);
- ``d256`` : batch 4, sequence 512, one segment of 512; ``hope`` = ``HopeModule(dim=256, depth=4, heads=4,
  chunk_size=16, cms_chunk_sizes=[16, 256, 2048])`` (the GPU recipe), against ``transformer_same_shape`` =
  ``TransformerPP(dim=256, depth=4, heads=4)`` (same width and depth, fewer parameters) and ``transformer`` =
  ``TransformerPP(dim=256, depth=6, heads=4, mlp_mult=3.0)`` (parameters matched within 1 %).

``hope`` is ``HopeModule``'s default, whose CMS writes follow the task loss (``cms_write_signal="task_loss"``). At both
sizes ``hope_target`` is ``hope`` with ``cms_write_signal="target"`` (the CMS writes towards a learned target, first
order), and ``hope_chunk64`` is ``hope`` with ``chunk_size=64`` for the self-modifying Titans ([ours]: 16 as in
the paper's Fig. 3 by default, 64 for throughput; the same parameters), to show what the coarser chunks buy; the CMS is
unchanged. ``benchmarks/lm.py`` reports what they cost in bits per byte.

Reported: median ms and tokens/s per model and mode, and the ratio of each Hope variant's time to each Transformer++'s
(the target stated by the issue: Hope's step at most 2x the Transformer++ step).

Arithmetic (both parts): the matmul-type FLOPs of one iteration, counted by ``torch.utils.flop_counter.FlopCounterMode``
(plus, for attention, which the counter does not see on CPU, ``4 S² D`` per sample, layer and segment, backward twice
the forward), the achieved GFLOP/s (FLOPs / median time), and this machine's fp32 matmul rates at the same thread count
(a 2048³ GEMM and the memory's batched shape), so that a time ratio can be read as FLOPs vs efficiency.

Environment
-----------
titans-pytorch is not a dependency of nl_lightning; it lives in a separate benchmark environment::

    python -m venv .bench-venv
    .bench-venv/bin/pip install torch==2.13.0 titans-pytorch
    .bench-venv/bin/pip install -e .

Running it
----------
::

    OMP_NUM_THREADS=1 .bench-venv/bin/python benchmarks/memory_speed.py --out benchmarks/results/memory_speed.json \\
        --markdown benchmarks/results/memory_speed.md      # ~9 min with 1 thread
    .bench-venv/bin/python benchmarks/memory_speed.py --quick   # smoke run
    python benchmarks/memory_speed.py --parts lm_step            # our environment: part 2 only needs nl_lightning

``--out PATH`` writes the JSON and prints the Markdown report to stdout (without it the JSON goes to stdout);
``--markdown PATH`` also writes the report. Progress goes to stderr. The script is not part of the test suite: speed
is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from _common import (
    counted_gflop,
    emit,
    fresh_inductor_cache,
    interleaved,
    num,
    report_header,
    run_parts,
    sha256_of,
    summarize,
)
from torch import Tensor, nn

import nl_lightning
from nl_lightning.models.hope import HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.neural_memory import NeuralMemory
from nl_lightning.models.transformer import CausalSelfAttention, TransformerPP

try:
    import titans_pytorch
    from titans_pytorch import NeuralMemory as TitansNeuralMemory

    TITANS_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "measure ours alone"
    titans_pytorch, TitansNeuralMemory = None, None
    TITANS_ERROR = f"{type(exc).__name__}: {exc}"

PARTS = ("memory", "lm_step")
SEED = 1234
MEMORY = {"batch": 4, "seq": 1024, "dim": 256, "heads": 4, "chunk": 64, "depth": 2, "expansion": 2.0}
DIFFERENCES = [
    "Inner gradient: titans-pytorch (batch_size=None, the default) takes every chunk's gradient at the weights the call"
    " started from, all chunks at once (torch.func vmap of grad per chunk), then scans momentum and forgetting over"
    " the chunks; ours takes each chunk's gradient at the running memory at the chunk's start (Titans Eq. 13-14 with"
    " chunk anchors), one sequential step per chunk, with closed-form per-layer gradients (no autograd in the inner"
    " loop).",
    "Gates: titans-pytorch has a per-token learning rate (sigmoid x 1.0) but momentum and forgetting gates per chunk"
    " (from the mean of the chunk's inputs), so momentum and forgetting step once per chunk on the chunk's summed"
    " gradient; ours has all three gates per token (lr_max 0.1) and exact per-token momentum and forgetting within a"
    " chunk (closed-form coefficients).",
    "Inner loss: titans-pytorch the mean over the head width of (M(k) - v)^2, ours the sum, so for the same error our"
    " inner gradient is 64x (the head width) larger before the learned rates scale it.",
    "Clipping: ours clips each token's inner gradient to Frobenius norm 1 (max_inner_grad_norm=1.0, the default;"
    " computed from the per-layer factors, no gradient tensor formed); titans-pytorch does not clip by default"
    " (max_grad_norm=None).",
    "Memory MLP: titans-pytorch x @ W1 -> GELU -> @ W2, then LayerNorm (learned gain per head) plus the input"
    " (ResidualNorm), Xavier-uniform init; ours k + W2 SiLU(W1 k), no norm, normal(0, 1/fan_in) init. Same matrix"
    " shapes per head (64 x 128 and 128 x 64).",
    "Projections: titans-pytorch separate RMSNorms for storing and retrieving, plain linear q, k, v (no activation, no"
    " q/k normalisation, no convolution), a per-head sigmoid retrieve gate and a linear head merge; ours one RMSNorm,"
    " a 4-tap causal depthwise convolution, SiLU, l2-normalised q and k, per-head RMSNorm of the reads, an output gate"
    " 2 sigmoid(W_G x) and an output projection.",
    "Reads: titans-pytorch shifts retrieval by one token (the last token of a chunk already reads the weights its own"
    " chunk wrote); ours: every token of chunk j reads the state at the end of chunk j - 1.",
    "titans-pytorch registers a template copy of the memory MLP (memory_model.*) that the forward does not use (it"
    " gets no gradient); both counts are reported.",
]


# ---------------------------------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[memory_speed] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- arithmetic
def machine_rates(repeats: int = 7) -> dict[str, float]:
    """Median GFLOP/s of fp32 matmuls on this machine and thread count: one large GEMM (2048 x 2048 x 2048) and the
    memory's batched shape (16 x [64 x 64] @ [64 x 128], the per-chunk read of part 1)."""
    gen = torch.Generator().manual_seed(SEED)
    shapes = {"gemm_2048": ((2048, 2048), (2048, 2048)), "bmm_16x64x64x128": ((16, 64, 64), (16, 64, 128))}
    out = {}
    for name, (sa, sb) in shapes.items():
        a, b = torch.randn(*sa, generator=gen), torch.randn(*sb, generator=gen)
        flop = 2 * math.prod(sa) * sb[-1]
        inner = max(1, int(2e8 // flop))  # about 0.2 GFLOP per timed sample
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
            times.append((time.perf_counter() - t0) / inner)
        out[name] = flop / statistics.median(times) / 1e9
    return out


def attention_gflop(model: nn.Module, batch: int, seq: int, segment_len: int, backward: bool) -> float:
    """Analytic GFLOP of the attention products ``Q Kᵀ`` and ``A V`` (``4 S² D`` per sample, layer and segment of ``S``
    tokens, the full square; backward counted as twice the forward), which the counter does not see on CPU."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    per_segment = sum(4 * min(segment_len, seq) ** 2 * m.dim for m in layers)
    return batch * per_segment * math.ceil(seq / segment_len) * (3 if backward else 1) / 1e9


# ---------------------------------------------------------------------------------------------------- part 1: memory
def build_ours() -> nn.Module:
    torch.manual_seed(SEED)
    m = MEMORY
    return NeuralMemory(m["dim"], heads=m["heads"], chunk_size=m["chunk"], depth=m["depth"], expansion=m["expansion"])


def build_titans(default_head: bool = False) -> nn.Module:
    torch.manual_seed(SEED)
    m = MEMORY
    kwargs: dict[str, Any] = {} if default_head else {"dim_head": m["dim"] // m["heads"]}
    return TitansNeuralMemory(
        dim=m["dim"],
        heads=m["heads"],
        chunk_size=m["chunk"],
        default_model_kwargs={"depth": m["depth"], "expansion_factor": m["expansion"]},
        **kwargs,
    )


def memory_step(module: nn.Module, x: Tensor, mode: str) -> None:
    if mode == "forward":
        with torch.inference_mode():
            module(x)
        return
    y, _ = module(x)
    y.sum().backward()


def describe(module: nn.Module, x: Tensor, ours: bool) -> dict[str, Any]:
    """Parameter counts (all, and those reached by a backward pass), memory-MLP shapes, and an output check."""
    module.zero_grad(set_to_none=True)
    y, _ = module(x)
    y.sum().backward()
    total = sum(p.numel() for p in module.parameters())
    used = sum(p.numel() for p in module.parameters() if p.grad is not None)
    unused = [n for n, p in module.named_parameters() if p.grad is None]
    module.zero_grad(set_to_none=True)
    if ours:
        shapes = [list(w.shape) for w in module.memory]
        mlp = (
            f"per head: k + W2 σ(W1 k), W1 {shapes[0][1:]}, W2 {shapes[1][1:]} (out, in), σ = {module.activation},"
            f" {module.heads} heads, hidden {module.hidden}"
        )
    else:
        shapes = [list(p.shape) for p in module.memory_model_parameters]
        mlp = (
            "per head: LayerNorm(GELU(x W1) W2) + x, "
            + ", ".join(f"{n} {s}" for n, s in zip(module.memory_model_parameter_names, shapes, strict=True))
            + f" (heads first), {module.heads} heads"
        )
    return {
        "parameters": total,
        "parameters_with_grad": used,
        "parameters_without_grad": unused,
        "memory_mlp_shapes": shapes,
        "memory_mlp": mlp,
        "output_shape": list(y.shape),
        "output_finite": bool(torch.isfinite(y).all()),
        "output_rms": float(y.detach().pow(2).mean().sqrt()),
    }


def compiled_memory(
    modules: dict[str, nn.Module], x: Tensor, tokens: int, eager: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """``forward_backward`` of ``torch.compile(module, dynamic=False)``: compile time, agreement with eager, timing;
    inductor's on-disk cache in a fresh directory, so that the first call's time is a cold compile."""
    with fresh_inductor_cache("memory_speed") as cache:
        out = _compiled_memory(modules, x, tokens, eager, args)
    out["inductor_cache"] = cache["description"]
    return out


def _compiled_memory(
    modules: dict[str, nn.Module], x: Tensor, tokens: int, eager: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    info: dict[str, Any] = {}
    fns: dict[str, Callable[[], None]] = {}
    for name, mod in modules.items():
        compiled = torch.compile(mod, dynamic=False)
        log(f"memory compiled: compiling {name} ...")
        t0 = time.perf_counter()
        y, _ = compiled(x)
        y.sum().backward()
        seconds = time.perf_counter() - t0
        mod.zero_grad(set_to_none=True)
        y_eager, _ = mod(x)
        info[name] = {
            "first_call_s": seconds,
            "max_abs_diff_from_eager": float((y.detach() - y_eager.detach()).abs().max()),
            "eager_output_max_abs": float(y_eager.detach().abs().max()),
        }
        log(f"memory compiled: {name} first call {seconds:.0f} s")
        fns[name] = lambda compiled=compiled: memory_step(compiled, x, "forward_backward")

    def after() -> None:
        for mod in modules.values():
            mod.zero_grad(set_to_none=True)

    times = interleaved(fns, args.rounds, args.warmup, args.iters, "memory compiled", after, log)
    for name in modules:
        result = summarize(times[name], tokens)
        result["speedup_over_eager"] = eager[f"{name}/forward_backward"]["median_ms"] / result["median_ms"]
        info[name]["forward_backward"] = result
    out: dict[str, Any] = {"construction": "torch.compile(module, dynamic=False)", "modules": info}
    if "titans-pytorch" in info:
        a, b = info["ours"]["forward_backward"], info["titans-pytorch"]["forward_backward"]
        per_round = [tb / ta for ta, tb in zip(a["per_round_median_ms"], b["per_round_median_ms"], strict=True)]
        out["speedup_ours_over_titans"] = b["median_ms"] / a["median_ms"]
        out["per_round_speedups"] = per_round
    return out


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    m = MEMORY
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(m["batch"], m["seq"], m["dim"], generator=gen)
    tokens = m["batch"] * m["seq"]
    modules: dict[str, nn.Module] = {"ours": build_ours()}
    if TitansNeuralMemory is not None:
        modules["titans-pytorch"] = build_titans()
    info = {name: describe(mod, x, name == "ours") for name, mod in modules.items()}
    modes = ("forward_backward", "forward")
    fns = {
        f"{name}/{mode}": (lambda mod=mod, mode=mode: memory_step(mod, x, mode))
        for name, mod in modules.items()
        for mode in modes
    }

    def after() -> None:
        for mod in modules.values():
            mod.zero_grad(set_to_none=True)

    times = interleaved(fns, args.rounds, args.warmup, args.iters, "memory", after, log)
    results = {k: summarize(v, tokens) for k, v in times.items()}
    comparisons: dict[str, Any] = {}
    if "titans-pytorch" in modules:
        for mode in modes:
            a, b = results[f"ours/{mode}"], results[f"titans-pytorch/{mode}"]
            per_round = [tb / ta for ta, tb in zip(a["per_round_median_ms"], b["per_round_median_ms"], strict=True)]
            comparisons[mode] = {
                "speedup_ours_over_titans": b["median_ms"] / a["median_ms"],
                "median_per_round_speedup": statistics.median(per_round),
                "per_round_speedups": per_round,
                "cpu_speedup": b["cpu_median_ms"] / a["cpu_median_ms"],
            }
    arithmetic: dict[str, Any] = {"machine_gflop_per_s": machine_rates()}
    for name, mod in modules.items():
        for mode in modes:
            counted = counted_gflop(lambda mod=mod, mode=mode: memory_step(mod, x, mode))
            after()
            counted["achieved_gflop_per_s"] = counted["gflop"] / (results[f"{name}/{mode}"]["median_ms"] / 1e3)
            arithmetic[f"{name}/{mode}"] = counted
    if "titans-pytorch" in modules:  # the rate ours would need to take half titans-pytorch's time
        for mode in modes:
            half = results[f"titans-pytorch/{mode}"]["median_ms"] / 2e3
            arithmetic[f"needed_for_2x/{mode}"] = arithmetic[f"ours/{mode}"]["gflop"] / half
    compiled = None if args.skip_compile else compiled_memory(modules, x, tokens, results, args)
    default_head: Optional[dict[str, Any]] = None
    if TitansNeuralMemory is not None and not args.skip_default_head:
        mod = build_titans(default_head=True)
        default_info = describe(mod, x, False)
        t = interleaved(
            {"titans-pytorch (dim_head=dim)/forward_backward": lambda: memory_step(mod, x, "forward_backward")},
            1,
            0,
            args.default_head_iters,
            "memory (titans-pytorch default dim_head)",
            lambda: mod.zero_grad(set_to_none=True),
            log,
        )
        default_head = {**default_info, "forward_backward": summarize(next(iter(t.values())), tokens)}
        del mod
    return {
        "setting": {**MEMORY, "dtype": "float32", "tokens_per_iteration": tokens},
        "titans_pytorch": {
            "available": TitansNeuralMemory is not None,
            "version": _version("titans-pytorch"),
            "import_error": TITANS_ERROR,
            "construction": "NeuralMemory(dim=256, dim_head=64, heads=4, chunk_size=64,"
            " default_model_kwargs=dict(depth=2, expansion_factor=2.0))",
        },
        "ours_construction": "NeuralMemory(256, heads=4, chunk_size=64, depth=2, expansion=2.0)",
        "modules": info,
        "results": results,
        "comparisons": comparisons,
        "arithmetic": arithmetic,
        "compiled": compiled,
        "titans_default_head": default_head,
        "differences": DIFFERENCES if TitansNeuralMemory is not None else [],
    }


# ---------------------------------------------------------------------------------------------------- part 2: lm_step
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "batch": 8,
        "seq": 256,
        "segment_len": 128,
        "models": {
            "hope": (
                HopeModule,
                {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]},
                "HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64])",
            ),
            "hope_target": (
                HopeModule,
                {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]}
                | {"cms_write_signal": "target"},
                "HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64],"
                " cms_write_signal='target')",
            ),
            "hope_chunk64": (
                HopeModule,
                {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 64, "cms_chunk_sizes": [16, 64]},
                "HopeModule(dim=64, depth=2, heads=4, chunk_size=64, cms_chunk_sizes=[16, 64])",
            ),
            "transformer": (
                TransformerPP,
                {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0},
                "TransformerPP(dim=64, depth=3, heads=4, mlp_mult=2.0)",
            ),
        },
    },
    "d256": {
        "batch": 4,
        "seq": 512,
        "segment_len": 512,
        "models": {
            "hope": (
                HopeModule,
                {"dim": 256, "depth": 4, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 256, 2048]},
                "HopeModule(dim=256, depth=4, heads=4, chunk_size=16, cms_chunk_sizes=[16, 256, 2048])",
            ),
            "hope_target": (
                HopeModule,
                {"dim": 256, "depth": 4, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 256, 2048]}
                | {"cms_write_signal": "target"},
                "HopeModule(dim=256, depth=4, heads=4, chunk_size=16, cms_chunk_sizes=[16, 256, 2048],"
                " cms_write_signal='target')",
            ),
            "hope_chunk64": (
                HopeModule,
                {"dim": 256, "depth": 4, "heads": 4, "chunk_size": 64, "cms_chunk_sizes": [16, 256, 2048]},
                "HopeModule(dim=256, depth=4, heads=4, chunk_size=64, cms_chunk_sizes=[16, 256, 2048])",
            ),
            "transformer_same_shape": (
                TransformerPP,
                {"dim": 256, "depth": 4, "heads": 4},
                "TransformerPP(dim=256, depth=4, heads=4)",
            ),
            "transformer": (
                TransformerPP,
                {"dim": 256, "depth": 6, "heads": 4, "mlp_mult": 3.0},
                "TransformerPP(dim=256, depth=6, heads=4, mlp_mult=3.0)",
            ),
        },
    },
}


def is_hope(name: str) -> bool:
    """The Hope variants of :data:`SIZES` (the rest are Transformer++ baselines)."""
    return name.startswith("hope")


class Stepper:
    """One model with its AdamW optimizer and a fixed batch: ``step()`` trains once, ``forward()`` evaluates once."""

    def __init__(self, model: CausalLM, tokens: Tensor) -> None:
        self.model, self.tokens = model.train(), tokens
        self.targets = torch.roll(tokens, -1, dims=1)
        self.opt = torch.optim.AdamW(model.param_groups(), lr=1e-3, betas=(0.9, 0.95))
        self.losses: list[float] = []

    def step(self) -> None:
        loss, _, _ = self.model.sequence_loss(self.tokens, self.targets, write=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.losses.append(float(loss))

    def forward(self) -> None:
        with torch.inference_mode():
            self.model.sequence_loss(self.tokens, self.targets, write=True)


def part_lm_step(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in args.sizes:
        spec = SIZES[size]
        gen = torch.Generator().manual_seed(SEED + 2)
        tokens = torch.randint(0, 256, (spec["batch"], spec["seq"]), generator=gen)
        steppers: dict[str, Stepper] = {}
        models: dict[str, Any] = {}
        for name, (cls, kwargs, text) in spec["models"].items():
            torch.manual_seed(SEED)
            model = cls(vocab_size=256, segment_len=spec["segment_len"], **kwargs)
            steppers[name] = Stepper(model, tokens)
            models[name] = {
                "architecture": text,
                "parameters": model.num_parameters(),
                "parameters_non_embedding": model.num_parameters(non_embedding=True),
            }
        fns: dict[str, Callable[[], None]] = {}
        for name, st in steppers.items():
            fns[f"{name}/step"] = st.step
            fns[f"{name}/forward"] = st.forward
        rounds = args.rounds_lm.get(size, args.rounds)
        times = interleaved(fns, rounds, args.warmup, args.iters, f"lm_step {size}", lambda: None, log)
        tokens_n = spec["batch"] * spec["seq"]
        results = {k: summarize(v, tokens_n) for k, v in times.items()}
        ratios: dict[str, dict[str, Any]] = {}  # Hope variant -> Transformer++ -> mode -> ratios
        for hope in filter(is_hope, steppers):
            ratios[hope] = {}
            for name in itertools.filterfalse(is_hope, steppers):
                ratios[hope][name] = {}
                for mode in ("step", "forward"):
                    a, b = results[f"{hope}/{mode}"], results[f"{name}/{mode}"]
                    pairs = zip(a["per_round_median_ms"], b["per_round_median_ms"], strict=True)
                    per_round = [ta / tb for ta, tb in pairs]
                    ratios[hope][name][mode] = {
                        "hope_time_ratio": a["median_ms"] / b["median_ms"],
                        "median_per_round_ratio": statistics.median(per_round),
                        "per_round_ratios": per_round,
                        "cpu_time_ratio": a["cpu_median_ms"] / b["cpu_median_ms"],
                    }
        for name, st in steppers.items():
            for mode, fn in (("step", st.step), ("forward", st.forward)):
                counted = counted_gflop(fn)
                attn = attention_gflop(st.model, spec["batch"], spec["seq"], spec["segment_len"], mode == "step")
                total = counted["gflop"] + attn
                results[f"{name}/{mode}"].update(
                    counted_gflop=counted["gflop"],
                    attention_gflop=attn,
                    gflop=total,
                    achieved_gflop_per_s=total / (results[f"{name}/{mode}"]["median_ms"] / 1e3),
                )
            models[name]["losses_finite"] = all(math.isfinite(v) for v in st.losses)
            models[name]["first_and_last_loss"] = [st.losses[0], st.losses[-1]] if st.losses else None
        out[size] = {
            "setting": {
                "batch": spec["batch"],
                "seq": spec["seq"],
                "segment_len": spec["segment_len"],
                "tokens_per_iteration": tokens_n,
                "rounds": rounds,
                "optimizer": "AdamW(lr=1e-3, betas=(0.9, 0.95), weight decay 0.1 on matrices), clip_grad_norm 1.0",
            },
            "models": models,
            "results": results,
            "ratios": ratios,
        }
    return out


# ---------------------------------------------------------------------------------------------------- report
def memory_markdown(part: dict[str, Any]) -> list[str]:
    s, tp = part["setting"], part["titans_pytorch"]
    lines = [
        "## 1. NeuralMemory: ours vs titans-pytorch",
        "",
        f"Batch {s['batch']}, sequence {s['seq']}, width {s['dim']}, {s['heads']} heads, chunk {s['chunk']}, depth-"
        f"{s['depth']} memory MLP with hidden width {s['expansion']:g} × the head width, fp32, 1 forward (+ backward"
        " of `y.sum()`) from a fresh state per iteration. Ours: `" + part["ours_construction"] + "`.",
    ]
    if tp["available"]:
        lines.append(f"titans-pytorch {tp['version']}: `{tp['construction']}`.")
    else:
        lines.append(f"**titans-pytorch is not importable here ({tp['import_error']}): ours is measured alone.**")
    d = part.get("titans_default_head")
    infos = dict(part["modules"])
    if d:
        infos["titans-pytorch (dim_head=dim, reference)"] = d
    lines += [
        "",
        "| module | parameters | with a gradient | memory MLP | output finite |",
        "|---|---|---|---|---|",
    ]
    for name, info in infos.items():
        lines.append(
            f"| {name} | {info['parameters']:,} | {info['parameters_with_grad']:,} | {info['memory_mlp']} |"
            f" {'yes' if info['output_finite'] else '**no**'} |"
        )
    lines += [
        "",
        "| module | mode | median ms | IQR ms | tokens/s | CPU ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(*key.split("/"), r) for key, r in part["results"].items()]
    if d:
        rows.append(("titans-pytorch (dim_head=dim, reference)", "forward_backward", d["forward_backward"]))
    for name, mode, r in rows:
        lines.append(
            f"| {name} | {mode} | {num(r['median_ms'], '.1f')} | {num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')} |"
            f" {num(r['tokens_per_s'], ',.0f')} | {num(r['cpu_median_ms'], '.1f')} |"
        )
    if part["comparisons"]:
        lines += [
            "",
            "| mode | ours ÷ titans-pytorch tokens/s (pooled medians) | median of per-round ratios | CPU-time ratio |",
        ]
        lines += ["|---|---|---|---|"]
        for mode, c in part["comparisons"].items():
            lines.append(
                f"| {mode} | {num(c['speedup_ours_over_titans'], '.2f')}× |"
                f" {num(c['median_per_round_speedup'], '.2f')}× | {num(c['cpu_speedup'], '.2f')}× |"
            )
        lines += ["", "What differs between the two modules (from their code):", ""]
        lines += [f"- {item}" for item in part["differences"]]
    lines += arithmetic_markdown(part["arithmetic"])
    if part.get("compiled"):
        lines += compiled_markdown(part["compiled"])
    return lines


def compiled_markdown(c: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"`torch.compile` (`{c['construction']}`, inductor, default mode; on-disk cache: {c['inductor_cache']}),"
        " forward_backward, interleaved rounds as above:",
        "",
        "| module | first call s (compiles) | max abs diff from eager | median ms | IQR ms | tokens/s | speed-up over"
        " eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, i in c["modules"].items():
        r = i["forward_backward"]
        lines.append(
            f"| {name} | {num(i['first_call_s'], '.0f')} | {i['max_abs_diff_from_eager']:.1e} |"
            f" {num(r['median_ms'], '.1f')} | {num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')} |"
            f" {num(r['tokens_per_s'], ',.0f')} | {num(r['speedup_over_eager'], '.2f')}× |"
        )
    if "speedup_ours_over_titans" in c:
        rounds = c["per_round_speedups"]
        lines += [
            "",
            f"Compiled, ours ÷ titans-pytorch tokens/s: {num(c['speedup_ours_over_titans'], '.2f')}× (per-round"
            f" ratios {min(rounds):.2f}–{max(rounds):.2f}).",
        ]
    return lines


def arithmetic_markdown(a: dict[str, Any]) -> list[str]:
    rates = a["machine_gflop_per_s"]
    lines = [
        "",
        "Arithmetic (matmul-type GFLOP per iteration counted by `torch.utils.flop_counter.FlopCounterMode`; achieved"
        " rate = GFLOP ÷ median time). This machine, same thread count: a 2048³ fp32 GEMM runs at"
        f" {num(rates['gemm_2048'], '.0f')} GFLOP/s, the memory's batched 16 × [64 × 64] @ [64 × 128] product at"
        f" {num(rates['bmm_16x64x64x128'], '.0f')} GFLOP/s.",
        "",
        "| module | mode | GFLOP | achieved GFLOP/s |",
        "|---|---|---|---|",
    ]
    for key, c in a.items():
        if "/" in key and not key.startswith("needed_for_2x"):
            name, mode = key.split("/")
            lines.append(f"| {name} | {mode} | {num(c['gflop'], '.2f')} | {num(c['achieved_gflop_per_s'], '.0f')} |")
    need = a.get("needed_for_2x/forward_backward")
    if need is not None:
        lines += [
            "",
            f"To take half of titans-pytorch's forward+backward time with its own FLOPs, ours would have to run at"
            f" {num(need, '.0f')} GFLOP/s: {num(need / rates['gemm_2048'], '.2f')}× the large-GEMM rate and"
            f" {num(need / rates['bmm_16x64x64x128'], '.2f')}× the rate of its own batched shape on this machine.",
        ]
    return lines


def lm_markdown(part: dict[str, Any]) -> list[str]:
    lines = [
        "## 2. Hope vs Transformer++: training step and forward",
        "",
        "Step: `sequence_loss` (segments, memory carried), backward, gradient clipping 1.0, AdamW. Forward:"
        " `sequence_loss` under `torch.inference_mode()` (memory writing). Random byte tokens, one fixed batch.",
    ]
    for size, block in part.items():
        s = block["setting"]
        lines += [
            "",
            f"### {size}: batch {s['batch']}, sequence {s['seq']}, segments of {s['segment_len']}",
            "",
            "| model | parameters | mode | median ms | IQR ms | tokens/s | GFLOP (attention) | GFLOP/s"
            " | losses finite |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in block["results"].items():
            name, mode = key.split("/")
            m = block["models"][name]
            lines.append(
                f"| {name}: `{m['architecture']}` | {m['parameters']:,} | {mode} | {num(r['median_ms'], '.1f')} |"
                f" {num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')} | {num(r['tokens_per_s'], ',.0f')} |"
                f" {num(r['gflop'], '.2f')} ({num(r['attention_gflop'], '.2f')}) |"
                f" {num(r['achieved_gflop_per_s'], '.0f')} |"
                f" {'yes' if m['losses_finite'] else '**no**'} |"
            )
        lines += [
            "",
            "| Hope ÷ Transformer++ | step time ratio | forward time ratio | per-round step ratios"
            " | step GFLOP ratio |",
            "|---|---|---|---|---|",
        ]
        for hope, against in block["ratios"].items():
            for name, r in against.items():
                flop = block["results"][f"{hope}/step"]["gflop"] / block["results"][f"{name}/step"]["gflop"]
                lines.append(
                    f"| {hope} ÷ {name} | {num(r['step']['hope_time_ratio'], '.2f')}× |"
                    f" {num(r['forward']['hope_time_ratio'], '.2f')}× |"
                    f" {', '.join(num(v, '.2f') for v in r['step']['per_round_ratios'])} | {num(flop, '.2f')}× |"
                )
    lines += [
        "",
        "GFLOP: matmul-type ops counted by `FlopCounterMode` plus, in brackets and included, the attention products"
        " computed analytically (`4 S² D` per sample, layer and segment, full square, backward = 2 × forward), which"
        " the counter does not see on CPU. Elementwise work is not counted.",
    ]
    return lines


def reading(report: dict[str, Any]) -> list[str]:
    lines = ["## Reading (generated from the numbers above)", ""]
    parts = report["parts"]
    if "memory" in parts:
        part = parts["memory"]
        c = part["comparisons"].get("forward_backward")
        if c:
            s = c["speedup_ours_over_titans"]
            rounds = c["per_round_speedups"]
            lines.append(
                f"- Forward+backward, ours vs titans-pytorch (matched head width): ours has {s:.2f}× the tokens/s"
                f" ({'faster' if s > 1 else 'slower'}; per-round ratios {min(rounds):.2f}–{max(rounds):.2f}); the"
                f" issue's target is ≥ 2×, which is {'met' if s >= 2 else 'not met'} in this run."
            )
            a = part["arithmetic"]
            need, rates = a.get("needed_for_2x/forward_backward"), a["machine_gflop_per_s"]
            if need is not None:
                lines.append(
                    f"- FLOPs: ours {a['ours/forward_backward']['gflop']:.2f} GFLOP at"
                    f" {a['ours/forward_backward']['achieved_gflop_per_s']:.0f} GFLOP/s, titans-pytorch"
                    f" {a['titans-pytorch/forward_backward']['gflop']:.2f} GFLOP at"
                    f" {a['titans-pytorch/forward_backward']['achieved_gflop_per_s']:.0f} GFLOP/s; 2× would need"
                    f" {need:.0f} GFLOP/s, against {rates['gemm_2048']:.0f} (large GEMM) and"
                    f" {rates['bmm_16x64x64x128']:.0f} (the memory's batched shape) measured here."
                )
            comp = part.get("compiled")
            if comp and "speedup_ours_over_titans" in comp:
                ours, theirs = (comp["modules"][n]["forward_backward"] for n in ("ours", "titans-pytorch"))
                lines.append(
                    f"- Both compiled (`torch.compile`): ours has {comp['speedup_ours_over_titans']:.2f}×"
                    f" titans-pytorch's tokens/s (compilation sped ours up {ours['speedup_over_eager']:.2f}×,"
                    f" titans-pytorch {theirs['speedup_over_eager']:.2f}×); compiled, the 2× target is"
                    f" {'met' if comp['speedup_ours_over_titans'] >= 2 else 'not met'}."
                )
            f = part["comparisons"].get("forward")
            if f:
                lines.append(
                    f"- Forward only: ours has {f['speedup_ours_over_titans']:.2f}× titans-pytorch's tokens/s."
                )
        elif not part["titans_pytorch"]["available"]:
            lines.append("- titans-pytorch was not importable; only ours was measured.")
        bad = [n for n, i in part["modules"].items() if not i["output_finite"]]
        if bad:
            lines.append(f"- Non-finite outputs from: {', '.join(bad)}.")
    if "lm_step" in parts:
        for size, block in parts["lm_step"].items():
            for hope, against in block["ratios"].items():
                for name, r in against.items():
                    ratio = r["step"]["hope_time_ratio"]
                    lines.append(
                        f"- {size}: a {hope} training step takes {ratio:.2f}× the time of {name}'s"
                        f" ({'within' if ratio <= 2 else 'over'} the 2× target); forward only"
                        f" {r['forward']['hope_time_ratio']:.2f}×."
                    )
            steps = [(n, block["results"][f"{n}/step"]) for n in block["models"]]
            lines.append(
                f"- {size}: step GFLOP and rate: "
                + "; ".join(f"{n} {r['gflop']:.2f} GFLOP at {r['achieved_gflop_per_s']:.0f} GFLOP/s" for n, r in steps)
                + "."
            )
            bad = [n for n, m in block["models"].items() if not m["losses_finite"]]
            if bad:
                lines.append(f"- {size}: non-finite training losses in {', '.join(bad)}.")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# NeuralMemory and Hope speed",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['timestamp']}; nl_lightning {env['nl_lightning']}, torch {env['torch']}, titans-pytorch"
        f" {env['titans_pytorch'] or 'not installed'}, Python {env['python']}, {env['cpu_count']} CPU core(s),"
        f" {report['threads']} torch thread(s); interleaved rounds: {report['args']['rounds']} ×"
        f" ({report['args']['warmup']} warm-up + {report['args']['iters']} timed) per variant and mode;"
        f" total {report['wall_s']:.0f} s. A shared"
        " machine: other load inflates wall times; CPU times are given where it matters.",
    ]
    builders = {"memory": memory_markdown, "lm_step": lm_markdown}
    for number, (name, part) in enumerate(report["parts"].items(), 1):
        body = builders[name](part)
        body[0] = f"## {number}. " + body[0].split(". ", 1)[1]
        lines += ["", *body, "", f"Part time: {report['part_seconds'][name]:.0f} s."]
    lines += ["", *reading(report)]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict[str, Any]:
    root = Path(nl_lightning.__file__).parent
    sources = {
        f"nl_lightning/{n}": sha256_of(str(root / n))
        for n in (
            "models/neural_memory.py",
            "models/_memory_mlp.py",
            "models/hope.py",
            "models/self_modifying_titans.py",
            "models/_residual_memory.py",
            "models/cms.py",
            "models/cms_memory.py",
            "models/transformer.py",
            "models/lm.py",
        )
    }
    if titans_pytorch is not None:
        sources["titans_pytorch/neural_memory.py"] = sha256_of(
            os.path.join(os.path.dirname(titans_pytorch.__file__), "neural_memory.py")
        )
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "nl_lightning": nl_lightning.__version__,
        "titans_pytorch": _version("titans-pytorch"),
        "torch_num_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "sources": sources,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="memory, lm_step (default: both)")
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES), help="lm_step sizes")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 2 with --quick)")
    parser.add_argument("--rounds-d256", type=int, help="rounds for the d256 size (default 3; 1 with --quick)")
    parser.add_argument("--iters", type=int, help="timed iterations per round (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed iterations per round (default 1; 0 with --quick)")
    parser.add_argument(
        "--default-head-iters", type=int, help="timed iterations of titans-pytorch's default dim_head (default 2)"
    )
    parser.add_argument("--skip-default-head", action="store_true", help="do not time titans-pytorch's default head")
    parser.add_argument("--skip-compile", action="store_true", help="do not time the torch.compile'd memories")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few iterations, no default-head or compiled timing"
    )
    args = parser.parse_args(argv)
    parts = [p for item in args.parts for p in item.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.iters = args.iters or (1 if q else 3)
    args.warmup = (0 if q else 1) if args.warmup is None else args.warmup
    args.rounds_lm = {"d256": args.rounds_d256 or (1 if q else 3)}
    args.default_head_iters = args.default_head_iters or 2
    if q:
        args.skip_default_head = args.skip_compile = True
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --iters, --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "NeuralMemory (ours vs titans-pytorch) and Hope vs Transformer++ step speed",
        "benchmarks/memory_speed.py",
        argv,
        dict(vars(args)),
        environment(args.threads),
        python=sys.executable,
    )
    report["threads"] = args.threads
    if TitansNeuralMemory is None:
        log(f"titans_pytorch is not importable ({TITANS_ERROR}); measuring ours alone")
    with contextlib.redirect_stdout(sys.stderr):
        parts = {"memory": part_memory, "lm_step": part_lm_step}
        run_parts(report, {name: partial(parts[name], args) for name in PARTS if name in args.parts}, log)
    return emit(report, started, markdown, args.out, args.markdown, log)


if __name__ == "__main__":
    main()
