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

import argparse
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
    """Whether ``x`` is a finite number."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), median, min, max of the finite values; ``None`` marks a missing or diverged run."""
    ok = [float(v) for v in values if finite(v)]
    out: dict[str, Any] = {"values": list(values), "n": len(values), "n_defined": len(ok)}
    if not ok:
        return {**out, "mean": None, "std": None, "median": None, "min": None, "max": None}
    mid = {"mean": statistics.fmean(ok), "std": statistics.stdev(ok) if len(ok) > 1 else None}
    return {**out, **mid, "median": statistics.median(ok), "min": min(ok), "max": max(ok)}


def cell(entry: dict[str, Any], spec: str = ".3f", missing: str = "no value") -> str:
    """``mean ± std`` of a :func:`summary`, with ``(k/n)`` when only ``k`` of ``n`` runs are defined."""
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
    return [rounded(v, digits) for v in x] if isinstance(x, (list, tuple)) else x


def num(x: Any, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec``; a dash for ``None``, non-finite values (strings in the JSON) as they are."""
    if x is None:
        return DASH
    return format(x, spec) if finite(x) else str(x)


def table(title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> dict[str, Any]:
    """One table of a page (``benchmarks/render.py``); the note is left out when empty."""
    return {"title": title, "columns": columns, "rows": rows, **({"note": note} if note else {})}


def arguments(doc: str, parts: Sequence[str] = (), seeds: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser with the flags every script shares: ``--out``, ``--quick``, ``--threads``, and ``--parts`` (when the
    script has ``parts``) and ``--seeds`` (with the help text ``seeds``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, not a measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    if parts:
        parser.add_argument("--parts", nargs="+", default=list(parts), help=f"{', '.join(parts)} (default: all)")
    if seeds:
        parser.add_argument("--seeds", nargs="+", type=int, help=seeds)
    return parser


def parse_parts(parser: Any, given: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """The ``--parts`` asked for (space- or comma-separated) in ``allowed``'s order; errors name unknown ones."""
    parts = [p for item in given for p in item.split(",") if p]
    unknown = sorted(set(parts) - set(allowed))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {list(allowed)}")
    return [p for p in allowed if p in parts]


def report_header(
    benchmark: str,
    script: str,
    argv: Optional[Sequence[str]],
    args: dict[str, Any],
    environment: dict[str, Any],
    python: str = "python",
) -> dict[str, Any]:
    """The fields every report starts with: what it measures, when, the command (``python script argv``, the
    process's own arguments when ``argv`` is ``None``), its arguments and environment."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = shlex.join([python, script, *(sys.argv[1:] if argv is None else argv)])
    return {"benchmark": benchmark, "timestamp": stamp, "command": command, "args": args, "environment": environment}


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


def make_log(name: str) -> Callable[[str], None]:
    """A progress logger: ``[name] message`` on the process's own stderr (also from inside :func:`quiet`)."""
    return lambda message: print(f"[{name}] {message}", file=sys.__stderr__, flush=True)


def save(report: dict[str, Any], started: float, out: Optional[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Record the wall time, round the figures and write the JSON to ``out`` (stdout without it); returns the
    rounded report (``python benchmarks/render.py`` turns it into its page)."""
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report = rounded(report)
    data = json.dumps(report, indent=1, ensure_ascii=False)
    if out:
        Path(out).write_text(data + "\n")
    else:
        print(data)
    log(f"done in {report['wall_s']:.0f} s" + (f"; wrote {out} (render: python benchmarks/render.py)" if out else ""))
    return report


def cpu_trainer(**kwargs: Any) -> Any:
    """A quiet single-process CPU ``Trainer``: no logger, checkpoints, progress bar or model summary."""
    import lightning.pytorch as pl

    defaults = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return pl.Trainer(**{**defaults, "enable_model_summary": False, "accelerator": "cpu", "devices": 1, **kwargs})


def step_stats() -> Any:
    """A callback recording every training step's wall time (``times``) and loss (``losses``); it stops the fit at
    the first non-finite loss, whose 1-based step it keeps in ``first_nonfinite``."""
    import lightning.pytorch as pl

    class StepStats(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self.first_nonfinite: Optional[int] = None
            self._t0 = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.times.append(time.perf_counter() - self._t0)
            self.losses.append(float(outputs["loss"]))
            if not math.isfinite(self.losses[-1]) and self.first_nonfinite is None:
                self.first_nonfinite = len(self.losses)
                trainer.should_stop = True

    return StepStats()


def stream_nll(
    model: Any, tokens: Any, targets: Any, segment: int, write: bool = True, after: Optional[Callable] = None
) -> Any:
    """Per-token cross-entropy (float64) of a causal LM reading ``tokens`` ``(1, L)`` against ``targets``
    ``segment`` tokens at a time, state carried, ``write`` passed on (call under ``torch.inference_mode()``);
    ``after(end)`` runs after each segment."""
    import torch
    import torch.nn.functional as F

    nll, state = torch.zeros(tokens.shape[1], dtype=torch.float64), None
    for start in range(0, tokens.shape[1], segment):
        logits, state = model(tokens[:, start : start + segment], state=state, write=write)
        part = F.cross_entropy(logits[0].float(), targets[0, start : start + segment], reduction="none")
        nll[start : start + logits.shape[1]] = part.double()
        del logits, part
        if after is not None:
            after(start + segment)
    return nll


@contextlib.contextmanager
def quiet(sink: io.StringIO, verbose: bool = False) -> Iterator[None]:
    """Silence Lightning's info logs and warnings and send the run's output to ``sink``, so that stdout keeps only
    the report; with ``verbose`` everything goes to stderr instead."""
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


def proc_status_kib(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); ``None`` where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), None)
    except OSError:
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
    """First quartile, median and third quartile (inclusive method)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def summarize(rounds: list[list[tuple[float, float]]], tokens: int) -> dict[str, Any]:
    """Pooled statistics of one timed function: ``rounds`` holds the timed ``(wall, cpu)`` seconds of each round."""
    wall = [w for r in rounds for w, _ in r]
    p25, med, p75 = quartiles(wall)
    out = {"median_ms": med * 1e3, "p25_ms": p25 * 1e3, "p75_ms": p75 * 1e3, "tokens_per_s": tokens / med}
    out.update(iterations=len(wall), per_round_median_ms=[statistics.median(w for w, _ in r) * 1e3 for r in rounds])
    return {**out, "cpu_median_ms": statistics.median(c for r in rounds for _, c in r) * 1e3}


def interleaved(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    iters: int,
    label: str,
    after: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, list[list[tuple[float, float]]]]:
    """Time every function in interleaved rounds (order reversed every other round; ``after`` runs untimed after each
    call, one untimed call of each first). Returns, per function, the ``(wall, cpu)`` seconds of each round's
    ``iters`` timed calls (after ``warmup`` untimed ones)."""
    keys = list(fns)
    for k in keys:
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


def environment(threads: int, sources: Optional[Sequence[str]] = None, **extra: Any) -> dict[str, Any]:
    """Versions, ``extra`` fields, thread settings and machine of a report; ``sources`` (package file names) adds
    their :func:`sha256_of` under ``sources``."""
    import platform

    import lightning
    import torch

    import nl_lightning

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    env.update(lightning=lightning.__version__, nl_lightning=nl_lightning.__version__, **extra)
    env.update(torch_num_threads=threads, omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpu_count=os.cpu_count())
    env["platform"] = platform.platform()
    if sources is not None:
        root = Path(nl_lightning.__file__).parent
        env["sources"] = {f"nl_lightning/{n}": sha256_of(str(root / n)) for n in sources if (root / n).exists()}
    return env


def same_sources(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``{file: sha256_of(file)}`` records name the same files with the same contents (modification
    times may differ)."""

    def digests(record: dict[str, Any]) -> dict[str, Optional[str]]:
        return {k: (v or {}).get("sha256") if isinstance(v, dict) or v is None else v for k, v in record.items()}

    return digests(a) == digests(b)


def merge_start(paths: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The reports at ``paths`` and the start of their merge: the first one's fields but its parts and times, with
    ``merged_from`` naming every run (a merged report passes on its own). Raises ``ValueError`` where a report was
    measured on other sources than the first (``environment.sources``)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    for path, r in zip(paths, reports, strict=True):
        if not same_sources(r["environment"]["sources"], reports[0]["environment"]["sources"]):
            raise ValueError(f"{path} was measured on other sources than {paths[0]}; merge runs of the same code only.")
    skip = ("parts", "part_seconds", "wall_s", "reproduced_runs")
    merged = {k: v for k, v in reports[0].items() if k not in skip}
    merged["merged_from"] = [
        entry
        for path, r in zip(paths, reports, strict=True)
        for entry in r.get("merged_from")
        or [{"path": path, "command": r["command"], "timestamp": r["timestamp"], "wall_s": r["wall_s"]}]
    ]
    return reports, merged


def merge_models(paths: Sequence[str], same_args: Sequence[str] = ()) -> dict[str, Any]:
    """One report from several reports of one script that measured distinct models (``report["models"]``) with the
    same ``setting``, sources and ``args[k]`` for ``k`` in ``same_args``: :func:`merge_start`, the models pooled.
    Raises ``ValueError`` where a setting differs or a model repeats."""
    reports, merged = merge_start(paths)
    merged["models"] = {}
    first = reports[0]
    for path, report in zip(paths, reports, strict=True):
        if report["setting"] != first["setting"] or any(
            report["args"].get(k) != first["args"].get(k) for k in same_args
        ):
            raise ValueError(f"{path} has another setting than {paths[0]}; merge runs of the same setting only.")
        if overlap := sorted(set(report["models"]) & set(merged["models"])):
            raise ValueError(f"{path} repeats models {overlap}; merge reports of distinct models.")
        merged["models"].update(report["models"])
    return merged


def sha256_of(path: Optional[str]) -> Optional[dict[str, str]]:
    """sha256 and modification time of a file (``None`` if there is none)."""
    if path is None or not os.path.exists(path):
        return None
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {"sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "mtime": stamp.isoformat(timespec="seconds")}


@contextlib.contextmanager
def fresh_inductor_cache(prefix: str) -> Iterator[dict[str, str]]:
    """Point ``TORCHINDUCTOR_CACHE_DIR`` at a fresh temporary directory for the block, so that a first
    ``torch.compile`` call there compiles cold; a value the user set (other than inductor's default, which importing
    lightning sets) is kept. The yielded dict gets ``description`` (for the report) when the block ends."""
    try:  # private: inductor's default cache directory; with another torch any value counts as the user's
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default: Optional[str] = default_cache_dir()
    except ImportError:
        default = None
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    kept, info = None if before in (None, default) else before, {}
    with tempfile.TemporaryDirectory(prefix=f"{prefix}_inductor_") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = kept or tmp
        try:
            yield info
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
            cold = f"a fresh directory, cold compile ({sum(len(f) for _, _, f in os.walk(tmp))} files written)"
            info["description"] = f"TORCHINDUCTOR_CACHE_DIR={kept} (may be warm)" if kept else cold


def counted_gflop(fn: Callable[[], None]) -> dict[str, Any]:
    """GFLOP of the matmul-type ops (mm, bmm, addmm, baddbmm, convolutions) one call of ``fn`` runs, forward and
    backward, by ``torch.utils.flop_counter.FlopCounterMode`` (not elementwise ops, nor CPU
    ``scaled_dot_product_attention``, which the counter does not register)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op): n / 1e9 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"gflop": counter.get_total_flops() / 1e9, "by_op": by_op}
