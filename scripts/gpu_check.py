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
r"""
GPU check
^^^^^^^^^

One run on one CUDA device that checks what the CPU test suite cannot, and measures the GPU recipes. Normally started
by ``bash scripts/gpu_check.sh``; ``--cpu-dry-run`` runs every section on the CPU at tiny sizes, with the CUDA-only
parts replaced by their CPU counterparts, so that the script itself is tested without a GPU
(``tests/test_gpu_check_script.py``).

Sections (``--sections``, all three by default; each can run alone):

``precision``
    :class:`~nl_lightning.callbacks.MultiFrequencyUpdates` on a tiny classifier (``net.0.*`` every 3 steps,
    ``net.2.weight`` every 2, ``net.2.bias`` every step; AdamW) against a plain PyTorch reference loop that takes one
    step per chunk on the mean of the chunk's gradients (the loop of ``tests/helpers.py``, run on the device):
    ``bf16-mixed``; ``16-mixed`` with a ``torch.amp.GradScaler`` (``"cuda"``) and an overflow injected at steps 3 and
    8, which must be skipped with the level clocks unchanged; ``16-mixed`` with the scaler the Trainer makes itself;
    ``AdamW(fused=True)`` under ``bf16-mixed``; and ``AdamW(fused=True)`` under ``16-mixed``, which must be refused.
``strategies``
    The same comparison on one device through
    ``Trainer(strategy=nl_lightning.strategies.NestedDDPStrategy(), devices=1)`` (``bf16-mixed``, and ``16-mixed``
    with the injected overflow) and through FSDP2: ``Trainer(strategy=ModelParallelStrategy(1, 1), devices=1)`` with
    ``fully_shard`` applied in ``configure_model`` (``bf16-mixed``). A check whose strategy cannot be imported is
    recorded as ``unavailable``, with the error.
``recipes``
    Each ``nl_lightning/recipes/gpu_text_*.yaml``, built from its YAML (``class_path`` / ``init_args``; the
    ``trainer`` keys other than logging, validation, checkpointing and the step count are kept), trained for
    ``--steps`` (200) optimizer steps without validation. Reported per recipe: tokens per second (the median
    step-to-step interval after ``--warmup`` steps, the device synchronised at each step end), the peak of
    ``torch.cuda.max_memory_allocated``, the FLOPs of one training step (forward, backward and optimizer step) counted
    by ``torch.utils.flop_counter.FlopCounterMode`` (matmul-type operations and ``scaled_dot_product_attention``, full
    attention counted as the counter does), and the model-FLOPs utilisation: those FLOPs / the median step time / the
    device's peak dense bf16 rate, taken from :data:`PEAK_BF16_TFLOPS` by device name (or ``--peak-tflops``); on an
    unknown device the utilisation is ``null`` and the JSON says why. A recipe stops early, with
    ``stopped_by_time_limit: true``, when its fit runs longer than ``--recipe-time-limit`` seconds.

Every check is recorded in ``<out>/gpu_check.json`` (rewritten after each check) with its figures and a ``status``:
``pass``, ``fail`` (it ran and a criterion failed: ``failures`` lists which), ``error`` (it raised: the error is
recorded) or ``unavailable`` (what it needs cannot be imported). The exit status is 0 when every check passed, 1 when
one failed or raised, 2 when none failed but one was unavailable, 3 when torch sees no CUDA device (without
``--cpu-dry-run``).

Example::

    python scripts/gpu_check.py --out benchmarks/results/gpu_check
    python scripts/gpu_check.py --sections precision --out /tmp/check
    python scripts/gpu_check.py --cpu-dry-run --out /tmp/dry

"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
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
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):  # run from a checkout without installing the package; the test helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

SECTIONS = ("precision", "strategies", "recipes")
STATUSES = ("pass", "fail", "error", "unavailable")
RECIPES_DIR = REPO / "nl_lightning" / "recipes"
RECIPE_GLOB = "gpu_text_*.yaml"
TOLERANCE = 1e-6  # max |callback - reference| over all parameters; exactness itself is recorded too

#: Peak dense (no sparsity) bf16 Tensor Core rates, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``; the
#: first match wins, so the more specific names come first. NVIDIA's datasheets print the rates with 2:4 sparsity;
#: the dense rate is half of that. The NVL boards have no rate here (``None``): the check then reports no utilisation
#: rather than borrow the SXM rate.
PEAK_BF16_TFLOPS: tuple[tuple[str, Optional[float], str], ...] = (
    ("H100 NVL", None, "no rate recorded for the H100 NVL"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet: BF16 Tensor Core 1,513 TFLOPS with sparsity (H100 PCIe)"),
    ("H100", 989.5, "NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (H100 SXM)"),
    ("H200 NVL", None, "no rate recorded for the H200 NVL"),
    ("H200", 989.5, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (H200 SXM)"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)"),
)


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- outcomes
class Unavailable(Exception):
    """What a check needs cannot be imported; the check is recorded as ``unavailable``, not as a pass."""


def import_symbol(module: str, name: str) -> Any:
    """``module.name``, or :class:`Unavailable` naming the import error."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"cannot import {name} from {module}: {type(err).__name__}: {err}") from err


