"""MQAR and needle in a haystack: answers checked by parsing each sequence, lengths, determinism, argument checks."""

from __future__ import annotations

import pytest
import torch

from nl_lightning.data.synthetic import MQARDataModule, MQARDataset, NeedleDataModule, NeedleDataset


def _check_mqar(tokens: torch.Tensor, targets: torch.Tensor, num_pairs: int, num_queries: int, vocab: int) -> None:
    """Parse every sequence: the pairs come first; each scored position holds an earlier key, its target that value."""
    half = vocab // 2
    for seq, tgt in zip(tokens.tolist(), targets.tolist(), strict=True):
        keys, values = seq[0 : 2 * num_pairs : 2], seq[1 : 2 * num_pairs : 2]
        assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs  # distinct keys (and values)
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
        pairs = dict(zip(keys, values, strict=True))
        scored = [t for t, y in enumerate(tgt) if y != -100]
        assert len(scored) == num_queries and min(scored) >= 2 * num_pairs
        assert len({seq[t] for t in scored}) == num_queries  # each key asked at most once
        for t in scored:
            assert seq[t] in pairs and tgt[t] == pairs[seq[t]]  # the value paired with that key earlier
            if t + 1 < len(seq):
                assert seq[t + 1] == tgt[t]  # teacher forcing: the answer is the next input
        # a key token occurs only in the pairs and at the queries (the filler holds value tokens only)
        key_positions = [t for t, x in enumerate(seq) if 1 <= x < half]
        assert key_positions == list(range(0, 2 * num_pairs, 2)) + scored


@pytest.mark.parametrize(
    ("seq_len", "num_pairs", "num_queries", "vocab"), [(64, 8, None, 64), (40, 5, 3, 32), (17, 4, 4, 12), (9, 3, 2, 8)]
)
def test_mqar_targets_are_the_paired_values(seq_len, num_pairs, num_queries, vocab):
    data = MQARDataset(300, seq_len, num_pairs, vocab, num_queries, seed=1)
    assert data.tokens.shape == data.targets.shape == (300, seq_len) and len(data) == 300
    _check_mqar(data.tokens, data.targets, num_pairs, num_queries or num_pairs, vocab)
    item = data[7]
    assert torch.equal(item["tokens"], data.tokens[7]) and torch.equal(item["targets"], data.targets[7])


def test_mqar_eval_lengths_scale_with_the_multipliers():
    dm = MQARDataModule(num_pairs=4, seq_len=24, vocab_size=32, num_queries=3, batch_size=8, train_samples=40,
                        val_samples=20, eval_multipliers=(1, 3, 5))  # fmt: skip
    assert dm.eval_lengths == [24, 72, 120] and dm.vocab_size == 32
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert len(loaders) == 3 and len(dm.test_dataloader()) == 3
    for loader, length in zip(loaders, dm.eval_lengths, strict=True):
        batch = next(iter(loader))
        assert batch["tokens"].shape == batch["targets"].shape == (8, length)
        _check_mqar(loader.dataset.tokens, loader.dataset.targets, 4, 3, 32)  # same pairs and queries, more filler
    assert next(iter(dm.train_dataloader()))["tokens"].shape == (8, 24)


def test_mqar_is_deterministic():
    def make(seed):
        dm = MQARDataModule(seq_len=32, num_pairs=4, train_samples=50, val_samples=10, seed=seed)
        dm.setup("fit")
        return dm

    torch.manual_seed(0)
    a = make(0)
    torch.manual_seed(1)  # the global seed plays no part
    b, c = make(0), make(1)
    assert torch.equal(a.train_set.tokens, b.train_set.tokens)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.val_sets, b.val_sets, strict=True))
    assert torch.equal(next(iter(a.train_dataloader()))["tokens"], next(iter(b.train_dataloader()))["tokens"])
    assert not torch.equal(a.train_set.tokens, c.train_set.tokens)
    assert not torch.equal(a.train_set.tokens[:10], a.val_sets[0].tokens)  # train and val differ


def _check_needle(data: NeedleDataset, vocab: int) -> None:
    half = vocab // 2
    for seq, tgt, pos in zip(data.tokens.tolist(), data.targets.tolist(), data.positions.tolist(), strict=True):
        markers = [t for t, x in enumerate(seq) if x == 0]
        assert markers == [pos, len(seq) - 2]  # the needle and the query
        key, value = seq[pos + 1], seq[pos + 2]
        assert 1 <= key < half and half <= value < vocab
        assert seq[-1] == key and tgt[-1] == value  # marker + key repeated at the end; the target is the value
        assert all(y == -100 for y in tgt[:-1])


def test_needle_layout_and_uniform_depths():
    data = NeedleDataset(200, seq_len=40, vocab_size=16, seed=2)
    _check_needle(data, 16)
    assert data.positions.min() >= 0 and data.positions.max() <= 40 - 5
    dm = NeedleDataModule(seq_len=20, vocab_size=16, batch_size=4, train_samples=30, val_samples=11,
                          eval_multipliers=(1, 2, 4))  # fmt: skip
    assert dm.eval_lengths == [20, 40, 80]
    dm.setup("fit")
    for loader, length in zip(dm.val_dataloader(), dm.eval_lengths, strict=True):
        ds = loader.dataset
        _check_needle(ds, 16)
        assert ds.tokens.shape == (11, length) and next(iter(loader))["tokens"].shape == (4, length)
        torch.testing.assert_close(ds.depths, torch.linspace(0, 1, 11, dtype=torch.float64))
        assert torch.equal(
            ds.positions, torch.round(torch.linspace(0, 1, 11, dtype=torch.float64) * (length - 5)).long()
        )
        assert ds.positions[0] == 0 and ds.positions[-1] == length - 5  # from the first token to just before the query
    _check_needle(dm.train_set, 16)


def test_needle_is_deterministic():
    a, b = NeedleDataset(20, 30, seed=4), NeedleDataset(20, 30, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, NeedleDataset(20, 30, seed=5).tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_pairs=40, vocab_size=64),  # more pairs than distinct keys
        dict(num_pairs=8, seq_len=30),  # 8 pairs + 8 queries need 31 tokens
        dict(num_pairs=4, num_queries=5),
        dict(num_queries=0),
        dict(vocab_size=3),
        dict(eval_multipliers=(1, 1)),
        dict(eval_multipliers=(0, 2)),
        dict(eval_multipliers=()),
        dict(batch_size=0),
        dict(val_samples=0),
    ],
)
def test_mqar_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MQARDataModule(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(seq_len=4), dict(vocab_size=3), dict(train_samples=0), dict(seed=None)])
def test_needle_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        NeedleDataModule(**kwargs)
    with pytest.raises(ValueError):
        NeedleDataset(5, depths=[0.0, 0.5, 1.5, 0.2, 0.1])
