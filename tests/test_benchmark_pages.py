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
"""Every committed benchmark page is the rendering of its JSON report by ``benchmarks/render.py``."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REPORTS = sorted((BENCHMARKS / "results").glob("*.json"))


def _render():
    spec = importlib.util.spec_from_file_location("_bench_render", BENCHMARKS / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_reports():
    assert REPORTS, f"no JSON report in {BENCHMARKS / 'results'}"


@pytest.mark.parametrize("report", REPORTS, ids=[p.stem for p in REPORTS])
def test_page_is_rendered_from_its_json(report):
    page = report.with_suffix(".md")
    assert page.is_file(), f"{page.name} is missing: run `python benchmarks/render.py {report.stem}`"
    expected = _render().page(json.loads(report.read_text()))
    assert page.read_text() == expected, (
        f"{page.name} is not the rendering of {report.name}: run `python benchmarks/render.py {report.stem}`"
    )
