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
"""The paper's toy optimizer experiments as benchmarks: a 2-D surface, orthogonal-task regression, classifiers, an LM.

The deep optimizers of ``nl_lightning.optim`` (NL paper, Sec. 4; M3: Algorithm 1 of arXiv:2512.24695) against
heavy-ball momentum and Adam(W), in five parts (``--parts``). Each method's lr is tuned on the first seed (lowest final
loss; highest val acc; lowest val bpc), then every seed runs at it; a run whose loss becomes non-finite is diverged,
ranked last and left out of the means. The sha256 of every optimizer and rule source is in the JSON.

- ``surface`` (NL paper, Fig. 4, Eq. 53): steps until ``psi(r, theta) = r^2 + kappa (r - theta + a sin(omega r))^2
  < 1e-6`` (kappa 10, a 0.5, omega 4; cap 5000) from ``(2, -2)``, float64, closed-form gradient, for grids of
  heavy-ball (lr x momentum), delta momentum (x delta; ``delta = 0`` checked to retrace heavy-ball exactly) and Adam
  (lr x beta1); the 5 fastest settings rerun from 10 starts jittered by up to 1e-9, the lowest median wins. (M3 is
  AdamW on a 2-vector: left out.)
- ``regression`` (NL paper, Sec. 4.3, Eq. 45): ``K = 8`` tasks along orthonormal ``u_i`` of ``R^32``, ``W`` (4, 32)
  from 0, batches ``x = s u_i + 0.1 xi`` (noise in the complement of the span), ``y = s t_i``: SGD cannot interfere
  across tasks, so a change of another task's loss ``||W u_j - t_j||^2`` comes from the optimizer. Tasks in sequence
  (20 and 100 steps each), then task 1 again (<= 300 steps): ``R[i][j]``, final and learning loss, forgetting,
  re-learning steps (to ``R[1][1] + 1%`` of the initial loss), alignment ``||m u|| / ||m||`` of the buffers and the
  update with the new, previous and earlier directions after each switch.
- ``digits``, ``fmnist``: ``MLPClassifier(in, 10, hidden=[128, 128])``, 600 steps of batch 32 through Lightning
  (scikit-learn digits, 20% held out; Fashion-MNIST's 60,000 training images, 10,000 held out, skipped when missing):
  val acc and loss, train loss over the whole split, median wall and CPU ms per step (first 5 left out), the largest
  weight change of the first step, the rules' final lr multipliers.
- ``charlm``: a byte-level ``TransformerPP`` (dim 64, depth 2, 4 heads, seq 128, batch 8) on the default text
  corpus, 400 steps with warm-up and cosine: val bits per byte, the last 20 steps' train loss.

Running it::

    OMP_NUM_THREADS=1 python benchmarks/optimizers.py --parts surface regression digits fmnist --seeds 0 1 2 \\
        --out benchmarks/results/optimizers.json                                  # ~7.5 min, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/optimizers.py --parts charlm --seeds 0 1 2 \\
        --out benchmarks/results/optimizers_charlm.json
    python benchmarks/optimizers.py --quick --out /tmp/optimizers.json            # smoke run: 2-point grids, seed 0
    python benchmarks/render.py optimizers optimizers_charlm                      # the pages
"""

from __future__ import annotations

import io
import itertools
import math
import statistics
import time
from collections import namedtuple
from collections.abc import Callable, Sequence
from functools import partial, reduce
from pathlib import Path
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
    num,
    parse_parts,
    quiet,
    report_header,
    run_parts,
    save,
    summary,
)
from torch.utils.data import DataLoader, TensorDataset

import nl_lightning
from nl_lightning.callbacks import HypergradientRule, ScheduledRule
from nl_lightning.data import DigitsDataModule, FashionMNIST, TextDataModule, fashion_mnist_available
from nl_lightning.models import MLPClassifier, TransformerPP
from nl_lightning.optim import DMGD, M3, DeltaMomentum, PreconditionedMomentum

TITLE = "Deep optimizers on the paper's toy experiments"
PARTS = ("surface", "regression", "digits", "fmnist", "charlm")
log = make_log("optimizers")


# ---------------------------------------------------------------------------------------------------- part 1: surface
Surface = namedtuple("Surface", "kappa amp omega start threshold cap every jitter",
                     defaults=(10.0, 0.5, 4.0, (2.0, -2.0), 1e-6, 5000, 10, 1e-9))  # fmt: skip


SURFACE_LR, SURFACE_MOMENTUM = [1e-3, 2e-3, 5e-3, 1e-2, 2e-2], [0.5, 0.8, 0.9, 0.95, 0.99]
SURFACE_GRIDS: dict[str, dict[str, list[float]]] = {
    "heavy_ball": {"lr": SURFACE_LR, "momentum": SURFACE_MOMENTUM},
    "delta_momentum": {"lr": SURFACE_LR, "momentum": SURFACE_MOMENTUM, "delta": [0.03, 0.1, 0.3, 1.0]},
    "adam": {"lr": [0.1, 0.3, 1.0, 3.0, 10.0], "beta1": [0.5, 0.8, 0.9, 0.95]},
}
SURFACE_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], dict[str, float]], torch.optim.Optimizer]] = {
    "heavy_ball": lambda p, hp: PreconditionedMomentum(p, preconditioner="identity", **hp),
    "delta_momentum": lambda p, hp: DeltaMomentum(p, preconditioner="identity", **hp),
    "adam": lambda p, hp: torch.optim.Adam(p, lr=hp["lr"], betas=(hp["beta1"], 0.999)),
}


