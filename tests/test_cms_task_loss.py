"""Hope with CMS writes driven by the task loss (``cms_write_signal="task_loss"``), in float64 at tiny sizes.

Streaming: reading a sequence token by token, a prompt then tokens, or in random segments (carrying the state, its
open loss term included) gives the logits of one pass to within :data:`TOL`, and greedy ``generate()`` equals
re-reading the whole sequence at every step. Writes: the fast weights of a level after its first and second writes
equal a plainly written recurrence whose every term is the autograd gradient of one position's next-token
cross-entropy, read one token at a time by the target-mode model with its CMS writes off and the level's weights
injected into its state.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning.models import HopeBlock, HopeModule, HopeState
from nl_lightning.models.cms_memory import CMSState, FastWeights
from nl_lightning.models.hope import HopeBlockState

TOL = 1e-8
VOCAB, DIM, HEADS, DEPTH, BATCH = 32, 16, 2, 2, 2
LM = dict(vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, cms_inner_lr=0.5)
CONFIGS = {
    "chunk4_cms_4_8": dict(chunk_size=4, cms_chunk_sizes=[4, 8], cms_retention=1.0),
    "chunk3_cms_3_5_rho08": dict(chunk_size=3, cms_chunk_sizes=[3, 5], cms_retention=0.8),
}


def _model(config: str, **kw: Any) -> HopeModule:
    torch.manual_seed(0)
    return HopeModule(**{**LM, **CONFIGS[config], **kw}, cms_write_signal="task_loss").double().eval()


def _tokens(length: int, seed: int = 0, batch: int = BATCH) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_cuts(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    inner = torch.randperm(length - 1, generator=gen)[: int(torch.randint(1, length, (1,), generator=gen))] + 1
    return [0, *sorted(int(c) for c in inner), length]


@torch.no_grad()
def _stream(model: HopeModule, x: Tensor, cuts: list[int]) -> tuple[Tensor, HopeState]:
    outs, state = [], None
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        y, state = model(x[:, start:stop], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def _cms_weights(state: HopeState) -> list[Tensor]:
    return [w for block in state.blocks for level in block.cms.levels for w in level.weights]


# ------------------------------------------------------------------------------------------------ exact streaming
@pytest.mark.parametrize("length", [1, 7, 16, 29])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_split_equals_one_pass(config: str, length: int) -> None:
    """Token by token, a prompt then tokens, and three random splits: the logits of one pass, and its final state."""
    model = _model(config)
    x = _tokens(length, seed=length)
    with torch.no_grad():
        full, final = model(x)
    prompt = max(1, 2 * length // 3)
    splits = [list(range(length + 1)), [0, *range(prompt, length + 1)]]
    splits += [_random_cuts(length, seed) for seed in range(3)] if length > 1 else []
    for cuts in splits:
        streamed, state = _stream(model, x, cuts)
        diff = float((streamed - full).abs().max())
        assert diff <= TOL, f"{config}, length {length}, cuts {cuts}: max |streamed - one pass| = {diff:.3e}"
        states = max(float((a - b).abs().max()) for a, b in zip(_cms_weights(state), _cms_weights(final), strict=True))
        assert states <= TOL, f"{config}, cuts {cuts}: CMS weights differ by {states:.3e}"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_writes_change_the_logits(config: str) -> None:
    """The task-loss writes are not a no-op: the same model with its CMS inner learning rates at 0 reads otherwise."""
    model = _model(config)
    still = copy.deepcopy(model)
    for level in still.blocks.modules():
        if hasattr(level, "inner_lr"):
            level.inner_lr = 0.0
    x = _tokens(20)
    with torch.no_grad():
        assert float((model(x)[0] - still(x)[0]).abs().max()) > 1e-3


def test_segments_under_inference_mode_and_training_equal_one_pass() -> None:
    """``segment_forward`` (detaching the state, its open term kept) under grad, and two calls under
    ``torch.inference_mode`` continued outside it, give the logits of one pass."""
    model = _model("chunk3_cms_3_5_rho08")
    x = _tokens(23)
    with torch.no_grad():
        full, _ = model(x)
    logits, _ = model.segment_forward(x, segment_len=7)
    assert logits.requires_grad and float((logits.detach() - full).abs().max()) <= TOL
    with torch.inference_mode():
        first, state = model(x[:, :10])
    with torch.no_grad():
        rest, _ = model(x[:, 10:], state.detach())
    assert float((torch.cat([first.clone(), rest], dim=1) - full).abs().max()) <= TOL


def test_select_detach_and_state_dict_continue_the_stream() -> None:
    """A state whose write is due (its last position closes chunks of both levels) survives ``select``,
    ``detach`` and a ``state_dict`` round trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    import io

    model = _model("chunk4_cms_4_8")
    x = _tokens(14, batch=3)
    with torch.no_grad():
        full, _ = model(x)
        _, state = model(x[:, :8])
        assert state.deferred is not None and [lvl.count for lvl in state.blocks[0].cms.levels] == [4, 8]
        buffer = io.BytesIO()
        torch.save(state.detach().select(torch.tensor([2, 0])).state_dict(), buffer)
        buffer.seek(0)
        loaded = HopeState.from_state_dict(torch.load(buffer, weights_only=True))
        rest, _ = model(x[[2, 0], 8:], loaded)
    assert float((rest - full[[2, 0], 8:]).abs().max()) <= TOL


