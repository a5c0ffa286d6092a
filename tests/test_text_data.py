"""Byte-level text: the default corpus, encode/decode, head/tail splits, random crops per epoch, argument checks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Trainer

from nl_lightning.data.text import (
    RandomCropSampler,
    TextDataModule,
    TextDataset,
    decode,
    default_corpus,
    encode,
    load_corpus,
)


def _setup(**kwargs) -> TextDataModule:
    dm = TextDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_default_corpus_loads_offline():
    from pydoc_data.topics import topics

    data = load_corpus()
    expected = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    assert data.dtype == torch.uint8 and len(data) == len(expected) == len(default_corpus()) > 100_000
    assert bytes(data.tolist()) == expected
    assert decode(data[:2000]) == expected[:2000].decode("utf-8", errors="replace")


def test_encode_decode_round_trip():
    text = "naïve café: ∑ 世界 ✓"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and len(tokens) == len(text.encode("utf-8")) > len(text)
    assert int(tokens.max()) <= 255 and decode(tokens) == text and decode(tokens.tolist()) == text
    assert decode(torch.tensor([104, 105, 0xFF])) == "hi\ufffd"  # invalid UTF-8 is replaced
    with pytest.raises(ValueError):
        decode(torch.tensor([104, -100]))
    with pytest.raises(ValueError):
        decode(torch.zeros(2, 3, dtype=torch.long))


def test_splits_are_disjoint_head_and_tail():
    dm = _setup(seq_len=32, batch_size=8, val_fraction=0.1, samples_per_epoch=64)
    corpus, cut = dm.corpus, dm.split_index
    assert cut == round(len(corpus) * 0.9)
    assert torch.equal(dm.train_set.data, corpus[:cut]) and torch.equal(dm.val_set.data, corpus[cut:])
    # every training crop lies in the head: it is the window at the sampled start
    loader = dm.train_dataloader()
    starts = loader.sampler.indices()
    assert int(starts.max()) + 33 <= cut and len(loader.sampler) == 64
    batch = next(iter(loader))
    for row, s in enumerate(starts[:8].tolist()):
        assert torch.equal(batch["tokens"][row], corpus[s : s + 32].long())
    # validation: contiguous non-overlapping windows of the tail, in order
    tokens = torch.cat([b["tokens"] for b in dm.val_dataloader()]).flatten()
    targets = torch.cat([b["targets"] for b in dm.val_dataloader()]).flatten()
    tail = corpus[cut:].long()
    assert len(tokens) == (len(tail) - 1) // 32 * 32
    assert torch.equal(tokens, tail[: len(tokens)]) and torch.equal(targets, tail[1 : len(tokens) + 1])
    assert torch.equal(next(iter(dm.test_dataloader()))["tokens"], next(iter(dm.val_dataloader()))["tokens"])


def test_crops_are_shifted_windows():
    dm = _setup(seq_len=48, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "targets"}
    assert batch["tokens"].shape == batch["targets"].shape == (4, 48) and batch["tokens"].dtype == torch.int64
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    assert dm.vocab_size == 256


def test_crops_are_deterministic_per_seed_and_epoch():
    torch.manual_seed(1)
    a = next(iter(_setup(seq_len=16, seed=3).train_dataloader()))["tokens"]
    torch.manual_seed(2)  # the global seed plays no part
    b = next(iter(_setup(seq_len=16, seed=3).train_dataloader()))["tokens"]
    c = next(iter(_setup(seq_len=16, seed=4).train_dataloader()))["tokens"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    loader = _setup(seq_len=16, seed=3).train_dataloader()
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["tokens"], a)
    loader.sampler.set_epoch(0)
    assert torch.equal(next(iter(loader))["tokens"], a)


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["tokens"]))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_draws_new_crops_every_epoch():
    dm = TextDataModule(seq_len=16, batch_size=4, samples_per_epoch=4, seed=5)
    model = _Recorder()
    trainer = Trainer(
        max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    (e0, first), (e1, second) = model.seen
    assert (e0, e1) == (0, 1) and not torch.equal(first, second)
    sampler = RandomCropSampler(len(dm.train_set), 4, seed=5)
    for epoch, seen in ((0, first), (1, second)):
        sampler.set_epoch(epoch)
        assert torch.equal(seen, torch.stack([dm.train_set[i]["tokens"] for i in sampler]))


def test_paths_are_joined_with_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first file " * 30)
    (tmp_path / "b.txt").write_text("second ✓ " * 30, encoding="utf-8")
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    dm = _setup(paths=paths, seq_len=8, val_fraction=0.25)
    assert bytes(dm.corpus.tolist()) == (tmp_path / "a.txt").read_bytes() + b"\n\n" + (tmp_path / "b.txt").read_bytes()
    assert torch.equal(load_corpus(paths[0]), load_corpus([paths[0]]))  # one path as a plain string


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(paths=[missing])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus([missing])


def test_text_dataset_without_lightning():
    data = TextDataset(b"abcdefghij", seq_len=3)  # windows at 0, 3, 6 (the last needs bytes 6..9)
    assert len(data) == 3 and decode(data[2]["tokens"]) == "ghi" and decode(data[2]["targets"]) == "hij"
    assert decode(data[-1]["tokens"]) == "ghi"
    crops = TextDataset(b"abcdefghij", seq_len=3, stride=1)
    assert len(crops) == 7 and decode(crops[6]["targets"]) == "hij"
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(ValueError):
        TextDataset(b"abc", seq_len=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seq_len=0),
        dict(batch_size=0),
        dict(val_fraction=0.0),
        dict(val_fraction=1.0),
        dict(samples_per_epoch=0),
        dict(num_workers=-1),
        dict(seed=1.5),
        dict(paths=[]),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        TextDataModule(**kwargs)


def test_split_too_short_for_seq_len_raises():
    dm = TextDataModule(seq_len=100_000, val_fraction=0.05)
    with pytest.raises(ValueError, match="held-out split"):
        dm.setup("fit")
