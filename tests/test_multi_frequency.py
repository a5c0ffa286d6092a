"""MultiFrequencyUpdates against a plain PyTorch reference loop (one step per chunk on the mean of its gradients)."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import (
    BATCH,
    DestroyProcessGroup,
    ManualTinyNet,
    TinyNet,
    batches,
    clone,
    fit,
    make_optimizer,
    max_abs_diff,
    reference_fit,
)
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, DistributedSampler

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates

# Three frequencies: net.0 every 3 steps, net.2.weight every 2, net.2.bias (no level) every step.
LEVELS = [Level("slow", ["net.0.*"], every=3), Level("mid", ["net.2.weight"], every=2)]
PERIODS = {"net.0.weight": 3, "net.0.bias": 3, "net.2.weight": 2}


class MovedSpy(Callback):
    """Records at which optimizer steps (1-based) each parameter changed, and the optimizer state at the end."""

    def __init__(self) -> None:
        self.moved: dict[str, list[int]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        for n, p in pl_module.named_parameters():
            if not torch.equal(self._before[n], p.detach()):
                self.moved.setdefault(n, []).append(self.steps)


def _compare(model, reference, exact=True):
    diff = max_abs_diff(model, reference)
    if exact:
        assert diff == 0.0, f"callback and reference differ by {diff}"
    else:
        assert diff < 1e-6, f"callback and reference differ by {diff}"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_matches_reference(tmp_path, optimizer):
    """AdamW with weight decay and SGD with momentum: bit-for-bit the reference, parameters move only on schedule."""
    model = TinyNet(optimizer=optimizer)
    reference = clone(model)
    spy = MovedSpy()
    fit(model, [MultiFrequencyUpdates(LEVELS), spy], tmp_path, max_steps=12)
    moved = reference_fit(reference, PERIODS, 12, lambda m: [make_optimizer(optimizer, m.parameters())])
    _compare(model, reference)
    assert spy.moved["net.0.weight"] == [3, 6, 9, 12] == moved["net.0.weight"]
    assert spy.moved["net.2.weight"] == [2, 4, 6, 8, 10, 12]
    assert spy.moved["net.2.bias"] == list(range(1, 13))


def test_optimizer_state_untouched_off_step(tmp_path):
    """Adam's step count and moments exist only for real updates: 4 for the slow level after 12 steps."""
    model = TinyNet(optimizer="adamw")
    cb = MultiFrequencyUpdates(LEVELS)
    trainer = fit(model, [cb], tmp_path, max_steps=12)
    state = trainer.optimizers[0].state
    assert int(state[model.net[0].weight]["step"]) == 4
    assert int(state[model.net[2].weight]["step"]) == 6
    assert int(state[model.net[2].bias]["step"]) == 12
    assert cb.num_updates == {"slow": 4, "mid": 6}


def test_sum_reduction(tmp_path):
    model = TinyNet(optimizer="sgd")
    reference = clone(model)
    fit(model, [MultiFrequencyUpdates(LEVELS, reduction="sum")], tmp_path, max_steps=9)
    reference_fit(reference, PERIODS, 9, lambda m: [make_optimizer("sgd", m.parameters())], reduction="sum")
    _compare(model, reference)


def test_accumulate_grad_batches(tmp_path):
    """accumulate_grad_batches=3: a period counts optimizer steps, each one the mean of 3 micro-batches."""
    model = TinyNet(optimizer="adamw")
    reference = clone(model)
    cb = MultiFrequencyUpdates(LEVELS)
    # 7 batches per epoch, windows of 3: use 6 batches per epoch so every window is full (2 steps per epoch).
    with pytest.warns(UserWarning, match="accumulate_grad_batches=3"):
        fit(model, [cb], tmp_path, max_steps=6, accumulate_grad_batches=3, limit_train_batches=6)

    def six_per_epoch():
        while True:
            for i, b in enumerate(DataLoader(TinyNet().train_dataloader().dataset, batch_size=BATCH)):
                if i < 6:
                    yield b

    reference_fit(
        reference, PERIODS, 6, lambda m: [make_optimizer("adamw", m.parameters())], accumulate=3, data=six_per_epoch()
    )
    _compare(model, reference)
    assert cb.num_updates == {"slow": 2, "mid": 3}


def test_gradient_clipping(tmp_path):
    """Off-step gradients wait unclipped; on an update step the chunk mean joins the global norm."""
    model = TinyNet(optimizer="sgd")
    reference = clone(model)
    fit(model, [MultiFrequencyUpdates(LEVELS)], tmp_path, max_steps=12, gradient_clip_val=0.05)
    reference_fit(reference, PERIODS, 12, lambda m: [make_optimizer("sgd", m.parameters())], clip=0.05)
    _compare(model, reference)


