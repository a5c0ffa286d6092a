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
"""Speed of our Titans NeuralMemory against titans-pytorch's, and of a Hope training step against Transformer++.

Part 1, ``memory``: ``NeuralMemory(256, heads=4, chunk_size=64, depth=2, expansion=2.0)`` against
``titans_pytorch.NeuralMemory(dim=256, dim_head=64, heads=4, chunk_size=64, default_model_kwargs=dict(depth=2,
expansion_factor=2.0))`` (each head our memory shape 64 -> 128 -> 64; titans-pytorch's default ``dim_head=dim`` is
timed once for reference unless ``--skip-default-head``), batch 4, sequence 1024, fp32 CPU, the same seeded input.
Modes ``forward_backward`` (from a fresh state, then ``y.sum().backward()``) and ``forward`` (inference mode); then
both under ``torch.compile(module, dynamic=False)`` (cold inductor cache; unless ``--skip-compile``): first-call
time, the largest difference from eager (checked before timing), the compiled median. The two modules compute
different functions (``DIFFERENCES``). Without ``titans_pytorch`` ours is measured alone.

Part 2, ``lm_step``: a training step (``CausalLM.sequence_loss`` with the memory carried across segments, backward,
clipping 1.0, AdamW lr 1e-3) and a forward (under ``torch.inference_mode()``) of the Hope variants of ``SIZES`` against
Transformer++ (parameters matched; at ``d256`` also the same shape): the time ratios Hope ÷ Transformer++.

Timing: interleaved rounds (``_common.interleaved``) of ``--warmup`` untimed and ``--iters`` timed calls per (variant,
mode). Arithmetic: matmul FLOPs by ``FlopCounterMode`` (plus attention's ``4 S² D`` per sample, layer and segment, which
it does not see on CPU), achieved GFLOP/s, and this machine's fp32 matmul rates.

titans-pytorch is not a dependency of nl_lightning; it lives in a separate environment::

    python -m venv .bench-venv
    .bench-venv/bin/pip install torch==2.13.0 titans-pytorch
    .bench-venv/bin/pip install -e .

Running it::

    OMP_NUM_THREADS=1 .bench-venv/bin/python benchmarks/memory_speed.py --out benchmarks/results/memory_speed.json
    python benchmarks/render.py memory_speed                  # the page benchmarks/results/memory_speed.md
    .bench-venv/bin/python benchmarks/memory_speed.py --quick --out /tmp/memory_speed.json   # smoke run
    python benchmarks/memory_speed.py --parts lm_step --out /tmp/lm_step.json   # part 2 needs nl_lightning only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Optional

import torch
from _common import (
    arguments,
    counted_gflop,
    environment,
    fresh_inductor_cache,
    interleaved,
    make_log,
    num,
    parse_parts,
    report_header,
    run_parts,
    save,
    sha256_of,
    summarize,
    table,
)
from torch import Tensor, nn

from nl_lightning.models.hope import HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.neural_memory import NeuralMemory
from nl_lightning.models.transformer import CausalSelfAttention, TransformerPP

TITLE = "NeuralMemory and Hope speed"
PARTS = ("memory", "lm_step")
SEED = 1234
MEMORY = {"batch": 4, "seq": 1024, "dim": 256, "heads": 4, "chunk": 64, "depth": 2, "expansion": 2.0}
OURS = "NeuralMemory(256, heads=4, chunk_size=64, depth=2, expansion=2.0)"
THEIRS = "NeuralMemory(dim=256, dim_head=64, heads=4, chunk_size=64, default_model_kwargs=dict(depth=2,"
THEIRS += " expansion_factor=2.0))"
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
SOURCES = [f"models/{n}.py" for n in ("neural_memory", "_memory_mlp", "hope", "self_modifying_titans")]
SOURCES += [f"models/{n}.py" for n in ("_residual_memory", "cms", "cms_memory", "transformer", "lm")]
log = make_log("memory_speed")


def titans() -> tuple[Any, Optional[str], Optional[str]]:
    """The ``titans_pytorch`` module (``None`` where it cannot be imported), the import error and its version."""
    try:
        version: Optional[str] = importlib.metadata.version("titans-pytorch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        import titans_pytorch
    except Exception as exc:  # noqa: BLE001 - any import failure means "measure ours alone"
        return None, f"{type(exc).__name__}: {exc}", version
    return titans_pytorch, None, version


def machine_rates(repeats: int = 7) -> dict[str, float]:
    """Median GFLOP/s of fp32 matmuls here: one 2048³ GEMM and the memory's batched 16 x [64 x 64] @ [64 x 128]."""
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


