"""Every parameter of every language model receives a gradient from one training loss.

A parameter that never gets a gradient never leaves its initialisation: it costs memory and optimizer state and
learns nothing. Each model is tiny, and its sequence covers several chunks of every memory level (the slowest CMS level
included) over segments that carry the state, mid-chunk, into the next one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nl_lightning.models import HopeModule, TitansMAL, TransformerPP
from nl_lightning.models.lm import CausalLM

VOCAB, SEQ, SEGMENT = 32, 40, 20  # two segments; 20 is no multiple of the CMS chunks 8, so the state carries mid-chunk
TINY = dict(vocab_size=VOCAB, dim=16, depth=2, heads=2, segment_len=SEGMENT)
CMS = dict(cms_chunk_sizes=[2, 4, 8])  # the slowest level writes twice in each segment, with reads after each write

MODELS: dict[str, Callable[[], CausalLM]] = {
    "hope": lambda: HopeModule(**TINY, chunk_size=4, **CMS),  # CMS written by the task loss (the default)
    "hope_target": lambda: HopeModule(**TINY, chunk_size=4, cms_write_signal="target", **CMS),  # value projections
    "hope_attention": lambda: HopeModule(**TINY, variant="attention", window=8, **CMS),
    "titans_mal": lambda: TitansMAL(**TINY, window=8, chunk_size=4),
    "transformer_pp": lambda: TransformerPP(**TINY),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_training_loss_gives_every_parameter_a_gradient(name):
    """``sequence_loss`` backward: every parameter gets a finite gradient that is not all zeros."""
    torch.manual_seed(0)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    loss, count, _ = model.sequence_loss(tokens, targets)
    assert int(count) == 2 * SEQ and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not (missing or not_finite or zero), f"no gradient: {missing}; not finite: {not_finite}; all zero: {zero}"
