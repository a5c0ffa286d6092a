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
TensorBoard views
^^^^^^^^^^^^^^^^^

What a person looks at in TensorBoard: the accuracy matrix of a task stream as a labelled heatmap (IMAGES tab), and
one chart per quantity with every level of a nested learner on it (CUSTOM SCALARS tab).

The heatmap is drawn with Pillow, which ``tensorboard`` (a dependency of this package) requires: a real font with any
character, and no plotting library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import Tensor

__all__ = ["MONITOR_QUANTITIES", "accuracy_matrix_image", "custom_scalars_layout", "write_custom_scalars"]

#: The per-level quantities :class:`~nl_lightning.callbacks.NestedLearningMonitor` logs as ``<prefix>/<level>/<q>``.
MONITOR_QUANTITIES = ("updates", "grad_norm", "drift", "drift_rel", "lr")

# Viridis (perceptually uniform, readable in grey and by colour-blind readers), sampled at 9 points.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
_MISSING = (200, 200, 200)  # a cell not measured yet
_BACKGROUND, _INK, _FAINT = (255, 255, 255), (20, 20, 20), (85, 85, 85)


def _colour(value: float) -> tuple[int, int, int]:
    """The viridis colour of ``value`` in [0, 1]."""
    x = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return tuple(int(round(c)) for c in rgb)  # type: ignore[return-value]


def _ink_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light cells, white text on dark ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _default_row_labels(rows: int, cols: int) -> list[str]:
    if rows == cols + 1:  # ContinualEvaluation's matrix: row 0 before training, row k after k tasks
        return ["untrained"] + [f"after task {i}" for i in range(cols)]
    if rows == cols:
        return [f"after task {i}" for i in range(cols)]
    raise ValueError(
        f"An accuracy matrix has one row per task (or one more, for the untrained model), got shape ({rows}, {cols});"
        " pass `row_labels` to name the rows of another matrix."
    )


