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
"""A key-value fact across a long stream of text at inference: trained on short samples, read with the memory carried.

Each model of ``MODELS`` is built from its recipe ``needle_stream_<model>`` (``nl_lightning/recipes``; the model
bases ``hope``, ``titans``, ``hope_attention`` with a sliding window of 64 tokens, ``transformer``, and the task base
``needle_stream``): ``TextNeedleDataModule`` samples of 64 bytes of the default corpus with a fact
``MARKER key SEPARATOR value`` (2 key bytes, 4 value bytes, drawn per sample) at a random position and its query at
the end, the value bytes the only targets, each sample one segment.
``--steps`` optimizer steps (default: the recipe's) after ``seed_everything(S)``, the recipe's optimizer and warm-up
and a cosine decay to ``--steps``; or the weights of ``--weights MODEL=PATH``.

Evaluation, each (model, seed) in a fresh process (``MALLOC_MMAP_THRESHOLD_=131072`` unless set),
``torch.inference_mode()``: batches of ``--samples`` streams with the fact after 64 text bytes and the query after
``D`` more (``--distances``), read in segments of the training length aligned to end at the query, the state carried
from segment to segment and the memory writing (``memorize_at_eval`` of the recipe); Transformer++ carries nothing,
so it answers from the last segment, its training window. The default distances start inside that window (32: the
fact lies in the last segment, read as in training) and go on beyond it (96 to 64K). Also the
recipe's validation set at the training length (random fact positions, the "train length" column): a model that has
not learned the format there makes its long-distance figures meaningless. Scores: per-byte argmax accuracy on the
value bytes (chance 1/62) and exact match of all four; cost: time per token of the whole stream and the peak resident
set during it minus the resident set before it (``VmHWM`` reset by ``/proc/self/clear_refs``), the streams already in
memory. ``--flush-denormal`` reads the streams with ``torch.set_flush_denormal(True)`` (CPU only): a memory that
decays over a long stream can hold subnormal floats, on which CPU arithmetic is slow.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/needle_stream.py --out benchmarks/results/needle_stream.json
    python benchmarks/needle_stream.py --quick --out /tmp/needle_stream.json                     # smoke run
    OMP_NUM_THREADS=1 python benchmarks/needle_stream.py --models hope --weights hope=hope.pt    # given weights
    # models side by side (one core each), then one report:
    OMP_NUM_THREADS=1 python benchmarks/needle_stream.py --models hope --seeds 0 1 --out A.json &
    OMP_NUM_THREADS=1 python benchmarks/needle_stream.py --models titans hope_attention transformer --seeds 0 1 \
        --out B.json
    python benchmarks/needle_stream.py --merge A.json B.json --out benchmarks/results/needle_stream.json
    python benchmarks/render.py needle_stream                   # the page benchmarks/results/needle_stream.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
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
    make_log,
    merge_models,
    num,
    proc_status_kib,
    quiet,
    report_header,
    reset_peak_rss,
    save,
    step_stats,
    summary,
    table,
)

from nl_lightning.cli import load_recipe
from nl_lightning.data.text_needle import ALPHABET, TextNeedleDataModule, stream_length
from nl_lightning.models.lm import IGNORE_INDEX, CausalLM

TITLE = "A key-value fact across a long stream of text, at inference (tiny CPU sizes)"
MODELS = ("hope", "titans", "hope_attention", "transformer")
TRAIN_LENGTH = "train length"
MALLOC_MMAP_THRESHOLD = "131072"  # glibc then returns freed large blocks, so the peak RSS follows the live bytes
SOURCES = [f"models/{n}.py" for n in ("lm", "hope", "transformer", "titans", "neural_memory", "_memory_mlp")]
SOURCES += [f"models/{n}.py" for n in ("_residual_memory", "self_modifying_titans", "cms", "cms_memory")]
SOURCES += ["models/task_loss_cms.py", "data/text.py", "data/text_needle.py", "recipes/_base/needle_stream.yaml"]
SOURCES += [f"recipes/needle_stream_{m}.yaml" for m in MODELS]
SOURCES += [f"recipes/_base/{n}.yaml" for n in ("hope", "hope_attention", "titans", "transformer")]
log = make_log("needle_stream")


def _instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**{**spec.get("init_args", {}), **overrides})


def build(name: str, steps: int) -> tuple[CausalLM, TextNeedleDataModule, dict[str, Any]]:
    """The model and data of the recipe ``needle_stream_<name>``, the schedule's decay set to ``steps``."""
    recipe = load_recipe(f"needle_stream_{name}")
    args = recipe["model"]["init_args"]
    warmup = min(args.get("warmup_steps", 0), max(1, steps // 10))
    model = _instantiate(recipe["model"], warmup_steps=warmup, max_steps_schedule=max(steps, warmup + 1))
    return model, _instantiate(recipe["data"], eval_distances=[]), recipe


def describe(recipe: dict[str, Any]) -> str:
    spec = recipe["model"]
    return f"{spec['class_path'].rpartition('.')[2]}({', '.join(f'{k}={v!r}' for k, v in spec['init_args'].items())})"


def train(name: str, seed: int, steps: int, save_to: str) -> dict[str, Any]:
    """Train one (model, seed) for ``steps`` steps without validation and save its weights at ``save_to``."""
    pl.seed_everything(seed, verbose=False)
    model, dm, _ = build(name, steps)
    dm.seed = seed  # the training samples of this seed
    stats = step_stats()
    with quiet(io.StringIO()):
        trainer = cpu_trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stats])
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), save_to)
    tail = [v for v in stats.losses[-20:] if math.isfinite(v)]
    out = {"steps": trainer.global_step, "fit_s": seconds, "first_nonfinite_step": stats.first_nonfinite}
    out["final_train_loss"] = statistics.fmean(tail) if tail else None
    out["train_loss_every_25"] = stats.losses[::25]
    return out


