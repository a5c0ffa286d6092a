# Copyright The Lightning AI team.
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
Command Line
^^^^^^^^^^^^

``nl-lightning`` (or ``python -m nl_lightning``) is a :class:`~lightning.pytorch.cli.LightningCLI` in which ``model:``
and ``data:`` name any LightningModule and LightningDataModule by ``class_path`` / ``init_args``, and
``trainer.callbacks`` any callbacks, for example :class:`~nl_lightning.callbacks.MultiFrequencyUpdates`. Its
subcommands are ``fit``, ``validate``, ``test`` and ``predict``::

    nl-lightning fit --config recipes/digits_multifrequency.yaml
    nl-lightning fit --config digits_multifrequency --trainer.max_epochs=5   # a bundled recipe, by name
    nl-lightning fit --help
    tensorboard --logdir lightning_logs

A ``--config`` value that is not an existing file but names a recipe bundled with the package
(``digits_multifrequency``, ``digits_multifrequency.yaml`` or ``recipes/digits_multifrequency.yaml``) is replaced by
the bundled file, so the recipes run from any directory. :func:`list_recipes` lists them and :func:`recipe_path`
finds one.

The resolved configuration is saved as ``config.yaml`` in the log directory (overwritten on a re-run).
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path, PurePath
from typing import Optional, overload

from lightning.pytorch.cli import LightningCLI

__all__ = ["list_recipes", "main", "recipe_path"]

_CONFIG_FLAGS = ("--config", "-c")
_DESCRIPTION = (
    "Nested Learning for PyTorch Lightning. Train any LightningModule with multi-frequency updates from a YAML recipe,"
    " for example: nl-lightning fit --config digits_multifrequency. Bundled recipes (usable as --config NAME): {}."
)


def _recipes_dir() -> Path:
    return Path(str(files("nl_lightning") / "recipes"))


def list_recipes() -> list[str]:
    """The names (file names without ``.yaml``) of the recipes bundled in ``nl_lightning/recipes``, sorted.

    Example::

        list_recipes()  # ['digits_multifrequency', ...]

    """
    folder = _recipes_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())


def recipe_path(name: str) -> Path:
    """The path of a bundled recipe.

    Args:
        name: The recipe's file name, with or without ``.yaml`` (``"digits_multifrequency"``); a leading
            ``recipes/`` is accepted too.

    Raises:
        FileNotFoundError: If no bundled recipe has that name; the message lists those that exist.

    Example::

        recipe_path("digits_multifrequency")  # .../nl_lightning/recipes/digits_multifrequency.yaml

    """
    pure = PurePath(name)
    if str(pure.parent) in (".", "recipes"):
        stem = pure.name.removesuffix(".yaml")
        path = _recipes_dir() / f"{stem}.yaml"
        if stem and path.is_file():
            return path
    raise FileNotFoundError(f"No bundled recipe named {name!r}; the bundled recipes are {list_recipes()}.")


def _resolve_configs(args: list[str]) -> list[str]:
    """Replace every ``--config`` value that is not an existing file but names a bundled recipe by its path."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in _CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = _resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve_config(arg.removeprefix("--config="))
    return out


def _resolve_config(value: str) -> str:
    try:
        if Path(value).is_file():
            return value
        return str(recipe_path(value))
    except (OSError, ValueError):  # FileNotFoundError, or a name the OS refuses (a long inline YAML string)
        return value  # not a recipe name: jsonargparse loads or reports it


@overload
def main(args: None = None, run: bool = True) -> None: ...


@overload
def main(args: list[str], run: bool = True) -> LightningCLI: ...


def main(args: Optional[list[str]] = None, run: bool = True) -> Optional[LightningCLI]:
    """Build (and with ``run=True`` run) the ``nl-lightning`` command line.

    Args:
        args: Command-line style arguments, for example ``["fit", "--config", "digits_multifrequency"]``. ``None``
            reads ``sys.argv[1:]``, as the console script does.
        run: With ``True`` the first argument is a subcommand (``fit``, ``validate``, ``test``, ``predict``) that runs;
            with ``False`` there are no subcommands and the model, data module and trainer are only instantiated.

    Returns:
        The :class:`~lightning.pytorch.cli.LightningCLI` (``cli.model``, ``cli.datamodule``, ``cli.trainer``) when
        ``args`` is given. ``None`` when ``args`` is ``None`` (command-line use), so that the console script's
        ``sys.exit(main())`` exits with status 0.

    Example::

        cli = main(["fit", "--config", "digits_multifrequency", "--trainer.max_steps=3"])
        cli.trainer.global_step  # 3

    """
    if args is None:
        resolved = _resolve_configs(sys.argv[1:])
        if resolved != sys.argv[1:]:
            sys.argv[1:] = resolved
    else:
        args = _resolve_configs(args)
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "nl-lightning", "description": _DESCRIPTION.format(", ".join(list_recipes()) or "none")},
        args=args,
        run=run,
    )
    return None if args is None else cli
