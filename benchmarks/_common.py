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
"""Helpers shared by the benchmark scripts (``benchmarks/*.py`` import it as ``_common``; not part of the package)."""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import io
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

DASH = "–"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), median, min, max of the finite values; ``None`` marks a missing or diverged run."""
    ok = [float(v) for v in values if finite(v)]
    out: dict[str, Any] = {"values": list(values), "n": len(values), "n_defined": len(ok)}
    if not ok:
        return {**out, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        **out,
        "mean": statistics.fmean(ok),
        "std": statistics.stdev(ok) if len(ok) > 1 else None,
        "median": statistics.median(ok),
        "min": min(ok),
        "max": max(ok),
    }


def cell(entry: dict[str, Any], spec: str = ".3f", missing: str = "no value") -> str:
    """``mean ± std`` of a :func:`summary` over its defined values, with ``(k/n)`` when only ``k`` of ``n`` runs
    are defined (``missing (0/n)`` when none is)."""
    if entry["mean"] is None:
        return f"{missing} (0/{entry['n']})" if entry["n"] else DASH
    text = num(entry["mean"], spec) + ("" if entry["std"] is None else f" ± {num(entry['std'], spec)}")
    return text if entry["n_defined"] == entry["n"] else f"{text} ({entry['n_defined']}/{entry['n']})"


def rounded(x: Any, digits: int = 6) -> Any:
    """Round floats (recursively) to ``digits`` significant digits for the JSON; NaN and inf become strings."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    return x


