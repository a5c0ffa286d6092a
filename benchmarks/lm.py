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
"""Hope vs Hope-Attention vs Transformer++ vs Titans at tiny CPU sizes: bits per byte, streaming memory.

The causal LMs of ``nl_lightning.models`` at (nearly) equal parameter counts (``ARCH``; width 64, 4 heads; a warning
when one is more than 5 % off Hope's): ``hope`` (``HopeModule`` defaults: CMS writes driven by the task loss, which
need no value projection, so its CMS is wider), ``hope_attention``, ``transformer`` (``TransformerPP``), ``titans``
(``TitansMAL``), and the ablations of ``ABLATION``. All: AdamW lr 3e-3, weight decay 0.1 on matrices,
warm-up ``min(30, steps // 10)``, cosine to 0.1 x lr, clipping 1.0. The sha256 of every source is in the JSON.

Part 1, ``bpc``: ``TextDataModule(seq_len=256, batch_size=8, samples_per_epoch=800, seed=S)`` (default corpus, the
last 5 % held out), ``segment_len=128``, ``--steps`` steps after ``seed_everything(S)``, then validation over the whole
held-out tail with test-time memorization and (stateful models) without: ``val_bpc`` over seeds, fit time, tokens/s,
median step time, final training loss; a run with a non-finite loss is reported as diverged, out of the means.

Part 2, ``streaming``: each configuration in a fresh process (``MALLOC_MMAP_THRESHOLD_=131072`` unless set), part 1's
first-seed weights (if it ran), the first ``L`` corpus bytes in inference mode, batch 1: stateful models segment by
segment (``--stream-segment``, state carried, memory writing) for ``--stream-lengths``; ``transformer`` in one pass for
``--tpp-lengths`` until the quadratically extrapolated time passes ``--stream-time-cap`` s or the peak
``--stream-mem-cap`` MiB. Peak: ``VmHWM`` (reset by ``/proc/self/clear_refs``) minus ``VmRSS`` before the stream,
every 4K tokens; bpc of the first and last 4K tokens; and the held-out tail read as one stream.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/lm.py --out benchmarks/results/lm.json      # all parts in one process
    python benchmarks/lm.py --quick --out /tmp/lm.json                              # smoke run
    # the bpc part of different models side by side (one core each), then one report:
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc --models hope titans hope_value_frozen --out A.json &
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc --models hope_attention transformer hope_target \\
        hope_cms_second_order --out B.json
    python benchmarks/lm.py --merge A.json B.json --out benchmarks/results/lm.json
    # then streaming with seed 0 trained again (its bpc runs must equal the pooled ones to merge):
    OMP_NUM_THREADS=1 python benchmarks/lm.py --parts bpc streaming --seeds 0 \\
        --models hope hope_attention transformer titans --out S.json
    python benchmarks/lm.py --merge benchmarks/results/lm.json S.json --out benchmarks/results/lm.json
    python benchmarks/render.py lm                   # the page benchmarks/results/lm.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import (
    arguments,
    cell,
    cpu_trainer,
    environment,
    finite,
    make_log,
    merge_start,
    num,
    parse_parts,
    proc_status_kib,
    quiet,
    report_header,
    reset_peak_rss,
    save,
    step_stats,
    stream_nll,
    summary,
    table,
)

from nl_lightning.data.text import TextDataModule, load_corpus
from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.hope import HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.titans import TitansMAL
from nl_lightning.models.transformer import TransformerPP

TITLE = "Hope vs Hope-Attention vs Transformer++ vs Titans (tiny CPU sizes)"
PARTS = ("bpc", "streaming")
HOPE: dict[str, Any] = {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]}
# the task-loss writes need no value projection (4 x 64 x 64 parameters in the target modes): a wider CMS (hidden 160
# instead of 128) spends them, so that every Hope variant has about the baselines' parameters
HOPE_TASK_LOSS: dict[str, Any] = {**HOPE, "cms_hidden_mult": 2.5}
TARGET: dict[str, Any] = {**HOPE, "cms_write_signal": "target"}
# fmt: off
ARCH: dict[str, tuple[type[CausalLM], dict[str, Any]]] = {
    "hope": (HopeModule, HOPE_TASK_LOSS),
    "hope_attention": (HopeModule, {"dim": 64, "depth": 2, "heads": 4, "variant": "attention",
                                    "cms_chunk_sizes": [16, 64]}),
    "transformer": (TransformerPP, {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0}),
    "titans": (TitansMAL, {"dim": 64, "depth": 2, "heads": 4, "window": 64, "chunk_size": 16, "mlp_mult": 1.5}),
    "hope_rho1": (HopeModule, {**HOPE_TASK_LOSS, "cms_retention": 1.0}),
    "hope_chunk64": (HopeModule, {**HOPE_TASK_LOSS, "chunk_size": 64}),
    "hope_target": (HopeModule, TARGET), "hope_value_frozen": (HopeModule, TARGET),
    "hope_cms_second_order": (HopeModule, TARGET),
}
# fmt: on
ABLATION = {  # only hope_rho1 of them is streamed
    "hope_rho1": "the CMS writes as printed (NL paper, Eq. 31)",
    "hope_chunk64": "the self-modifying Titans' throughput chunk size",
    "hope_target": "CMS writes towards a learned target, first order",
    "hope_value_frozen": "every CMS `value` frozen at its initialisation: write targets that do not train",
    "hope_cms_second_order": "`differentiable_writes=True` in every CMS: backpropagation through the CMS writes",
}
MODELS = tuple(ARCH)
STATEFUL = tuple(name for name in MODELS if name != "transformer")
# glibc raises its mmap threshold each time a large block is freed, after which freed blocks stay in the heap and
# count in the RSS; pinning it (which turns that off) makes the peak RSS of a probe follow the live bytes.
MALLOC_MMAP_THRESHOLD = "131072"
BLOCK = 4096  # tokens per block of the streaming curves and the first/last bpc
OPTIM = {"lr": 3e-3, "warmup_steps": 30}
TEXT_DM = {"seq_len": 256, "batch_size": 8, "samples_per_epoch": 800}
SEGMENT = 128
SOURCES = [f"models/{n}.py" for n in ("lm", "hope", "transformer", "titans", "neural_memory", "_memory_mlp")]
SOURCES += [f"models/{n}.py" for n in ("_residual_memory", "self_modifying_titans", "cms", "cms_memory")]
SOURCES += ["models/task_loss_cms.py", "data/text.py"]
log = make_log("lm")


def architecture(name: str) -> str:
    cls, kwargs = ARCH[name]
    text = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return text + (f" (ablation: {ABLATION[name]})" if name in ABLATION else "")


def build(name: str, vocab_size: int, segment_len: Optional[int], steps: int) -> CausalLM:
    """One of :data:`MODELS` at the tiny size, with the shared optimizer settings and a cosine decay to ``steps``."""
    cls, kwargs = ARCH[name]
    warmup = min(OPTIM["warmup_steps"], max(1, steps // 10))
    schedule = {"lr": OPTIM["lr"], "warmup_steps": warmup, "max_steps_schedule": max(steps, warmup + 1)}
    model = cls(vocab_size=vocab_size, segment_len=segment_len, **schedule, **kwargs)
    for param_name, param in model.named_parameters():
        if name == "hope_value_frozen" and param_name.endswith(".value"):
            param.requires_grad_(False)  # CausalLM.param_groups leaves it out of the optimizer
    for module in model.modules():
        if name == "hope_cms_second_order" and isinstance(module, ContinuumMemory):
            module.differentiable_writes = True
    return model


def parameter_counts(vocab_size: int) -> dict[str, dict[str, Any]]:
    counts = {}
    for name in MODELS:
        model = build(name, vocab_size, None, 10)
        counts[name] = {"total": model.num_parameters(), "non_embedding": model.num_parameters(non_embedding=True)}
        counts[name]["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {n: {**c, "vs_hope": c["total"] / counts["hope"]["total"] - 1} for n, c in counts.items()}


def train_run(
    name: str, make_dm: Callable[[], pl.LightningDataModule], vocab: int, segment: int, steps: int, seed: int,
    memorize_off: bool, save_to: Optional[str] = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one (model, seed) for ``steps`` steps, no validation during the fit, then validate it with
    ``memorize_at_eval`` on (and off with ``memorize_off``); ``save_to`` keeps the weights for the streaming part."""
    pl.seed_everything(seed, verbose=False)
    model, dm, stats = build(name, vocab, segment, steps), make_dm(), step_stats()

    def validate(memorize: bool) -> tuple[dict[str, float], float]:
        model.memorize_at_eval, t0 = memorize, time.perf_counter()
        results = cpu_trainer().validate(model, datamodule=dm, verbose=False)
        model.memorize_at_eval = True
        return {k: float(v) for res in results for k, v in res.items()}, time.perf_counter() - t0

    with quiet(io.StringIO()):
        trainer = cpu_trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stats])
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        seconds, done = time.perf_counter() - t0, trainer.global_step
        diverged = stats.first_nonfinite is not None
        on, on_s = validate(True) if not diverged else ({}, 0.0)
        off, off_s = validate(False) if memorize_off and not diverged else ({}, 0.0)
    if save_to is not None and not diverged:
        torch.save(model.state_dict(), save_to)
    tail, times = [v for v in stats.losses[-10:] if math.isfinite(v)], stats.times[5:] or stats.times
    tokens = done * dm.batch_size * dm.seq_len
    out = {"seed": seed, "steps": done, "diverged": diverged or not finite(on.get("val_loss"))}
    out.update(first_nonfinite_train_step=stats.first_nonfinite, train_tokens=tokens, fit_s=seconds)
    out["tokens_per_s"] = tokens / seconds if seconds > 0 else None
    out["median_step_ms"] = 1e3 * statistics.median(times) if times else None
    out.update(final_train_loss=statistics.fmean(tail) if tail else None, train_loss_every_10=stats.losses[::10])
    return {**out, "val_memorize_on": on, "val_memorize_off": off, "validate_s": on_s + off_s}