def run_surface(surface: Surface, name: str, hp: dict[str, float], keep_path: bool = False) -> dict[str, Any]:
    """One deterministic run from the start point: steps until ``psi < threshold`` (``None``: not within the cap)."""
    s, p = surface, torch.tensor(surface.start, dtype=torch.float64, requires_grad=True)
    opt, path, steps, diverged = SURFACE_OPTIMIZERS[name]([p], hp), [], None, False
    for t in range(s.cap + 1):
        r, theta = p.detach().tolist()
        h = r - theta + s.amp * math.sin(s.omega * r)
        value = r * r + s.kappa * h**2
        if keep_path and t % surface.every == 0:
            path.append([t, r, theta, value])
        diverged = not math.isfinite(value) or value > 1e12
        if diverged or value < surface.threshold or t == surface.cap:
            steps = t if not diverged and value < surface.threshold else None
            break
        dr = 2 * r + 2 * s.kappa * h * (1 + s.amp * s.omega * math.cos(s.omega * r))
        p.grad = torch.tensor((dr, -2 * s.kappa * h), dtype=torch.float64)
        opt.step()
    if keep_path and path[-1][0] != t:
        path.append([t, r, theta, value])
    out = {"hp": hp, "steps": steps, "final_psi": None if diverged else value, "diverged": diverged, "last_step": t}
    return {**out, "trajectory": path} if keep_path else out


def tune_surface(surface: Surface, name: str, grid: dict[str, list[float]], top: int, n: int) -> dict[str, Any]:
    """Run the grid from the start point, rerun its ``top`` settings from ``n`` starts moved by at most
    ``surface.jitter`` in each coordinate (seeded), keep the lowest median."""
    settings = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    # fewest steps first; among those not reaching the threshold, lowest final psi; diverged last
    surface_rank = lambda r: tuple(math.inf if r[k] is None else r[k] for k in ("steps", "final_psi"))  # noqa: E731
    runs = sorted((run_surface(surface, name, hp) for hp in settings), key=surface_rank)
    offsets = 2 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 1
    (r0, t0), jitter = surface.start, surface.jitter
    starts = [surface._replace(start=(r0 + dr * jitter, t0 + dt * jitter)) for dr, dt in offsets.tolist()]
    for run in runs[:top]:
        run["jittered_steps"] = [run_surface(s, name, run["hp"])["steps"] for s in starts]
    median = lambda r: statistics.median(math.inf if s is None else s for s in r["jittered_steps"])  # noqa: E731
    finalists = sorted(runs[:top], key=lambda r: (median(r), *surface_rank(r)))
    best = run_surface(surface, name, finalists[0]["hp"], keep_path=True)
    best["jittered_steps"] = finalists[0]["jittered_steps"]
    best["jittered"] = summary(best["jittered_steps"])
    reached = [r["steps"] for r in runs if r["steps"] is not None]
    return {"grid": grid, "n_settings": len(runs), "n_reached": len(reached),
            "n_diverged": sum(r["diverged"] for r in runs),
            "median_steps_of_reached": statistics.median(reached) if reached else None,
            "best": best, "finalists": finalists, "all": runs}  # fmt: skip


