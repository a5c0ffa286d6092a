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
"""Continual language modelling: does nested learning reduce forgetting across text domains? (tiny CPU sizes)

A byte stream of the built-in domains of ``nl_lightning.data.text_domains`` (0 ``prose``, 1 ``code``, 2
``docstrings``; ``--bytes-per-domain`` bytes each, the last 10 % held out): stage ``i`` trains on domain ``i`` only,
then every domain's held-out bytes are evaluated. Sources' sha256 and domain digests are in the JSON.

Part 1, ``matrix``: ``R[i][j]``, bits per byte on domain ``j`` after stage ``i``; per run ``final_avg`` (mean of
``R[2]``), ``forgetting`` (mean over ``j < 2`` of ``R[2][j] - min_{j <= i < 2} R[i][j]``; positive: forgotten) and
``learning`` (mean of ``R[1][1]``, ``R[2][2]``), mean +- std over ``--seeds``. A stage is one ``Trainer.fit`` of
``--steps`` steps of 8 crops of 256 bytes (``TextDomainsDataModule(seq_len=256, batch_size=8, samples_per_epoch=800,
val_fraction=0.1, seed=S)``, ``segment_len=128``), a fresh AdamW (lr 3e-3, warm-up ``min(30, steps // 10)``, cosine),
``seed_everything(S)`` first. Stage 0, ``TransformerPP(dim=64, depth=3, heads=4, mlp_mult=2.0)`` on domain 0 once per
seed, starts stages 1-2 of every method but ``hope`` (``DESCRIPTION``): ``slow_lower`` (``MultiFrequencyUpdates``:
embedding/head and blocks 0-1 every 4 steps); ``cms_frozen`` (``to_cms(model, "blocks.*.mlp", chunk_sizes=[1, 1, 4],
in_context=False)``, which computes the stage-0 model exactly; only the added levels 1-2 train);
``cms_consolidation`` (level 2 every 4 steps, ``CMSConsolidation`` alpha 0.5); ``replay``
(``ExperienceReplay(buffer_size=--replay-buffer, replay_batch_size=2)``, first offered the stage-0 crops; 6 new + 2
stored crops per step); ``ewc`` (``ElasticWeightConsolidation(ewc_lambda=--ewc-lambda, fisher_samples=200)``, after
stages 0 and 1); ``hope`` (``HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64],
cms_hidden_mult=2.5)``, stages 0-2 from scratch, evaluated with its memory writing).

Part 2, ``stream`` (no training): the stage-2 ``naive`` and ``hope`` models of each seed read ``--stream-bytes``
held-out bytes of domain 0, 1, 2, then the next ones of domain 0: Hope in segments of 128 tokens, state carried, memory
writing (and once with ``write=False``, a control); Transformer++ each block of 64 tokens with the 64 before it.
Reported: bits per byte per ``--stream-block`` tokens (mean over seeds) and per domain visit.

Running it::

    python benchmarks/continual_lm.py --quick --out /tmp/continual_lm.json       # smoke run
    OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --out benchmarks/results/continual_lm.json   # one process
    # or in processes side by side (one core each), then one report:
    OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods naive hope --seeds 0 1 --out A.json &
    (OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods naive hope --seeds 2 --out B.json &&
     OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods slow_lower cms_frozen cms_consolidation replay \\
        ewc --parts matrix --out C.json)
    wait
    python benchmarks/continual_lm.py --merge A.json B.json C.json --out benchmarks/results/continual_lm.json
    python benchmarks/render.py continual_lm                 # the page benchmarks/results/continual_lm.md

``--merge`` pools reports of the same sources and settings (per method and seed; stream runs per seed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import itertools
import math
import statistics
import time
from collections.abc import Sequence
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
    quiet,
    report_header,
    save,
    step_stats,
    stream_nll,
    summary,
    table,
)
from torch import Tensor

from nl_lightning.callbacks import CMSConsolidation, ElasticWeightConsolidation, ExperienceReplay, MultiFrequencyUpdates
from nl_lightning.data.text_domains import BUILTIN_DOMAINS, TextDomainsDataModule, domain_digest
from nl_lightning.levels import Level
from nl_lightning.models.hope import HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.to_cms import to_cms
from nl_lightning.models.transformer import TransformerPP

TITLE = "Continual language modelling across text domains (tiny CPU sizes)"
PARTS = ("matrix", "stream")
METHODS = ("naive", "slow_lower", "cms_frozen", "cms_consolidation", "replay", "ewc", "hope")
TPP: dict[str, Any] = {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0}
HOPE: dict[str, Any] = {"dim": 64, "depth": 2, "heads": 4, "chunk_size": 16, "cms_chunk_sizes": [16, 64]}
HOPE["cms_hidden_mult"] = 2.5
OPTIM = {"lr": 3e-3, "warmup_steps": 30}
TEXT = {"seq_len": 256, "batch_size": 8, "samples_per_epoch": 800, "segment_len": 128, "val_fraction": 0.1}
SLOW_EVERY, CMS_CHUNKS, REPLAY_BATCH, EWC_FISHER, ALPHA = 4, [1, 1, 4], 2, 200, 0.5
LOWER = ["embed.*", "blocks.0.*", "blocks.1.*"]  # the tied embedding / head and the lower two blocks
TPP_CONTEXT, TPP_STRIDE = 128, 64  # the stream part's sliding context
DESCRIPTION = {
    "naive": "Transformer++ fine-tuned on each new domain (also: Transformer++ trained on the stream from scratch)",
    "slow_lower": f"naive + MultiFrequencyUpdates: embedding/head and blocks 0-1 every {SLOW_EVERY} steps, the rest"
    " every step",
    "cms_frozen": f"to_cms(blocks.*.mlp, chunk_sizes={CMS_CHUNKS}, in_context=False); only the added levels 1-2 train",
    "cms_consolidation": f"cms_frozen + level 2 every {SLOW_EVERY} steps + CMSConsolidation drift level 1 -> 2"
    f" (alpha {ALPHA})",
    "replay": f"naive + ExperienceReplay ({REPLAY_BATCH} stored crops + 6 new per step)",
    "ewc": "naive + online EWC (Fisher after stages 0 and 1)",
    "hope": "HopeModule trained on the stream from scratch (memory writing at evaluation)",
}
SOURCES = [f"models/{n}.py" for n in ("lm", "hope", "transformer", "to_cms", "_ffn_spec", "cms", "cms_memory")]
SOURCES += [f"models/{n}.py" for n in ("task_loss_cms", "self_modifying_titans")] + ["levels.py", "data/text.py"]
SOURCES += [f"callbacks/{n}.py" for n in ("multi_frequency", "cms_consolidation", "replay", "ewc")]
SOURCES += ["data/text_domains.py"]
SETTING_KEYS = ("steps", "tokens_per_step", "bytes_per_domain", "ewc_lambda", "replay_buffer", "stream_bytes")
SETTING_KEYS += ("stream_block", "quick")
log = make_log("continual_lm")


def build(kind: str, steps: int) -> CausalLM:
    """A tiny ``TransformerPP`` (``kind="tpp"``) or ``HopeModule`` (``"hope"``) with the shared optimizer settings."""
    cls, kwargs = (HopeModule, HOPE) if kind == "hope" else (TransformerPP, TPP)
    warmup = min(OPTIM["warmup_steps"], max(1, steps // 10))
    schedule = {"lr": OPTIM["lr"], "warmup_steps": warmup, "max_steps_schedule": max(steps, warmup + 1)}
    return cls(vocab_size=256, segment_len=TEXT["segment_len"], **schedule, **kwargs)


def make_dm(args: argparse.Namespace, seed: int, batch_size: int = TEXT["batch_size"]) -> TextDomainsDataModule:
    kwargs = {k: TEXT[k] for k in ("seq_len", "val_fraction", "samples_per_epoch")}
    return TextDomainsDataModule(batch_size=batch_size, bytes_per_domain=args.bytes_per_domain, seed=seed, **kwargs)


def fit_stage(model: CausalLM, dm: TextDomainsDataModule, domain: int, steps: int, seed: int, callbacks=()) -> dict:  # noqa: ANN001
    """One stage: ``steps`` optimizer steps on ``domain`` (a fresh optimizer and schedule), no validation."""
    pl.seed_everything(seed, verbose=False)
    dm.set_domain(domain)
    stats = step_stats()
    trainer = cpu_trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stats, *callbacks])
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds, tail = time.perf_counter() - t0, [v for v in stats.losses[-10:] if math.isfinite(v)]
    out = {"domain": domain, "steps": trainer.global_step, "fit_s": seconds, "diverged_at": stats.first_nonfinite}
    return {**out, "final_train_bpb": statistics.fmean(tail) / math.log(2) if tail else None}


def evaluate(model: CausalLM, dm: TextDomainsDataModule) -> tuple[list[Optional[float]], float]:
    """Bits per byte on every domain's held-out bytes (memorization on for a stateful model), and the seconds."""
    t0 = time.perf_counter()
    results = cpu_trainer().validate(model, datamodule=dm, verbose=False)
    bpb = [float(res[f"val_bpc_dl{j}"]) for j, res in enumerate(results)]
    return [v if math.isfinite(v) else None for v in bpb], time.perf_counter() - t0


