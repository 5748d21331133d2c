"""Argument parsing shared by the recipe and the CLI: `HfArgumentParser` plus a YAML `--config`.

As in TRL, a YAML file supplies defaults for every dataclass field and explicit command-line
flags override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from transformers import HfArgumentParser


def parse_with_config(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None, default_config: Optional[Path] = None) -> tuple[Any, ...]:
    """Parse `argv` into the dataclasses; `--config FILE.yaml` (or `default_config`) gives the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    config_path = Path(known.config) if known.config else default_config
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file with defaults for any of the arguments below.")
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"--config {str(config_path)!r} does not exist; pass a YAML file of argument defaults.")
        values = yaml.safe_load(config_path.read_text()) or {}
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
    parsed = parser.parse_args_into_dataclasses(rest, return_remaining_strings=False)
    return tuple(parsed[: len(dataclass_types)])  # drop the namespace holding --config