def tensor_mib(obj: Any) -> float:
    """MiB held by the distinct tensors of a memory state (tensors in dataclasses, lists, tuples and dicts; a tensor
    reached twice counts once; 0 for ``None``)."""
    found: dict[tuple[int, int], int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found[(x.data_ptr(), x.numel())] = x.numel() * x.element_size()
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(obj)
    return sum(found.values()) / 2**20


def stream_eval(model: CausalLM, tokens: torch.Tensor, targets: torch.Tensor, segment: int) -> dict[str, Any]:
    """Read ``tokens`` ``(B, L)`` in segments of ``segment`` tokens aligned to end at the last token (the first one
    shorter), carrying the state of a stateful model (``write=memorize_at_eval``) and nothing for a stateless one; score
    the argmax predictions at the target positions, which must lie in the last segment. Time and peak memory of the
    whole read, and the size of the state after it (call under ``torch.inference_mode()``)."""
    B, L = tokens.shape
    scored = targets != IGNORE_INDEX  # (B, L)
    if bool(scored[:, : max(0, L - segment)].any()):
        raise ValueError(f"Every target must lie in the last {segment} tokens; use a longer segment.")
    bounds = list(range(L % segment or segment, L + 1, segment))
    gc.collect()
    reset = reset_peak_rss()
    base = proc_status_kib("VmRSS")
    state, logits, start = None, None, 0
    t0 = time.perf_counter()
    for end in bounds:
        del logits
        if model.stateful:
            logits, state = model(tokens[:, start:end], state=state, write=model.memorize_at_eval)
        else:
            logits, _ = model(tokens[:, start:end])
        start = end
    seconds = time.perf_counter() - t0
    peak = (proc_status_kib("VmHWM") - base) / 1024 if reset and base is not None else None
    last = scored[:, L - logits.shape[1] :]  # (B, segment)
    hits = (logits.argmax(dim=-1) == targets[:, L - logits.shape[1] :]) & last
    per_stream = hits.sum(dim=1) == last.sum(dim=1)
    out = {"streams": B, "tokens": L, "byte_acc": float(hits.sum() / last.sum())}
    out["exact"] = float(per_stream.float().mean())
    out.update(seconds=seconds, us_per_token=1e6 * seconds / (B * L), tokens_per_s=B * L / seconds)
    return {**out, "peak_increase_mib": peak, "rss_peak_reset": reset, "state_mib": tensor_mib(state)}


def probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one trained (model, seed) at every distance; runs in a fresh process (``--_probe``)."""
    torch.set_num_threads(cfg["threads"])
    torch.set_flush_denormal(bool(cfg.get("flush_denormal")))
    model, dm, _ = build(cfg["model"], 10)
    model.load_state_dict(torch.load(cfg["weights"], weights_only=True))
    model.eval()
    segment = dm.seq_len
    dm.seed = cfg["seed"]
    dm.setup("validate")  # the training-length set: the recipe's val_samples
    sets = [(TRAIN_LENGTH, dm.val_sets[0])] + [(str(d), dm.stream(d, cfg["samples"])) for d in cfg["distances"]]
    out = {}
    with torch.inference_mode():
        model(dm.val_sets[0].tokens[:1, :64])  # one-time allocations
        for label, data in sets:
            out[label] = {"distance": label, **stream_eval(model, data.tokens, data.targets, segment)}
            r = out[label]
            log(
                f"{cfg['model']} seed {cfg['seed']} @ {label}: acc {r['byte_acc']:.3f}, exact {r['exact']:.3f},"
                f" {r['us_per_token']:.0f} us/token, peak +{num(r['peak_increase_mib'], '.1f')} MiB"
            )
    return out


def run_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", json.dumps(cfg)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # its log goes to our stderr
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aggregate(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("byte_acc", "exact", "us_per_token", "tokens_per_s", "peak_increase_mib", "state_mib"):
        out[key] = {label: summary([r["eval"].get(label, {}).get(key) for r in runs]) for label in labels}
    out["fit_s"] = summary([r["fit"].get("fit_s") for r in runs])
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, seeds="training seeds (default 0; 0 with --quick)")
    add = parser.add_argument
    add("--models", nargs="+", choices=MODELS, help="models to run (default: all)")
    add("--steps", type=int, help="optimizer steps per run (default: the recipe's max_steps; 20 with --quick)")
    add("--distances", nargs="+", type=int, help="text bytes between fact and query (default 32 96 256 ... 65536)")
    add("--samples", type=int, help="streams per distance, one batch (default 16; 2 with --quick)")
    add("--weights", nargs="+", default=[], metavar="MODEL=PATH", help="evaluate these weights instead of training")
    add("--flush-denormal", action="store_true", help="read the streams with torch.set_flush_denormal(True)")
    add("--merge", nargs="+", metavar="JSON", help="pool reports of distinct models into one")
    add("--_probe", dest="probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.merge:
        return save(
            merge_models(args.merge, ("seeds", "steps", "distances", "samples", "weights", "flush_denormal")),
            time.perf_counter(),
            args.out,
            log,
        )
    if args.probe is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = probe(json.loads(args.probe))
        print(json.dumps(result))
        return result
    q = args.quick
    args.seeds = list(dict.fromkeys(args.seeds or [0]))
    args.models = [m for m in MODELS if m in (args.models or MODELS)]
    args.steps = args.steps or (20 if q else load_recipe("needle_stream_hope")["trainer"]["max_steps"])
    args.distances = sorted(set(args.distances or ([96, 256] if q else [32, 96, 256, 1024, 4096, 16384, 65536])))
    args.samples = args.samples or (2 if q else 16)
    given = dict(w.split("=", 1) for w in args.weights)
    if unknown := sorted(set(given) - set(MODELS)):
        parser.error(f"--weights names unknown models {unknown}; use MODEL=PATH with MODEL in {list(MODELS)}")
    if min(args.steps, args.samples, args.threads) < 1:
        parser.error("--steps, --samples and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k != "probe"}
    report = report_header(TITLE, "benchmarks/needle_stream.py", argv, settings, environment(args.threads, SOURCES))
    labels = [TRAIN_LENGTH] + [str(d) for d in args.distances]
    _, dm, _ = build(MODELS[0], 10)
    report["setting"] = {
        "data": {k: v for k, v in dm.hparams.items() if k != "eval_distances"},
        "eval_lead": dm.lead,
        "eval_segment": dm.seq_len,
        "stream_tokens": {str(d): stream_length(d, dm.key_len, dm.value_len, dm.lead) for d in args.distances},
        "chance": 1 / len(ALPHABET),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD),
    }
    report["models"] = {}
    with tempfile.TemporaryDirectory(prefix="nl_needle_stream_") as tmp:
        for name in args.models:
            model, _, recipe = build(name, 10)
            entry: dict[str, Any] = {"recipe": f"needle_stream_{name}", "architecture": describe(recipe)}
            entry["parameters"] = model.num_parameters()
            entry["segment_len"], entry["memorize_at_eval"] = model.segment_len, model.memorize_at_eval
            runs = []
            for seed in args.seeds:
                if name in given:
                    weights, fit = given[name], {"weights": given[name]}
                else:
                    weights = os.path.join(tmp, f"{name}_{seed}.pt")
                    log(f"training {name} seed {seed} for {args.steps} steps ...")
                    fit = train(name, seed, args.steps, weights)
                    log(f"{name} seed {seed}: {fit['fit_s']:.0f} s, final train loss {num(fit['final_train_loss'])}")
                cfg = {"model": name, "weights": weights, "seed": seed, "threads": args.threads}
                cfg.update(samples=args.samples, distances=args.distances, flush_denormal=args.flush_denormal)
                runs.append({"seed": seed, "fit": fit, "eval": run_probe(cfg)})
            entry["runs"], entry["aggregate"] = runs, aggregate(runs, labels)
            report["models"][name] = entry
    return save(report, started, args.out, log)


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``)."""
    s, a = report["setting"], report["args"]
    labels = [TRAIN_LENGTH] + [str(d) for d in a["distances"]]
    steps = "given weights" if a.get("weights") else f"{a['steps']} steps"
    seeds = " ".join(map(str, a["seeds"]))
    d = s["data"]
    head = f"`TextNeedleDataModule(seq_len={d['seq_len']}, key_len={d['key_len']}, value_len={d['value_len']},"
    head += f" batch_size={d['batch_size']})`, {steps}, seeds {seeds}; {a['samples']} streams per distance"
    models = report["models"]
    acc_rows, exact_rows, time_rows, mem_rows, state_rows = [], [], [], [], []
    for name, m in models.items():
        agg = m["aggregate"]
        acc_rows.append([name, m["parameters"], cell(agg["fit_s"], ".0f")] + [cell(agg["byte_acc"][x]) for x in labels])
        exact_rows.append([name] + [cell(agg["exact"][x]) for x in labels])
        time_rows.append([name] + [cell(agg["us_per_token"][x], ".0f") for x in labels[1:]])
        mem_rows.append([name] + [cell(agg["peak_increase_mib"][x], ".1f") for x in labels[1:]])
        state = [summary([r["eval"].get(x, {}).get("state_mib") for r in m["runs"]]) for x in labels[1:]]
        state_rows.append([name] + [cell(e, ".3f") for e in state])
    dist = [f"D = {x}" for x in labels[1:]]
    title = f"Per-byte accuracy on the value bytes (chance {s['chance']:.3f}), {head}; the fact after"
    title += f" {s['eval_lead']} text bytes and the query D bytes after it, read in segments of {s['eval_segment']}"
    title += " tokens with the state carried; mean ± std over seeds"
    note = f"Transformer++ carries no state: it answers from the last {s['eval_segment']} tokens (its training"
    note += " window), so a fact further away than that is out of its reach. Train length: the recipe's validation"
    note += f" set at the training length ({s['data']['val_samples']} samples, random fact positions)."
    out = [table(title, ["model", "params", "fit s", TRAIN_LENGTH, *dist], acc_rows, note)]
    out.append(table("Exact match of all value bytes, the same streams", ["model", TRAIN_LENGTH, *dist], exact_rows))
    tok = ", ".join(f"{x}: {n:,}" for x, n in s["stream_tokens"].items())
    flush = ", subnormal floats flushed to zero" if a.get("flush_denormal") else ""
    title = f"Time per token (µs) of the whole stream, batch {a['samples']}, one thread{flush}"
    title += f" (stream tokens by D: {tok})"
    out.append(table(title, ["model", *dist], time_rows))
    title = "Peak memory during the stream (MiB): the peak resident set minus the resident set before it"
    note = "The streams themselves are in memory before the measurement starts."
    out.append(table(title, ["model", *dist], mem_rows, note))
    title = f"Size of the carried state after the stream (MiB, the tensors of the memory state; batch {a['samples']})"
    note = "Transformer++ carries none (0)."
    out.append(table(title, ["model", *dist], state_rows, note))
    arch = [[n, m["recipe"], m["architecture"]] for n, m in models.items()]
    return out + [table("Models", ["model", "recipe", "architecture"], arch)]


if __name__ == "__main__":
    main()