class Expect:
    """Collects the figures of one check and the criteria it failed."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.failures: list[str] = []

    def that(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


def run_check(fn: Callable[[Expect], None]) -> dict[str, Any]:
    """Run one check: its figures, ``status`` and ``seconds``; warnings raised inside are recorded, not printed."""
    expect, t0 = Expect(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn(expect)
            status = "fail" if expect.failures else "pass"
            error = None
        except Unavailable as err:
            status, error = "unavailable", str(err)
        except Exception as err:  # noqa: BLE001 - a check that raises is recorded, the others still run
            status, error = "error", f"{type(err).__name__}: {err}"
            expect.figures["traceback"] = traceback.format_exc().splitlines()[-40:]
    out: dict[str, Any] = {"status": status, **expect.figures}
    if expect.failures:
        out["failures"] = expect.failures
    if error is not None:
        out["error"] = error
    seen = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})
    if seen:
        out["warnings"] = seen[:20]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def section_status(checks: dict[str, dict[str, Any]]) -> str:
    """``fail`` if a check failed or raised, else ``unavailable`` if one was, else ``pass``."""
    statuses = {c["status"] for c in checks.values()}
    if statuses & {"fail", "error"}:
        return "fail"
    if "unavailable" in statuses:
        return "unavailable"
    return "pass"


def exit_code(report: dict[str, Any]) -> int:
    """0 when every check passed, 1 when one failed or raised, 2 when none failed but one was unavailable."""
    statuses = {section_status(s["checks"]) for s in report["sections"].values()}
    if "fail" in statuses:
        return 1
    if "unavailable" in statuses:
        return 2
    return 0


# --------------------------------------------------------------------------------------------------- device
class Target:
    """Where the checks run: CUDA, or the CPU in a dry run (tiny sizes, CPU counterparts of the CUDA-only parts)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.accelerator = "cpu" if dry_run else "cuda"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def trainer_kwargs(self, root: str) -> dict[str, Any]:
        return dict(
            default_root_dir=root,
            accelerator=self.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )


def peak_bf16_tflops(device_name: Optional[str], override: Optional[float] = None) -> tuple[Optional[float], str]:
    """The peak dense bf16 rate (TFLOP/s) used for the model-FLOPs utilisation, and where it comes from.

    Args:
        device_name: ``torch.cuda.get_device_name()``; ``None`` on the CPU.
        override: A rate given on the command line (``--peak-tflops``), which wins.

    Returns:
        ``(tflops, source)``; ``tflops`` is ``None`` when :data:`PEAK_BF16_TFLOPS` has no rate for the device.

    Example::

        peak_bf16_tflops("NVIDIA H100 80GB HBM3")  # (989.5, 'NVIDIA H100 datasheet: ...')

    """
    if override is not None:
        return float(override), "--peak-tflops on the command line"
    if device_name is None:
        return None, "unknown device: the CPU (a dry run); no peak rate, so no utilisation"
    known = ", ".join(key for key, tflops, _ in PEAK_BF16_TFLOPS if tflops is not None)
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            if tflops is None:
                return None, f"unknown rate for {device_name!r}: {source}; pass --peak-tflops to get a utilisation"
            return tflops, source
    return None, f"unknown device {device_name!r} (known: {known}); pass --peak-tflops to get a utilisation"