def defined(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """:func:`_common.summary` of ``get(run)`` over the runs, ``None`` for the diverged ones."""
    return summary([None if r["diverged"] else get(r) for r in runs])


def diverged_note(run: dict[str, Any]) -> str:
    return f", DIVERGED at step {run['first_nonfinite_train_step']}" if run["diverged"] else ""


def part_bpc(args: argparse.Namespace, weights_dir: Optional[str]) -> dict[str, Any]:
    models, saved = {}, {}
    for name in args.models:
        runs = []
        for seed in args.seeds:
            save_to = os.path.join(weights_dir, f"{name}.pt") if weights_dir and seed == args.seeds[0] else None
            make = lambda seed=seed: TextDataModule(seed=seed, **TEXT_DM)  # noqa: E731
            run = train_run(name, make, 256, SEGMENT, args.steps, seed, name in STATEFUL, save_to)
            if save_to is not None and os.path.exists(save_to):
                saved[name] = save_to
            on, off = run["val_memorize_on"].get("val_bpc"), run["val_memorize_off"].get("val_bpc")
            log(
                f"bpc {name} seed {seed}: val_bpc {num(on, '.4f')} (memorize off {num(off, '.4f')}),"
                f" {run['fit_s']:.0f} s, {num(run['tokens_per_s'], '.0f')} tok/s" + diverged_note(run)
            )
            runs.append(run)
        aggregate = {
            "val_bpc": defined(runs, lambda r: r["val_memorize_on"].get("val_bpc")),
            "val_bpc_memorize_off": defined(runs, lambda r: r["val_memorize_off"].get("val_bpc")),
            "val_acc": defined(runs, lambda r: r["val_memorize_on"].get("val_acc")),
            "final_train_bpc": defined(runs, lambda r: r["final_train_loss"] and r["final_train_loss"] / math.log(2)),
            **{k: summary([r[k] for r in runs]) for k in ("fit_s", "tokens_per_s", "median_step_ms")},
            "diverged": sum(r["diverged"] for r in runs),
            "train_tokens": runs[0]["train_tokens"],
        }
        models[name] = {"architecture": architecture(name), "runs": runs, "aggregate": aggregate}
    data = "TextDataModule(seq_len=256, batch_size=8, samples_per_epoch=800, val_fraction=0.05, seed=S), default corpus"
    setting = {"data": data + " (pydoc_data.topics)", "corpus_bytes": int(len(load_corpus())), "segment_len": SEGMENT}
    setting.update(steps=args.steps, tokens_per_step=TEXT_DM["batch_size"] * TEXT_DM["seq_len"])
    setting["optimizer"] = {**OPTIM, "warmup_steps": min(OPTIM["warmup_steps"], max(1, args.steps // 10))}
    setting["seeds"] = args.seeds
    return {"setting": setting, "parameters": parameter_counts(256), "models": models, "saved_weights": saved}


def trained(name: str, weights: Optional[str]) -> CausalLM:
    """The text-size model ``name`` in eval mode, with the weights saved at ``weights`` (if any)."""
    model = build(name, 256, None, 10)
    if weights:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def bpc_fields(nll: torch.Tensor) -> dict[str, Any]:
    """Bits per byte overall and per :data:`BLOCK`, and the count of non-finite values, of per-token NLLs."""
    bits = nll / math.log(2)
    blocks = [float(b.mean()) for b in bits.split(BLOCK)]
    return {"bpc": float(bits.mean()), "bpc_blocks": blocks, "nonfinite_nll": int((~torch.isfinite(nll)).sum())}


def stream_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak memory and time of one streaming configuration; runs in a fresh process (``--_stream-probe``)."""
    torch.set_num_threads(cfg["threads"])
    model = trained(cfg["model"], cfg["weights"])
    length, seg = cfg["length"], cfg["segment"]
    data = load_corpus()[: length + 1].long()
    tokens, targets = data[:-1].unsqueeze(0), data[1:].unsqueeze(0)  # (1, L)
    with torch.inference_mode():
        model(tokens[:, : min(64, length)])  # one-time allocations (kernels, caches)
    gc.collect()
    reset = reset_peak_rss()
    base = proc_status_kib("VmRSS") if reset else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    curve: list[dict[str, float]] = []

    def record(end: int) -> None:
        if reset and end % BLOCK == 0:
            peak, rss = (proc_status_kib("VmHWM") - base) / 1024, (proc_status_kib("VmRSS") - base) / 1024
            curve.append({"tokens": end, "peak_increase_mib": peak, "rss_increase_mib": rss})

    t0 = time.perf_counter()
    with torch.inference_mode():
        if cfg["mode"] == "whole":
            nll = F.cross_entropy(model(tokens)[0][0].float(), targets[0], reduction="none").double()
        else:
            nll = stream_nll(model, tokens, targets, seg, after=record)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = bpc_fields(nll)
    out: dict[str, Any] = {"model": cfg["model"], "mode": cfg["mode"], "length": length}
    out["segment"] = seg if cfg["mode"] == "stream" else None
    out["weights"] = "trained (part 1, first seed)" if cfg["weights"] else "initial (untrained)"
    out.update(seconds=seconds, tokens_per_s=length / seconds, rss_peak_reset=reset)
    out["method"] = "VmHWM (reset by /proc/self/clear_refs) - VmRSS before the stream" if reset else "ru_maxrss"
    out.update(ru_maxrss_increase_mib=(ru1 - ru0) / 1024, ru_maxrss_mib=ru1 / 1024, nonfinite_nll=b["nonfinite_nll"])
    out.update(bpc_first_block=b["bpc_blocks"][0], bpc_last_block=float(nll[-BLOCK:].mean() / math.log(2)))
    out.update(bpc_all=b["bpc"], bpc_first_256=float(nll[:256].mean() / math.log(2)), bpc_blocks=b["bpc_blocks"])
    out["curve"] = curve
    if reset:
        out["baseline_rss_mib"] = base / 1024
    out["peak_increase_mib"] = (proc_status_kib("VmHWM") - base) / 1024 if reset else out["ru_maxrss_increase_mib"]
    return out


def run_stream_probe(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    cmd = [sys.executable, os.path.abspath(__file__), "--_stream-probe", json.dumps(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        res = {**cfg, "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    else:
        res = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}
    log(
        f"streaming {cfg['model']} {cfg['mode']} {cfg['length']}: peak +{num(res.get('peak_increase_mib'), '.1f')}"
        f" MiB, {num(res.get('seconds'), '.1f')} s" + (f" ERROR {res['error']}" if "error" in res else "")
    )
    return res


def part_streaming(args: argparse.Namespace, weights: dict[str, str]) -> dict[str, Any]:
    held_out = []
    for name in args.stream_models:  # the held-out tail read as one stream (state carried, memory writing)
        dm = TextDataModule(seq_len=TEXT_DM["seq_len"], val_fraction=0.05)
        dm.setup("validate")
        data = dm.corpus[dm.split_index :].long()
        model = trained(name, weights.get(name))  # outside inference mode: the task-loss writes need autograd
        with torch.inference_mode():
            nll = stream_nll(model, data[:-1].unsqueeze(0), data[1:].unsqueeze(0), args.stream_segment)
        w = "trained (part 1, first seed)" if weights.get(name) else "initial (untrained)"
        b = bpc_fields(nll)
        held_out.append({"model": name, "tokens": int(len(data) - 1), "weights": w, **b})
        log(f"held-out stream {name}: {b['bpc']:.3f} bpc over {len(data) - 1} tokens")
    base = {"threads": args.threads, "segment": args.stream_segment}
    rows = [
        run_stream_probe({**base, "model": name, "mode": "stream", "length": length, "weights": weights.get(name)})
        for name in args.stream_models
        for length in args.stream_lengths
    ]
    stop: Optional[str] = None if "transformer" in args.models else "not run (--models)"
    last: Optional[dict[str, Any]] = None
    for length in args.tpp_lengths if stop is None else []:
        projected = last["seconds"] * (length / last["length"]) ** 2 if last else 0.0
        if projected > args.stream_time_cap:
            stop = (
                f"stopped before {length} tokens: the forward at {last['length']} took {last['seconds']:.1f} s,"
                f" so {length} would take about {projected:.0f} s (quadratic extrapolation) > the"
                f" {args.stream_time_cap:.0f} s cap"
            )
            break
        cfg = {**base, "model": "transformer", "mode": "whole", "length": length, "weights": weights.get("transformer")}
        rows.append(last := run_stream_probe(cfg))
        if "error" in last:
            stop = f"stopped at {length} tokens: the probe failed ({last['error']})"
            break
        if last["peak_increase_mib"] > args.stream_mem_cap:
            stop = (
                f"stopped after {length} tokens: its peak increase {last['peak_increase_mib']:.0f} MiB passed the"
                f" {args.stream_mem_cap:.0f} MiB cap"
            )
            break
    stop = stop or f"reached the longest length asked for ({args.tpp_lengths[-1]} tokens) within both caps"
    setting = {"batch": 1, "segment": args.stream_segment, "stream_lengths": args.stream_lengths}
    setting.update(tpp_lengths=args.tpp_lengths, time_cap_s=args.stream_time_cap, mem_cap_mib=args.stream_mem_cap)
    setting["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    setting["architectures"] = {n: architecture(n) for n in MODELS}
    setting["weights"] = {n: f"trained (part 1, seed {args.seeds[0]})" if n in weights else "initial" for n in MODELS}
    return {"setting": setting, "rows": rows, "held_out_stream": held_out, "transformer_stop": stop}


def bpc_tables(part: dict[str, Any]) -> list[dict[str, Any]]:
    s, o = part["setting"], part["setting"]["optimizer"]
    rows = []
    for name, block in part["models"].items():
        agg, p = block["aggregate"], part["parameters"][name]
        off = cell(agg["val_bpc_memorize_off"], ".4f", "non-finite") if name in STATEFUL else "n/a (stateless)"
        rows.append(
            [name + (f" ({agg['diverged']} diverged)" if agg["diverged"] else "")]
            + [f"{p['total']:,} ({p['non_embedding']:,})", p.get("trainable", p["total"]), f"{p['vs_hope']:+.1%}"]
            + [cell(agg["val_bpc"], ".4f", "diverged"), off, cell(agg["final_train_bpc"], ".3f", "diverged")]
            + [agg["train_tokens"], *(cell(agg[k], ".0f") for k in ("fit_s", "tokens_per_s", "median_step_ms"))]
        )
    title = f"Bits per byte on the default corpus: {s['data']}; {s['steps']} steps of {s['tokens_per_step']} tokens,"
    title += f" segments of {s['segment_len']} tokens, AdamW lr {o['lr']:g}, warm-up {o['warmup_steps']}, cosine; val"
    title += " bpc over the whole held-out tail with test-time memorization and without it (stateful models); mean ±"
    title += f" std over seeds {' '.join(map(str, s['seeds']))}; time: the fit alone"
    columns = ["model", "params (non-emb.)", "trainable", "vs Hope", "val bpc", "val bpc, memorize off"]
    columns += ["final train bpc", "train tokens", "fit s", "tokens/s", "ms/step (median)"]
    arch = [[n, b["architecture"]] for n, b in part["models"].items()]
    return [{"title": title, "columns": columns, "rows": rows}, table("Architectures", ["model", "architecture"], arch)]


def streaming_tables(part: dict[str, Any]) -> list[dict[str, Any]]:
    s, rows, f = part["setting"], part["rows"], num
    shown = {r["model"] for r in rows}

    def join(values: list[float], spec: str) -> str:
        return ", ".join(f(v, spec) for v in values)

    cells = []
    for r in rows:
        mode = f"stream ({r.get('segment')})" if r.get("mode") == "stream" else "whole sequence"
        if "error" in r:
            cells.append([r["model"], mode, r["length"], f"failed: {r['error']}", *[""] * 6])
        else:
            cells.append([r["model"], mode, r["length"], f(r["peak_increase_mib"], ".1f")])
            cells[-1] += [f(r["ru_maxrss_increase_mib"], ".1f"), f(r["seconds"], ".1f"), f(r["tokens_per_s"], ",.0f")]
            cells[-1] += [f(r["bpc_first_block"], ".3f"), f(r["bpc_last_block"], ".3f"), r["nonfinite_nll"]]
    title = "Streaming inference, peak memory against length: batch 1, `torch.inference_mode()`, one fresh process per"
    title += f" row; stateful models stream segments of {s['segment']} tokens (state carried, memory writing),"
    title += " Transformer++ reads the whole sequence in one forward pass. Peak: the peak resident set during the"
    title += " stream minus the resident set just before it. bpc over the first / last 4K tokens: training bytes, a"
    title += " check that nothing diverges, not a held-out score"
    columns = ["model", "mode", "tokens", "peak increase MiB", "ru_maxrss increase MiB", "s", "tokens/s"]
    weights = ", ".join(f"{n} {w}" for n, w in s["weights"].items() if n in shown)
    note = f"Transformer++: {part['transformer_stop']}. Weights: {weights}."
    out = [table(title, columns + ["bpc first 4K", "bpc last 4K", "non-finite"], cells, note)]
    if part.get("held_out_stream"):
        title = "The held-out tail (part 1's validation bytes) read as one stream, state carried over every segment of"
        hs = part["held_out_stream"]
        held = [
            [r["model"], r["tokens"], f(r["bpc"], ".3f"), join(r["bpc_blocks"], ".2f"), r["nonfinite_nll"]] for r in hs
        ]
        columns = ["model", "tokens", "bpc", "bpc of each 4K block", "non-finite"]
        out.append(table(f"{title} {s['segment']} tokens", columns, held))
    if longest := [r for r in rows if "error" not in r and len(r.get("bpc_blocks", [])) > 1]:
        bl = [
            [r["model"], r["mode"], r["length"], f(r["bpc_first_256"], ".3f"), join(r["bpc_blocks"], ".3f")]
            for r in longest
        ]
        columns = ["model", "mode", "tokens", "first 256 tokens (the training length)", "each block"]
        out.append(table(f"bpc of each {BLOCK}-token block along the stream (training bytes)", columns, bl))
    if curves := [r for r in rows if r.get("curve") and r["length"] == max(s["stream_lengths"])]:
        peaks = [[r["model"], ", ".join(f"{p['peak_increase_mib']:.1f}" for p in r["curve"])] for r in curves]
        title = f"Peak increase (MiB) so far, every {BLOCK} tokens, in the longest stream"
        out.append(table(title, ["model", "peak increase MiB"], peaks))
    return out


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``)."""
    seconds = [[n, f"{sec:.0f}"] for n, sec in report["part_seconds"].items()]
    out = [table("Parts", ["part", "seconds"], seconds, f"{report['threads']} torch thread(s) per run.")]
    if report.get("reproduced_runs"):
        title = "Runs repeated for another part (not pooled twice), with validation figures equal to the pooled runs'"
        rows = [[e["path"], ", ".join(e["runs"])] for e in report["reproduced_runs"]]
        out.append(table(title, ["report", "runs"], rows))
    builders = {"bpc": bpc_tables, "streaming": streaming_tables}
    return out + [t for name, part in report["parts"].items() for t in builders[name](part)]


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """One report from several of this script's reports on the same sources: ``bpc`` models pooled (equal settings);
    a ``bpc`` part of other seeds (run again for the streaming part's weights) must repeat pooled runs exactly and is
    recorded in ``reproduced_runs``; any other part may come from one report only. Raises ``ValueError`` otherwise."""
    reports, merged = merge_start(paths)
    merged.update(parts={}, part_seconds={})
    parts, reproduced = merged["parts"], []
    for path, report in zip(paths, reports, strict=True):
        for name, part in report["parts"].items():
            seconds = report["part_seconds"].get(name, 0.0)
            if name not in parts:
                parts[name], merged["part_seconds"][name] = part, seconds
            elif name == "bpc" and part["setting"] == parts["bpc"]["setting"]:
                parts["bpc"]["models"].update(part["models"])
                parts["bpc"]["parameters"].update(part["parameters"])
                merged["part_seconds"]["bpc"] += seconds
            elif name == "bpc":
                reproduced.append({"path": path, "runs": check_reproduced(part, parts["bpc"], path)})
            else:
                raise ValueError(f"Part {name!r} of {path} cannot be merged (only bpc parts with equal settings).")
        reproduced += report.get("reproduced_runs") or []
    return {**merged, **({"reproduced_runs": reproduced} if reproduced else {})}


def check_reproduced(part: dict[str, Any], pooled: dict[str, Any], path: str) -> list[str]:
    """Check that each run of a bpc ``part`` repeats the pooled run of the same model and seed (same validation
    figures); returns the ``model/seed`` names checked, raises ``ValueError`` where one differs or is missing."""
    if {**part["setting"], "seeds": None} != {**pooled["setting"], "seeds": None}:
        raise ValueError(f"The bpc part of {path} has other settings than the pooled one; it cannot be merged.")
    checked = []
    for model, entry in part["models"].items():
        runs = {r["seed"]: r for r in pooled["models"].get(model, {}).get("runs", [])}
        for run in entry["runs"]:
            want = runs.get(run["seed"])
            if want is None or any(run[k] != want[k] for k in ("val_memorize_on", "val_memorize_off", "diverged")):
                raise ValueError(
                    f"{path}: bpc {model} seed {run['seed']} does not repeat the pooled run (figures differ or the"
                    " pooled report lacks it); merge runs of the same code only."
                )
            checked.append(f"{model}/seed{run['seed']}")
    return checked


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, PARTS, seeds="bpc seeds (default 0 1 2; 0 with --quick)")
    add = parser.add_argument
    add("--steps", type=int, help="bpc: optimizer steps per run (default 300; 10 with --quick)")
    add("--models", nargs="+", choices=MODELS, help="models to run (default: all)")
    add("--stream-segment", type=int, default=512, help="streaming: tokens per segment (512)")
    add("--stream-lengths", nargs="+", type=int, help="streaming lengths (default 4096 65536)")
    add("--tpp-lengths", nargs="+", type=int, help="Transformer++ lengths (default 4096 ... 65536)")
    add("--stream-time-cap", type=float, default=60.0, help="Transformer++ time cap, s (60)")
    add("--stream-mem-cap", type=float, default=4096.0, help="Transformer++ memory cap, MiB (4096)")
    add("--merge", nargs="+", metavar="JSON", help="pool reports of runs of the same code into one")
    add("--_stream-probe", dest="stream_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.merge:
        return save(merge_reports(args.merge), time.perf_counter(), args.out, log)
    if args.stream_probe is not None:
        with contextlib.redirect_stdout(sys.stderr):
            result = stream_probe(json.loads(args.stream_probe))
        print(json.dumps(result))
        return result
    args.parts, q = parse_parts(parser, args.parts, PARTS), args.quick
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if q else [0, 1, 2])))
    args.models = [m for m in MODELS if m in (args.models or MODELS)]
    streamed = ("hope",) if q else ("hope", "titans", "hope_attention", "hope_rho1")
    args.stream_models = [m for m in streamed if m in args.models]
    args.steps = args.steps or (10 if q else 300)
    args.stream_lengths = sorted(args.stream_lengths or ([4096, 8192] if q else [4096, 65536]))
    args.tpp_lengths = sorted(args.tpp_lengths or ([4096] if q else [4096, 8192, 16384, 32768, 65536]))
    if min(args.steps, args.threads, args.stream_segment) < 1:
        parser.error("--steps, --threads and --stream-segment must be >= 1")
    if any(L % args.stream_segment for L in args.stream_lengths):
        parser.error("--stream-lengths must be multiples of --stream-segment")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k != "stream_probe"}
    report = report_header(TITLE, "benchmarks/lm.py", argv, settings, environment(args.threads, SOURCES))
    report.update(threads=args.threads, parts={}, part_seconds={})
    for name, p in parameter_counts(256).items():
        if abs(p["vs_hope"]) > 0.05:
            log(f"WARNING: {name} ({architecture(name)}) has {p['total']} parameters, {p['vs_hope']:+.1%} vs Hope")
    with tempfile.TemporaryDirectory(prefix="nl_lm_bench_") as tmp:
        weights: dict[str, str] = {}
        for name in args.parts:
            t0 = time.perf_counter()
            log(f"part {name} ...")
            if name == "bpc":
                report["parts"][name] = part_bpc(args, tmp if "streaming" in args.parts else None)
                weights = report["parts"][name].pop("saved_weights")
            else:
                report["parts"][name] = part_streaming(args, weights)
            report["part_seconds"][name] = round(time.perf_counter() - t0, 1)
            log(f"part {name}: {report['part_seconds'][name]:.0f} s")
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
