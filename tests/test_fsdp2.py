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
"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2 CPU processes (gloo) against a single process.

The two ranks are started by the test itself, as ``torchrun`` would (``LOCAL_RANK`` etc. in the environment, so
Lightning launches nothing): one start runs every sharded fit, writes each rank's results, and the tests compare them
with a single process that sees the same global batches (both ranks' batches of 4 are the single process's batch of 8).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TinyNet, fit, make_data, make_optimizer, reference_fit
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, DistributedSampler

from nl_lightning import Level
from nl_lightning._sharded import gather_full, global_sums, is_dtensor, shard_like
from nl_lightning.callbacks import HypergradientRule, MultiFrequencyUpdates, NestedLearningMonitor, ScheduledRule

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="2-process gloo runs are not tested on Windows")

WORLD, BATCH_PER_RANK, EPOCHS = 2, 4, 2  # 4 global batches (8, 8, 8, 4 samples) per epoch: 8 steps
LEVELS = [Level("slow", ["net.0.*"], every=3), Level("fast", ["net.2.*"], every=1)]
PERIODS = {"net.0.weight": 3, "net.0.bias": 3}
WATCHED = ("nested/slow/grad_norm", "nested/slow/drift", "nested/fast/grad_norm", "nested/fast/lr")
WATCHED += ("nested/slow/updates", "hypergradient/slow/lr", "hypergradient/slow/lr_multiplier", "scheduled/fast/lr")


class _Net(TinyNet):
    """TinyNet with a parameter group per level (so each level can have its own rule); ``shard`` applies FSDP2."""

    def __init__(self, seed: int = 0, shard: bool = False) -> None:
        super().__init__(seed=seed)
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard or any(is_dtensor(p) for p in self.parameters()):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.net[0].parameters())}, {"params": list(self.net[2].parameters())}]
        return make_optimizer("adamw", groups)

    def train_dataloader(self) -> DataLoader:
        data = make_data()
        if not self.shard:  # the global batch: samples 8k..8k+7 are rank 0's 8k+0,2,4,6 and rank 1's 8k+1,3,5,7
            return DataLoader(data, batch_size=WORLD * BATCH_PER_RANK, shuffle=False)
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH_PER_RANK, sampler=sampler)


class _Monitor(NestedLearningMonitor):
    """Keeps the last histogram of each tag (gathered whole under FSDP2) for the comparison."""

    def __init__(self) -> None:
        super().__init__()
        self.histograms: dict[str, torch.Tensor] = {}

    def _write_histograms(self, trainer: Trainer, histograms: dict[str, torch.Tensor]) -> None:
        self.histograms.update({k: v.detach().cpu().clone() for k, v in histograms.items()})
        super()._write_histograms(trainer, histograms)


def _callbacks(rules: bool) -> list[Any]:
    if not rules:
        return [MultiFrequencyUpdates(LEVELS)]
    return [
        MultiFrequencyUpdates(LEVELS),
        HypergradientRule(level="slow", hyper_lr=0.5),
        ScheduledRule("nl_lightning.callbacks.scheduled_rule.warmup", level="fast", kwargs={"steps": 4}),
        _Monitor(),
    ]


def _trainer_kwargs(epochs: int, root: Path, rules: bool) -> dict[str, Any]:
    # Epochs, not max_steps: Lightning 2.6.6 resumes an end-of-epoch checkpoint under max_steps with an extra batch.
    return dict(
        default_root_dir=root,
        max_epochs=epochs,
        log_every_n_steps=1,
        gradient_clip_val=0.2,
        logger=TensorBoardLogger(root, name="tb") if rules else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def _summary(trainer: Trainer, model: _Net) -> dict[str, Any]:
    """What a run ends with: whole parameters (gathered on every rank), clocks, rule state and logged values."""
    cbs = trainer.callbacks
    mfu = next(cb for cb in cbs if isinstance(cb, MultiFrequencyUpdates))
    hyper = [cb for cb in cbs if isinstance(cb, HypergradientRule)]
    return {
        "params": {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()},
        "sharded": all(is_dtensor(p) for p in model.parameters()),
        "buffers_sharded": [
            is_dtensor(b) for s in mfu.book.state_dict()["levels"].values() for b in s["buffers"].values()
        ],
        "num_updates": mfu.num_updates,
        "counts": mfu.book.counts,
        "multipliers": hyper[0].multipliers if hyper else {},
        "cosines": hyper[0].hypergradients if hyper else {},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k in WATCHED},
        "histograms": next((cb.histograms for cb in cbs if isinstance(cb, _Monitor)), {}),
    }


