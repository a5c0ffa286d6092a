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
Accuracy matrix
^^^^^^^^^^^^^^^

Train tasks ``1..T`` in order. After training task ``i``, evaluate every task ``j`` into ``R[i][j]`` (row = training
stage, column = evaluated task, accuracies in ``[0, 1]``); evaluate the untrained model on every task into ``b[j]``.
This module stores both in one ``(T + 1, T)`` matrix, row 0 holding ``b`` and row ``i`` holding ``R[i]``, and derives
every continual-learning metric from it:

.. math::

    \mathrm{ACC} = \frac{1}{T} \sum_{j=1}^{T} R_{T,j}, \qquad
    \mathrm{BWT} = \frac{1}{T-1} \sum_{j=1}^{T-1} (R_{T,j} - R_{j,j}), \qquad
    \mathrm{FWT} = \frac{1}{T-1} \sum_{j=2}^{T} (R_{j-1,j} - b_j)

:func:`continual_metrics` is the plain-torch function over a finished matrix (for example one read back from a run's
JSON); :class:`AccuracyMatrix` is the :class:`torchmetrics.Metric` that accumulates correct/total counts cell by cell,
so the matrix is exact under DDP, and returns the same metrics from ``compute()``::

    metric = AccuracyMatrix(num_tasks=3)
    for stage in range(4):                  # 0 = untrained, k = after training task k
        for task, loader in enumerate(test_loaders):
            for x, y in loader:
                metric.update(model(x), y, stage=stage, task=task)
        # ... train task ``stage + 1`` here ...
    out = metric.compute()                  # out["accuracy"], out["acc"], out["bwt"], out["forgetting"], ...
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from nl_lightning._validation import check_int

__all__ = ["FORGETTING_DEFINITIONS", "METRIC_NAMES", "AccuracyMatrix", "continual_metrics"]

#: The accepted values of ``forgetting``; ``"chaudhry"`` is the one to report as "forgetting".
FORGETTING_DEFINITIONS = ("chaudhry", "mammoth", "avalanche")
#: The keys of :func:`continual_metrics`, in order.
METRIC_NAMES = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "aia")


def _check_forgetting(forgetting: Any) -> str:
    if forgetting not in FORGETTING_DEFINITIONS:
        raise ValueError(f"Unknown forgetting definition {forgetting!r}; expected one of {FORGETTING_DEFINITIONS}.")
    return forgetting


def continual_metrics(accuracy: Tensor, forgetting: str = "chaudhry") -> dict[str, float]:
    r"""Continual-learning metrics of a ``(T + 1, T)`` accuracy matrix.

    With ``b[j] = accuracy[0, j - 1]`` (untrained model) and ``R[i][j] = accuracy[i, j - 1]`` (after training tasks
    ``1..i``), tasks and stages counted from 1:

    - ``acc``: :math:`\frac{1}{T}\sum_j R_{T,j}`, average accuracy at the end (GEM, Lopez-Paz & Ranzato 2017).
    - ``bwt``: :math:`\frac{1}{T-1}\sum_{j<T} (R_{T,j} - R_{j,j})`, backward transfer; negative means forgetting (GEM).
    - ``fwt``: :math:`\frac{1}{T-1}\sum_{j\ge 2} (R_{j-1,j} - b_j)`, forward transfer (GEM).
    - ``forgetting``: the mean over ``j < T`` of ``f_j`` under the chosen definition:

      * ``"chaudhry"`` (default; Chaudhry et al. 2018, RWalk): :math:`f_j = \max_{l \in 1..T-1} R_{l,j} - R_{T,j}`. Can
        be negative when a task improved after it was learned. Report this one as "forgetting".
      * ``"mammoth"``: the max also includes the final row, :math:`\max_{l \in 1..T} R_{l,j} - R_{T,j}`, so
        ``f_j >= 0``. (Mammoth zero-pads the entries it did not measure, i.e. those of rows ``l < j - 1``; the two
        agree unless an untrained task scored above its later best.)
      * ``"avalanche"``: :math:`f_j = R_{j,j} - R_{T,j}`, just after learning minus now, not max-based; its mean is
        ``-bwt``.

    - ``learning_accuracy``: :math:`\frac{1}{T}\sum_j R_{j,j}`, accuracy on each task just after learning it (e.g.
      Mirzadeh et al.); catches methods that avoid forgetting by not learning.
    - ``aia``: average incremental accuracy :math:`\frac{1}{T}\sum_k A_k`, :math:`A_k = \frac{1}{k}\sum_{j \le k}
      R_{k,j}` (iCaRL, Rebuffi et al. 2017).

    ``bwt``, ``fwt`` and ``forgetting`` are averaged over ``T - 1`` tasks, as in the GEM paper; GEM's public code
    averages them over ``T`` entries (one is zero by construction), so multiply its numbers by ``T / (T - 1)`` to
    compare. With ``T = 1`` they are undefined (NaN). Entries that were not measured are NaN, and every metric that
    needs one is NaN: a joint-training run that fills only the final row gets ``acc`` and NaN for the rest.

    Args:
        accuracy: A ``(T + 1, T)`` tensor of accuracies in ``[0, 1]``, ``T >= 1``, NaN where not measured.
        forgetting: The forgetting definition: ``"chaudhry"`` (default), ``"mammoth"`` or ``"avalanche"``.

    Returns:
        A dict of Python floats (NaN where undefined) with the keys ``acc``, ``bwt``, ``fwt``, ``forgetting``,
        ``learning_accuracy`` and ``aia``.

    Raises:
        ValueError: If ``accuracy`` is not of shape ``(T + 1, T)`` with ``T >= 1``, or ``forgetting`` is not one of the
            definitions above.

    Example::

        >>> acc = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 1.0]])
        >>> out = continual_metrics(acc)
        >>> out["acc"], out["bwt"], out["forgetting"]
        (0.75, -0.5, 0.5)

    """
    forgetting = _check_forgetting(forgetting)
    a = torch.as_tensor(accuracy).detach().to(device="cpu", dtype=torch.float64)
    if a.ndim != 2 or a.shape[1] < 1 or a.shape[0] != a.shape[1] + 1:
        expected = f"(T + 1, T) = ({a.shape[1] + 1}, {a.shape[1]})" if a.ndim == 2 else "(T + 1, T)"
        raise ValueError(
            f"`accuracy` must have shape (T + 1, T) with T >= 1 (row 0 = untrained model, row i = after training task"
            f" i), got shape {tuple(a.shape)}; expected {expected}."
        )
    num_tasks = a.shape[1]
    b, r = a[0], a[1:]  # r[i - 1, j - 1] = R[i][j]
    last = r[-1]
    diag = r.diagonal()
    out = {
        "acc": last.mean(),
        "learning_accuracy": diag.mean(),
        "aia": torch.stack([r[k, : k + 1].mean() for k in range(num_tasks)]).mean(),
    }
    if num_tasks == 1:
        out.update(bwt=math.nan, fwt=math.nan, forgetting=math.nan)
    else:
        old = slice(0, num_tasks - 1)  # tasks j < T
        out["bwt"] = (last[old] - diag[old]).mean()
        out["fwt"] = (r.diagonal(offset=1) - b[1:]).mean()  # R[j - 1][j] - b[j] for j >= 2
        if forgetting == "chaudhry":
            best = r[:-1, old].amax(dim=0)  # amax propagates NaN
        elif forgetting == "mammoth":
            best = r[:, old].amax(dim=0)
        else:
            best = diag[old]
        out["forgetting"] = (best - last[old]).mean()
    return {name: float(out[name]) for name in METRIC_NAMES}


