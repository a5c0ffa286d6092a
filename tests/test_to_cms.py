"""to_cms: ad-hoc level stacking of pretrained FFNs. Exact at inner_lr 0; otherwise only the targeted modules change."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning.callbacks import MultiFrequencyUpdates
from nl_lightning.levels import LevelSet, resolve_levels
from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.to_cms import CMSAdapter, cms_levels, to_cms

VOCAB, DIM, HIDDEN = 13, 8, 32
TARGETS = ["blocks.*.ffn"]


class FunctionalFFN(nn.Module):
    """An FFN with ``fc1``/``fc2`` attributes and a functional activation: needs ``activation="gelu"``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ThreeProjections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(DIM, HIDDEN), nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.silu(self.a(x)) * self.b(x))


class Block(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(DIM), ffn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.norm(x))


def sequential_ffn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))


class TinyLM(nn.Module):
    """Embedding, two blocks with ``nn.Sequential`` FFNs and one with a functional FFN, a head (all per token)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(
            [Block(sequential_ffn()), Block(sequential_ffn()), Block(FunctionalFFN(DIM, HIDDEN))]
        )
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


class MLPNet(nn.Module):
    """A classifier on 2-D inputs whose FFN has a ReLU and a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(HIDDEN, DIM))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ffn(torch.tanh(self.inp(x))))


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_pair(**kwargs) -> tuple[TinyLM, TinyLM]:
    torch.manual_seed(0)
    original = TinyLM().eval()
    converted = to_cms(copy.deepcopy(original), TARGETS, activation="gelu", **kwargs)
    return original, converted


def adapters(model: nn.Module) -> dict[str, CMSAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CMSAdapter)}


# ------------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("in_context", [True, False])
@pytest.mark.parametrize("chunk_sizes", [[2], [2, 3], [2, 3, 5]])
def test_lr_zero_is_exact(in_context, chunk_sizes):
    original, converted = lm_pair(chunk_sizes=chunk_sizes, in_context=in_context, inner_lr=0.0)
    assert set(adapters(converted)) == {"blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"}
    assert all(len(a.cms.blocks) == len(chunk_sizes) for a in adapters(converted).values())
    assert not converted.training and not any(m.training for m in converted.modules())
    with torch.no_grad():
        assert torch.equal(converted(tokens()), original(tokens()))

    torch.manual_seed(0)
    mlp = MLPNet().eval()
    with pytest.warns(UserWarning, match="drops the hidden dropout"):
        mlp_cms = to_cms(copy.deepcopy(mlp), ["ffn"], chunk_sizes, in_context=in_context, inner_lr=0.0)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(mlp_cms(x), mlp(x))


def test_token_axis_at_lr_zero_agrees_to_rounding():
    """The adapter takes the static path at lr 0; the chain's own token axis computes the same function to rounding."""
    original, converted = lm_pair(chunk_sizes=[2, 3], inner_lr=0.0)
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        y, _ = converted.blocks[0].ffn.cms(x)
        torch.testing.assert_close(y, original.blocks[0].ffn(x), rtol=0, atol=1e-6)


def test_levels_are_initialised_from_the_ffn():
    original, converted = lm_pair(chunk_sizes=[2, 3, 5], inner_lr=0.0)
    ffn, cms = original.blocks[0].ffn, converted.blocks[0].ffn.cms
    for i, blk in enumerate(cms.blocks):
        assert torch.equal(blk.w1, ffn[0].weight) and torch.equal(blk.b1, ffn[0].bias)
        assert torch.equal(blk.value, torch.zeros(DIM, DIM))  # targets start at 0
        assert blk.residual == (i > 0)
        assert isinstance(blk.norm, nn.Identity) == (i == 0)
        if i == 0:
            assert torch.equal(blk.w2, ffn[2].weight) and torch.equal(blk.b2, ffn[2].bias)
        else:
            assert not blk.w2.any() and not blk.b2.any() and isinstance(blk.norm, nn.RMSNorm)
        assert blk.w1 is not ffn[0].weight  # a copy: training the chain leaves the original alone


