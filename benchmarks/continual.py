"""Continual-learning results of the bundled recipes: the method x scenario grid over seeds, as Markdown and JSON.

What is run
-----------
The recipes themselves, ``nl_lightning/recipes/<benchmark>_<method>.yaml``, exactly as a user runs them with
``nl-lightning fit --config recipes/<benchmark>_<method>.yaml``, for every

- benchmark: ``split_digits_class_il``, ``split_digits_task_il`` (scikit-learn's digits, bundled),
  ``permuted_fmnist``, ``split_fmnist`` (the Fashion-MNIST files of the Debian package ``dataset-fashion-mnist``;
  skipped, with a message on stderr and a note in the JSON, when they are missing);
- method: ``naive``, ``ewc``, ``replay``, ``multifrequency``, ``joint``;
- seed ``S``: ``--seed_everything=S --data.init_args.seed=S`` (the recipes' own seed is 0).

The only other overrides are ``--trainer.logger.init_args.save_dir=<a fresh temporary folder>`` (each run logs into
its own folder, deleted at the end; nothing lands in the repository), ``--trainer.enable_progress_bar=false`` and
``--trainer.enable_model_summary=false``. The recipes' ``ContinualEvaluation`` callback writes
``continual_metrics.json`` (accuracy matrix, ACC, BWT, FWT, forgetting, learning accuracy, AIA); that file of every
run is collected. The scenario and method settings printed above each table are read from the recipe files.

By default the runs go through ``nl_lightning.cli.main`` in this process, one after the other (a digits run takes a
second or two; a fresh interpreter would add several seconds of imports to each). At the end, one run (the last
non-joint run of the grid, the one with most runs before it) is repeated in a fresh ``python -m nl_lightning``
process and its matrix compared with the in-process result: ``isolation_check`` in the JSON, a line in the Markdown.
``--subprocess`` runs every recipe in a fresh process instead.

Metrics (see ``ContinualEvaluation``): ``R[i][j]`` = test accuracy on task ``j`` after training task ``i``.
ACC = ``(1/T) sum_j R[T][j]``, the task-averaged final accuracy over all T tasks; BWT (GEM) =
``(1/(T-1)) sum_{j<T} (R[T][j] - R[j][j])``; forgetting is Chaudhry et al. (2018)'s max-based definition,
``max_{l<T} R[l][j] - R[T][j]`` averaged over ``j < T`` (can be negative); learning accuracy =
``(1/T) sum_j R[j][j]`` (low for a method that avoids forgetting by not learning). A joint run trains on all tasks at
once, so only ACC is defined for it. Each table cell is ``mean ± std`` over the seeds (sample std, ddof=1; a single
seed shows just the value); the JSON also has the s.e.m., min, max and every seed's value.

Running it
----------
::

    python benchmarks/continual.py --out /tmp/continual.json --markdown /tmp/continual.md   # 60 runs, ~10 min, 2 cores
    python benchmarks/continual.py --quick                          # split-digits only, seed 0: under a minute
    python benchmarks/continual.py --benchmarks split_fmnist --methods naive replay joint --seeds 0 1 2 3 4

Output: stdout holds only the Markdown report (one table per benchmark), so
``python benchmarks/continual.py > results.md`` works; the full JSON (every run's metrics and matrix, the aggregates,
versions, command) is written to ``--out PATH``, or to stdout instead of the Markdown with ``--out -``. Progress lines
go to stderr. A failed run is reported on stderr with its traceback, recorded in the JSON (``runs[i].error``) and left
out of the aggregates; the exit status is then 1. The script is not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml
from _common import quiet, report_header

import nl_lightning
from nl_lightning.cli import main as cli_main
from nl_lightning.cli import recipe_path
from nl_lightning.data import fashion_mnist_available

BENCHMARKS: dict[str, dict[str, Any]] = {
    "split_digits_class_il": {"title": "Split-Digits, class-incremental", "fashion_mnist": False},
    "split_digits_task_il": {"title": "Split-Digits, task-incremental", "fashion_mnist": False},
    "permuted_fmnist": {"title": "Permuted Fashion-MNIST, domain-incremental", "fashion_mnist": True},
    "split_fmnist": {"title": "Split Fashion-MNIST, class-incremental", "fashion_mnist": True},
}
METHODS = ("naive", "ewc", "replay", "multifrequency", "joint")  # the default grid, in the order of the table rows
# The Continuum Memory System configurations of the same CMSClassifier (split_digits_class_il and permuted_fmnist only).
CMS_METHODS = ("cms_naive", "cms_multifrequency", "cms_drift", "cms_distill")
ALL_METHODS = METHODS + CMS_METHODS
TABLE_METRICS = (("acc", "ACC"), ("bwt", "BWT"), ("forgetting", "forgetting"), ("learning_accuracy", "learning acc."))
ALL_METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "aia")
QUICK_BENCHMARKS = ["split_digits_class_il", "split_digits_task_il"]
DEFAULT_SEEDS = [0, 1, 2]
EXTRA_ARGS = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
DASH = "–"


# ---------------------------------------------------------------------------------------------------- recipes
def recipe_name(benchmark: str, method: str) -> str:
    return f"{benchmark}_{method}"


def has_recipe(benchmark: str, method: str) -> bool:
    try:
        recipe_path(recipe_name(benchmark, method))
    except FileNotFoundError:
        return False
    return True


def cli_args(benchmark: str, method: str, seed: int, log_dir: str) -> list[str]:
    """The command line of one run: the recipe, the seed and the overrides (nothing else differs from the recipe)."""
    return [
        "fit",
        "--config",
        str(recipe_path(recipe_name(benchmark, method))),
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        *EXTRA_ARGS,
    ]


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def recipe_settings(benchmark: str, method: str) -> dict[str, Any]:
    """The settings of one recipe, read from its YAML file (and its leading comment lines)."""
    path = recipe_path(recipe_name(benchmark, method))
    text = path.read_text()
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    config = yaml.safe_load(text)
    model = config["model"]["init_args"]
    data = config["data"]["init_args"]
    trainer = config["trainer"]
    callbacks = {}
    for cb in trainer.get("callbacks") or []:
        name = _short(cb["class_path"]) if isinstance(cb, dict) else str(cb)
        callbacks[name] = dict(cb.get("init_args") or {}) if isinstance(cb, dict) else {}
    return {
        "recipe": f"recipes/{path.name}",
        "scenario_line": comments[0] if comments else "",
        "method_line": next(
            (c.removeprefix("Method:").strip().rstrip(".") for c in comments if c.startswith("Method:")), ""
        ),
        "seed_everything": config.get("seed_everything"),
        "model": {"class": _short(config["model"]["class_path"]), **model},
        "data": {
            "class": _short(config["data"]["class_path"]),
            "dataset": _short(data["train_dataset"]["class_path"]),
            **{k: v for k, v in data.items() if k not in ("train_dataset", "test_dataset")},
        },
        "trainer": {k: trainer[k] for k in ("max_epochs", "reload_dataloaders_every_n_epochs") if k in trainer},
        "callbacks": callbacks,
    }


def describe_benchmark(settings: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines describing a benchmark's scenario, model and methods, from its recipes' settings."""
    base = settings.get("naive") or next(iter(settings.values()))
    model, data = base["model"], base["data"]
    if "hidden" in model:
        sizes = "MLP " + "-".join(str(n) for n in [model["in_features"], *model["hidden"], model["num_classes"]])
    else:  # CMSClassifier
        sizes = (f"{model['in_features']} -> ContinuumMemory(dim {model['dim']}, chunk_sizes {model['chunk_sizes']},"
                 f" hidden x{model['hidden_mult']}) -> {model['num_classes']}")  # fmt: skip
    lines = [
        f"- Scenario: {base['scenario_line']}",
        f"- Stream: `{data['scenario']}`, {data['num_tasks']} tasks, {data['dataset']}, "
        f"{data['epochs_per_task']} epoch(s) per task, batch {data['batch_size']}, "
        f"protocol {data.get('protocol', 'offline')}, validation fraction {data['val_fraction']} held out of training; "
        f"the matrix is measured on the test split.",
        f"- Model: {model['class']} {sizes}, AdamW lr {model['lr']}, weight decay {model['weight_decay']}, "
        f"logits masked to the task's classes: {str(model.get('mask_by_task', False)).lower()}.",
    ]
    for method in ALL_METHODS:
        if method not in settings:
            continue
        s = settings[method]
        cbs = s["callbacks"]
        if method == "ewc":
            a = cbs.get("ElasticWeightConsolidation", {})
            detail = (
                f"online EWC, lambda {a.get('ewc_lambda')}, {a.get('fisher_samples')} Fisher samples, "
                f"gamma {a.get('gamma')}"
            )
        elif method == "replay":
            a = cbs.get("ExperienceReplay", {})
            rb = a.get("replay_batch_size")
            detail = (
                f"experience replay, a reservoir of {a.get('buffer_size')} samples; "
                + (f"{rb} stored samples" if rb is not None else "as many stored samples as the batch holds")
                + " appended to every batch"
            )
        elif method == "multifrequency":
            levels = cbs.get("MultiFrequencyUpdates", {}).get("levels", [])
            parts = [f"{lv['name']} (`{', '.join(lv['params'])}`) every {lv.get('every', 1)}" for lv in levels]
            detail = "multi-frequency updates, levels " + "; ".join(parts) + " steps"
        elif method == "joint":
            detail = (
                f"joint training on all tasks at once for {s['data']['epochs_per_task']} epoch(s) "
                f"(max_epochs {s['trainer'].get('max_epochs')})"
            )
        else:
            detail = s["method_line"] or method
        lines.append(f"- `{method}` (`{s['recipe']}`): {detail}.")
    others = sorted({k for s in settings.values() for k in s["callbacks"]} - {
        "ContinualEvaluation", "ElasticWeightConsolidation", "ExperienceReplay", "MultiFrequencyUpdates"})  # fmt: skip
    if others:
        lines.append(f"- Also in the recipes: {', '.join(others)}.")
    return lines