def test_write_false_reads_and_keeps_the_open_term() -> None:
    """``write=False`` reads with the current weights and leaves the CMS state, its due writes and open term alone."""
    model = _model("chunk4_cms_4_8")
    x = _tokens(12)
    with torch.no_grad():
        _, state = model(x[:, :8])
        _, after = model(x[:, 8:], state, write=False)
    assert after.deferred is state.deferred
    assert [lvl.count for lvl in after.blocks[1].cms.levels] == [4, 8]
    assert all(torch.equal(a, b) for a, b in zip(_cms_weights(after), _cms_weights(state), strict=True))


def _sharpen(model: HopeModule) -> HopeModule:
    """An argmax that depends on the context (as in ``test_streaming_exact``): a unit-variance untied head and every
    block's linear weights scaled by 4."""
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
        for module in model.blocks.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("memorize", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_generate_equals_rereading(config: str, memorize: bool) -> None:
    """A 7-token prompt read in segments of 3, then 20 greedy tokens: each is the argmax of one pass over the
    sequence so far (inner learning rate 0.1: at 0.5 the sharpened model's writes soon make it repeat one token)."""
    kw = dict(segment_len=3, tie_embeddings=False, memorize_at_eval=memorize, cms_inner_lr=0.1)
    model = _sharpen(_model(config, **kw))
    prompt = _tokens(7, seed=1)
    out = model.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(seq, write=memorize)
            seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq), f"generated {out[:, 7:].tolist()}, re-reading gives {seq[:, 7:].tolist()}"
    assert all(row.unique().numel() >= 4 for row in out[:, 7:])


# ------------------------------------------------------------------------------------------------ the writes
def _one_writing_level(config: str, block: int, retention: float) -> HopeModule:
    """The task-loss model with level 0 of ``block`` as its only writing CMS level."""
    model = _model(config)
    for i, blk in enumerate(model.blocks):
        for j, level in enumerate(blk.cms.blocks):
            level.retention = retention
            if (i, j) != (block, 0):
                level.inner_lr = 0.0
    return model


def _reader(model: HopeModule, config: str) -> HopeModule:
    """The same parameters in target mode with every CMS inner learning rate 0: its CMS reads only."""
    kw = {**LM, **CONFIGS[config], "cms_inner_lr": 0.0}
    reader = HopeModule(**kw).double().eval()
    missing, unexpected = reader.load_state_dict(model.state_dict(), strict=False)
    assert all(k.endswith(".value") for k in missing) and not unexpected
    return reader


def _fresh(reader: HopeModule, batch: int) -> HopeState:
    """The reader's initial state, made explicit so that a level's weights can be replaced in it."""
    return HopeState([HopeBlockState(None, b.cms.initial_state(batch, dtype=torch.float64)) for b in reader.blocks])


