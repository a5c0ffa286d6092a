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
"""Argument checks shared by the models, optimizers and data modules.

Every ``check_*`` function raises early, with a message that names the argument, the allowed values and the value it
got (``"`lr` must be >= 0, got -0.1."``), followed by an optional ``hint`` on how to fix it. The exception class is
``ValueError`` unless ``error`` names another one (data modules and Lightning modules raise Lightning's
``MisconfigurationException``). Booleans are never accepted as numbers, although Python treats ``True`` as ``1``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch

__all__ = [
    "check_choice",
    "check_float",
    "check_int",
    "check_nonnegative",
    "check_positive",
    "check_unit",
    "is_int",
    "is_number",
]


def is_int(value: Any, allow_numpy: bool = False) -> bool:
    """Whether ``value`` is an integer that is not a ``bool``.

    Args:
        value: The value to test.
        allow_numpy: Also accept other :class:`numbers.Integral` types, such as NumPy's integer scalars
            (``np.int64``); ``False`` accepts the Python ``int`` only.

    Returns:
        ``True`` for an integer, ``False`` for anything else (``True`` / ``False``, floats, tensors, strings).

    """
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) if allow_numpy else isinstance(value, int)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number that is not a ``bool``: an ``int``, a ``float``, a NumPy scalar or a
    one-element non-boolean tensor (a learning rate may be a 0-dim tensor). NaN and infinities count as numbers."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """The value as the messages print it: ``repr``, and a one-element tensor as its Python number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return repr(value.item())
    return repr(value)


def _fail(name: str, expected: str, value: Any, hint: str, error: type[Exception]) -> None:
    raise error(f"`{name}` must be {expected}, got {_show(value)}{f'; {hint}' if hint else ''}.")


def check_int(
    name: str,
    value: Any,
    low: Optional[int] = 1,
    high: Optional[int] = None,
    *,
    allow_numpy: bool = False,
    hint: str = "",
    error: type[Exception] = ValueError,
) -> int:
    """Check that ``value`` is an integer in ``[low, high]`` (``bool`` excluded) and return it as an ``int``.

    Args:
        name: The argument's name, for the message.
        value: The value to check.
        low: The smallest allowed value (default 1); ``None`` for no lower bound.
        high: The largest allowed value; ``None`` (default) for no upper bound.
        allow_numpy: Also accept NumPy integer scalars (see :func:`is_int`).
        hint: Appended to the message after ``"; "``: how to fix the value.
        error: The exception class to raise.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: (or ``error``) If ``value`` is not an integer or is out of range; the message names ``name``,
            the range and ``value``.

    """
    if low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    elif low is not None:
        expected = f"an integer >= {low}"
    elif high is not None:
        expected = f"an integer <= {high}"
    else:
        expected = "an integer"
    if not is_int(value, allow_numpy) or (low is not None and value < low) or (high is not None and value > high):
        _fail(name, expected, value, hint, error)
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
    error: type[Exception] = ValueError,
) -> float:
    """Check that ``value`` is a finite real number in the given interval and return it as a ``float``.

    NaN and infinities are always rejected; so are ``bool`` values, strings and tensors of more than one element. A
    one-element tensor is accepted (a learning rate may be one).

    Args:
        name: The argument's name, for the message.
        value: The value to check.
        low: The lower bound; ``None`` for none.
        high: The upper bound; ``None`` for none.
        low_open: Exclude ``low`` itself (``(low, ...``) rather than include it (``[low, ...``).
        high_open: Exclude ``high`` itself.
        hint: Appended to the message after ``"; "``: how to fix the value.
        error: The exception class to raise.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: (or ``error``) If ``value`` is not a finite number in the interval; the message names ``name``,
            the interval and ``value``.

    """
    if low is not None and high is not None:
        expected = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        expected = f"{'<' if high_open else '<='} {high}"
    else:
        expected = "a finite number"
    if not is_number(value):
        _fail(name, expected if expected.startswith("a ") else f"a number {expected}", value, hint, error)
    x = float(value)
    if not math.isfinite(x):
        # a bounded interval already says the value must be finite; a half-open one does not
        finite = low is not None and high is not None or expected.startswith("a ")
        _fail(name, expected if finite else f"a finite number {expected}", value, hint, error)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        _fail(name, expected, value, hint, error)
    return x


def check_nonnegative(name: str, value: Any, *, hint: str = "", error: type[Exception] = ValueError) -> float:
    """Check that ``value`` is a finite number ``>= 0`` (see :func:`check_float`) and return it as a ``float``."""
    return check_float(name, value, 0, hint=hint, error=error)


def check_positive(name: str, value: Any, *, hint: str = "", error: type[Exception] = ValueError) -> float:
    """Check that ``value`` is a finite number ``> 0`` (see :func:`check_float`) and return it as a ``float``."""
    return check_float(name, value, 0, low_open=True, hint=hint, error=error)


def check_unit(
    name: str, value: Any, closed: bool = True, *, hint: str = "", error: type[Exception] = ValueError
) -> float:
    """Check that ``value`` is in ``[0, 1]`` (``closed``) or ``[0, 1)`` (see :func:`check_float`); return a float."""
    return check_float(name, value, 0, 1, high_open=not closed, hint=hint, error=error)


def check_choice(
    name: str, value: Any, choices: Sequence[Any], *, hint: str = "", error: type[Exception] = ValueError
) -> Any:
    """Check that ``value`` is one of ``choices`` and return it.

    Args:
        name: The argument's name, for the message.
        value: The value to check.
        choices: The allowed values, listed in the message in this order.
        hint: Appended to the message after ``"; "``.
        error: The exception class to raise.

    Returns:
        ``value``.

    Raises:
        ValueError: (or ``error``) If ``value`` is not one of ``choices``.

    """
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set or dict of choices
        ok = False
    if not ok:
        _fail(name, f"one of {', '.join(repr(c) for c in choices)}", value, hint, error)
    return value
