"""continual_metrics on hand-made matrices with known answers, and the AccuracyMatrix metric: counts, state, merge."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from nl_lightning.metrics import AccuracyMatrix, continual_metrics
from nl_lightning.metrics.accuracy_matrix import METRIC_NAMES

NAN = math.nan
DEFINITIONS = ("chaudhry", "mammoth", "avalanche")

# T = 3 anchor, worked by hand: task 1 at (0.90, 0.95, 0.70), task 2 at (0.10, 0.90, 0.95) over the stages.
ANCHOR3 = torch.tensor(
    [
        [0.05, 0.10, 0.15],  # b
        [0.90, 0.10, 0.20],
        [0.95, 0.90, 0.30],
        [0.70, 0.95, 0.85],
    ],
    dtype=torch.float64,
)

# A 3x3 example with every metric computed by hand below.
HAND3 = torch.tensor(
    [
        [0.10, 0.20, 0.30],  # b
        [0.80, 0.40, 0.35],  # A_1 = 0.80
        [0.60, 0.90, 0.50],  # A_2 = (0.60 + 0.90) / 2 = 0.75
        [0.60, 0.85, 0.95],  # A_3 = (0.60 + 0.85 + 0.95) / 3 = 0.80
    ],
    dtype=torch.float64,
)


def _approx(value: float) -> object:
    return pytest.approx(value, abs=1e-6)  # float32 inputs are exact to about 1e-8


def _batch(correct: int, n: int, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-index predictions with exactly ``correct`` of ``n`` right."""
    target = torch.arange(n) % num_classes
    preds = target.clone()
    preds[correct:] = (target[correct:] + 1) % num_classes
    return preds, target


def _logits(preds: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Scores whose argmax is ``preds`` (random logits with the chosen class pushed to the top)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(preds.numel(), num_classes, generator=gen)
    logits[torch.arange(preds.numel()), preds] += 10.0
    return logits


def _fill(metric: AccuracyMatrix, accuracy: torch.Tensor, n: int = 20) -> None:
    """Update every cell so that it holds ``accuracy`` exactly (multiples of 1 / n)."""
    for stage in range(accuracy.shape[0]):
        for task in range(accuracy.shape[1]):
            metric.update(*_batch(round(float(accuracy[stage, task]) * n), n), stage=stage, task=task)


# ---------------------------------------------------------------------------------------------------------------------
# continual_metrics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [(0.0, 0.0), (0.5, 0.5), (0.3, 0.9)])
@pytest.mark.parametrize("definition", DEFINITIONS)
def test_two_task_anchor(b, definition):
    acc = torch.tensor([list(b), [1.0, 0.0], [0.5, 1.0]])
    out = continual_metrics(acc, forgetting=definition)
    assert out["acc"] == _approx(0.75)
    assert out["bwt"] == _approx(-0.5)
    assert out["forgetting"] == _approx(0.5)
    assert out["fwt"] == _approx(0.0 - b[1])
    assert out["learning_accuracy"] == _approx(1.0)
    assert out["aia"] == _approx((1.0 + 0.75) / 2)


@pytest.mark.parametrize(("definition", "expected"), [("chaudhry", 0.10), ("mammoth", 0.125), ("avalanche", 0.075)])
def test_three_task_forgetting_anchor(definition, expected):
    out = continual_metrics(ANCHOR3, forgetting=definition)
    assert out["forgetting"] == _approx(expected)
    # BWT = ((0.70 - 0.90) + (0.95 - 0.90)) / 2, and avalanche forgetting is its negative.
    assert out["bwt"] == _approx(-0.075)


def test_default_forgetting_is_chaudhry():
    assert continual_metrics(ANCHOR3)["forgetting"] == _approx(0.10)


def test_hand_computed_three_by_three():
    out = continual_metrics(HAND3)
    assert set(out) == set(METRIC_NAMES)
    assert all(isinstance(v, float) for v in out.values())
    assert out["acc"] == _approx((0.60 + 0.85 + 0.95) / 3)  # 0.8
    assert out["bwt"] == _approx(((0.60 - 0.80) + (0.85 - 0.90)) / 2)  # -0.125
    assert out["fwt"] == _approx(((0.40 - 0.20) + (0.50 - 0.30)) / 2)  # 0.2
    assert out["learning_accuracy"] == _approx((0.80 + 0.90 + 0.95) / 3)
    assert out["aia"] == _approx((0.80 + 0.75 + 0.80) / 3)
    # task 1: max(0.80, 0.60) - 0.60; task 2: max(0.40, 0.90) - 0.85
    assert out["forgetting"] == _approx((0.20 + 0.05) / 2)


def test_gem_code_convention_differs_by_t_over_t_minus_one():
    # GEM's code averages over T entries, the last being zero: scaling by T / (T - 1) recovers ours.
    out = continual_metrics(HAND3)
    r = HAND3[1:]
    gem_code_bwt = float(sum(r[-1, j] - r[j, j] for j in range(3)) / 3)
    assert gem_code_bwt * 3 / 2 == _approx(out["bwt"])


def test_mammoth_never_negative_chaudhry_can_be():
    # task 1 improves after it was learned: 0.5 then 0.9 at the end.
    acc = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.9, 1.0]])
    assert continual_metrics(acc, "chaudhry")["forgetting"] == _approx(-0.4)
    assert continual_metrics(acc, "mammoth")["forgetting"] == _approx(0.0)
    assert continual_metrics(acc, "avalanche")["forgetting"] == _approx(-0.4)


