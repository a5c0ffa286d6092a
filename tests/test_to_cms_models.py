"""to_cms on FFNs of models we did not write: gated FFNs (fused and separate projections), torch's transformer layers
(and Lightning's demo transformer built on them), output and hidden dropout. At inner_lr=0 the converted model is
bitwise the original; with writes on, the CMS is really in the path; errors name the real reason first."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from torch import Tensor, nn

from nl_lightning.models.to_cms import (
    CMSAdapter,
    CMSTransformerDecoderLayer,
    CMSTransformerEncoderLayer,
    cms_levels,
    to_cms,
)
from nl_lightning.models.transformer import TransformerPP

DIM, HIDDEN = 16, 24


def adapters(model: nn.Module) -> list[CMSAdapter]:
    return [m for m in model.modules() if isinstance(m, CMSAdapter)]


def converted(model: nn.Module, targets, chunk_sizes=(2, 4), **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hidden-dropout warnings, tested on their own below
        return to_cms(copy.deepcopy(model), targets, list(chunk_sizes), **kwargs)


class NoFastPath:
    """torch's fused transformer inference path off, so the original computes with the ops its modules name."""

    def __enter__(self) -> None:
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc) -> None:
        torch.backends.mha.set_fastpath_enabled(self.before)


# ------------------------------------------------------------------------------------------------ gated FFNs
def test_transformerpp_fused_swiglu_is_exact_and_gated():
    torch.manual_seed(0)
    model = TransformerPP(vocab_size=64, dim=32, depth=2, heads=4, segment_len=16)
    cms = converted(model, "blocks.*.mlp", inner_lr=0.0)
    tokens = torch.randint(0, 64, (2, 21))
    for train in (False, True):
        model.train(train), cms.train(train)
        assert torch.equal(cms(tokens)[0], model(tokens)[0])
    model.eval(), cms.eval()
    assert torch.equal(cms.generate(tokens[:, :5], 8, temperature=0), model.generate(tokens[:, :5], 8, temperature=0))
    chain = cms.blocks[0].mlp.cms
    assert [blk.activation for blk in chain.blocks] == ["glu_silu", "glu_silu"]  # the added level is gated too
    assert torch.equal(chain.blocks[1].w1, model.blocks[0].mlp.gate_up.weight)  # gate rows, then up rows
    assert chain.blocks[1].w2.abs().sum() == 0  # adds nothing until it learns


class MixtralFFN(nn.Module):
    """Separate projections named as in Mixtral (w1 gate, w3 up, w2 down), a functional SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(DIM, HIDDEN), nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaLikeMLP(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.up_proj = nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, DIM, bias=False)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize(
    ("ffn", "kwargs"),
    [
        (MixtralFFN(), {"activation": "silu"}),
        (LlamaLikeMLP(nn.SiLU()), {}),
        (LlamaLikeMLP(nn.GELU()), {}),  # GeGLU
        (LlamaLikeMLP(nn.GELU(approximate="tanh")), {}),  # Gemma's GeGLU
    ],
)
@pytest.mark.parametrize("in_context", [True, False])
def test_separate_gated_projections_are_exact(ffn, kwargs, in_context):
    torch.manual_seed(0)
    model = nn.Sequential(ffn)
    cms = converted(model, "0", in_context=in_context, inner_lr=0.0, **kwargs)
    x = torch.randn(3, 7, DIM)
    assert torch.equal(cms(x), model(x))
    assert cms[0].cms.blocks[0].gated and cms[0].cms.blocks[1].gated


def test_gated_writes_change_the_reads_and_every_parameter_trains():
    torch.manual_seed(0)
    model = nn.Sequential(LlamaLikeMLP(nn.SiLU()))
    cms = converted(model, "0", chunk_sizes=(2, 4), inner_lr=0.5)
    x = torch.randn(2, 9, DIM)
    y = cms(x)
    assert torch.allclose(y[:, :2], model(x)[:, :2], atol=1e-6)  # the first chunk reads the pretrained weights
    assert not torch.allclose(y[:, 2:], model(x)[:, 2:], atol=1e-3)  # then the writes change the reads
    optimizer = torch.optim.SGD(cms.parameters(), lr=0.1)
    for _ in range(2):  # the added level's zero output layer first takes a step; then every parameter has a gradient
        optimizer.zero_grad()
        cms(x).pow(2).sum().backward()
        optimizer.step()
    missing = [n for n, p in cms.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# ------------------------------------------------------------------------------------------------ torch layers
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.GELU(approximate="tanh"), nn.SiLU()])
def test_torch_encoder_layers_are_exact_and_take_the_cms_path(activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, 4, 32, dropout=0.0, batch_first=True, activation=activation)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    cms = converted(model, "layers.*", inner_lr=0.0)
    assert all(isinstance(m, CMSTransformerEncoderLayer) for m in cms.layers)
    assert not hasattr(cms.layers[0], "linear1") and cms.use_nested_tensor is False
    calls = []
    for adapter in adapters(cms):
        adapter.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 9, DIM)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    for train in (True, False):
        model.train(train), cms.train(train)
        assert torch.equal(cms(x), model(x))
    with torch.no_grad(), NoFastPath():  # the conditions of torch's fast path, which would read linear1 directly
        assert torch.equal(cms(x, src_key_padding_mask=mask), model(x, src_key_padding_mask=mask))
    with torch.no_grad():
        cms(x, src_key_padding_mask=mask)  # fast path enabled: the converted layers still run the CMS
    assert len(calls) == 2 * 4


def test_lightning_demo_transformer_converts_exactly_and_writes():
    """``lightning.pytorch.demos.Transformer`` (torch encoder and decoder layers, dropout 0.2): exact in eval mode; in
    train mode the hidden dropout is dropped (warned), so outputs are compared in eval mode."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=33, ninp=32, nhead=2, nhid=64, nlayers=2).eval()
    targets = ["transformer.encoder.layers.*", "transformer.decoder.layers.*"]
    with pytest.warns(UserWarning, match=r"drops the hidden dropout \['transformer\.encoder\.layers\.0\.dropout'\]"):
        exact = to_cms(copy.deepcopy(model), targets, [2, 4], inner_lr=0.0)
    assert isinstance(exact.transformer.decoder.layers[1], CMSTransformerDecoderLayer)
    assert len(adapters(exact)) == 4 and len(cms_levels(exact)) == 8
    tokens = torch.randint(0, 33, (2, 10))
    with torch.no_grad(), NoFastPath():
        assert torch.equal(exact(tokens, tokens), model(tokens, tokens))
    writing = converted(model, targets, inner_lr=0.01)
    with torch.no_grad():
        assert not torch.allclose(writing(tokens, tokens), model(tokens, tokens), atol=1e-4)


