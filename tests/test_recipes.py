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
"""Recipes built from shared bases (``# base: FILE`` lines): every bundled recipe resolves to the configuration
stored in ``fixtures/recipes_resolved.json`` (``nl-lightning fit --config NAME --print_config``, parsed), and
:func:`~nl_lightning.cli.load_recipe` merges the files as jsonargparse does.

The fixture holds each recipe's full resolved configuration, Trainer and class defaults included, so a Lightning
upgrade that adds a Trainer argument changes it too. ``python tests/test_recipes.py --regenerate`` rewrites it from
the current recipes: only after checking that ``git diff`` of the fixture shows nothing but the intended change.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import nl_lightning
from nl_lightning.cli import list_recipes, load_recipe, main, recipe_files, recipe_path

FIXTURE = Path(__file__).parent / "fixtures" / "recipes_resolved.json"
RECIPES_DIR = Path(nl_lightning.__file__).parent / "recipes"
BASES_DIR = RECIPES_DIR / "_base"


def resolved(args: list[str]) -> dict[str, Any]:
    """The configuration ``nl-lightning fit <args> --print_config`` prints, as a mapping."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])


@pytest.fixture(scope="module")
def snapshot() -> dict[str, dict[str, Any]]:
    return json.loads(FIXTURE.read_text())


# ----------------------------------------------------------------------------------------------- the snapshot
def test_snapshot_covers_every_recipe(snapshot):
    assert sorted(snapshot) == list_recipes()


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_resolves_as_snapshotted(name, snapshot):
    assert resolved(["--config", name]) == snapshot[name]


@pytest.mark.parametrize("name", list_recipes())
def test_load_recipe_is_the_same_configuration(name, snapshot, tmp_path):
    """The merged mapping, given to the CLI as one file, resolves to the same configuration as the recipe."""
    merged = load_recipe(name)
    assert not any(key.endswith("+") for key in _keys(merged))
    single = tmp_path / "merged.yaml"
    single.write_text(yaml.safe_dump(merged))
    assert resolved(["--config", str(single)]) == snapshot[name]


def _keys(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [*tree, *(k for v in tree.values() for k in _keys(v))]
    if isinstance(tree, list):
        return [k for v in tree for k in _keys(v)]
    return []


# ------------------------------------------------------------------------------------------------------ bases
def test_bases_are_not_recipes():
    assert not any(name.startswith("_") for name in list_recipes())
    for name in ("_base/ewc", "_base/ewc.yaml", "recipes/_base/ewc.yaml"):
        with pytest.raises(FileNotFoundError, match="No bundled recipe"):
            recipe_path(name)


def test_every_base_is_used():
    used = {p.resolve() for name in list_recipes() for p in recipe_files(name)}
    assert sorted(p.name for p in BASES_DIR.glob("*.yaml") if p.resolve() not in used) == []


def test_recipe_files_in_merge_order():
    assert recipe_files("split_digits_class_il_cms_drift") == [
        BASES_DIR / "split_digits_class_il.yaml",
        BASES_DIR / "split_digits_class_il_cms.yaml",
        BASES_DIR / "cms_multifrequency.yaml",
        BASES_DIR / "cms_drift.yaml",
        RECIPES_DIR / "split_digits_class_il_cms_drift.yaml",
    ]
    assert recipe_files(str(RECIPES_DIR / "gpu_text_hope.yaml")) == [RECIPES_DIR / "gpu_text_hope.yaml"]


def test_load_recipe_appends_and_merges():
    config = load_recipe("split_digits_class_il_ewc")
    assert [cb["class_path"].rsplit(".", 1)[-1] for cb in config["trainer"]["callbacks"]] == [
        "ContinualEvaluation",
        "ElasticWeightConsolidation",
    ]
    assert config["trainer"]["logger"] == {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "default_hp_metric": False, "name": "split_digits_class_il_ewc"},
    }
    cms = load_recipe("split_digits_class_il_cms_naive")["model"]
    assert cms["class_path"] == "nl_lightning.models.CMSClassifier" and "hidden" not in cms["init_args"]


# ------------------------------------------------------------------------------------------- overrides after it
def test_extra_config_and_arguments_after_the_name(snapshot, tmp_path):
    override = tmp_path / "mine.yaml"
    override.write_text("trainer:\n  log_every_n_steps: 1\ndata:\n  init_args:\n    batch_size: 8\n")
    got = resolved(["--config", "split_digits_class_il_ewc", "--config", str(override), "--trainer.max_epochs=3"])
    expected = json.loads(json.dumps(snapshot["split_digits_class_il_ewc"]))
    expected["trainer"].update(log_every_n_steps=1, max_epochs=3)
    expected["data"]["init_args"]["batch_size"] = 8
    assert got == expected


def test_a_copied_recipe_keeps_its_bundled_bases(snapshot, tmp_path):
    copy = tmp_path / "elsewhere" / "my_ewc.yaml"
    copy.parent.mkdir()
    copy.write_text((RECIPES_DIR / "split_digits_class_il_ewc.yaml").read_text())
    assert recipe_files(copy)[:-1] == recipe_files("split_digits_class_il_ewc")[:-1]
    assert resolved(["--config", str(copy)]) == snapshot["split_digits_class_il_ewc"]


def test_local_bases_chain_and_merge_once(tmp_path):
    (tmp_path / "common.yaml").write_text("trainer:\n  max_epochs: 7\n  callbacks+:\n    - class_path: a.A\n")
    (tmp_path / "left.yaml").write_text("# base: common.yaml\ntrainer:\n  log_every_n_steps: 3\n")
    (tmp_path / "right.yaml").write_text("# base: common.yaml\n\n# base: ./sub/extra.yaml\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.yaml").write_text("model:\n  init_args:\n    lr: 0.5\n")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# Mine.\n# base: left.yaml\n# base: right.yaml\nseed_everything: 1\n# base: ignored.yaml\n")
    names = [p.relative_to(tmp_path).as_posix() for p in recipe_files(recipe)]
    assert names == ["common.yaml", "left.yaml", "sub/extra.yaml", "right.yaml", "mine.yaml"]
    assert load_recipe(recipe) == {
        "trainer": {"max_epochs": 7, "callbacks": [{"class_path": "a.A"}], "log_every_n_steps": 3},
        "model": {"init_args": {"lr": 0.5}},
        "seed_everything": 1,
    }


# ----------------------------------------------------------------------------------------------------- errors
def test_a_missing_base_stops_with_the_line_to_fix(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# base: _base/no_such_base.yaml\ntrainer:\n  max_epochs: 1\n")
    with pytest.raises(FileNotFoundError, match=r"declares '# base: _base/no_such_base.yaml'"):
        recipe_files(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_base.yaml" in err and "Fix the path" in err


def test_a_cycle_of_bases_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("# base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("# base: a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        recipe_files(tmp_path / "a.yaml")


def test_load_recipe_rejects_what_it_cannot_merge(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "base.yaml").write_text("trainer:\n  callbacks: {class_path: a.A}\n")
    (tmp_path / "child.yaml").write_text("# base: base.yaml\ntrainer:\n  callbacks+: [{class_path: b.B}]\n")
    with pytest.raises(ValueError, match=r"'callbacks\+' appends to a list"):
        load_recipe(tmp_path / "child.yaml")


def _regenerate() -> None:
    snapshot = {name: resolved(["--config", name]) for name in list_recipes()}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(snapshot, indent=1, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit("usage: python tests/test_recipes.py --regenerate")
    sys.argv = sys.argv[:1]
    _regenerate()
