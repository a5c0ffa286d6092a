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
"""Where a Hope block's time goes, and what compiling the self-modifying Titans' chunk step buys.

``benchmarks/memory_speed.py`` times the whole Hope training step against the Transformer++; this script takes the
block apart, to say what stands between Hope and the issue's 2x target. fp32 on CPU, one thread by default; every
number is measured in this process; the sha256 of the measured sources is in the JSON.

Part 1, ``blocks``: the two halves of one ``HopeBlock(dim=256, heads=4, chunk_size=C, cms_chunk_sizes=[16, 256,
2048])`` (a block of the d256 model of ``memory_speed.py``) at batch 4 and 512 tokens, ``C`` = 16 and 64: the
self-modifying Titans (with the block's RMSNorm in front) and the CMS, each forward from a fresh state, then
``y.sum().backward()`` into a leaf input (gradients reset outside the timed region). Reported: median ms, the
matmul-type GFLOP (``FlopCounterMode``) and the rate, and the two halves times the model's depth (4).

Part 2, ``compile``: one ``SelfModifyingTitans(dim, heads=4, chunk_size=C)`` layer, forward+backward as above, eager
against a copy (same weights) whose chunk step is compiled: its ``_generate`` (``k, v, η, α`` from the generators'
outputs) and ``_write`` (targets and gradients at the anchors, then the DGD recurrence of Eq. 88 over the chunk)
wrapped in ``torch.compile(dynamic=False)``, one graph that every chunk of that shape reuses (the chunk loop itself
stays in Python). Sizes: ``tiny`` (batch 8, 128 tokens, dim 64: a segment of the CPU text recipes) and ``d256``
(batch 4, 512 tokens, dim 256), ``C`` = 16 and 64. Reported: the first compiled call's wall time (compilation in a
fresh on-disk inductor cache per configuration), the largest absolute difference of the compiled output from the
eager one, both medians and the speed-up.

Both parts interleave their variants (ABBA rounds of ``--warmup`` untimed and ``--iters`` timed calls each) so that
drift of a shared machine hits them alike.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/hope_layers.py --out benchmarks/results/hope_layers.json \\
        --markdown benchmarks/results/hope_layers.md      # ~4 min with 1 thread, most of it compiling
    python benchmarks/hope_layers.py --quick                # smoke run: few iterations, no compile part
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
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
from nl_lightning.models.hope import HopeBlock
from nl_lightning.models.self_modifying_titans import SelfModifyingTitans

SEED = 0
PARTS = ("blocks", "compile")
DEPTH = 4  # blocks of the d256 HopeModule in memory_speed.py
CHUNKS = (16, 64)
BLOCK = {"batch": 4, "seq": 512, "dim": 256, "heads": 4, "cms_chunk_sizes": [16, 256, 2048]}
LAYER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"batch": 8, "seq": 128, "dim": 64, "heads": 4},
    "d256": {"batch": 4, "seq": 512, "dim": 256, "heads": 4},
}


def log(message: str) -> None:
    print(f"[hope_layers] {message}", file=sys.stderr, flush=True)


def leaf_input(batch: int, seq: int, dim: int) -> Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(batch, seq, dim, generator=gen).requires_grad_()


def forward_backward(fn: Callable[[], Tensor]) -> Callable[[], None]:
    def run() -> None:
        fn().sum().backward()

    return run


def reset(modules: Sequence[nn.Module], x: Tensor) -> Callable[[], None]:
    def after() -> None:
        x.grad = None
        for m in modules:
            m.zero_grad(set_to_none=True)

    return after


# ---------------------------------------------------------------------------------------------------- part 1
def part_blocks(args: argparse.Namespace) -> dict[str, Any]:
    b = BLOCK
    x = leaf_input(b["batch"], b["seq"], b["dim"])
    tokens = b["batch"] * b["seq"]
    fns: dict[str, Callable[[], None]] = {}
    blocks = []
    for c in CHUNKS:
        torch.manual_seed(SEED)
        block = HopeBlock(b["dim"], b["heads"], c, b["cms_chunk_sizes"])
        blocks.append(block)
        fns[f"titans_c{c}"] = forward_backward(lambda block=block: block.mixer(block.norm(x))[0])
        fns[f"cms_c{c}"] = forward_backward(lambda block=block: block.cms(x)[0])
    after = reset(blocks, x)
    gflop = {}
    for name, fn in fns.items():
        gflop[name] = counted_gflop(fn)["gflop"]
        after()
    times = interleaved(fns, args.rounds, args.warmup, args.iters, "blocks", after, log)
    results = {}
    for name in fns:
        r = summarize(times[name], tokens)
        results[name] = {**r, "gflop": gflop[name], "gflop_per_s": gflop[name] / (r["median_ms"] / 1e3)}
    per_model = {
        f"c{c}": {
            "titans_x_depth_ms": DEPTH * results[f"titans_c{c}"]["median_ms"],
            "cms_x_depth_ms": DEPTH * results[f"cms_c{c}"]["median_ms"],
        }
        for c in CHUNKS
    }
    return {
        "config": {**b, "chunk_sizes": list(CHUNKS), "depth": DEPTH},
        "construction": f"HopeBlock({b['dim']}, {b['heads']}, chunk_size=C, cms_chunk_sizes={b['cms_chunk_sizes']})",
        "results": results,
        "per_model": per_model,
    }


# ---------------------------------------------------------------------------------------------------- part 2
def compile_chunk_step(layer: SelfModifyingTitans) -> SelfModifyingTitans:
    """A copy of ``layer`` (same weights) whose ``_generate`` and ``_write`` are ``torch.compile`` d."""
    compiled = copy.deepcopy(layer)
    compiled._generate = torch.compile(compiled._generate, dynamic=False)
    compiled._write = torch.compile(compiled._write, dynamic=False)
    return compiled


def compile_one(size: str, c: int, args: argparse.Namespace) -> dict[str, Any]:
    """One layer of ``LAYER_SIZES[size]`` at chunk ``c``: eager against the compiled chunk step (compiled with a
    fresh on-disk inductor cache)."""
    with fresh_inductor_cache("hope_layers") as cache:
        out = _compile_one(size, c, args)
    return {**out, "inductor_cache": cache["description"]}


def _compile_one(size: str, c: int, args: argparse.Namespace) -> dict[str, Any]:
    s = LAYER_SIZES[size]
    x = leaf_input(s["batch"], s["seq"], s["dim"])
    torch.manual_seed(SEED)
    eager = SelfModifyingTitans(s["dim"], s["heads"], c)
    compiled = compile_chunk_step(eager)
    after = reset([eager, compiled], x)
    log(f"compile {size} c{c}: compiling ...")
    t0 = time.perf_counter()
    y = compiled(x)[0]
    y.sum().backward()
    first = time.perf_counter() - t0
    after()
    with torch.no_grad():
        diff = float((y - eager(x)[0]).abs().max())
    log(f"compile {size} c{c}: first call {first:.0f} s, max abs diff {diff:.1e}")
    fns = {"eager": forward_backward(lambda: eager(x)[0]), "compiled": forward_backward(lambda: compiled(x)[0])}
    times = interleaved(fns, args.rounds, args.warmup, args.iters, f"compile {size} c{c}", after, log)
    res = {name: summarize(times[name], s["batch"] * s["seq"]) for name in fns}
    return {
        "config": {**s, "chunk_size": c},
        "first_call_s": first,
        "max_abs_diff_from_eager": diff,
        **res,
        "speedup": res["eager"]["median_ms"] / res["compiled"]["median_ms"],
    }


def part_compile(args: argparse.Namespace) -> dict[str, Any]:
    results = {f"{size}/c{c}": compile_one(size, c, args) for size in args.sizes for c in CHUNKS}
    return {
        "construction": "SelfModifyingTitans(dim, heads=4, chunk_size=C) with _generate and _write wrapped in"
        " torch.compile(dynamic=False)",
        "results": results,
    }


# ---------------------------------------------------------------------------------------------------- report
def blocks_markdown(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    lines = [
        "## 1. One Hope block, taken apart",
        "",
        f"`{part['construction']}`, batch {cfg['batch']}, {cfg['seq']} tokens, forward from a fresh state and backward"
        " of `y.sum()` into the input; interleaved rounds.",
        "",
        "| half | Titans chunk | median ms | IQR ms | GFLOP | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for c in cfg["chunk_sizes"]:
        for half in ("titans", "cms"):
            r = part["results"][f"{half}_c{c}"]
            lines.append(
                f"| {'self-modifying Titans (+ RMSNorm)' if half == 'titans' else 'CMS'} | {c} |"
                f" {num(r['median_ms'], '.1f')} | {num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')} |"
                f" {num(r['gflop'], '.2f')} | {num(r['gflop_per_s'], '.0f')} |"
            )
    lines += ["", f"Times {cfg['depth']} (the depth of the d256 model):", ""]
    for c in cfg["chunk_sizes"]:
        m = part["per_model"][f"c{c}"]
        total = m["titans_x_depth_ms"] + m["cms_x_depth_ms"]
        lines.append(
            f"- chunk {c}: self-modifying Titans {num(m['titans_x_depth_ms'] / 1e3, '.2f')} s + CMS"
            f" {num(m['cms_x_depth_ms'] / 1e3, '.2f')} s = {num(total / 1e3, '.2f')} s per step (embedding, head,"
            " loss and optimizer not included; `memory_speed.py` times the whole step)."
        )
    return lines


def compile_markdown(part: dict[str, Any]) -> list[str]:
    lines = [
        "## 2. Compiling the self-modifying Titans' chunk step",
        "",
        f"`{part['construction']}`; a fresh on-disk inductor cache per row (kernels compiled in this process before"
        " may still be reused from memory). One layer, forward+backward, interleaved rounds.",
        "",
        "| size | chunk | first call s (compiles) | max abs diff from eager | eager ms | compiled ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in part["results"].items():
        size, chunk = key.split("/")
        lines.append(
            f"| {size} (batch {r['config']['batch']}, {r['config']['seq']} tokens, dim {r['config']['dim']}) |"
            f" {chunk[1:]} | {num(r['first_call_s'], '.0f')} | {r['max_abs_diff_from_eager']:.1e} |"
            f" {num(r['eager']['median_ms'], '.1f')} | {num(r['compiled']['median_ms'], '.1f')} |"
            f" {num(r['speedup'], '.2f')}× |"
        )
    caches = "; ".join(f"{key}: {r['inductor_cache']}" for key, r in part["results"].items())
    return lines + ["", f"Inductor caches: {caches}."]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Hope block breakdown and the compiled chunk step",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['timestamp']}; nl_lightning {env['nl_lightning']}, torch {env['torch']}, Python {env['python']},"
        f" {env['cpu_count']} CPU core(s), {env['torch_num_threads']} torch thread(s); rounds:"
        f" {report['args']['rounds']} × ({report['args']['warmup']} warm-up + {report['args']['iters']} timed);"
        f" total {report['wall_s']:.0f} s."
        " A shared machine: other load inflates wall times.",
        "",
    ]
    if "blocks" in report["parts"]:
        lines += blocks_markdown(report["parts"]["blocks"]) + [""]
    if "compile" in report["parts"]:
        lines += compile_markdown(report["parts"]["compile"]) + [""]
    return "\n".join(lines)


def environment(threads: int) -> dict[str, Any]:
    root = Path(nl_lightning.__file__).parent
    names = ("hope.py", "self_modifying_titans.py", "_residual_memory.py", "cms.py", "cms_memory.py")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nl_lightning": nl_lightning.__version__,
        "torch_num_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "sources": {f"nl_lightning/models/{n}": sha256_of(str(root / "models" / n)) for n in names},
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="blocks, compile (both)")
    parser.add_argument("--sizes", nargs="+", choices=tuple(LAYER_SIZES), default=list(LAYER_SIZES), help="compile")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 1 with --quick)")
    parser.add_argument("--iters", type=int, help="timed iterations per round (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed iterations per round (default 1; 0 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round of one iteration, no compile part")
    args = parser.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 5)
    args.iters = args.iters or (1 if q else 3)
    args.warmup = (0 if q else 1) if args.warmup is None else args.warmup
    if q:
        args.parts = [p for p in args.parts if p != "compile"]
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --iters, --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "Hope block breakdown and the compiled self-modifying Titans chunk step",
        "benchmarks/hope_layers.py",
        argv,
        vars(args),
        environment(args.threads),
        python=sys.executable,
    )
    parts = {"blocks": part_blocks, "compile": part_compile}
    run_parts(report, {name: partial(parts[name], args) for name in PARTS if name in args.parts}, log)
    return emit(report, started, markdown, args.out, args.markdown, log)


if __name__ == "__main__":
    main()
