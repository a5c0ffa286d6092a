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

A domain-incremental byte-level stream of three text domains that every Python installation holds
(``nl_lightning.data.text_domains``, built-in domains): 0 ``prose`` (``pydoc_data.topics``), 1 ``code``
(standard-library source with docstrings and comments removed), 2 ``docstrings`` (the same modules' docstrings),
``--bytes-per-domain`` bytes each (300,000; at most 6,000 per source file), the last 10 % of each held out. Stage ``i``
trains on domain ``i`` only; after every stage the model is evaluated on the held-out bytes of every domain. Every
number is measured in this process; nothing is copied from a paper. The sha256 of the model, callback and data sources
and a digest of each domain's bytes are in the JSON.

Part 1, ``matrix`` (the forgetting matrix)
------------------------------------------
``R[i][j]``: bits per byte on domain ``j``'s held-out bytes after stage ``i`` (mean cross-entropy over every held-out
byte; contiguous windows of 256 bytes, read in segments of 128). From it, per run:

- ``final_avg``: the mean of the last row, ``mean_j R[2][j]`` (lower is better);
- ``forgetting`` (bits): for each old domain ``j < 2``, ``R[2][j] - min_{j <= i < 2} R[i][j]`` (the final bpb minus the
  best bpb reached on it earlier), averaged over the old domains; positive means forgotten;
- ``learning``: ``R[i][i]`` for the new domains ``i = 1, 2`` (bpb on a domain right after training on it), averaged.