def _inject(state: HopeState, block: int, weights: list[Tensor]) -> None:
    """Replace the weights of level 0 of ``block`` in ``state``, keeping its position in the chunk."""
    levels = list(state.blocks[block].cms.levels)
    levels[0] = FastWeights(*weights, count=levels[0].count)
    state.blocks[block].cms = CMSState(levels)


def _reference_weights(model: HopeModule, config: str, block: int, x: Tensor) -> list[Tensor]:
    """Level 0 of ``block`` after the writes of ``x`` (its last token opens a chunk): token by token, each position's
    term ``grad CE(logits_t, x_{t+1})`` by autograd w.r.t. probes added to the level's weights in the reader's state
    (the state carried detached: the gradient through that position's forward only), then
    ``W <- lerp(W_0, W, rho) - (eta / C) P`` at every chunk end."""
    reader, level = _reader(model, config), model.blocks[block].cms.blocks[0]
    size, scale, rho = level.chunk_size, level.inner_lr / level.chunk_size, level.retention
    initial = [p.detach() for p in (level.w1, level.b1, level.w2, level.b2)]
    weights = [w.expand(x.shape[0], *w.shape) for w in initial]
    pending = [torch.zeros_like(w) for w in weights]
    state = _fresh(reader, x.shape[0])
    for t in range(x.shape[1]):
        probes = [torch.zeros_like(w, requires_grad=True) for w in weights]
        _inject(state, block, [w + p for w, p in zip(weights, probes, strict=True)])
        logits, state = reader(x[:, t : t + 1], state)
        if t + 1 < x.shape[1]:
            loss = F.cross_entropy(logits[:, 0], x[:, t + 1], reduction="sum")
            pending = [p + g for p, g in zip(pending, torch.autograd.grad(loss, probes), strict=True)]
        state = state.detach()
        if (t + 1) % size == 0 and t + 1 < x.shape[1]:
            weights = [torch.lerp(w0, w, rho) - scale * p for w, w0, p in zip(weights, initial, pending, strict=True)]
            pending = [torch.zeros_like(w) for w in weights]
    return weights


@pytest.mark.parametrize("writes", [1, 2])
@pytest.mark.parametrize("retention", [1.0, 0.8])
@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_writes_follow_the_plain_recurrence(config: str, block: int, retention: float, writes: int) -> None:
    """After ``writes * C + 1`` tokens the level's weights equal the token-by-token autograd recurrence; after
    ``writes * C`` tokens the last write is still due (it waits for its last position's target)."""
    model = _one_writing_level(config, block, retention)
    size = model.blocks[block].cms.blocks[0].chunk_size
    x = _tokens(writes * size + 1, seed=3)
    expected = _reference_weights(model, config, block, x)
    with torch.no_grad():
        _, state = model(x)
        _, due = model(x[:, :-1])
    got, before = state.blocks[block].cms.levels[0], due.blocks[block].cms.levels[0]
    assert got.count == 1 and before.count == size and before.pending is not None
    for w, ref in zip(got.weights, expected, strict=True):
        assert float((w - ref).abs().max()) <= 1e-10
    assert float((got.w1 - before.w1).abs().max()) > 1e-6  # the write moved the weights


def test_first_write_of_the_last_block_is_the_plain_gradient_of_the_summed_loss() -> None:
    """For the last block, whose CMS outputs reach no later position, the first write is
    ``W_0 - (eta / C) grad sum_{t < C} CE(logits_t, x_{t+1})`` with the gradient of one plain pass of the reader
    (summed over the batch: per-sample weights get per-sample gradients). For the first block that one-pass gradient
    also flows through later positions (the second block's Titans mixes positions), so it is not the write."""
    config = "chunk4_cms_4_8"
    size = 4
    x = _tokens(size + 1, seed=5)
    for block, equal in [(DEPTH - 1, True), (0, False)]:
        model = _one_writing_level(config, block, 0.8)
        reader, level = _reader(model, config), model.blocks[block].cms.blocks[0]
        initial = [p.detach() for p in (level.w1, level.b1, level.w2, level.b2)]
        probes = [torch.zeros(BATCH, *w.shape, dtype=torch.float64, requires_grad=True) for w in initial]
        state = _fresh(reader, BATCH)
        _inject(state, block, [w + p for w, p in zip(initial, probes, strict=True)])
        logits, _ = reader(x[:, :size], state)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1 : size + 1].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, probes)
        with torch.no_grad():
            _, written = model(x)
        diff = max(
            float((w - (w0 - level.inner_lr / size * g)).abs().max())
            for w, w0, g in zip(written.blocks[block].cms.levels[0].weights, initial, grads, strict=True)
        )
        assert (diff <= 1e-10) if equal else (diff > 1e-8), (block, diff)


