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
"""Continual-learning results of the bundled recipes: the method x scenario grid over seeds.

The recipes ``nl_lightning/recipes/<benchmark>_<method>.yaml`` run as a user runs them (``nl-lightning fit --config
...``) for every benchmark (``split_digits_class_il``, ``split_digits_task_il``; ``permuted_fmnist`` and
``split_fmnist`` need the Fashion-MNIST files of the Debian package ``dataset-fashion-mnist`` and are skipped with a
note without them), method (``naive``, ``ewc``, ``replay``, ``multifrequency``, ``joint``; ``cms_*`` where those
recipes exist) and seed ``S`` (``--seed_everything=S --data.init_args.seed=S``); the only other overrides are a fresh
temporary log folder per run, no progress bar, no model summary. Each run's ``continual_metrics.json`` (accuracy
matrix ``R[i][j]``, ACC, BWT, FWT, forgetting, learning accuracy, AIA; see ``ContinualEvaluation``) is collected;
cells are mean ± sample std over seeds. The runs go through ``nl_lightning.cli.main`` in this process, then the last
non-joint run is repeated in a fresh ``python -m nl_lightning`` process and its metrics compared
(``isolation_check``); ``--subprocess`` runs every recipe in a fresh process instead. A failed run is recorded with its
traceback (``runs[i].error``), left out of the aggregates, and makes the exit status 1.

Running it::

    python benchmarks/continual.py --out benchmarks/results/continual.json    # 60 runs, ~10 min on 2 cores
    python benchmarks/continual.py --benchmarks split_digits_class_il permuted_fmnist \\
        --methods cms_naive cms_multifrequency cms_drift cms_distill --out benchmarks/results/continual_cms.json
    python benchmarks/continual.py --quick --out /tmp/continual.json          # split-digits, seed 0: under a minute
    python benchmarks/render.py continual continual_cms                       # the pages
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from _common import DASH, arguments, cell, environment, make_log, quiet, report_header, save, summary

from nl_lightning.cli import load_recipe, recipe_path
from nl_lightning.cli import main as cli_main
from nl_lightning.data import fashion_mnist_available

TITLE = "Continual-learning benchmarks of the bundled recipes"
BENCHMARKS = {  # benchmark: (title, needs Fashion-MNIST)
    "split_digits_class_il": ("Split-Digits, class-incremental", False),
    "split_digits_task_il": ("Split-Digits, task-incremental", False),
    "permuted_fmnist": ("Permuted Fashion-MNIST, domain-incremental", True),
    "split_fmnist": ("Split Fashion-MNIST, class-incremental", True),
}
METHODS = ("naive", "ewc", "replay", "multifrequency", "joint")  # the default grid, in the order of the table rows
CMS_METHODS = ("cms_naive", "cms_multifrequency", "cms_drift", "cms_distill")  # CMSClassifier recipes
ALL_METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "aia")
EXTRA_ARGS = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
log = make_log("continual")


def has_recipe(benchmark: str, method: str) -> bool:
    try:
        recipe_path(f"{benchmark}_{method}")
    except FileNotFoundError:
        return False
    return True


def recipe_settings(benchmark: str, method: str) -> dict[str, Any]:
    """The settings of one recipe, read from its YAML files (and its leading comment lines)."""
    path = recipe_path(f"{benchmark}_{method}")
    comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    config = load_recipe(path)  # the recipe merged with its `# base:` files
    data, trainer = config["data"]["init_args"], config["trainer"]
    short = lambda class_path: class_path.rsplit(".", 1)[-1]  # noqa: E731
    return {
        "recipe": f"recipes/{path.name}",
        "scenario_line": comments[0] if comments else "",
        "method_line": next((c.removeprefix("Method:").strip().rstrip(".") for c in comments
                             if c.startswith("Method:")), ""),
        "seed_everything": config.get("seed_everything"),
        "model": {"class": short(config["model"]["class_path"]), **config["model"]["init_args"]},
        "data": {"class": short(config["data"]["class_path"]), "dataset": short(data["train_dataset"]["class_path"]),
                 **{k: v for k, v in data.items() if k not in ("train_dataset", "test_dataset")}},
        "trainer": {k: trainer[k] for k in ("max_epochs", "reload_dataloaders_every_n_epochs") if k in trainer},
        "callbacks": {short(cb["class_path"]) if isinstance(cb, dict) else str(cb):
                      dict(cb.get("init_args") or {}) if isinstance(cb, dict) else {}
                      for cb in trainer.get("callbacks") or []},
    }  # fmt: skip


def run_one(benchmark: str, method: str, seed: int, root: str, args: Any, fresh: bool) -> dict[str, Any]:
    """One recipe run in its own log folder, in this process or a fresh one; never raises (a failure is recorded
    with its traceback)."""
    log_dir = tempfile.mkdtemp(prefix=f"{benchmark}_{method}_s{seed}_", dir=root)
    argv = ["fit", "--config", str(recipe_path(f"{benchmark}_{method}")), f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}", f"--trainer.logger.init_args.save_dir={log_dir}", *EXTRA_ARGS]  # fmt: skip
    record: dict[str, Any] = {
        "benchmark": benchmark, "method": method, "recipe": f"recipes/{benchmark}_{method}.yaml", "seed": seed,
        "process": "fresh" if fresh else "in-process",
        "command": shlex.join(["nl-lightning", *argv]).replace(log_dir, "<tmp>"),
    }  # fmt: skip
    start, sink = time.perf_counter(), io.StringIO()
    try:
        if fresh:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            proc = subprocess.run([sys.executable, "-m", "nl_lightning", *argv], env=env, capture_output=True,
                                  text=True)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"`nl-lightning {shlex.join(argv)}` exited with {proc.returncode}:\n"
                                   f"{proc.stderr[-4000:]}")  # fmt: skip
            found = sorted(Path(log_dir).rglob("continual_metrics.json"))
            if len(found) != 1:
                raise RuntimeError(f"expected one continual_metrics.json under {log_dir}, found {len(found)}")
        else:
            try:
                with quiet(sink, args.verbose):
                    cli = cli_main(argv)
            except (Exception, SystemExit) as err:  # LightningCLI reports bad arguments with SystemExit
                raise RuntimeError(f"the run failed; its output ends with:\n{sink.getvalue().strip()[-4000:]}") from err
            found = [cb.json_path for cb in cli.trainer.callbacks if type(cb).__name__ == "ContinualEvaluation"]
            if not found or found[0] is None:
                raise RuntimeError("the run wrote no continual_metrics.json (no ContinualEvaluation callback?)")
        record.update(ok=True, metrics=json.loads(Path(found[0]).read_text()))
    except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
        record.update(ok=False, error="".join(traceback.format_exception(err)))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), s.e.m., min, max and the per-seed values of every metric over successful runs."""
    ok = [r for r in runs if r["ok"]]
    out: dict[str, Any] = {
        "n": len(ok), "seeds": [r["seed"] for r in ok], "failed_seeds": [r["seed"] for r in runs if not r["ok"]],
        "mean_seconds": statistics.fmean(r["seconds"] for r in ok) if ok else None,
    }  # fmt: skip
    for key in ALL_METRICS:
        s = summary([r["metrics"].get(key) for r in ok])
        out[key] = {**s, "sem": None if s["std"] is None else s["std"] / math.sqrt(s["n_defined"])}
    return out