class AccuracyMatrix(Metric):
    r"""The continual-learning accuracy matrix as a :class:`torchmetrics.Metric`.

    Two states, ``correct`` and ``total``, each a ``(num_tasks + 1, num_tasks)`` float64 tensor summed across
    processes (``dist_reduce_fx="sum"``), so the matrix is exact under DDP whatever the split of the test sets. Cell
    ``[stage, task]`` counts the predictions on ``task`` (0-based) after ``stage`` training tasks (``stage = 0`` is the
    untrained model). ``compute()`` returns the matrix and every metric of :func:`continual_metrics`.

    Both states are persistent: ``metric.state_dict()`` holds ``correct`` and ``total``, so a callback that owns the
    metric (it is then not part of the model) saves it with ``{"matrix": metric.state_dict()}`` in its own
    ``state_dict()`` and restores it with ``metric.load_state_dict(state["matrix"])``. Loading moves the counts to the
    metric's device and checks their shape; a callback-owned metric must be moved with ``metric.to(pl_module.device)``
    itself. ``compute()`` is a dict, not a scalar, so do not pass the metric to ``self.log``: call ``compute()``,
    ``log_dict`` the scalars and write the matrix as text or an image.

    Args:
        num_tasks: The number of tasks ``T >= 1``.
        forgetting: The forgetting definition reported under ``"forgetting"`` (see :func:`continual_metrics`).
        kwargs: Passed to :class:`torchmetrics.Metric` (for example ``sync_on_compute``, ``process_group``).

    Raises:
        ValueError: If ``num_tasks`` is not an integer ``>= 1`` or ``forgetting`` is unknown.

    Example::

        >>> metric = AccuracyMatrix(num_tasks=2)
        >>> metric.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1]), stage=1, task=0)
        >>> metric.matrix()[1, 0].item()
        0.75

    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, forgetting: str = "chaudhry", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_int("num_tasks", num_tasks)
        self.num_tasks = num_tasks
        self.forgetting = _check_forgetting(forgetting)
        shape = (num_tasks + 1, num_tasks)
        self.add_state("correct", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)

    def _index(self, value: Any, name: str, size: int, meaning: str) -> int:
        try:  # integer-like values (a 0-dim integer tensor, a NumPy integer) count as their index
            index = operator.index(value) if not isinstance(value, bool) else value
        except TypeError:
            index = value
        return check_int(name, index, 0, size - 1, hint=meaning)

    @override
    def update(self, preds: Tensor, target: Tensor, stage: int, task: int) -> None:
        """Add a batch's correct predictions and count to cell ``[stage, task]``.

        Args:
            preds: Predicted class indices with the shape of ``target``, or scores (logits or probabilities) with one
                more trailing dimension of size ``C``, reduced by ``argmax`` over the last dimension. For a binary task
                give ``(N, 2)`` scores or integer labels, not ``(N,)`` probabilities.
            target: Integer class indices.
            stage: The number of tasks trained so far, ``0..num_tasks`` (0 = untrained model).
            task: The evaluated task, 0-based, ``0..num_tasks - 1``.

        Raises:
            ValueError: If ``stage`` or ``task`` is out of range or not an integer, ``target`` is floating point, the
                shapes do not match, or ``preds`` is floating point with the shape of ``target``.

        """
        stage = self._index(stage, "stage", self.num_tasks + 1, "0 = untrained model, k = after training k tasks")
        task = self._index(task, "task", self.num_tasks, "0-based task index")
        if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
            raise ValueError(
                f"`preds` and `target` must be tensors, got {type(preds).__name__} and {type(target).__name__}."
            )
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"`target` must hold integer class indices, got dtype {target.dtype}.")
        if preds.ndim == target.ndim + 1 and preds.shape[:-1] == target.shape:
            preds = preds.argmax(dim=-1)
        elif preds.shape == target.shape:
            if preds.is_floating_point() or preds.is_complex():
                raise ValueError(
                    f"`preds` of shape {tuple(preds.shape)} (the shape of `target`) must be integer class indices, got"
                    f" dtype {preds.dtype}; pass scores of shape {tuple(target.shape) + ('C',)} to take the argmax."
                )
        else:
            raise ValueError(
                f"`preds` must have the shape of `target` {tuple(target.shape)} (class indices) or"
                f" {tuple(target.shape) + ('C',)} (scores), got {tuple(preds.shape)}."
            )
        state = self.correct
        self.correct[stage, task] += (preds == target).sum().to(device=state.device, dtype=state.dtype)
        self.total[stage, task] += target.numel()

    @override
    def compute(self) -> dict[str, Tensor]:
        """The accuracy matrix and the continual-learning metrics.

        Returns:
            ``accuracy``: the ``(num_tasks + 1, num_tasks)`` float64 matrix, NaN where nothing was counted, and every
            key of :func:`continual_metrics` as a 0-dim float64 tensor (NaN where undefined).

        """
        accuracy = torch.where(self.total > 0, self.correct / self.total.clamp(min=1), torch.nan)
        scalars = continual_metrics(accuracy, forgetting=self.forgetting)
        out = {"accuracy": accuracy}
        for name, value in scalars.items():
            out[name] = torch.tensor(value, dtype=accuracy.dtype, device=accuracy.device)
        return out

    def matrix(self) -> Tensor:
        """The ``(num_tasks + 1, num_tasks)`` accuracy matrix, NaN where nothing was counted (synced like ``compute``).

        Returns:
            ``compute()["accuracy"]``.

        """
        return self.compute()["accuracy"]

    def completed_stages(self) -> list[int]:
        """The stages (rows) in which every task has been measured.

        Returns:
            The sorted row indices, ``0`` being the untrained model.

        """
        measured = self.total > 0  # read the counts directly: no compute(), no warning before the first update
        return [int(i) for i in torch.nonzero(measured.all(dim=1)).flatten()]

    @override
    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another metric's (or state dict's) counts to this one, as a DDP reduction would.

        Args:
            incoming_state: An :class:`AccuracyMatrix` of the same size, or a dict with ``correct`` and ``total``.

        Raises:
            ValueError: If the incoming counts have a different shape.

        """
        incoming = incoming_state.metric_state if isinstance(incoming_state, Metric) else incoming_state
        if isinstance(incoming, dict):
            for key in ("correct", "total"):
                value = incoming.get(key)
                if isinstance(value, Tensor) and value.shape != self.correct.shape:
                    raise ValueError(
                        f"Cannot merge `{key}` of shape {tuple(value.shape)} into an AccuracyMatrix of shape"
                        f" {tuple(self.correct.shape)}."
                    )
        super().merge_state(incoming_state)
        self._computed = None  # the base class keeps a stale cached compute() otherwise

    @override
    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        loaded = False
        for key in ("correct", "total"):
            name = prefix + key
            if name not in state_dict:
                continue
            current = getattr(self, key)
            value = torch.as_tensor(state_dict.pop(name))
            if value.shape != current.shape:
                error_msgs.append(
                    f"AccuracyMatrix `{name}` has shape {tuple(value.shape)} in the checkpoint but"
                    f" {tuple(current.shape)} here (num_tasks={self.num_tasks})."
                )
                continue
            setattr(self, key, value.to(device=current.device, dtype=current.dtype).clone())
            loaded = True
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loaded:
            self._computed = None
            # restored counts count as an update, so compute() does not warn "called before the update method"
            self._update_count = max(self._update_count, int(bool(self.total.sum() > 0)))