# ---------------------------------------------------------------------------------------------------- runs
def run_in_process(args: list[str], verbose: bool) -> dict[str, Any]:
    sink = io.StringIO()
    try:
        with quiet(sink, verbose):
            cli = cli_main(args)
    except Exception as err:
        output = sink.getvalue().strip()
        if output:
            raise RuntimeError(f"the run failed; its output ends with:\n{output[-4000:]}") from err
        raise
    except SystemExit as err:  # LightningCLI reports bad arguments with it
        output = sink.getvalue().strip()
        raise RuntimeError(f"the run exited with {err.code}; its output ends with:\n{output[-4000:]}") from err
    callbacks = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ContinualEvaluation"]
    if not callbacks or callbacks[0].json_path is None:
        raise RuntimeError("the run wrote no continual_metrics.json (no ContinualEvaluation callback?)")
    return json.loads(Path(callbacks[0].json_path).read_text())


def run_subprocess(args: list[str], log_dir: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-m", "nl_lightning", *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`nl-lightning {shlex.join(args)}` exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    found = sorted(Path(log_dir).rglob("continual_metrics.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one continual_metrics.json under {log_dir}, found {len(found)}")
    return json.loads(found[0].read_text())


def run_one(
    benchmark: str, method: str, seed: int, root: str, args: argparse.Namespace, fresh_process: bool, tag: str = ""
) -> dict[str, Any]:
    """One recipe run in its own log folder; never raises (a failure is recorded with its traceback)."""
    log_dir = tempfile.mkdtemp(prefix=f"{recipe_name(benchmark, method)}_s{seed}{tag}_", dir=root)
    argv = cli_args(benchmark, method, seed, log_dir)
    record: dict[str, Any] = {
        "benchmark": benchmark,
        "method": method,
        "recipe": f"recipes/{recipe_name(benchmark, method)}.yaml",
        "seed": seed,
        "process": "fresh" if fresh_process else "in-process",
        "command": shlex.join(["nl-lightning", *argv]).replace(log_dir, "<tmp>"),
    }
    start = time.perf_counter()
    try:
        metrics = run_subprocess(argv, log_dir, args.threads) if fresh_process else run_in_process(argv, args.verbose)
        record.update(ok=True, seconds=round(time.perf_counter() - start, 2), metrics=metrics)
    except BaseException as err:  # noqa: BLE001 - LightningCLI reports bad arguments with SystemExit
        if isinstance(err, KeyboardInterrupt):
            raise
        text = "".join(traceback.format_exception(err))
        record.update(ok=False, seconds=round(time.perf_counter() - start, 2), error=text)
    return record


# ---------------------------------------------------------------------------------------------------- statistics
def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), s.e.m., min, max and the per-seed values of every metric over successful runs."""
    ok = [r for r in runs if r["ok"]]
    out: dict[str, Any] = {
        "n": len(ok),
        "seeds": [r["seed"] for r in ok],
        "failed_seeds": [r["seed"] for r in runs if not r["ok"]],
        "mean_seconds": round(statistics.fmean(r["seconds"] for r in ok), 2) if ok else None,
    }
    for key in ALL_METRICS:
        values = [r["metrics"].get(key) for r in ok]
        defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        entry: dict[str, Any] = {"values": values, "n_defined": len(defined)}
        if defined:
            std = statistics.stdev(defined) if len(defined) > 1 else None
            entry.update(
                mean=round(statistics.fmean(defined), 6),
                std=None if std is None else round(std, 6),
                sem=None if std is None else round(std / math.sqrt(len(defined)), 6),
                min=round(min(defined), 6),
                max=round(max(defined), 6),
            )
        else:
            entry.update(mean=None, std=None, sem=None, min=None, max=None)
        out[key] = entry
    return out


def cell(entry: dict[str, Any], n: int) -> str:
    if entry["mean"] is None:
        return DASH
    text = f"{entry['mean']:.3f}" if entry["std"] is None else f"{entry['mean']:.3f} ± {entry['std']:.3f}"
    return text if entry["n_defined"] == n else f"{text} ({entry['n_defined']}/{n} defined)"


# ---------------------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Continual-learning benchmarks of the bundled recipes",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['timestamp']}; nl_lightning {env['nl_lightning']}, torch {env['torch']}, lightning "
        f"{env['lightning']}, Python {env['python']}, {env['cpu_count']} CPU core(s), {report['threads']} torch "
        f"thread(s); runs {report['process']}; seeds {' '.join(map(str, report['seeds']))}; total "
        f"{report['wall_s']:.0f} s.",
        "",
        "Each row is the recipe `recipes/<benchmark>_<method>.yaml` run as `nl-lightning fit --config <recipe>"
        " --seed_everything=S --data.init_args.seed=S` (the log folder moved to a temporary one, no progress bar);"
        " `R[i][j]` = test accuracy on task j after training task i, from `continual_metrics.json`.",
        "",
        "- **ACC**: the task-averaged final accuracy, `(1/T) Σ_j R[T][j]` over all T tasks (not sample-weighted).",
        "- **BWT**: `(1/(T−1)) Σ_{j<T} (R[T][j] − R[j][j])` (GEM); negative = forgetting.",
        "- **forgetting**: Chaudhry et al. (2018), max-based: `max_{l<T} R[l][j] − R[T][j]` averaged over j < T"
        " (can be negative).",
        "- **learning acc.**: `(1/T) Σ_j R[j][j]`, accuracy on each task just after learning it (low for a method"
        " that avoids forgetting by not learning).",
        "- Cells: mean ± sample std over seeds (ddof = 1; one seed: the value); s.e.m., min, max and per-seed values"
        " are in the JSON. `joint` trains on all tasks at once, so only ACC is defined (`–`). s/run: mean wall"
        " seconds of one run (set-up, training, evaluation).",
    ]
    check = report.get("isolation_check")
    if check:
        if check.get("identical") is not None:
            verdict = "identical" if check["identical"] else f"DIFFERENT (max |diff| {check['max_abs_diff']})"
            lines.append(
                f"- Isolation check: `{check['recipe']}` seed {check['seed']} repeated in a fresh process after the"
                f" grid: matrix and metrics {verdict} to the in-process run."
            )
        else:
            lines.append(f"- Isolation check: {check.get('note') or check.get('error', 'failed')}")
    for bench, reason in report["skipped"].items():
        lines.append(f"- **Skipped** `{bench}`: {reason}")
    for bench, block in report["benchmarks"].items():
        lines += ["", f"## {BENCHMARKS[bench]['title']} (`{bench}`)", ""]
        lines += describe_benchmark(block["settings"])
        lines += [
            "",
            "| method | ACC | BWT | forgetting | learning acc. | seeds | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, agg in block["aggregates"].items():
            cells = [cell(agg[key], agg["n"]) if agg["n"] else DASH for key, _ in TABLE_METRICS]
            seconds = f"{agg['mean_seconds']:.1f}" if agg["mean_seconds"] is not None else DASH
            seeds = str(agg["n"]) + (f" ({len(agg['failed_seeds'])} failed)" if agg["failed_seeds"] else "")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {seeds} | {seconds} |")
    if report["failures"]:
        lines += ["", f"**{len(report['failures'])} run(s) failed**; their errors are in the JSON (`runs[].error`):"]
        lines += [f"- `{f['recipe']}` seed {f['seed']}: {f['error_last_line']}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Whether two runs' matrices, untrained rows and metrics agree exactly, and the largest absolute difference."""
    diffs = []

    def walk(x: Any, y: Any) -> None:
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for u, v in zip(x, y, strict=True):
                walk(u, v)
        elif x is None or y is None:
            diffs.append(0.0 if x is y else math.inf)
        else:
            diffs.append(abs(float(x) - float(y)))

    for key in ("matrix", "untrained", *ALL_METRICS):
        walk(a.get(key), b.get(key))
    worst = max(diffs, default=0.0)
    return worst == 0.0, worst