def test_only_final_row_gives_acc_and_nan_elsewhere():
    acc = torch.full((4, 3), NAN)
    acc[-1] = torch.tensor([0.9, 0.8, 0.7])
    out = continual_metrics(acc)
    assert out["acc"] == _approx(0.8)
    for name in ("bwt", "fwt", "forgetting", "learning_accuracy", "aia"):
        assert math.isnan(out[name]), name


def test_nan_propagates_only_to_metrics_that_need_the_entry():
    acc = HAND3.clone()
    acc[0] = NAN  # no untrained evaluation: only FWT needs it
    out = continual_metrics(acc)
    assert math.isnan(out["fwt"])
    assert out["bwt"] == _approx(-0.125)
    assert out["acc"] == _approx(0.8)

    acc = HAND3.clone()
    acc[1, 1] = NAN  # R[1][2] (task 2 before it is learned): FWT and the max-based forgetting need it
    out = {d: continual_metrics(acc, d) for d in DEFINITIONS}
    assert math.isnan(out["chaudhry"]["fwt"])
    assert math.isnan(out["chaudhry"]["forgetting"])
    assert math.isnan(out["mammoth"]["forgetting"])
    assert out["avalanche"]["forgetting"] == _approx(0.125)
    assert out["chaudhry"]["aia"] == _approx((0.80 + 0.75 + 0.80) / 3)


def test_single_task():
    out = continual_metrics(torch.tensor([[0.1], [0.9]]))
    assert out["acc"] == _approx(0.9)
    assert out["learning_accuracy"] == _approx(0.9)
    assert out["aia"] == _approx(0.9)
    for name in ("bwt", "fwt", "forgetting"):
        assert math.isnan(out[name]), name


def test_accepts_lists_and_float32():
    out = continual_metrics([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])
    assert out["acc"] == _approx(0.75)
    assert continual_metrics(HAND3.float())["aia"] == _approx(continual_metrics(HAND3)["aia"])


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 3), r"\(3, 3\).*\(4, 3\)"),
        ((2, 3), r"\(2, 3\).*\(4, 3\)"),
        ((4,), r"\(4,\)"),
        ((1, 0), r"\(1, 0\)"),
        ((3, 2, 1), r"\(3, 2, 1\)"),
    ],
)
def test_bad_shape_raises(shape, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(torch.zeros(shape))


def test_unknown_forgetting_raises():
    with pytest.raises(ValueError, match="'lopez'"):
        continual_metrics(HAND3, forgetting="lopez")


# ---------------------------------------------------------------------------------------------------------------------
# AccuracyMatrix
# ---------------------------------------------------------------------------------------------------------------------


def test_metric_flags_and_states():
    metric = AccuracyMatrix(num_tasks=3)
    assert metric.is_differentiable is False
    assert metric.higher_is_better is True
    assert metric.full_state_update is False
    for state in (metric.correct, metric.total):
        assert state.shape == (4, 3)
        assert state.dtype == torch.float64
        assert not state.any()
    assert set(metric.state_dict()) == {"correct", "total"}


def test_three_of_four_in_one_cell():
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0]), stage=1, task=0)
    matrix = metric.matrix()
    assert matrix.shape == (3, 2)
    assert matrix[1, 0].item() == 0.75
    assert torch.isnan(matrix).sum() == 5
    assert metric.correct[1, 0].item() == 3
    assert metric.total[1, 0].item() == 4


