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
"""The per-query-rank accuracy of ``benchmarks/recall.py`` against the validation metric and two oracles."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from nl_lightning.data.synthetic import MQARDataModule
from nl_lightning.models.lm import CausalLM
from nl_lightning.models.transformer import TransformerPP

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def recall():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import recall as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


class Oracle(CausalLM):
    """Answers every query from the pairs (``bind=True``) or, not knowing which key a value belongs to, with the first
    value of the pairs not given yet in the query section (``bind=False``, elimination)."""

    def __init__(self, vocab_size: int, num_pairs: int, bind: bool) -> None:
        super().__init__(vocab_size)
        self.num_pairs, self.bind = num_pairs, bind
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, state=None, write=True):
        B, T = tokens.shape
        n = self.num_pairs
        keys, values = tokens[:, 0 : 2 * n : 2], tokens[:, 1 : 2 * n : 2]  # (B, n)
        logits = torch.zeros(B, T, self.vocab_size)
        start = T + 1 - 2 * n  # the query section: k v k v ... (the last value is the final target, not an input)
        for b in range(B):
            given: set[int] = set()
            for t in range(start, T, 2):
                if self.bind:
                    answer = values[b][keys[b] == tokens[b, t]][0]
                else:
                    answer = next(v for v in values[b].tolist() if v not in given)
                logits[b, t, answer] = 1.0
                if t + 1 < T:
                    given.add(int(tokens[b, t + 1]))
        return logits + 0 * self.dummy, None


def _data(**kwargs) -> MQARDataModule:
    dm = MQARDataModule(num_pairs=4, seq_len=64, vocab_size=64, val_samples=kwargs.pop("val_samples", 64), **kwargs)
    dm.setup("validate")
    return dm


def test_binding_oracle_scores_one_at_every_rank(recall):
    out = recall.accuracy_by_query(Oracle(64, 4, bind=True), _data(eval_multipliers=[1, 2]))
    assert out == {"64": [1.0] * 4, "128": [1.0] * 4}


def test_elimination_oracle_scores_one_over_the_values_left(recall):
    out = recall.accuracy_by_query(Oracle(64, 4, bind=False), _data(val_samples=2000))["64"]
    assert out[-1] == 1.0  # one value left for the last query
    for rank, acc in enumerate(out):
        assert acc == pytest.approx(1 / (4 - rank), abs=0.04), (rank, out)


def test_mean_over_ranks_is_the_validation_accuracy(recall):
    pl.seed_everything(0)
    model = TransformerPP(vocab_size=64, dim=32, depth=1, heads=2)
    dm = _data(eval_multipliers=[1, 2], batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = [{k: float(v) for r in trainer.validate(model, datamodule=dm, verbose=False) for k, v in r.items()}]
    out = recall.accuracy_by_query(model, dm)
    for length, ranks in out.items():
        assert sum(ranks) / len(ranks) == pytest.approx(metrics[f"val_acc_len{length}"], abs=1e-6)