def environment(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "nl_lightning": nl_lightning.__version__,
        "torch_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


# ---------------------------------------------------------------------------------------------------- driver
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), help="default: all four")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(ALL_METHODS),
        default=list(METHODS),
        help=f"default: {' '.join(METHODS)}; also {' '.join(CMS_METHODS)} (benchmarks that have those recipes)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default: {' '.join(map(str, DEFAULT_SEEDS))}")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads, and OMP_NUM_THREADS of fresh processes (1)"
    )
    parser.add_argument("--out", help="write the full JSON here ('-': to stdout, instead of the Markdown)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument(
        "--quick", action="store_true", help="split-digits benchmarks and seed 0 only (unless given explicitly)"
    )
    parser.add_argument("--subprocess", action="store_true", help="run every recipe in a fresh process")
    parser.add_argument("--no-check", action="store_true", help="skip the fresh-process isolation check")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's output of every run (on stderr)")
    args = parser.parse_args(argv)
    if args.benchmarks is None:
        args.benchmarks = QUICK_BENCHMARKS if args.quick else list(BENCHMARKS)
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    args.benchmarks = [b for b in BENCHMARKS if b in args.benchmarks]  # canonical order, no duplicates
    args.methods = [m for m in ALL_METHODS if m in args.methods]
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def log(message: str) -> None:
    print(f"[continual] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "continual-learning recipes: method x scenario grid",
        "benchmarks/continual.py",
        argv,
        {k: getattr(args, k) for k in ("benchmarks", "methods", "seeds", "threads", "quick", "subprocess")},
        environment(args.threads),
    )
    report |= {
        "threads": args.threads,
        "seeds": args.seeds,
        "process": "each in a fresh process" if args.subprocess else "in-process, one after the other",
        "fashion_mnist_available": fashion_mnist_available(),
        "skipped": {},
        "benchmarks": {},
        "runs": [],
    }
    benchmarks = []
    for bench in args.benchmarks:
        if BENCHMARKS[bench]["fashion_mnist"] and not report["fashion_mnist_available"]:
            reason = (
                "the Fashion-MNIST files are missing (apt-get install dataset-fashion-mnist, or set"
                " NL_FASHION_MNIST_ROOT to a folder holding the IDX files)"
            )
            log(f"skipping {bench}: {reason}")
            report["skipped"][bench] = reason
        else:
            benchmarks.append(bench)
    grid = [(b, m, s) for b in benchmarks for m in args.methods if has_recipe(b, m) for s in args.seeds]
    log(f"{len(grid)} runs: {len(benchmarks)} benchmark(s) x {len(args.methods)} method(s) x {len(args.seeds)} seed(s)")
    with tempfile.TemporaryDirectory(prefix="nl_continual_") as root:
        for i, (bench, method, seed) in enumerate(grid, 1):
            record = run_one(bench, method, seed, root, args, fresh_process=args.subprocess)
            report["runs"].append(record)
            if record["ok"]:
                acc = record["metrics"].get("acc")
                log(f"{i}/{len(grid)} {bench} {method} seed {seed}: ACC {acc:.4f} ({record['seconds']:.1f} s)")
            else:
                where = f"{i}/{len(grid)} {bench} {method} seed {seed}"
                log(f"{where}: FAILED ({record['seconds']:.1f} s)\n{record['error']}")
        candidates = [r for r in report["runs"] if r["ok"] and r["method"] != "joint"] or [
            r for r in report["runs"] if r["ok"]
        ]
        if args.no_check:
            report["isolation_check"] = None
        elif args.subprocess:
            report["isolation_check"] = {"note": "not needed: every run used a fresh process (--subprocess)."}
        elif not candidates:
            report["isolation_check"] = {"note": "not run: no successful run to repeat."}
        else:
            ref = candidates[-1]
            log(f"isolation check: repeating {ref['recipe']} seed {ref['seed']} in a fresh process")
            again = run_one(ref["benchmark"], ref["method"], ref["seed"], root, args, fresh_process=True, tag="_fresh")
            check: dict[str, Any] = {"recipe": ref["recipe"], "seed": ref["seed"], "seconds": again["seconds"]}
            if again["ok"]:
                identical, worst = compare_runs(ref["metrics"], again["metrics"])
                check.update(identical=identical, max_abs_diff=worst, fresh_metrics=again["metrics"])
                log(f"isolation check: {'identical' if identical else f'DIFFERENT, max |diff| {worst}'}")
            else:
                check.update(identical=None, error=again["error"])
                log(f"isolation check FAILED:\n{again['error']}")
            report["isolation_check"] = check
    for bench in benchmarks:
        methods = [m for m in args.methods if has_recipe(bench, m)]
        settings = {m: recipe_settings(bench, m) for m in methods}
        aggregates = {
            m: aggregate([r for r in report["runs"] if r["benchmark"] == bench and r["method"] == m]) for m in methods
        }
        report["benchmarks"][bench] = {"title": BENCHMARKS[bench]["title"], "settings": settings,
                                       "aggregates": aggregates}  # fmt: skip
    report["failures"] = [
        {"recipe": r["recipe"], "seed": r["seed"], "error_last_line": r["error"].strip().splitlines()[-1]}
        for r in report["runs"]
        if not r["ok"]
    ]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(text)
    data = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out == "-":
        print(data)
    else:
        print(text, end="")
        if args.out:
            Path(args.out).write_text(data + "\n")
    log(f"done: {len(report['runs'])} runs, {len(report['failures'])} failed, {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