Mean +- sample std over the seeds (``--seeds``, 0 1 2). Every stage is one ``Trainer.fit`` of ``--steps`` (200)
optimizer steps of 8 crops of 256 bytes (``TextDomainsDataModule(seq_len=256, batch_size=8, samples_per_epoch=800,
val_fraction=0.1, seed=S)``; ``segment_len=128``: the memories are carried across the two segments of a crop), so
every method sees ``steps * 8 * 256`` tokens per stage; with a fresh AdamW (lr 3e-3, weight decay 0.1 on matrices,
betas (0.9, 0.95)), linear warm-up over ``min(30, steps // 10)`` steps and a cosine decay to 0.1 x lr at the stage's
last step, gradient clipping at 1.0 (the ``CausalLM`` defaults, as in ``benchmarks/lm.py``). ``seed_everything(S)``
before every stage.

Methods. Stage 0 is shared: ``TransformerPP(dim=64, depth=3, heads=4, mlp_mult=2.0)`` (139,712 parameters, the
Transformer++ of ``benchmarks/lm.py``) trained on domain 0 once per seed; its weights start stages 1-2 of every
method but ``hope``:

- ``naive``: fine-tune every parameter on domain 1, then 2. This is also "Transformer++ trained on the stream from
  scratch" (stage 0 trains it from its initialisation), so it is not run twice;
- ``slow_lower``: the same with ``MultiFrequencyUpdates``: the lower levels (the tied embedding / output head and
  blocks 0-1) take one optimizer step every 4 steps on the mean of their 4 gradients, the upper level (block 2 and
  the final norm) every step;
- ``cms_frozen``: ``to_cms(model, "blocks.*.mlp", chunk_sizes=[1, 1, 4], in_context=False)`` converts each block's
  SwiGLU FFN into a CMS chain of three levels (level 0 the pretrained FFN, levels 1-2 gated levels with a copied input
  layer and a zero output layer, so the converted model computes the stage-0 model exactly); everything but levels
  1-2 is frozen, and both train every step. Static chains (``in_context=False``): the levels learn through the
  optimizer only, there are no test-time writes;
- ``cms_consolidation``: the same conversion and freezing, level 2 slow (``MultiFrequencyUpdates``, every 4 steps)
  and ``CMSConsolidation`` drift pairs level 1 -> level 2 of every block (``alpha=0.5`` on ``w1, b1, w2, b2``, at
  each update of level 2): half the fast level's change since the last transfer moves into the slow level;
- ``replay``: ``ExperienceReplay(buffer_size=--replay-buffer (1000), replay_batch_size=2)`` on the naive setup, its
  reservoir first offered the stage-0 training crops (the batches stage 0 trained on, regenerated from the same
  sampler) as if it had watched stage 0. Stages 1-2 load 6 new crops per step and the callback appends 2 stored
  ones, so every step still trains on 8 crops (equal tokens; 75 % of them from the new domain);
- ``ewc``: ``ElasticWeightConsolidation(ewc_lambda=--ewc-lambda (1000), fisher_samples=200, gamma=1.0)`` on the
  naive setup, consolidated after stage 0 (on domain 0's training crops) and after stage 1 (domain 1).
  ``boundaries="manual"``: the script calls ``consolidate`` at the stage ends, with the default per-sample loss
  (``CausalLM.loss``, the crop's mean next-token cross-entropy);
- ``hope``: ``HopeModule(dim=64, depth=2, heads=4, chunk_size=16, cms_chunk_sizes=[16, 64], cms_hidden_mult=2.5)``
  (the ``hope`` of ``benchmarks/lm.py``: self-modifying Titans and a CMS written by the task loss, 137,424
  parameters) trained on the stream from scratch: stages 0, 1, 2 on domains 0, 1, 2, evaluated with test-time
  memorization on (its default: the memory writes while it reads a held-out window).

Total and trained parameters of each method are reported (the CMS methods add levels to the FFNs).

Part 2, ``stream`` (the test-time view)
---------------------------------------
No training: the stage-2 weights of ``naive`` (Transformer++) and ``hope`` of each seed read one long stream that
switches domain: ``--stream-bytes`` (8192) held-out bytes of domain 0, then of 1, then of 2, then the next
``--stream-bytes`` held-out bytes of domain 0. Hope reads it in segments of 128 tokens with its state carried from
segment to segment, memory writing (``write=True``), and once more with writing off (``write=False``, the memory only
read; a control). Transformer++ is stateless: it reads a sliding context, each block of 64 new tokens with the 64
tokens before it (so every prediction sees 64-127 tokens, within the 128-token segments it was trained on). Reported:
bits per byte per block of ``--stream-block`` (512) tokens over time, mean over seeds, and each domain visit's mean;
``--svg`` draws the curves (a hand-written SVG, domain switches marked).

Running it
----------
::

    python benchmarks/continual_lm.py --quick        # smoke run, about a minute
    # the default run in one process:
    OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --out benchmarks/results/continual_lm.json \\
        --markdown benchmarks/results/continual_lm.md --svg benchmarks/results/continual_lm.svg \\
        --docs docs/continual_lm.md
    # or in two processes side by side (one core each; about half an hour on a 2-core machine), then one report:
    OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods naive hope --seeds 0 1 --out A.json &
    (OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods naive hope --seeds 2 --out B.json &&
     OMP_NUM_THREADS=1 python benchmarks/continual_lm.py --methods slow_lower cms_frozen cms_consolidation replay \\
        ewc --parts matrix --out C.json)
    wait
    python benchmarks/continual_lm.py --merge A.json B.json C.json --out benchmarks/results/continual_lm.json \\
        --markdown benchmarks/results/continual_lm.md --svg benchmarks/results/continual_lm.svg \\
        --docs docs/continual_lm.md

Output: ``--out PATH`` writes the JSON (all numbers, settings, versions, thread count, date) and prints the Markdown
report to stdout; without ``--out`` the JSON goes to stdout. ``--markdown PATH`` also writes the report, ``--docs
PATH`` a short page (what is measured, how to run it, the results table, the settings it ran with), ``--svg PATH`` the
plot of part 2. ``--merge`` pools reports of the same sources and settings (runs of different methods or seeds side by
side) into one, written like a run's. Progress goes to stderr. The script is not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import cell, emit, environment, finite, num, quiet, report_header, same_sources, summary
from torch import Tensor

from nl_lightning.callbacks import CMSConsolidation, ElasticWeightConsolidation, ExperienceReplay, MultiFrequencyUpdates
from nl_lightning.data.text_domains import BUILTIN_DOMAINS, TextDomainsDataModule, domain_digest
from nl_lightning.levels import Level
from nl_lightning.models.hope import HopeModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.to_cms import to_cms
from nl_lightning.models.transformer import TransformerPP

PARTS = ("matrix", "stream")
METHODS = ("naive", "slow_lower", "cms_frozen", "cms_consolidation", "replay", "ewc", "hope")
TPP_METHODS = tuple(m for m in METHODS if m != "hope")
TPP: dict[str, Any] = {"dim": 64, "depth": 3, "heads": 4, "mlp_mult": 2.0}
HOPE: dict[str, Any] = {
    "dim": 64,
    "depth": 2,
    "heads": 4,
    "chunk_size": 16,
    "cms_chunk_sizes": [16, 64],
    "cms_hidden_mult": 2.5,
}
OPTIM = {"lr": 3e-3, "warmup_steps": 30}
TEXT = {"seq_len": 256, "batch_size": 8, "samples_per_epoch": 800, "segment_len": 128, "val_fraction": 0.1}
SLOW_EVERY = 4
LOWER = ["embed.*", "blocks.0.*", "blocks.1.*"]  # the tied embedding / head and the lower two blocks
CMS_CHUNKS = [1, 1, 4]
REPLAY_BATCH = 2
EWC_FISHER_SAMPLES = 200
CONSOLIDATION_ALPHA = 0.5
TPP_CONTEXT, TPP_STRIDE = 128, 64  # the stream part's sliding context
DESCRIPTION = {
    "naive": "Transformer++ fine-tuned on each new domain (also: Transformer++ trained on the stream from scratch)",
    "slow_lower": f"naive + MultiFrequencyUpdates: embedding/head and blocks 0-1 every {SLOW_EVERY} steps, the rest"
    " every step",
    "cms_frozen": f"to_cms(blocks.*.mlp, chunk_sizes={CMS_CHUNKS}, in_context=False); only the added levels 1-2 train",
    "cms_consolidation": f"cms_frozen + level 2 every {SLOW_EVERY} steps + CMSConsolidation drift level 1 -> 2"
    f" (alpha {CONSOLIDATION_ALPHA})",
    "replay": f"naive + ExperienceReplay ({REPLAY_BATCH} stored crops + 6 new per step)",
    "ewc": "naive + online EWC (Fisher after stages 0 and 1)",
    "hope": "HopeModule trained on the stream from scratch (memory writing at evaluation)",
}


def log(message: str) -> None:
    print(f"[continual_lm] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- building
def warmup_for(steps: int) -> int:
    return min(OPTIM["warmup_steps"], max(1, steps // 10))


def build(kind: str, steps: int) -> CausalLM:
    """A tiny ``TransformerPP`` (``kind="tpp"``) or ``HopeModule`` (``"hope"``) with the shared optimizer settings."""
    cls, kwargs = (HopeModule, HOPE) if kind == "hope" else (TransformerPP, TPP)
    warmup = warmup_for(steps)
    return cls(
        vocab_size=256,
        segment_len=TEXT["segment_len"],
        lr=OPTIM["lr"],
        warmup_steps=warmup,
        max_steps_schedule=max(steps, warmup + 1),
        **kwargs,
    )


def make_dm(args: argparse.Namespace, seed: int, batch_size: int = TEXT["batch_size"]) -> TextDomainsDataModule:
    return TextDomainsDataModule(
        seq_len=TEXT["seq_len"],
        batch_size=batch_size,
        val_fraction=TEXT["val_fraction"],
        samples_per_epoch=TEXT["samples_per_epoch"],
        bytes_per_domain=args.bytes_per_domain,
        seed=seed,
    )


def convert_to_cms(model: TransformerPP) -> TransformerPP:
    """The CMS methods' conversion: every SwiGLU FFN to a static 3-level chain; only levels 1-2 keep gradients."""
    to_cms(model, "blocks.*.mlp", chunk_sizes=CMS_CHUNKS, in_context=False)
    for name, p in model.named_parameters():
        p.requires_grad_(".cms.blocks.1." in name or ".cms.blocks.2." in name)
    return model


def param_counts(model: CausalLM) -> dict[str, int]:
    return {
        "total": model.num_parameters(),
        "trained": sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values()),
    }


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class StageStats(pl.Callback):
    """Training losses of a stage; stops the fit at the first non-finite loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_nonfinite: Optional[int] = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = float(outputs["loss"])
        self.losses.append(loss)
        if not math.isfinite(loss) and self.first_nonfinite is None:
            self.first_nonfinite = len(self.losses)
            trainer.should_stop = True


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def fit_stage(
    model: CausalLM,
    dm: TextDomainsDataModule,
    domain: int,
    steps: int,
    seed: int,
    callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """One stage: ``steps`` optimizer steps on ``domain`` (a fresh optimizer and schedule), no validation."""
    pl.seed_everything(seed, verbose=False)
    dm.set_domain(domain)
    stats = StageStats()
    trainer = _trainer(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stats, *callbacks])
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    tail = [v for v in stats.losses[-10:] if math.isfinite(v)]
    return {
        "domain": domain,
        "steps": trainer.global_step,
        "fit_s": seconds,
        "diverged_at": stats.first_nonfinite,
        "final_train_bpb": statistics.fmean(tail) / math.log(2) if tail else None,
    }


def evaluate(model: CausalLM, dm: TextDomainsDataModule) -> tuple[list[Optional[float]], float]:
    """Bits per byte on every domain's held-out bytes (memorization on for a stateful model), and the seconds."""
    t0 = time.perf_counter()
    results = _trainer().validate(model, datamodule=dm, verbose=False)
    bpb = []
    for j, res in enumerate(results):
        value = float(res[f"val_bpc_dl{j}"])
        bpb.append(value if math.isfinite(value) else None)
    return bpb, time.perf_counter() - t0


def _stage_batches(dm: TextDomainsDataModule, domain: int, steps: int) -> list[dict[str, Tensor]]:
    """The training batches a ``steps``-step stage on ``domain`` draws (the sampler's epochs in order)."""
    dm.setup("fit")
    dm.set_domain(domain)
    out: list[dict[str, Tensor]] = []
    epoch = 0
    while len(out) < steps:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for batch in loader:
            out.append(batch)
            if len(out) == steps:
                break
        epoch += 1
    return out


# ---------------------------------------------------------------------------------------------------- part 1
def run_method(method: str, args: argparse.Namespace, seed: int, stage0: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Stages 1-2 of ``method`` from the shared stage-0 weights (``hope``: stages 0-2 from scratch)."""
    steps = args.steps
    dm = make_dm(args, seed, batch_size=TEXT["batch_size"] - REPLAY_BATCH if method == "replay" else TEXT["batch_size"])
    rows: list[list[Optional[float]]] = []
    stages: list[dict[str, Any]] = []
    eval_s = 0.0
    sink = io.StringIO()
    with quiet(sink, args.verbose):
        if method == "hope":
            pl.seed_everything(seed, verbose=False)
            model = build("hope", steps)
            first = 0
        else:
            assert stage0 is not None
            model = build("tpp", steps)
            model.load_state_dict(stage0["state_dict"])
            rows.append(list(stage0["row"]))
            stages.append(stage0["stage"])
            first = 1
            if method in ("cms_frozen", "cms_consolidation"):
                convert_to_cms(model)
        counts = param_counts(model)
        ewc = replay = None
        if method == "ewc":
            ewc = ElasticWeightConsolidation(
                ewc_lambda=args.ewc_lambda, fisher_samples=EWC_FISHER_SAMPLES, boundaries="manual"
            )
            ewc.consolidate(model, _fisher_batches(args, seed, 0))
        if method == "replay":
            replay = ExperienceReplay(buffer_size=args.replay_buffer, replay_batch_size=REPLAY_BATCH, seed=seed)
            for batch in _stage_batches(make_dm(args, seed), 0, steps):  # what the reservoir would have seen
                replay.reservoir.add([batch["tokens"], batch["targets"]])
        for domain in range(first, 3):
            callbacks: list[pl.Callback] = []
            if method == "slow_lower":
                callbacks.append(MultiFrequencyUpdates([Level("lower", LOWER, every=SLOW_EVERY)]))
            elif method == "cms_consolidation":
                slow = [f"blocks.{b}.mlp.cms.blocks.2.*" for b in range(TPP["depth"])]
                callbacks.append(MultiFrequencyUpdates([Level("cms_slow", slow, every=SLOW_EVERY)]))
                pairs = [
                    {
                        "fast": f"blocks.{b}.mlp.cms.blocks.1",
                        "slow": f"blocks.{b}.mlp.cms.blocks.2",
                        "alpha": CONSOLIDATION_ALPHA,
                        "params": ["w1", "b1", "w2", "b2"],
                        "name": f"block{b}",
                    }
                    for b in range(TPP["depth"])
                ]
                callbacks.append(CMSConsolidation(pairs))
            elif method == "replay":
                callbacks.append(replay)  # type: ignore[arg-type]
            elif method == "ewc":
                callbacks.append(ewc)  # type: ignore[arg-type]
            stage = fit_stage(model, dm, domain, steps, seed, callbacks)
            if method == "cms_consolidation":
                stage["consolidations"] = sum(callbacks[1].transfers.values())  # type: ignore[attr-defined]
            stages.append(stage)
            if stage["diverged_at"] is not None:
                log(f"{method} seed {seed}: non-finite training loss at stage {domain} step {stage['diverged_at']}")
                rows.append([None] * 3)
                break
            row, seconds = evaluate(model, dm)
            eval_s += seconds
            rows.append(row)
            if ewc is not None and domain < 2:
                ewc.consolidate(model, _fisher_batches(args, seed, domain))
    while len(rows) < 3:
        rows.append([None] * 3)
    run = {"seed": seed, "R": rows, "stages": stages, "parameters": counts, "eval_s": eval_s, **metrics(rows)}
    if method == "hope" or method == "naive":
        run["final_state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(
        f"{method} seed {seed}: final avg {num(run['final_avg'], '.4f')}, forgetting {num(run['forgetting'], '+.4f')},"
        f" learning {num(run['learning'], '.4f')}, R = {[[num(v, '.3f') for v in r] for r in rows]},"
        f" fit {sum(s['fit_s'] for s in stages[first:]):.0f} s"
    )
    return run


def _fisher_batches(args: argparse.Namespace, seed: int, domain: int) -> list[list[Tensor]]:
    """Training crops of ``domain`` as ``[tokens, targets]`` lists, enough for the Fisher estimate."""
    batches = _stage_batches(make_dm(args, seed), domain, math.ceil(EWC_FISHER_SAMPLES / TEXT["batch_size"]))
    return [[b["tokens"], b["targets"]] for b in batches]


def pretrain(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Stage 0 of the Transformer++ methods: domain 0 from the initialisation, evaluated on every domain."""
    sink = io.StringIO()
    with quiet(sink, args.verbose):
        pl.seed_everything(seed, verbose=False)
        model = build("tpp", args.steps)
        dm = make_dm(args, seed)
        stage = fit_stage(model, dm, 0, args.steps, seed)
        row, seconds = evaluate(model, dm)
    stage["eval_s"] = seconds
    log(f"stage 0 (Transformer++) seed {seed}: R[0] = {[num(v, '.3f') for v in row]}, fit {stage['fit_s']:.0f} s")
    return {
        "state_dict": copy.deepcopy(model.state_dict()),
        "row": row,
        "stage": stage,
        "digest": weights_digest(model),
    }


def metrics(R: list[list[Optional[float]]]) -> dict[str, Any]:
    """Final average, forgetting (per old domain and averaged) and learning from a 3x3 matrix (``None``: missing)."""
    T = len(R)
    last = R[-1]
    final_avg = statistics.fmean(last) if all(finite(v) for v in last) else None
    per_domain: list[Optional[float]] = []
    for j in range(T - 1):
        earlier = [R[i][j] for i in range(j, T - 1)]
        ok = finite(last[j]) and all(finite(v) for v in earlier)
        per_domain.append(last[j] - min(earlier) if ok else None)  # type: ignore[operator]
    forgetting = statistics.fmean(per_domain) if all(v is not None for v in per_domain) else None
    new = [R[i][i] for i in range(1, T)]
    learning = statistics.fmean(new) if all(finite(v) for v in new) else None
    return {
        "final_avg": final_avg,
        "forgetting": forgetting,
        "forgetting_per_domain": per_domain,
        "learning": learning,
        "learning_per_domain": new,
    }


def part_matrix(args: argparse.Namespace) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Tensor]]]:
    methods: dict[str, Any] = {m: {"runs": []} for m in args.methods}
    finals: dict[tuple[str, int], dict[str, Tensor]] = {}
    stage0_runs = []
    for seed in args.seeds:
        stage0 = None
        if any(m != "hope" for m in args.methods):
            stage0 = pretrain(args, seed)
            stage0_runs.append({"seed": seed, "digest": stage0["digest"], "R0": stage0["row"], **stage0["stage"]})
        for method in args.methods:
            run = run_method(method, args, seed, stage0)
            state = run.pop("final_state_dict", None)
            if state is not None:
                finals[(method, seed)] = state
            methods[method]["runs"].append(run)
    for method in methods:
        methods[method]["description"] = DESCRIPTION[method]
    return {"methods": methods, "stage0": stage0_runs}, finals


def aggregate_matrix(part: dict[str, Any]) -> None:
    """Means and stds over seeds of every method's figures (in place)."""
    for block in part["methods"].values():
        runs = sorted(block["runs"], key=lambda r: r["seed"])
        block["runs"] = runs
        agg: dict[str, Any] = {k: summary([r[k] for r in runs]) for k in ("final_avg", "forgetting", "learning")}
        agg["R"] = [[summary([r["R"][i][j] for r in runs]) for j in range(3)] for i in range(3)]
        agg["forgetting_per_domain"] = [summary([r["forgetting_per_domain"][j] for r in runs]) for j in range(2)]
        agg["seeds"] = [r["seed"] for r in runs]
        agg["parameters"] = runs[0]["parameters"]
        agg["fit_s"] = summary([sum(s["fit_s"] for s in r["stages"]) for r in runs])
        block["aggregate"] = agg


# ---------------------------------------------------------------------------------------------------- part 2
def stream_data(args: argparse.Namespace) -> tuple[Tensor, list[dict[str, Any]]]:
    """The switching stream: held-out bytes of domains 0, 1, 2, then the next held-out bytes of domain 0."""
    dm = make_dm(args, 0)
    n = args.stream_bytes
    pieces, segments, start = [], [], 0
    for k, (domain, offset) in enumerate(((0, 0), (1, 0), (2, 0), (0, n))):
        held = dm.domain_bytes(domain, "val")
        if len(held) < offset + n:
            raise ValueError(
                f"Domain {domain} holds {len(held)} held-out bytes, fewer than the {offset + n} the stream needs; lower"
                " --stream-bytes or raise --bytes-per-domain."
            )
        pieces.append(held[offset : offset + n])
        segments.append(
            {"visit": k, "domain": domain, "name": dm.domain_names[domain], "start": start, "end": start + n}
        )
        start += n
    return torch.cat(pieces).long(), segments


def hope_stream_nll(model: CausalLM, data: Tensor, write: bool) -> Tensor:
    """Per-token cross-entropy of ``data[1:]`` read in segments of 128 tokens, the state carried."""
    tokens, targets = data[:-1].unsqueeze(0), data[1:]
    seg = TEXT["segment_len"]
    nll, state = torch.zeros(tokens.shape[1], dtype=torch.float64), None
    with torch.inference_mode():
        for start in range(0, tokens.shape[1], seg):
            logits, state = model(tokens[:, start : start + seg], state=state, write=write)
            nll[start : start + logits.shape[1]] = F.cross_entropy(
                logits[0].float(), targets[start : start + seg], reduction="none"
            ).double()
    return nll


def tpp_stream_nll(model: CausalLM, data: Tensor) -> Tensor:
    """Per-token cross-entropy of ``data[1:]``, each block of 64 tokens read with the 64 tokens before it."""
    tokens, targets = data[:-1].unsqueeze(0), data[1:]
    nll = torch.zeros(tokens.shape[1], dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, tokens.shape[1], TPP_STRIDE):
            lo = max(0, start + TPP_STRIDE - TPP_CONTEXT)
            logits, _ = model(tokens[:, lo : start + TPP_STRIDE])
            new = logits[0, start - lo :]
            nll[start : start + new.shape[0]] = F.cross_entropy(
                new.float(), targets[start : start + new.shape[0]], reduction="none"
            ).double()
    return nll


def part_stream(args: argparse.Namespace, finals: dict[tuple[str, int], dict[str, Tensor]]) -> dict[str, Any]:
    data, segments = stream_data(args)
    block = args.stream_block
    runs = []
    for seed in args.seeds:
        if ("naive", seed) not in finals or ("hope", seed) not in finals:
            continue
        out: dict[str, Any] = {"seed": seed, "curves": {}, "seconds": {}}
        for name, kind, write in (
            ("hope", "hope", True),
            ("hope_write_off", "hope", False),
            ("transformer", "tpp", None),
        ):
            model = build(kind, 10)  # outside inference mode: the task-loss writes need autograd on the parameters
            model.load_state_dict(finals[("hope" if kind == "hope" else "naive", seed)])
            model.eval()
            t0 = time.perf_counter()
            nll = tpp_stream_nll(model, data) if kind == "tpp" else hope_stream_nll(model, data, bool(write))
            out["seconds"][name] = time.perf_counter() - t0
            bits = nll / math.log(2)
            out["curves"][name] = [float(b.mean()) for b in bits.split(block)]
            # segment means: token t predicts byte t + 1, which belongs to the segment holding t + 1
            out.setdefault("segments", {})[name] = [
                float(bits[max(0, s["start"] - 1) : s["end"] - 1].mean()) for s in segments
            ]
            out.setdefault("nonfinite", {})[name] = int((~torch.isfinite(nll)).sum())
        log(
            f"stream seed {seed}: per-visit bpb "
            + "; ".join(f"{n} {[round(v, 3) for v in out['segments'][n]]}" for n in out["segments"])
        )
        runs.append(out)
    return {
        "setting": {
            "stream_bytes": args.stream_bytes,
            "block": block,
            "segments": segments,
            "hope_segment": TEXT["segment_len"],
            "transformer_context": TPP_CONTEXT,
            "transformer_stride": TPP_STRIDE,
            "tokens": int(len(data) - 1),
        },
        "runs": runs,
    }


def aggregate_stream(part: dict[str, Any]) -> None:
    runs = sorted(part["runs"], key=lambda r: r["seed"])
    part["runs"] = runs
    if not runs:
        part["aggregate"] = {}
        return
    names = list(runs[0]["curves"])
    part["aggregate"] = {
        "seeds": [r["seed"] for r in runs],
        "curves": {
            n: [statistics.fmean(r["curves"][n][i] for r in runs) for i in range(len(runs[0]["curves"][n]))]
            for n in names
        },
        "segments": {
            n: [summary([r["segments"][n][k] for r in runs]) for k in range(len(runs[0]["segments"][n]))] for n in names
        },
    }


# ---------------------------------------------------------------------------------------------------- the SVG
def svg_chart(report: dict[str, Any]) -> str:
    """A line chart of the stream part's mean bits per byte per block, domain switches marked (plain SVG)."""
    part = report["parts"]["stream"]
    agg, setting = part["aggregate"], part["setting"]
    curves = agg["curves"]
    width, height, left, right, top, bottom = 920, 420, 64, 220, 40, 56
    pw, ph = width - left - right, height - top - bottom
    values = [v for c in curves.values() for v in c if finite(v)]
    lo, hi = math.floor(min(values) * 2) / 2, math.ceil(max(values) * 2) / 2
    if hi <= lo:
        hi = lo + 0.5
    n_tokens = setting["tokens"]
    block = setting["block"]

    def x_of(tokens: float) -> float:
        return left + pw * tokens / n_tokens

    def y_of(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    colors = {"hope": "#d62728", "hope_write_off": "#ff9896", "transformer": "#1f77b4"}
    labels = {
        "hope": "Hope (memory writing)",
        "hope_write_off": "Hope (writing off)",
        "transformer": "Transformer++ (sliding context)",
    }
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        ' font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="20" text-anchor="middle" font-size="14">Bits per byte along a stream that'
        f" switches domain (mean of seeds {', '.join(str(s) for s in agg['seeds'])}; no training)</text>",
    ]
    steps = 5
    for i in range(steps + 1):  # y grid and ticks
        v = lo + (hi - lo) * i / steps
        y = y_of(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for seg in setting["segments"]:  # domain switches
        x = x_of(seg["start"])
        if seg["start"] > 0:
            out.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#555" stroke-dasharray="4,3"/>'
            )
        mid = x_of((seg["start"] + seg["end"]) / 2)
        out.append(f'<text x="{mid:.1f}" y="{top + 14}" text-anchor="middle" fill="#333">{seg["name"]}</text>')
    for t in [seg["start"] for seg in setting["segments"]] + [n_tokens]:  # x ticks at the domain switches
        out.append(f'<text x="{x_of(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{int(t):,}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">tokens read (blocks of {block})</text>'
    )
    out.append(
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">'
        "bits per byte</text>"
    )
    for k, (name, curve) in enumerate(curves.items()):
        pts = " ".join(
            f"{x_of(min(n_tokens, (i + 0.5) * block)):.1f},{y_of(v):.1f}" for i, v in enumerate(curve) if finite(v)
        )
        color = colors.get(name, "#2ca02c")
        dash = ' stroke-dasharray="5,3"' if name == "hope_write_off" else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        ly = top + 20 + 18 * k
        out.append(
            f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 34}" y2="{ly}" stroke="{color}"'
            f' stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{left + pw + 38}" y="{ly + 4}" font-size="11">{labels.get(name, name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- reports
def scell(entry: dict[str, Any]) -> str:
    """:func:`_common.cell` with a signed mean (``+0.123 ± 0.045``)."""
    text = cell(entry, ".3f")
    return "+" + text if entry["mean"] is not None and entry["mean"] >= 0 else text


def summary_rows(report: dict[str, Any]) -> list[str]:
    methods = report["parts"]["matrix"]["methods"]
    names = report["domains"]["names"]
    lines = [
        "| method | parameters (total / trained) | final avg bpb | forgetting (bits) |"
        f" forgetting on {names[0]} / on {names[1]} | learning (new domains, bpb) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        if name not in methods:
            continue
        agg = methods[name]["aggregate"]
        p = agg["parameters"]
        per = " / ".join(scell(agg["forgetting_per_domain"][j]) for j in range(2))
        lines.append(
            f"| {name} | {p['total']:,} / {p['trained']:,} | {cell(agg['final_avg'], '.3f')} |"
            f" {scell(agg['forgetting'])} | {per} | {cell(agg['learning'], '.3f')} | {len(agg['seeds'])} |"
        )
    return lines


def matrix_lines(report: dict[str, Any]) -> list[str]:
    part = report["parts"]["matrix"]
    names = report["domains"]["names"]
    lines = [
        "## Forgetting matrices",
        "",
        "`R[i][j]`: bits per byte on domain j after stage i, mean ± std over seeds.",
        "",
    ]
    for name in METHODS:
        if name not in part["methods"]:
            continue
        agg = part["methods"][name]["aggregate"]
        lines += [f"### {name}", "", part["methods"][name]["description"] + ".", ""]
        lines.append("| after stage | " + " | ".join(f"{j}: {n}" for j, n in enumerate(names)) + " |")
        lines.append("|---|" + "---|" * len(names))
        for i in range(3):
            lines.append(f"| {i} ({names[i]}) | " + " | ".join(cell(agg["R"][i][j], ".3f") for j in range(3)) + " |")
        fpd = ", ".join(f"{names[j]} {scell(agg['forgetting_per_domain'][j])}" for j in range(2))
        fit_s = cell(agg["fit_s"], ".0f")
        lines += ["", f"Forgetting per old domain: {fpd}. Training time (all its stages): {fit_s} s.", ""]
    return lines


def stream_lines(report: dict[str, Any], svg_name: Optional[str]) -> list[str]:
    part = report["parts"]["stream"]
    agg, setting = part.get("aggregate", {}), part["setting"]
    if not agg:
        return ["## Test-time view", "", "No seed had both naive and hope weights in this run."]
    lines = [
        "## Test-time view: one stream that switches domain",
        "",
        f"{setting['stream_bytes']:,} held-out bytes of each domain visit, read without training by the stage-2 models"
        f" (seeds {', '.join(str(s) for s in agg['seeds'])}). Hope: segments of {setting['hope_segment']} tokens, state"
        f" carried. Transformer++: blocks of {setting['transformer_stride']} tokens, each with the"
        f" {setting['transformer_context'] - setting['transformer_stride']} tokens before it. Mean bits per byte per"
        " domain visit (mean ± std over seeds):",
        "",
        "| model | " + " | ".join(f"{s['visit']}: {s['name']}" for s in setting["segments"]) + " |",
        "|---|" + "---|" * len(setting["segments"]),
    ]
    for name, segs in agg["segments"].items():
        lines.append(f"| {name} | " + " | ".join(cell(s, ".3f") for s in segs) + " |")
    if svg_name:
        lines += ["", f"![bits per byte along the stream]({svg_name})"]
    return lines


def reading(report: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers (wins and losses against naive fine-tuning)."""
    lines = ["## Reading (generated from the numbers above)", ""]
    found = report["parts"].get("matrix", {}).get("methods", {})
    methods = {m: found[m] for m in METHODS if m in found}
    base = methods.get("naive", {}).get("aggregate")
    for key, label, better in (
        ("final_avg", "final average bpb", "lower"),
        ("forgetting", "forgetting", "lower"),
        ("learning", "learning (bpb on the new domain)", "lower"),
    ):
        ranked = sorted(
            ((n, b["aggregate"][key]["mean"]) for n, b in methods.items() if b["aggregate"][key]["mean"] is not None),
            key=lambda kv: kv[1],
        )
        if ranked:
            lines.append(
                f"- {label} from best to worst ({better} is better): "
                + ", ".join(f"{n} {v:.3f}" for n, v in ranked)
                + "."
            )
    if base is not None:
        for name, block in methods.items():
            if name == "naive":
                continue
            agg = block["aggregate"]
            parts = []
            for key, label in (("final_avg", "final avg"), ("forgetting", "forgetting"), ("learning", "learning")):
                a, b = agg[key]["mean"], base[key]["mean"]
                if a is not None and b is not None:
                    sd = [s for s in (agg[key]["std"], base[key]["std"]) if s is not None]
                    noise = max(sd) if sd else 0.0
                    verdict = "win" if a < b - noise else "loss" if a > b + noise else "within the seed std"
                    parts.append(f"{label} {a - b:+.3f} ({verdict})")
            if parts:
                lines.append(f"- {name} vs naive: " + ", ".join(parts) + ".")
        lines.append(
            "  (win / loss: the difference of the means exceeds the larger seed std of the two; all three"
            " figures are in bits per byte, lower is better.)"
        )
        names = report["domains"]["names"]
        jumps = []
        for name, block in methods.items():
            r = block["aggregate"]["R"]
            if r[1][0]["mean"] is not None and r[0][0]["mean"] is not None:
                jumps.append(f"{name} {r[1][0]['mean'] - r[0][0]['mean']:+.3f}")
        if jumps:
            lines.append(
                f"- {names[0]} right after the {names[1]} stage, R[1][0] − R[0][0] (the bits lost on the first domain"
                f" while training on the second): " + ", ".join(jumps) + "."
            )
    stream = report["parts"].get("stream", {}).get("aggregate")
    if stream:
        segs = stream["segments"]
        if "hope" in segs and "transformer" in segs:
            diffs = [h["mean"] - t["mean"] for h, t in zip(segs["hope"], segs["transformer"], strict=True)]
            lines.append(
                "- Stream, Hope minus Transformer++ per visit (negative: Hope lower): "
                + ", ".join(f"{d:+.3f}" for d in diffs)
                + "."
            )
        if "hope" in segs and "hope_write_off" in segs:
            diffs = [off["mean"] - on["mean"] for on, off in zip(segs["hope"], segs["hope_write_off"], strict=True)]
            lines.append(
                "- Stream, Hope writing off minus on per visit (positive: writing helps): "
                + ", ".join(f"{d:+.3f}" for d in diffs)
                + "."
            )
    return lines


def settings_lines(report: dict[str, Any]) -> list[str]:
    a = report["settings"]
    d = report["domains"]
    dom = "; ".join(
        f"{j}: {n} ({b:,} bytes, {h:,} held out, digest {g})"
        for j, (n, b, h, g) in enumerate(zip(d["names"], d["bytes"], d["held_out_bytes"], d["digests"], strict=True))
    )
    return [
        f"Settings: {a['steps']} optimizer steps per stage, {a['tokens_per_step']:,} tokens per step"
        f" ({a['steps'] * a['tokens_per_step']:,} per stage), seeds {', '.join(str(s) for s in a['seeds'])},"
        f" EWC lambda {a['ewc_lambda']:g}, replay buffer {a['replay_buffer']} crops"
        + (" (**--quick**: a smoke run, not a measurement)" if a.get("quick") else "")
        + ".  ",
        f"Domains: {dom}.",
    ]


def notes_lines() -> list[str]:
    """How to read the figures (properties of the setup, not results)."""
    return [
        "## How to read it",
        "",
        "- Forgetting can be negative: the domains share structure (prose and docstrings are both English), so"
        " training on docstrings lowers the bpb on prose again. The per-domain columns and `R[1][0] − R[0][0]` (prose"
        " right after the code stage) show where bits are lost.",
        "- Hope's matrix is measured with memory writing on (its default): its CMS keeps writing while it reads each"
        " held-out window, a test-time adaptation Transformer++ does not have. The stream part's `hope_write_off` row"
        " separates the two for the stage-2 models.",
        "- `cms_frozen` and `cms_consolidation` freeze the pretrained model, but the added CMS levels act on every"
        " input, so training them on a new domain also changes the outputs on the old ones.",
        "- `hope` starts from its own initialisation (stage 0 is not shared), and the EWC strength was not tuned.",
    ]


def header_lines(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    runs = report.get("merged_from") or [report]
    lines = []
    if "merged_from" in report:
        lines.append(f"Pooled with `--merge` from {len(runs)} runs of the same sources, side by side:  ")
    lines += [f"Command: `{r['command']}` ({r['timestamp']}, {r['wall_s']:.0f} s)  " for r in runs]
    lines.append(
        f"nl_lightning {env['nl_lightning']}, torch {env['torch']}, lightning {env['lightning']}, Python"
        f" {env['python']}, {env['cpu_count']} CPU core(s), {env['torch_num_threads']} torch thread(s) per run."
    )
    return lines


def markdown(report: dict[str, Any], svg_name: Optional[str] = None) -> str:
    lines = [
        "# Continual language modelling across text domains (tiny CPU sizes)",
        "",
        *header_lines(report),
        "",
        *settings_lines(report),
        "",
    ]
    if "matrix" in report["parts"]:
        lines += ["## Summary", "", *summary_rows(report), "", *matrix_lines(report)]
    if "stream" in report["parts"]:
        lines += [*stream_lines(report, svg_name), ""]
    lines += [*notes_lines(), "", *reading(report)]
    return "\n".join(lines) + "\n"


def docs_page(report: dict[str, Any], svg_rel: Optional[str]) -> str:
    lines = [
        "# Continual language modelling benchmark",
        "",
        "Does nested learning reduce forgetting when a small language model is trained on one text domain after"
        " another? `benchmarks/continual_lm.py` trains tiny byte-level models on a domain-incremental stream built from"
        " text every Python installation holds (`nl_lightning.data.text_domains.TextDomainsDataModule`): 0 `prose`"
        " (the `pydoc_data.topics` help texts), 1 `code` (standard-library source without docstrings and comments),"
        " 2 `docstrings` (the same modules' docstrings). Stage i trains on domain i only.",
        "",
        "## What is measured",
        "",
        "- `R[i][j]`: bits per byte on domain j's held-out bytes (the last 10 % of each domain) after stage i;",
        "- final average bpb: the mean of the last row; forgetting (bits): per old domain, the final bpb minus the"
        " lowest bpb reached on it earlier, averaged over the old domains; learning: bpb on each new domain right"
        " after training on it, averaged. Lower is better for all three; mean ± std over seeds;",
        "- methods, at equal tokens per stage: `naive` fine-tuning of a Transformer++ pretrained on domain 0 (which is"
        " also Transformer++ trained on the stream from scratch), `slow_lower` (lower layers updated every 4 steps"
        " with `MultiFrequencyUpdates`), `cms_frozen` (`to_cms` on the SwiGLU FFNs, backbone frozen, the added CMS"
        " levels trained), `cms_consolidation` (the same with a slow level and `CMSConsolidation`), `replay`"
        " (`ExperienceReplay`), `ewc` (`ElasticWeightConsolidation`) and `hope` (`HopeModule` trained on the stream"
        " from scratch); the script's docstring gives every setting;",
        "- the test-time view: the stage-2 models read one stream that switches domain (prose, code, docstrings,"
        " prose again) without training; bits per byte per block over time for Hope (memory writing on, and off as a"
        " control) and Transformer++ (a sliding context).",
        "",
        "## Running it",
        "",
        "```bash",
        "python benchmarks/continual_lm.py --quick          # smoke run, about a minute",
        "python benchmarks/continual_lm.py --out benchmarks/results/continual_lm.json \\",
        "    --markdown benchmarks/results/continual_lm.md --svg benchmarks/results/continual_lm.svg \\",
        "    --docs docs/continual_lm.md                     # one process; see the script for a two-process split",
        "```",
        "",
        "## Results",
        "",
        "Generated by the script from `benchmarks/results/continual_lm.json`:",
        "",
        *header_lines(report),
        "",
        *settings_lines(report),
        "",
    ]
    if "matrix" in report["parts"]:
        lines += [*summary_rows(report), ""]
    if "stream" in report["parts"]:
        lines += [*[ln.replace("## ", "### ", 1) for ln in stream_lines(report, svg_rel)], ""]
    lines += [ln.replace("## ", "### ", 1) for ln in [*notes_lines(), "", *reading(report)]]
    lines += ["", "The full report, with every method's matrix: `benchmarks/results/continual_lm.md`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- driver
SOURCES = [
    "models/lm.py",
    "models/hope.py",
    "models/transformer.py",
    "models/to_cms.py",
    "models/_ffn_spec.py",
    "models/cms.py",
    "models/cms_memory.py",
    "models/task_loss_cms.py",
    "models/self_modifying_titans.py",
    "callbacks/multi_frequency.py",
    "callbacks/cms_consolidation.py",
    "callbacks/replay.py",
    "callbacks/ewc.py",
    "levels.py",
    "data/text.py",
    "data/text_domains.py",
]


def domains_info(args: argparse.Namespace) -> dict[str, Any]:
    dm = make_dm(args, 0)
    dm.setup("fit")
    return {
        "names": list(dm.domain_names),
        "bytes": [int(len(dm.domain_bytes(j, "all"))) for j in range(dm.num_domains)],
        "held_out_bytes": [int(len(dm.domain_bytes(j, "val"))) for j in range(dm.num_domains)],
        "digests": [domain_digest(dm.domain_bytes(j, "all")) for j in range(dm.num_domains)],
    }


def finish(report: dict[str, Any]) -> None:
    if "matrix" in report["parts"]:
        aggregate_matrix(report["parts"]["matrix"])
    if "stream" in report["parts"]:
        aggregate_stream(report["parts"]["stream"])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="matrix, stream (default: both)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (default 200; 6 with --quick)")
    parser.add_argument("--bytes-per-domain", type=int, help="bytes per domain (default 300000; 40000 with --quick)")
    parser.add_argument("--ewc-lambda", type=float, default=1000.0, help="EWC penalty strength (1000)")
    parser.add_argument("--replay-buffer", type=int, default=1000, help="replay reservoir, crops (1000)")
    parser.add_argument("--stream-bytes", type=int, help="bytes per domain visit of the stream (8192; 1024 quick)")
    parser.add_argument("--stream-block", type=int, help="tokens per point of the stream curves (512; 128 quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--verbose", action="store_true", help="show Lightning's output on stderr")
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument("--docs", help="also write the short documentation page here")
    parser.add_argument("--svg", help="also draw the stream part's curves here (SVG)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, seed 0, small domains")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="pool reports of the same sources and settings")
    args = parser.parse_args(argv)
    parts = [p for item in args.parts for p in item.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    q = args.quick
    args.methods = [m for m in METHODS if m in (args.methods or METHODS)]
    args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])))
    args.steps = args.steps or (6 if q else 200)
    args.bytes_per_domain = args.bytes_per_domain or (40_000 if q else 300_000)
    args.stream_bytes = args.stream_bytes or (1024 if q else 8192)
    args.stream_block = args.stream_block or (128 if q else 512)
    if min(args.steps, args.threads, args.stream_bytes, args.stream_block, args.replay_buffer) < 1:
        parser.error("--steps, --threads, --stream-bytes, --stream-block and --replay-buffer must be >= 1")
    if not args.merge and "stream" in args.parts and not {"naive", "hope"} <= set(args.methods):
        parser.error("the stream part reads the stage-2 weights of naive and hope: run both, or --parts matrix")
    return args


SETTING_KEYS = (
    "steps",
    "tokens_per_step",
    "bytes_per_domain",
    "ewc_lambda",
    "replay_buffer",
    "stream_bytes",
    "stream_block",
    "quick",
)


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """One report from several of this script's reports on the same sources and settings: runs pooled per method
    and seed, stream runs per seed. Raises ``ValueError`` on disagreeing sources, settings or stage-0 weights, or on a
    (method, seed) run present twice."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    merged = {k: v for k, v in first.items() if k not in ("parts", "part_seconds", "wall_s")}
    merged["merged_from"] = [
        {"path": p, "command": r["command"], "timestamp": r["timestamp"], "wall_s": r["wall_s"]}
        for p, r in zip(paths, reports, strict=True)
    ]
    merged["parts"], merged["part_seconds"] = {}, {}
    stage0: dict[int, str] = {}
    for path, r in zip(paths, reports, strict=True):
        if not same_sources(r["environment"]["sources"], first["environment"]["sources"]):
            raise ValueError(f"{path} was measured on other sources than {paths[0]}; merge runs of the same code only.")
        mine = {k: r["settings"][k] for k in SETTING_KEYS}
        if mine != {k: first["settings"][k] for k in SETTING_KEYS} or r["domains"] != first["domains"]:
            raise ValueError(f"{path} ran other settings or domains than {paths[0]}.")
        for name, seconds in r["part_seconds"].items():
            merged["part_seconds"][name] = merged["part_seconds"].get(name, 0.0) + seconds
        if "matrix" in r["parts"]:
            part = merged["parts"].setdefault("matrix", {"methods": {}, "stage0": []})
            for s in r["parts"]["matrix"]["stage0"]:
                if stage0.setdefault(s["seed"], s["digest"]) != s["digest"]:
                    raise ValueError(f"{path}: the stage-0 weights of seed {s['seed']} differ from another run's.")
                if all(x["seed"] != s["seed"] for x in part["stage0"]):
                    part["stage0"].append(s)
            for name, block in r["parts"]["matrix"]["methods"].items():
                target = part["methods"].setdefault(name, {"runs": [], "description": block["description"]})
                for run in block["runs"]:
                    if any(x["seed"] == run["seed"] for x in target["runs"]):
                        raise ValueError(f"{path}: method {name!r} seed {run['seed']} is in two reports.")
                    target["runs"].append(run)
        if "stream" in r["parts"]:
            part = merged["parts"].setdefault("stream", {"setting": r["parts"]["stream"]["setting"], "runs": []})
            for run in r["parts"]["stream"]["runs"]:
                if any(x["seed"] == run["seed"] for x in part["runs"]):
                    raise ValueError(f"{path}: stream seed {run['seed']} is in two reports.")
                part["runs"].append(run)
    merged["parts"] = {k: merged["parts"][k] for k in PARTS if k in merged["parts"]}
    seeds = sorted(
        {run["seed"] for b in merged["parts"].get("matrix", {}).get("methods", {}).values() for run in b["runs"]}
    )
    merged["settings"]["seeds"] = seeds
    finish(merged)
    return merged


def write_extras(report: dict[str, Any], args: argparse.Namespace) -> None:
    svg_path = args.svg if "stream" in report["parts"] and report["parts"]["stream"].get("aggregate") else None
    if svg_path:
        Path(svg_path).write_text(svg_chart(report))
        log(f"wrote {svg_path}")
    if args.docs:
        rel = os.path.relpath(svg_path, os.path.dirname(os.path.abspath(args.docs))) if svg_path else None
        Path(args.docs).write_text(docs_page(report, rel))
        log(f"wrote {args.docs}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)

    def md(report: dict[str, Any]) -> str:
        svg_rel = None
        if args.svg and args.markdown:
            svg_rel = os.path.relpath(args.svg, os.path.dirname(os.path.abspath(args.markdown)))
        return markdown(report, svg_rel)

    if args.merge:
        report = emit(merge_reports(args.merge), time.perf_counter(), md, args.out, args.markdown, log)
        write_extras(report, args)
        return report
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "Continual language modelling across text domains: forgetting matrices and a domain-switching stream",
        "benchmarks/continual_lm.py",
        argv,
        {k: v for k, v in vars(args).items()},
        environment(args.threads, SOURCES),
    )
    report["settings"] = {
        "steps": args.steps,
        "tokens_per_step": TEXT["batch_size"] * TEXT["seq_len"],
        "bytes_per_domain": args.bytes_per_domain,
        "ewc_lambda": args.ewc_lambda,
        "replay_buffer": args.replay_buffer,
        "stream_bytes": args.stream_bytes,
        "stream_block": args.stream_block,
        "quick": args.quick,
        "seeds": args.seeds,
        "text": TEXT,
        "optimizer": {**OPTIM, "warmup_steps": warmup_for(args.steps)},
        "transformer": f"TransformerPP({', '.join(f'{k}={v}' for k, v in TPP.items())})",
        "hope": f"HopeModule({', '.join(f'{k}={v}' for k, v in HOPE.items())})",
        "domain_order": list(BUILTIN_DOMAINS),
    }
    report["domains"] = domains_info(args)
    report["parts"], report["part_seconds"] = {}, {}
    t0 = time.perf_counter()
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
    finish(report)
    report = emit(report, started, md, args.out, args.markdown, log)
    write_extras(report, args)
    return report


if __name__ == "__main__":
    main()