def environment(target: Target) -> dict[str, Any]:
    import lightning

    import nl_lightning

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "nl_lightning": nl_lightning.__version__,
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if target.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "multiprocessors": props.multi_processor_count,
            "total_memory_bytes": props.total_memory,
        }
    else:
        env["device"] = {"name": None, "type": "cpu", "threads": torch.get_num_threads()}
    return env


# --------------------------------------------------------------------------------------------------- tiny net
# The test suite's tiny classifier, its data and optimizers (tests/helpers.py): the CUDA checks run the CPU tests'
# setup on the GPU. `make_optimizer(..., "fused_adamw")` is AdamW(lr=0.05, fused=True).
from helpers import BATCH, TinyNet, make_data, make_optimizer  # noqa: E402

LEVELS_SPEC = {"slow": (["net.0.*"], 3), "mid": (["net.2.weight"], 2)}
PERIODS = {"net.0.weight": 3, "net.0.bias": 3, "net.2.weight": 2}


def make_levels() -> list[Any]:
    from nl_lightning import Level

    return [Level(name, globs, every=every) for name, (globs, every) in LEVELS_SPEC.items()]


class ShardedTinyNet(TinyNet):
    """:class:`TinyNet` that applies FSDP2's ``fully_shard`` to each linear layer and the stack in ``configure_model``
    (as ``ModelParallelStrategy`` requires); parameter names do not change."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded = True


def full(t: Tensor) -> Tensor:
    """A plain tensor on the CPU: the whole of a sharded (DTensor) parameter, a copy of any other."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().clone()


def batches(device: torch.device, epochs: int = 100) -> Iterator[Any]:
    """The batches a Trainer sees, epoch after epoch (no shuffling), on ``device``."""
    for _ in range(epochs):
        for x, y in DataLoader(make_data(), batch_size=BATCH, shuffle=False):
            yield x.to(device), y.to(device)


def reference_fit(
    model: TinyNet,
    steps: int,
    device: torch.device,
    optimizer: str,
    autocast_dtype: Optional[torch.dtype],
    scaler: Optional[torch.amp.GradScaler] = None,
    inf_calls: Sequence[int] = (),
) -> dict[str, list[int]]:
    """Plain PyTorch (``tests/helpers.py``'s ``reference_fit`` on ``device``): a parameter of period C steps once per
    C committed steps, on the mean of its C gradients; a step the scaler skips is not committed. Returns, per
    parameter, the steps (1-based) at which it moved."""
    model.to(device)
    opt = make_optimizer(optimizer, model.parameters())
    data = batches(device)
    held: dict[str, list[Tensor]] = {n: [] for n in PERIODS}
    moved: dict[str, list[int]] = {n: [] for n, _ in model.named_parameters()}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        batch = next(data)
        if autocast_dtype is None:
            loss = model.loss(batch)
        else:
            with torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False):
                loss = model.loss(batch)
        loss = loss * math.inf if step in inf_calls else loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        if finite:
            for name, p in model.named_parameters():
                period = PERIODS.get(name, 1)
                if period == 1:
                    continue
                held[name].append(p.grad.clone())
                if len(held[name]) == period:
                    p.grad = sum(held[name]) / period
                    held[name] = []
                else:
                    p.grad = None
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        for n, p in model.named_parameters():
            if not torch.equal(before[n], p.detach()):
                moved[n].append(step)
    return moved


class Spy(Callback):
    """Per training batch: which parameters moved, and the level clocks (commit counts, updates) after it."""

    def __init__(self, mfu: Any) -> None:
        self.mfu = mfu
        self.moved: dict[str, list[int]] = {}
        self.counts: list[dict[str, int]] = []
        self.updates: list[dict[str, int]] = []
        self._before: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._before = {n: full(p) for n, p in pl_module.named_parameters()}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = len(self.counts) + 1
        for n, p in pl_module.named_parameters():
            if not torch.equal(self._before[n], full(p)):
                self.moved.setdefault(n, []).append(step)
        self.counts.append(dict(self.mfu.book.counts))
        self.updates.append(dict(self.mfu.num_updates))