def test_logits_and_probabilities_use_argmax():
    preds, target = _batch(3, 4)
    metric = AccuracyMatrix(num_tasks=1)
    metric.update(_logits(preds), target, stage=0, task=0)
    metric.update(_logits(preds).softmax(dim=-1), target, stage=1, task=0)
    assert metric.matrix().tolist() == [[0.75], [0.75]]


def test_cells_accumulate_across_updates():
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(*_batch(3, 4), stage=2, task=1)
    metric.update(*_batch(1, 4), stage=2, task=1)
    metric.update(*_batch(5, 8), stage=2, task=1)
    assert metric.matrix()[2, 1].item() == pytest.approx(9 / 16)
    assert metric.total[2, 1].item() == 16


def test_compute_matches_continual_metrics():
    metric = AccuracyMatrix(num_tasks=3, forgetting="mammoth")
    _fill(metric, ANCHOR3)
    out = metric.compute()
    assert set(out) == {"accuracy", *METRIC_NAMES}
    torch.testing.assert_close(out["accuracy"], ANCHOR3)
    expected = continual_metrics(ANCHOR3, forgetting="mammoth")
    for name in METRIC_NAMES:
        assert out[name].ndim == 0
        assert out[name].is_floating_point()
        assert out[name].item() == pytest.approx(expected[name], abs=1e-12), name
    assert out["forgetting"].item() == pytest.approx(0.125)


def test_completed_stages():
    metric = AccuracyMatrix(num_tasks=2)
    for task in range(2):
        metric.update(*_batch(1, 2), stage=0, task=task)
        metric.update(*_batch(2, 2), stage=2, task=task)
    metric.update(*_batch(2, 2), stage=1, task=0)
    assert metric.completed_stages() == [0, 2]


def test_reset():
    metric = AccuracyMatrix(num_tasks=2)
    _fill(metric, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 1.0]]))
    assert metric.compute()["acc"].item() == 0.75
    metric.reset()
    assert not metric.correct.any() and not metric.total.any()
    metric.update(*_batch(1, 4), stage=2, task=0)
    matrix = metric.matrix()
    assert matrix[2, 0].item() == 0.25
    assert torch.isnan(matrix).sum() == 5


def test_state_dict_round_trip_into_fresh_metric():
    metric = AccuracyMatrix(num_tasks=3)
    _fill(metric, HAND3)
    metric.update(*_batch(0, 20), stage=3, task=2)  # 0.95 -> 19 / 40
    state = metric.state_dict()
    assert set(state) == {"correct", "total"}

    fresh = AccuracyMatrix(num_tasks=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restored counts must not warn "compute called before update"
        fresh.load_state_dict(state)
        out, expected = fresh.compute(), metric.compute()
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, equal_nan=True)
    # the copy is independent of the source
    fresh.update(*_batch(20, 20), stage=0, task=0)
    assert metric.total[0, 0].item() == 20
    assert fresh.total[0, 0].item() == 40


def test_load_state_dict_refreshes_cached_compute():
    metric = AccuracyMatrix(num_tasks=1)
    metric.update(*_batch(1, 4), stage=1, task=0)
    assert metric.matrix()[1, 0].item() == 0.25  # cached
    other = AccuracyMatrix(num_tasks=1)
    other.update(*_batch(3, 4), stage=1, task=0)
    metric.load_state_dict(other.state_dict())
    assert metric.matrix()[1, 0].item() == 0.75