def isolation_check(report: dict[str, Any], root: str, args: Any) -> Optional[dict[str, Any]]:
    """Repeat the last non-joint run in a fresh process; whether its matrices, untrained rows and metrics agree
    exactly with the in-process ones, and the largest absolute difference."""
    ok = [r for r in report["runs"] if r["ok"]]
    candidates = [r for r in ok if r["method"] != "joint"] or ok
    if args.no_check:
        return None
    if args.subprocess or not candidates:
        return {"note": "not needed: every run used a fresh process." if args.subprocess else "not run: no run ok."}
    ref = candidates[-1]
    log(f"isolation check: repeating {ref['recipe']} seed {ref['seed']} in a fresh process")
    again = run_one(ref["benchmark"], ref["method"], ref["seed"], root, args, fresh=True)
    check: dict[str, Any] = {"recipe": ref["recipe"], "seed": ref["seed"], "seconds": again["seconds"]}
    if not again["ok"]:
        return {**check, "identical": None, "error": again["error"]}
    diffs: list[float] = []

    def walk(x: Any, y: Any) -> None:
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for u, v in zip(x, y, strict=True):
                walk(u, v)
        else:
            diffs.append((0.0 if x is y else math.inf) if x is None or y is None else abs(float(x) - float(y)))

    for key in ("matrix", "untrained", *ALL_METRICS):
        walk(ref["metrics"].get(key), again["metrics"].get(key))
    worst = max(diffs, default=0.0)
    return {**check, "identical": worst == 0.0, "max_abs_diff": worst, "fresh_metrics": again["metrics"]}


