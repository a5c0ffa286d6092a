"""The TensorBoard views: the labelled accuracy-matrix heatmap and the custom-scalars layout of the monitor's levels."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from helpers import TinyNet, fit
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from nl_lightning import Level
from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor
from nl_lightning.callbacks._tensorboard import (
    MONITOR_QUANTITIES,
    accuracy_matrix_image,
    custom_scalars_layout,
)

NAN = math.nan
LEVELS = [Level("slow", ["net.0.*"], every=3), Level("fast", ["net.2.*"], every=1)]


def matrix(**cells: float) -> torch.Tensor:
    """A (4, 3) stream matrix after two tasks; ``r<i>c<j>=v`` overrides a cell."""
    m = torch.tensor([[0.3, 0.3, 0.3], [0.9, 0.3, 0.3], [0.6, 0.9, 0.3], [NAN, NAN, NAN]])
    for key, value in cells.items():
        m[int(key[1]), int(key[3])] = value
    return m


def changed_box(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, int]:
    """The bounding box (top, bottom, left, right) of the pixels where two images differ."""
    rows, cols = torch.nonzero((a != b).any(dim=0), as_tuple=True)
    assert rows.numel() > 0, "the images are the same"
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def pixel(image: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[:, y, x])


def test_image_shape_and_dtype():
    image = accuracy_matrix_image(matrix(), title="stage 2")
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert image.shape[1] >= 4 * 64 and image.shape[2] >= 3 * 64  # 64-pixel cells plus labels and the colour scale
    assert len({pixel(image, y, x) for y in range(0, image.shape[1], 7) for x in range(0, image.shape[2], 7)}) > 20


def test_cell_colour_follows_its_value():
    low, high = accuracy_matrix_image(matrix(r2c0=0.1), cell=64), accuracy_matrix_image(matrix(r2c0=1.0), cell=64)
    top, bottom, left, right = changed_box(low, high)
    assert bottom - top == right - left == 64 - 3  # one cell changed, and only it (a 2-pixel line between cells)
    corner = (top + 2, left + 2)  # away from the printed value
    assert pixel(high, *corner) == (253, 231, 37)  # the top of the viridis scale
    luminance = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (pixel(low, *corner), pixel(high, *corner))]
    assert luminance[0] < luminance[1]
    assert pixel(accuracy_matrix_image(matrix(r2c0=0.0), cell=64), *corner) == (68, 1, 84)  # the bottom


def test_cell_values_are_printed():
    # Above vmax both cells have the same (clamped) colour: only the printed value differs.
    a, b = accuracy_matrix_image(matrix(r1c1=1.25)), accuracy_matrix_image(matrix(r1c1=1.75))
    top, bottom, left, right = changed_box(a, b)
    assert bottom - top < 24 and right - left < 60  # a line of text, inside one cell
    assert pixel(a, top - 8, left - 4) == pixel(b, top - 8, left - 4)
    tiny = accuracy_matrix_image(matrix(r1c1=1.25), cell=16)  # too small to print a value: colour only
    assert torch.equal(tiny, accuracy_matrix_image(matrix(r1c1=1.75), cell=16))


def test_unmeasured_cells_are_grey_and_blank():
    measured, missing = accuracy_matrix_image(matrix(r3c1=0.5)), accuracy_matrix_image(matrix())
    top, bottom, left, right = changed_box(measured, missing)
    cell = missing[:, top : bottom + 1, left : right + 1]
    assert (cell == torch.tensor([200, 200, 200], dtype=torch.uint8)[:, None, None]).all()  # grey, no text


def test_labels_follow_the_shape():
    square = accuracy_matrix_image(matrix()[1:])  # no untrained row
    assert square.shape[1] < accuracy_matrix_image(matrix()).shape[1]
    named = accuracy_matrix_image(torch.rand(2, 4), row_labels=["a", "b"], col_labels=list("wxyz"))
    assert named.shape[0] == 3


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.rand(3),), "non-empty 2-D tensor"),
        ((torch.rand(5, 2),), r"shape \(5, 2\).*row_labels"),
        ((torch.rand(2, 2), "t", ["a"]), "1 row labels"),
    ],
)
def test_image_errors_name_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        accuracy_matrix_image(*args)
    with pytest.raises(ValueError, match="`vmin`"):
        accuracy_matrix_image(torch.rand(2, 2), vmin=1.0, vmax=0.0)


def test_layout_puts_every_level_on_one_chart_per_quantity():
    layout = custom_scalars_layout(["slow", "fast"])
    charts = layout["nested levels"]
    assert list(charts) == [f"nested/*/{q}" for q in MONITOR_QUANTITIES]
    kind, tags = charts["nested/*/drift"]
    assert kind == "Multiline" and tags == ["^nested/(?:slow|fast)/drift$"]
    assert [t for t in ["nested/slow/drift", "nested/fast/drift", "nested/slow/drift_rel", "nested/mid/drift"]
            if re.match(tags[0], t)] == ["nested/slow/drift", "nested/fast/drift"]  # fmt: skip
    [(_, [dotted])] = custom_scalars_layout(["a.b"], ["lr"])["nested levels"].values()
    assert re.match(dotted, "nested/a.b/lr") and not re.match(dotted, "nested/aXb/lr")  # names are escaped
    with pytest.raises(ValueError, match="non-empty lists"):
        custom_scalars_layout([])


def read_layout(log_dir: str) -> tuple[layout_pb2.Layout, set[str]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    return layout, set(events.Tags()["scalars"])


@pytest.mark.parametrize("prefix", ["", "run"])
def test_layout_names_every_logged_level_tag(tmp_path, prefix):
    logger = TensorBoardLogger(tmp_path, name="tb", prefix=prefix)
    fit(TinyNet(), [MultiFrequencyUpdates(LEVELS), NestedLearningMonitor()], tmp_path, max_steps=6,
        logger=logger, log_every_n_steps=3)  # fmt: skip: the monitor writes the layout at train start
    layout, scalars = read_layout(logger.log_dir)
    head = f"{prefix}-" if prefix else ""
    level_tags = {t for t in scalars if re.fullmatch(rf"{head}nested/(slow|fast)/\w+", t)}
    assert len(level_tags) == 2 * len(MONITOR_QUANTITIES)  # the monitor logged every quantity of both levels
    [category] = layout.category
    assert [chart.title for chart in category.chart] == [f"nested/*/{q}" for q in MONITOR_QUANTITIES]
    for chart in category.chart:
        [regex] = chart.multiline.tag
        quantity = chart.title.split("/")[-1]
        assert {t for t in scalars if re.match(regex, t)} == {
            f"{head}nested/{lvl}/{quantity}" for lvl in ("slow", "fast")
        }
    covered = {t for chart in category.chart for regex in chart.multiline.tag for t in scalars if re.match(regex, t)}
    assert covered == level_tags


def test_monitor_writes_no_layout_without_tensorboard(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        fit(TinyNet(), [MultiFrequencyUpdates(LEVELS), NestedLearningMonitor()], tmp_path, max_steps=3,
            logger=CSVLogger(tmp_path), log_every_n_steps=1)  # fmt: skip
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert "No TensorBoardLogger attached" in caplog.text
