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
"""The text needle: a key-value fact in byte-level text, queried at the end (nl_lightning.data.text_needle)."""

import pytest
import torch

from nl_lightning.data import TextNeedleDataModule
from nl_lightning.data.text import load_corpus
from nl_lightning.data.text_needle import (
    ALPHABET,
    MARKER,
    SEPARATOR,
    TextNeedleDataset,
    fact_length,
    stream_length,
)

TEXT = load_corpus()[:20_000]


def _fact(data: TextNeedleDataset, i: int) -> torch.Tensor:
    marker, sep = torch.tensor([MARKER]), torch.tensor([SEPARATOR])
    return torch.cat([marker, data.keys[i], sep, data.values[i]])


def _sequence(data: TextNeedleDataset, i: int) -> torch.Tensor:
    """The sample's ``T + 1`` bytes: its tokens and the last target."""
    return torch.cat([data.tokens[i], data.values[i, -1:]])


@pytest.mark.parametrize("kwargs", [{"seq_len": 128}, {"distance": 300, "lead": 10}])
def test_layout(kwargs):
    data = TextNeedleDataset(TEXT, 16, key_len=2, value_len=3, seed=1, **kwargs)
    size = fact_length(2, 3)
    assert size == 7
    for i in range(16):
        seq, p = _sequence(data, i), int(data.positions[i])
        fact = _fact(data, i)
        assert torch.equal(seq[p : p + size], fact)  # the fact at its position
        assert torch.equal(seq[-size:], fact)  # the query and its value at the end
        assert int(data.distances[i]) == len(seq) - size - (p + size)  # text bytes between them
        text = torch.cat([seq[:p], seq[p + size : -size]])  # the haystack: one contiguous crop of the corpus
        starts = [s for s in range(len(TEXT) - len(text) + 1) if TEXT[s] == text[0]]
        assert any(torch.equal(TEXT[s : s + len(text)].long(), text) for s in starts)
        assert bool(torch.isin(data.keys[i], ALPHABET).all()) and bool(torch.isin(data.values[i], ALPHABET).all())
    if "distance" in kwargs:
        assert data.tokens.shape == (16, stream_length(300, 2, 3, 10))
        assert (data.positions == 10).all() and (data.distances == 300).all()
    else:
        assert data.tokens.shape == (16, 128)
        assert data.distances.min() >= 0 and data.distances.max() <= 129 - 2 * size


def test_targets_only_on_the_value():
    data = TextNeedleDataset(TEXT, 8, seq_len=64, key_len=2, value_len=4)
    scored = data.targets != -100
    assert scored.sum() == 8 * 4 and scored[:, -4:].all()
    assert torch.equal(data.targets[:, -4:], data.values)
    # teacher forcing: the query's separator predicts the first value byte, each value byte the next one
    assert (data.tokens[:, -4] == SEPARATOR).all() and torch.equal(data.tokens[:, -3:], data.values[:, :3])


def test_marker_only_in_fact_and_query():
    data = TextNeedleDataset(TEXT, 32, seq_len=256)
    assert bool((TEXT != MARKER).all())
    assert ((data.tokens == MARKER).sum(dim=1) == 2).all()  # the fact's marker and the query's, nothing else
    assert bool((data.tokens[torch.arange(32), data.positions] == MARKER).all())


def test_marker_in_corpus_raises():
    text = TEXT[:1000].clone()
    text[500] = MARKER
    with pytest.raises(ValueError, match="marker byte 0"):
        TextNeedleDataset(text, 2, seq_len=64)


def test_deterministic_by_seed():
    a, b = TextNeedleDataset(TEXT, 8, seq_len=64, seed=3), TextNeedleDataset(TEXT, 8, seq_len=64, seed=3)
    c = TextNeedleDataset(TEXT, 8, seq_len=64, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 64, "distance": 10}, "exactly one"),
        ({}, "exactly one"),
        ({"seq_len": 10}, "seq_len"),
        ({"distance": -1}, "distance"),
        ({"distance": 30_000}, "bytes of text"),
        ({"seq_len": 64, "value_len": 0}, "value_len"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextNeedleDataset(TEXT, 2, **kwargs)


def test_data_module():
    dm = TextNeedleDataModule(seq_len=64, batch_size=4, train_samples=16, val_samples=6, eval_distances=(100, 500))
    dm.setup("fit")
    assert dm.eval_lengths == [64, stream_length(100), stream_length(500)]
    loaders = dm.val_dataloader()
    assert [next(iter(dl))["tokens"].shape[1] for dl in loaders] == dm.eval_lengths
    assert next(iter(dm.train_dataloader()))["tokens"].shape == (4, 64)
    assert torch.equal(dm.stream(500).tokens, dm.val_sets[2].tokens)
    assert not torch.equal(dm.stream(500, index=1).tokens, dm.val_sets[2].tokens)
    again = TextNeedleDataModule(seq_len=64, batch_size=4, train_samples=16, val_samples=6, eval_distances=(100, 500))
    again.setup("fit")
    assert torch.equal(again.train_set.tokens, dm.train_set.tokens)
    with pytest.raises(ValueError, match="eval_distances"):
        TextNeedleDataModule(eval_distances=(5, 5))
