"""The paper's toy optimizer experiments as benchmarks: a 2-D surface, orthogonal-task regression, MLP classifiers.

The deep optimizers of ``nl_lightning.optim`` (NL NeurIPS Sec. 4; M3: Algorithm 1 of arXiv:2512.24695) against
heavy-ball momentum and Adam(W), in four parts (``--parts``). Every number is measured in this process; nothing is
copied from the paper. The optimizers are imported from their submodules, and the sha256 of each one's source file is
recorded in the JSON.

Part 1, ``surface`` (NL arXiv Fig. 4, Eq. 53)
---------------------------------------------
``psi(r, theta) = r^2 + kappa (r - theta + a sin(omega r))^2`` with ``kappa = 10``, ``a = 0.5``, ``omega = 4``, from
``(r, theta) = (2, -2)``; the minimum is ``psi(0, 0) = 0`` at the end of a curving valley. The parameter is the
2-vector ``(r, theta)`` in float64 and its gradient is set in closed form. Each optimizer is grid-tuned with one
deterministic run per setting (no seeds):

- ``heavy_ball``: ``PreconditionedMomentum(preconditioner="identity")``, lr x momentum (5 x 5);
- ``delta_momentum``: ``DeltaMomentum(preconditioner="identity", projection="tensor")``, lr x momentum x delta
  (5 x 5 x 4). ``delta = 0`` is left out of the grid because it *is* heavy-ball; the JSON's ``delta0_check`` verifies
  that ``delta=0`` retraces heavy-ball's best trajectory exactly;
- ``adam``: ``torch.optim.Adam``, lr x beta1 (5 x 4).

M3 is left out. It orthogonalises matrix parameters only and hands a 1-D parameter to its AdamW branch, so on a
2-vector it *is* AdamW (the ``adam`` row, with weight decay 0).

Score: the number of steps until ``psi < 1e-6`` (cap 5000; "not reached" otherwise). A momentum method's count is
sensitive to round-off: a change of the start far below any tolerance can change heavy-ball's count by tens of
percent (the JSON shows it). So the 5 fastest
settings of each grid run again from 10 starts, each coordinate moved by up to 1e-9 (seeded), and the best setting is
the one with the lowest median count over those starts. Reported: its count from the exact start, the median
``[min, max]`` over the jittered starts, how many grid settings reach the threshold at all, and the best run's
trajectory in the JSON (every 10th point).

Part 2, ``regression`` (NL arXiv Sec. 4.3, Eq. 45)
---------------------------------------------------
Setup:

- ``K = 8`` tasks in ``d = 32``. A seed draws an orthonormal basis ``u_1 .. u_K`` (QR of a Gaussian matrix) and
  targets ``t_i`` in ``R^p``, with ``p = 4`` and ``t_i ~ N(0, I/p)``, so ``||t_i||^2 ~ 1``.
- The parameter is a **(p, d) = (4, 32) matrix** ``W``, initialised at 0, so that M3 and DMGD see a matrix.
- A batch of task ``i`` has 16 samples ``x = s u_i + sigma xi``, ``y = s t_i``, with ``s ~ N(0, 1)``,
  ``sigma = 0.1`` and ``xi`` Gaussian noise *inside the orthogonal complement of span(u_1 .. u_K)*. The training loss
  is ``mean ||W x - y||^2``.
- Task ``j``'s expected loss is ``||W u_j - t_j||^2 + sigma^2 ||W P_perp||_F^2``. The first term depends on task
  ``j``'s direction alone; it is the reported loss, evaluated exactly. The second term is the same for every task and
  is recorded in the JSON (``shared_term``).

**The tasks interfere only through the optimizer.** A gradient of task ``i`` has rows along ``u_i`` plus a part in
the complement, so a plain SGD step leaves every ``W u_j`` with ``j != i`` unchanged. Any change in another task's
loss therefore comes from the optimizer's state (momentum carried across a switch) or from a non-linear map of the
gradient (element-wise ``1/sqrt(v)``, Newton-Schulz, an MLP memory) that moves ``W`` off ``u_i``.

Protocol:

- The tasks are trained in sequence, then task 1 again for up to ``--relearn-steps`` (300) steps.
- ``--steps-per-task`` defaults to two regimes, each tuned on its own. With 20 steps per task the switch comes before
  a task is learned and the momentum is still large. With 100 steps every task converges first.
- Methods: ``sgd`` (heavy-ball with momentum 0, the reference with no state); ``heavy_ball`` (momentum 0.9);
  ``delta_momentum`` (momentum 0.9, delta 0.5); ``adam``; ``m3`` (defaults, ``slow_every = 100``) and ``m3_alpha0``
  (``alpha = 0``: no slow momentum in the update, to separate its effect); ``dmgd`` (defaults: Newton-Schulz output,
  ``hidden = 16``) and ``dmgd_h0`` (``hidden = 0``).
- The learning rate of each method is chosen from a grid of 4-5 values by the final mean loss of the first seed; then
  every seed is run.

Scores:

- ``R[i][j]``, the loss of task ``j`` after training task ``i``. Final mean loss ``mean_j R[K][j]``; learning loss
  ``mean_j R[j][j]``.
- Forgetting, the loss form of Chaudhry et al.'s measure: ``R[K][j] - min_{j <= l < K} R[l][j]``, averaged over
  ``j < K``. Positive means the loss went up from its best.
- Re-learning: the steps on task 1 until its loss is at most ``R[1][1] + 0.01 L_1(W_0)``, i.e. back to its value just
  after it was first learned, within 1% of its initial loss (0 if it never rose above that).
- The alignment ``||P_u m|| / ||m|| = ||m u|| / ||m||_F`` of a tensor ``m`` with the current task's direction
  ``u_i``, the previous one ``u_{i-1}`` and the span of all earlier ones, after every step. ``m`` is the optimizer's
  buffer: ``state["momentum_buffer"]`` (heavy-ball, delta momentum), ``state["exp_avg"]`` (Adam, and M3's fast
  momentum ``M1``) or ``state["slow_avg"]`` (M3's slow momentum ``M2``). SGD has no buffer, and DMGD's memory is a
  ``(d, d)`` map of gradient rows rather than a tensor of ``W``'s shape, so for those two only the update ``Delta W``
  is measured; it is measured for every method.
- Reported alignments, averaged over the switches 2..K: the buffer's share along the previous direction one step
  after a switch, its share along the new direction 5 steps after, the steps until it is 0.9-aligned with the new
  task, and the mean share of each update inside the span of earlier tasks. The JSON has the full curve after a
  switch.

Parts 3 and 4, ``digits`` and ``fmnist``
---------------------------------------
Setup:

- ``MLPClassifier(in_features, 10, hidden=[128, 128])``, trained for ``--steps`` (600) optimizer steps of batch 32
  after ``seed_everything(S)``. It runs through Lightning's ``Trainer`` with ``logger=False``, no checkpoints, no
  progress bar, and one validation after the last step.
- Data for ``digits``: ``DigitsDataModule(batch_size=32, val_fraction=0.2, seed=S)``.
- Data for ``fmnist``: the 60,000 Fashion-MNIST training images, 10,000 of them held out for validation by a
  permutation seeded with ``S``. The part is skipped, with a note, when the files are missing.

Methods:

- ``adamw``: weight decay 0.01.
- ``muon_dmgd_h0`` and ``muon_dmgd_h16``: ``DMGD(output="newton_schulz")`` with ``hidden=0`` (Muon-style with a linear
  memory) and with the default ``hidden=16``.
- ``m3``: the defaults.
- ``pm_rms``: ``PreconditionedMomentum(preconditioner="rms")``.
- ``delta_momentum``: the identity preconditioner, delta 0.5; ``delta_momentum_rms``: the same with ``rms``.
- ``adamw_hypergradient``: AdamW + ``HypergradientRule()``.
- ``adamw_surprise``: AdamW + ``ScheduledRule(surprise, kwargs={"key": "train_loss", "reference": 1.0})``.

The learning rate of each method is chosen from a grid of 4-7 values by the validation accuracy of the first seed
(ties: the lower validation loss); then every seed is run.

Reported per method, as mean +- std over seeds:

- the final ``val_acc`` and ``val_loss`` on the held-out split;
- the train loss: the cross-entropy over the whole training split, evaluated after training;
- the median wall time of a training step, from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
  optimizer and rules, leaving out the first 5 steps. Also the median CPU time of the process over the same span
  (``time.process_time``), which other load on a shared machine inflates less;
- the largest change of any weight in the first step;
- for the rules, the final learning-rate multiplier of each parameter group.

The validation split depends on the seed. The tuning seed is also one of the reported seeds, which favours every
method alike.

A run whose loss becomes NaN or infinite is recorded as diverged and ranked last; its numbers are not averaged.

Running it
----------
::

    OMP_NUM_THREADS=1 python benchmarks/optimizers.py --seeds 0 1 2 \\
        --out benchmarks/results/optimizers.json --markdown benchmarks/results/optimizers.md   # ~7.5 min, 1 thread
    python benchmarks/optimizers.py --quick                          # smoke run: 2-point grids, short runs, seed 0
    python benchmarks/optimizers.py --parts surface,regression      # some parts only

Output:

- ``--out PATH`` writes the JSON (all numbers, grids, choices, versions, thread count, date) to ``PATH`` and prints
  the Markdown report to stdout; without ``--out``, the JSON goes to stdout.
- ``--markdown PATH`` also writes the report to ``PATH``.
- Progress goes to stderr.

The script is not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import DASH, emit, finite, num, quiet, ranked, report_header, run_parts, sha256_of, summary
from _common import cell as _cell
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

import nl_lightning
from nl_lightning.callbacks import HypergradientRule, ScheduledRule
from nl_lightning.data import DigitsDataModule, FashionMNIST, TextDataModule, fashion_mnist_available
from nl_lightning.models import MLPClassifier, TransformerPP
from nl_lightning.optim.delta_momentum import DeltaMomentum
from nl_lightning.optim.dmgd import DMGD
from nl_lightning.optim.m3 import M3
from nl_lightning.optim.preconditioned_momentum import PreconditionedMomentum

PARTS = ("surface", "regression", "digits", "fmnist", "charlm")
Builder = Callable[..., Optimizer]


# ---------------------------------------------------------------------------------------------------- statistics


def cell(entry: dict[str, Any], spec: str = ".3g", missing: str = "not reached") -> str:
    """:func:`_common.cell` with this report's defaults."""
    return _cell(entry, spec, missing)


