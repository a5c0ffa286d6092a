"""NestedDDPStrategy against DDPStrategy, both with MultiFrequencyUpdates, on 2 CPU processes (gloo).

Most scenarios run in one pair of processes started here (Lightning sees ``LOCAL_RANK`` and uses them as they are, as
under ``torchrun``), one ``fit`` after another, so that the file stays fast; one test goes through Lightning's own
``start_method="spawn"`` launcher. Each rank writes what it saw; the assertions run here.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import (
    NUM_CLASSES,
    NUM_FEATURES,
    DestroyProcessGroup,
    ManualTinyNet,
    TinyNet,
    make_data,
    make_optimizer,
    reference_fit,
)
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, DistributedSampler

from nl_lightning import Level, LevelSet
from nl_lightning.callbacks import (
    CMSConsolidation,
    ContinualEvaluation,
    ElasticWeightConsolidation,
    ExperienceReplay,
    HypergradientRule,
    MultiFrequencyUpdates,
)
from nl_lightning.data import DigitsDataset, TaskStreamDataModule
from nl_lightning.models import ContinuumMemory, MLPClassifier
from nl_lightning.strategies import NestedDDPStrategy

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="2-process CPU DDP is not tested on Windows")

# 14 samples per rank, 2 per batch: 7 steps per epoch. `slow` updates every 4 steps, `mid` every 2, net.2.bias every
# step. Two epochs (14 steps) make 3 slow and 7 mid updates; one epoch stops both levels in the middle of a chunk.
LEVELS = [Level("slow", ["net.0.*"], every=4), Level("mid", ["net.2.weight"], every=2)]
PERIODS = {"net.0.weight": 4, "net.0.bias": 4, "net.2.weight": 2}
PER_RANK_BATCH = 2
SIZES = {"net.0.weight": 48, "net.0.bias": 8, "net.2.weight": 24, "net.2.bias": 3}
TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32 summation order


class _Sharded:
    def train_dataloader(self) -> DataLoader:
        data = make_data()
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=PER_RANK_BATCH, sampler=sampler)


class Net(_Sharded, TinyNet):
    pass


class ManualNet(_Sharded, ManualTinyNet):
    pass


class CMSNet(_Sharded, LightningModule):
    """A static two-level ContinuumMemory (``cms.blocks.0`` every step, ``cms.blocks.1`` every 4) and a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.cms = ContinuumMemory(NUM_FEATURES, chunk_sizes=[1, 4], in_context=False)
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cms(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer("adamw", self.parameters())


class _ConsolidateAtStart(Callback):
    """Consolidates EWC at train start, on this rank's shard of other data: after the strategy made the weights
    equal on every rank (so the anchor is too) and inside the process group (``consolidate`` all-reduces the Fisher)."""

    def __init__(self, ewc: ElasticWeightConsolidation) -> None:
        self.ewc = ewc

    def on_train_start(self, trainer, pl_module):
        data = make_data(seed=1)
        sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
        self.ewc.consolidate(pl_module, DataLoader(data, batch_size=4, sampler=sampler))


class _InfOnRankOne(Callback):
    """Sets one entry of a slow parameter's gradient (local under NestedDDP) to inf on rank 1, at given backwards."""

    def __init__(self, calls: tuple[int, ...]) -> None:
        self.calls, self.count = calls, 0

    def on_after_backward(self, trainer, pl_module):
        self.count += 1
        if trainer.global_rank == 1 and self.count in self.calls:
            pl_module.net[0].weight.grad[0, 0] = math.inf


class _CountDDPBytes(Callback):
    """A DDP communication hook (registered by hand: Lightning registers hooks on CUDA only) counting bucket bytes."""

    def __init__(self) -> None:
        self.bytes, self.ignored_in_buckets = 0, 0

    def on_fit_start(self, trainer, pl_module):
        ddp = trainer.strategy.model
        self.ignored = sorted(ddp.parameters_to_ignore)
        slow = {id(p) for n, p in pl_module.named_parameters() if n in PERIODS}

        def hook(state, bucket):
            self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            self.ignored_in_buckets += sum(id(p) in slow for p in bucket.parameters())
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)


