"""The ``nl-lightning`` LightningCLI: every bundled recipe instantiates, a short real fit, recipe names, ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import nl_lightning
from nl_lightning.callbacks import MultiFrequencyUpdates, NestedLearningMonitor
from nl_lightning.cli import _resolve_configs, list_recipes, main, recipe_files, recipe_path
from nl_lightning.data import DigitsDataModule, fashion_mnist_available
from nl_lightning.models import MLPClassifier

RECIPES_DIR = Path(nl_lightning.__file__).parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
DIGITS = RECIPES_DIR / "digits_multifrequency.yaml"
DIGITS_BASE = RECIPES_DIR / "_base" / "digits.yaml"  # the `# base:` file digits_multifrequency.yaml builds on
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run from an empty directory with a bare ``sys.argv``: no logs or ``config.yaml`` land in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])


def test_recipes_are_bundled():
    assert DIGITS in RECIPES
    assert list_recipes() == [p.stem for p in RECIPES]
    # The repository's recipes/ (a symlink into the package sources) holds what the installed package ships.
    in_repo = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert [p.name for p in in_repo] == [p.name for p in RECIPES]
    assert all(a.read_text() == b.read_text() for a, b in zip(in_repo, RECIPES, strict=True))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_instantiates(recipe):
    cpu = ["--trainer.accelerator=cpu"] if recipe.stem.startswith("gpu_") and not torch.cuda.is_available() else []
    cli = main(["--config", str(recipe), *cpu], run=False)
    assert isinstance(cli.model, pl.LightningModule)
    assert cli.trainer is not None
    if recipe == DIGITS:
        assert type(cli.model) is MLPClassifier
        assert type(cli.datamodule) is DigitsDataModule
        assert isinstance(cli.trainer.logger, TensorBoardLogger)
        (updates,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)]
        assert [(lvl.name, lvl.params, lvl.every) for lvl in updates.levels] == [
            ("head", ("head.*",), 1),
            ("backbone", ("backbone.*",), 8),
        ]
        assert any(isinstance(cb, NestedLearningMonitor) for cb in cli.trainer.callbacks)


def test_short_fit_through_the_cli(tmp_path, capsys):
    cli = main(
        [
            "fit",
            "--config",
            str(DIGITS),
            "--trainer.max_steps=3",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 3
    (updates,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MultiFrequencyUpdates)]
    assert updates.num_updates == {"head": 3, "backbone": 0}
    assert not (Path.cwd() / "lightning_logs").exists()


@pytest.mark.parametrize(
    "name", ["digits_multifrequency", "digits_multifrequency.yaml", "recipes/digits_multifrequency"]
)
def test_bundled_recipe_by_name(name):
    assert recipe_path(name) == DIGITS
    assert recipe_files(name) == [DIGITS_BASE, DIGITS]
    # A recipe expands to its bases and itself, in merge order, each as a --config of its own.
    expanded = ["fit", "--config", str(DIGITS_BASE), "--config", str(DIGITS)]
    assert _resolve_configs(["fit", "--config", name]) == expanded
    assert _resolve_configs(["fit", "-c", name, "--trainer.max_steps=3"]) == [
        *[v if v != "--config" else "-c" for v in expanded],
        "--trainer.max_steps=3",
    ]
    assert _resolve_configs([f"--config={name}"]) == [f"--config={DIGITS_BASE}", f"--config={DIGITS}"]
    cli = main(["--config", name], run=False)
    assert type(cli.model) is MLPClassifier


def test_existing_file_and_unknown_names_are_left_alone(tmp_path):
    local = tmp_path / "digits_multifrequency.yaml"
    local.write_text(DIGITS.read_text())
    # The local file is used, not the bundled recipe; its `# base:` line, absent next to it, names the bundled base.
    assert _resolve_configs(["--config", "digits_multifrequency.yaml"]) == [
        "--config",
        str(DIGITS_BASE),
        "--config",
        "digits_multifrequency.yaml",
    ]
    base_free = tmp_path / "base_free.yaml"
    base_free.write_text("trainer:\n  max_steps: 1\n")
    assert _resolve_configs(["--config", "base_free.yaml"]) == ["--config", "base_free.yaml"]
    assert _resolve_configs(["--config", "nope", "--trainer.max_steps=3"]) == [
        "--config",
        "nope",
        "--trainer.max_steps=3",
    ]
    inline = "{trainer: {max_steps: 1}}" + " " * 300  # jsonargparse also takes inline YAML; longer than a file name
    assert _resolve_configs(["--config", inline]) == ["--config", inline]
    with pytest.raises(FileNotFoundError, match="digits_multifrequency"):
        recipe_path("nope")
    with pytest.raises(FileNotFoundError):
        recipe_path("elsewhere/digits_multifrequency")


def test_bundled_name_from_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nl-lightning", "--config=digits_multifrequency"])
    assert main(run=False) is None  # command-line use returns None, so `sys.exit(main())` exits with 0
    assert sys.argv == ["nl-lightning", f"--config={DIGITS_BASE}", f"--config={DIGITS}"]


def test_python_m_help():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "nl_lightning", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "nl-lightning" in result.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_a_few_steps(recipe, tmp_path):
    """Every recipe really runs: two optimizer steps through the CLI, logs in tmp_path."""
    if "fmnist" in recipe.stem and not fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not found: install dataset-fashion-mnist or set NL_FASHION_MNIST_ROOT")
    args = ["fit", "--config", str(recipe), "--trainer.max_steps=2", *QUIET, f"--trainer.default_root_dir={tmp_path}"]
    if recipe.stem.startswith("gpu_") and not torch.cuda.is_available():
        # The GPU recipes' model, optimizer and bf16-mixed precision, on the CPU with short sequences.
        args += ["--trainer.accelerator=cpu", "--data.init_args.seq_len=128", "--data.init_args.batch_size=2"]
        args += ["--data.init_args.num_workers=0"]
    cli = main(args)
    assert cli.trainer.global_step == 2
