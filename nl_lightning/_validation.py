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
"""Argument checks shared by the models and data modules (``ValueError`` naming the argument and the value)."""

from typing import Any

__all__ = ["check_int", "is_int"]


def is_int(value: Any) -> bool:
    """A Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise a ``ValueError`` naming ``name`` and ``value`` unless ``value`` is an integer ``>= low``."""
    if not is_int(value) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