def test_state_dict_nested_in_a_callback_style_dict():
    metric = AccuracyMatrix(num_tasks=2)
    _fill(metric, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 1.0]]))
    saved = {"matrix": metric.state_dict(), "stage": 2}
    fresh = AccuracyMatrix(num_tasks=2)
    fresh.load_state_dict(saved["matrix"])
    assert fresh.compute()["bwt"].item() == pytest.approx(-0.5)


def test_load_state_dict_with_other_num_tasks_raises():
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(*_batch(1, 2), stage=0, task=0)
    with pytest.raises(RuntimeError, match=r"\(3, 2\).*\(4, 3\).*num_tasks=3"):
        AccuracyMatrix(num_tasks=3).load_state_dict(metric.state_dict())


def test_merge_state_equals_single_metric_on_all_data():
    gen = torch.Generator().manual_seed(0)
    full, left, right = AccuracyMatrix(num_tasks=2), AccuracyMatrix(num_tasks=2), AccuracyMatrix(num_tasks=2)
    for stage in range(3):
        for task in range(2):
            target = torch.randint(0, 4, (10,), generator=gen)
            logits = torch.randn(10, 4, generator=gen)
            full.update(logits, target, stage=stage, task=task)
            left.update(logits[:3], target[:3], stage=stage, task=task)  # uneven halves, as DDP shards can be
            right.update(logits[3:], target[3:], stage=stage, task=task)
    left.compute()  # fills the compute() cache, which the merge must invalidate
    left.merge_state(right)
    merged, expected = left.compute(), full.compute()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, equal_nan=True)
    torch.testing.assert_close(left.total, full.total)


def test_merge_state_from_dict_and_shape_check():
    metric = AccuracyMatrix(num_tasks=1)
    metric.update(*_batch(1, 2), stage=1, task=0)
    other = AccuracyMatrix(num_tasks=1)
    other.update(*_batch(2, 2), stage=1, task=0)
    metric.merge_state({"correct": other.correct, "total": other.total})
    assert metric.matrix()[1, 0].item() == 0.75
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 1\)"):
        metric.merge_state(AccuracyMatrix(num_tasks=2).metric_state)


@pytest.mark.parametrize("num_tasks", [0, -1, 2.0, True, "3", None])
def test_bad_num_tasks(num_tasks):
    with pytest.raises(ValueError, match=f"num_tasks.*{num_tasks!r}"):
        AccuracyMatrix(num_tasks=num_tasks)


def test_bad_forgetting_and_kwargs():
    with pytest.raises(ValueError, match="'max'"):
        AccuracyMatrix(num_tasks=2, forgetting="max")
    with pytest.raises(ValueError, match="nonsense"):
        AccuracyMatrix(num_tasks=2, nonsense=1)


@pytest.mark.parametrize(
    ("stage", "task", "match"),
    [
        (-1, 0, r"stage.*\[0, 2\].*-1"),
        (3, 0, r"stage.*\[0, 2\].*3"),
        (0, 2, r"task.*\[0, 1\].*2"),
        (0, -1, r"task.*-1"),
        (1.0, 0, r"stage.*1\.0"),
        (True, 0, r"stage.*True"),
        (0, "1", r"task.*'1'"),
    ],
)
def test_bad_stage_or_task(stage, task, match):
    metric = AccuracyMatrix(num_tasks=2)
    with pytest.raises(ValueError, match=match):
        metric.update(*_batch(1, 2), stage=stage, task=task)
    assert not metric.total.any()


def test_integer_like_stage_and_task_accepted():
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(*_batch(1, 2), stage=torch.tensor(1), task=torch.tensor(1))
    assert metric.total[1, 1].item() == 2


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), r"\(5,\).*\(4,\)"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), r"\(5,\).*\(4, 3\)"),
        (torch.rand(4), torch.zeros(4, dtype=torch.long), r"integer class indices.*float32"),
        (torch.zeros(4, 3), torch.zeros(4), r"`target`.*float32"),
        ([0, 1], torch.zeros(2, dtype=torch.long), "tensors.*list"),
    ],
)
def test_bad_preds_or_target(preds, target, match):
    with pytest.raises(ValueError, match=match):
        AccuracyMatrix(num_tasks=1).update(preds, target, stage=0, task=0)