def log(message: str) -> None:
    print(f"[optimizers] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- part 1: surface
@dataclass(frozen=True)
class Surface:
    kappa: float = 10.0
    amp: float = 0.5
    omega: float = 4.0
    start: tuple[float, float] = (2.0, -2.0)
    threshold: float = 1e-6
    cap: int = 5000
    every: int = 10
    jitter: float = 1e-9

    def value(self, r: float, theta: float) -> float:
        return r * r + self.kappa * (r - theta + self.amp * math.sin(self.omega * r)) ** 2

    def grad(self, r: float, theta: float) -> tuple[float, float]:
        h = r - theta + self.amp * math.sin(self.omega * r)
        return 2 * r + 2 * self.kappa * h * (1 + self.amp * self.omega * math.cos(self.omega * r)), -2 * self.kappa * h


SURFACE_GRIDS: dict[str, dict[str, list[float]]] = {
    "heavy_ball": {"lr": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2], "momentum": [0.5, 0.8, 0.9, 0.95, 0.99]},
    "delta_momentum": {
        "lr": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2],
        "momentum": [0.5, 0.8, 0.9, 0.95, 0.99],
        "delta": [0.03, 0.1, 0.3, 1.0],
    },
    "adam": {"lr": [0.1, 0.3, 1.0, 3.0, 10.0], "beta1": [0.5, 0.8, 0.9, 0.95]},
}


def surface_optimizer(name: str, params: list[Tensor], hp: dict[str, float]) -> Optimizer:
    if name == "heavy_ball":
        return PreconditionedMomentum(params, lr=hp["lr"], momentum=hp["momentum"], preconditioner="identity")
    if name == "delta_momentum":
        return DeltaMomentum(params, lr=hp["lr"], momentum=hp["momentum"], delta=hp["delta"], preconditioner="identity")
    if name == "adam":
        return torch.optim.Adam(params, lr=hp["lr"], betas=(hp["beta1"], 0.999))
    raise ValueError(name)


def run_surface(surface: Surface, name: str, hp: dict[str, float], keep_path: bool = False) -> dict[str, Any]:
    """One deterministic run from the start point: steps until ``psi < threshold`` (``None``: not within the cap)."""
    p = torch.tensor(surface.start, dtype=torch.float64, requires_grad=True)
    opt = surface_optimizer(name, [p], hp)
    path: list[list[float]] = []
    steps, diverged = None, False
    for t in range(surface.cap + 1):
        r, theta = p.detach().tolist()
        value = surface.value(r, theta)
        if keep_path and t % surface.every == 0:
            path.append([t, r, theta, value])
        if not math.isfinite(value) or value > 1e12:
            diverged = True
            break
        if value < surface.threshold:
            steps = t
            break
        if t == surface.cap:
            break
        p.grad = torch.tensor(surface.grad(r, theta), dtype=torch.float64)
        opt.step()
    if keep_path and path[-1][0] != t:
        path.append([t, r, theta, value])
    out = {"hp": hp, "steps": steps, "final_psi": None if diverged else value, "diverged": diverged, "last_step": t}
    return {**out, "trajectory": path} if keep_path else out


def surface_rank(run: dict[str, Any]) -> tuple[float, float]:
    """Fewest steps first; among those not reaching the threshold, lowest final psi; diverged last."""
    return (
        run["steps"] if run["steps"] is not None else math.inf,
        run["final_psi"] if run["final_psi"] is not None else math.inf,
    )


def jittered_steps(surface: Surface, name: str, hp: dict[str, float], n: int) -> list[Optional[int]]:
    """Steps to the threshold from ``n`` starts moved by at most ``surface.jitter`` in each coordinate (seeded)."""
    gen = torch.Generator().manual_seed(0)
    offsets = (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1) * surface.jitter
    r0, t0 = surface.start
    starts = [(r0 + dr, t0 + dt) for dr, dt in offsets.tolist()]
    return [run_surface(replace(surface, start=start), name, hp)["steps"] for start in starts]


def _median_steps(steps: Sequence[Optional[int]]) -> float:
    return statistics.median(math.inf if s is None else s for s in steps)


def tune_surface(surface: Surface, name: str, grid: dict[str, list[float]], top: int, n: int) -> dict[str, Any]:
    """Run the grid from the start point, re-run its ``top`` settings from ``n`` jittered starts, keep the best."""
    settings = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    runs = sorted((run_surface(surface, name, hp) for hp in settings), key=surface_rank)
    for run in runs[:top]:
        run["jittered_steps"] = jittered_steps(surface, name, run["hp"], n)
    finalists = sorted(runs[:top], key=lambda r: (_median_steps(r["jittered_steps"]), *surface_rank(r)))
    best = run_surface(surface, name, finalists[0]["hp"], keep_path=True)
    best["jittered_steps"] = finalists[0]["jittered_steps"]
    best["jittered"] = summary(best["jittered_steps"])
    reached = [r["steps"] for r in runs if r["steps"] is not None]
    return {
        "grid": grid,
        "n_settings": len(runs),
        "n_reached": len(reached),
        "n_diverged": sum(r["diverged"] for r in runs),
        "median_steps_of_reached": statistics.median(reached) if reached else None,
        "best": best,
        "finalists": finalists,
        "all": runs,
    }


