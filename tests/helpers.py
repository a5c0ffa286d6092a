"""Shared test fixtures: a tiny classifier and the slow, obvious reference loop the callback is compared against."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

NUM_SAMPLES, NUM_FEATURES, NUM_CLASSES, BATCH = 28, 6, 3, 4  # 7 batches per epoch


class DestroyProcessGroup(pl.Callback):
    """Tear the gloo process group down before the worker exits.

    Without it, about one CPU ``ddp_spawn`` run in 40 aborts at interpreter exit ("terminate called without an active
    exception"), after ``fit`` has finished; a plain ``BoringModel`` does the same on torch 2.13 + lightning 2.6.6.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def make_data(seed: int = 0, n: int = NUM_SAMPLES) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM_FEATURES, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.05)
    if name == "plain_sgd":
        return torch.optim.SGD(params, lr=0.1)
    if name == "fused_adamw":
        return torch.optim.AdamW(params, lr=0.05, fused=True)
    raise ValueError(name)


class TinyNet(pl.LightningModule):
    """Linear(6, 8) -> tanh -> Linear(8, 3): ``net.0.*``, ``net.2.weight`` and ``net.2.bias`` make three levels."""

    def __init__(self, optimizer: str = "adamw", seed: int = 0, inf_calls: Sequence[int] = ()) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))
        self.optimizer_name = optimizer
        self.inf_calls = set(inf_calls)  # 1-based training_step calls whose loss is multiplied by inf
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.calls += 1
        loss = self.loss(batch)
        return loss * math.inf if self.calls in self.inf_calls else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=BATCH, shuffle=False)


class ManualTinyNet(TinyNet):
    """Manual optimization; ``two_optimizers`` gives ``net.0`` an AdamW and ``net.2`` an SGD with momentum."""

    def __init__(self, two_optimizers: bool = False, clip: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.two_optimizers = two_optimizers
        self.clip = clip

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(self.loss(batch))
        for opt in opts:
            if self.clip is not None:
                mfu = next(cb for cb in self.trainer.callbacks if type(cb).__name__ == "MultiFrequencyUpdates")
                mfu.prepare_step(opt)
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()

    def configure_optimizers(self) -> Any:
        if not self.two_optimizers:
            return make_optimizer(self.optimizer_name, self.parameters())
        return [make_optimizer("adamw", self.net[0].parameters()), make_optimizer("sgd", self.net[2].parameters())]


def fit(
    model: pl.LightningModule,
    callbacks: Sequence[pl.Callback],
    tmp_path: Any,
    ckpt_path: Optional[str] = None,
    datamodule: Optional[pl.LightningDataModule] = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    **trainer_kwargs: Any,
) -> Trainer:
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(trainer_kwargs)
    trainer = Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, train_dataloaders, val_dataloaders, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def batches(epochs: int = 100) -> Iterator[Any]:
    """The batches a Trainer sees, epoch after epoch (no shuffling)."""
    for _ in range(epochs):
        yield from DataLoader(make_data(), batch_size=BATCH, shuffle=False)


def reference_fit(
    model: nn.Module,
    periods: dict[str, int],
    steps: int,
    make_opts: Callable[[nn.Module], list[torch.optim.Optimizer]],
    accumulate: int = 1,
    clip: Optional[float] = None,
    reduction: str = "mean",
    scaler: Optional[torch.amp.GradScaler] = None,
    inf_calls: Sequence[int] = (),
    data: Optional[Iterator[Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None,
) -> dict[str, list[int]]:
    """Plain PyTorch: a parameter with period C steps once per C committed steps, on the mean of its C gradients.

    ``periods`` maps parameter names to C (others: 1). A step whose gradients are not finite under ``scaler`` is not
    committed: the scaler skips it and its gradients are not kept. Returns, per parameter, the steps it moved at.
    """
    opts = make_opts(model)
    data = batches() if data is None else data
    loss_fn = loss_fn or (lambda m, b: m.loss(b))
    held: dict[str, list[Tensor]] = {n: [] for n in periods}
    moved: dict[str, list[int]] = {n: [] for n, _ in model.named_parameters()}
    calls = 0
    for step in range(1, steps + 1):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            calls += 1
            if scaler is None:
                loss = loss_fn(model, next(data))
            else:
                with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
                    loss = loss_fn(model, next(data))
            loss = loss * math.inf if calls in inf_calls else loss
            loss = loss / accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            for opt in opts:
                scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if finite:
            for name, p in model.named_parameters():
                period = periods.get(name, 1)
                if period == 1:
                    continue
                held[name].append(p.grad.clone())
                if len(held[name]) == period:
                    total = sum(held[name])
                    p.grad = total / period if reduction == "mean" else total
                    held[name] = []
                else:
                    p.grad = None
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for opt in opts:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
        if scaler is not None:
            scaler.update()
        for n, p in model.named_parameters():
            if not torch.equal(before[n], p.detach()):
                moved[n].append(step)
    return moved


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


class Compiled(nn.Module):
    """Stands for ``torch.compile(module)`` in name tests: the wrapped module is the child ``_orig_mod`` (as in
    torch's ``OptimizedModule``), without compiling anything."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)