def build_memory(which: str) -> nn.Module:
    """``ours``, ``titans-pytorch`` (our head width) or ``default_head`` (titans-pytorch's ``dim_head=dim``)."""
    torch.manual_seed(SEED)
    dim, heads, chunk, depth, mult = (MEMORY[k] for k in ("dim", "heads", "chunk", "depth", "expansion"))
    if which == "ours":
        return NeuralMemory(dim, heads=heads, chunk_size=chunk, depth=depth, expansion=mult)
    kwargs: dict[str, Any] = {} if which == "default_head" else {"dim_head": dim // heads}
    model_kwargs = {"depth": depth, "expansion_factor": mult}
    return titans()[0].NeuralMemory(dim=dim, heads=heads, chunk_size=chunk, default_model_kwargs=model_kwargs, **kwargs)


def memory_step(module: nn.Module, x: Tensor, mode: str) -> None:
    if mode == "forward":
        with torch.inference_mode():
            module(x)
    else:
        module(x)[0].sum().backward()


def describe(module: nn.Module, x: Tensor, ours: bool) -> dict[str, Any]:
    """Parameter counts (all, and those reached by a backward pass), memory-MLP shapes, and an output check."""
    module.zero_grad(set_to_none=True)
    y, _ = module(x)
    y.sum().backward()
    unused = [n for n, p in module.named_parameters() if p.grad is None]
    used = sum(p.numel() for p in module.parameters() if p.grad is not None)
    module.zero_grad(set_to_none=True)
    if ours:
        shapes = [list(w.shape) for w in module.memory]
        mlp = f"per head: k + W2 σ(W1 k), W1 {shapes[0][1:]}, W2 {shapes[1][1:]} (out, in), σ = {module.activation},"
        mlp += f" {module.heads} heads, hidden {module.hidden}"
    else:
        shapes = [list(p.shape) for p in module.memory_model_parameters]
        named = zip(module.memory_model_parameter_names, shapes, strict=True)
        mlp = "per head: LayerNorm(GELU(x W1) W2) + x, " + ", ".join(f"{n} {s}" for n, s in named)
        mlp += f" (heads first), {module.heads} heads"
    out = {"parameters": sum(p.numel() for p in module.parameters()), "parameters_with_grad": used}
    out.update(parameters_without_grad=unused, memory_mlp_shapes=shapes, memory_mlp=mlp, output_shape=list(y.shape))
    return {**out, "output_finite": bool(torch.isfinite(y).all()), "output_rms": float(y.detach().pow(2).mean().sqrt())}


def ratios(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, list[float]]:
    """``b``'s median time over ``a``'s, pooled and per round (> 1: ``a`` is faster)."""
    per_round = [tb / ta for ta, tb in zip(a["per_round_median_ms"], b["per_round_median_ms"], strict=True)]
    return b["median_ms"] / a["median_ms"], per_round


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    m = MEMORY
    x = torch.randn(m["batch"], m["seq"], m["dim"], generator=torch.Generator().manual_seed(SEED + 1))
    tokens, (module, error, version) = m["batch"] * m["seq"], titans()
    modules = {name: build_memory(name) for name in ["ours"] + (["titans-pytorch"] if module is not None else [])}
    info = {name: describe(mod, x, name == "ours") for name, mod in modules.items()}
    modes = ("forward_backward", "forward")
    step = {f"{n}/{mode}": partial(memory_step, mod, x, mode) for n, mod in modules.items() for mode in modes}

    def after() -> None:
        for mod in modules.values():
            mod.zero_grad(set_to_none=True)

    times = interleaved(step, args.rounds, args.warmup, args.iters, "memory", after, log)
    results = {k: summarize(v, tokens) for k, v in times.items()}
    comparisons: dict[str, Any] = {}
    arithmetic: dict[str, Any] = {"machine_gflop_per_s": machine_rates()}
    for key, fn in step.items():
        counted = counted_gflop(fn)
        after()
        arithmetic[key] = {**counted, "achieved_gflop_per_s": counted["gflop"] / (results[key]["median_ms"] / 1e3)}
    for mode in modes if module is not None else ():
        a, b = results[f"ours/{mode}"], results[f"titans-pytorch/{mode}"]
        pooled, per_round = ratios(a, b)
        comparisons[mode] = {"speedup_ours_over_titans": pooled, "per_round_speedups": per_round}
        comparisons[mode]["median_per_round_speedup"] = statistics.median(per_round)
        comparisons[mode]["cpu_speedup"] = b["cpu_median_ms"] / a["cpu_median_ms"]
        # the rate ours would need to take half titans-pytorch's time
        arithmetic[f"needed_for_2x/{mode}"] = arithmetic[f"ours/{mode}"]["gflop"] / (b["median_ms"] / 2e3)
    compiled = None
    if not args.skip_compile:  # forward_backward of torch.compile(module, dynamic=False), inductor's cache cold
        cinfo: dict[str, Any] = {}
        fns: dict[str, Callable[[], None]] = {}
        with fresh_inductor_cache("memory_speed") as cache:
            for name, mod in modules.items():
                fn = torch.compile(mod, dynamic=False)
                log(f"memory compiled: compiling {name} ...")
                t0 = time.perf_counter()
                y, _ = fn(x)
                y.sum().backward()
                seconds = time.perf_counter() - t0
                mod.zero_grad(set_to_none=True)
                y_eager = mod(x)[0].detach()
                diff = float((y.detach() - y_eager).abs().max())
                cinfo[name] = {"first_call_s": seconds, "max_abs_diff_from_eager": diff}
                cinfo[name]["eager_output_max_abs"] = float(y_eager.abs().max())
                fns[name] = lambda fn=fn: memory_step(fn, x, "forward_backward")
            ctimes = interleaved(fns, args.rounds, args.warmup, args.iters, "memory compiled", after, log)
        for name in modules:
            r = cinfo[name]["forward_backward"] = summarize(ctimes[name], tokens)
            r["speedup_over_eager"] = results[f"{name}/forward_backward"]["median_ms"] / r["median_ms"]
        compiled = {"construction": "torch.compile(module, dynamic=False)", "modules": cinfo}
        if "titans-pytorch" in cinfo:
            pair = (cinfo["ours"]["forward_backward"], cinfo["titans-pytorch"]["forward_backward"])
            compiled["speedup_ours_over_titans"], compiled["per_round_speedups"] = ratios(*pair)
        compiled["inductor_cache"] = cache["description"]
    default_head: Optional[dict[str, Any]] = None
    if module is not None and not args.skip_default_head:
        mod = build_memory("default_head")
        fn = {"titans-pytorch (dim_head=dim)/forward_backward": lambda: memory_step(mod, x, "forward_backward")}
        reset = lambda: mod.zero_grad(set_to_none=True)  # noqa: E731
        t = interleaved(fn, 1, 0, args.default_head_iters, "memory (titans-pytorch dim_head=dim)", reset, log)
        default_head = {**describe(mod, x, False), "forward_backward": summarize(next(iter(t.values())), tokens)}
    tp = {"available": module is not None, "version": version, "import_error": error, "construction": THEIRS}
    out = {"setting": {**MEMORY, "dtype": "float32", "tokens_per_iteration": tokens}, "titans_pytorch": tp}
    out.update(ours_construction=OURS, modules=info, results=results, comparisons=comparisons, arithmetic=arithmetic)
    out.update(compiled=compiled, titans_default_head=default_head)
    return {**out, "differences": DIFFERENCES if module is not None else []}


TINY = {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]}
D256 = {"dim": 256, "depth": 4, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 256, 2048]}
# size -> batch, sequence, segment length and models (class, keyword arguments); Hope variants' names start "hope"
# fmt: off
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 8, "seq": 256, "segment_len": 128, "models": {
        "hope": (HopeModule, TINY), "hope_target": (HopeModule, {**TINY, "cms_write_signal": "target"}),
        "hope_chunk64": (HopeModule, {**TINY, "chunk_size": 64}),
        "transformer": (TransformerPP, {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0})}},
    "d256": {"batch": 4, "seq": 512, "segment_len": 512, "models": {
        "hope": (HopeModule, D256), "hope_target": (HopeModule, {**D256, "cms_write_signal": "target"}),
        "hope_chunk64": (HopeModule, {**D256, "chunk_size": 64}),
        "transformer_same_shape": (TransformerPP, {"dim": 256, "depth": 4, "heads": 4}),
        "transformer": (TransformerPP, {"dim": 256, "depth": 6, "heads": 4, "mlp_mult": 3.0})}},
}
# fmt: on


