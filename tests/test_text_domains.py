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
import ast

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning.data import text_domains
from nl_lightning.data.text_domains import (
    BUILTIN_DOMAINS,
    TextDomainsDataModule,
    builtin_domain,
    docstrings_of,
    domain_digest,
    stdlib_source_files,
    strip_docs,
)
from nl_lightning.models.transformer import TransformerPP

SOURCE = '''"""Module doc."""
import os  # a comment

# a whole-line comment
class A:
    """Class doc
    on two lines."""

    def f(self):
        """Only a docstring."""

    def g(self):
        s = "# not a comment"
        return s  # trailing
'''

BUDGET = 12_000  # small built-in domains keep the tests fast


def _domains(budget: int = BUDGET) -> list[bytes]:
    return [builtin_domain(name, budget) for name in BUILTIN_DOMAINS]


def test_strip_docs_removes_docstrings_comments_and_keeps_code():
    out = strip_docs(SOURCE)
    assert "doc" not in out.lower()
    assert "comment" not in out.replace('"# not a comment"', "")
    assert '"# not a comment"' in out  # a '#' inside a string is not a comment
    assert "    def f(self):\n        pass\n" in out  # a body that was only a docstring gets a pass
    assert "\n\n" not in out
    ast.parse(out)  # still valid Python


def test_docstrings_of_in_source_order_and_cleaned():
    assert docstrings_of(SOURCE) == ["Module doc.", "Class doc\non two lines.", "Only a docstring."]
    assert docstrings_of("x = 1\n") == []


def test_stdlib_files_are_ordered_and_skip_tests_and_pydoc_data():
    files = stdlib_source_files()
    assert len(files) > 100
    assert files == stdlib_source_files()
    parts = {p for f in files for p in f.parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "pydoc_data"}
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        stdlib_source_files("/no_such_dir")


def test_builtin_domains_are_deterministic_sized_and_disjoint():
    first = _domains()
    text_domains._stdlib_domain.cache_clear()  # rebuild from the files
    second = _domains()
    assert first == second
    assert [domain_digest(d) for d in first] == [domain_digest(d) for d in second]
    assert all(len(d) == BUDGET for d in first)
    assert len(set(first)) == 3
    # no 48-byte passage of one domain occurs in another
    for i, a in enumerate(first):
        for j, b in enumerate(first):
            if i != j:
                probes = [a[k : k + 48] for k in range(0, len(a) - 48, 500)]
                shared = [p for p in probes if p in b]
                assert not shared, (BUILTIN_DOMAINS[i], BUILTIN_DOMAINS[j], shared[:2])
    code = first[1].decode("utf-8", errors="replace")
    assert "def " in code and not any(line.lstrip().startswith("#") for line in code.splitlines())


def test_builtin_domain_bad_arguments():
    with pytest.raises(ValueError, match="Unknown built-in domain 'poetry'"):
        builtin_domain("poetry")
    with pytest.raises(ValueError, match="bytes_per_domain"):
        builtin_domain("code", 0)


def _user_domains() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    # three domains over disjoint byte ranges, so a window's domain can be read off its values
    return [bytes((torch.randint(0, 80, (3000,), generator=g) + 80 * k).tolist()) for k in range(3)]