def test_float64_and_bias_free_ffn_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, DIM), nn.Sequential(nn.Linear(DIM, HIDDEN, bias=False), nn.SiLU(), nn.Linear(HIDDEN, DIM))
    )
    model = model.double().eval()
    converted = to_cms(copy.deepcopy(model), ["1"], [1, 2], in_context=False)
    assert converted[1].cms.blocks[0].w1.dtype == torch.float64
    assert not converted[1].cms.blocks[0].b1.any()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert torch.equal(converted(x), model(x))


# ------------------------------------------------------------------------------------------------------ locality
def test_lr_positive_changes_only_the_targeted_modules():
    original, converted = lm_pair(chunk_sizes=[2, 4], inner_lr=0.5)
    targeted = ("blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn")

    orig_params = dict(original.named_parameters())
    conv_params = dict(converted.named_parameters())
    kept = {n for n in conv_params if not n.startswith(targeted)}
    assert kept == {n for n in orig_params if not n.startswith(targeted)}
    for n in kept:
        assert torch.equal(conv_params[n], orig_params[n])
    before = {n: p.detach().clone() for n, p in conv_params.items()}

    def record(model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        handles = [
            m.register_forward_hook(lambda mod, args, y, name=name: out.__setitem__(name, y))
            for name, m in model.named_modules()
            if name in ("embed", "blocks.0.norm", "blocks.0.ffn", "blocks.0", "head")
        ]
        with torch.no_grad():
            out["logits"] = model(tokens())
        for h in handles:
            h.remove()
        return out

    ref, got = record(original), record(converted)
    assert torch.equal(got["embed"], ref["embed"])  # before the first targeted module: untouched
    assert torch.equal(got["blocks.0.norm"], ref["blocks.0.norm"])
    # the first chunk (2 tokens) is read with the pretrained weights; later chunks with the written fast weights
    torch.testing.assert_close(got["blocks.0.ffn"][:, :2], ref["blocks.0.ffn"][:, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(got["blocks.0.ffn"][:, 2:], ref["blocks.0.ffn"][:, 2:], atol=1e-4)
    assert not torch.allclose(got["logits"], ref["logits"], atol=1e-4)
    for n, p in converted.named_parameters():  # writes go to the fast state, never to the parameters
        assert torch.equal(p, before[n]), n


def test_gradients_reach_the_levels():
    _, converted = lm_pair(chunk_sizes=[2, 4], inner_lr=0.1)
    converted.train()
    F.cross_entropy(converted(tokens()).flatten(0, 1), tokens(seed=2).flatten()).backward()
    for name, adapter in adapters(converted).items():
        for i, blk in enumerate(adapter.cms.blocks):
            for pname in ("w1", "b1", "w2", "b2", "value"):
                grad = getattr(blk, pname).grad
                assert grad is not None and torch.isfinite(grad).all(), f"{name} level {i} {pname}"
            assert blk.w2.grad.abs().sum() > 0 and blk.value.grad.abs().sum() > 0, f"{name} level {i}"
            if i == 0:
                assert blk.w1.grad.abs().sum() > 0


def test_gradients_reach_static_levels():
    _, converted = lm_pair(chunk_sizes=[2, 4], in_context=False)
    converted(tokens()).square().mean().backward()
    for adapter in adapters(converted).values():
        first, second = adapter.cms.blocks
        assert all(getattr(first, p).grad.abs().sum() > 0 for p in ("w1", "b1", "w2", "b2"))
        assert second.w2.grad.abs().sum() > 0 and second.b2.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ streaming
def test_carry_state_equals_one_long_sequence():
    _, converted = lm_pair(chunk_sizes=[3, 5], inner_lr=0.3, carry_state=True)
    seq = tokens(seq=10)
    with torch.no_grad():
        first = converted(seq[:, :4])  # 4 tokens split both chunks (3 and 5) mid-chunk
        state = converted.blocks[0].ffn.state
        assert state is not None and [lvl.count for lvl in state.levels] == [1, 4]
        second = converted(seq[:, 4:])
        for adapter in adapters(converted).values():
            adapter.reset_state()
        full = converted(seq)
        for adapter in adapters(converted).values():
            adapter.reset_state()
        again = converted(seq[:, :4])
        continued = converted(seq[:, :4])
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-5)
    assert torch.equal(again, first)  # reset_state starts a new stream
    assert not torch.allclose(continued, first, atol=1e-4)  # without a reset the stream continues
    with pytest.raises(ValueError, match="Keep the batch size while carrying"):
        converted(seq[:1, :4])


def test_fresh_state_per_call_and_stored_state_is_detached():
    _, converted = lm_pair(chunk_sizes=[3], inner_lr=0.3)
    seq = tokens(seq=7)
    with torch.no_grad():
        assert torch.equal(converted(seq), converted(seq))  # each call is a new sequence
        assert converted.blocks[0].ffn.state is None
    _, carrying = lm_pair(chunk_sizes=[3], inner_lr=0.3, carry_state=True)
    carrying.train()
    carrying(seq).sum().backward()
    assert carrying.blocks[0].ffn.state.levels[0].w1.grad_fn is None
    carrying(seq).sum().backward()  # the second segment backpropagates into its own graph only


def test_adapter_input_shapes():
    torch.manual_seed(0)
    ffn = sequential_ffn().eval()
    adapter = CMSAdapter.from_ffn(ffn, [2], inner_lr=0.3)
    assert not adapter.training
    x = torch.randn(2, 3, 5, DIM)
    with torch.no_grad():
        y = adapter(x)
        assert y.shape == x.shape and isinstance(y, Tensor)
        assert torch.equal(y, adapter(x.reshape(6, 5, DIM)).reshape(x.shape))
        flat = torch.randn(4, DIM)  # (B, D): B sequences of one token, read with the pretrained weights
        torch.testing.assert_close(adapter(flat), ffn(flat), rtol=0, atol=1e-6)


def test_shared_ffn_becomes_one_shared_adapter():
    torch.manual_seed(0)
    ffn = sequential_ffn()
    model = nn.ModuleDict({"a": ffn, "b": ffn})
    to_cms(model, ["a", "b"], [2])
    assert isinstance(model["a"], CMSAdapter) and model["a"] is model["b"]


# ------------------------------------------------------------------------------------------------------ levels
def test_cms_levels_resolve_against_the_converted_model():
    _, converted = lm_pair(chunk_sizes=[2, 4], inner_lr=0.0)
    levels = cms_levels(converted, every=[1, 2])
    assert [lvl.name for lvl in levels][:2] == ["blocks.0.ffn.cms.level_0", "blocks.0.ffn.cms.level_1"]
    assert [lvl.every for lvl in levels] == [1, 2] * 3
    owned = resolve_levels(levels, converted.named_parameters())
    assert {n for n, _ in owned["blocks.2.ffn.cms.level_1"]} == {
        f"blocks.2.ffn.cms.blocks.1.{p}" for p in ("w1", "b1", "w2", "b2", "value", "norm.weight")
    }
    cms_params = {n for n, _ in converted.named_parameters() if ".cms." in n}
    assert {n for pairs in owned.values() for n, _ in pairs} == cms_params
    assert [lvl.every for lvl in cms_levels(converted)] == [2, 4] * 3  # default: the chunk sizes
    LevelSet(cms_levels(converted), converted.named_parameters())
    bare = nn.Sequential(ContinuumMemory(DIM, [1, 3]))
    resolve_levels(cms_levels(bare), bare.named_parameters())


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = to_cms(MLPNet(), ["ffn"], [1, 2], in_context=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)), 4)


