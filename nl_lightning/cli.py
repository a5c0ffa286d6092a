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
the bundled recipes (exit status 2).

Recipes share their common parts through base files. A line ``# base: FILE`` in the comment block at the top of a
config file names a file it builds on: ``--config recipe.yaml`` becomes ``--config FILE --config recipe.yaml``, bases
first (recursively, each file once, in the order declared), so jsonargparse merges them as several ``--config`` files:
mappings merge key by key, a ``class_path`` / ``init_args`` mapping given only ``init_args`` keeps its class, a list
replaces the base's list and a ``key+:`` entry (``callbacks+:``) appends to it. ``FILE`` is relative to the declaring
file's folder, or else to the bundled recipes folder, so a copy of a bundled recipe keeps its bases. The bundled bases
live in ``recipes/_base/`` and are not recipes of their own. :func:`recipe_files` lists the files a recipe expands to,
:func:`load_recipe` merges them into one mapping, and ``nl-lightning fit --config NAME --print_config`` prints the
resolved configuration. Further ``--config`` files and ``--key=value`` arguments after the recipe override it as
usual.

A ``--ckpt_path`` file is checked with :func:`check_checkpoint` before the subcommand runs, so a truncated or corrupt
checkpoint is reported by name.

The resolved configuration is saved as ``config.yaml`` in the log directory (overwritten on a re-run).
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
import zlib
from importlib.resources import files
from pathlib import Path, PurePath
from typing import Any, NoReturn, Optional, Union, overload

import torch
import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

__all__ = ["check_checkpoint", "list_recipes", "load_recipe", "main", "recipe_files", "recipe_path"]

_CONFIG_FLAGS = ("--config", "-c")
_BASE_LINE = re.compile(r"#\s*base:\s*(\S+)\s*")
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
    """Replace every ``--config`` value by the files it expands to: a bundled recipe's name by its path, and a file
    that declares ``# base:`` files by those bases (recursively) followed by the file itself."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in _CONFIG_FLAGS:
            continue  # the value of the previous flag, expanded there
        if arg in _CONFIG_FLAGS and i + 1 < len(args):
            for path in _expand_config(args[i + 1]):
                out += [arg, path]
        elif arg.startswith("--config="):
            out += ["--config=" + path for path in _expand_config(arg.removeprefix("--config="))]
        else:
            out.append(arg)
    return out


def _expand_config(value: str) -> list[str]:
    path = _resolve_config(value)
    try:
        if not Path(path).is_file():
            return [path]
    except (OSError, ValueError):
        return [path]
    try:
        return [str(p) for p in recipe_files(path)]
    except (FileNotFoundError, ValueError) as err:
        _exit_with(str(err))


def _resolve_config(value: str) -> str:
    try:
        if Path(value).is_file():
            return value
        return str(recipe_path(value))
    except (OSError, ValueError):  # FileNotFoundError, or a name the OS refuses (a long inline YAML string)
        return value  # not a recipe name: left to jsonargparse, unless _check_configs stops first


def _declared_bases(path: Path) -> list[str]:
    """The ``# base: FILE`` lines of the comment block at the top of a config file, in order."""
    bases = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # the comment block ends at the first line of YAML
        match = _BASE_LINE.fullmatch(stripped)
        if match:
            bases.append(match.group(1))
    return bases


def _find_base(name: str, declared_in: Path) -> Path:
    for folder in (declared_in.parent, _recipes_dir()):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{str(declared_in)!r} declares '# base: {name}', but neither {str(declared_in.parent / name)!r} nor the"
        f" bundled {str(_recipes_dir() / name)!r} exists. Fix the path in that line (relative to the file's folder or"
        " to the bundled recipes folder) or remove the line."
    )


def recipe_files(name: Union[str, os.PathLike[str]]) -> list[Path]:
    """The config files a recipe expands to, in the order they are merged: its bases, then the recipe itself.

    A line ``# base: FILE`` in the comment block at the top of a config file declares a base, relative to the file's
    folder or else to the bundled recipes folder; bases may declare bases of their own. A file reached twice is
    merged once, at its first place.

    Args:
        name: A bundled recipe's name (as for :func:`recipe_path`) or the path of a config file.

    Returns:
        The files, bases first and the recipe last; just ``[file]`` for a file that declares no base.

    Raises:
        FileNotFoundError: If ``name`` is neither a file nor a bundled recipe, or a declared base does not exist; the
            message names the file and the line to fix.
        ValueError: If the bases form a cycle; the message names the files in it.

    Example::

        recipe_files("split_digits_class_il_ewc")
        # [.../recipes/_base/split_digits_class_il.yaml, .../recipes/_base/ewc.yaml,
        #  .../recipes/split_digits_class_il_ewc.yaml]

    """
    path = Path(os.fspath(name))
    if not path.is_file():
        path = recipe_path(str(name))
    out: list[Path] = []
    _collect(path, out, [])
    return out


def _collect(path: Path, out: list[Path], chain: list[Path]) -> None:
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in [*chain[chain.index(key) :], key])
        raise ValueError(f"The '# base:' lines form a cycle: {cycle}. Remove one of those lines.")
    for base in _declared_bases(path):
        _collect(_find_base(base, path), out, [*chain, key])
    if all(p.resolve() != key for p in out):
        out.append(path)


def load_recipe(name: Union[str, os.PathLike[str]]) -> dict[str, Any]:
    """A recipe's configuration as one mapping: its files (see :func:`recipe_files`) merged in order.

    The merge follows jsonargparse's for several ``--config`` files: mappings merge key by key; a mapping whose
    ``class_path`` differs from the base's replaces it; ``key+: [...]`` appends to the base's list ``key``; any other
    value (a list included) replaces the base's. The result holds what the files state, without the defaults that
    ``nl-lightning fit --config NAME --print_config`` adds.

    Args:
        name: A bundled recipe's name (as for :func:`recipe_path`) or the path of a config file.

    Returns:
        The merged mapping (``seed_everything``, ``model``, ``data``, ``trainer``, ...).

    Raises:
        FileNotFoundError: As :func:`recipe_files`.
        ValueError: If a file is not a YAML mapping, or ``key+`` meets a base value that is not a list.

    Example::

        config = load_recipe("split_digits_class_il_ewc")
        [cb["class_path"] for cb in config["trainer"]["callbacks"]]
        # ['nl_lightning.callbacks.ContinualEvaluation', 'nl_lightning.callbacks.ElasticWeightConsolidation']

    """
    merged: dict[str, Any] = {}
    for path in recipe_files(name):
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{str(path)!r} holds a {type(loaded).__name__}; a config file must be a YAML mapping.")
        merged = _merge(merged, loaded, str(path))
    return merged


def _merge(base: dict[str, Any], update: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(base)
    if "class_path" in update and "class_path" in base and update["class_path"] != base["class_path"]:
        out = {}  # another class: nothing of the base's mapping applies
    for key, value in update.items():
        if key.endswith("+"):
            key = key[:-1]
            previous = out.get(key) or []
            if not isinstance(previous, list):
                raise ValueError(f"{source!r}: '{key}+' appends to a list, but the base's {key!r} is {previous!r}.")
            out[key] = [*previous, *(value if isinstance(value, list) else [value])]
        elif isinstance(value, dict):  # merged even into nothing, so that its own ``key+`` entries become lists
            out[key] = _merge(out[key] if isinstance(out.get(key), dict) else {}, value, source)
        else:
            out[key] = value
    return out


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
