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
"""The one renderer: a benchmark report (``benchmarks/results/<name>.json``) -> its page (``<name>.md``).

Each benchmark script writes JSON only and defines ``TITLE`` and ``tables(report) -> list[dict]``; a table is
``{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...], "note": str (optional)}``. This module finds the
script from the report's ``command``, asks it for its tables and writes the page: title, command, timestamp and wall
time (for a report pooled with ``--merge``, those of every run in its ``merged_from``), environment, then the
tables. Cells that are strings are written as they are; ints get thousands separators, floats four significant
digits, ``None`` a dash.

Usage::

    python benchmarks/render.py                  # every report in benchmarks/results/
    python benchmarks/render.py lm continual     # some of them
    python benchmarks/render.py --check          # exit 1 if a committed page differs from its report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DASH = "–"


def fmt(value: Any) -> str:
    """One table cell."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def script_of(report: dict[str, Any]) -> ModuleType:
    """Import the benchmark script named in the report's ``command`` (``python benchmarks/<script>.py ...``)."""
    words = shlex.split(report["command"])
    path = next((HERE / Path(w).name for w in words if w.endswith(".py")), None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"The report's command {report['command']!r} names no script in {HERE}.")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # the scripts import `_common`
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def table_lines(table: dict[str, Any]) -> list[str]:
    """A Markdown table with its title line above and its note below."""
    columns = table["columns"]
    lines = [f"{table['title']}:", ""] if table.get("title") else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table["rows"]:
        if len(row) != len(columns):
            raise ValueError(f"Table {table.get('title')!r}: row {row!r} has {len(row)} cells for {len(columns)}.")
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    if table.get("note"):
        lines += ["", table["note"]]
    return lines + [""]


def page(report: dict[str, Any], module: Optional[ModuleType] = None) -> str:
    """The Markdown page of one report."""
    module = module or script_of(report)
    lines = [f"# {module.TITLE}", ""]
    runs = report.get("merged_from") or [report]
    if "merged_from" in report:
        lines.append(f"Pooled with `--merge` from {len(runs)} runs of the same sources:  ")
    for r in runs:
        when = ", ".join([r.get("timestamp", "")] + ([f"{r['wall_s']:.0f} s"] if "wall_s" in r else []))
        lines.append(f"Command: `{r['command']}` ({when})  ")
    env = report.get("environment", {}).items()  # its scalar entries, in their order
    lines += ["; ".join(f"{k} {v}" for k, v in env if isinstance(v, (str, int, float, bool)) and v != ""), ""]
    for table in module.tables(report):
        lines += table_lines(table)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="report names (default: every benchmarks/results/*.json)")
    parser.add_argument("--check", action="store_true", help="compare with the committed pages instead of writing")
    args = parser.parse_args(argv)
    paths = [RESULTS / f"{n}.json" for n in args.names] or sorted(RESULTS.glob("*.json"))
    if missing := [p.name for p in paths if not p.is_file()]:
        parser.error(f"no report {missing} in {RESULTS}; name reports by their file name without .json")
    stale = []
    for path in paths:
        text, target = page(json.loads(path.read_text())), path.with_suffix(".md")
        if args.check:
            stale += [] if target.is_file() and target.read_text() == text else [target.name]
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"Pages that differ from their reports: {stale}. Run `python benchmarks/render.py` and commit them.")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
