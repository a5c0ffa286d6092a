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
"""No silent NaN: bounded CMS writes, the warnings of unbounded rules, and non-finite losses named and stopped."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import fit
from test_cms import make, reference
from torch.utils.data import DataLoader

from nl_lightning.callbacks import NestedLearningMonitor
from nl_lightning.models import HopeModule, NeuralMemory, TitansMAL
from nl_lightning.models.cms import DEFAULT_MAX_WRITE_NORM, ContinuumMemory
from nl_lightning.models.cms_memory import write_factor

UNBOUNDED = "unbounded"


def text_batches(length: int = 32) -> list[dict[str, torch.Tensor]]:
    """Byte-level text (this file's source), cut into sequences of ``length`` tokens and their next bytes."""
    with open(__file__, "rb") as f:
        data = torch.tensor(list(f.read()[:6000]))
    seqs = data[: len(data) // (length + 1) * (length + 1)].view(-1, length + 1)
    return [{"tokens": s[:-1], "targets": s[1:]} for s in seqs]


def tiny_hope(bound, **kwargs) -> HopeModule:
    """A tiny Hope whose CMS writes with its local objective at 10x the default inner rates (0.01 * 0.3**i), trained
    at an outer lr of 1.0 with no warm-up."""
    torch.manual_seed(0)
    return HopeModule(
        vocab_size=256, dim=32, depth=2, heads=4, chunk_size=4, cms_chunk_sizes=[4, 8], cms_inner_lr=[0.1, 0.03],
        cms_write_signal="target", cms_max_write_norm=bound, lr=1.0, warmup_steps=0, **kwargs,
    )  # fmt: skip


def train(model, tmp_path, callbacks=(), max_steps=50, **kwargs):
    loader = DataLoader(text_batches(), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    return fit(model, list(callbacks), tmp_path, train_dataloaders=loader, max_steps=max_steps, **kwargs)


def _loss_tracker():
    from lightning.pytorch import Callback

    class Track(Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if outputs is not None:
                self.values.append(float(outputs["loss"]))

    return Track()


# ------------------------------------------------------------------------------------------------ bounded CMS writes
def test_write_factor_bounds_each_samples_step_over_the_four_weights():
    pending = (torch.ones(3, 2, 2), torch.ones(3, 2), torch.ones(3, 2, 2), torch.ones(3, 2))  # norm sqrt(12) each
    pending = tuple(p * torch.tensor([1.0, 0.01, 0.0]).view(-1, *[1] * (p.dim() - 1)) for p in pending)
    factor = write_factor(pending, 0.5, 1.0)  # steps 0.5 sqrt(12) = 1.73, 0.0173 and 0
    assert torch.allclose(factor, torch.tensor([1 / (0.5 * math.sqrt(12)), 1.0, 1.0]))
    assert write_factor(pending, 0.5, None) is None and write_factor(None, 0.5, 1.0) is None
    assert write_factor(pending, 0.0, 1.0) is None


@pytest.mark.parametrize("differentiable_writes", [True, False])
@pytest.mark.parametrize("retention", [1.0, 0.7])
def test_bounded_writes_match_a_clipped_token_by_token_reference(differentiable_writes, retention):
    """A bound reached by most writes but not all: outputs and the gradients of the input and of every parameter
    equal a float64 token-by-token reference whose writes scale each sample's step to the bound (the factor
    differentiated through with differentiable writes, a constant with first-order ones)."""
    torch.manual_seed(0)
    bound = 1.6
    cms = make(chunk_sizes=(2, 3), retention=retention, differentiable_writes=differentiable_writes,
               max_write_norm=bound).double()  # fmt: skip
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    # the bound is active on some writes, not all (measured on the first level's writes)
    blk = cms.blocks[0]
    with torch.no_grad():
        factors = []
        state = blk.initial_state(2, dtype=torch.float64)
        for t in range(x.shape[1]):
            _, _, _, state, f = blk._piece(state, blk.norm(x[:, t : t + 1]), blk.norm(x[:, t : t + 1]) @ blk.value.T)
            if f is not None:
                factors.append(f)
    factors = torch.cat(factors)
    assert (factors < 1).any() and (factors == 1).any()

    y, _ = cms(x)
    y.pow(2).sum().backward()
    ours = {n: p.grad.clone() for n, p in cms.named_parameters()}
    x_grad, x.grad = x.grad.clone(), None
    cms.zero_grad()
    kind = dict(create_graph=True) if differentiable_writes else dict(first_order=True)
    y_ref, _ = reference(cms, x, **kind)
    assert torch.allclose(y, y_ref, atol=1e-10), (y - y_ref).abs().max()
    y_ref.pow(2).sum().backward()
    assert torch.allclose(x_grad, x.grad, atol=1e-9), (x_grad - x.grad).abs().max()
    for name, p in cms.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-9), (name, (ours[name] - p.grad).abs().max())
    # and the bound matters: the unbounded memory gives other outputs
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        cms_free = make(chunk_sizes=(2, 3), retention=retention, differentiable_writes=differentiable_writes,
                        max_write_norm=None).double()  # fmt: skip
    cms_free.load_state_dict(cms.state_dict())
    with torch.no_grad():
        assert not torch.allclose(cms_free(x)[0], y, atol=1e-6)


def test_task_loss_writes_are_bounded_too():
    """Hope's default (task-loss) CMS writes go through the same bounded write: one write of level 0 moves each
    sample's fast weights by at most the bound, and the unbounded rule moves them further."""
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))  # level 0 writes once
    moved = {}
    for bound in (1e-3, None):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HopeModule(vocab_size=256, dim=32, depth=1, heads=4, chunk_size=4, cms_chunk_sizes=[4, 8],
                               cms_max_write_norm=bound, cms_retention=1.0)  # fmt: skip
        assert model.cms_write_signal == "task_loss"
        _, state = model(tokens)
        level = model.blocks[0].cms.blocks[0]
        fast = state.blocks[0].cms.levels[0]
        deltas = [(w - p).detach().flatten(1) for w, p in zip(fast.weights, level._initial(), strict=True)]
        moved[bound] = torch.cat(deltas, dim=1).norm(dim=1)  # (B,)
    assert (moved[1e-3] <= 1e-3 * (1 + 1e-4)).all() and (moved[1e-3] > 0).all()
    assert (moved[None] > 2e-3).all()  # the bound binds


def test_max_write_norm_none_warns_and_bad_values_raise():
    with pytest.warns(UserWarning, match="max_write_norm=None.*unbounded"):
        ContinuumMemory(8, [2], in_context=True, max_write_norm=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContinuumMemory(8, [2], in_context=False, max_write_norm=None)  # static: no writes, no warning
        ContinuumMemory(8, [2], in_context=True, inner_lr=0.0, max_write_norm=None)  # no writes
        assert ContinuumMemory(8, [2], in_context=True).blocks[0].max_write_norm == DEFAULT_MAX_WRITE_NORM
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match=r"`max_write_norm` must be .*or None"):
            ContinuumMemory(8, [2], in_context=True, max_write_norm=bad)


def test_unbounded_memory_rules_warn():
    with pytest.warns(UserWarning, match="max_inner_grad_norm=None"):
        NeuralMemory(16, heads=2, chunk_size=4, max_inner_grad_norm=None)
    with pytest.warns(UserWarning, match="max_inner_grad_norm=None"):
        TitansMAL(vocab_size=16, dim=16, depth=1, heads=2, window=4, chunk_size=4,
                  memory_kwargs={"max_inner_grad_norm": None})  # fmt: skip
    with pytest.warns(UserWarning, match="max_inner_grad_norm': None"):
        HopeModule(vocab_size=16, dim=16, depth=1, heads=2, chunk_size=4, cms_chunk_sizes=[4],
                   titans_kwargs={"max_inner_grad_norm": None})  # fmt: skip
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        HopeModule(vocab_size=16, dim=16, depth=1, heads=2, chunk_size=4, cms_chunk_sizes=[4], cms_max_write_norm=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuralMemory(16, heads=2, chunk_size=4)
        HopeModule(vocab_size=16, dim=16, depth=1, heads=2, chunk_size=4, cms_chunk_sizes=[4])


# ------------------------------------------------------------------------------------------------ the Hope repro
def test_hope_at_ten_times_the_inner_rates_and_outer_lr_one_stays_finite(tmp_path):
    """The issue's repro: with the unbounded rule this model's loss is NaN from step 1 on; with the default bound all
    50 steps are finite, without a warning."""
    track = _loss_tracker()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tiny_hope(DEFAULT_MAX_WRITE_NORM), tmp_path, [track])
    assert trainer.global_step == 50 and len(track.values) == 50
    assert all(math.isfinite(v) for v in track.values)
    assert not [w for w in caught if "non-finite" in str(w.message) or "NaN" in str(w.message)]


def test_unbounded_hope_warns_once_naming_the_block_and_memory(tmp_path):
    track = _loss_tracker()
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        model = tiny_hope(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(model, tmp_path, [track], max_steps=4)
    assert trainer.global_step == 4  # it trains on (stop_on_nonfinite=False)
    assert not math.isfinite(track.values[-1])
    messages = [str(w.message) for w in caught if "training loss is nan" in str(w.message)]
    assert len(messages) == 1  # once
    assert "state.blocks[0].cms.levels[0]" in messages[0]  # block 0, CMS level 0
    assert "stop_on_nonfinite=True" in messages[0]
    assert model.nonfinite_reason is not None and "state.blocks[0].cms.levels[0]" in model.nonfinite_reason


def test_unbounded_hope_with_stop_on_nonfinite_stops_with_the_reason(tmp_path):
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        model = tiny_hope(None, stop_on_nonfinite=True)
    with pytest.warns(RuntimeWarning, match=r"training loss is nan.*state\.blocks\[0\]\.cms.*Stopping the run"):
        trainer = train(model, tmp_path)
    assert trainer.should_stop and trainer.global_step < 5
    assert "state.blocks[0].cms.levels[0]" in model.nonfinite_reason
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no step was taken on the NaN loss


# ------------------------------------------------------------------------------------------------ the monitor
def test_monitor_stops_the_run_on_a_nonfinite_loss_and_names_the_cms(tmp_path):
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        model = tiny_hope(None)  # the model's own stop flag off: the monitor stops it
    monitor = NestedLearningMonitor(stop_on_nonfinite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(model, tmp_path, [monitor], log_every_n_steps=50)  # no logging step before it stops
    assert trainer.global_step < 5
    assert monitor.stop_reason is not None and "training loss is nan" in monitor.stop_reason
    assert "blocks.0.cms" in monitor.stop_reason  # the token-axis CMS states that went non-finite
    assert any("stops the run" in str(w.message) for w in caught)


def test_monitor_without_the_flag_warns_at_logging_steps_and_trains_on(tmp_path):
    with pytest.warns(UserWarning, match="max_write_norm=None"):
        model = tiny_hope(None)
    monitor = NestedLearningMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(model, tmp_path, [monitor], max_steps=3, log_every_n_steps=1)
    assert trainer.global_step == 3 and monitor.stop_reason is None
    messages = [str(w.message) for w in caught if str(w.message).startswith("NestedLearningMonitor: at step")]
    assert len(messages) == 1 and "training loss is nan" in messages[0] and "blocks.0.cms" in messages[0]


def test_monitor_stop_flag_must_be_a_bool():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="stop_on_nonfinite"):
        NestedLearningMonitor(stop_on_nonfinite="yes")


def test_a_nonfinite_evaluation_loss_warns_naming_the_parameter(tmp_path):
    from lightning.pytorch import Trainer

    from nl_lightning.models import TransformerPP

    torch.manual_seed(0)
    model = TransformerPP(vocab_size=256, dim=16, depth=1, heads=2)
    with torch.no_grad():
        model.blocks[0].mlp_norm.weight[0] = float("nan")
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)  # fmt: skip
    match = r"the val loss is nan at step 0; it started in the parameter 'blocks.0.mlp_norm.weight'"
    with pytest.warns(RuntimeWarning, match=match):
        trainer.validate(model, DataLoader(text_batches()[:2], batch_size=2), verbose=False)