class Stepper:
    """One model with its AdamW optimizer and a fixed batch: ``step()`` trains once, ``forward()`` evaluates once."""

    def __init__(self, model: CausalLM, tokens: Tensor) -> None:
        self.model, self.tokens, self.targets = model.train(), tokens, torch.roll(tokens, -1, dims=1)
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
        spec, (batch, seq, segment) = SIZES[size], (SIZES[size][k] for k in ("batch", "seq", "segment_len"))
        tokens = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(SEED + 2))
        steppers: dict[str, Stepper] = {}
        models: dict[str, Any] = {}
        for name, (cls, kwargs) in spec["models"].items():
            torch.manual_seed(SEED)
            steppers[name] = Stepper(model := cls(vocab_size=256, segment_len=segment, **kwargs), tokens)
            text = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
            models[name] = {"architecture": text, "parameters": model.num_parameters()}
            models[name]["parameters_non_embedding"] = model.num_parameters(non_embedding=True)
        fns = {f"{n}/{mode}": getattr(st, mode) for n, st in steppers.items() for mode in ("step", "forward")}
        rounds = args.rounds_lm.get(size, args.rounds)
        times = interleaved(fns, rounds, args.warmup, args.iters, f"lm_step {size}", lambda: None, log)
        results = {k: summarize(v, batch * seq) for k, v in times.items()}
        ratio: dict[str, dict[str, Any]] = {}  # Hope variant -> Transformer++ -> mode -> ratios
        for hope in (n for n in steppers if n.startswith("hope")):
            for name in (n for n in steppers if not n.startswith("hope")):
                for mode in ("step", "forward"):
                    b, a = results[f"{hope}/{mode}"], results[f"{name}/{mode}"]
                    pooled, per_round = ratios(a, b)
                    r = {"hope_time_ratio": pooled, "median_per_round_ratio": statistics.median(per_round)}
                    r.update(per_round_ratios=per_round, cpu_time_ratio=b["cpu_median_ms"] / a["cpu_median_ms"])
                    ratio.setdefault(hope, {}).setdefault(name, {})[mode] = r
        for key, fn in fns.items():
            name, mode = key.split("/")
            counted = counted_gflop(fn)["gflop"]
            layers = [m for m in steppers[name].model.modules() if isinstance(m, CausalSelfAttention)]
            # attention's Q Kᵀ and A V, 4 S² D per sample, layer and segment (backward twice the forward)
            attn = batch * sum(4 * min(segment, seq) ** 2 * m.dim for m in layers) * math.ceil(seq / segment)
            attn *= (3 if mode == "step" else 1) / 1e9
            r = results[key]
            r.update(counted_gflop=counted, attention_gflop=attn, gflop=counted + attn)
            r["achieved_gflop_per_s"] = (counted + attn) / (r["median_ms"] / 1e3)
        for name, st in steppers.items():
            models[name]["losses_finite"] = all(math.isfinite(v) for v in st.losses)
            models[name]["first_and_last_loss"] = [st.losses[0], st.losses[-1]] if st.losses else None
        setting = {"batch": batch, "seq": seq, "segment_len": segment, "tokens_per_iteration": batch * seq}
        setting["rounds"] = rounds
        setting["optimizer"] = "AdamW(lr=1e-3, betas=(0.9, 0.95), weight decay 0.1 on matrices), clip_grad_norm 1.0"
        out[size] = {"setting": setting, "models": models, "results": results, "ratios": ratio}
    return out


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``)."""
    a, parts = report["args"], report["parts"]
    rounds = {"memory": a["rounds"]}
    rounds["lm_step"] = ", ".join(f"{k} {b['setting']['rounds']}" for k, b in parts.get("lm_step", {}).items())
    title = f"Parts: interleaved rounds of ({a['warmup']} warm-up + {a['iters']} timed) calls per variant, mode"
    rows = [[n, f"{sec:.0f}", rounds[n]] for n, sec in report["part_seconds"].items()]
    note = "A shared machine: other load inflates wall times; CPU times are given where it matters."
    out = [table(title, ["part", "seconds", "rounds"], rows, note)]
    return out + (memory_tables(parts["memory"]) if "memory" in parts else []) + lm_tables(parts.get("lm_step", {}))


def x(ratio: float) -> str:
    return f"{num(ratio, '.2f')}×"


def timing(r: dict[str, Any]) -> list[str]:
    """Median, IQR and tokens/s cells of one :func:`_common.summarize` result."""
    iqr = f"{num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')}"
    return [num(r["median_ms"], ".1f"), iqr, num(r["tokens_per_s"], ",.0f")]


def memory_tables(part: dict[str, Any]) -> list[dict[str, Any]]:
    s, tp, a, d = part["setting"], part["titans_pytorch"], part["arithmetic"], part["titans_default_head"]
    ref = "titans-pytorch (dim_head=dim, reference)"
    infos = {**part["modules"], **({ref: d} if d else {})}
    rows = [(*key.split("/"), r) for key, r in part["results"].items()]
    rows += [(ref, "forward_backward", d["forward_backward"])] if d else []
    rates, need = a["machine_gflop_per_s"], a.get("needed_for_2x/forward_backward")
    title = f"NeuralMemory, ours vs titans-pytorch: batch {s['batch']}, sequence {s['seq']}, width {s['dim']},"
    title += f" {s['heads']} heads, chunk {s['chunk']}, depth-{s['depth']} memory MLP (hidden {s['expansion']:g} × the"
    title += " head width), fp32, one call from a fresh state per iteration"
    keys = ("parameters", "parameters_with_grad", "memory_mlp", "output_finite")
    info_rows = [[n, *(i[k] for k in keys)] for n, i in infos.items()]
    note = f"Ours: `{part['ours_construction']}`. " + (
        f"titans-pytorch {tp['version']}: `{tp['construction']}`."
        if tp["available"]
        else f"titans-pytorch is not importable here ({tp['import_error']}): ours is measured alone."
    )
    out = [table(title, ["module", "parameters", "with a gradient", "memory MLP", "output finite"], info_rows, note)]
    columns = ["module", "mode", "median ms", "IQR ms", "tokens/s", "CPU ms (median)"]
    time_rows = [[n, mode, *timing(r), num(r["cpu_median_ms"], ".1f")] for n, mode, r in rows]
    out.append(table("Time per call (interleaved rounds)", columns, time_rows))
    if part["comparisons"]:
        columns = ["mode", "pooled medians", "median of per-round ratios", "CPU-time ratio"]
        keys = ("speedup_ours_over_titans", "median_per_round_speedup", "cpu_speedup")
        cmp_rows = [[mode, *(x(c[k]) for k in keys)] for mode, c in part["comparisons"].items()]
        note = "What differs between the two modules (from their code):\n\n"
        note += "\n".join(f"- {i}" for i in part["differences"])
        out.append(table("Ours ÷ titans-pytorch tokens/s", columns, cmp_rows, note))
    gemm, bmm = rates["gemm_2048"], rates["bmm_16x64x64x128"]
    note = f"This machine, same thread count: a 2048³ fp32 GEMM at {num(gemm, '.0f')} GFLOP/s, the memory's batched"
    note += f" 16 × [64 × 64] @ [64 × 128] product at {num(bmm, '.0f')} GFLOP/s."
    if need is not None:
        note += f" Half titans-pytorch's forward+backward time with ours' FLOPs needs {num(need, '.0f')} GFLOP/s:"
        note += f" {num(need / gemm, '.2f')}× the large-GEMM rate and {num(need / bmm, '.2f')}× the rate of its"
        note += " batched shape."
    title = "Arithmetic: matmul-type GFLOP per call (`FlopCounterMode`); achieved rate = GFLOP ÷ median time"
    rows = [
        [*key.split("/"), num(v["gflop"], ".2f"), num(v["achieved_gflop_per_s"], ".0f")]
        for key, v in a.items()
        if "/" in key and not key.startswith("needed_for_2x")
    ]
    out.append(table(title, ["module", "mode", "GFLOP", "achieved GFLOP/s"], rows, note))
    if c := part.get("compiled"):
        title = f"`{c['construction']}` (inductor, default mode; on-disk cache: {c['inductor_cache']}),"
        columns = ["module", "first call s (compiles)", "max abs diff from eager", "median ms", "IQR ms", "tokens/s"]
        rows = [
            [n, num(i["first_call_s"], ".0f"), f"{i['max_abs_diff_from_eager']:.1e}", *timing(i["forward_backward"])]
            + [x(i["forward_backward"]["speedup_over_eager"])]
            for n, i in c["modules"].items()
        ]
        per, note = c.get("per_round_speedups"), ""
        if per:
            note = f"Compiled, ours ÷ titans-pytorch tokens/s: {x(c['speedup_ours_over_titans'])}"
            note += f" (per-round {min(per):.2f}–{max(per):.2f})."
        out.append(table(title + " forward_backward, interleaved", columns + ["speed-up over eager"], rows, note))
    return out


def lm_tables(part: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for size, block in part.items():
        s, res, models = block["setting"], block["results"], block["models"]
        rows = []
        for key, r in res.items():
            m, (name, mode) = models[key.split("/")[0]], key.split("/")
            gflop = f"{num(r['gflop'], '.2f')} ({num(r['attention_gflop'], '.2f')})"
            rows.append([f"{name}: `{m['architecture']}`", m["parameters"], mode, *timing(r), gflop])
            rows[-1] += [num(r["achieved_gflop_per_s"], ".0f"), m["losses_finite"]]
        ratios = [
            [f"{hope} ÷ {name}", x(r["step"]["hope_time_ratio"]), x(r["forward"]["hope_time_ratio"])]
            + [", ".join(num(v, ".2f") for v in r["step"]["per_round_ratios"])]
            + [x(res[f"{hope}/step"]["gflop"] / res[f"{name}/step"]["gflop"])]
            for hope, against in block["ratios"].items()
            for name, r in against.items()
        ]
        title = f"Hope vs Transformer++, {size}: batch {s['batch']}, sequence {s['seq']}, segments of"
        title += (
            f" {s['segment_len']}; step = `sequence_loss`, backward, clipping 1.0, AdamW; forward = `sequence_loss`"
        )
        title += " under `torch.inference_mode()`; random byte tokens, one fixed batch"
        columns = ["model", "parameters", "mode", "median ms", "IQR ms", "tokens/s", "GFLOP (attention)", "GFLOP/s"]
        note = "GFLOP: matmul-type ops counted by `FlopCounterMode` plus, in brackets and included, the attention"
        note += (
            " products computed analytically (`4 S² D` per sample, layer and segment, backward = 2 × forward), which"
        )
        note += " the counter does not see on CPU."
        out.append(table(title, columns + ["losses finite"], rows, note))
        title = f"Hope ÷ Transformer++ time, {size} (the target: a Hope step at most 2× a Transformer++ step)"
        columns = ["pair", "step time ratio", "forward time ratio", "per-round step ratios", "step GFLOP"]
        out.append(table(title, columns, ratios))
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, PARTS)
    add = parser.add_argument
    add("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES), help="lm_step sizes")
    add("--rounds", type=int, help="interleaved rounds (default 5; 2 with --quick)")
    add("--rounds-d256", type=int, help="rounds for the d256 size (default 3; 1 with --quick)")
    add("--iters", type=int, help="timed iterations per round (default 3; 1 with --quick)")
    add("--warmup", type=int, help="untimed iterations per round (default 1; 0 with --quick)")
    add("--default-head-iters", type=int, default=2, help="timed calls of titans' dim_head=dim (2)")
    add("--skip-default-head", action="store_true", help="do not time titans-pytorch's default head (--quick: skipped)")
    add("--skip-compile", action="store_true", help="do not time the torch.compile'd memories (--quick: skipped)")
    args = parser.parse_args(argv)
    args.parts, q = parse_parts(parser, args.parts, PARTS), args.quick
    args.rounds, args.iters = args.rounds or (2 if q else 5), args.iters or (1 if q else 3)
    args.warmup = (0 if q else 1) if args.warmup is None else args.warmup
    args.rounds_lm = {"d256": args.rounds_d256 or (1 if q else 3)}
    args.skip_default_head, args.skip_compile = args.skip_default_head or q, args.skip_compile or q
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --iters, --threads must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    module, error, version = titans()
    env = environment(args.threads, SOURCES, executable=sys.executable, titans_pytorch=version)
    if module is not None:
        path = os.path.join(os.path.dirname(module.__file__), "neural_memory.py")
        env["sources"]["titans_pytorch/neural_memory.py"] = sha256_of(path)
    else:
        log(f"titans_pytorch is not importable ({error}); measuring ours alone")
    report = report_header(TITLE, "benchmarks/memory_speed.py", argv, dict(vars(args)), env, python=sys.executable)
    report["threads"] = args.threads
    with contextlib.redirect_stdout(sys.stderr):
        runners = {"memory": part_memory, "lm_step": part_lm_step}
        run_parts(report, {name: lambda f=runners[name]: f(args) for name in args.parts}, log)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