# --------------------------------------------------------------------------------------------------- the 2 ranks
def _sharded_fit(root: Path, epochs: int, rules: bool, ckpt: Optional[Path] = None, distributed: bool = True) -> Any:
    strategy = ModelParallelStrategy(
        data_parallel_size=WORLD,
        tensor_parallel_size=1,
        save_distributed_checkpoint=distributed,
        timeout=timedelta(seconds=120),  # a rank stuck in a collective fails the test instead of hanging it
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        callbacks=_callbacks(rules),
        **_trainer_kwargs(epochs, root, rules),
    )
    model = _Net(seed=0 if ckpt is None else 1, shard=True)  # a resumed run starts from other weights
    trainer.fit(model, ckpt_path=ckpt)
    return trainer, model


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    out_dir = Path(out)
    results: dict[str, Any] = {}
    try:
        results["plain"] = _summary(*_sharded_fit(out_dir / "plain", EPOCHS, rules=False))
        results["rules"] = _summary(*_sharded_fit(out_dir / "rules", EPOCHS, rules=True))
        for fmt, distributed in (("distributed", True), ("full", False)):
            trainer, model = _sharded_fit(out_dir / fmt, 1, rules=True, distributed=distributed)
            results[f"stopped_{fmt}"] = _summary(trainer, model)
            ckpt = out_dir / f"{fmt}.ckpt"
            trainer.save_checkpoint(ckpt)
            trainer.strategy.barrier()
            results[f"resumed_{fmt}"] = _summary(*_sharded_fit(out_dir / f"{fmt}_2", EPOCHS, rules=True, ckpt=ckpt))
        # The same resume without the levels' state (clocks, buffers), to show the comparison above can fail.
        ckpt = out_dir / "distributed.ckpt"
        if rank == 0:
            shutil.copytree(ckpt, out_dir / "no_state.ckpt")
            meta = torch.load(ckpt / "meta.pt", weights_only=True)
            mfu_key = next(k for k in meta["callbacks"] if k.startswith("MultiFrequencyUpdates"))
            results["saved_mfu_state"] = meta["callbacks"][mfu_key]
            del meta["callbacks"][mfu_key]
            torch.save(meta, out_dir / "no_state.ckpt" / "meta.pt")
        torch.distributed.barrier()
        no_state = _sharded_fit(out_dir / "no_state", EPOCHS, rules=True, ckpt=out_dir / "no_state.ckpt")
        results["resumed_without_state"] = _summary(*no_state)
    finally:
        torch.save(results, out_dir / f"rank{rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """The results of every sharded run, per rank (one 2-process start for the whole module)."""
    out = tmp_path_factory.mktemp("fsdp2")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Any]:
    """The single-process run with the rules and the monitor, on the global batches."""
    model = _Net()
    root = tmp_path_factory.mktemp("single")
    trainer = fit(model, _callbacks(rules=True), root, **_trainer_kwargs(EPOCHS, root, rules=True))
    return _summary(trainer, model)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _assert_ranks_agree(ranks: list[dict[str, Any]], run: str) -> None:
    r0, r1 = ranks[0][run], ranks[1][run]
    assert r0["sharded"] and r1["sharded"], "the parameters were not sharded"
    assert _max_diff(r0["params"], r1["params"]) == 0.0
    for key in ("num_updates", "counts", "multipliers", "cosines", "metrics"):
        assert r0[key] == r1[key], f"{run}: ranks disagree on {key}: {r0[key]} vs {r1[key]}"


# --------------------------------------------------------------------------------------------------- tests
def test_levels_match_the_single_process_reference(ranks):
    """Periods 1 and 3 over 8 steps (AdamW, norm clipping): the sharded run equals plain PyTorch on the global
    batch."""
    _assert_ranks_agree(ranks, "plain")
    run = ranks[0]["plain"]
    assert run["num_updates"] == {"slow": 2, "fast": 8}
    assert run["counts"] == {"slow": 2, "fast": 0}
    assert run["buffers_sharded"] == [True, True]  # mid-chunk: net.0's 2 buffers, sharded like their gradients

    reference = _Net()
    batches = (b for _ in range(10) for b in reference.train_dataloader())
    moved = reference_fit(
        reference, PERIODS, 8, lambda m: [make_optimizer("adamw", m.parameters())], clip=0.2, data=batches
    )
    assert moved["net.0.weight"] == [3, 6]
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    assert _max_diff(run["params"], expected) < 1e-6


def test_rules_and_monitor_agree_across_ranks_and_with_one_process(ranks, single):
    """HypergradientRule (on the slow level's chunk gradients), ScheduledRule and the monitor's norms are global."""
    _assert_ranks_agree(ranks, "rules")
    run = ranks[0]["rules"]
    assert run["num_updates"] == single["num_updates"] == {"slow": 2, "fast": 8}
    assert run["multipliers"]["slow"]["lr"] != 1.0  # the rule moved
    # The cosine of the chunk gradient with the previous update, over the whole tensors: a mean of the ranks' local
    # cosines (over the shards) differs here by 2e-4, 30 times the tolerance.
    assert run["cosines"]["slow"]["lr"] == pytest.approx(single["cosines"]["slow"]["lr"], rel=1e-5, abs=1e-7)
    assert run["multipliers"]["slow"]["lr"] == pytest.approx(single["multipliers"]["slow"]["lr"], rel=1e-5)
    assert set(run["metrics"]) == set(WATCHED)
    for key, value in single["metrics"].items():  # the norm of a rank's shards is about 30 % off here
        assert run["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # TensorBoard histograms of the whole gradient and update (8 * 6 + 8 values for the slow level), as one process
    assert (
        set(run["histograms"])
        == set(single["histograms"])
        == {f"nested/{lvl}/{k}" for lvl in ("slow", "fast") for k in ("grad", "update")}
    )
    assert run["histograms"]["nested/slow/grad"].numel() == 56
    for tag, values in single["histograms"].items():
        assert torch.allclose(run["histograms"][tag], values, atol=1e-6), tag
    assert _max_diff(run["params"], single["params"]) < 1e-6


@pytest.mark.parametrize("fmt", ["distributed", "full"])
def test_resume_mid_chunk(ranks, fmt):
    """Stop 1 step into the slow level's chunk, resume from the checkpoint (sharded folder or one file): bit-for-bit
    the uninterrupted run, rules and clocks included."""
    stopped = ranks[0][f"stopped_{fmt}"]
    assert stopped["counts"] == {"slow": 1, "fast": 0}
    _assert_ranks_agree(ranks, f"resumed_{fmt}")
    resumed, uninterrupted = ranks[0][f"resumed_{fmt}"], ranks[0]["rules"]
    assert resumed["num_updates"] == uninterrupted["num_updates"]
    assert resumed["multipliers"] == uninterrupted["multipliers"]
    assert _max_diff(resumed["params"], uninterrupted["params"]) == 0.0


def test_checkpoint_holds_whole_buffers_and_the_resume_needs_them(ranks):
    """Rank 0 writes the callback state: the sharded buffers are saved whole; without them the resume drifts."""
    saved = ranks[0]["saved_mfu_state"]["levels"]["slow"]
    assert saved["count"] == 1
    shapes = {n: tuple(b.shape) for n, b in saved["buffers"].items()}
    assert shapes == {"net.0.weight": (8, 6), "net.0.bias": (8,)}
    assert not any(is_dtensor(b) for b in saved["buffers"].values())
    lossy = ranks[0]["resumed_without_state"]
    assert _max_diff(lossy["params"], ranks[0]["rules"]["params"]) > 1e-4


@pytest.mark.parametrize("strategy_cls", [DeepSpeedStrategy, FSDPStrategy])
def test_fsdp1_and_deepspeed_point_to_fsdp2(strategy_cls):
    trainer = SimpleNamespace(strategy=strategy_cls.__new__(strategy_cls), callbacks=[], accumulate_grad_batches=1)
    with pytest.raises(MisconfigurationException, match="does not support .*Use FSDP2: strategy=ModelParallelStrategy"):
        MultiFrequencyUpdates(LEVELS).setup(trainer, _Net(), "fit")


def test_sharded_helpers_on_plain_tensors():
    """Without sharding the helpers compute locally and leave values alone; a shape change is named."""
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    dot, na2 = global_sums([(a, b)], [(a, a)])
    assert dot == pytest.approx(float((a * b).sum()), rel=1e-6) and na2 == pytest.approx(float((a * a).sum()), rel=1e-6)
    assert global_sums([]).tolist() == [0.0]
    state = {"levels": {"slow": {"count": 1, "buffers": {"w": a}}}}
    assert gather_full(state)["levels"]["slow"]["buffers"]["w"] is a
    restored = shard_like(a.double(), b, torch.float32)
    assert restored.dtype == torch.float32 and torch.equal(restored, a) and restored is not a
    with pytest.raises(ValueError, match=r"shape \(3, 4\) cannot restore one of shape \(4, 3\)"):
        shard_like(a, b.T)