def test_datamodule_shapes_splits_and_domain_selection():
    data = _user_domains()
    dm = TextDomainsDataModule(data, seq_len=16, batch_size=4, val_fraction=0.2, samples_per_epoch=12, seed=3)
    assert dm.num_domains == 3 and dm.domain_names == ["domain0", "domain1", "domain2"]
    dm.setup("fit")
    for k in range(3):
        cut = dm.split_index(k)
        assert cut == 2400
        assert bytes(dm.domain_bytes(k, "train").tolist()) == data[k][:cut]
        assert bytes(dm.domain_bytes(k, "val").tolist()) == data[k][cut:]  # held out: never in the training split
        assert torch.equal(dm.val_sets[k].data, dm.domain_bytes(k, "val"))
        dm.set_domain(k)
        batches = list(dm.train_dataloader())
        assert len(batches) == 3
        for batch in batches:
            assert batch["tokens"].shape == (4, 16) and batch["targets"].shape == (4, 16)
            assert batch["tokens"].dtype == torch.int64
            assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
            assert bool(((batch["tokens"] >= 80 * k) & (batch["tokens"] < 80 * (k + 1))).all())
        assert torch.equal(
            torch.cat([b["tokens"] for b in dm.train_dataloader()]), torch.cat([b["tokens"] for b in batches])
        )
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    for k, loader in enumerate(loaders):
        tokens = torch.cat([b["tokens"] for b in loader])
        assert tokens.shape[1] == 16 and tokens.shape[0] == (600 - 17) // 16 + 1
        assert bool(((tokens >= 80 * k) & (tokens < 80 * (k + 1))).all())
    assert len(dm.test_dataloader()) == 3


def test_datamodule_reads_paths_and_names(tmp_path):
    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    a.write_bytes(b"alpha " * 200)
    b.write_bytes(b"beta " * 200)
    c.write_bytes(b"gamma " * 200)
    dm = TextDomainsDataModule([str(a), [b, c]], domain_names=["A", "BC"], seq_len=8, bytes_per_domain=1000)
    dm.setup("fit")
    assert dm.domain_names == ["A", "BC"]
    assert bytes(dm.domain_bytes(0, "all").tolist()) == (b"alpha " * 200)[:1000]
    assert bytes(dm.domain_bytes(1, "all").tolist()) == (b"beta " * 200 + b"\n\n" + b"gamma " * 200)[:1000]


def test_builtin_datamodule_uses_the_builtin_domains():
    dm = TextDomainsDataModule(seq_len=32, bytes_per_domain=BUDGET)
    assert dm.domain_names == list(BUILTIN_DOMAINS)
    for k, raw in enumerate(_domains()):
        assert bytes(dm.domain_bytes(k, "all").tolist()) == raw


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domains": []}, "non-empty list"),
        ({"domains": "one.txt"}, "non-empty list"),
        ({"domains": ["/no/such/file.txt"]}, "Domain 0: Text file not found: '/no/such/file.txt'"),
        ({"domains": [b"abc", b""]}, "Domain 1 is empty"),
        ({"domains": [b"abc", b"def"], "domain_names": ["x"]}, "2 distinct non-empty strings"),
        ({"domains": [b"abc", b"def"], "domain_names": ["x", "x"]}, "2 distinct non-empty strings"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seq_len": 0}, "seq_len"),
        ({"bytes_per_domain": 0}, "bytes_per_domain"),
        ({"bytes_per_domain": None}, "built-in domains need a byte budget"),
        ({"train_domain": 3}, r"domain` must be an integer in 0..2"),
    ],
)
def test_datamodule_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        TextDomainsDataModule(**kwargs)


def test_set_domain_and_short_splits_fail_clearly():
    dm = TextDomainsDataModule([b"x" * 100, b"y" * 100], seq_len=16, val_fraction=0.1)
    with pytest.raises(MisconfigurationException, match=r"0\.\.1 \(\['domain0', 'domain1'\]\), got 2"):
        dm.set_domain(2)
    with pytest.raises(RuntimeError, match="call `setup\\(\\)`"):
        dm.train_dataloader()
    with pytest.raises(MisconfigurationException, match="held-out split of domain 'domain0' has 10 bytes"):
        dm.setup("fit")


def test_causal_lm_validates_every_domain():
    dm = TextDomainsDataModule(_user_domains(), seq_len=32, batch_size=8, val_fraction=0.1, samples_per_epoch=16)
    model = TransformerPP(vocab_size=256, dim=16, depth=1, heads=2, warmup_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    dm.set_domain(1)
    trainer.fit(model, datamodule=dm)
    results = pl.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").validate(
        model, datamodule=dm, verbose=False
    )
    assert len(results) == 3
    for k, res in enumerate(results):
        assert torch.isfinite(torch.tensor(res[f"val_bpc_dl{k}"]))