def test_writes_that_blow_up_raise_instead_of_passing_nan_on():
    torch.manual_seed(0)
    model = Transformer(vocab_size=33, ninp=32, nhead=2, nhid=64, nlayers=2).train()
    tokens = torch.randint(0, 33, (4, 64))
    targets = ["transformer.encoder.layers.*", "transformer.decoder.layers.*"]
    unbounded = dict(max_write_norm=None)  # the printed rule: the default bound on the writes keeps them finite
    with pytest.raises(FloatingPointError, match=r"inner_lr=\[0\.3, 0\.3\].*Lower inner_lr"):
        converted(model, targets, inner_lr=0.3, **unbounded)(tokens, tokens)
    assert converted(model, targets, inner_lr=0.3)(tokens, tokens).isfinite().all()
    unchecked = converted(model, targets, inner_lr=0.3, check_finite=False, **unbounded)
    assert not unchecked(tokens, tokens).isfinite().all()  # what the check catches
    healthy = converted(model, targets, inner_lr=0.01)
    assert healthy(tokens, tokens).isfinite().all()


def test_non_finite_input_is_blamed_upstream():
    adapter = CMSAdapter.from_ffn(nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)), [2])
    x = torch.randn(1, 4, DIM)
    x[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="upstream of the CMS"):
        adapter(x)


def test_a_functional_layer_activation_that_cannot_be_identified_needs_activation():
    layer = nn.TransformerEncoderLayer(DIM, 4, 32, dropout=0.0, batch_first=True, activation=lambda x: F.gelu(x))
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"cannot identify; pass the activation it computes as `activation=`"):
        converted(model, "0")
    cms = converted(model, "0", activation="gelu", inner_lr=0.0)
    x = torch.randn(2, 5, DIM)
    assert torch.equal(cms(x), model(x))


# ------------------------------------------------------------------------------------------------ dropout
def test_output_dropout_is_kept_and_hidden_dropout_dropped():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Dropout(0.0), nn.Linear(HIDDEN, DIM), nn.Dropout(0.3))
    model = nn.Sequential(ffn)
    cms = to_cms(copy.deepcopy(model), "0", [2, 4], inner_lr=0.0)  # hidden p = 0: nothing to warn about
    assert cms[0].dropout is not None and cms[0].dropout.p == 0.3
    x = torch.randn(2, 6, DIM)
    model.train(), cms.train()
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    assert torch.equal(cms(x), want)  # same dropout mask: the output dropout runs at the same point
    ffn[2].p = 0.1
    with pytest.warns(UserWarning, match=r"drops the hidden dropout \['0\.2'\]"):
        to_cms(copy.deepcopy(model), "0", [2])


# ------------------------------------------------------------------------------------------------ errors, records
@pytest.mark.parametrize(
    ("ffn", "match"),
    [
        (
            LlamaLikeMLP(nn.Mish()),
            r"^Module '0\.act_fn' inside Module '0' \(LlamaLikeMLP\) applies the activation Mish",
        ),
        (nn.Sequential(nn.Linear(DIM, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)), "besides"),
        (nn.Sequential(nn.Linear(DIM, 2 * HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, DIM)), r"needs 'gate' in its name"),
    ],
)
def test_errors_name_the_real_reason_first(ffn, match):
    model = nn.Sequential(ffn)
    with pytest.raises(ValueError, match=match):
        to_cms(model, "0", [2])
    assert model[0] is ffn  # nothing replaced


def test_converting_twice_is_refused_and_conversions_are_recorded():
    model = nn.Sequential(LlamaLikeMLP(nn.SiLU()), LlamaLikeMLP(nn.SiLU()))
    to_cms(model, "0", [2, 4], inner_lr=0.0)
    to_cms(model, ["1"], [3], in_context=False)
    assert model.nl_cms_conversions == [
        {
            "targets": ["0"],
            "chunk_sizes": [2, 4],
            "activation": None,
            "in_context": True,
            "carry_state": False,
            "cms_kwargs": {"inner_lr": 0.0},
        },
        {
            "targets": ["1"],
            "chunk_sizes": [3],
            "activation": None,
            "in_context": False,
            "carry_state": False,
            "cms_kwargs": {},
        },
    ]
    with pytest.raises(ValueError, match=r"'0' is already converted"):
        to_cms(model, "0", [2])
