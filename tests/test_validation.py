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
"""The shared argument checks of :mod:`nl_lightning._validation`."""

import math
import re

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning._validation import (
    check_choice,
    check_float,
    check_int,
    check_nonnegative,
    check_positive,
    check_unit,
    is_int,
    is_number,
)

NON_FINITE = [math.nan, math.inf, -math.inf]


# ---------------------------------------------------------------------------------------------------------- is_int
@pytest.mark.parametrize("value", [0, 1, -7, 10**30])
def test_is_int_accepts_python_ints(value):
    assert is_int(value) and is_int(value, allow_numpy=True)


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, torch.tensor(3), np.bool_(True), [1]])
def test_is_int_rejects_non_integers_and_bools(value):
    assert not is_int(value) and not is_int(value, allow_numpy=True)


@pytest.mark.parametrize("value", [np.int64(3), np.int32(-2), np.uint8(5)])
def test_is_int_accepts_numpy_integers_only_when_asked(value):
    assert not is_int(value)
    assert is_int(value, allow_numpy=True)


# ---------------------------------------------------------------------------------------------------------- is_number
@pytest.mark.parametrize("value", [0, -1, 2.5, math.nan, math.inf, np.float32(0.5), np.int64(2), torch.tensor(0.1)])
def test_is_number_accepts_real_numbers(value):
    assert is_number(value)


@pytest.mark.parametrize(
    "value", [True, False, "0.1", None, [0.1], torch.tensor([0.1, 0.2]), torch.tensor(True), complex(1, 1)]
)
def test_is_number_rejects_the_rest(value):
    assert not is_number(value)


# ---------------------------------------------------------------------------------------------------------- check_int
def test_check_int_returns_an_int():
    assert check_int("n", 3) == 3
    assert check_int("n", 0, 0) == 0
    assert check_int("n", -5, None) == -5
    assert check_int("n", 4, 1, 4) == 4
    out = check_int("n", np.int64(7), allow_numpy=True)
    assert out == 7 and type(out) is int


@pytest.mark.parametrize(
    ("value", "low", "high", "message"),
    [
        (0, 1, None, "`size` must be an integer >= 1, got 0."),
        (True, 1, None, "`size` must be an integer >= 1, got True."),
        (2.0, 1, None, "`size` must be an integer >= 1, got 2.0."),
        ("2", 1, None, "`size` must be an integer >= 1, got '2'."),
        (-1, 0, None, "`size` must be an integer >= 0, got -1."),
        (5, 1, 4, "`size` must be an integer in [1, 4], got 5."),
        (0, 1, 4, "`size` must be an integer in [1, 4], got 0."),
        (9, None, 8, "`size` must be an integer <= 8, got 9."),
        (1.5, None, None, "`size` must be an integer, got 1.5."),
        (False, None, None, "`size` must be an integer, got False."),
        (np.int64(3), 1, None, "`size` must be an integer >= 1, got np.int64(3)."),
    ],
)
def test_check_int_rejects(value, low, high, message):
    with pytest.raises(ValueError) as err:
        check_int("size", value, low, high)
    assert str(err.value) == message.replace("np.int64(3)", repr(np.int64(3)))


def test_check_int_hint_and_error_class():
    with pytest.raises(
        MisconfigurationException, match=r"^`batch_size` must be an integer >= 1, got 0; use e\.g\. 32\.$"
    ):
        check_int("batch_size", 0, hint="use e.g. 32", error=MisconfigurationException)
    with pytest.raises(ValueError, match="got True"):
        check_int("seed", True, None, allow_numpy=True)


