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
"""Multi-query associative recall (MQAR, Zoology) learned at a tiny CPU size, then read at 1x, 2x, 4x and 8x the
training length: Hope, Hope-Attention, Titans (MAL), Transformer++ with full and with sliding-window attention.

Each model is its bundled recipe ``mqar_<model>`` (``nl_lightning.cli.load_recipe``: the model, its optimizer
schedule, the ``MQARDataModule`` and the Trainer's ``max_steps`` / ``val_check_interval``), so that a run here is
``nl-lightning fit --config mqar_<model> --seed_everything S --data.init_args.seed S`` with evaluation lengths
``--multipliers`` (default 1 2 4 8). Per (model, seed): ``seed_everything(S)``, the fit with validation every
``val_check_interval`` steps (curves in TensorBoard under ``--logdir/<model>/seed<S>``, and ``val_acc_len<L>`` per
validation in the JSON), then one validation at every length. The memory models keep writing during validation
(``memorize_at_eval``, the recipes' default) and carry their memory across segments; Transformer++ attends over
the whole sequence (full attention) or the last ``window`` tokens. Accuracy is argmax exact match at the query
positions (chance ``1 / (V - V // 2)``); a run with a non-finite training loss is reported as diverged. The
parameter counts are in the JSON, with a warning when a model is more than 6 % off the models' median.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/recall.py --out benchmarks/results/recall.json --logdir lightning_logs/recall
    OMP_NUM_THREADS=1 python benchmarks/recall.py --quick --out /tmp/recall.json --logdir /tmp/recall_logs  # smoke
    # models side by side (one core each), then one report:
    OMP_NUM_THREADS=1 python benchmarks/recall.py --models transformer transformer_window titans --out A.json &
    OMP_NUM_THREADS=1 python benchmarks/recall.py --models hope hope_attention --out B.json
    python benchmarks/recall.py --merge A.json B.json --out benchmarks/results/recall.json
    python benchmarks/render.py recall                 # the page benchmarks/results/recall.md
    tensorboard --logdir lightning_logs/recall         # the training curves
"""

from __future__ import annotations

import copy
import importlib
import io
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from _common import (
    arguments,
    cell,
    cpu_trainer,
    environment,
    finite,
    make_log,
    merge_models,
    num,
    quiet,
    report_header,
    save,
    step_stats,
    summary,
    table,
)
from lightning.pytorch.loggers import TensorBoardLogger

from nl_lightning.cli import load_recipe
from nl_lightning.data.synthetic import MQARDataModule
from nl_lightning.models.lm import CausalLM

TITLE = "Multi-query associative recall at 1x-8x the training length (tiny CPU sizes)"
MODELS = ("hope", "hope_attention", "titans", "transformer", "transformer_window")
SOURCES = [f"models/{n}.py" for n in ("lm", "hope", "transformer", "titans", "neural_memory", "_memory_mlp")]
SOURCES += [f"models/{n}.py" for n in ("_residual_memory", "self_modifying_titans", "cms", "cms_memory")]
SOURCES += ["models/task_loss_cms.py", "data/synthetic.py"]
SOURCES += [f"recipes/{n}.yaml" for n in ("_base/mqar", "_base/mqar_recall", *(f"mqar_{m}" for m in MODELS))]
SOURCES += [f"recipes/_base/{n}.yaml" for n in ("hope", "hope_attention", "titans", "transformer")]
log = make_log("recall")


def recipe(name: str) -> dict[str, Any]:
    """The merged recipe ``mqar_<name>``."""
    return load_recipe(f"mqar_{name}")