def stage_batches(args: argparse.Namespace, seed: int, domain: int, steps: int) -> list[list[Tensor]]:
    """The ``[tokens, targets]`` training batches a ``steps``-step stage on ``domain`` draws (epochs in order)."""
    dm = make_dm(args, seed)
    dm.setup("fit")
    dm.set_domain(domain)
    out: list[list[Tensor]] = []
    for epoch in range(steps):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        out += [[b["tokens"], b["targets"]] for b in itertools.islice(loader, steps - len(out))]
        if len(out) == steps:
            return out
    return out


def stage_callbacks(method: str, replay: Any, ewc: Any) -> list[pl.Callback]:
    """The callbacks of one stage of ``method`` (fresh ones each stage, but the replay buffer and EWC state)."""
    if method == "slow_lower":
        return [MultiFrequencyUpdates([Level("lower", LOWER, every=SLOW_EVERY)])]
    if method == "cms_consolidation":
        slow = [f"blocks.{b}.mlp.cms.blocks.2.*" for b in range(TPP["depth"])]
        pairs = [
            {"fast": f"blocks.{b}.mlp.cms.blocks.1", "slow": f"blocks.{b}.mlp.cms.blocks.2", "alpha": ALPHA}
            | {"params": ["w1", "b1", "w2", "b2"], "name": f"block{b}"}
            for b in range(TPP["depth"])
        ]
        return [MultiFrequencyUpdates([Level("cms_slow", slow, every=SLOW_EVERY)]), CMSConsolidation(pairs)]
    return [c for c in (replay, ewc) if c is not None]