def _trainer(strategy: str, tmp: Path, callbacks: list, **kwargs: Any) -> Trainer:
    cls = NestedDDPStrategy if strategy == "nested" else DDPStrategy
    defaults: dict[str, Any] = dict(
        default_root_dir=tmp,
        strategy=cls(timeout=timedelta(seconds=60)),
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(
    strategy: str,
    tmp: Path,
    model=None,
    callbacks=(),
    ckpt_path=None,
    levels: list[Level] = LEVELS,
    datamodule=None,
    **kwargs: Any,
) -> dict[str, Any]:
    rank = int(os.environ["LOCAL_RANK"])
    model = Net(seed=rank) if model is None else model  # different weights per rank: rank 0's must win
    mfu = MultiFrequencyUpdates(levels)
    trainer = _trainer(strategy, tmp, [mfu, *callbacks], **kwargs)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "params": _params(model),
        "num_updates": mfu.num_updates,
        "counts": mfu.book.counts,
        "scale": None if scaler is None else float(scaler.get_scale()),
        "trainer": trainer,
        "mfu": mfu,
        "model": model,
    }


def _plain(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("trainer", "mfu", "model")}


# --------------------------------------------------------------------------------------------------- scenarios
def scenario_basic(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sent: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):  # the all-reduces NestedDDPStrategy makes itself
        if sys._getframe(1).f_globals.get("__name__") == "nl_lightning.strategies.nested_ddp":
            sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    for strategy in ("ddp", "nested"):
        spy = _CountDDPBytes()
        sent.clear()
        dist.all_reduce = counting
        try:
            result = _run(strategy, tmp / strategy, callbacks=[spy])
        finally:
            dist.all_reduce = original
        model = result["model"]
        out[strategy] = {
            **_plain(result),
            "ddp_bytes": spy.bytes,
            "ignored": spy.ignored,
            "ignored_in_buckets": spy.ignored_in_buckets,
            "own_bytes": list(sent),
            "marks_left": hasattr(model, "_ddp_params_and_buffers_to_ignore")
            or any(hasattr(p, "_ddp_ignored") for p in model.parameters()),
        }
    return out


def scenario_accumulate(tmp: Path) -> dict[str, Any]:
    return {s: _plain(_run(s, tmp / s, accumulate_grad_batches=2)) for s in ("ddp", "nested")}


def scenario_clip(tmp: Path) -> dict[str, Any]:
    rank = int(os.environ["LOCAL_RANK"])
    return {
        s: _plain(_run(s, tmp / s, model=Net(optimizer="sgd", seed=rank), gradient_clip_val=0.05))
        for s in ("ddp", "nested")
    }


def scenario_manual_two_optimizers(tmp: Path) -> dict[str, Any]:
    """Manual optimization, two optimizers (net.0: AdamW, net.2: SGD), `prepare_step` then `clip_gradients`."""
    rank = int(os.environ["LOCAL_RANK"])
    return {
        s: _plain(_run(s, tmp / s, model=ManualNet(two_optimizers=True, clip=0.05, seed=rank), max_epochs=1))
        for s in ("ddp", "nested")
    }


def scenario_rule(tmp: Path) -> dict[str, Any]:
    out = {}
    for s in ("ddp", "nested"):
        rule = HypergradientRule(hyper_lr=0.2)
        out[s] = {**_plain(_run(s, tmp / s, callbacks=[rule])), "multipliers": dict(rule.multipliers)}
    return out