# ---------------------------------------------------------------------------------------------------------- check_float
def test_check_float_returns_a_float():
    assert check_float("x", 1) == 1.0 and type(check_float("x", 1)) is float
    assert check_float("x", np.float32(0.5), 0, 1) == 0.5
    assert check_float("x", torch.tensor(0.25), 0, 1) == 0.25
    assert check_float("x", 0, 0, 1) == 0.0 and check_float("x", 1, 0, 1) == 1.0  # closed bounds included
    assert check_float("x", -3.0) == -3.0  # no bounds


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, dict(low=0, low_open=True), "`x` must be > 0, got 0."),
        (-0.5, dict(low=0), "`x` must be >= 0, got -0.5."),
        (1, dict(low=0, high=1, high_open=True), "`x` must be in [0, 1), got 1."),
        (0.0, dict(low=0, high=1, low_open=True), "`x` must be in (0, 1], got 0.0."),
        (2, dict(high=1), "`x` must be <= 1, got 2."),
        (1, dict(high=1, high_open=True), "`x` must be < 1, got 1."),
        (True, dict(low=0, high=1), "`x` must be a number in [0, 1], got True."),
        ("0.5", dict(low=0), "`x` must be a number >= 0, got '0.5'."),
        (None, dict(), "`x` must be a finite number, got None."),
        (torch.tensor(-2.0), dict(low=0), "`x` must be >= 0, got -2.0."),
        (torch.ones(2), dict(low=0), "`x` must be a number >= 0, got tensor([1., 1.])."),
        (math.nan, dict(low=0, high=1), "`x` must be in [0, 1], got nan."),
        (math.inf, dict(low=0), "`x` must be a finite number >= 0, got inf."),
        (math.nan, dict(low=0), "`x` must be a finite number >= 0, got nan."),
        (-math.inf, dict(), "`x` must be a finite number, got -inf."),
    ],
)
def test_check_float_rejects(value, kwargs, message):
    with pytest.raises(ValueError) as err:
        check_float("x", value, **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("check", [check_nonnegative, check_positive, check_unit, check_float])
def test_non_finite_values_are_rejected_everywhere(check, value):
    with pytest.raises(ValueError, match=r"^`v` must be .*, got (nan|inf|-inf)\.$"):
        check("v", value)


@pytest.mark.parametrize("check", [check_nonnegative, check_positive, check_unit, check_float])
def test_bools_are_rejected_everywhere(check):
    for value in (True, False):
        with pytest.raises(ValueError, match=rf"^`flag` must be a .*number.*, got {value}\.$"):
            check("flag", value)


def test_check_float_hint_and_error_class():
    with pytest.raises(MisconfigurationException, match=r"^`lr` must be > 0, got 0; use e\.g\. 1e-3\.$"):
        check_float("lr", 0, 0, low_open=True, hint="use e.g. 1e-3", error=MisconfigurationException)


# ---------------------------------------------------------------------------------------------------------- shortcuts
def test_check_nonnegative():
    assert check_nonnegative("lr", 0) == 0.0 and check_nonnegative("lr", 2.5) == 2.5
    with pytest.raises(ValueError, match=r"^`lr` must be >= 0, got -0\.1\.$"):
        check_nonnegative("lr", -0.1)


def test_check_positive():
    assert check_positive("eps", 1e-8) == 1e-8
    for bad in (0, 0.0, -1):
        with pytest.raises(ValueError, match=rf"^`eps` must be > 0, got {re.escape(repr(bad))}\.$"):
            check_positive("eps", bad)


def test_check_unit():
    assert check_unit("momentum", 0) == 0.0 and check_unit("momentum", 1) == 1.0
    assert check_unit("beta2", 0.999, closed=False) == 0.999
    with pytest.raises(ValueError, match=r"^`momentum` must be in \[0, 1\], got 1\.5\.$"):
        check_unit("momentum", 1.5)
    with pytest.raises(ValueError, match=r"^`beta2` must be in \[0, 1\), got 1\.0\.$"):
        check_unit("beta2", 1.0, closed=False)
    with pytest.raises(ValueError, match=r"^`momentum` must be in \[0, 1\], got -0\.1; it is the retention\.$"):
        check_unit("momentum", -0.1, hint="it is the retention")


# --------------------------------------------------------------------------------------------------------- check_choice
def test_check_choice():
    assert check_choice("kind", "rms", ("identity", "rms")) == "rms"
    assert check_choice("norm", None, ("rmsnorm", None)) is None
    with pytest.raises(ValueError, match=r"^`kind` must be one of 'identity', 'rms', got 'adam'\.$"):
        check_choice("kind", "adam", ("identity", "rms"))
    with pytest.raises(ValueError, match=r"got \['rms'\]"):  # unhashable values are rejected, not a TypeError
        check_choice("kind", ["rms"], {"identity", "rms"})
    with pytest.raises(MisconfigurationException, match=r"one of 'a', 'b', got 'c'; pick one\.$"):
        check_choice("x", "c", ["a", "b"], hint="pick one", error=MisconfigurationException)


# ---------------------------------------------------------------------------------------------------------- callers
def test_optimizers_and_regression_data_accept_numpy_integers():
    from nl_lightning.data.regression import SlowlyChangingRegression
    from nl_lightning.optim import DMGD, M3, PreconditionedMomentum

    p = torch.zeros(2, 2, requires_grad=True)
    M3([p], ns_steps=np.int64(3), slow_every=np.int32(4))
    PreconditionedMomentum([p], ns_steps=np.int64(3))
    DMGD([p], hidden=np.int64(2), seed=np.int64(1))
    ds = SlowlyChangingRegression(num_steps=np.int64(50), change_every=np.int64(10), seed=np.int64(0))
    assert len(ds) == 50 and type(ds.num_steps) is int
    with pytest.raises(ValueError, match=r"`num_steps` must be an integer >= 1, got True"):
        SlowlyChangingRegression(num_steps=True)