def test_bf16_mixed(tmp_path):
    model = TinyNet(optimizer="adamw")
    reference = clone(model)
    fit(model, [MultiFrequencyUpdates(LEVELS)], tmp_path, max_steps=9, precision="bf16-mixed")

    def loss_fn(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return m.loss(b)

    reference_fit(reference, PERIODS, 9, lambda m: [make_optimizer("adamw", m.parameters())], loss_fn=loss_fn)
    _compare(model, reference)


def test_fp16_grad_scaler_skipped_steps(tmp_path):
    """16-mixed with a CPU GradScaler and an injected inf: a skipped step is not committed and contributes nothing.

    The inf hits step 3 (the slow level's update: it moves one step later, at 4) and step 8 (an off-step).
    """
    inf_calls = (3, 8)
    model = TinyNet(optimizer="adamw", inf_calls=inf_calls)
    reference = clone(model)
    reference.inf_calls = set()
    cb, spy = MultiFrequencyUpdates(LEVELS), MovedSpy()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fit(model, [cb, spy], tmp_path, max_steps=12, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    moved = reference_fit(
        reference,
        PERIODS,
        12,
        lambda m: [make_optimizer("adamw", m.parameters())],
        scaler=ref_scaler,
        inf_calls=inf_calls,
    )
    _compare(model, reference)
    assert spy.moved["net.0.weight"] == moved["net.0.weight"] == [4, 7, 11]
    assert scaler.get_scale() == ref_scaler.get_scale() < 2.0**10
    assert cb.num_updates == {"slow": 3, "mid": 5}


def test_fp16_buffers_hold_unscaled_fp32(tmp_path):
    class Peek(Callback):
        def on_train_end(self, trainer, pl_module):
            book = next(cb for cb in trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)).book
            state = book.state_dict()["levels"]["slow"]
            assert state["count"] == 1
            for buf in state["buffers"].values():
                assert buf.dtype == torch.float32
                assert torch.isfinite(buf).all()
                assert buf.abs().max() < 100  # unscaled: the scale is 1024

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fit(TinyNet(), [MultiFrequencyUpdates(LEVELS), Peek()], tmp_path, max_steps=7,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip


def test_manual_optimization(tmp_path):
    model = ManualTinyNet(optimizer="adamw")
    reference = clone(model)
    cb = MultiFrequencyUpdates(LEVELS)
    fit(model, [cb], tmp_path, max_steps=12)
    reference_fit(reference, PERIODS, 12, lambda m: [make_optimizer("adamw", m.parameters())])
    _compare(model, reference)
    assert cb.num_updates == {"slow": 4, "mid": 6}


def test_manual_optimization_prepare_step_before_clipping(tmp_path):
    """The documented helper: ``prepare_step(opt)`` before ``self.clip_gradients`` clips what the optimizer uses."""
    model = ManualTinyNet(optimizer="sgd", clip=0.05)
    reference = clone(model)
    fit(model, [MultiFrequencyUpdates(LEVELS)], tmp_path, max_steps=12)
    reference_fit(reference, PERIODS, 12, lambda m: [make_optimizer("sgd", m.parameters())], clip=0.05)
    _compare(model, reference)


def test_two_optimizers(tmp_path):
    """Manual optimization with two optimizers: each level's clock counts its own optimizer's steps."""
    model = ManualTinyNet(two_optimizers=True)
    reference = clone(model)
    cb = MultiFrequencyUpdates(LEVELS)
    # Steps of both optimizers each count in global_step: 12 steps = 6 batches.
    fit(model, [cb], tmp_path, max_steps=12)
    reference_fit(
        reference,
        PERIODS,
        6,
        lambda m: [make_optimizer("adamw", m.net[0].parameters()), make_optimizer("sgd", m.net[2].parameters())],
    )
    _compare(model, reference)
    assert cb.num_updates == {"slow": 2, "mid": 3}


def test_torch_compile(tmp_path):
    model = TinyNet(optimizer="adamw")
    reference = clone(model)
    compiled = torch.compile(model, backend="aot_eager")
    cb = MultiFrequencyUpdates(LEVELS)
    fit(compiled, [cb], tmp_path, max_steps=9)
    reference_fit(reference, PERIODS, 9, lambda m: [make_optimizer("adamw", m.parameters())])
    _compare(model, reference, exact=False)
    assert cb.num_updates == {"slow": 3, "mid": 4}


# --------------------------------------------------------------------------------------------------- checkpoints
def test_resume_mid_chunk_is_exact(tmp_path):
    """Stop after 7 steps (slow level 1 step into its chunk), resume from the checkpoint: equal to 14 uninterrupted."""
    uninterrupted = TinyNet()
    fit(uninterrupted, [MultiFrequencyUpdates(LEVELS)], tmp_path / "a", max_epochs=2)

    first = MultiFrequencyUpdates(LEVELS)
    trainer = fit(TinyNet(), [first], tmp_path / "b", max_epochs=1)
    assert first.book.counts == {"slow": 1, "mid": 1}
    ckpt = tmp_path / "mid_chunk.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # the state is tensors and primitives only
    assert set(saved["callbacks"][first.state_key]["levels"]["slow"]["buffers"]) == {
        "net.0.weight",
        "net.0.bias",
    }

    resumed_cb = MultiFrequencyUpdates(LEVELS)
    resumed = TinyNet(seed=1)  # any initial weights: the checkpoint restores them
    fit(resumed, [resumed_cb], tmp_path / "c", max_epochs=2, ckpt_path=ckpt)
    assert resumed_cb.num_updates == {"slow": 4, "mid": 7}
    _compare(resumed, uninterrupted)

    # Without the callback's state the resumed run drifts: the test above can fail.
    saved["callbacks"] = {}
    torch.save(saved, tmp_path / "no_state.ckpt")
    lossy = TinyNet(seed=1)
    fit(lossy, [MultiFrequencyUpdates(LEVELS)], tmp_path / "d", max_epochs=2, ckpt_path=tmp_path / "no_state.ckpt")
    assert max_abs_diff(lossy, uninterrupted) > 1e-4


# --------------------------------------------------------------------------------------------------- DDP
class _AssertRanksAgree(Callback):
    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, MultiFrequencyUpdates))
        assert cb.num_updates == {"slow": 2, "mid": 3}, cb.num_updates
        for _, p in pl_module.named_parameters():
            rank0 = p.detach().clone()
            torch.distributed.broadcast(rank0, src=0)
            assert torch.equal(rank0, p.detach()), "ranks diverged"


