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
finds one. A ``--config`` value that is neither a file nor a recipe name stops the command with one line that lists
the bundled recipes (exit status 2). A ``--ckpt_path`` file is checked with :func:`check_checkpoint` before the
subcommand runs, so a truncated or corrupt checkpoint is reported by name.

The resolved configuration is saved as ``config.yaml`` in the log directory (overwritten on a re-run).
"""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from importlib.resources import files
from pathlib import Path, PurePath
from typing import NoReturn, Optional, Union, overload

import torch
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

__all__ = ["check_checkpoint", "list_recipes", "main", "recipe_path"]

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
        return value  # not a recipe name: left to jsonargparse, unless _check_configs stops first


def _config_values(args: list[str]) -> list[str]:
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in _CONFIG_FLAGS]
    return values + [arg.removeprefix("--config=") for arg in args if arg.startswith("--config=")]


def _check_configs(args: list[str]) -> None:
    """Stop on a ``--config`` value that is a file name but neither an existing file nor a bundled recipe.

    jsonargparse would print its whole usage and "File does not exist"; one line that lists the recipes says more.
    Inline YAML, URLs and directories are left to jsonargparse.
    """
    for value in _config_values(args):
        if _looks_inline(value) or _exists(value):
            continue
        try:
            recipe_path(value)
        except FileNotFoundError as err:
            _exit_with(
                f"--config {value!r} is neither a file nor a bundled recipe. {err} Pass one of those names or the"
                " path of a YAML file."
            )


def _exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return True  # not a plain file name: leave it to jsonargparse


def _looks_inline(value: str) -> bool:
    """Whether a ``--config`` value is an inline YAML/JSON document or a URL rather than a file name."""
    return any(mark in value for mark in ("\n", "{", "[", ": ", "://")) or value.rstrip().endswith(":")


def _exit_with(message: str) -> NoReturn:
    """Stop the command line as argparse does on a bad argument: one line on stderr, exit status 2."""
    print(f"nl-lightning: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_checkpoint(path: Union[str, os.PathLike[str]]) -> None:
    """Check that a local checkpoint file is intact before a run resumes from it.

    A checkpoint written by ``torch.save`` (as Lightning writes them) is a zip archive: a truncated file has no
    central directory, and a corrupt one fails the archive's CRC checks, which ``torch.load`` does not verify. A
    file that is not a zip archive (the legacy ``torch.save`` format) is checked by loading it on the CPU. Names that
    are not local files (``"last"``, ``"best"``, ``"hpc"``, ``"registry"``, URLs) and missing files are left to
    Lightning, which resolves or reports them.

    Args:
        path: The checkpoint file, as given to ``--ckpt_path`` or ``trainer.fit(ckpt_path=...)``.

    Raises:
        IsADirectoryError: If ``path`` is a directory; the message says to pass a ``.ckpt`` file inside it.
        ValueError: If the file is truncated or corrupt; the message names it and says what to pass instead.

    Example::

        check_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")
        trainer.fit(model, datamodule, ckpt_path="lightning_logs/version_0/checkpoints/last.ckpt")

    """
    local = Path(os.fspath(path))
    if local.is_dir():
        raise IsADirectoryError(
            f"ckpt_path {str(local)!r} is a directory: pass a checkpoint file inside it (for example"
            f" {str(local / 'last.ckpt')!r}), or 'last' for the latest checkpoint of this run's ModelCheckpoint."
        )
    if not local.is_file():
        return
    damaged = (
        f"The checkpoint {str(local)!r} is damaged ({{}}): it cannot be resumed from. Pass an intact checkpoint (an"
        " earlier one, or 'last'), or leave ckpt_path out to start the run from scratch."
    )
    with open(local, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(local):
        raise ValueError(damaged.format("truncated: a zip archive whose end, its central directory, is missing"))
    if zipfile.is_zipfile(local):
        try:
            with zipfile.ZipFile(local) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise ValueError(damaged.format(f"unreadable zip archive: {err}")) from err
        if bad is not None:
            raise ValueError(damaged.format(f"corrupt: member {bad!r} fails its CRC check"))
        return
    try:
        torch.load(local, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: pickle, EOF, zip or OS errors all mean "cannot be read"
        raise ValueError(damaged.format(f"truncated or not a checkpoint: {type(err).__name__}: {err}")) from err


class _CLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` that checks a ``--ckpt_path`` file once the arguments are parsed.

    LightningCLI reads the checkpoint's hyperparameters right after parsing, and the subcommand loads it again; both
    would fail on a damaged file with torch's own error, which does not name it.
    """

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(ckpt_path)


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
        _check_configs(resolved)
    else:
        args = _resolve_configs(args)
        _check_configs(args)
    cli = _CLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "nl-lightning", "description": _DESCRIPTION.format(", ".join(list_recipes()) or "none")},
        args=args,
        run=run,
    )
    return None if args is None else cli
