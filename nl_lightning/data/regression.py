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
r"""
Slowly-changing regression
^^^^^^^^^^^^^^^^^^^^^^^^^^

The Slowly-Changing Regression problem of Dohare et al., "Loss of plasticity in deep continual learning" (Nature 632,
2024; Methods and Extended Data Fig. 2), also known as the bit-flipping problem: an online regression stream whose
input distribution drifts slowly while the target function stays fixed. A learner that loses plasticity sees its
online squared error *rise* over time.

**Input.** :math:`m + 1` bits (:math:`m = 20`): the first :math:`f = 15` "slow" (flipping) bits stay fixed for
:math:`T` steps (the paper uses :math:`T = 10{,}000`, this module defaults to 1000); at every boundary exactly one of
them, chosen uniformly at random, is flipped (``flip_one``); the next :math:`m - f = 5` bits are fresh i.i.d. fair
coin flips at every step; the last bit is always 1 (a bias input). The slow bits' initial values are fair coin flips.

**Target.** A fixed random network with one hidden layer of :math:`n = 100` linear threshold units (LTUs). Every
weight is :math:`-1` or :math:`+1` with probability 1/2: the input weights :math:`w_{ij}` (over the :math:`m + 1`
bits, the bias bit's weight included), the output weights :math:`v_i` and an output bias :math:`b`. With
:math:`\tilde x \in \{0, 1\}^{m+1}` the input including the bias bit,

.. math::

    S_i = \#\{j : w_{ij} = -1\}, \qquad \theta_i = (m + 1)\,\beta - S_i, \qquad
    f_i(\tilde x) = \mathbb{1}\Big[\sum_{j=1}^{m+1} w_{ij} \tilde x_j > \theta_i\Big], \qquad
    y = \sum_{i=1}^{n} v_i f_i(\tilde x) + b,

with :math:`\beta = 0.7`. The threshold is the paper's (after Sutton & Whitehead 1993 and Mahmood & Sutton 2013):
:math:`S_i` counts the negative weights, so :math:`\sum_j w_{ij} \tilde x_j \le (m + 1) - S_i` and an LTU fires only
when the input agrees closely with its weight pattern. ``y`` is an integer in :math:`[-n - 1, n + 1]`, stored as
``float32``.

*Differences from the authors' code* (``shibhansh/loss-of-plasticity``, ``lop/nets/fix_ltu_net.py``), kept on
purpose: there the bias bit is the ``bias`` of an ``nn.Linear`` over the 20 bits, and :math:`S_i` is computed as
:math:`(m - \sum_{j \le m} w_{ij} + w_{i,m+1}) / 2`, which adds :math:`\pm 1/2` for the bias weight instead of
counting it as one more negative weight; we count it as the paper's definition says. The output bias ``b`` is taken
from that code (the paper only says that every weight is :math:`\pm 1`).

**Determinism.** Sample ``t`` depends only on ``(seed, t)`` (and on ``change_every`` and the problem sizes), never on
``num_steps`` or the global seed: a shorter stream is a prefix of a longer one. The target network, the slow bits'
initial values, the flipped bit of each boundary and the noise bits come from separate
:class:`numpy.random.Generator` streams keyed by ``seed``, the latter two drawn in fixed-size blocks.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from nl_lightning._validation import check_int, check_unit

__all__ = ["SlowlyChangingRegression", "SlowlyChangingRegressionDataModule"]

_BLOCK = 4096  # rows per random block: sample t's randomness depends on (seed, t // _BLOCK) only
_TARGET_STREAM, _INIT_STREAM, _FLIP_STREAM, _NOISE_STREAM = 0, 1, 2, 3


def _blocked_integers(seed: int, stream: int, rows: int, cols: int, high: int) -> np.ndarray:
    """``rows`` rows of ``cols`` integers in ``[0, high)``; row ``r`` depends on ``(seed, stream, r)`` only."""
    out = np.empty((rows, cols), dtype=np.int64)
    for block, start in enumerate(range(0, rows, _BLOCK)):
        rng = np.random.default_rng([stream, block, seed])  # seed last: no two keys collide
        chunk = rng.integers(0, high, size=(_BLOCK, cols), dtype=np.int64)
        out[start : start + _BLOCK] = chunk[: rows - start]
    return out


class SlowlyChangingRegression(Dataset):
    r"""The slowly-changing regression stream of Dohare et al. (Nature 2024), generated up front as tensors.

    See the module documentation for the exact definition of the input bits and of the LTU target network. Step
    ``t`` belongs to regime ``t // change_every``; regime ``r`` differs from regime ``r - 1`` in exactly one slow bit.

    Args:
        num_steps: The length of the stream, ``>= 1``.
        change_every: The number of steps :math:`T` between two flips of a slow bit, ``>= 1`` (paper: 10,000).
        seed: The seed of the target network and of the stream, an integer ``>= 0``.
        num_bits: The number :math:`m` of random input bits (slow plus noise), ``>= 1``; the bias bit is extra.
        num_slow_bits: The number :math:`f` of slow bits, in ``[1, num_bits]``; the other ``num_bits - f`` bits are
            noise.
        num_target_features: The number :math:`n` of LTUs in the target network, ``>= 1``.
        beta: The LTU threshold parameter :math:`\beta`, in ``[0, 1]``.
        bias_bit: Whether the inputs ``data`` include the constant bias bit as their last column (the paper's
            :math:`m + 1` bits). The target uses the bias bit either way.

    Attributes:
        data: ``float32`` inputs in ``{0, 1}``, shape ``(num_steps, num_bits + bias_bit)``: slow bits, then noise bits,
            then the bias bit.
        targets: ``float32`` targets, shape ``(num_steps, 1)``.
        regime: ``int64`` regime index of every step, ``t // change_every``, shape ``(num_steps,)``.
        hidden_weights: The target's input weights :math:`w`, ``float32`` in ``{-1, 1}``, shape
            ``(num_target_features, num_bits + 1)`` (last column: the bias bit's weight).
        thresholds: The LTU thresholds :math:`\theta`, ``float32``, shape ``(num_target_features,)``.
        output_weights: The target's output weights :math:`v`, ``float32`` in ``{-1, 1}``, shape
            ``(num_target_features,)``.
        output_bias: The target's output bias :math:`b`, ``-1.0`` or ``1.0``.

    Raises:
        ValueError: If an argument is out of range or of the wrong type; the message names it.

    Example::

        from torch.utils.data import DataLoader

        stream = SlowlyChangingRegression(num_steps=20_000, change_every=1000, seed=0)
        x, y = stream[0]  # x: float32 (21,) in {0, 1}, y: float32 (1,)
        for x, y in DataLoader(stream, batch_size=1):  # in order: an online stream
            ...

    """

    def __init__(
        self,
        num_steps: int = 20_000,
        change_every: int = 1000,
        seed: int = 0,
        num_bits: int = 20,
        num_slow_bits: int = 15,
        num_target_features: int = 100,
        beta: float = 0.7,
        bias_bit: bool = True,
    ) -> None:
        for name, value, low in (
            ("num_steps", num_steps, 1),
            ("change_every", change_every, 1),
            ("seed", seed, 0),
            ("num_bits", num_bits, 1),
            ("num_target_features", num_target_features, 1),
        ):
            check_int(name, value, low, allow_numpy=True)
        check_int(
            "num_slow_bits",
            num_slow_bits,
            1,
            num_bits,
            allow_numpy=True,
            hint="at most num_bits; the paper uses 15 of 20",
        )
        check_unit("beta", beta, hint="the paper uses 0.7")
        if not isinstance(bias_bit, bool):
            raise ValueError(f"`bias_bit` must be a bool, got {bias_bit!r}.")
        self.num_steps, self.change_every, self.seed = int(num_steps), int(change_every), int(seed)
        self.num_bits, self.num_slow_bits = int(num_bits), int(num_slow_bits)
        self.num_target_features = int(num_target_features)
        self.beta, self.bias_bit = float(beta), bias_bit

        # the target network
        m1 = self.num_bits + 1
        rng = np.random.default_rng([_TARGET_STREAM, 0, self.seed])
        w = rng.integers(0, 2, size=(self.num_target_features, m1), dtype=np.int64) * 2 - 1
        v = rng.integers(0, 2, size=self.num_target_features, dtype=np.int64) * 2 - 1
        b = int(rng.integers(0, 2)) * 2 - 1
        theta = m1 * self.beta - (w < 0).sum(axis=1)
        self.hidden_weights = torch.as_tensor(w, dtype=torch.float32)
        self.thresholds = torch.as_tensor(theta, dtype=torch.float32)
        self.output_weights = torch.as_tensor(v, dtype=torch.float32)
        self.output_bias = float(b)
        self._w, self._v, self._b, self._theta = w, v, b, theta

        # the inputs: slow bits per regime (flip_one), noise bits per step, the bias bit
        regime = np.arange(self.num_steps, dtype=np.int64) // self.change_every
        num_regimes = int(regime[-1]) + 1
        init_rng = np.random.default_rng([_INIT_STREAM, 0, self.seed])
        initial = init_rng.integers(0, 2, self.num_slow_bits, dtype=np.uint8)
        flips = np.zeros((num_regimes, self.num_slow_bits), dtype=np.uint8)
        flipped = _blocked_integers(self.seed, _FLIP_STREAM, num_regimes, 1, self.num_slow_bits)[:, 0]
        flips[np.arange(1, num_regimes), flipped[1:]] = 1  # regime r (>= 1) flips bit flipped[r]
        slow = np.bitwise_xor.accumulate(flips, axis=0) ^ initial
        noise = _blocked_integers(self.seed, _NOISE_STREAM, self.num_steps, self.num_bits - self.num_slow_bits, 2)
        x = np.concatenate([slow[regime].astype(np.int64), noise, np.ones((self.num_steps, 1), np.int64)], axis=1)

        self.regime = torch.as_tensor(regime)
        self.num_regimes = num_regimes
        self.data = torch.as_tensor(x if bias_bit else x[:, :-1], dtype=torch.float32)
        self.targets = torch.as_tensor(self._target(x), dtype=torch.float32).unsqueeze(1)

    @property
    def num_inputs(self) -> int:
        """The width of ``data``: ``num_bits + 1`` with the bias bit, ``num_bits`` without."""
        return self.num_bits + int(self.bias_bit)

    def _target(self, x: np.ndarray) -> np.ndarray:
        features = (x @ self._w.T > self._theta).astype(np.int64)
        return features @ self._v + self._b

    def target_function(self, x: Tensor) -> Tensor:
        """Evaluate the fixed target network on inputs shaped like ``data``.

        Args:
            x: Bits in ``{0, 1}``, shape ``(..., num_inputs)`` (with the bias bit as the last column if ``bias_bit``).

        Returns:
            The targets, ``float32`` of shape ``(..., 1)``.

        Raises:
            ValueError: If the last dimension of ``x`` is not ``num_inputs``.

        Example::

            stream = SlowlyChangingRegression(num_steps=100)
            assert torch.equal(stream.target_function(stream.data), stream.targets)

        """
        if x.shape[-1] != self.num_inputs:
            raise ValueError(f"`x` must have {self.num_inputs} columns (like `data`), got shape {tuple(x.shape)}.")
        bits = x.detach().cpu().round().to(torch.int64).numpy()
        if not self.bias_bit:
            bits = np.concatenate([bits, np.ones((*bits.shape[:-1], 1), np.int64)], axis=-1)
        return torch.as_tensor(self._target(bits), dtype=torch.float32).unsqueeze(-1)

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]


class SlowlyChangingRegressionDataModule(pl.LightningDataModule):
    """The slowly-changing regression stream of Dohare et al. (Nature 2024) as an online training stream.

    The training loader yields the ``num_steps`` samples of :class:`SlowlyChangingRegression` in order, never shuffled
    (it is an online stream: score the learner by its error on each batch *before* it learns from it, binned over
    time). There are no validation or test loaders. :attr:`regime` gives each step's change period.

    Args:
        num_steps: The length of the stream, ``>= 1``.
        change_every: Steps between two flips of a slow bit, ``>= 1`` (paper: 10,000).
        batch_size: Samples per batch, ``>= 1`` (the paper learns from one sample at a time).
        seed: The seed of the target network and of the stream, an integer ``>= 0``.
        bias_bit: Whether the inputs include the constant bias bit as their last column.
        num_workers: Worker processes of the loader, ``>= 0``.

    Attributes:
        num_features: The input width, 21 with the bias bit, 20 without.
        num_outputs: 1.

    Raises:
        MisconfigurationException: If an argument is out of range or of the wrong type; the message names it.

    Example::

        from lightning.pytorch import Trainer

        dm = SlowlyChangingRegressionDataModule(num_steps=20_000, change_every=1000)
        Trainer(max_epochs=1).fit(model, datamodule=dm)  # model: in_features=dm.num_features, one output
        dm.regime  # tensor([0, 0, ..., 19]): the change period of every step

    """

    num_outputs: int = 1

    def __init__(
        self,
        num_steps: int = 20_000,
        change_every: int = 1000,
        batch_size: int = 1,
        seed: int = 0,
        bias_bit: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low, hint in (
            ("num_steps", num_steps, 1, "use e.g. 20_000"),
            ("change_every", change_every, 1, "the paper uses 10_000, use e.g. 1000 on a CPU"),
            ("batch_size", batch_size, 1, "use 1 for the paper's online setting"),
            ("seed", seed, 0, "use e.g. 0"),
            ("num_workers", num_workers, 0, "use 0 to load in the main process"),
        ):
            check_int(name, value, low, allow_numpy=True, hint=hint, error=MisconfigurationException)
        if not isinstance(bias_bit, bool):
            raise MisconfigurationException(f"`bias_bit` must be a bool, got {bias_bit!r}.")
        self.save_hyperparameters()
        self.num_steps, self.change_every, self.batch_size = num_steps, change_every, batch_size
        self.seed, self.bias_bit, self.num_workers = seed, bias_bit, num_workers
        self.num_features = 20 + int(bias_bit)
        self.train_set: Optional[SlowlyChangingRegression] = None

    @property
    def regime(self) -> Tensor:
        """The regime (change period) of every step, ``t // change_every``, ``int64`` of shape ``(num_steps,)``."""
        return torch.arange(self.num_steps) // self.change_every

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set = SlowlyChangingRegression(
                num_steps=self.num_steps, change_every=self.change_every, seed=self.seed, bias_bit=self.bias_bit
            )

    @override
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError(
                "SlowlyChangingRegressionDataModule: call `setup()` (the Trainer does) before asking for a dataloader."
            )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