def equivalence(
    expect: Expect,
    target: Target,
    *,
    precision: str,
    steps: int,
    optimizer: str = "adamw",
    scaler_init: Optional[float] = None,
    inf_calls: Sequence[int] = (),
    strategy: Any = None,
    sharded: bool = False,
    expected_slow: Optional[list[int]] = None,
    expected_updates: Optional[dict[str, int]] = None,
) -> None:
    """Fit :class:`TinyNet` with ``MultiFrequencyUpdates`` and compare it with :func:`reference_fit`.

    ``precision="16-mixed"`` uses a ``torch.amp.GradScaler`` on the target's device: one made here with ``scaler_init``
    (passed to the Trainer through ``MixedPrecision``), or with ``scaler_init=None`` on CUDA the one the Trainer makes
    itself (on the CPU, where the Trainer would turn 16-mixed into bf16-mixed, a default ``GradScaler("cpu")``).
    """
    from nl_lightning.callbacks import MultiFrequencyUpdates

    model = (ShardedTinyNet if sharded else TinyNet)(optimizer=optimizer, inf_calls=inf_calls)
    reference = copy.deepcopy(model)
    reference.inf_calls = set()
    mfu = MultiFrequencyUpdates(make_levels())
    spy = Spy(mfu)
    device = target.device
    plugins, scaler, trainer_precision = [], None, precision
    ref_scaler, autocast_dtype = None, {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if precision == "16-mixed":
        if scaler_init is not None or device.type == "cpu":
            scaler = torch.amp.GradScaler(device.type, **({} if scaler_init is None else {"init_scale": scaler_init}))
            plugins, trainer_precision = [MixedPrecision("16-mixed", device.type, scaler=scaler)], None
        ref_scaler = torch.amp.GradScaler(device.type, **({} if scaler_init is None else {"init_scale": scaler_init}))
    kwargs: dict[str, Any] = {"max_steps": steps, "plugins": plugins}
    if trainer_precision is not None:
        kwargs["precision"] = trainer_precision
    if strategy is not None:
        kwargs.update(strategy=strategy, use_distributed_sampler=False)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as root:
        trainer = Trainer(callbacks=[mfu, spy], **target.trainer_kwargs(root), **kwargs)
        trainer.fit(model)
    if scaler is None and precision == "16-mixed":
        scaler = trainer.precision_plugin.scaler
    ref_moved = reference_fit(reference, steps, device, optimizer, autocast_dtype, ref_scaler, inf_calls)

    diffs = [
        float((full(a) - full(b)).abs().max())
        for (_, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True)
    ]
    fig = expect.figures
    fig.update(
        precision=precision,
        optimizer=optimizer,
        strategy=type(trainer.strategy).__name__,
        steps=steps,
        global_step=trainer.global_step,
        max_abs_diff=max(diffs),
        bitwise_equal=max(diffs) == 0.0,
        tolerance=TOLERANCE,
        moved={"callback": spy.moved, "reference": {n: v for n, v in ref_moved.items() if v}},
        num_updates=dict(mfu.num_updates),
        skipped_steps=[s for s in range(1, steps + 1) if s not in spy.moved.get("net.2.bias", [])],
    )
    expect.that(trainer.global_step == steps, f"global_step {trainer.global_step} != {steps}")
    expect.that(max(diffs) <= TOLERANCE, f"callback and reference differ by {max(diffs):.3g} > {TOLERANCE}")
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        ours, theirs = spy.moved.get(name, []), ref_moved[name]
        expect.that(ours == theirs, f"{name} moved at steps {ours}, the reference at {theirs}")
    if expected_slow is not None:
        got = spy.moved.get("net.0.weight", [])
        expect.that(got == expected_slow, f"the slow level moved at {got}, expected {expected_slow}")
    if expected_updates is not None:
        expect.that(dict(mfu.num_updates) == expected_updates, f"num_updates {mfu.num_updates} != {expected_updates}")
    if ref_scaler is not None and scaler is not None:
        fig.update(scale_final=scaler.get_scale(), reference_scale_final=ref_scaler.get_scale())
        fig["scale_init"] = scaler_init if scaler_init is not None else getattr(ref_scaler, "_init_scale", None)
        expect.that(scaler.get_scale() == ref_scaler.get_scale(), "the scale differs from the reference's")
        fig["scaler_device"] = getattr(scaler, "_device", None)
    if inf_calls:
        zeros = {name: 0 for name in LEVELS_SPEC}
        clocks: dict[str, Any] = {}
        for step in inf_calls:
            before = spy.counts[step - 2] if step >= 2 else zeros
            after = spy.counts[step - 1]
            upd_before = spy.updates[step - 2] if step >= 2 else zeros
            upd_after = spy.updates[step - 1]
            clocks[str(step)] = {"counts_before": before, "counts_after": after, "updates_after": upd_after}
            expect.that(before == after and upd_before == upd_after, f"the clocks moved on the skipped step {step}")
            expect.that(not any(step in v for v in spy.moved.values()), f"a parameter moved on the skipped step {step}")
        fig["skipped_step_clocks"] = clocks
        if scaler_init is not None and scaler is not None:
            expect.that(scaler.get_scale() < scaler_init, "the scale did not drop after the injected overflow")
            expect.that(
                fig["skipped_steps"] == list(inf_calls),
                f"the skipped steps were {fig['skipped_steps']}, expected the injected {list(inf_calls)}",
            )


# --------------------------------------------------------------------------------------------------- section 1
def precision_checks(target: Target) -> dict[str, Callable[[Expect], None]]:
    """The checks of the ``precision`` section, by name."""
    inf_calls = (3, 8)  # step 3: the slow level's update (it moves one step later, at 4); step 8: an off-step

    def fused_refused(expect: Expect) -> None:
        from nl_lightning.callbacks import MultiFrequencyUpdates

        kwargs: dict[str, Any]
        if target.device.type == "cpu":  # precision="16-mixed" would become bf16-mixed there
            kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
        else:
            kwargs = {"precision": "16-mixed"}  # the Trainer's own GradScaler("cuda")
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as root:
            trainer = Trainer(
                callbacks=[MultiFrequencyUpdates(make_levels())], max_steps=2, **target.trainer_kwargs(root), **kwargs
            )
            try:
                trainer.fit(TinyNet(optimizer="fused_adamw"))
            except MisconfigurationException as err:
                expect.figures["message"] = str(err)
                expect.that("fused=False" in str(err), f"the refusal does not name the fix fused=False: {err}")
            else:
                expect.that(False, "AdamW(fused=True) under 16-mixed with a GradScaler was not refused")

    return {
        "bf16_mixed": lambda e: equivalence(e, target, precision="bf16-mixed", steps=9, expected_slow=[3, 6, 9]),
        "fp16_injected_overflow": lambda e: equivalence(
            e,
            target,
            precision="16-mixed",
            steps=12,
            scaler_init=2.0**10,
            inf_calls=inf_calls,
            expected_slow=[4, 7, 11],
            expected_updates={"slow": 3, "mid": 5},
        ),
        "fp16_trainer_scaler": lambda e: equivalence(e, target, precision="16-mixed", steps=12),
        "fused_adamw_bf16": lambda e: equivalence(
            e, target, precision="bf16-mixed", steps=9, optimizer="fused_adamw", expected_slow=[3, 6, 9]
        ),
        "fused_adamw_fp16_refused": fused_refused,
    }


# --------------------------------------------------------------------------------------------------- section 2
def strategy_checks(
    target: Target, nested_ddp: tuple[str, str] = ("nl_lightning.strategies", "NestedDDPStrategy")
) -> dict[str, Callable[[Expect], None]]:
    """The checks of the ``strategies`` section, by name; ``nested_ddp`` is where the strategy is imported from."""

    def nested(precision: str, **kwargs: Any) -> Callable[[Expect], None]:
        def check(expect: Expect) -> None:
            strategy_cls = import_symbol(*nested_ddp)
            equivalence(expect, target, precision=precision, strategy=strategy_cls(), **kwargs)

        return check

    def fsdp2(expect: Expect) -> None:
        strategy_cls = import_symbol("lightning.pytorch.strategies", "ModelParallelStrategy")
        import_symbol("torch.distributed.fsdp", "fully_shard")
        if not torch.distributed.is_available():
            raise Unavailable("torch.distributed is not available in this build of torch")
        strategy = strategy_cls(data_parallel_size=1, tensor_parallel_size=1)
        equivalence(expect, target, precision="bf16-mixed", steps=9, strategy=strategy, sharded=True,
                    expected_slow=[3, 6, 9])  # fmt: skip

    return {
        "nested_ddp_bf16": nested("bf16-mixed", steps=9, expected_slow=[3, 6, 9]),
        "nested_ddp_fp16_injected_overflow": nested(
            "16-mixed",
            steps=12,
            scaler_init=2.0**10,
            inf_calls=(3, 8),
            expected_slow=[4, 7, 11],
            expected_updates={"slow": 3, "mid": 5},
        ),
        "fsdp2_bf16": fsdp2,
    }


# --------------------------------------------------------------------------------------------------- section 3
#: What a dry run changes in a recipe (only keys the recipe has): tiny models, short sequences, no workers.
DRY_MODEL = {"dim": 32, "heads": 2, "depth": 1, "segment_len": 32, "window": 16, "chunk_size": 16}
DRY_DATA = {"seq_len": 64, "batch_size": 2, "num_workers": 0, "samples_per_epoch": 64}
#: Trainer keys of a recipe that the check replaces (it logs nothing, validates nothing, saves nothing).
DROPPED_TRAINER_KEYS = {
    "logger", "callbacks", "max_steps", "max_epochs", "min_steps", "min_epochs", "max_time", "val_check_interval",
    "check_val_every_n_epoch", "log_every_n_steps", "enable_checkpointing", "default_root_dir", "limit_val_batches",
    "num_sanity_val_steps", "enable_progress_bar", "enable_model_summary",
}  # fmt: skip


def instantiate(spec: Any) -> Any:
    """Instantiate ``{"class_path": ..., "init_args": {...}}`` (recursively), as the CLI does for plain values."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        if not module:
            raise ValueError(f"class_path {spec['class_path']!r} must be a dotted path such as 'pkg.module.Class'.")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def build_recipe(path: Path, dry_run: bool) -> tuple[pl.LightningModule, pl.LightningDataModule, dict[str, Any], dict]:
    """The model, data module and kept trainer arguments of a recipe YAML (tiny sizes with ``dry_run``), and the
    config as used."""
    config = yaml.safe_load(path.read_text())
    for key in ("model", "data"):
        if not isinstance(config.get(key), dict) or "class_path" not in config[key]:
            raise ValueError(f"{path}: `{key}` must be a class_path / init_args mapping.")
    if dry_run:
        for key, changes in (("model", DRY_MODEL), ("data", DRY_DATA)):
            args = config[key].setdefault("init_args", {})
            args.update({k: v for k, v in changes.items() if k in args})
        config["model"]["init_args"].pop("max_steps_schedule", None)
        if "warmup_steps" in config["model"]["init_args"]:
            config["model"]["init_args"]["warmup_steps"] = 2
    if config.get("seed_everything") is not None:
        pl.seed_everything(config["seed_everything"], verbose=False)
    model, data = instantiate(config["model"]), instantiate(config["data"])
    trainer_cfg = config.get("trainer") or {}
    trainer_args = {k: instantiate(v) for k, v in trainer_cfg.items() if k not in DROPPED_TRAINER_KEYS}
    return model, data, trainer_args, config


def _tokens(batch: Any) -> int:
    tokens = batch["tokens"] if isinstance(batch, dict) else batch[0]
    return int(tokens.numel())


class StepTimer(Callback):
    """Step-to-step intervals (device synchronised at each step end), tokens per step, losses, and the FLOPs of the
    step ``flop_step`` (0-based) counted by ``FlopCounterMode``; stops the fit after ``time_limit`` seconds."""

    def __init__(self, target: Target, flop_step: int, time_limit: Optional[float]) -> None:
        self.target, self.flop_step, self.time_limit = target, flop_step, time_limit
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.flops: Optional[int] = None
        self.flops_by_op: dict[str, int] = {}
        self.stopped_by_time_limit = False
        self._counter: Any = None
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        self.target.synchronize()
        self._start = time.perf_counter()
        self.ends.append(self._start)  # interval 0 runs from here to the end of step 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if len(self.tokens) == self.flop_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = int(self._counter.get_total_flops())
            by_op = self._counter.get_flop_counts().get("Global", {})
            self.flops_by_op = {str(op): int(n) for op, n in by_op.items()}
            self._counter = None
        self.target.synchronize()
        now = time.perf_counter()
        self.ends.append(now)
        self.tokens.append(_tokens(batch))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if self.time_limit is not None and now - self._start > self.time_limit:
            self.stopped_by_time_limit = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def close(self) -> None:
        """Leave the FLOP counter if a fit ended (or raised) inside the counted step."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None


def recipe_check(target: Target, path: Path, args: argparse.Namespace, peak: tuple[Optional[float], str]):
    """The check of one recipe: train ``args.steps`` steps and record throughput, peak memory and utilisation."""

    def check(expect: Expect) -> None:
        model, data, trainer_args, config = build_recipe(path, target.dry_run)
        trainer_args.pop("accelerator", None)
        trainer_args.pop("devices", None)
        fig = expect.figures
        fig.update(
            recipe=str(path.relative_to(REPO)),
            model=config["model"]["class_path"],
            model_args=config["model"].get("init_args", {}),
            data_args=config["data"].get("init_args", {}),
            trainer_args={k: v for k, v in trainer_args.items() if isinstance(v, (str, int, float, bool, type(None)))},
            num_parameters=sum(p.numel() for p in model.parameters()),
            steps_requested=args.steps,
            warmup_steps_excluded=args.warmup,
        )
        timer = StepTimer(target, flop_step=args.warmup, time_limit=args.recipe_time_limit)
        if target.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as root:
            kwargs = {**target.trainer_kwargs(root), **trainer_args}
            trainer = Trainer(callbacks=[timer], max_steps=args.steps, limit_val_batches=0, **kwargs)
            fig["precision"] = trainer.precision
            try:
                trainer.fit(model, datamodule=data)
            finally:
                timer.close()
        fig["fit_s"] = time.perf_counter() - t0
        steps_run = len(timer.tokens)
        intervals = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:], strict=True)]
        timed = intervals[args.warmup + 1 :]  # after warm-up, and not the step whose FLOPs were counted
        fig.update(
            steps_run=steps_run,
            global_step=trainer.global_step,
            stopped_by_time_limit=timer.stopped_by_time_limit,
            time_limit_s=args.recipe_time_limit,
            tokens_per_step=timer.tokens[0] if timer.tokens else None,
            timed_steps=len(timed),
            loss_first=timer.losses[0] if timer.losses else None,
            loss_last=timer.losses[-1] if timer.losses else None,
        )
        if target.device.type == "cuda":
            fig["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            fig["peak_memory_allocated_gib"] = fig["peak_memory_allocated_bytes"] / 2**30
            fig["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:
            fig["peak_memory_allocated_bytes"] = None
            fig["peak_memory_note"] = "no CUDA device (a dry run): torch.cuda.max_memory_allocated does not apply"
        expect.that(steps_run == args.steps or timer.stopped_by_time_limit, f"ran {steps_run} of {args.steps} steps")
        expect.that(all(math.isfinite(v) for v in timer.losses), "a training loss was not finite")
        if not expect.that(len(timed) >= 3, f"only {len(timed)} steps were timed after the warm-up; need 3"):
            return
        if not expect.that(timer.flops is not None and timer.flops > 0, "no FLOPs were counted on the counted step"):
            return
        median = statistics.median(timed)
        q = statistics.quantiles(timed, n=4, method="inclusive")
        tokens = statistics.median(timer.tokens[args.warmup + 1 :])
        achieved = timer.flops / median
        tflops, source = peak
        fig.update(
            step_s={"median": median, "p25": q[0], "p75": q[2], "min": min(timed), "max": max(timed)},
            tokens_per_s=tokens / median,
            flop_step_index=args.warmup,
            flops_per_step=timer.flops,
            flops_by_op=timer.flops_by_op,
            achieved_tflops=achieved / 1e12,
            peak_bf16_tflops=tflops,
            peak_source=source,
            mfu=None if tflops is None else achieved / (tflops * 1e12),
        )

    return check


def recipe_checks(target: Target, args: argparse.Namespace) -> dict[str, Callable[[Expect], None]]:
    paths = sorted(RECIPES_DIR.glob(RECIPE_GLOB))
    if args.recipes:
        wanted = {name.removesuffix(".yaml") for name in args.recipes}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; the GPU recipes are {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in wanted]
    name = torch.cuda.get_device_name(0) if target.device.type == "cuda" else None
    peak = peak_bf16_tflops(name, args.peak_tflops)
    return {p.stem: recipe_check(target, p, args, peak) for p in paths}


# --------------------------------------------------------------------------------------------------- main
def write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check"), help="directory for the JSON")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every section on the CPU at tiny sizes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe (200; dry run 6)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (20; dry run 2)")
    p.add_argument("--recipes", nargs="+", default=None, help="gpu_text_* recipe names (default: all)")
    p.add_argument("--recipe-time-limit", type=float, default=None, help="seconds per recipe fit (90; dry run none)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device (override)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.cpu_dry_run else 200
    if args.warmup is None:
        args.warmup = 2 if args.cpu_dry_run else 20
    if args.recipe_time_limit is None and not args.cpu_dry_run:
        args.recipe_time_limit = 90.0
    if args.steps < args.warmup + 4:
        p.error(f"--steps {args.steps} must be at least --warmup + 4 = {args.warmup + 4} (3 timed steps).")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        log(f"no CUDA device visible to torch {torch.__version__}; run with --cpu-dry-run for a CPU rehearsal, or set"
            " PYTHON to an interpreter whose torch has CUDA.")  # fmt: skip
        return 3
    target = Target(args.cpu_dry_run)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_check.json"
    argv_used = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "script": "scripts/gpu_check.py",
        "command": shlex.join(["python", "scripts/gpu_check.py", *argv_used]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu-dry-run" if args.cpu_dry_run else "cuda",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(target),
        "sections": {},
    }
    builders = {
        "precision": lambda: precision_checks(target),
        "strategies": lambda: strategy_checks(target),
        "recipes": lambda: recipe_checks(target, args),
    }
    for section in [s for s in SECTIONS if s in args.sections]:
        entry: dict[str, Any] = {"status": "pass", "checks": {}}
        report["sections"][section] = entry
        t0 = time.perf_counter()
        for name, fn in builders[section]().items():
            log(f"{section}/{name} ...")
            entry["checks"][name] = _json_safe(run_check(fn))
            result = entry["checks"][name]
            detail = result.get("error") or "; ".join(result.get("failures", []))
            log(f"{section}/{name}: {result['status']} ({result['seconds']:.1f} s){' - ' + detail if detail else ''}")
            entry["status"] = section_status(entry["checks"])
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            report["wall_s"] = round(time.perf_counter() - started, 1)
            write_json(json_path, report)
        if section == "strategies" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    code = exit_code(report)
    report["status"] = {0: "pass", 1: "fail", 2: "unavailable"}[code]
    report["exit_code"] = code
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(json_path, report)
    for section, entry in report["sections"].items():
        for name, result in entry["checks"].items():
            extra = ""
            if "tokens_per_s" in result:
                mfu = result.get("mfu")
                extra = f"  {result['tokens_per_s']:.0f} tok/s" + ("" if mfu is None else f", MFU {mfu:.2%}")
            print(f"{result['status']:<12} {section}/{name}{extra}")
    print(f"{report['status']}: {json_path} ({report['wall_s']:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