def test_multi_frequency_updates_accepts_cms_levels(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped dropout
        module = Classifier()
    slow_before = module.model.ffn.cms.blocks[1].w2.detach().clone()
    updates = MultiFrequencyUpdates(cms_levels(module, every=[1, 2]))
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[updates],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert updates.num_updates == {"model.ffn.cms.level_0": 3, "model.ffn.cms.level_1": 1}
    assert not torch.equal(module.model.ffn.cms.blocks[1].w2, slow_before)


# ------------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_problem():
    torch.manual_seed(0)
    model = TinyLM()
    with pytest.raises(ValueError, match=r"'blocks\.0\.fnn' matches no sub-module.*'blocks\.0\.ffn'"):
        to_cms(model, ["blocks.0.fnn"], [2])
    with pytest.raises(ValueError, match=r"'layers\.\*' matches no sub-module"):
        to_cms(model, ["layers.*"], [2])
    with pytest.raises(ValueError, match=r"'blocks\.2\.ffn' \(FunctionalFFN\) has no activation module.*activation="):
        to_cms(model, ["blocks.2.ffn"], [2])
    with pytest.raises(ValueError, match=r"'blocks\.0' \(Block\) contains 'blocks\.0\.norm' \(LayerNorm\)"):
        to_cms(model, ["blocks.0"], [2])
    with pytest.raises(ValueError, match=r"both 'blocks\.0' and its sub-module 'blocks\.0\.ffn'"):
        to_cms(model, ["blocks.0", "blocks.0.ffn"], [2])
    with pytest.raises(ValueError, match=r"both 'blocks\.0' and its sub-module 'blocks\.0\.ffn\.0'"):
        to_cms(model, ["blocks.0", "blocks.*.ffn.0"], [2])  # '*' also matches dots
    with pytest.raises(ValueError, match=r"applies 'gelu'.*`activation='silu'`"):
        to_cms(model, ["blocks.0.ffn"], [2], activation="silu")
    with pytest.raises(ValueError, match=r"`activation` must be one of"):
        to_cms(model, ["blocks.2.ffn"], [2], activation="swish")
    with pytest.raises(ValueError, match=r"does not accept \['hidden_dims', 'residual'\]"):
        to_cms(model, ["blocks.0.ffn"], [2], hidden_dims=[4], residual=True)
    with pytest.raises(ValueError, match=r"`norm` given per level"):
        to_cms(model, ["blocks.0.ffn"], [2, 3], norm=["rmsnorm", "rmsnorm"])
    with pytest.raises(ValueError, match=r"chunk_sizes"):
        to_cms(model, ["blocks.0.ffn"], [0])
    with pytest.raises(ValueError, match=r"'blocks\.2\.ffn' \(FunctionalFFN\) has no activation"):
        to_cms(model, ["blocks.0.ffn", "blocks.2.ffn"], [2])  # atomic: nothing is replaced
    assert not adapters(model)
    with pytest.raises(ValueError, match=r"holds no ContinuumMemory"):
        cms_levels(model)


@pytest.mark.parametrize(
    ("ffn", "match"),
    [
        (ThreeProjections(), r"'ffn' \(ThreeProjections\) has three projections.*cannot tell the gate"),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 4)), r"width 8 to width 4"),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Mish(), nn.Linear(HIDDEN, DIM)), r"applies the activation Mish"),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)), r"without an activation is a linear map"),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Conv1d(1, 1, 1), nn.Linear(HIDDEN, DIM)), r"'ffn\.1' \(Conv1d\)"),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Tanh(), nn.Linear(HIDDEN, DIM)), r"2 activation modules"),
        (nn.Linear(DIM, DIM), r"contains 1 projections.*a single layer is not an FFN"),
    ],
)
def test_unsupported_ffns(ffn, match):
    model = nn.Module()
    model.ffn = ffn
    with pytest.raises(ValueError, match=match):
        to_cms(model, ["ffn"], [2])
    assert model.ffn is ffn