def num(x: Any, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec``; a dash for ``None``, and non-finite values (strings in the rounded JSON) as is."""
    if x is None:
        return DASH
    if isinstance(x, (int, float)) and math.isfinite(x):
        return format(x, spec)
    return str(x)


def report_header(
    benchmark: str,
    script: str,
    argv: Optional[Sequence[str]],
    args: dict[str, Any],
    environment: dict[str, Any],
    python: str = "python",
) -> dict[str, Any]:
    """The fields every benchmark report starts with: what it measures, when, the command that ran it (``python``
    then ``script`` and ``argv``, the process's own arguments when ``None``), its arguments and its environment."""
    argv_used = sys.argv[1:] if argv is None else list(argv)
    return {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([python, script, *argv_used]),
        "args": args,
        "environment": environment,
    }


def run_parts(
    report: dict[str, Any], runners: dict[str, Callable[[], dict[str, Any]]], log: Callable[[str], None]
) -> None:
    """Run ``runners`` in order, each into ``report["parts"][name]``, its wall time into ``report["part_seconds"]``."""
    parts, seconds = report.setdefault("parts", {}), report.setdefault("part_seconds", {})
    for name, run in runners.items():
        t0 = time.perf_counter()
        log(f"part {name} ...")
        parts[name] = run()
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"part {name}: {seconds[name]:.0f} s")


def emit(
    report: dict[str, Any],
    started: float,
    to_markdown: Callable[[dict[str, Any]], str],
    out: Optional[str],
    markdown_path: Optional[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Finish a benchmark: record the wall time, round the figures, write the Markdown report (``markdown_path``) and
    the JSON (``out``, then the report goes to stdout; without ``out`` the JSON goes to stdout). Returns the rounded
    report."""
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report = rounded(report)
    text = to_markdown(report)
    if markdown_path:
        Path(markdown_path).write_text(text)
    data = json.dumps(report, indent=1, ensure_ascii=False)
    if out:
        Path(out).write_text(data + "\n")
        print(text, end="")
    else:
        print(data)
    log(f"done in {report['wall_s']:.0f} s")
    return report


@contextlib.contextmanager
def quiet(sink: io.StringIO, verbose: bool = False) -> Iterator[None]:
    """Silence Lightning's info logs and warnings and send the run's own output (stdout and stderr) to ``sink``, so that
    stdout keeps only the report; with ``verbose`` everything goes to stderr instead."""
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def ranked(items: dict[str, Optional[float]], reverse: bool = False) -> list[tuple[str, float]]:
    return sorted(((k, v) for k, v in items.items() if v is not None), key=lambda kv: kv[1], reverse=reverse)


def proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = proc_status_kib("VmHWM"), proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(rounds: list[list[tuple[float, float]]], tokens: int) -> dict[str, Any]:
    """Pooled statistics of one timed function: ``rounds`` holds the timed ``(wall, cpu)`` seconds of each round."""
    wall = [w for r in rounds for w, _ in r]
    p25, med, p75 = quartiles(wall)
    return {
        "median_ms": med * 1e3,
        "p25_ms": p25 * 1e3,
        "p75_ms": p75 * 1e3,
        "tokens_per_s": tokens / med,
        "iterations": len(wall),
        "per_round_median_ms": [statistics.median(w for w, _ in r) * 1e3 for r in rounds],
        "cpu_median_ms": statistics.median(c for r in rounds for _, c in r) * 1e3,
    }


def interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    iters: int,
    label: str,
    after: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, list[list[tuple[float, float]]]]:
    """Time every function in interleaved rounds (order reversed every other round); ``after`` runs untimed.

    Returns, per function, the timed ``(wall, cpu)`` seconds of each round (``warmup`` untimed calls first in each).
    """
    keys = list(fns)
    for k in keys:  # untimed pre-warm of everything
        fns[k]()
        after()
    times: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            gc.collect()
            out = []
            for i in range(warmup + iters):
                c0, t0 = time.process_time(), time.perf_counter()
                fns[k]()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                after()
                if i >= warmup:
                    out.append((wall, cpu))
            times[k].append(out)
        med = {k: f"{statistics.median(w for w, _ in times[k][-1]) * 1e3:.0f}" for k in keys}
        log(f"{label} round {r + 1}/{rounds}: median ms {med}")
    return times


def source_hashes(names: Sequence[str]) -> dict[str, Optional[dict[str, str]]]:
    """``{"nl_lightning/<name>": sha256_of(...)}`` for the package files ``names`` that exist: the code a report ran
    on."""
    import nl_lightning

    root = Path(nl_lightning.__file__).parent
    return {f"nl_lightning/{n}": sha256_of(str(root / n)) for n in names if (root / n).exists()}


def environment(threads: int, sources: Optional[Sequence[str]] = None, **extra: Any) -> dict[str, Any]:
    """Versions, thread settings and machine of a report; ``extra`` fields follow the versions, and ``sources`` (package
    file names) adds their :func:`source_hashes`."""
    import platform

    import lightning
    import torch

    import nl_lightning

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "nl_lightning": nl_lightning.__version__,
        **extra,
        "torch_num_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if sources is not None:
        env["sources"] = source_hashes(sources)
    return env


def same_sources(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``{file: sha256_of(file)}`` records name the same files with the same contents (modification times
    may differ, e.g. in a separate checkout of the same commit)."""

    def digests(record: dict[str, Any]) -> dict[str, Optional[str]]:
        return {k: (v or {}).get("sha256") if isinstance(v, dict) or v is None else v for k, v in record.items()}

    return digests(a) == digests(b)


def sha256_of(path: Optional[str]) -> Optional[dict[str, str]]:
    """sha256 and modification time of a file (``None`` if there is none)."""
    if path is None or not os.path.exists(path):
        return None
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "mtime": stamp.isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def fresh_inductor_cache(prefix: str) -> Iterator[dict[str, str]]:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at a fresh temporary directory for the block, so that a first
    ``torch.compile`` call there is a cold compile; a value the user set (other than inductor's default, which
    importing lightning sets) is kept. The yielded dict gets ``description`` (for the report) when the block ends."""
    try:  # private: inductor's default cache directory
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: any value then counts as the user's
        default = None
    else:
        default = default_cache_dir()
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    kept = None if before is None or before == default else before
    info: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"{prefix}_inductor_") as tmp:
        if kept is None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield info
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
            files = sum(len(names) for _, _, names in os.walk(tmp))
            info["description"] = (
                f"a fresh directory, cold compile ({files} files written)"
                if kept is None
                else f"TORCHINDUCTOR_CACHE_DIR={kept} (may be warm)"
            )


def counted_gflop(fn: Callable[[], None]) -> dict[str, Any]:
    """GFLOP of the matmul-type ops (mm, bmm, addmm, baddbmm, convolutions) one call of ``fn`` runs, forward and
    backward, by ``torch.utils.flop_counter.FlopCounterMode`` (elementwise ops are not counted; nor is CPU
    ``scaled_dot_product_attention``, which the counter does not register)."""
    from torch.utils.flop_counter import FlopCounterMode  # torch only where a script counts

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op): n / 1e9 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"gflop": counter.get_total_flops() / 1e9, "by_op": by_op}