def part_surface(quick: bool) -> dict[str, Any]:
    surface, (top, n) = Surface(cap=1000 if quick else 5000), ((2, 3) if quick else (5, 10))
    results: dict[str, Any] = {}
    for name, grid in SURFACE_GRIDS.items():
        grid = {k: [v[0], v[-1]] for k, v in grid.items()} if quick else grid
        results[name] = tune_surface(surface, name, grid, top, n)
        best = results[name]["best"]
        log(f"surface {name}: best {best['hp']} -> steps {best['steps']}, jittered {best['jittered_steps']}")
    hb = results["heavy_ball"]["best"]
    check = run_surface(surface, "delta_momentum", {**hb["hp"], "delta": 0.0}, keep_path=True)
    same = check["trajectory"] == hb["trajectory"] and check["steps"] == hb["steps"]
    return {
        "setting": {**surface._asdict(), "parameter": "the 2-vector (r, theta), float64, closed-form gradient",
                    "finalists": top, "jittered_starts": n},
        "optimizers": results,
        "delta0_check": {"hp": check["hp"], "steps": check["steps"], "identical_to_heavy_ball": same},
        "m3": "skipped: M3 orthogonalises matrices only and runs AdamW on 1-D parameters, so on the 2-vector (r, theta)"
        " it is AdamW (the adam row with weight decay 0).",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the methods
# An optimizer under test: build(params, lr=..., seed=...), its lr grid, note, buffers to watch (regression) and
# rule (classifiers and LM: "hypergradient" or "surprise").
Method = namedtuple("Method", "build grid note buffers rule")


def method(cls: type, grid: Sequence[float], note: str, buffers: tuple[str, ...] = (), rule: Optional[str] = None,
           **kw: Any) -> Method:  # fmt: skip
    """A :class:`Method` building ``cls(params, lr=lr, **kw)``; DMGD also gets the run's seed (its memory's init)."""
    build = lambda params, lr, seed: cls(params, lr=lr, **kw, **({"seed": seed} if cls is DMGD else {}))  # noqa: E731
    return Method(build, tuple(grid), note, buffers, rule)


PM, DM, ADAMW, NS = PreconditionedMomentum, DeltaMomentum, torch.optim.AdamW, "newton_schulz"
M3_GRID, DMGD_GRID, LM_GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), (0.01, 0.03, 0.1, 0.3, 1.0), (1e-3, 3e-3, 1e-2)
ADAMW_GRID, MUON_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), (0.01, 0.02, 0.05, 0.1, 0.2)
RMS_GRID, M3_NOTE = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "M3 defaults (EMA form, eps 1e-4, slow_every 100)"
MB = ("momentum_buffer",)
REGRESSION_METHODS: dict[str, Method] = {
    "sgd": method(PM, (0.03, 0.1, 0.3, 1.0), "heavy-ball, momentum 0", momentum=0.0, preconditioner="identity"),
    "heavy_ball": method(PM, (0.001, 0.003, 0.01, 0.03), "momentum 0.9", MB, momentum=0.9, preconditioner="identity"),
    "delta_momentum": method(DM, DMGD_GRID, "momentum 0.9, delta 0.5", MB, momentum=0.9, delta=0.5),
    "adam": method(torch.optim.Adam, (1e-3, 3e-3, 1e-2, 3e-2, 0.1), "torch.optim.Adam, betas (0.9, 0.999)",
                   ("exp_avg",)),
    "m3": method(M3, M3_GRID, "M3 defaults, slow_every 100", ("exp_avg", "slow_avg")),
    "m3_alpha0": method(M3, M3_GRID, "M3 with alpha 0 (no slow momentum in the update)", ("exp_avg",), alpha=0.0),
    "dmgd": method(DMGD, DMGD_GRID, "DMGD defaults: Newton-Schulz output, hidden 16", output=NS),
    "dmgd_h0": method(DMGD, DMGD_GRID, "DMGD as above, hidden 0", output=NS, hidden=0),
}  # fmt: skip
CLASSIFIER_METHODS: dict[str, Method] = {
    "adamw": method(ADAMW, ADAMW_GRID, "AdamW, weight decay 0.01", weight_decay=0.01),
    "muon_dmgd_h0": method(DMGD, MUON_GRID, "DMGD Newton-Schulz output, hidden 0", output=NS, hidden=0),
    "muon_dmgd_h16": method(DMGD, MUON_GRID, "DMGD Newton-Schulz output, hidden 16 (default)", output=NS),
    "m3": method(M3, (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3), M3_NOTE),
    "pm_rms": method(PM, RMS_GRID, "PreconditionedMomentum rms, momentum 0.9", preconditioner="rms"),
    "delta_momentum": method(DM, (0.01, 0.03, 0.1, 0.3), "DeltaMomentum identity, momentum 0.9, delta 0.5",
                             momentum=0.9, delta=0.5),
    "delta_momentum_rms": method(DM, RMS_GRID, "DeltaMomentum rms, momentum 0.9, delta 0.5", momentum=0.9, delta=0.5,
                                 preconditioner="rms"),
    "adamw_hypergradient": method(ADAMW, ADAMW_GRID, "AdamW + HypergradientRule() (hyper_lr 0.02, bounds 0.1-10)",
                                  rule="hypergradient", weight_decay=0.01),
    "adamw_surprise": method(ADAMW, ADAMW_GRID, "AdamW + ScheduledRule(surprise, key train_loss, reference 1.0,"
                             " bounds 0.1-10)", rule="surprise", weight_decay=0.01),
}  # fmt: skip
LM_METHODS: dict[str, Method] = {
    "adamw": method(ADAMW, LM_GRID, "AdamW (the LM's groups: weight decay 0.1 on matrices, 0 elsewhere)",
                    weight_decay=0.01),
    "muon_dmgd_h0": method(DMGD, MUON_GRID, "DMGD Newton-Schulz, hidden 0", output=NS, hidden=0),
    "m3": method(M3, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), M3_NOTE),
    "adamw_hypergradient": method(ADAMW, LM_GRID, "AdamW + HypergradientRule()", rule="hypergradient",
                                  weight_decay=0.01),
    "adamw_surprise": method(ADAMW, LM_GRID, "AdamW + ScheduledRule(surprise, reference 1.0)", rule="surprise",
                             weight_decay=0.01),
}  # fmt: skip
LM_SETTING = {"dim": 64, "depth": 2, "heads": 4, "seq_len": 128, "batch_size": 8, "warmup_steps": 20}


def tune_and_run(methods: dict[str, Method], seeds: Sequence[int], quick: bool, run: Callable[..., dict[str, Any]],
                 key: Callable[[dict[str, Any]], Any], label: str) -> dict[str, Any]:  # fmt: skip
    """Per method: run the grid on ``seeds[0]``, keep the ``lr`` with the lowest ``key``, then run every seed."""
    out: dict[str, Any] = {}
    for name, m in methods.items():
        grid = (m.grid[0], m.grid[-1]) if quick else m.grid
        tuning = {lr: run(m, lr, seeds[0]) for lr in grid}
        chosen = min(grid, key=lambda lr: key(tuning[lr]))
        runs = [tuning[chosen] if s == seeds[0] else run(m, chosen, s) for s in seeds]
        log(f"{label} {name}: grid {list(grid)} -> lr {chosen}")
        out[name] = {"note": m.note, "grid": list(grid), "chosen_lr": chosen, "tuning_seed": seeds[0],
                     "tuning": [tuning[lr] for lr in grid], "runs": runs}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- part 2: tasks