def callbacks_cell(callbacks: dict[str, dict[str, Any]]) -> str:
    """The method's callbacks with their main settings (the evaluation and the monitor left out)."""
    parts = []
    for name, a in callbacks.items():
        if "levels" in a:
            text = "; ".join(f"{lv['name']} `{', '.join(lv['params'])}` every {lv.get('every', 1)}"
                             for lv in a["levels"])  # fmt: skip
        elif "pairs" in a:
            text = "; ".join(f"{p['fast']} → {p['slow']} {p.get('mode', '')} {p.get('alpha', '')}" for p in a["pairs"])
        else:
            text = ", ".join(f"{k} {v}" for k, v in a.items() if isinstance(v, (int, float, str)))
        parts += [] if name in ("ContinualEvaluation", "NestedLearningMonitor") else [f"{name}({text})"]
    return "; ".join(parts) or "none"


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per benchmark the metrics of every method (mean ± std over seeds) and the methods' recipes."""
    check, out = report.get("isolation_check") or {}, []
    notes = [f"Runs {report['process']}; seeds {' '.join(map(str, report['seeds']))}; total {report['wall_s']:.0f} s.",
             "ACC = (1/T) Σ_j R[T][j]; BWT = (1/(T−1)) Σ_{j<T} (R[T][j] − R[j][j]); forgetting = max_{l<T}"
             " R[l][j] − R[T][j] averaged over j < T; learning acc. = (1/T) Σ_j R[j][j]. `joint` trains on all"
             " tasks at once (only ACC defined). s/run: mean wall seconds of one run."]  # fmt: skip
    if check.get("identical") is not None:
        same = "identical" if check["identical"] else f"DIFFERENT (max |diff| {check['max_abs_diff']})"
        notes.append(f"Isolation check: `{check['recipe']}` seed {check['seed']} in a fresh process: {same}.")
    elif check:
        notes.append(f"Isolation check: {check.get('note') or check.get('error', 'failed').strip().splitlines()[-1]}")
    notes += [f"Skipped `{b}`: {reason}" for b, reason in report["skipped"].items()]
    notes += [f"FAILED `{f['recipe']}` seed {f['seed']}: {f['error_last_line']}" for f in report["failures"]]
    for bench, block in report["benchmarks"].items():
        rows = [[method, *(DASH if not agg["n"] or agg[k]["mean"] is None else cell({**agg[k], "n": agg["n"]}, ".3f")
                           for k in ("acc", "bwt", "forgetting", "learning_accuracy")),
                 str(agg["n"]) + (f" ({len(agg['failed_seeds'])} failed)" if agg["failed_seeds"] else ""),
                 None if agg["mean_seconds"] is None else f"{agg['mean_seconds']:.1f}"]
                for method, agg in block["aggregates"].items()]  # fmt: skip
        s = block["settings"]
        base = s.get("naive") or next(iter(s.values()))
        m, d = base["model"], base["data"]
        model = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("class", "lr", "weight_decay"))
        out.append({"title": f"`{bench}`: {base['scenario_line'].rstrip('.')}", "rows": rows,
                    "columns": ["method", "ACC", "BWT", "forgetting", "learning acc.", "seeds", "s/run"],
                    "note": f"{m['class']}: {model}; AdamW lr {m['lr']}, weight decay {m['weight_decay']};"
                    f" `{d['scenario']}`, {d['num_tasks']} tasks of {d['dataset']}, {d['epochs_per_task']} epoch(s)"
                    f" per task, batch {d['batch_size']}, validation fraction {d['val_fraction']}; the matrix is"
                    " measured on the test split."})  # fmt: skip
        out.append({"title": f"`{bench}`: the methods' recipes", "columns": ["method", "recipe", "callbacks"],
                    "rows": [[method, f"`{x['recipe']}`", callbacks_cell(x["callbacks"])]
                             for method, x in s.items()]})  # fmt: skip
    out[-1]["note"] = " ".join(notes) if out else None
    return out or [{"title": "No benchmark ran", "columns": ["note"], "rows": [[" ".join(notes)]]}]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, seeds="default: 0 1 2 (0 with --quick)")
    add = parser.add_argument
    add("--benchmarks", nargs="+", choices=list(BENCHMARKS), help="default: all four (split-digits with --quick)")
    add("--methods", nargs="+", choices=METHODS + CMS_METHODS, default=list(METHODS))
    add("--subprocess", action="store_true", help="run every recipe in a fresh process")
    add("--no-check", action="store_true", help="skip the fresh-process isolation check")
    add("--verbose", action="store_true", help="keep Lightning's output of every run (on stderr)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    chosen = args.benchmarks or (list(BENCHMARKS)[:2] if args.quick else list(BENCHMARKS))
    args.benchmarks = [b for b in BENCHMARKS if b in chosen]  # canonical order, no duplicates
    args.methods = [m for m in METHODS + CMS_METHODS if m in args.methods]
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if args.quick else [0, 1, 2])))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    kept = ("benchmarks", "methods", "seeds", "threads", "quick", "subprocess")
    report = report_header(TITLE, "benchmarks/continual.py", argv, {k: getattr(args, k) for k in kept},
                           environment(args.threads))  # fmt: skip
    report |= {"threads": args.threads, "seeds": args.seeds, "fashion_mnist_available": fashion_mnist_available(),
               "process": "each in a fresh process" if args.subprocess else "in-process, one after the other",
               "skipped": {}, "benchmarks": {}, "runs": []}  # fmt: skip
    for bench in args.benchmarks:
        if BENCHMARKS[bench][1] and not report["fashion_mnist_available"]:
            report["skipped"][bench] = ("the Fashion-MNIST files are missing (apt-get install dataset-fashion-mnist,"
                                        " or set NL_FASHION_MNIST_ROOT to a folder holding the IDX files)")  # fmt: skip
            log(f"skipping {bench}: {report['skipped'][bench]}")
    benchmarks = [b for b in args.benchmarks if b not in report["skipped"]]
    grid = [(b, m, s) for b in benchmarks for m in args.methods if has_recipe(b, m) for s in args.seeds]
    with tempfile.TemporaryDirectory(prefix="nl_continual_") as root:
        for i, (bench, method, seed) in enumerate(grid, 1):
            report["runs"].append(record := run_one(bench, method, seed, root, args, fresh=args.subprocess))
            result = f"ACC {record['metrics'].get('acc'):.4f}" if record["ok"] else f"FAILED\n{record['error']}"
            log(f"{i}/{len(grid)} {bench} {method} seed {seed}: {result} ({record['seconds']:.1f} s)")
        report["isolation_check"] = isolation_check(report, root, args)
    for bench in benchmarks:
        methods = [m for m in args.methods if has_recipe(bench, m)]
        runs = {m: [r for r in report["runs"] if r["benchmark"] == bench and r["method"] == m] for m in methods}
        report["benchmarks"][bench] = {"title": BENCHMARKS[bench][0],
                                       "settings": {m: recipe_settings(bench, m) for m in methods},
                                       "aggregates": {m: aggregate(runs[m]) for m in methods}}  # fmt: skip
    report["failures"] = [{"recipe": r["recipe"], "seed": r["seed"],
                           "error_last_line": r["error"].strip().splitlines()[-1]}
                          for r in report["runs"] if not r["ok"]]  # fmt: skip
    return save(report, started, args.out, log)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