# ------------------------------------------------------------------------------------------------ training
def _batch(length: int = 20, batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor]:
    tokens = _tokens(length + 1, seed=seed, batch=batch)
    targets = tokens[:, 1:].clone()
    return tokens[:, :-1], targets


def test_every_parameter_gets_a_gradient_and_lightning_trains_and_validates(tmp_path) -> None:
    """``sequence_loss`` over two segments sends every parameter a finite, nonzero gradient (there is no value
    projection); the Trainer runs 3 steps and a validation; under inference mode the model writes."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, chunk_size=4, cms_chunk_sizes=[2, 4, 8])
    model = HopeModule(**kw, segment_len=10, cms_write_signal="task_loss", warmup_steps=0)
    assert not any(name.endswith(".value") for name, _ in model.named_parameters())
    tokens, targets = _batch()
    loss, count, _ = model.sequence_loss(tokens, targets)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all() or not p.grad.any()]
    assert not bad, f"no, non-finite or all-zero gradient: {bad}"
    model.zero_grad()
    loader = DataLoader(TensorDataset(*_batch(batch=8, seed=1)), batch_size=4)
    trainer = fit(
        model,
        [],
        tmp_path,
        train_dataloaders=loader,
        val_dataloaders=loader,
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train_loss"])
    results = trainer.validate(model, dataloaders=loader, verbose=False)
    assert torch.isfinite(torch.tensor(results[0]["val_loss"]))
    with torch.inference_mode():
        memorized = float(model.sequence_loss(tokens, targets, write=True)[0])
        read_only = float(model.sequence_loss(tokens, targets, write=False)[0])
        _, state = model(tokens)
        initial = model.blocks[0].cms.initial_state(BATCH).detach()
    assert memorized != read_only
    assert float((state.blocks[0].cms.levels[0].w1 - initial.levels[0].w1).abs().max()) > 0


# ------------------------------------------------------------------------------------------------ errors
def test_errors() -> None:
    with pytest.raises(ValueError, match="'surprise'"):
        HopeModule(**LM, cms_write_signal="surprise")
    with pytest.raises(ValueError, match="'surprise'"):
        HopeBlock(DIM, HEADS, cms_write_signal="surprise")
    with pytest.raises(ValueError, match="variant='titans'"):
        HopeModule(**LM, variant="attention", cms_write_signal="task_loss")
    block = HopeBlock(DIM, HEADS, chunk_size=4, cms_chunk_sizes=[4], cms_write_signal="task_loss")
    assert block.cms.blocks[0].value is None
    with pytest.raises(RuntimeError, match="inside HopeModule"):
        block(torch.randn(1, 5, DIM))
    y, _ = block(torch.randn(1, 5, DIM), write=False)
    assert y.shape == (1, 5, DIM)


def test_streaming_under_inference_mode_carries_the_state_and_refuses_inference_parameters():
    """A stream read segment by segment under ``torch.inference_mode()`` (the state made there, carried across calls)
    equals one pass; a model built inside inference mode is refused with a message that names the fix."""
    torch.manual_seed(0)
    model = HopeModule(vocab_size=32, dim=16, depth=2, heads=2, chunk_size=4, cms_chunk_sizes=[4, 8]).eval()
    tokens = torch.randint(0, 32, (1, 23))
    with torch.inference_mode():
        full, _ = model(tokens)
        state, pieces = None, []
        for start in range(0, 23, 5):
            logits, state = model(tokens[:, start : start + 5], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        built_inside = HopeModule(vocab_size=32, dim=16, depth=1, heads=2, chunk_size=4, cms_chunk_sizes=[4])
        with pytest.raises(RuntimeError, match="created under torch.inference_mode"):
            built_inside(tokens)