RegressionSetup = namedtuple("RegressionSetup", "dim tasks outputs batch sigma steps_per_task relearn_steps"
                             " relearn_tolerance offsets align_threshold",
                             defaults=(32, 8, 4, 16, 0.1, 100, 300, 0.01, (1, 2, 3, 5, 10, 20, 50, 100),
                                       0.9))  # fmt: skip


def alignment(m: torch.Tensor, cols: torch.Tensor) -> Optional[float]:
    """``||m U|| / ||m||_F`` for orthonormal columns ``U``: the share of ``m``'s rows inside their span."""
    norm = m.norm()
    return None if cols.shape[1] == 0 or not norm > 0 else float((m @ cols).norm() / norm)


def alignment_summary(setup: RegressionSetup, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """One watched tensor's ``(task, step, current, previous, old span)`` alignments, summarised over switches 2..K."""
    switched, mean_of = [r for r in rows if r[0] > 0], lambda xs: summary(xs)["mean"]  # of the finite values
    at = lambda k, col: mean_of([r[col] for r in switched if r[1] == k])  # noqa: E731
    hits = [[r[1] for r in switched if r[0] == t and r[2] is not None and r[2] >= setup.align_threshold]
            for t in range(1, setup.tasks)]  # fmt: skip
    to_align = [min(h) if h else None for h in hits]
    return {
        "curve_after_switch": {f"+{k}": {"current": at(k, 2), "previous": at(k, 3)}
                               for k in setup.offsets if k <= setup.steps_per_task},
        "end_of_task": {"current": at(setup.steps_per_task, 2), "previous": at(setup.steps_per_task, 3)},
        "mean_in_old_span": mean_of([r[4] for r in switched]),
        "steps_to_align": to_align, "mean_steps_to_align": mean_of(to_align),
        "switches_aligned": sum(v is not None for v in to_align),
    }  # fmt: skip


def run_regression(setup: RegressionSetup, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """Tasks in sequence from ``W = 0``, then task 1 again; the ``R`` matrix, losses and alignments of one run."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(setup.dim, setup.dim, generator=gen, dtype=torch.float64))
    targets = torch.randn(setup.tasks, setup.outputs, generator=gen) / math.sqrt(setup.outputs)
    basis, perp = q[:, : setup.tasks].float(), (q[:, setup.tasks :] @ q[:, setup.tasks :].T).float()
    w = torch.zeros(setup.outputs, setup.dim, requires_grad=True)
    opt = method.build([w], lr=lr, seed=seed)

    def losses() -> list[float]:  # the task-specific part of each task's expected loss, ||W u_j - t_j||^2
        with torch.no_grad():
            return ((w @ basis).T - targets).pow(2).sum(dim=1).tolist()

    def train_step(i: int) -> float:  # one fresh batch of task i: x = s u_i + sigma xi (xi in the complement)
        s = torch.randn(setup.batch, 1, generator=gen)
        x = s * basis[:, i] + setup.sigma * (torch.randn(setup.batch, setup.dim, generator=gen) @ perp)
        loss = (x @ w.T - s * targets[i]).pow(2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    watched: dict[str, list[tuple[Any, ...]]] = {n: [] for n in ("update", *method.buffers)}
    rows: list[list[float]] = []
    shared: list[float] = []
    initial = losses()
    for task in range(setup.tasks):
        for step in range(1, setup.steps_per_task + 1):
            before = w.detach().clone()
            if not (math.isfinite(train_step(task)) and torch.isfinite(w).all()):
                return {"lr": lr, "seed": seed, "diverged": True, "diverged_in_task": task + 1, "R": rows,
                        "initial_losses": initial}  # fmt: skip
            for key in watched:
                m = w.detach() - before if key == "update" else opt.state[w][key]
                prev = alignment(m, basis[:, task - 1 : task]) if task > 0 else None
                watched[key].append((task, step, alignment(m, basis[:, task : task + 1]), prev,
                                     alignment(m, basis[:, :task])))  # fmt: skip
        rows.append(losses())
        shared.append(float(setup.sigma**2 * (w.detach() @ perp).pow(2).sum()))  # the term every task shares
    final, k = rows[-1], setup.tasks
    target = rows[0][0] + setup.relearn_tolerance * initial[0]
    relearn: Optional[int] = 0 if losses()[0] <= target else None
    for step in range(1, setup.relearn_steps + 1 if relearn is None else 0):  # task 1 again, until back at target
        train_step(0)
        if not math.isfinite(value := losses()[0]) or value <= target:
            relearn = step if math.isfinite(value) else None
            break
    return {
        "lr": lr, "seed": seed, "diverged": False, "R": rows, "initial_losses": initial, "shared_term": shared,
        "final_mean_loss": statistics.fmean(final), "learning_loss": statistics.fmean(rows[j][j] for j in range(k)),
        "forgetting": statistics.fmean(final[j] - min(rows[i][j] for i in range(j, k - 1)) for j in range(k - 1)),
        "loss_increase_since_learned": statistics.fmean(final[j] - rows[j][j] for j in range(k - 1)),
        "relearn_target": target, "relearn_steps": relearn,
        "alignment": {name: alignment_summary(setup, r) for name, r in watched.items()},
    }  # fmt: skip


ALIGN_COLUMNS = {  # aggregate key: path in a run's alignment summary (missing where a task is shorter than 10 steps)
    **{f"{w}_at_+{k}": f"curve_after_switch +{k} {w}" for w, k in (("previous", 1), ("current", 5), ("current", 10),
                                                                   ("previous", 10))},
    "current_end_of_task": "end_of_task current", "mean_in_old_span": "mean_in_old_span",
    "mean_steps_to_align": "mean_steps_to_align",
}  # fmt: skip


def aggregate_regression(block: dict[str, Any], buffers: Sequence[str]) -> dict[str, Any]:
    runs = [r for r in block["runs"] if not r["diverged"]]
    values = lambda get: [None if r["diverged"] else get(r) for r in block["runs"]]  # noqa: E731
    # run["alignment"][name][key 1][key 2]..., None where missing (a task shorter than 10 steps)
    dig = lambda r, name, path: reduce(lambda v, key: v.get(key) if isinstance(v, dict) else None,  # noqa: E731
                                       path.split(), r["alignment"][name])  # fmt: skip
    keys = ("final_mean_loss", "learning_loss", "forgetting", "loss_increase_since_learned", "relearn_steps")
    out = {k: summary(values(lambda r, k=k: r[k])) for k in keys}
    out["initial_mean_loss"] = summary([statistics.fmean(r["initial_losses"]) for r in block["runs"]])
    out["learning_over_initial"] = summary(values(lambda r: r["learning_loss"] / statistics.fmean(r["initial_losses"])))
    out["relearn_not_reached"] = sum(r["relearn_steps"] is None for r in runs)
    out["diverged"] = len(block["runs"]) - len(runs)
    for name in ("update", *buffers):
        a = out[f"align_{name}"] = {
            k: summary(values(partial(dig, name=name, path=p))) for k, p in ALIGN_COLUMNS.items()
        }
        a["switches_aligned"] = sum(r["alignment"][name]["switches_aligned"] for r in runs)
        a["switches"] = sum(len(r["alignment"][name]["steps_to_align"]) for r in runs)
    return out


def part_regression(seeds: Sequence[int], quick: bool, steps_per_task: Sequence[int], relearn: int) -> dict[str, Any]:
    """One tuned comparison per task length (a short one switches before the tasks are learned, a long one after)."""
    regimes = {}
    score = lambda r: r["final_mean_loss"] if not r["diverged"] and finite(r["final_mean_loss"]) else math.inf  # noqa: E731
    for steps in steps_per_task:
        setup = RegressionSetup(steps_per_task=steps, relearn_steps=relearn)
        results = tune_and_run(REGRESSION_METHODS, seeds, quick, partial(run_regression, setup), score,
                               f"regression ({steps} steps/task)")  # fmt: skip
        for name, block in results.items():
            block["aggregate"] = aggregate_regression(block, REGRESSION_METHODS[name].buffers)
        regimes[str(steps)] = {"setting": setup._asdict(), "methods": results}
    return {"regimes": regimes}


# ---------------------------------------------------------------------------------------------------- parts 3-5
class StepStats(pl.Callback):
    """Wall and process CPU time of every training step, its loss, and the largest weight change of the first step."""

    def __init__(self) -> None:
        self.times, self.cpu_times, self.losses, self._t0, self._c0 = [], [], [], 0.0, 0.0
        self.first_step_max_change: Optional[float] = None
        self._before: Optional[list[torch.Tensor]] = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == 0:
            self._before = [p.detach().clone() for p in pl_module.parameters()]
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)
        self.losses.append(float(outputs["loss"]))
        if self._before is not None:
            changes = [(p.detach() - b).abs().max() for p, b in zip(pl_module.parameters(), self._before, strict=True)]
            self.first_step_max_change, self._before = float(torch.stack(changes).max()), None


class FashionMNISTSplit(pl.LightningDataModule):
    """Fashion-MNIST's 60,000 training images, ``val_size`` of them held out by a seeded permutation (784 features)."""

    def __init__(self, batch_size: int, seed: int, val_size: int = 10_000) -> None:
        super().__init__()
        data, self.batch_size, self.seed = FashionMNIST(train=True), batch_size, seed
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        self.train_set, self.val_set = (TensorDataset(data.data[i], data.targets[i])
                                        for i in (perm[val_size:], perm[:val_size]))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)


ClassifierData = namedtuple("ClassifierData", "title in_features description make")  # make(batch_size, seed)
DATASETS = {
    "digits": ClassifierData("Digits classifier", 64, "scikit-learn digits, DigitsDataModule(val_fraction=0.2, seed=S)",
                             lambda b, seed: DigitsDataModule(batch_size=b, val_fraction=0.2, seed=seed)),
    "fmnist": ClassifierData("Fashion-MNIST classifier", 784, "Fashion-MNIST training images, 50,000 to train on and"
                             " 10,000 held out for validation (seeded by S)", FashionMNISTSplit),
}  # fmt: skip
RULES: dict[str, Callable[[], pl.Callback]] = {
    "hypergradient": HypergradientRule,
    "surprise": lambda: ScheduledRule("nl_lightning.callbacks.scheduled_rule.surprise",
                                      kwargs={"key": "train_loss", "reference": 1.0}),
}  # fmt: skip


def run_model(part: str, steps: int, batch_size: int, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """One run of part ``part`` (a classifier, or ``charlm``): exactly ``steps`` optimizer steps through Lightning,
    validation once after the last one, nothing written to disk."""
    pl.seed_everything(seed, verbose=False)
    optimizer, lm, c = partial(method.build, lr=lr, seed=seed), part == "charlm", LM_SETTING
    if lm:
        dm = TextDataModule(seq_len=c["seq_len"], batch_size=c["batch_size"], samples_per_epoch=steps * 8, seed=seed)
        model = TransformerPP(vocab_size=256, dim=c["dim"], depth=c["depth"], heads=c["heads"], optimizer=optimizer,
                              warmup_steps=c["warmup_steps"], max_steps_schedule=steps)  # fmt: skip
    else:
        dm = DATASETS[part].make(batch_size, seed)
        model = MLPClassifier(DATASETS[part].in_features, 10, hidden=[128, 128], optimizer=optimizer)
    stats, rules, start = StepStats(), [RULES[method.rule]()] if method.rule else [], time.perf_counter()
    with quiet(io.StringIO()):
        trainer = cpu_trainer(max_steps=steps, num_sanity_val_steps=0, val_check_interval=steps,
                              check_val_every_n_epoch=None, callbacks=[stats, *rules])  # fmt: skip
        trainer.fit(model, dm)
    seconds, m = time.perf_counter() - start, {k: float(v) for k, v in trainer.callback_metrics.items()}
    times = {"median_step_ms": 1e3 * statistics.median(stats.times[5:] or stats.times),  # first 5 steps left out
             "median_step_cpu_ms": 1e3 * statistics.median(stats.cpu_times[5:] or stats.cpu_times)}  # fmt: skip
    mults = {"lr_multipliers": {t: dict(v) for t, v in rules[0].multipliers.items()} if rules else None}
    if lm:
        loss = statistics.fmean(stats.losses[-20:]) if stats.losses else None
        return {"lr": lr, "seed": seed, "steps": trainer.global_step,
                "diverged": not all(finite(v) for v in [m.get("val_bpc"), loss, *stats.losses]),
                "val_bpc": m.get("val_bpc"), "train_loss_last20": loss, **times, "seconds": seconds,
                "parameters": sum(p.numel() for p in model.parameters()), **mults}  # fmt: skip
    model.eval()
    with torch.no_grad():  # the train loss over the whole split
        sums = [(float(F.cross_entropy(model(x), y, reduction="sum")), len(y))
                for x, y in DataLoader(dm.train_set, 1000)]  # fmt: skip
    loss = sum(t for t, _ in sums) / sum(n for _, n in sums)
    return {"lr": lr, "seed": seed, "steps": trainer.global_step,
            "diverged": not all(finite(v) for v in [m.get("val_loss"), loss, *stats.losses]),
            "val_acc": m.get("val_acc"), "val_loss": m.get("val_loss"), "train_loss": loss,
            "train_loss_worse_than_uniform": finite(loss) and loss > math.log(10), **times,
            "first_step_max_weight_change": stats.first_step_max_change, "seconds": seconds, **mults}  # fmt: skip


def part_model(part: str, seeds: Sequence[int], quick: bool, steps: int, batch_size: int) -> dict[str, Any]:
    """A classifier part, or ``charlm``: every method tuned and run, with summaries over the seeds."""
    if part == "fmnist" and not fashion_mnist_available():
        log(f"skipping {part}: the Fashion-MNIST files are missing")
        return {"skipped": "the Fashion-MNIST files are missing (apt-get install dataset-fashion-mnist, or set"
                " NL_FASHION_MNIST_ROOT)"}  # fmt: skip
    lm, s, data = part == "charlm", LM_SETTING, DATASETS.get(part)
    key = "val_bpc" if lm else "val_acc"
    keys = ("val_bpc", "train_loss_last20") if lm else ("val_acc", "val_loss", "train_loss",
                                                         "first_step_max_weight_change")  # fmt: skip

    def score(r: dict[str, Any]) -> tuple[float, float]:  # the lowest val bpc; the highest val acc, then val loss
        if r["diverged"] or not finite(r[key]):
            return (math.inf, math.inf)
        return (r[key], 0.0) if lm else (-r[key], r["val_loss"])

    run = partial(run_model, part, steps, batch_size)
    results = tune_and_run(LM_METHODS if lm else CLASSIFIER_METHODS, seeds, quick, run, score, part)
    for block in results.values():
        runs, agg = block["runs"], {k: summary([None if r["diverged"] else r[k] for r in block["runs"]]) for k in keys}
        agg |= {k: summary([r[k] for r in runs]) for k in ("median_step_ms", "median_step_cpu_ms")}
        agg["diverged"] = sum(r["diverged"] for r in runs)
        if runs[0]["lr_multipliers"] is not None:
            agg["lr_multipliers"] = {t: summary([r["lr_multipliers"][t]["lr"] for r in runs])
                                     for t in runs[0]["lr_multipliers"]}  # fmt: skip
        if not lm:
            agg["worse_than_uniform"] = sum(r["train_loss_worse_than_uniform"] for r in runs if not r["diverged"])
        block["aggregate"] = agg
    setting = {
        "model": f"TransformerPP {s['dim']}x{s['depth']}, {s['heads']} heads, byte-level",
        "data": f"TextDataModule default corpus (pydoc_data.topics), seq_len {s['seq_len']}, batch {s['batch_size']}",
        "steps": steps, "schedule": f"CausalLM warm-up {s['warmup_steps']} steps then cosine to 10 % at the last step",
        "selection": "lowest val_bpc of the first seed",
    } if lm else {
        "title": data.title, "model": f"MLPClassifier {data.in_features}-128-128-10 (GELU)",
        "data": data.description, "steps": steps, "batch_size": batch_size, "validation": "once, after the last step",
        "selection": "highest val_acc of the first seed (ties: lower val_loss)",
    }  # fmt: skip
    return {"setting": setting, "methods": results}


# ---------------------------------------------------------------------------------------------------- page
def method_row(name: str, block: dict[str, Any]) -> list[str]:
    """The method cell (flagged with divergences and train losses above ln 10) and the lr cell (chosen, then grid)."""
    agg = block["aggregate"]
    flags = [f"{agg['diverged']} diverged"] if agg["diverged"] else []
    flags += [f"{agg['worse_than_uniform']} with train loss > ln 10"] if agg.get("worse_than_uniform") else []
    grid = ", ".join(f"{v:g}" for v in block["grid"])
    return [f"{name} ({', '.join(flags)})" if flags else name, f"{block['chosen_lr']:g} ({grid})"]


def surface_table(part: dict[str, Any]) -> dict[str, Any]:
    s, rows = part["setting"], []
    for name, r in part["optimizers"].items():
        b, j = r["best"], r["best"]["jittered"]
        steps = str(b["steps"]) if b["steps"] is not None else ("diverged" if b["diverged"] else "not reached")
        worst = "not reached" if j["n_defined"] < j["n"] else num(j["max"], ".0f")
        jit = f"{num(j['median'], '.0f')} [{num(j['min'], '.0f')}, {worst}] ({j['n_defined']}/{j['n']})"
        rows.append([name, ", ".join(f"{k} {v:g}" for k, v in b["hp"].items()), steps, jit, num(b["final_psi"]),
                     f"{r['n_reached']}/{r['n_settings']}", num(r["median_steps_of_reached"], "g")])  # fmt: skip
    chk = part["delta0_check"]
    grids = "; ".join(f"{n}: " + " × ".join(f"{k} {{{', '.join(f'{v:g}' for v in vs)}}}" for k, vs in r["grid"].items())
                      for n, r in part["optimizers"].items())  # fmt: skip
    return {"title": f"2-D surface (NL paper, Fig. 4): steps until ψ < {s['threshold']:g} from {tuple(s['start'])}"
            f" (cap {s['cap']}), κ {s['kappa']}, a {s['amp']}, ω {s['omega']}",
            "columns": ["optimizer", "best setting", "steps", f"steps from {s['jittered_starts']} starts jittered by"
                        f" {s['jitter']:g}: median [min, max] (reached)", "final ψ", "grid settings reaching",
                        "their median steps"],
            "rows": rows, "note": f"Grids: {grids}. The {s['finalists']} fastest settings of each grid rerun from the"
            f" jittered starts; the lowest median wins. DeltaMomentum with delta 0 at heavy-ball's best setting "
            f"{'retraces heavy-ball exactly' if chk['identical_to_heavy_ball'] else 'DIFFERS from heavy-ball'}"
            f" (steps {chk['steps']}). M3 {part['m3']}"}  # fmt: skip


def regression_table(part: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for steps, regime in part["regimes"].items():
        for name, block in regime["methods"].items():
            agg = block["aggregate"]
            head = [steps, *method_row(name, block), *(cell(agg[k], ".3g") for k in
                    ("final_mean_loss", "learning_loss", "learning_over_initial", "forgetting")),
                    cell(agg["relearn_steps"], ".0f")]  # fmt: skip
            for i, buf in enumerate(REGRESSION_METHODS[name].buffers or ("update",)):
                a, to = agg[f"align_{buf}"], agg[f"align_{buf}"]["mean_steps_to_align"]
                aligned = "never" if not a["switches_aligned"] or to["mean"] is None else num(to["mean"], ".1f")
                aligned += "" if aligned == "never" or to["std"] is None else f" ± {to['std']:.1f}"
                rows.append([*(head if i == 0 else ["″", "″", *[""] * 6]), "ΔW" if buf == "update" else f"`{buf}`",
                             cell(a["previous_at_+1"], ".2f", "zero"), cell(a["current_at_+5"], ".2f", "zero"),
                             f"{aligned} ({a['switches_aligned']}/{a['switches']})",
                             cell(agg["align_update"]["mean_in_old_span"], ".2f", "zero")])  # fmt: skip
    s = next(iter(part["regimes"].values()))["setting"]
    methods = "; ".join(f"`{n}`: {m.note}" for n, m in REGRESSION_METHODS.items())
    return {"title": f"Orthogonal-task continual regression (NL paper, Sec. 4.3): K = {s['tasks']} tasks in d ="
            f" {s['dim']}, W ({s['outputs']}, {s['dim']}) from 0, batch {s['batch']}, σ = {s['sigma']} in the"
            f" complement only; then task 1 again (≤ {s['relearn_steps']} steps)",
            "columns": ["steps/task", "method", "lr (grid)", "final loss", "learning loss", "learning / untrained",
                        "forgetting", "re-learn steps", "tensor", "prev @+1", "cur @+5", "steps to 0.9 (switches)",
                        "ΔW in old span"], "rows": rows,
            "note": "Loss of task j: ‖W u_j − t_j‖². Alignment ‖P_u m‖/‖m‖ of the tensor, over the K−1 switches: with"
            " the previous direction 1 step after, the new one 5 steps after, steps until ≥ 0.9 with the new one, and"
            " the share of each update ΔW in the span of earlier tasks. Mean ± std over seeds. Methods:"
            f" {methods}."}  # fmt: skip


STEP = ("ms/step [CPU]", "step", "")
MODEL_COLUMNS = {  # (column, aggregate key, format)
    "charlm": (("val bpc", "val_bpc", ".3f"), ("train loss (last 20 steps)", "train_loss_last20", ".3g"), STEP),
    "classifier": (("val acc", "val_acc", ".4f"), ("val loss", "val_loss", ".3g"),
                   ("train loss (whole split)", "train_loss", ".3g"), STEP,
                   ("max \\|Δw\\| step 1", "first_step_max_weight_change", ".3g")),
}  # fmt: skip


def model_cell(agg: dict[str, Any], key: str, spec: str) -> str:
    if key == "step":
        return f"{cell(agg['median_step_ms'], '.2f')} [{cell(agg['median_step_cpu_ms'], '.2f')}]"
    if key == "lr_multipliers":
        return "; ".join(f"{t} {cell(v, '.3g')}" for t, v in agg[key].items()) if agg.get(key) else num(None)
    return cell(agg[key], spec)


def model_table(name: str, part: dict[str, Any]) -> dict[str, Any]:
    """A classifier's table, or the character LM's (``name`` ``charlm``)."""
    if "skipped" in part:
        return {"title": DATASETS[name].title, "columns": ["skipped"], "rows": [[part["skipped"]]]}
    lm, s = name == "charlm", part["setting"]
    cols = (*MODEL_COLUMNS["charlm" if lm else "classifier"], ("final lr multiplier", "lr_multipliers", ""))
    rows = [[*method_row(m, b), *(model_cell(b["aggregate"], k, f) for _, k, f in cols)]
            for m, b in part["methods"].items()]  # fmt: skip
    methods = "; ".join(f"`{n}`: {m.note}" for n, m in (LM_METHODS if lm else CLASSIFIER_METHODS).items())
    title = (f"Character (byte-level) language model: {s['model']}, {s['data']}, {s['steps']} steps; {s['schedule']}"
             if lm else f"{DATASETS[name].title}: {s['model']}, {s['data']}, {s['steps']} steps of batch"
             f" {s['batch_size']}")  # fmt: skip
    return {"title": f"{title}; lr by {s['selection']}", "columns": ["method", "lr (grid)", *(c for c, _, _ in cols)],
            "rows": rows, "note": f"Mean ± std over seeds. Methods: {methods}."}  # fmt: skip


def tables(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per part of the report (``optimizers.json`` has four, ``optimizers_charlm.json`` one)."""
    out = []
    for name, part in report["parts"].items():
        table = {"surface": surface_table, "regression": regression_table}.get(name, partial(model_table, name))(part)
        out.append({**table, "note": f"{table.get('note', '')} Part time {report['part_seconds'][name]:.0f} s."
                    .strip()})  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = arguments(__doc__, PARTS, seeds="0 1 2 (0 with --quick); the first one tunes")
    add = parser.add_argument
    add("--steps-per-task", type=int, nargs="+", default=[20, 100], help="regression (20 100)")
    add("--relearn-steps", type=int, default=300, help="regression: budget to re-learn task 1 (300)")
    add("--steps", type=int, default=600, help="digits, fmnist: optimizer steps per run (600)")
    add("--batch-size", type=int, default=32, help="digits, fmnist: batch size (32)")
    add("--lm-steps", type=int, default=400, help="charlm: optimizer steps per run (400)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.parts = parse_parts(parser, args.parts, PARTS)
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if args.quick else [0, 1, 2])))
    if args.quick:
        args.steps_per_task, args.relearn_steps, args.steps, args.lm_steps = [10], 60, 60, 40
    torch.set_num_threads(args.threads)
    started, root = time.perf_counter(), Path(nl_lightning.__file__).parent
    sources = [f"optim/{p.name}" for p in sorted((root / "optim").glob("*.py"))]
    sources += [f"callbacks/{n}.py" for n in ("self_modifying", "hypergradient", "scheduled_rule")]
    report = report_header(TITLE, "benchmarks/optimizers.py", argv, vars(args), environment(args.threads, sources))
    report.update(threads=args.threads, seeds=args.seeds)
    model = lambda name, steps: lambda: part_model(name, args.seeds, args.quick, steps, args.batch_size)  # noqa: E731
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "surface": lambda: part_surface(args.quick),
        "regression": lambda: part_regression(args.seeds, args.quick, args.steps_per_task, args.relearn_steps),
        "digits": model("digits", args.steps), "fmnist": model("fmnist", args.steps),
        "charlm": model("charlm", args.lm_steps),
    }  # fmt: skip
    run_parts(report, {name: runners[name] for name in args.parts}, log)
    return save(report, started, args.out, log)


if __name__ == "__main__":
    main()