def part_surface(quick: bool) -> dict[str, Any]:
    surface = Surface(cap=1000 if quick else 5000)
    top, n = (2, 3) if quick else (5, 10)
    results: dict[str, Any] = {}
    for name, grid in SURFACE_GRIDS.items():
        results[name] = tune_surface(
            surface, name, {k: [v[0], v[-1]] for k, v in grid.items()} if quick else grid, top, n
        )
        best = results[name]["best"]
        log(f"surface {name}: best {best['hp']} -> steps {best['steps']}, jittered {best['jittered_steps']}")
    hb = results["heavy_ball"]["best"]
    check = run_surface(surface, "delta_momentum", {**hb["hp"], "delta": 0.0}, keep_path=True)
    same = check["trajectory"] == hb["trajectory"] and check["steps"] == hb["steps"]
    return {
        "setting": {
            **asdict(surface),
            "parameter": "the 2-vector (r, theta), float64, closed-form gradient",
            "finalists": top,
            "jittered_starts": n,
        },
        "optimizers": results,
        "delta0_check": {"hp": check["hp"], "steps": check["steps"], "identical_to_heavy_ball": same},
        "m3": "skipped: M3 orthogonalises matrices only and runs AdamW on 1-D parameters, so on the 2-vector (r, theta)"
        " it is AdamW (the adam row with weight decay 0).",
    }


# ---------------------------------------------------------------------------------------------------- part 2: tasks
@dataclass(frozen=True)
class RegressionSetup:
    dim: int = 32
    tasks: int = 8
    outputs: int = 4
    batch: int = 16
    sigma: float = 0.1
    steps_per_task: int = 100
    relearn_steps: int = 300
    relearn_tolerance: float = 0.01
    offsets: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50, 100)
    align_threshold: float = 0.9


@dataclass
class Tasks:
    basis: Tensor  # (d, K), orthonormal columns u_1 .. u_K
    targets: Tensor  # (K, p)
    perp: Tensor  # (d, d), the projector onto the complement of span(u_1 .. u_K)
    gen: torch.Generator = field(repr=False)


def make_tasks(setup: RegressionSetup, seed: int) -> Tasks:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(setup.dim, setup.dim, generator=gen, dtype=torch.float64))
    basis = q[:, : setup.tasks].float()
    targets = torch.randn(setup.tasks, setup.outputs, generator=gen) / math.sqrt(setup.outputs)
    perp = (q[:, setup.tasks :] @ q[:, setup.tasks :].T).float()
    return Tasks(basis, targets, perp, gen)


def sample(setup: RegressionSetup, tasks: Tasks, i: int) -> tuple[Tensor, Tensor]:
    s = torch.randn(setup.batch, 1, generator=tasks.gen)
    noise = torch.randn(setup.batch, setup.dim, generator=tasks.gen) @ tasks.perp
    return s * tasks.basis[:, i] + setup.sigma * noise, s * tasks.targets[i]


@torch.no_grad()
def task_losses(setup: RegressionSetup, tasks: Tasks, w: Tensor) -> list[float]:
    """The task-specific part of each task's expected loss, ``||W u_j - t_j||^2`` (only task ``j``'s data trains it)."""
    return ((w @ tasks.basis).T - tasks.targets).pow(2).sum(dim=1).tolist()


@torch.no_grad()
def shared_term(setup: RegressionSetup, tasks: Tasks, w: Tensor) -> float:
    """The part of the expected loss that every task shares, ``sigma^2 ||W P_perp||_F^2`` (the noise directions)."""
    return float(setup.sigma**2 * (w @ tasks.perp).pow(2).sum())


def alignment(m: Tensor, cols: Tensor) -> Optional[float]:
    """``||m U|| / ||m||_F`` for orthonormal columns ``U``: the share of ``m``'s rows inside their span."""
    norm = m.norm()
    if cols.shape[1] == 0 or not norm > 0:
        return None
    return float((m @ cols).norm() / norm)


@dataclass(frozen=True)
class Method:
    """An optimizer under test: ``build(params, lr=..., seed=...)``, its learning-rate grid and buffers to watch."""

    build: Builder
    grid: tuple[float, ...]
    buffers: tuple[str, ...] = ()
    rule: Optional[str] = None  # classifiers only: "hypergradient" or "surprise"
    note: str = ""


def _heavy_ball(params: Any, lr: float, seed: int, momentum: float = 0.9, **kw: Any) -> Optimizer:
    return PreconditionedMomentum(params, lr=lr, momentum=momentum, preconditioner="identity", **kw)


def _pm(params: Any, lr: float, seed: int, **kw: Any) -> Optimizer:
    return PreconditionedMomentum(params, lr=lr, **kw)


def _delta(params: Any, lr: float, seed: int, **kw: Any) -> Optimizer:
    return DeltaMomentum(params, lr=lr, momentum=0.9, delta=0.5, **kw)


def _adam(params: Any, lr: float, seed: int) -> Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _adamw(params: Any, lr: float, seed: int) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def _m3(params: Any, lr: float, seed: int, **kw: Any) -> Optimizer:
    return M3(params, lr=lr, **kw)


def _dmgd(params: Any, lr: float, seed: int, **kw: Any) -> Optimizer:
    return DMGD(params, lr=lr, output="newton_schulz", seed=seed, **kw)


REGRESSION_METHODS: dict[str, Method] = {
    "sgd": Method(partial(_heavy_ball, momentum=0.0), (0.03, 0.1, 0.3, 1.0), (), note="heavy-ball, momentum 0"),
    "heavy_ball": Method(_heavy_ball, (0.001, 0.003, 0.01, 0.03), ("momentum_buffer",), note="momentum 0.9"),
    "delta_momentum": Method(_delta, (0.01, 0.03, 0.1, 0.3, 1.0), ("momentum_buffer",), note="momentum 0.9, delta 0.5"),
    "adam": Method(_adam, (1e-3, 3e-3, 1e-2, 3e-2, 0.1), ("exp_avg",), note="torch.optim.Adam, betas (0.9, 0.999)"),
    "m3": Method(_m3, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), ("exp_avg", "slow_avg"), note="M3 defaults, slow_every 100"),
    "m3_alpha0": Method(
        partial(_m3, alpha=0.0),
        (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
        ("exp_avg",),
        note="M3 with alpha 0 (no slow momentum in the update)",
    ),
    "dmgd": Method(_dmgd, (0.01, 0.03, 0.1, 0.3, 1.0), (), note="DMGD defaults: Newton-Schulz output, hidden 16"),
    "dmgd_h0": Method(partial(_dmgd, hidden=0), (0.01, 0.03, 0.1, 0.3, 1.0), (), note="DMGD as above, hidden 0"),
}


class AlignmentLog:
    """Per step: the alignment of each watched tensor with the current direction, the previous one, the old span."""

    def __init__(self, names: Sequence[str]) -> None:
        self.rows: dict[str, list[tuple[int, int, Optional[float], Optional[float], Optional[float]]]] = {
            n: [] for n in names
        }

    def add(self, name: str, task: int, step: int, m: Tensor, basis: Tensor) -> None:
        prev = alignment(m, basis[:, task - 1 : task]) if task > 0 else None
        self.rows[name].append(
            (task, step, alignment(m, basis[:, task : task + 1]), prev, alignment(m, basis[:, :task]))
        )

    def summary(self, setup: RegressionSetup) -> dict[str, Any]:
        out = {}
        for name, rows in self.rows.items():
            switched = [r for r in rows if r[0] > 0]  # tasks 2..K
            curve = {
                f"+{k}": {
                    "current": _mean([r[2] for r in switched if r[1] == k]),
                    "previous": _mean([r[3] for r in switched if r[1] == k]),
                }
                for k in setup.offsets
                if k <= setup.steps_per_task
            }
            to_align = []
            for task in range(1, setup.tasks):
                hits = [r[1] for r in switched if r[0] == task and r[2] is not None and r[2] >= setup.align_threshold]
                to_align.append(min(hits) if hits else None)
            out[name] = {
                "curve_after_switch": curve,
                "end_of_task": {
                    "current": _mean([r[2] for r in switched if r[1] == setup.steps_per_task]),
                    "previous": _mean([r[3] for r in switched if r[1] == setup.steps_per_task]),
                },
                "mean_in_old_span": _mean([r[4] for r in switched]),
                "steps_to_align": to_align,
                "mean_steps_to_align": _mean(to_align),
                "switches_aligned": sum(v is not None for v in to_align),
            }
        return out


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    ok = [v for v in values if finite(v)]
    return statistics.fmean(ok) if ok else None