def run_method(method: str, args: argparse.Namespace, seed: int, stage0: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Stages 1-2 of ``method`` from the shared stage-0 weights (``hope``: stages 0-2 from scratch)."""
    steps, rows, stages, eval_s = args.steps, [], [], 0.0
    dm = make_dm(args, seed, batch_size=TEXT["batch_size"] - (REPLAY_BATCH if method == "replay" else 0))
    with quiet(io.StringIO(), args.verbose):
        if method == "hope":
            pl.seed_everything(seed, verbose=False)
            model, first = build("hope", steps), 0
        else:
            model, first = build("tpp", steps), 1
            model.load_state_dict(stage0["state_dict"])  # type: ignore[index]
            rows.append(list(stage0["row"]))  # type: ignore[index]
            stages.append(stage0["stage"])  # type: ignore[index]
            if method in ("cms_frozen", "cms_consolidation"):  # only the added levels 1-2 keep gradients
                to_cms(model, "blocks.*.mlp", chunk_sizes=CMS_CHUNKS, in_context=False)
                for name, p in model.named_parameters():
                    p.requires_grad_(".cms.blocks.1." in name or ".cms.blocks.2." in name)
        trained = {id(p): p for p in model.parameters() if p.requires_grad}.values()
        counts = {"total": model.num_parameters(), "trained": sum(p.numel() for p in trained)}
        ewc = replay = None
        if method == "ewc":
            ewc = ElasticWeightConsolidation(ewc_lambda=args.ewc_lambda, fisher_samples=EWC_FISHER, boundaries="manual")
        if method == "replay":
            replay = ExperienceReplay(buffer_size=args.replay_buffer, replay_batch_size=REPLAY_BATCH, seed=seed)
            for batch in stage_batches(args, seed, 0, steps):  # what the reservoir would have seen
                replay.reservoir.add(batch)
        fisher_steps = math.ceil(EWC_FISHER / TEXT["batch_size"])
        for domain in range(first, 3):
            if ewc is not None:  # after stage domain - 1
                ewc.consolidate(model, stage_batches(args, seed, domain - 1, fisher_steps))
            callbacks = stage_callbacks(method, replay, ewc)
            stages.append(stage := fit_stage(model, dm, domain, steps, seed, callbacks))
            if method == "cms_consolidation":
                stage["consolidations"] = sum(callbacks[1].transfers.values())  # type: ignore[attr-defined]
            if stage["diverged_at"] is not None:
                log(f"{method} seed {seed}: non-finite training loss at stage {domain} step {stage['diverged_at']}")
                break
            row, seconds = evaluate(model, dm)
            eval_s += seconds
            rows.append(row)
    rows += [[None] * 3] * (3 - len(rows))
    run = {"seed": seed, "R": rows, "stages": stages, "parameters": counts, "eval_s": eval_s, **metrics(rows)}
    if method in ("hope", "naive"):
        run["final_state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(
        f"{method} seed {seed}: final avg {num(run['final_avg'], '.4f')}, forgetting {num(run['forgetting'], '+.4f')},"
        f" learning {num(run['learning'], '.4f')}, R = {[[num(v, '.3f') for v in r] for r in rows]},"
        f" fit {sum(s['fit_s'] for s in stages[first:]):.0f} s"
    )
    return run


def metrics(R: list[list[Optional[float]]]) -> dict[str, Any]:
    """Final average, forgetting (per old domain and averaged) and learning from a 3x3 matrix (``None``: missing)."""
    T, last = len(R), R[-1]
    per_domain: list[Optional[float]] = []
    for j in range(T - 1):
        earlier = [R[i][j] for i in range(j, T - 1)]
        ok = finite(last[j]) and all(finite(v) for v in earlier)
        per_domain.append(last[j] - min(earlier) if ok else None)  # type: ignore[operator]
    new = [R[i][i] for i in range(1, T)]
    out = {"final_avg": statistics.fmean(last) if all(finite(v) for v in last) else None}
    out["forgetting"] = statistics.fmean(per_domain) if all(v is not None for v in per_domain) else None
    out.update(
        forgetting_per_domain=per_domain, learning=statistics.fmean(new) if all(finite(v) for v in new) else None
    )
    return {**out, "learning_per_domain": new}


def part_matrix(args: argparse.Namespace) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Tensor]]]:
    methods: dict[str, Any] = {m: {"runs": [], "description": DESCRIPTION[m]} for m in args.methods}
    finals, stage0_runs = {}, []
    for seed in args.seeds:
        stage0 = None
        if any(m != "hope" for m in args.methods):  # stage 0 of the Transformer++ methods
            with quiet(io.StringIO(), args.verbose):
                pl.seed_everything(seed, verbose=False)
                model, dm = build("tpp", args.steps), make_dm(args, seed)
                stage = fit_stage(model, dm, 0, args.steps, seed)
                row, stage["eval_s"] = evaluate(model, dm)
            log(f"stage 0 (Transformer++) seed {seed}: R[0] = {[num(v, '.3f') for v in row]}, {stage['fit_s']:.0f} s")
            digest = hashlib.sha256()
            for name, t in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(t.detach().float().contiguous().numpy().tobytes())
            stage0 = {"state_dict": copy.deepcopy(model.state_dict()), "row": row, "stage": stage}
            stage0_runs.append({"seed": seed, "digest": digest.hexdigest()[:16], "R0": row, **stage})
        for method in args.methods:
            run = run_method(method, args, seed, stage0)
            if (state := run.pop("final_state_dict", None)) is not None:
                finals[(method, seed)] = state
            methods[method]["runs"].append(run)
    return {"methods": methods, "stage0": stage0_runs}, finals


def part_stream(args: argparse.Namespace, finals: dict[tuple[str, int], dict[str, Tensor]]) -> dict[str, Any]:
    dm, n, pieces, segments = make_dm(args, 0), args.stream_bytes, [], []
    for k, (domain, offset) in enumerate(((0, 0), (1, 0), (2, 0), (0, n))):  # domains 0, 1, 2, then 0 again
        if len(held := dm.domain_bytes(domain, "val")) < offset + n:
            raise ValueError(
                f"Domain {domain} holds {len(held)} held-out bytes, fewer than the {offset + n} the stream needs; lower"
                " --stream-bytes or raise --bytes-per-domain."
            )
        pieces.append(held[offset : offset + n])
        segments.append({"visit": k, "domain": domain, "name": dm.domain_names[domain], "start": k * n})
        segments[-1]["end"] = k * n + n
    data = torch.cat(pieces).long()
    tokens, targets = data[:-1].unsqueeze(0), data[1:]
    runs = []
    for seed in (s for s in args.seeds if ("naive", s) in finals and ("hope", s) in finals):
        out: dict[str, Any] = {"seed": seed, "curves": {}, "seconds": {}, "segments": {}, "nonfinite": {}}
        for name, kind, write in (
            ("hope", "hope", True),
            ("hope_write_off", "hope", False),
            ("transformer", "tpp", None),
        ):
            model = build(kind, 10)  # outside inference mode: the task-loss writes need autograd on the parameters
            model.load_state_dict(finals[("hope" if kind == "hope" else "naive", seed)])
            model.eval()
            t0 = time.perf_counter()
            with torch.inference_mode():
                if kind == "hope":  # segments of 128 tokens, the state carried
                    nll = stream_nll(model, tokens, targets[None], TEXT["segment_len"], bool(write))
                else:  # each block of TPP_STRIDE tokens read with the TPP_CONTEXT - TPP_STRIDE tokens before it
                    nll = torch.zeros(tokens.shape[1], dtype=torch.float64)
                    for start in range(0, tokens.shape[1], TPP_STRIDE):
                        lo = max(0, start + TPP_STRIDE - TPP_CONTEXT)
                        new = model(tokens[:, lo : start + TPP_STRIDE])[0][0, start - lo :]
                        end = start + new.shape[0]
                        nll[start:end] = F.cross_entropy(new.float(), targets[start:end], reduction="none").double()
            out["seconds"][name] = time.perf_counter() - t0
            bits = nll / math.log(2)
            out["curves"][name] = [float(b.mean()) for b in bits.split(args.stream_block)]
            # segment means: token t predicts byte t + 1, which belongs to the segment holding t + 1
            out["segments"][name] = [float(bits[max(0, s["start"] - 1) : s["end"] - 1].mean()) for s in segments]
            out["nonfinite"][name] = int((~torch.isfinite(nll)).sum())
        visits = "; ".join(f"{k} {[round(v, 3) for v in s]}" for k, s in out["segments"].items())
        log(f"stream seed {seed}: per-visit bpb {visits}")
        runs.append(out)
    setting = {"stream_bytes": n, "block": args.stream_block, "segments": segments, "hope_segment": TEXT["segment_len"]}
    setting.update(transformer_context=TPP_CONTEXT, transformer_stride=TPP_STRIDE, tokens=int(len(data) - 1))
    return {"setting": setting, "runs": runs}


def aggregate(report: dict[str, Any]) -> None:
    """Means and stds over seeds of every method's figures and of the stream (in place)."""
    for block in report["parts"].get("matrix", {}).get("methods", {}).values():
        runs = block["runs"] = sorted(block["runs"], key=lambda r: r["seed"])
        agg: dict[str, Any] = {k: summary([r[k] for r in runs]) for k in ("final_avg", "forgetting", "learning")}
        agg["R"] = [[summary([r["R"][i][j] for r in runs]) for j in range(3)] for i in range(3)]
        agg["forgetting_per_domain"] = [summary([r["forgetting_per_domain"][j] for r in runs]) for j in range(2)]
        agg.update(seeds=[r["seed"] for r in runs], parameters=runs[0]["parameters"])
        agg["fit_s"] = summary([sum(s["fit_s"] for s in r["stages"]) for r in runs])
        block["aggregate"] = agg
    if "stream" in report["parts"]:
        part = report["parts"]["stream"]
        runs = part["runs"] = sorted(part["runs"], key=lambda r: r["seed"])
        names = list(runs[0]["curves"]) if runs else []
        cols = {k: {n: list(zip(*(r[k][n] for r in runs), strict=True)) for n in names} for k in ("curves", "segments")}
        agg = {"seeds": [r["seed"] for r in runs]}
        agg["curves"] = {n: [statistics.fmean(v) for v in c] for n, c in cols["curves"].items()}
        agg["segments"] = {n: [summary(list(v)) for v in c] for n, c in cols["segments"].items()}
        part["aggregate"] = agg if runs else {}


NOTES = (
    "Forgetting can be negative: the domains share structure (prose and docstrings are both English), so training on"
    " docstrings lowers the bpb on prose again. Hope is evaluated with its memory writing while it reads (a test-time"
    " adaptation Transformer++ does not have; the stream's `hope_write_off` row separates the two). The added CMS"
    " levels of `cms_frozen` and `cms_consolidation` act on every input, so training them also changes the old"
    " domains' outputs. `hope` starts from its own initialisation; the EWC strength was not tuned."
)


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's tables (``benchmarks/render.py``): settings, summary, every method's matrix, the stream."""
    a, d, parts = report["settings"], report["domains"], report["parts"]
    names = d["names"]

    def signed(entry: dict[str, Any]) -> str:  # a cell with a signed mean (+0.123 ± 0.045)
        return ("+" if entry["mean"] is not None and entry["mean"] >= 0 else "") + cell(entry, ".3f")

    title = f"Settings: {a['steps']} optimizer steps per stage of {a['tokens_per_step']:,} tokens, seeds"
    title += f" {', '.join(map(str, a['seeds']))}, EWC lambda {a['ewc_lambda']:g}, replay buffer {a['replay_buffer']}"
    title += " crops" + (" (--quick: a smoke run, not a measurement)" if a.get("quick") else "") + ". Domains"
    rows = [[f"{j}: {n}", d["bytes"][j], d["held_out_bytes"][j], d["digests"][j]] for j, n in enumerate(names)]
    out = [table(title, ["domain", "bytes", "held out", "digest"], rows)]
    got = parts.get("matrix", {}).get("methods", {})
    methods = {m: got[m] for m in METHODS if m in got}
    rows = []
    for m, block in methods.items():
        g, p = block["aggregate"], block["aggregate"]["parameters"]
        rows.append([m, f"{p['total']:,} / {p['trained']:,}", cell(g["final_avg"]), signed(g["forgetting"])])
        rows[-1] += [" / ".join(signed(g["forgetting_per_domain"][j]) for j in range(2)), cell(g["learning"])]
        rows[-1].append(len(g["seeds"]))
    columns = ["method", "parameters (total / trained)", "final avg bpb", "forgetting (bits)"]
    columns += [f"forgetting on {names[0]} / on {names[1]}", "learning (new domains, bpb)", "seeds"]
    title = "Summary (bits per byte, lower is better; mean ± std over seeds)"
    out += [table(title, columns, rows, NOTES)] if rows else []
    for m, block in methods.items():
        g = block["aggregate"]
        fpd = ", ".join(f"{names[j]} {signed(g['forgetting_per_domain'][j])}" for j in range(2))
        note = f"Forgetting per old domain: {fpd}. Training time (all stages): {cell(g['fit_s'], '.0f')} s."
        rows = [[f"{i} ({names[i]})", *(cell(g["R"][i][j]) for j in range(3))] for i in range(3)]
        title = f"{m}: {block['description']}; `R[i][j]`, bpb on domain j after stage i"
        out.append(table(title, ["after stage", *(f"{j}: {n}" for j, n in enumerate(names))], rows, note))
    if (stream := parts.get("stream", {})).get("aggregate"):
        s, g = stream["setting"], stream["aggregate"]
        title = f"Test-time view: {s['stream_bytes']:,} held-out bytes per domain visit read without training by the"
        title += f" stage-2 models (seeds {', '.join(map(str, g['seeds']))}); Hope in segments of {s['hope_segment']}"
        title += f" tokens, state carried; Transformer++ in blocks of {s['transformer_stride']} tokens with the"
        title += f" {s['transformer_context'] - s['transformer_stride']} before each. bpb per visit"
        rows = [[n, *(cell(v) for v in visits)] for n, visits in g["segments"].items()]
        note = f"The bpb of every block of {s['block']} tokens, mean over seeds, is in the JSON"
        columns = ["model", *(f"{v['visit']}: {v['name']}" for v in s["segments"])]
        out.append(table(title, columns, rows, note + " (`parts.stream.aggregate.curves`)."))
    return out


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """One report from several of this script's reports on the same sources and settings: runs pooled per method
    and seed, stream runs per seed. Raises ``ValueError`` on disagreeing sources, settings or stage-0 weights, or on a
    (method, seed) run present twice."""
    reports, merged = merge_start(paths)
    first = reports[0]
    parts, seconds, stage0 = {}, {}, {}

    def add(runs: list[dict[str, Any]], run: dict[str, Any], what: str, path: str) -> None:
        if any(x["seed"] == run["seed"] for x in runs):
            raise ValueError(f"{path}: {what} seed {run['seed']} is in two reports.")
        runs.append(run)

    for path, r in zip(paths, reports, strict=True):
        if any(r["settings"][k] != first["settings"][k] for k in SETTING_KEYS) or r["domains"] != first["domains"]:
            raise ValueError(f"{path} ran other settings or domains than {paths[0]}.")
        for name, sec in r["part_seconds"].items():
            seconds[name] = seconds.get(name, 0.0) + sec
        if "matrix" in r["parts"]:
            part = parts.setdefault("matrix", {"methods": {}, "stage0": []})
            for s in r["parts"]["matrix"]["stage0"]:
                if stage0.setdefault(s["seed"], s["digest"]) != s["digest"]:
                    raise ValueError(f"{path}: the stage-0 weights of seed {s['seed']} differ from another run's.")
                part["stage0"] += [s] if all(x["seed"] != s["seed"] for x in part["stage0"]) else []
            for name, block in r["parts"]["matrix"]["methods"].items():
                target = part["methods"].setdefault(name, {"runs": [], "description": block["description"]})
                for run in block["runs"]:
                    add(target["runs"], run, f"method {name!r}", path)
        if "stream" in r["parts"]:
            part = parts.setdefault("stream", {"setting": r["parts"]["stream"]["setting"], "runs": []})
            for run in r["parts"]["stream"]["runs"]:
                add(part["runs"], run, "stream", path)
    merged["parts"], merged["part_seconds"] = {k: parts[k] for k in PARTS if k in parts}, seconds
    methods = parts.get("matrix", {}).get("methods", {}).values()
    merged["settings"]["seeds"] = sorted({run["seed"] for b in methods for run in b["runs"]})
    aggregate(merged)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, PARTS, seeds="seeds (default 0 1 2; 0 with --quick)")
    add = parser.add_argument
    add("--methods", nargs="+", choices=METHODS, help="methods to run (default: all)")
    add("--steps", type=int, help="optimizer steps per stage (default 200; 6 with --quick)")
    add("--bytes-per-domain", type=int, help="bytes per domain (default 300000; 40000 with --quick)")
    add("--ewc-lambda", type=float, default=1000.0, help="EWC penalty strength (1000)")
    add("--replay-buffer", type=int, default=1000, help="replay reservoir, crops (1000)")
    add("--stream-bytes", type=int, help="bytes per domain visit of the stream (8192; 1024 quick)")
    add("--stream-block", type=int, help="tokens per point of the stream curves (512; 128 quick)")
    add("--verbose", action="store_true", help="show Lightning's output on stderr")
    add("--merge", nargs="+", metavar="JSON", help="pool reports of the same sources and settings")
    args = parser.parse_args(argv)
    if args.merge:
        return save(merge_reports(args.merge), time.perf_counter(), args.out, log)
    args.parts, q = parse_parts(parser, args.parts, PARTS), args.quick
    args.methods = [m for m in METHODS if m in (args.methods or METHODS)]
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])))
    defaults = {"steps": (6, 200), "bytes_per_domain": (40_000, 300_000), "stream_bytes": (1024, 8192)}
    for key, (quick, full) in {**defaults, "stream_block": (128, 512)}.items():
        setattr(args, key, getattr(args, key) or (quick if q else full))
    if min(args.steps, args.threads, args.stream_bytes, args.stream_block, args.replay_buffer) < 1:
        parser.error("--steps, --threads, --stream-bytes, --stream-block and --replay-buffer must be >= 1")
    if "stream" in args.parts and not {"naive", "hope"} <= set(args.methods):
        parser.error("the stream part reads the stage-2 weights of naive and hope: run both, or --parts matrix")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = environment(args.threads, SOURCES)
    report = report_header(TITLE, "benchmarks/continual_lm.py", argv, dict(vars(args)), env)
    settings = report["settings"] = {k: getattr(args, k) for k in SETTING_KEYS if k != "tokens_per_step"}
    settings.update(tokens_per_step=TEXT["batch_size"] * TEXT["seq_len"], seeds=args.seeds, text=TEXT)
    settings["optimizer"] = {**OPTIM, "warmup_steps": min(OPTIM["warmup_steps"], max(1, args.steps // 10))}
    settings["transformer"] = f"TransformerPP({', '.join(f'{k}={v}' for k, v in TPP.items())})"
    settings["hope"] = f"HopeModule({', '.join(f'{k}={v}' for k, v in HOPE.items())})"
    settings["domain_order"] = list(BUILTIN_DOMAINS)
    dm = make_dm(args, 0)
    dm.setup("fit")
    every = [dm.domain_bytes(j, "all") for j in range(dm.num_domains)]
    report["domains"] = {"names": list(dm.domain_names), "bytes": [int(len(b)) for b in every]}
    report["domains"]["held_out_bytes"] = [int(len(dm.domain_bytes(j, "val"))) for j in range(dm.num_domains)]
    report["domains"]["digests"] = [domain_digest(b) for b in every]
    report["parts"], report["part_seconds"], t0 = {}, {}, time.perf_counter()
    log(f"part matrix: methods {args.methods}, seeds {args.seeds}, {args.steps} steps per stage ...")
    matrix, finals = part_matrix(args)
    if "matrix" in args.parts:
        report["parts"]["matrix"] = matrix
    report["part_seconds"]["matrix"] = round(time.perf_counter() - t0, 1)
    if "stream" in args.parts:
        t0 = time.perf_counter()
        log("part stream ...")
        report["parts"]["stream"] = part_stream(args, finals)
        report["part_seconds"]["stream"] = round(time.perf_counter() - t0, 1)
    aggregate(report)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
