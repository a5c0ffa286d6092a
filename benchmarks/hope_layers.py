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

fp32 on CPU, one thread by default; the sha256 of the measured sources is in the JSON.

- ``blocks``: the two halves of one ``HopeBlock(256, 4, chunk_size=C, cms_chunk_sizes=[16, 256, 2048])`` (a block of
  the d256 model of ``memory_speed.py``) at batch 4, 512 tokens, ``C`` = 16 and 64: the self-modifying Titans (with
  the block's RMSNorm) and the CMS, each forward from a fresh state then ``y.sum().backward()`` into a leaf input.
  Reported: median ms, matmul-type GFLOP (``FlopCounterMode``) and rate, and the halves times the model's depth (4).
- ``compile``: one ``SelfModifyingTitans(dim, 4, C)`` layer, forward+backward, eager against a copy (same weights)
  whose ``_generate`` and ``_write`` are wrapped in ``torch.compile(dynamic=False)``, at sizes ``tiny`` (batch 8, 128
  tokens, dim 64) and ``d256`` (batch 4, 512 tokens, dim 256); before timing, the largest absolute difference from
  the eager output, and the first call's wall time (a cold compile in a fresh inductor cache).

Both parts interleave their variants (ABBA rounds of ``--warmup`` untimed and ``--iters`` timed calls each).

Running it::

    OMP_NUM_THREADS=1 python benchmarks/hope_layers.py --out benchmarks/results/hope_layers.json   # ~4 min
    python benchmarks/hope_layers.py --quick --out /tmp/hope_layers.json   # smoke run: 1 iteration, no compile part
    python benchmarks/render.py hope_layers                                  # the page
"""

from __future__ import annotations

import copy
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
    summarize,
)
from torch import Tensor, nn

from nl_lightning.models.hope import HopeBlock
from nl_lightning.models.self_modifying_titans import SelfModifyingTitans

TITLE = "Hope block breakdown and the compiled chunk step"
SEED, DEPTH, CHUNKS = 0, 4, (16, 64)  # DEPTH: blocks of the d256 HopeModule in memory_speed.py
BLOCK = {"batch": 4, "seq": 512, "dim": 256, "heads": 4, "cms_chunk_sizes": [16, 256, 2048]}
LAYER_SIZES = {"tiny": {"batch": 8, "seq": 128, "dim": 64, "heads": 4},
               "d256": {"batch": 4, "seq": 512, "dim": 256, "heads": 4}}  # fmt: skip
SOURCES = ["models/hope.py", "models/self_modifying_titans.py", "models/_residual_memory.py", "models/cms.py",
           "models/cms_memory.py"]  # fmt: skip
log = make_log("hope_layers")


def setup(s: dict[str, int], modules: Sequence[nn.Module]) -> tuple[Tensor, Callable[[], None]]:
    """A seeded leaf input of size ``s`` and the untimed reset between calls (its and the modules' gradients)."""
    x = torch.randn(s["batch"], s["seq"], s["dim"], generator=torch.Generator().manual_seed(SEED + 1)).requires_grad_()

    def after() -> None:
        x.grad = None
        for m in modules:
            m.zero_grad(set_to_none=True)

    return x, after


def forward_backward(fn: Callable[[], Tensor]) -> Callable[[], None]:
    return lambda: fn().sum().backward()


def part_blocks(args: Any) -> dict[str, Any]:
    b, fns, blocks = BLOCK, {}, []
    for c in CHUNKS:
        torch.manual_seed(SEED)
        blocks.append(HopeBlock(b["dim"], b["heads"], c, b["cms_chunk_sizes"]))
    x, after = setup(b, blocks)
    for c, block in zip(CHUNKS, blocks, strict=True):
        fns[f"titans_c{c}"] = forward_backward(lambda block=block: block.mixer(block.norm(x))[0])
        fns[f"cms_c{c}"] = forward_backward(lambda block=block: block.cms(x)[0])
    gflop = {}
    for name, fn in fns.items():
        gflop[name] = counted_gflop(fn)["gflop"]
        after()
    times = interleaved(fns, args.rounds, args.warmup, args.iters, "blocks", after, log)
    results = {n: summarize(times[n], b["batch"] * b["seq"]) for n in fns}
    results = {n: {**r, "gflop": gflop[n], "gflop_per_s": gflop[n] / (r["median_ms"] / 1e3)}
               for n, r in results.items()}  # fmt: skip
    return {
        "config": {**b, "chunk_sizes": list(CHUNKS), "depth": DEPTH},
        "construction": f"HopeBlock({b['dim']}, {b['heads']}, chunk_size=C, cms_chunk_sizes={b['cms_chunk_sizes']})",
        "results": results,
        "per_model": {f"c{c}": {f"{h}_x_depth_ms": DEPTH * results[f"{h}_c{c}"]["median_ms"] for h in ("titans", "cms")}
                      for c in CHUNKS},
    }  # fmt: skip


def compile_one(size: str, c: int, args: Any) -> dict[str, Any]:
    """One layer of ``LAYER_SIZES[size]`` at chunk ``c``: eager against the compiled chunk step (cold compile)."""
    s = LAYER_SIZES[size]
    with fresh_inductor_cache("hope_layers") as cache:
        torch.manual_seed(SEED)
        eager = SelfModifyingTitans(s["dim"], s["heads"], c)
        compiled = copy.deepcopy(eager)
        compiled._generate = torch.compile(compiled._generate, dynamic=False)
        compiled._write = torch.compile(compiled._write, dynamic=False)
        x, after = setup(s, [eager, compiled])
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
    return {"config": {**s, "chunk_size": c}, "first_call_s": first, "max_abs_diff_from_eager": diff, **res,
            "speedup": res["eager"]["median_ms"] / res["compiled"]["median_ms"],
            "inductor_cache": cache["description"]}  # fmt: skip


def part_compile(args: Any) -> dict[str, Any]:
    return {"construction": "SelfModifyingTitans(dim, heads=4, chunk_size=C) with _generate and _write wrapped in"
            " torch.compile(dynamic=False)",
            "results": {f"{size}/c{c}": compile_one(size, c, args) for size in args.sizes for c in CHUNKS}}  # fmt: skip


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables: the block's halves, times the depth, and the compiled chunk step."""
    parts, a, out = report["parts"], report["args"], []
    timing = f"Interleaved rounds: {a['rounds']} × ({a['warmup']} warm-up + {a['iters']} timed calls)."
    if "blocks" in parts:
        p, cfg = parts["blocks"], parts["blocks"]["config"]
        rows = [[label, c, num(r["median_ms"], ".1f"), f"{num(r['p25_ms'], '.1f')}–{num(r['p75_ms'], '.1f')}",
                 num(r["gflop"], ".2f"), num(r["gflop_per_s"], ".0f")]
                for c in cfg["chunk_sizes"]
                for half, label in (("titans", "self-modifying Titans (+ RMSNorm)"), ("cms", "CMS"))
                for r in [p["results"][f"{half}_c{c}"]]]  # fmt: skip
        out.append({"title": f"One block, `{p['construction']}`, batch {cfg['batch']}, {cfg['seq']} tokens, forward"
                    " from a fresh state + backward of `y.sum()` into the input",
                    "columns": ["half", "Titans chunk", "median ms", "IQR ms", "GFLOP", "GFLOP/s"], "rows": rows,
                    "note": timing})  # fmt: skip
        rows = [[c, num(t, ".2f"), num(s, ".2f"), num(t + s, ".2f")] for c in cfg["chunk_sizes"]
                for t, s in [(p["per_model"][f"c{c}"]["titans_x_depth_ms"] / 1e3,
                              p["per_model"][f"c{c}"]["cms_x_depth_ms"] / 1e3)]]  # fmt: skip
        out.append({"title": f"Times {cfg['depth']} (the depth of the d256 model), seconds per step",
                    "columns": ["Titans chunk", "self-modifying Titans", "CMS", "sum"], "rows": rows,
                    "note": "Embedding, head, loss and optimizer are not included; `memory_speed.py` times the whole"
                    " step."})  # fmt: skip
    if "compile" in parts:
        p = parts["compile"]
        rows = [[f"{key.split('/')[0]} (batch {r['config']['batch']}, {r['config']['seq']} tokens, dim"
                 f" {r['config']['dim']})", r["config"]["chunk_size"], num(r["first_call_s"], ".0f"),
                 f"{r['max_abs_diff_from_eager']:.1e}", num(r["eager"]["median_ms"], ".1f"),
                 num(r["compiled"]["median_ms"], ".1f"), f"{num(r['speedup'], '.2f')}×"]
                for key, r in p["results"].items()]  # fmt: skip
        caches = "; ".join(f"{key}: {r['inductor_cache']}" for key, r in p["results"].items())
        out.append({"title": f"One layer, forward+backward, `{p['construction']}`",
                    "columns": ["size", "chunk", "first call s (compiles)", "max abs diff from eager", "eager ms",
                                "compiled ms", "speed-up"],
                    "rows": rows, "note": f"{timing} Inductor caches: {caches}."})  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, parts=("blocks", "compile"))
    parser.add_argument("--sizes", nargs="+", choices=tuple(LAYER_SIZES), default=list(LAYER_SIZES))
    parser.add_argument("--rounds", type=int, help="interleaved rounds (5; 1 with --quick)")
    parser.add_argument("--iters", type=int, help="timed calls per round (3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed calls per round (1; 0 with --quick)")
    args = parser.parse_args(argv)
    q = args.quick
    args.rounds, args.iters = args.rounds or (1 if q else 5), args.iters or (1 if q else 3)
    args.warmup = (0 if q else 1) if args.warmup is None else args.warmup
    args.parts = [p for p in parse_parts(parser, args.parts, ("blocks", "compile")) if not (q and p == "compile")]
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error(f"--rounds, --iters, --threads must be >= 1 and --warmup >= 0, got {vars(args)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(TITLE, "benchmarks/hope_layers.py", argv, vars(args), environment(args.threads, SOURCES),
                           python=sys.executable)  # fmt: skip
    runners = {"blocks": partial(part_blocks, args), "compile": partial(part_compile, args)}
    run_parts(report, {name: runners[name] for name in args.parts}, log)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