def accuracy_matrix_image(
    matrix: Tensor,
    title: str = "Accuracy matrix",
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    fmt: str = "{:.2f}",
    font_size: int = 24,
    cell: Optional[int] = None,
) -> Tensor:
    r"""Draw an accuracy matrix as a labelled heatmap for ``SummaryWriter.add_image``.

    Rows are the model after each task (``untrained``, ``after task 0``, ...), columns the task it is evaluated on
    (``task 0``, ...), every measured cell shows its value, and a colour scale (viridis, ``vmin`` to ``vmax``) sits on
    the right. Cells not measured yet (NaN) are light grey and empty. Cells under the diagonal are the old tasks, so
    forgetting reads as colour fading down a column.

    TensorBoard's IMAGES tab shows an image 350 pixels wide (a click shows its actual size): every size here is a
    multiple of ``font_size``, and the default draws five tasks about 700 pixels wide, so the text stays legible at
    half scale (and sharp on high-density screens).

    Args:
        matrix: A ``(rows, tasks)`` matrix, NaN where not measured: ``tasks + 1`` rows (the first one before
            training, as :class:`~nl_lightning.metrics.AccuracyMatrix` holds it) or ``tasks`` rows.
        title: The line above the heatmap.
        row_labels: One label per row; by default derived from the shape as above.
        col_labels: One label per column, drawn smaller where too wide for a cell; by default ``task <j>`` (``<j>``
            where the cells are too narrow).
        vmin: The value drawn with the darkest colour.
        vmax: The value drawn with the brightest colour.
        fmt: The format of a cell's value. Values are left out when the cells are too small to hold them.
        font_size: The height of the labels' and values' font in pixels.
        cell: The side of a cell in pixels; by default ``3.2 * font_size``, smaller for many tasks (the grid stays
            within 1600 pixels).

    Returns:
        A ``(3, H, W)`` ``uint8`` image (``add_image``'s default ``CHW`` layout).

    Raises:
        ValueError: If ``matrix`` is not 2-D or empty, the labels do not match its shape, ``vmin >= vmax``,
            ``font_size < 6`` or ``cell < 4``.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.numel() == 0:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"`matrix` must be a non-empty 2-D tensor (rows x tasks), got {shape}.")
    if not vmin < vmax:
        raise ValueError(f"`vmin` ({vmin}) must be below `vmax` ({vmax}), e.g. 0 and 1 for accuracies.")
    if font_size < 6:
        raise ValueError(f"`font_size` must be at least 6 pixels, got {font_size}.")
    values = matrix.detach().double().cpu().tolist()
    rows, cols = matrix.shape
    row_labels = list(row_labels) if row_labels is not None else _default_row_labels(rows, cols)
    default_cols = col_labels is None
    col_labels = [f"task {j}" for j in range(cols)] if col_labels is None else list(col_labels)
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(
            f"Got {len(row_labels)} row labels and {len(col_labels)} column labels for a ({rows}, {cols}) matrix;"
            " pass one label per row and per column."
        )
    if cell is None:
        cell = int(min(round(3.2 * font_size), 1600 // max(rows, cols)))
    if cell < 4:
        raise ValueError(f"`cell` must be at least 4 pixels, got {cell}.")

    em = font_size
    font = ImageFont.load_default(size=em)
    small = ImageFont.load_default(size=max(6, round(0.95 * em)))
    big = ImageFont.load_default(size=round(1.15 * em))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, f: Any) -> int:
        left, _, right, _ = scratch.textbbox((0, 0), text, font=f)
        return int(right - left)

    pad, gap = round(0.6 * em), max(1, em // 12)  # the margin; the white line between cells
    if default_cols and max(width(t, font) for t in col_labels) > cell - gap - 4:
        col_labels = [str(j) for j in range(cols)]  # narrow cells: the axis caption says they are tasks
    col_font, row_font, row_size = font, font, em  # smaller where the cells are too narrow or too low
    for size in range(em - 1, 5, -1):
        if max(width(t, col_font) for t in col_labels) > cell - gap - 4:
            col_font = ImageFont.load_default(size=size)
        if row_size > 0.85 * (cell - gap):
            row_font, row_size = ImageFont.load_default(size=size), size
    axis = "accuracy on task j"
    label_w = max(width(t, row_font) for t in row_labels) + round(0.5 * em)
    left = pad + label_w
    top = pad + round(1.6 * em) + round(1.3 * em) + round(1.4 * em)  # title, axis caption, column labels
    grid_w, grid_h = cols * cell, rows * cell
    bar_x, bar_w = left + grid_w + em, round(0.7 * em)
    ticks = [vmax - k / 4 * (vmax - vmin) for k in range(5)]
    right = bar_x + bar_w + round(0.4 * em) + max(width(fmt.format(t), small) for t in ticks)
    legend_y, side = top + grid_h + round(0.5 * em), round(0.7 * em)
    legend = "not measured yet"
    right = max(
        right, left + width(axis, small), pad + width(title, big), left + side + round(0.4 * em) + width(legend, small)
    )
    image = Image.new("RGB", (right + pad, legend_y + em + pad), _BACKGROUND)
    draw = ImageDraw.Draw(image)

    draw.text((pad, pad), title, fill=_INK, font=big)
    draw.text((left, pad + round(1.6 * em)), axis, fill=_FAINT, font=small)
    for j, text in enumerate(col_labels):
        draw.text(((2 * left + (2 * j + 1) * cell - gap) / 2, top - round(0.3 * em)), text, fill=_INK, font=col_font,
                  anchor="md")  # fmt: skip
    for i, text in enumerate(row_labels):
        draw.text((left - round(0.4 * em), top + i * cell + (cell - gap) / 2), text, fill=_INK, font=row_font,
                  anchor="rm")  # fmt: skip
    show_values = width(fmt.format(-0.999), font) <= cell - 2 * gap - 2
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1 - gap, top + (i + 1) * cell - 1 - gap)
            if math.isnan(value):
                draw.rectangle(box, fill=_MISSING)
                continue
            rgb = _colour((value - vmin) / (vmax - vmin))
            draw.rectangle(box, fill=rgb)
            if show_values:
                centre = ((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2)
                draw.text(centre, fmt.format(value), fill=_ink_on(rgb), font=font, anchor="mm")

    # The colour scale: vmax at the top, vmin at the bottom, five ticks.
    bar_h = grid_h - gap
    for y in range(bar_h):
        draw.line((bar_x, top + y, bar_x + bar_w - 1, top + y), fill=_colour(1.0 - y / max(bar_h - 1, 1)))
    for k, tick in enumerate(ticks):
        y = top + round(k / 4 * (bar_h - 1))
        draw.line((bar_x + bar_w, y, bar_x + bar_w + round(0.25 * em), y), fill=_INK, width=gap)
        draw.text((bar_x + bar_w + round(0.4 * em), y), fmt.format(tick), fill=_INK, font=small, anchor="lm")
    draw.rectangle((left, legend_y, left + side, legend_y + side), fill=_MISSING)
    draw.text((left + side + round(0.4 * em), legend_y + side / 2), legend, fill=_FAINT, font=small, anchor="lm")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def custom_scalars_layout(
    level_names: Sequence[str],
    quantities: Sequence[str] = MONITOR_QUANTITIES,
    prefix: str = "nested",
    category: str = "nested levels",
) -> dict[str, dict[str, list[Any]]]:
    r"""A TensorBoard custom-scalars layout with one chart per quantity and every level on it.

    Each chart is a ``Multiline`` chart over the tags :class:`~nl_lightning.callbacks.NestedLearningMonitor` logs,
    ``<prefix>/<level>/<quantity>``, so a fast and a slow level share the axes and the multi-frequency picture shows in
    one view (NL paper, Sec. 3). One anchored regular expression per chart names the levels exactly (one query per
    chart). TensorBoard draws every series of a run in the run's colour with its own marker, and picks the markers per
    chart: the ``Matches`` list under a chart says which marker is which level.

    Args:
        level_names: The levels, e.g. ``[lvl.name for lvl in mfu.levels]`` or the monitor's ``watches``.
        quantities: The quantities to chart, by default every one the monitor logs.
        prefix: The monitor's ``prefix``.
        category: The title of the section holding the charts.

    Returns:
        ``{category: {"<prefix>/*/<quantity>": ["Multiline", [regex]]}}``, the argument of
        ``SummaryWriter.add_custom_scalars``.

    Raises:
        ValueError: If ``level_names`` or ``quantities`` is empty or holds an empty name.
    """
    levels, names = list(level_names), list(quantities)
    if not levels or not names or not all(isinstance(n, str) and n for n in levels + names):
        raise ValueError(
            f"`level_names` ({levels}) and `quantities` ({names}) must be non-empty lists of non-empty names, e.g."
            f" ['fast', 'slow'] and {list(MONITOR_QUANTITIES)}."
        )
    alternatives = "|".join(re.escape(level) for level in levels)
    return {
        category: {
            f"{prefix}/*/{q}": ["Multiline", [f"^{re.escape(prefix)}/(?:{alternatives})/{re.escape(q)}$"]]
            for q in names
        }
    }


@rank_zero_only
def write_custom_scalars(loggers: Sequence[Any], layout: dict[str, dict[str, list[Any]]]) -> bool:
    r"""Write a custom-scalars layout to every :class:`~lightning.pytorch.loggers.TensorBoardLogger` in ``loggers``.

    TensorBoard shows one layout per run, the latest written, so write every category in one dict, once per run (at
    the start of fit). A logger's ``prefix`` is prepended to the tags as Lightning prepends it to logged names.
    Without a TensorBoard logger it only says so (``rank_zero_info``).

    Args:
        loggers: ``trainer.loggers``.
        layout: A dict from :func:`custom_scalars_layout` (several merge with ``{**a, **b}``).

    Returns:
        Whether a layout was written (on rank zero; ``None`` on other ranks).
    """
    tensorboards = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    if not tensorboards:
        rank_zero_info("No TensorBoardLogger attached: the custom-scalars layout (one chart per quantity) is skipped")
        return False
    for logger in tensorboards:
        logger.experiment.add_custom_scalars(_with_logger_prefix(layout, getattr(logger, "_prefix", "")))
    return True


def _with_logger_prefix(layout: dict[str, dict[str, list[Any]]], prefix: str) -> dict[str, dict[str, list[Any]]]:
    """The layout for a logger that logs ``<prefix>-<name>`` (Lightning's ``LOGGER_JOIN_CHAR``)."""
    if not prefix:
        return layout
    head = re.escape(f"{prefix}{TensorBoardLogger.LOGGER_JOIN_CHAR}")
    return {
        category: {
            chart: [kind, [f"^{head}{t[1:]}" if t.startswith("^") else head + t for t in tags]]
            for chart, (kind, tags) in charts.items()
        }
        for category, charts in layout.items()
    }