def scenario_resume(tmp: Path) -> dict[str, Any]:
    """Stop after one epoch (slow 3 and mid 1 step into their chunks), save, resume for a second epoch."""
    rank = int(os.environ["LOCAL_RANK"])
    first = _run("nested", tmp / "first", max_epochs=1)
    ckpt = tmp / "mid_chunk.ckpt"
    first["trainer"].save_checkpoint(ckpt)
    local = {
        k: {n: b.clone() for n, b in v["buffers"].items()} for k, v in first["mfu"].book.state_dict()["levels"].items()
    }
    resumed = _run("nested", tmp / "resumed", model=Net(seed=7 + rank), ckpt_path=ckpt, max_epochs=2)
    return {"first": _plain(first), "local_buffers": local, "ckpt": str(ckpt), "resumed": _plain(resumed)}


def scenario_fp16_overflow_on_one_rank(tmp: Path) -> dict[str, Any]:
    """16-mixed with a CPU GradScaler. NestedDDP: inf in a slow (local) gradient on rank 1 only, at backwards 3 (an
    off-step of `slow`) and 9 (its update). DDP: the loss is inf on rank 1 at the same backwards, which the all-reduce
    spreads, so both ranks skip those steps."""
    rank = int(os.environ["LOCAL_RANK"])
    calls = (3, 9)
    out = {}
    for s in ("ddp", "nested"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        if s == "ddp":
            model, callbacks = Net(seed=rank, inf_calls=calls if rank == 1 else ()), []
        else:
            model, callbacks = Net(seed=rank), [_InfOnRankOne(calls)]
        result = _run(s, tmp / s, model=model, callbacks=callbacks, plugins=plugins)
        opt = result["trainer"].optimizers[0]
        out[s] = {**_plain(result), "adam_steps": {n: int(opt.state[p]["step"]) for n, p in model.named_parameters()}}
    return out


def scenario_all_slow(tmp: Path) -> dict[str, Any]:
    """Every parameter in a level with every > 1: DDP needs one parameter to all-reduce, the smallest stays in it."""
    levels = [Level("a", ["net.0.*"], every=2), Level("b", ["net.2.*"], every=4)]
    out = {}
    for s in ("ddp", "nested"):
        rank = int(os.environ["LOCAL_RANK"])
        model, mfu = Net(seed=rank), MultiFrequencyUpdates(levels)
        spy = _CountDDPBytes()
        trainer = _trainer(s, tmp / s, [mfu, spy], max_epochs=1)
        trainer.fit(model)
        out[s] = {"params": _params(model), "num_updates": mfu.num_updates, "counts": mfu.book.counts}
        out[s]["ignored"] = spy.ignored
    return out


def scenario_ewc(tmp: Path) -> dict[str, Any]:
    """EWC (boundaries="manual") consolidated at train start: its penalty gradient acts on every step of the fit."""
    out = {}
    for s in ("ddp", "nested"):
        ewc = ElasticWeightConsolidation(ewc_lambda=100.0, fisher_samples=6, boundaries="manual")
        result = _run(s, tmp / s, callbacks=[_ConsolidateAtStart(ewc), ewc])
        out[s] = {
            **_plain(result),
            "fisher": {n: f.clone() for n, f in ewc._fisher.items()},
            "anchor": {n: a.clone() for n, a in ewc._anchor.items()},
            "tasks": ewc.tasks_consolidated,
        }
    return out


def scenario_replay(tmp: Path) -> dict[str, Any]:
    """ExperienceReplay: from the second batch on, 2 stored samples of this rank's reservoir join every batch."""
    out = {}
    for s in ("ddp", "nested"):
        replay = ExperienceReplay(buffer_size=6, replay_batch_size=2, seed=0)
        result = _run(s, tmp / s, callbacks=[replay])
        reservoir = replay.reservoir
        out[s] = {
            **_plain(result),
            "reservoir": [f[: reservoir.size].clone() for f in reservoir.fields],
            "seen": reservoir.seen,
        }
    return out


CMS_PAIR = "cms.blocks.0_to_cms.blocks.1"


def scenario_cms(tmp: Path) -> dict[str, Any]:
    """CMSConsolidation drift pair cms.blocks.0 -> cms.blocks.1, at the updates of the slow level (every 4)."""
    rank = int(os.environ["LOCAL_RANK"])
    levels = CMSNet().cms.levels("cms")
    out = {}
    for s in ("ddp", "nested"):
        consolidation = CMSConsolidation([{"fast": "cms.blocks.0", "slow": "cms.blocks.1", "alpha": 0.5}])
        spy = _CountDDPBytes()
        result = _run(s, tmp / s, model=CMSNet(seed=rank), callbacks=[consolidation, spy], levels=levels)
        out[s] = {**_plain(result), "transfers": consolidation.transfers, "ignored": spy.ignored}
    return out


def scenario_continual(tmp: Path) -> dict[str, Any]:
    """ContinualEvaluation on a 2-task digits stream (20 samples per rank and task, 4 per batch: 5 steps per task),
    the backbone every 3 steps: its chunk straddles the task boundary, where the matrix is measured."""
    rank = int(os.environ["LOCAL_RANK"])
    out = {}
    for s in ("ddp", "nested"):
        dm = TaskStreamDataModule(
            DigitsDataset(True),
            DigitsDataset(False),
            num_tasks=2,
            epochs_per_task=1,
            batch_size=4,
            samples_per_task=40,
            val_fraction=0,
            seed=0,
        )
        torch.manual_seed(rank)
        model = MLPClassifier(hidden=[16], lr=0.05)
        evaluation = ContinualEvaluation(log_images=False)
        result = _run(
            s,
            tmp / s,
            model=model,
            callbacks=[evaluation],
            datamodule=dm,
            levels=[Level("backbone", ["backbone.*"], every=3)],
            max_epochs=dm.expected_epochs,
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=True,
            limit_val_batches=0,
        )
        values = evaluation._compute()  # collective: every rank asks
        out[s] = {
            **_plain(result),
            "accuracy": values["accuracy"],
            "acc": float(values["acc"]),
            "stages": evaluation.completed_stages,
            "global_step": result["trainer"].global_step,
        }
    return out


def scenario_no_callback(tmp: Path) -> dict[str, Any]:
    trainer = _trainer("nested", tmp, [], max_steps=1)
    try:
        trainer.fit(Net())
    except MisconfigurationException as err:
        return {"error": str(err)}
    return {"error": None}


SCENARIOS = {
    "basic": scenario_basic,
    "accumulate": scenario_accumulate,
    "clip": scenario_clip,
    "manual_two_optimizers": scenario_manual_two_optimizers,
    "rule": scenario_rule,
    "resume": scenario_resume,
    "fp16": scenario_fp16_overflow_on_one_rank,
    "all_slow": scenario_all_slow,
    "ewc": scenario_ewc,
    "replay": scenario_replay,
    "cms": scenario_cms,
    "continual": scenario_continual,
    "no_callback": scenario_no_callback,
}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        tmp = Path(out) / name
        try:
            results[name] = scenario(tmp)
        except Exception:  # noqa: BLE001 - reported by the test of that scenario
            results[name] = {"traceback": traceback.format_exc()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("nested_ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process scenarios did not finish in 300 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _get(runs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = runs[0][name], runs[1][name]
    for r in (r0, r1):
        assert "traceback" not in r, r.get("traceback")
    return r0, r1


def _assert_ranks_identical(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), f"ranks differ on {n}"
    assert r0["num_updates"] == r1["num_updates"] and r0["counts"] == r1["counts"]


def _assert_same_as_ddp(pair: dict[str, Any]) -> None:
    nested, ddp = pair["nested"], pair["ddp"]
    assert nested["num_updates"] == ddp["num_updates"] and nested["counts"] == ddp["counts"]
    for n, p in ddp["params"].items():
        torch.testing.assert_close(nested["params"][n], p, **TOL, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------- tests
def test_same_parameters_as_ddp_ranks_identical(runs):
    r0, r1 = _get(runs, "basic")
    for s in ("ddp", "nested"):
        _assert_ranks_identical(r0[s], r1[s])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["num_updates"] == {"slow": 3, "mid": 7}
    # The slow levels really moved away from the (broadcast) initial values.
    assert (r0["nested"]["params"]["net.0.weight"] - Net(seed=0).net[0].weight).abs().max() > 1e-3


def test_slow_levels_left_out_of_ddp(runs):
    """Bytes measured by a DDP comm hook and by counting the strategy's own all-reduces, over 14 steps."""
    r0, _ = _get(runs, "basic")
    ddp, nested = r0["ddp"], r0["nested"]
    assert ddp["ignored"] == [] and ddp["own_bytes"] == []
    assert ddp["ddp_bytes"] == 14 * 4 * sum(SIZES.values())
    assert nested["ignored"] == sorted(PERIODS)
    assert nested["ignored_in_buckets"] == 0
    assert nested["ddp_bytes"] == 14 * 4 * SIZES["net.2.bias"]  # only the fast parameter, every step
    # One all-reduce per due level: values plus one flag per tensor; 3 slow and 7 mid updates.
    slow, mid = 4 * (SIZES["net.0.weight"] + SIZES["net.0.bias"] + 2), 4 * (SIZES["net.2.weight"] + 1)
    assert sorted(nested["own_bytes"]) == sorted([slow] * 3 + [mid] * 7)
    assert not nested["marks_left"], "the DDP ignore marks outlive the fit"


def test_accumulate_grad_batches(runs):
    r0, r1 = _get(runs, "accumulate")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["num_updates"] == {"slow": 2, "mid": 4}  # 4 steps per epoch (the last window is short)


def test_gradient_clipping(runs):
    r0, r1 = _get(runs, "clip")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    _assert_same_as_ddp(r0)


def test_manual_optimization_two_optimizers(runs):
    r0, r1 = _get(runs, "manual_two_optimizers")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["num_updates"] == {"slow": 1, "mid": 3}


def test_hypergradient_rule(runs):
    r0, r1 = _get(runs, "rule")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["multipliers"] == r1["nested"]["multipliers"]
    for name, mults in r0["ddp"]["multipliers"].items():
        assert mults["lr"] != 1.0
        assert r0["nested"]["multipliers"][name]["lr"] == pytest.approx(mults["lr"], rel=1e-4)


def test_resume_mid_chunk(runs):
    r0, r1 = _get(runs, "resume")
    assert r0["first"]["counts"] == {"slow": 3, "mid": 1}
    # The checkpoint holds the mean over ranks of the local buffers, which differ between ranks.
    saved = torch.load(r0["ckpt"], weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "MultiFrequencyUpdates" in k)
    for level in ("slow", "mid"):
        for n, b in state["levels"][level]["buffers"].items():
            b0, b1 = r0["local_buffers"][level][n], r1["local_buffers"][level][n]
            assert not torch.allclose(b0, b1)
            torch.testing.assert_close(b, (b0 + b1) / 2, **TOL)
    # Resumed on both ranks: identical, and equal to the uninterrupted run.
    _assert_ranks_identical(r0["resumed"], r1["resumed"])
    uninterrupted = _get(runs, "basic")[0]["nested"]
    assert r0["resumed"]["num_updates"] == uninterrupted["num_updates"]
    for n, p in uninterrupted["params"].items():
        torch.testing.assert_close(r0["resumed"]["params"][n], p, **TOL)


def test_fp16_overflow_on_one_rank_skips_everywhere(runs):
    r0, r1 = _get(runs, "fp16")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    assert r0["nested"]["scale"] == r1["nested"]["scale"] == r0["ddp"]["scale"] == 2.0**8  # two skips
    assert r0["nested"]["adam_steps"]["net.2.bias"] == 12  # 14 steps, 2 skipped
    assert r0["nested"]["adam_steps"] == r0["ddp"]["adam_steps"]
    _assert_same_as_ddp(r0)


def test_every_parameter_slow(runs):
    r0, r1 = _get(runs, "all_slow")
    _assert_ranks_identical(r0["nested"], r1["nested"])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["ignored"] == ["net.0.bias", "net.0.weight", "net.2.weight"]  # net.2.bias stays in DDP
    assert r0["nested"]["num_updates"] == {"a": 3, "b": 1}


def test_refuses_without_multi_frequency_updates(runs):
    r0, r1 = _get(runs, "no_callback")
    for r in (r0, r1):
        assert r["error"] is not None and "no MultiFrequencyUpdates callback" in r["error"]


def test_ewc(runs):
    r0, r1 = _get(runs, "ewc")
    for s in ("ddp", "nested"):
        _assert_ranks_identical(r0[s], r1[s])
        assert r0[s]["tasks"] == 1
        for key in ("fisher", "anchor"):  # the same Fisher and anchor on every rank
            assert r0[s][key].keys() == set(SIZES)
            for n, t in r0[s][key].items():
                assert torch.equal(t, r1[s][key][n]), f"{s}: ranks differ on the {key} of {n}"
    for key in ("fisher", "anchor"):
        for n, t in r0["ddp"][key].items():
            torch.testing.assert_close(r0["nested"][key][n], t, **TOL)
    _assert_same_as_ddp(r0)
    # The penalty acted: the result is not the one without EWC.
    basic = _get(runs, "basic")[0]["nested"]["params"]
    assert max((r0["nested"]["params"][n] - p).abs().max() for n, p in basic.items()) > 1e-3


def test_experience_replay(runs):
    r0, r1 = _get(runs, "replay")
    for s in ("ddp", "nested"):
        _assert_ranks_identical(r0[s], r1[s])
    _assert_same_as_ddp(r0)
    for r in (r0, r1):  # each rank's reservoir of its own shard, the same under both strategies
        assert r["nested"]["seen"] == r["ddp"]["seen"] == 28
        for a, b in zip(r["nested"]["reservoir"], r["ddp"]["reservoir"], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(r0["nested"]["reservoir"][0], r1["nested"]["reservoir"][0])
    basic = _get(runs, "basic")[0]["nested"]["params"]
    assert max((r0["nested"]["params"][n] - p).abs().max() for n, p in basic.items()) > 1e-3


def test_cms_consolidation(runs):
    r0, r1 = _get(runs, "cms")
    for s in ("ddp", "nested"):
        _assert_ranks_identical(r0[s], r1[s])
    _assert_same_as_ddp(r0)
    assert r0["nested"]["num_updates"] == {"cms.level_0": 14, "cms.level_1": 3}
    assert r0["nested"]["transfers"] == r0["ddp"]["transfers"] == {CMS_PAIR: 3}
    assert r0["ddp"]["ignored"] == []
    assert r0["nested"]["ignored"] == sorted(n for n in r0["nested"]["params"] if n.startswith("cms.blocks.1."))


def test_continual_evaluation(runs):
    r0, r1 = _get(runs, "continual")
    for s in ("ddp", "nested"):
        _assert_ranks_identical(r0[s], r1[s])
        assert r0[s]["stages"] == [0, 1, 2] and r0[s]["global_step"] == 10
    _assert_same_as_ddp(r0)
    assert r0["nested"]["num_updates"] == {"backbone": 3}
    nested, ddp = r0["nested"]["accuracy"], r0["ddp"]["accuracy"]
    assert nested.shape == (3, 2) and not nested.isnan().any()
    torch.testing.assert_close(nested, ddp, rtol=0, atol=0)
    torch.testing.assert_close(r1["nested"]["accuracy"], nested, rtol=0, atol=0)  # summed over ranks
    assert r0["nested"]["acc"] == r0["ddp"]["acc"]
    assert nested[2, 1] > nested[0, 1] + 0.1  # training on the second task raised its accuracy


# ----------------------------------------------------------------------------------------- LevelSet.prepare(reduce=)
def _grads(model: torch.nn.Module, step: int) -> None:
    for i, p in enumerate(model.parameters()):
        p.grad = (torch.full_like(p, float(step + 1)) * (i + 1) + torch.linspace(0, 1, p.numel()).view_as(p)).to(
            p.dtype
        )


def test_identity_reducer_changes_nothing():
    """The reduce hook on the plain-torch engine: an identity reducer writes bit-for-bit what no reducer writes."""
    a, b = TinyNet(), TinyNet()
    book_a, book_b = LevelSet(LEVELS, a.named_parameters()), LevelSet(LEVELS, b.named_parameters())
    calls = []

    def identity(level, params, grads):
        calls.append((level, len(params), [None if g is None else g.dtype for g in grads]))
        return grads

    for step in range(8):
        _grads(a, step)
        _grads(b, step)
        plan_a, plan_b = book_a.prepare(), book_b.prepare(reduce=identity)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None)
            assert pa.grad is None or torch.equal(pa.grad, pb.grad)
        book_a.commit(plan_a)
        book_b.commit(plan_b)
    # Called once per due level of period > 1 (slow at steps 4 and 8, mid every 2nd), with fp32 gradients.
    assert [c[0] for c in calls] == ["mid", "slow", "mid", "mid", "slow", "mid"]
    assert calls[1] == ("slow", 2, [torch.float32, torch.float32])


def test_reducer_output_is_written_in_the_parameter_dtype():
    model = TinyNet().to(torch.bfloat16)
    book = LevelSet([Level("slow", ["net.0.*"], every=2)], model.named_parameters())
    seen = {}

    def reducer(level, params, grads):
        seen[level] = [g.clone() for g in grads]
        return [grads[0] * 2, None]  # the weight doubled, the bias without a gradient

    for step in range(2):
        _grads(model, step)
        plan = book.prepare(reduce=reducer)
        if step == 0:
            book.commit(plan)
    assert all(g.dtype == torch.float32 for g in seen["slow"])  # chunk means in the buffer dtype
    assert model.net[0].weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(model.net[0].weight.grad, (seen["slow"][0] * 2).to(torch.bfloat16))
    assert model.net[0].bias.grad is None


def test_reducer_returning_the_wrong_count_raises():
    model = TinyNet()
    book = LevelSet([Level("slow", ["net.0.*"], every=2)], model.named_parameters())
    _grads(model, 0)
    book.commit(book.prepare())
    _grads(model, 1)
    with pytest.raises(ValueError, match="returned 1 gradients for the 2 parameters of level 'slow'"):
        book.prepare(reduce=lambda level, params, grads: grads[:1])


# --------------------------------------------------------------------------------------------------- ddp_spawn
class _AssertRanksAgree(Callback):
    def on_train_end(self, trainer, pl_module):
        assert trainer.strategy.ignored_parameters == ["net.0.weight", "net.0.bias", "net.2.weight"]
        for _, p in pl_module.named_parameters():
            rank0 = p.detach().clone()
            torch.distributed.broadcast(rank0, src=0)
            assert torch.equal(rank0, p.detach()), "ranks diverged"


def test_spawn_launcher_matches_global_batch_reference(tmp_path):
    """Through Lightning's spawn launcher (the callbacks and the strategy are pickled): equal to one process stepping
    on the mean gradient of both ranks' batches."""
    model = Net(optimizer="adamw")
    reference = TinyNet(optimizer="adamw")
    reference.load_state_dict(model.state_dict())
    trainer = Trainer(
        default_root_dir=tmp_path,
        strategy=NestedDDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        accelerator="cpu",
        devices=2,
        max_steps=8,
        use_distributed_sampler=False,
        callbacks=[MultiFrequencyUpdates(LEVELS), _AssertRanksAgree(), DestroyProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)

    def global_batches():
        data = make_data()
        shards = [
            DataLoader(data, PER_RANK_BATCH, sampler=DistributedSampler(data, 2, r, shuffle=False)) for r in (0, 1)
        ]
        while True:
            yield from zip(*shards, strict=True)

    reference_fit(
        reference,
        PERIODS,
        8,
        lambda m: [make_optimizer("adamw", m.parameters())],
        data=global_batches(),
        loss_fn=lambda m, pair: (m.loss(pair[0]) + m.loss(pair[1])) / 2,
    )
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, n=n: f"{n}: {m}")