def train_task(
    setup: RegressionSetup,
    tasks: Tasks,
    w: Tensor,
    opt: Optimizer,
    task: int,
    buffers: Sequence[str],
    log_: AlignmentLog,
) -> bool:
    """``steps_per_task`` steps on one task, logging alignments; False if the loss or ``W`` became non-finite."""
    for step in range(1, setup.steps_per_task + 1):
        x, y = sample(setup, tasks, task)
        loss = (x @ w.T - y).pow(2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        before = w.detach().clone()
        opt.step()
        if not (math.isfinite(loss.item()) and torch.isfinite(w).all()):
            return False
        log_.add("update", task, step, w.detach() - before, tasks.basis)
        for key in buffers:
            log_.add(key, task, step, opt.state[w][key], tasks.basis)
    return True


def relearn(setup: RegressionSetup, tasks: Tasks, w: Tensor, opt: Optimizer, target: float) -> Optional[int]:
    """Steps on task 1 until its loss is at most ``target`` (0: already there; None: not within the budget)."""
    if task_losses(setup, tasks, w)[0] <= target:
        return 0
    for step in range(1, setup.relearn_steps + 1):
        x, y = sample(setup, tasks, 0)
        loss = (x @ w.T - y).pow(2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = task_losses(setup, tasks, w)[0]
        if not math.isfinite(value):
            return None
        if value <= target:
            return step
    return None


def run_regression(setup: RegressionSetup, method: Method, lr: float, seed: int) -> dict[str, Any]:
    tasks = make_tasks(setup, seed)
    w = torch.zeros(setup.outputs, setup.dim, requires_grad=True)
    opt = method.build([w], lr=lr, seed=seed)
    log_ = AlignmentLog(("update", *method.buffers))
    rows: list[list[float]] = []
    shared: list[float] = []
    initial = task_losses(setup, tasks, w)
    for task in range(setup.tasks):
        if not train_task(setup, tasks, w, opt, task, method.buffers, log_):
            return {
                "lr": lr,
                "seed": seed,
                "diverged": True,
                "diverged_in_task": task + 1,
                "R": rows,
                "initial_losses": initial,
            }
        rows.append(task_losses(setup, tasks, w))
        shared.append(shared_term(setup, tasks, w))
    final, k = rows[-1], setup.tasks
    forgetting = [final[j] - min(rows[i][j] for i in range(j, k - 1)) for j in range(k - 1)]
    target = rows[0][0] + setup.relearn_tolerance * initial[0]
    steps = relearn(setup, tasks, w, opt, target)
    return {
        "lr": lr,
        "seed": seed,
        "diverged": False,
        "R": rows,
        "initial_losses": initial,
        "shared_term": shared,
        "final_mean_loss": statistics.fmean(final),
        "learning_loss": statistics.fmean(rows[j][j] for j in range(k)),
        "forgetting": statistics.fmean(forgetting),
        "loss_increase_since_learned": statistics.fmean(final[j] - rows[j][j] for j in range(k - 1)),
        "relearn_target": target,
        "relearn_steps": steps,
        "alignment": log_.summary(setup),
    }


def regression_score(run: dict[str, Any]) -> float:
    return run["final_mean_loss"] if not run["diverged"] and finite(run["final_mean_loss"]) else math.inf


def tune_and_run(
    methods: dict[str, Method],
    seeds: Sequence[int],
    quick: bool,
    run: Callable[..., dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    label: str,
) -> dict[str, Any]:
    """Per method: run the grid on ``seeds[0]``, keep the ``lr`` with the lowest ``key``, then run every seed."""
    out: dict[str, Any] = {}
    for name, method in methods.items():
        grid = (method.grid[0], method.grid[-1]) if quick else method.grid
        tuning = {lr: run(method, lr, seeds[0]) for lr in grid}
        chosen = min(grid, key=lambda lr: key(tuning[lr]))
        runs = [tuning[chosen] if s == seeds[0] else run(method, chosen, s) for s in seeds]
        log(f"{label} {name}: grid {list(grid)} -> lr {chosen}")
        out[name] = {
            "note": method.note,
            "grid": list(grid),
            "chosen_lr": chosen,
            "tuning_seed": seeds[0],
            "tuning": [tuning[lr] for lr in grid],
            "runs": runs,
        }
    return out


ALIGN_COLUMNS: dict[str, tuple[str, ...]] = {
    "previous_at_+1": ("curve_after_switch", "+1", "previous"),
    "current_at_+5": ("curve_after_switch", "+5", "current"),
    "current_at_+10": ("curve_after_switch", "+10", "current"),
    "previous_at_+10": ("curve_after_switch", "+10", "previous"),
    "current_end_of_task": ("end_of_task", "current"),
    "mean_in_old_span": ("mean_in_old_span",),
    "mean_steps_to_align": ("mean_steps_to_align",),
}


def _align_value(name: str, path: Sequence[str], run: dict[str, Any]) -> Optional[float]:
    """``run["alignment"][name][path[0]][path[1]]...``, ``None`` where missing (a task shorter than 10 steps)."""
    value: Any = run["alignment"][name]
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def aggregate_regression(block: dict[str, Any], buffers: Sequence[str]) -> dict[str, Any]:
    runs = [r for r in block["runs"] if not r["diverged"]]

    def values(get: Callable[[dict[str, Any]], Any]) -> list[Optional[float]]:
        return [get(r) if not r["diverged"] else None for r in block["runs"]]

    out = {
        k: summary(values(lambda r, k=k: r[k]))
        for k in ("final_mean_loss", "learning_loss", "forgetting", "loss_increase_since_learned")
    }
    out["initial_mean_loss"] = summary([statistics.fmean(r["initial_losses"]) for r in block["runs"]])
    out["learning_over_initial"] = summary(values(lambda r: r["learning_loss"] / statistics.fmean(r["initial_losses"])))
    out["relearn_steps"] = summary(values(lambda r: r["relearn_steps"]))
    out["relearn_not_reached"] = sum(r["relearn_steps"] is None for r in runs)
    out["diverged"] = len(block["runs"]) - len(runs)
    for name in ("update", *buffers):
        out[f"align_{name}"] = {
            key: summary(values(partial(_align_value, name, path))) for key, path in ALIGN_COLUMNS.items()
        }
        out[f"align_{name}"]["switches_aligned"] = sum(r["alignment"][name]["switches_aligned"] for r in runs)
        out[f"align_{name}"]["switches"] = sum(len(r["alignment"][name]["steps_to_align"]) for r in runs)
    return out


def part_regression(
    seeds: Sequence[int], quick: bool, steps_per_task: Sequence[int], relearn_steps: int
) -> dict[str, Any]:
    """One tuned comparison per task length (a short one switches before the tasks are learned, a long one after)."""
    regimes = {}
    for steps in steps_per_task:
        setup = RegressionSetup(steps_per_task=steps, relearn_steps=relearn_steps)
        label = f"regression ({steps} steps/task)"
        results = tune_and_run(
            REGRESSION_METHODS, seeds, quick, partial(run_regression, setup), regression_score, label
        )
        for name, block in results.items():
            block["aggregate"] = aggregate_regression(block, REGRESSION_METHODS[name].buffers)
        regimes[str(steps)] = {"setting": asdict(setup), "methods": results}
    return {"regimes": regimes}


# ---------------------------------------------------------------------------------------------------- part 3: digits
def _rule(kind: Optional[str]) -> list[pl.Callback]:
    if kind == "hypergradient":
        return [HypergradientRule()]
    if kind == "surprise":
        fn = "nl_lightning.callbacks.scheduled_rule.surprise"
        return [ScheduledRule(fn, kwargs={"key": "train_loss", "reference": 1.0})]
    return []


ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
RMS_GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MUON_GRID = (0.01, 0.02, 0.05, 0.1, 0.2)
CLASSIFIER_METHODS: dict[str, Method] = {
    "adamw": Method(_adamw, ADAMW_GRID, note="AdamW, weight decay 0.01"),
    "muon_dmgd_h0": Method(partial(_dmgd, hidden=0), MUON_GRID, note="DMGD Newton-Schulz output, hidden 0"),
    "muon_dmgd_h16": Method(_dmgd, MUON_GRID, note="DMGD Newton-Schulz output, hidden 16 (default)"),
    "m3": Method(
        _m3, (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3), note="M3 defaults (EMA form, eps 1e-4, slow_every 100)"
    ),
    "pm_rms": Method(partial(_pm, preconditioner="rms"), RMS_GRID, note="PreconditionedMomentum rms, momentum 0.9"),
    "delta_momentum": Method(_delta, (0.01, 0.03, 0.1, 0.3), note="DeltaMomentum identity, momentum 0.9, delta 0.5"),
    "delta_momentum_rms": Method(
        partial(_delta, preconditioner="rms"), RMS_GRID, note="DeltaMomentum rms, momentum 0.9, delta 0.5"
    ),
    "adamw_hypergradient": Method(
        _adamw, ADAMW_GRID, rule="hypergradient", note="AdamW + HypergradientRule() (hyper_lr 0.02, bounds 0.1-10)"
    ),
    "adamw_surprise": Method(
        _adamw,
        ADAMW_GRID,
        rule="surprise",
        note="AdamW + ScheduledRule(surprise, key train_loss, reference 1.0, bounds 0.1-10)",
    ),
}


class StepStats(pl.Callback):
    """Wall and process CPU time of every training step, its loss, and the largest weight change of the first step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self.first_step_max_change: Optional[float] = None
        self._t0 = self._c0 = 0.0
        self._before: Optional[list[Tensor]] = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == 0:
            self._before = [p.detach().clone() for p in pl_module.parameters()]
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)
        self.losses.append(float(outputs["loss"]))
        if self._before is not None:
            changes = [(p.detach() - b).abs().max() for p, b in zip(pl_module.parameters(), self._before, strict=True)]
            self.first_step_max_change = float(torch.stack(changes).max())
            self._before = None


class FashionMNISTSplit(pl.LightningDataModule):
    """Fashion-MNIST's 60,000 training images, ``val_size`` of them held out by a seeded permutation (784 features)."""

    def __init__(self, batch_size: int, seed: int, val_size: int = 10_000) -> None:
        super().__init__()
        self.batch_size, self.seed, self.val_size = batch_size, seed, val_size
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        data = FashionMNIST(train=True)
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[: self.val_size], perm[self.val_size :]
        self.train_set = TensorDataset(data.data[train], data.targets[train])
        self.val_set = TensorDataset(data.data[val], data.targets[val])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)


@dataclass(frozen=True)
class ClassifierData:
    title: str
    in_features: int
    description: str
    make: Callable[[int, int], pl.LightningDataModule]  # (batch_size, seed) -> data module with a train_set


DATASETS: dict[str, ClassifierData] = {
    "digits": ClassifierData(
        "Digits classifier",
        64,
        "scikit-learn digits, DigitsDataModule(val_fraction=0.2, seed=S)",
        lambda batch_size, seed: DigitsDataModule(batch_size=batch_size, val_fraction=0.2, seed=seed),
    ),
    "fmnist": ClassifierData(
        "Fashion-MNIST classifier",
        784,
        "Fashion-MNIST training images, 50,000 to train on and 10,000 held out for validation (seeded by S)",
        lambda batch_size, seed: FashionMNISTSplit(batch_size, seed),
    ),
}


@torch.no_grad()
def full_train_loss(model: MLPClassifier, dm: pl.LightningDataModule) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in DataLoader(dm.train_set, batch_size=1000, shuffle=False):
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        count += len(y)
    return total / count


def make_trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """Exactly ``steps`` optimizer steps, validation once after the last one, nothing written to disk."""
    return pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def run_classifier(
    data: ClassifierData, steps: int, batch_size: int, method: Method, lr: float, seed: int
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = data.make(batch_size, seed)
    model = MLPClassifier(data.in_features, 10, hidden=[128, 128], optimizer=partial(method.build, lr=lr, seed=seed))
    stats, rules = StepStats(), _rule(method.rule)
    sink = io.StringIO()
    start = time.perf_counter()
    with quiet(sink):
        trainer = make_trainer(steps, [stats, *rules])
        trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val_acc", "val_loss")}
    train_loss = full_train_loss(model, dm)
    diverged = not all(finite(v) for v in [metrics.get("val_loss"), train_loss, *stats.losses])
    return {
        "lr": lr,
        "seed": seed,
        "steps": trainer.global_step,
        "diverged": diverged,
        "val_acc": metrics.get("val_acc"),
        "val_loss": metrics.get("val_loss"),
        "train_loss": train_loss,
        "train_loss_worse_than_uniform": finite(train_loss) and train_loss > math.log(10),
        "median_step_ms": 1e3 * statistics.median(stats.times[5:] or stats.times),
        "median_step_cpu_ms": 1e3 * statistics.median(stats.cpu_times[5:] or stats.cpu_times),
        "first_step_max_weight_change": stats.first_step_max_change,
        "seconds": seconds,
        "lr_multipliers": {t: dict(m) for t, m in rules[0].multipliers.items()} if rules else None,
    }


def classifier_score(run: dict[str, Any]) -> tuple[float, float]:
    if run["diverged"] or not finite(run["val_acc"]):
        return (math.inf, math.inf)
    return (-run["val_acc"], run["val_loss"])


def aggregate_classifier(block: dict[str, Any]) -> dict[str, Any]:
    runs = block["runs"]
    ok = [r for r in runs if not r["diverged"]]
    out = {
        k: summary([r[k] if not r["diverged"] else None for r in runs])
        for k in ("val_acc", "val_loss", "train_loss", "first_step_max_weight_change")
    }
    out["median_step_ms"] = summary([r["median_step_ms"] for r in runs])
    out["median_step_cpu_ms"] = summary([r["median_step_cpu_ms"] for r in runs])
    out["diverged"] = len(runs) - len(ok)
    out["worse_than_uniform"] = sum(r["train_loss_worse_than_uniform"] for r in ok)
    if runs and runs[0]["lr_multipliers"] is not None:
        out["lr_multipliers"] = {
            t: summary([r["lr_multipliers"][t]["lr"] for r in runs]) for t in runs[0]["lr_multipliers"]
        }
    return out


def part_classifier(name: str, seeds: Sequence[int], quick: bool, steps: int, batch_size: int) -> dict[str, Any]:
    data = DATASETS[name]
    if name == "fmnist" and not fashion_mnist_available():
        reason = "the Fashion-MNIST files are missing (apt-get install dataset-fashion-mnist, or NL_FASHION_MNIST_ROOT)"
        log(f"skipping {name}: {reason}")
        return {"skipped": reason}
    run = partial(run_classifier, data, steps, batch_size)
    results = tune_and_run(CLASSIFIER_METHODS, seeds, quick, run, classifier_score, name)
    for block in results.values():
        block["aggregate"] = aggregate_classifier(block)
    setting = {
        "title": data.title,
        "model": f"MLPClassifier {data.in_features}-128-128-10 (GELU)",
        "data": data.description,
        "steps": steps,
        "batch_size": batch_size,
        "validation": "once, after the last step",
        "selection": "highest val_acc of the first seed (ties: lower val_loss)",
    }
    return {"setting": setting, "methods": results}


LM_GRID = (1e-3, 3e-3, 1e-2)
LM_METHODS: dict[str, Method] = {
    "adamw": Method(_adamw, LM_GRID, note="AdamW (the LM's groups: weight decay 0.1 on matrices, 0 elsewhere)"),
    "muon_dmgd_h0": Method(partial(_dmgd, hidden=0), (0.01, 0.02, 0.05, 0.1, 0.2), note="DMGD Newton-Schulz, hidden 0"),
    "m3": Method(_m3, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), note="M3 defaults (EMA form, eps 1e-4, slow_every 100)"),
    "adamw_hypergradient": Method(_adamw, LM_GRID, rule="hypergradient", note="AdamW + HypergradientRule()"),
    "adamw_surprise": Method(_adamw, LM_GRID, rule="surprise", note="AdamW + ScheduledRule(surprise, reference 1.0)"),
}
LM_SETTING = {"dim": 64, "depth": 2, "heads": 4, "seq_len": 128, "batch_size": 8, "warmup_steps": 20}


def run_charlm(steps: int, method: Method, lr: float, seed: int) -> dict[str, Any]:
    """A byte-level Transformer++ on the default text corpus, ``steps`` steps; validation once at the end."""
    pl.seed_everything(seed, verbose=False)
    cfg = LM_SETTING
    dm = TextDataModule(seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], samples_per_epoch=steps * 8, seed=seed)
    model = TransformerPP(
        vocab_size=256,
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
        warmup_steps=cfg["warmup_steps"],
        max_steps_schedule=steps,
        optimizer=partial(method.build, lr=lr, seed=seed),
    )
    stats, rules = StepStats(), _rule(method.rule)
    start = time.perf_counter()
    with quiet(io.StringIO()):
        trainer = make_trainer(steps, [stats, *rules])
        trainer.fit(model, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val_bpc", "val_loss")}
    train_loss = statistics.fmean(stats.losses[-20:]) if stats.losses else None
    diverged = not all(finite(v) for v in [metrics.get("val_bpc"), train_loss, *stats.losses])
    return {
        "lr": lr,
        "seed": seed,
        "steps": trainer.global_step,
        "diverged": diverged,
        "val_bpc": metrics.get("val_bpc"),
        "train_loss_last20": train_loss,
        "median_step_ms": 1e3 * statistics.median(stats.times[5:] or stats.times),
        "median_step_cpu_ms": 1e3 * statistics.median(stats.cpu_times[5:] or stats.cpu_times),
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lr_multipliers": {t: dict(m) for t, m in rules[0].multipliers.items()} if rules else None,
    }


def charlm_score(run: dict[str, Any]) -> tuple[float]:
    return (math.inf,) if run["diverged"] or not finite(run["val_bpc"]) else (run["val_bpc"],)


def part_charlm(seeds: Sequence[int], quick: bool, steps: int) -> dict[str, Any]:
    results = tune_and_run(LM_METHODS, seeds, quick, partial(run_charlm, steps), charlm_score, "charlm")
    for block in results.values():
        runs = block["runs"]
        agg = {k: summary([None if r["diverged"] else r[k] for r in runs]) for k in ("val_bpc", "train_loss_last20")}
        agg["median_step_ms"] = summary([r["median_step_ms"] for r in runs])
        agg["median_step_cpu_ms"] = summary([r["median_step_cpu_ms"] for r in runs])
        agg["diverged"] = sum(r["diverged"] for r in runs)
        if runs[0]["lr_multipliers"] is not None:
            agg["lr_multipliers"] = {
                t: summary([r["lr_multipliers"][t]["lr"] for r in runs]) for t in runs[0]["lr_multipliers"]
            }
        block["aggregate"] = agg
    setting = {
        "model": "TransformerPP {dim}x{depth}, {heads} heads, byte-level".format(**LM_SETTING),
        "data": "TextDataModule default corpus (pydoc_data.topics), seq_len {seq_len}, batch {batch_size}".format(
            **LM_SETTING
        ),
        "steps": steps,
        "schedule": f"CausalLM warm-up {LM_SETTING['warmup_steps']} steps then cosine to 10 % at the last step",
        "selection": "lowest val_bpc of the first seed",
    }
    return {"setting": setting, "methods": results}


def charlm_markdown(part: dict[str, Any]) -> list[str]:
    s = part["setting"]
    lines = [
        "## 5. Character (byte-level) language model",
        "",
        f"{s['model']}, {s['data']}, {s['steps']} steps; {s['schedule']} for every optimizer; lr chosen by"
        f" {s['selection']}. Validation bits per byte on the held-out tail, once after the last step; train loss: the"
        " mean of the last 20 steps (nats). Mean ± std over seeds.",
        "",
        "| method | lr (grid) | val bpc | train loss | ms/step [CPU] | final lr multiplier |",
        "|---|---|---|---|---|---|",
    ]
    for name, block in part["methods"].items():
        agg = block["aggregate"]
        grid = ", ".join(f"{v:g}" for v in block["grid"])
        mults = agg.get("lr_multipliers")
        mult = "; ".join(f"{t} {cell(v, '.3g')}" for t, v in mults.items()) if mults else DASH
        flag = f" ({agg['diverged']} diverged)" if agg["diverged"] else ""
        lines.append(
            f"| {name}{flag} | {block['chosen_lr']:g} ({grid}) | {cell(agg['val_bpc'], '.3f')} |"
            f" {cell(agg['train_loss_last20'])} | {cell(agg['median_step_ms'], '.2f')}"
            f" [{cell(agg['median_step_cpu_ms'], '.2f')}] | {mult} |"
        )
    bpc = ranked({n: b["aggregate"]["val_bpc"]["mean"] for n, b in part["methods"].items()})
    lines += ["", "Methods: " + "; ".join(f"`{n}`: {m.note}" for n, m in LM_METHODS.items()) + "."]
    if bpc:
        lines += ["", "- charlm: val bpc from best to worst: " + ", ".join(f"{n} {v:.3f}" for n, v in bpc) + "."]
    return lines


# ---------------------------------------------------------------------------------------------------- report
def grid_text(grid: dict[str, list[float]]) -> str:
    return " × ".join(f"{k} {{{', '.join(f'{v:g}' for v in values)}}}" for k, values in grid.items())


def jitter_cell(best: dict[str, Any]) -> str:
    j = best["jittered"]
    if j["median"] is None:
        return f"none reached (0/{j['n']})"
    worst = "not reached" if j["n_defined"] < j["n"] else f"{j['max']:.0f}"
    return f"{j['median']:.0f} [{j['min']:.0f}, {worst}] ({j['n_defined']}/{j['n']})"


def surface_markdown(part: dict[str, Any]) -> list[str]:
    s = part["setting"]
    lines = [
        "## 1. 2-D surface (A Fig. 4)",
        "",
        f"ψ(r, θ) = r² + κ(r − θ + a sin(ωr))², κ = {s['kappa']}, a = {s['amp']}, ω = {s['omega']}, start "
        f"{tuple(s['start'])}, float64, closed-form gradient. Score: steps until ψ < {s['threshold']:g} (cap"
        f" {s['cap']}). The grid runs once from the start; its {s['finalists']} fastest settings run again from"
        f" {s['jittered_starts']} starts moved by at most {s['jitter']:g} per coordinate (a momentum method's count"
        " is sensitive to such changes, as to round-off), and the best setting is the one with the lowest median"
        " over those starts.",
        "",
        "| optimizer | best setting | steps from (2, −2) | steps, jittered starts: median [min, max] (reached)"
        " | final ψ | grid settings reaching 1e-6 | their median steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in part["optimizers"].items():
        b = r["best"]
        hp = ", ".join(f"{k} {v:g}" for k, v in b["hp"].items())
        steps = str(b["steps"]) if b["steps"] is not None else ("diverged" if b["diverged"] else "not reached")
        lines.append(
            f"| {name} | {hp} | {steps} | {jitter_cell(b)} | {num(b['final_psi'])} | "
            f"{r['n_reached']}/{r['n_settings']} | {num(r['median_steps_of_reached'], 'g')} |"
        )
    chk = part["delta0_check"]
    lines += [
        "",
        "- Grids: " + "; ".join(f"{n}: {grid_text(r['grid'])}" for n, r in part["optimizers"].items()) + ".",
        f"- Check: DeltaMomentum with delta 0 at heavy-ball's best setting "
        f"{'retraces heavy-ball exactly' if chk['identical_to_heavy_ball'] else 'DIFFERS from heavy-ball'} "
        f"(steps {chk['steps']}).",
        f"- M3 {part['m3']}",
    ]
    return lines


def align_steps_cell(a: dict[str, Any]) -> str:
    """Mean steps to 0.9 alignment over the switches that got there (mean ± std over seeds), and how many did."""
    count = f"({a['switches_aligned']}/{a['switches']})"
    entry = a["mean_steps_to_align"]
    if not a["switches_aligned"] or entry["mean"] is None:
        return f"never {count}"
    spread = "" if entry["std"] is None else f" ± {entry['std']:.1f}"
    return f"{entry['mean']:.1f}{spread} {count}"


def regression_markdown(part: dict[str, Any]) -> list[str]:
    s = next(iter(part["regimes"].values()))["setting"]
    lengths = " and ".join(part["regimes"])
    tuned = " (each length tuned on its own)" if len(part["regimes"]) > 1 else ""
    first = next(iter(part["regimes"].values()))["methods"]
    initial = next(iter(first.values()))["aggregate"]["initial_mean_loss"]
    lines = [
        "## 2. Orthogonal-task continual regression (A §4.3)",
        "",
        " ".join(
            [
                f"K = {s['tasks']} tasks in d = {s['dim']}, each along its own direction u_i of an orthonormal basis;",
                f"W a ({s['outputs']}, {s['dim']}) matrix from 0; batch {s['batch']}; noise σ = {s['sigma']} only in",
                "the complement of span(u_1..u_K), so plain SGD cannot interfere across tasks.",
                f"{lengths} steps per task{tuned}, then task 1 again (≤ {s['relearn_steps']} steps).",
                "Loss of task j: ‖W u_j − t_j‖², exact (the shared noise term σ²‖W P⊥‖² is in the JSON); at W = 0",
                f"the mean over tasks is {cell(initial)}.",
                "final = mean over tasks after task K; learning = mean of each task's loss just after its own",
                "training; forgetting = final − best earlier loss (mean over tasks 1..K−1); re-learn = steps on task 1",
                "until its loss is at most its value just after it was first learned plus 1% of its initial loss.",
                "Alignment ‖P_u m‖/‖m‖ of the named tensor, averaged over the K−1 task switches: with the previous",
                "direction 1 step after the switch (prev @+1), with the new one 5 steps after (cur @+5), steps until",
                "≥ 0.9 with the new one (mean over the switches that get there; (k/n): how many did), and the mean",
                "share of each *update* ΔW inside the span of all earlier tasks. Mean ± std over seeds.",
            ]
        ),
        "",
        "| steps/task | method | lr (grid) | final loss | learning loss | forgetting | re-learn steps | tensor |"
        " prev @+1 | cur @+5 | steps to 0.9 | ΔW in old span |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for steps, regime in part["regimes"].items():
        for name, block in regime["methods"].items():
            lines += regression_rows(steps, name, block)
    lines += ["", "Methods: " + "; ".join(f"`{n}`: {m.note}" for n, m in REGRESSION_METHODS.items()) + "."]
    return lines


def regression_rows(steps: str, name: str, block: dict[str, Any]) -> list[str]:
    agg = block["aggregate"]
    grid = ", ".join(f"{v:g}" for v in block["grid"])
    rows = []
    for i, buf in enumerate(REGRESSION_METHODS[name].buffers or ("update",)):
        a, u = agg[f"align_{buf}"], agg["align_update"]
        head = (
            f"| {steps} | {name} | {block['chosen_lr']:g} ({grid}) | {cell(agg['final_mean_loss'])} | "
            f"{cell(agg['learning_loss'])} | {cell(agg['forgetting'])} | {cell(agg['relearn_steps'], '.0f')} |"
            if i == 0
            else "| ″ | ″ | | | | | |"
        )
        label = "ΔW" if buf == "update" else f"`{buf}`"
        rows.append(
            f"{head} {label} | {cell(a['previous_at_+1'], '.2f', 'zero')} | {cell(a['current_at_+5'], '.2f', 'zero')}"
            f" | {align_steps_cell(a)} | {cell(u['mean_in_old_span'], '.2f', 'zero')} |"
        )
    return rows


def classifier_markdown(number: int, name: str, part: dict[str, Any]) -> list[str]:
    if "skipped" in part:
        return [f"## {number}. {DATASETS[name].title}", "", f"Skipped: {part['skipped']}."]
    s = part["setting"]
    lines = [
        f"## {number}. {s['title']}",
        "",
        f"{s['model']}, {s['data']}, {s['steps']} steps of batch {s['batch_size']} through Lightning's Trainer;"
        f" lr chosen by {s['selection']}. Train loss: cross-entropy over the whole training split after training."
        " ms/step: median wall time of a training step (1 thread; other load on the machine inflates it), and in"
        " brackets the median CPU time of this process per step (less sensitive to other load). max |Δw| step 1:"
        " the largest weight change of the first step. Mean ± std over seeds.",
        "",
        "| method | lr (grid) | val acc | val loss | train loss | ms/step [CPU] | max \\|Δw\\| step 1 | final lr"
        " multiplier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, block in part["methods"].items():
        agg = block["aggregate"]
        grid = ", ".join(f"{v:g}" for v in block["grid"])
        mults = agg.get("lr_multipliers")
        mult = "; ".join(f"{t} {cell(v, '.3g')}" for t, v in mults.items()) if mults else DASH
        flags = []
        if agg["diverged"]:
            flags.append(f"{agg['diverged']} diverged")
        if agg["worse_than_uniform"]:
            flags.append(f"{agg['worse_than_uniform']} with train loss > ln 10")
        flag = f" ({', '.join(flags)})" if flags else ""
        lines.append(
            f"| {name}{flag} | {block['chosen_lr']:g} ({grid}) | {cell(agg['val_acc'], '.4f')} | "
            f"{cell(agg['val_loss'])} | {cell(agg['train_loss'])} | {cell(agg['median_step_ms'], '.2f')}"
            f" [{cell(agg['median_step_cpu_ms'], '.2f')}] | "
            f"{cell(agg['first_step_max_weight_change'])} | {mult} |"
        )
    lines += ["", "Methods: " + "; ".join(f"`{n}`: {m.note}" for n, m in CLASSIFIER_METHODS.items()) + "."]
    return lines


def regression_reading(steps: str, agg: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    final = ranked({n: a["final_mean_loss"]["mean"] for n, a in agg.items()})
    forget = ranked({n: a["forgetting"]["mean"] for n, a in agg.items()})
    if final:
        lines.append(
            f"- Regression, {steps} steps/task: final mean loss from lowest to highest: "
            + ", ".join(f"{n} {v:.3g}" for n, v in final)
            + f"; least forgetting {forget[0][0]} ({forget[0][1]:.3g}), most {forget[-1][0]} ({forget[-1][1]:.3g})."
        )
    learned = ranked({n: a["learning_over_initial"]["mean"] for n, a in agg.items()})
    if learned:
        lines.append(
            f"- Regression, {steps} steps/task: learning loss as a fraction of the untrained loss (W = 0), lowest"
            " first (near 1: the method did not learn the tasks, so its forgetting says little): "
            + ", ".join(f"{n} {v:.3g}" for n, v in learned)
            + "."
        )
    stale = {
        n: a[f"align_{REGRESSION_METHODS[n].buffers[0]}"]["previous_at_+1"]["mean"]
        for n, a in agg.items()
        if REGRESSION_METHODS[n].buffers
    }
    if stale:
        lines.append(
            f"- Regression, {steps} steps/task: share of the buffer still along the previous task's direction one step"
            " after a switch: " + ", ".join(f"{n} {v:.2f}" for n, v in ranked(stale)) + "."
        )
    leak = ranked({n: a["align_update"]["mean_in_old_span"]["mean"] for n, a in agg.items()})
    if leak:
        lines.append(
            f"- Regression, {steps} steps/task: mean share of an update inside the span of earlier tasks (0 for plain"
            " SGD by design): " + ", ".join(f"{n} {v:.2f}" for n, v in leak) + "."
        )
    return lines


def reading(report: dict[str, Any]) -> list[str]:
    """Plain-English sentences generated from the measured numbers (no claim is written by hand)."""
    lines = ["## Reading (generated from the numbers above)", ""]
    parts = report["parts"]
    if "surface" in parts:
        opts = parts["surface"]["optimizers"]
        steps = {n: r["best"]["steps"] for n, r in opts.items()}
        reached = ranked({n: float(v) for n, v in steps.items() if v is not None})
        missing = [n for n, v in steps.items() if v is None]
        text = "- Surface, from (2, −2): " + ", ".join(f"{n} reached ψ < 1e-6 in {v:.0f} steps" for n, v in reached)
        if missing:
            text += f"; {', '.join(missing)} did not within the cap"
        medians = {n: r["best"]["jittered"]["median"] for n, r in opts.items()}
        if medians:
            text += "; median over the jittered starts: " + ", ".join(
                f"{n} {num(v, '.0f')}" for n, v in medians.items()
            )
        hb, dm = medians.get("heavy_ball"), medians.get("delta_momentum")
        if hb and dm:
            text += f"; tuned delta momentum needed {dm / hb:.2f}× the steps of tuned heavy-ball (medians)"
        lines.append(text + ".")
    if "regression" in parts:
        for steps, regime in parts["regression"]["regimes"].items():
            lines += regression_reading(steps, {n: b["aggregate"] for n, b in regime["methods"].items()})
    for name in ("digits", "fmnist"):
        if name in parts and "methods" in parts[name]:
            lines += classifier_reading(name, {n: b["aggregate"] for n, b in parts[name]["methods"].items()})
    return lines


def classifier_reading(name: str, agg: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    acc = ranked({n: a["val_acc"]["mean"] for n, a in agg.items()}, reverse=True)
    if acc:
        lines.append(f"- {name}: validation accuracy from best to worst: " + ", ".join(f"{n} {v:.4f}" for n, v in acc))
    speed = ranked({n: a["median_step_cpu_ms"]["mean"] for n, a in agg.items()})
    base = agg.get("adamw", {}).get("median_step_cpu_ms", {}).get("mean")
    if speed and base:
        lines.append(
            f"- {name}: CPU time per step relative to AdamW: " + ", ".join(f"{n} {v / base:.2f}×" for n, v in speed)
        )
    bad = [n for n, a in agg.items() if a["diverged"] or a["worse_than_uniform"]]
    if bad:
        lines.append(f"- {name}: runs that diverged or ended above the uniform-guess loss ln 10: {', '.join(bad)}")
    return [line + "." for line in lines]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Deep optimizers on the paper's toy experiments",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['timestamp']}; nl_lightning {env['nl_lightning']}, torch {env['torch']}, lightning "
        f"{env['lightning']}, Python {env['python']}, {env['cpu_count']} CPU core(s), {report['threads']} torch "
        f"thread(s); seeds {' '.join(map(str, report['seeds']))}; total {report['wall_s']:.0f} s.",
    ]
    builders = {"surface": surface_markdown, "regression": regression_markdown, "charlm": charlm_markdown}
    for number, (name, part) in enumerate(report["parts"].items(), 1):
        body = builders[name](part) if name in builders else classifier_markdown(number, name, part)
        if name in builders:
            body[0] = f"## {number}. " + body[0].split(". ", 1)[1]
        lines += ["", *body, "", f"Part time: {report['part_seconds'][name]:.0f} s."]
    lines += ["", *reading(report)]
    return "\n".join(lines) + "\n"


def environment(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "nl_lightning": nl_lightning.__version__,
        "torch_num_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "optimizer_sources": optimizer_sources(),
    }


def optimizer_sources() -> dict[str, dict[str, str]]:
    """sha256 and modification time of the optimizers' and rules' source files (edited while this was written)."""
    root = Path(nl_lightning.__file__).parent
    files = sorted((root / "optim").glob("*.py"))
    files += [root / "callbacks" / f"{name}.py" for name in ("self_modifying", "hypergradient", "scheduled_rule")]
    return {str(path.relative_to(root.parent)): sha256_of(str(path)) for path in files}


# ---------------------------------------------------------------------------------------------------- driver
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        help="surface, regression, digits, fmnist, charlm (default: all; fmnist is skipped without its files); also"
        " comma-separated",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (0 with --quick); the first one tunes")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument(
        "--steps-per-task", type=int, nargs="+", default=[20, 100], help="regression: task lengths to run (20 100)"
    )
    parser.add_argument("--relearn-steps", type=int, default=300, help="regression: budget to re-learn task 1 (300)")
    parser.add_argument("--steps", type=int, default=600, help="digits, fmnist: optimizer steps per run (600)")
    parser.add_argument("--batch-size", type=int, default=32, help="digits, fmnist: batch size (32)")
    parser.add_argument("--lm-steps", type=int, default=400, help="charlm: optimizer steps per run (400)")
    parser.add_argument("--out", help="write the JSON here (the Markdown then goes to stdout)")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-point grids, short runs, seed 0")
    args = parser.parse_args(argv)
    parts = [p for item in args.parts for p in item.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {list(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    args.seeds = list(dict.fromkeys(args.seeds or ([0] if args.quick else [0, 1, 2])))
    if args.quick:
        args.steps_per_task, args.relearn_steps, args.steps, args.lm_steps = [10], 60, 60, 40
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = report_header(
        "deep optimizers on the paper's toy experiments",
        "benchmarks/optimizers.py",
        argv,
        vars(args),
        environment(args.threads),
    )
    report.update(threads=args.threads, seeds=args.seeds)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "surface": lambda: part_surface(args.quick),
        "regression": lambda: part_regression(args.seeds, args.quick, args.steps_per_task, args.relearn_steps),
        "digits": lambda: part_classifier("digits", args.seeds, args.quick, args.steps, args.batch_size),
        "fmnist": lambda: part_classifier("fmnist", args.seeds, args.quick, args.steps, args.batch_size),
        "charlm": lambda: part_charlm(args.seeds, args.quick, args.lm_steps),
    }
    run_parts(report, {name: runners[name] for name in args.parts}, log)
    return emit(report, started, markdown, args.out, args.markdown, log)


if __name__ == "__main__":
    main()
