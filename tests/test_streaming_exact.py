"""Every stateful model and memory streams exactly, and greedy generation equals re-reading the sequence.

For each module that carries a state (the self-modifying Titans, the in-context CMS, Hope, Hope-Attention with and
without a window, Titans MAL), in float64: reading a sequence token by token, a prompt in one call then one token at a
time, or in segments cut at random points, each carrying the state, gives the outputs of one pass over the whole
sequence to within :data:`TOL`. The chunk sizes are chosen so that the memories' chunks, the CMS levels and the split
points fall out of step. :class:`~nl_lightning.models.lm.CausalLM.generate` with ``temperature=0`` must pick, at every
step, the argmax of one pass over the whole sequence so far, for every language model including the stateless
Transformer++.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.hope import HopeModule
from nl_lightning.models.self_modifying_titans import SelfModifyingTitans
from nl_lightning.models.titans import TitansMAL
from nl_lightning.models.transformer import TransformerPP

TOL = 1e-8
DIM, HEADS, DEPTH, VOCAB, BATCH = 16, 2, 2, 32, 2
LENGTHS = [1, 7, 16, 29]
LM = dict(vocab_size=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS)

#: Memories: ``module(x (B, T, DIM) float64, state) -> (y, state)``.
MEMORIES: dict[str, Callable[[], nn.Module]] = {
    "smt_chunk4": lambda: SelfModifyingTitans(DIM, HEADS, chunk_size=4, eta_init=0.3),
    "smt_chunk3_mem5": lambda: SelfModifyingTitans(DIM, HEADS, chunk_size=3, mem_chunk_size=5, eta_init=0.3),
    "cms_4_8": lambda: ContinuumMemory(DIM, [4, 8], hidden_mult=2, in_context=True, inner_lr=[0.5, 0.3]),
    "cms_5_7": lambda: ContinuumMemory(DIM, [5, 7], hidden_mult=2, in_context=True, inner_lr=0.5, retention=0.8),
}

#: Language models: ``model(tokens (B, T) int64, state) -> (logits, state)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "hope_chunk4_cms_4_8": lambda **kw: HopeModule(**LM, chunk_size=4, cms_chunk_sizes=[4, 8], **kw),
    "hope_chunk3_cms_5_7": lambda **kw: HopeModule(**LM, chunk_size=3, cms_chunk_sizes=[5, 7], **kw),
    "hope_target_chunk4_cms_4_8": lambda **kw: HopeModule(
        **LM, chunk_size=4, cms_chunk_sizes=[4, 8], cms_write_signal="target", **kw
    ),
    "hope_target_chunk3_cms_5_7": lambda **kw: HopeModule(
        **LM, chunk_size=3, cms_chunk_sizes=[5, 7], cms_write_signal="target", **kw
    ),
    "hope_attention": lambda **kw: HopeModule(**LM, variant="attention", cms_chunk_sizes=[4, 8], **kw),
    "hope_attention_window5": lambda **kw: HopeModule(
        **LM, variant="attention", window=5, cms_chunk_sizes=[5, 7], **kw
    ),
    "titans_chunk4_window6": lambda **kw: TitansMAL(**LM, window=6, chunk_size=4, **kw),
    "titans_chunk3_window5": lambda **kw: TitansMAL(**LM, window=5, chunk_size=3, **kw),
}

STATELESS: dict[str, Callable[..., nn.Module]] = {
    "transformer": lambda **kw: TransformerPP(**LM, max_context=64, **kw),
    "transformer_window4": lambda **kw: TransformerPP(**LM, max_context=64, window=4, **kw),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    factory = MEMORIES.get(name) or MODELS[name]
    return factory().double().eval()


def _inputs(name: str, length: int) -> Tensor:
    """float64 ``(B, T, DIM)`` for a memory, int64 tokens ``(B, T)`` for a language model."""
    gen = torch.Generator().manual_seed(length)
    if name in MEMORIES:
        return torch.randn(BATCH, length, DIM, generator=gen, dtype=torch.float64)
    return torch.randint(0, VOCAB, (BATCH, length), generator=gen)


@torch.no_grad()
def _stream(module: nn.Module, x: Tensor, cuts: list[int]) -> Tensor:
    """The outputs of reading ``x`` in the pieces ``x[:, cuts[i]:cuts[i + 1]]``, carrying the state."""
    outs, state = [], None
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        y, state = module(x[:, start:stop], state)
        outs.append(y)
    return torch.cat(outs, dim=1)


def _check_stream(name: str, length: int, cuts: list[int]) -> None:
    module = _build(name)
    x = _inputs(name, length)
    with torch.no_grad():
        full, _ = module(x)
    streamed = _stream(module, x, cuts)
    assert streamed.shape == full.shape and streamed.dtype == torch.float64
    diff = float((streamed - full).abs().max())
    assert diff <= TOL, f"{name}, length {length}, cuts {cuts}: max |streamed - one pass| = {diff:.3e}"


def _random_cuts(length: int, seed: int) -> list[int]:
    """Cut points at random (a fixed seed): between 1 and ``length - 1`` inner cuts, sorted, distinct."""
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, max(2, length), (1,), generator=gen))
    inner = torch.randperm(length - 1, generator=gen)[: min(count, length - 1)] + 1
    return [0, *sorted(int(c) for c in inner), length]


STREAMING = sorted(MEMORIES) + sorted(MODELS)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", STREAMING)
def test_token_by_token_equals_one_pass(name: str, length: int) -> None:
    _check_stream(name, length, list(range(length + 1)))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", STREAMING)
def test_prompt_then_tokens_equals_one_pass(name: str, length: int) -> None:
    prompt = max(1, 2 * length // 3)
    _check_stream(name, length, [0, *range(prompt, length + 1)])


@pytest.mark.parametrize("length", LENGTHS[1:])
@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_segments_equal_one_pass(name: str, length: int, seed: int) -> None:
    _check_stream(name, length, _random_cuts(length, seed))


def _sharpen(model: nn.Module) -> nn.Module:
    """Give a random-weight model an argmax that depends on the context: an untied head of unit-variance rows and
    every block's linear weights scaled by 4 (at the default small initialisation, the last token's own embedding
    decides the argmax and greedy decoding repeats one token)."""
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
        for module in model.blocks.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("memorize", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS) + sorted(STATELESS))
def test_greedy_generate_equals_rereading(name: str, memorize: bool) -> None:
    """Reads a 7-token prompt in segments of 3, then generates 20 tokens (crossing several chunk boundaries); with
    ``memorize_at_eval=False`` the memories read without writing, in generation and in the reference alike."""
    torch.manual_seed(0)
    factory = {**MODELS, **STATELESS}[name]
    model = _sharpen(factory(segment_len=3, tie_embeddings=False, memorize_at_eval=memorize).double().eval())
    prompt = torch.randint(0, VOCAB, (BATCH, 7), generator=torch.Generator().manual_seed(1))
    new = 20
    out = model.generate(prompt, new, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(new):  # the reference: one pass over the whole sequence so far for every new token
            logits, _ = model(seq, write=memorize)
            seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert model.max_context is None or seq.shape[1] <= model.max_context  # TransformerPP re-reads it all
    assert torch.equal(out, seq), f"{name}: generated {out[:, 7:].tolist()}, re-reading gives {seq[:, 7:].tolist()}"
    assert all(row.unique().numel() >= 4 for row in out[:, 7:]), f"{name}: degenerate tokens {out[:, 7:].tolist()}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_segments_see_the_previous_segment_without_its_gradient(name: str) -> None:
    """``segment_forward`` (as in training) gives the logits of one pass, and the state it carries into a segment is
    detached: a loss on the second segment sends no gradient to the embeddings of tokens read only in the first."""
    torch.manual_seed(0)
    model = MODELS[name](tie_embeddings=False).double()
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, VOCAB // 2, (BATCH, 9), generator=gen)
    second = torch.randint(VOCAB // 2, VOCAB, (BATCH, 12), generator=gen)
    tokens = torch.cat([first, second], dim=1)
    logits, _ = model.segment_forward(tokens, segment_len=9)
    with torch.no_grad():
        full, _ = model(tokens)
    diff = float((logits.detach() - full).abs().max())
    assert diff <= TOL, f"{name}: max |segments - one pass| = {diff:.3e}"
    logits[:, 9:].pow(2).sum().backward()
    grad = model.embed.weight.grad
    assert grad[: VOCAB // 2].abs().max() == 0 and grad[VOCAB // 2 :].abs().max() > 0