class _ShardedTinyNet(TinyNet):
    def train_dataloader(self):
        dataset = super().train_dataloader().dataset
        sampler = DistributedSampler(dataset, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn on CPU is not tested on Windows")
def test_ddp_spawn_two_processes(tmp_path):
    """2-process ddp_spawn equals a single process stepping on the mean gradient of both ranks' batches."""
    model = _ShardedTinyNet(optimizer="adamw")
    reference = clone(model)
    trainer = Trainer(
        default_root_dir=tmp_path,
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        use_distributed_sampler=False,
        callbacks=[MultiFrequencyUpdates(LEVELS), _AssertRanksAgree(), DestroyProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)

    def global_batches():
        data = TinyNet().train_dataloader().dataset
        shards = [
            DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, 2, r, shuffle=False)) for r in (0, 1)
        ]
        while True:
            yield from zip(*shards, strict=True)

    reference_fit(
        reference,
        PERIODS,
        6,
        lambda m: [make_optimizer("adamw", m.parameters())],
        data=global_batches(),
        loss_fn=lambda m, pair: (m.loss(pair[0]) + m.loss(pair[1])) / 2,
    )
    _compare(model, reference, exact=False)


def test_batches_helper_is_the_trainer_order(tmp_path):
    """Guard for the reference: ``batches()`` yields what the Trainer feeds, in order."""
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].clone())

    fit(TinyNet(), [Record()], tmp_path, max_steps=9)
    expected = [b[0] for _, b in zip(range(9), batches(), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_second_fit_continues_the_chunk(tmp_path):
    """Calling fit again (e.g. the next task of a stream) keeps clocks and partial buffers; a new model starts fresh."""
    model, cb = TinyNet(), MultiFrequencyUpdates(LEVELS)
    fit(model, [cb], tmp_path, max_steps=4)
    assert cb.book.counts == {"slow": 1, "mid": 0}
    fit(model, [cb], tmp_path, max_steps=2)  # a fresh Trainer: global_step restarts, the clocks do not
    assert cb.num_updates == {"slow": 2, "mid": 3}
    fit(TinyNet(seed=5), [cb], tmp_path, max_steps=2)
    assert cb.num_updates == {"slow": 0, "mid": 1}