def build_model(config: dict[str, Any]) -> CausalLM:
    """The recipe's model, built from its ``class_path`` and ``init_args``."""
    module, _, cls = config["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**copy.deepcopy(config["model"]["init_args"]))


def build_data(config: dict[str, Any], seed: int, args: Any) -> MQARDataModule:
    """The recipe's data module with the run's seed and the evaluation lengths (``--multipliers``)."""
    kwargs = {**config["data"]["init_args"], "seed": seed, "eval_multipliers": args.multipliers}
    if args.val_samples:
        kwargs["val_samples"] = args.val_samples
    return MQARDataModule(**kwargs)


class Curve(pl.Callback):
    """The validation accuracy at every length after each validation of the fit."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.points: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        acc = {str(L): float(metrics[f"val_acc_len{L}"]) for L in self.lengths if f"val_acc_len{L}" in metrics}
        self.points.append({"step": trainer.global_step, "acc": acc})


@torch.inference_mode()
def accuracy_by_query(model: CausalLM, dm: MQARDataModule) -> dict[str, list[float]]:
    """Accuracy at each length split by the query's rank in its sequence (1st, 2nd, ... query asked).

    The queries ask distinct keys, so once ``i`` answers are given a model that knows only which values the pairs
    hold, and not which key each belongs to, can pick the answer among the ``n - i`` values not given yet
    (``1 / (n - i)``); the split shows whether a model binds keys to values or uses that elimination.
    """
    model.eval()
    out = {}
    for L, loader in zip(dm.eval_lengths, dm.val_dataloader(), strict=True):
        hits, counts = None, None
        for batch in loader:
            tokens, targets = batch["tokens"], batch["targets"]
            logits, _ = model.segment_forward(tokens, write=model.memorize_at_eval)  # (B, T, V)
            asked = targets.ne(-100)  # (B, T), q query positions per row
            correct = logits.argmax(-1).eq(targets)[asked].view(tokens.shape[0], -1).double()  # (B, q), in order
            hits = correct.sum(0) if hits is None else hits + correct.sum(0)
            counts = correct.shape[0] + (0 if counts is None else counts)
        out[str(L)] = [round(float(h) / counts, 6) for h in hits]
    return out


def train_run(name: str, seed: int, args: Any) -> dict[str, Any]:
    """Fit model ``name`` with seed ``seed`` as its recipe says (``--steps`` overrides), then validate it at every
    length."""
    config = recipe(name)
    steps = args.steps or config["trainer"]["max_steps"]
    interval = min(args.val_every or config["trainer"]["val_check_interval"], steps)
    pl.seed_everything(seed, verbose=False)
    model, dm = build_model(config), build_data(config, seed, args)
    if args.steps:
        model.max_steps_schedule = max(steps, model.warmup_steps + 1) if model.max_steps_schedule else None
        model.warmup_steps = min(model.warmup_steps, max(0, steps // 10))
    curve, stats = Curve(dm.eval_lengths), step_stats()
    logger = TensorBoardLogger(args.logdir, name=name, version=f"seed{seed}", default_hp_metric=False)
    with quiet(io.StringIO()):
        trainer = cpu_trainer(max_steps=steps, val_check_interval=interval, check_val_every_n_epoch=None,
                              log_every_n_steps=config["trainer"].get("log_every_n_steps", 10), logger=logger,
                              num_sanity_val_steps=0, callbacks=[curve, stats])  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        fit_s = time.perf_counter() - t0
        diverged = stats.first_nonfinite is not None
        results = [] if diverged else cpu_trainer(logger=False).validate(model, datamodule=dm, verbose=False)
        by_query = None if diverged else accuracy_by_query(model, dm)
    val = {k: float(v) for res in results for k, v in res.items()}
    bad = [L for L in dm.eval_lengths if not finite(val.get(f"val_loss_len{L}"))]
    acc = {str(L): None if diverged or L in bad else val.get(f"val_acc_len{L}") for L in dm.eval_lengths}
    tail = [v for v in stats.losses[-10:] if math.isfinite(v)]
    return {
        "seed": seed,
        "steps": trainer.global_step,
        "fit_s": fit_s,
        "median_step_ms": 1e3 * statistics.median(stats.times[5:] or stats.times) if stats.times else None,
        "diverged": diverged,
        "first_nonfinite_train_step": stats.first_nonfinite,
        "nonfinite_eval_lengths": bad,
        "final_train_loss": statistics.fmean(tail) if tail else None,
        "acc": acc,
        "loss": {str(L): val.get(f"val_loss_len{L}") for L in dm.eval_lengths},
        "acc_by_query": by_query,
        "curve": curve.points,
        "logdir": logger.log_dir,
    }


def first_step_at(run: dict[str, Any], length: str, level: float) -> Optional[int]:
    """The first validated step of ``run`` whose accuracy at ``length`` reaches ``level`` (``None``: none did)."""
    return next((p["step"] for p in run["curve"] if (p["acc"].get(length) or 0.0) >= level), None)


def run_models(args: Any) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name in args.models:
        config, runs = recipe(name), []
        model = build_model(config)
        params = {"total": model.num_parameters(), "non_embedding": model.num_parameters(non_embedding=True)}
        for seed in args.seeds:
            run = train_run(name, seed, args)
            accs = ", ".join(f"{L}: {num(a, '.3f')}" for L, a in run["acc"].items())
            log(f"{name} seed {seed}: acc {accs} ({run['fit_s']:.0f} s)" + (" DIVERGED" if run["diverged"] else ""))
            runs.append(run)
        lengths = list(runs[0]["acc"])
        aggregate = {
            "acc": {L: summary([r["acc"][L] for r in runs]) for L in lengths},
            "fit_s": summary([r["fit_s"] for r in runs]),
            "diverged": sum(r["diverged"] for r in runs),
        }
        models[name] = {"recipe": f"mqar_{name}", "model": config["model"], "parameters": params, "runs": runs,
                        "aggregate": aggregate}  # fmt: skip
    return models


def setting(args: Any) -> dict[str, Any]:
    """The task of the report (the recipes' shared data settings) and the evaluation lengths."""
    config = recipe(args.models[0])
    data = build_data(config, 0, args)
    steps = args.steps or config["trainer"]["max_steps"]
    half = data.vocab_size // 2
    return {
        "data": {k: v for k, v in data.hparams.items() if k != "seed"},
        "train_length": data.seq_len,
        "eval_lengths": data.eval_lengths,
        "steps": steps,
        "seeds": args.seeds,
        "chance": 1 / (data.vocab_size - half),
    }


def check_parameters(models: dict[str, Any]) -> None:
    totals = {n: m["parameters"]["total"] for n, m in models.items()}
    mid = statistics.median(totals.values())
    for n, total in totals.items():
        if abs(total / mid - 1) > 0.06:
            log(f"WARNING: {n} has {total} parameters, {total / mid - 1:+.1%} vs the median {mid:.0f}")


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``)."""
    s, models = report["setting"], report["models"]
    lengths = [str(L) for L in s["eval_lengths"]]
    train = str(s["train_length"])
    task = ", ".join(f"{k}={v}" for k, v in s["data"].items())
    rows = [[name, m["parameters"]["total"], *(cell(m["aggregate"]["acc"][L]) for L in lengths),
             cell(m["aggregate"]["fit_s"], ".0f"), m["aggregate"]["diverged"]]
            for name, m in models.items()]  # fmt: skip
    note = (
        f"`MQARDataModule({task})`, trained at length {train} for {s['steps']} steps, seeds {s['seeds']}; mean ± std"
        f" over seeds of the argmax accuracy at the query positions (chance {s['chance']:.3f}). Evaluation at m x the"
        " training length keeps the pairs and queries and lengthens the filler between them."
    )
    out = [table("Recall accuracy by evaluation length", ["model", "parameters", *(f"acc @ {L}" for L in lengths),
                                                          "fit s", "diverged"], rows, note)]  # fmt: skip
    rows = [[name, r["seed"], *(num(r["acc"][L], ".3f") for L in lengths), first_step_at(r, train, 0.9),
             num(r["final_train_loss"], ".3f"), num(r["fit_s"], ".0f")]
            for name, m in models.items() for r in m["runs"]]  # fmt: skip
    out.append(table("Every run", ["model", "seed", *(f"acc @ {L}" for L in lengths), f"first step >= 0.9 @ {train}",
                                   "final train loss", "fit s"], rows,
                     "The step is the first validation during the fit with accuracy >= 0.9 at the training length"
                     " (a dash: none); the whole curves are in the JSON and in TensorBoard."))  # fmt: skip
    if any(r.get("acc_by_query") for m in models.values() for r in m["runs"]):
        out.append(query_table(report))
    shared = ("vocab_size", "lr", "warmup_steps", "max_steps_schedule")
    rows = [[name, m["recipe"], m["model"]["class_path"].rsplit(".", 1)[-1],
             ", ".join(f"{k}={v}" for k, v in m["model"]["init_args"].items() if k not in shared)]
            for name, m in models.items()]  # fmt: skip
    common = {k: v for k, v in next(iter(models.values()))["model"]["init_args"].items() if k in shared}
    note = "Shared: " + ", ".join(f"{k}={v}" for k, v in common.items()) + " (AdamW, cosine decay)."
    out.append(table("Models (the recipes' init_args)", ["model", "recipe", "class", "arguments"], rows, note))
    return out


def query_table(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy at the training length by the query's rank, next to what elimination alone scores."""
    s, models = report["setting"], report["models"]
    train, n = str(s["train_length"]), s["data"]["num_pairs"]
    q = s["data"]["num_queries"] or n
    rows = [["values only (elimination)", "", *(f"{1 / (n - i):.3f}" for i in range(q))]]
    for name, m in models.items():
        for r in m["runs"]:
            ranks = (r.get("acc_by_query") or {}).get(train) or [None] * q
            rows.append([name, r["seed"], *(num(a, ".3f") for a in ranks)])
    note = (
        f"The accuracy at length {train} of the 1st ... {q}th query of each sequence, per run (the JSON has it at"
        f" every length). The"
        f" queries ask distinct keys, so a model that knows which {n} values the pairs hold but not which key each"
        f" belongs to can answer the i-th query among the {n} - (i - 1) values not given yet: the first row. Its mean,"
        f" {statistics.fmean(1 / (n - i) for i in range(q)):.3f}, is the plateau of a model that has not bound keys to"
        " values; recall proper reaches 1 at every rank."
    )
    header = ["model", "seed", *(f"query {i + 1}" for i in range(q))]
    return table(f"Accuracy by query rank at the training length ({train} tokens)", header, rows, note)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, seeds="seeds (default 0 1 2; 0 with --quick)")
    add = parser.add_argument
    add("--models", nargs="+", choices=MODELS, help="models to run (default: all)")
    add("--multipliers", nargs="+", type=int, help="evaluation lengths as multiples of the training length (1 2 4 8)")
    add("--steps", type=int, help="training steps (default: the recipe's; 20 with --quick)")
    add("--val-every", type=int, help="validation interval in steps (default: the recipe's)")
    add("--val-samples", type=int, help="samples per evaluation length (default: the recipe's; 32 with --quick)")
    add("--logdir", default="lightning_logs/recall", help="TensorBoard directory (lightning_logs/recall)")
    add("--merge", nargs="+", metavar="JSON", help="pool reports of distinct models into one")
    args = parser.parse_args(argv)
    if args.merge:
        return save(merge_models(args.merge), time.perf_counter(), args.out, log)
    q = args.quick
    args.models = [m for m in MODELS if m in (args.models or MODELS)]
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])))
    args.multipliers = args.multipliers or [1, 2, 4, 8]
    args.steps = args.steps or (20 if q else None)
    args.val_every = args.val_every or (10 if q else None)
    args.val_samples = args.val_samples or (32 if q else None)
    if min([args.threads, *args.multipliers, args.steps or 1, args.val_every or 1, args.val_samples or 1]) < 1:
        parser.error("--threads, --multipliers, --steps, --val-every and --val-samples must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(TITLE, "benchmarks/recall.py", argv, vars(args), environment(args.threads, SOURCES))
    report["setting"] = setting(args)
    report["models"] = run_models(args)
    check_parameters(report["models"])
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
