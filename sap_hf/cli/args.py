"""Argument parsing shared by the recipe and the CLI: `HfArgumentParser` plus a YAML `--config`.

As in TRL, a YAML file supplies defaults for every dataclass field and explicit command-line
flags override it. Usage errors (an unknown flag, a bad value, a missing required argument) are
raised as `UsageError` instead of argparse's multi-line usage and exit, so that the command
prints them in the same one-line form as every other user error (`sap_hf.cli.errors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import yaml
from transformers import HfArgumentParser


class UsageError(ValueError):
    """A command-line usage error, with argparse's own text (which names the argument).

    A ValueError, so that callers that catch user errors catch it too.
    """


class _RaisingParser(argparse.ArgumentParser):
    """The `--config` pre-parser: raises `UsageError` where argparse would print usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


NONE_WORDS = ("None",)
"""What an `Optional` option of ours takes on the command line for None, as its help writes it. Not
`TrainingArguments`' options: there `--report_to none` is a value of its own."""


def _none_or(convert: Any) -> Any:
    """`convert`, except that `None` (the documented value of an Optional option: `--test_split None`) is None."""

    def parse(text: str) -> Any:
        return None if text in NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in "invalid int value"
    return parse


def _optional_fields(dataclass_types: Any) -> set[str]:
    names = set()
    for dtype in dataclass_types if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]:
        if dtype.__module__.split(".")[0] == "transformers":
            continue
        hints = typing.get_type_hints(dtype)
        names.update(f.name for f in dataclasses.fields(dtype) if type(None) in typing.get_args(hints.get(f.name)))
    return names


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that raises `UsageError` (instead of exiting) and refuses unknown flags up front.

    An `Optional` single-value option takes `None` for None (its documented default: `--selection_rule None`,
    `--test_split None`, `--train_size None`), which `HfArgumentParser` would read as a string or refuse.
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any):
        super().__init__(dataclass_types, **kwargs)
        optional = _optional_fields(dataclass_types)
        for action in self._actions:
            if action.dest in optional and action.type is not None and action.nargs is None:
                action.type = _none_or(action.type)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def parse_strict(self, argv: Sequence[str]) -> tuple[Any, ...]:
        """The dataclasses (and the namespace of any extra argument), refusing unrecognized arguments.

        The unknown flags are refused before the dataclasses are built: a misspelt flag is the
        mistake to report, not the "--x is required" that its missing value would raise next.
        """
        _, unknown = self.parse_known_args(list(argv))
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        return tuple(self.parse_args_into_dataclasses(list(argv), return_remaining_strings=False))


def parse_with_config(
    dataclass_types: Sequence[type],
    argv: Optional[Sequence[str]] = None,
    default_config: Optional[Path] = None,
    prog: Optional[str] = None,
) -> tuple[Any, ...]:
    """Parse `argv` into the dataclasses; `--config FILE.yaml` (or `default_config`) gives the defaults.

    `prog` names the command in `--help` (default: argparse's, the script's file name).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _RaisingParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    config_path = Path(known.config) if known.config else default_config
    parser = ArgumentParser(dataclass_types, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file with defaults for any of the arguments below.")
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(
                f"--config {str(config_path)!r} does not exist; pass a YAML file of argument defaults."
            )
        try:
            values = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:  # a user's typo, reported in one line like the other user errors
            raise ValueError(f"--config {str(config_path)!r} is not valid YAML ({err}); fix the file.") from err
        if not isinstance(values, dict):
            raise ValueError(f"--config {str(config_path)!r} must hold a mapping of argument names to values.")
        known_dests = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known_dests)
        if unknown:
            raise ValueError(f"--config {str(config_path)!r} has unknown keys {unknown}.")
        parser.set_defaults(**values)
        # Fields the YAML sets are no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    parsed = parser.parse_strict(rest)
    return tuple(parsed[: len(dataclass_types)])  # drop the namespace holding --config
