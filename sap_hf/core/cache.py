"""The statistics cache (`stats_path`): checked before any data is read, loaded on every process alike, saved by one.

Statistics are only valid for the weights they were collected on (`ActivationStats.check_model`),
so a cache lets alpha be re-tuned, or an interrupted correction resumed, without a data pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from ..runtime.passes import Runtime
from .stats import STATS_FORMAT, ActivationStats


def cached_statistics(stats_path: Optional[Union[str, Path]], runtime: Runtime) -> Optional[ActivationStats]:
    """The statistics in `stats_path` when the main process sees the file there (every process then loads it), else None."""
    if stats_path is None or not runtime.main_value(Path(stats_path).is_file()):
        return None
    return _load_stats(stats_path)


def save_statistics(stats: ActivationStats, stats_path: Union[str, Path], runtime: Runtime) -> None:
    """Write the statistics from the main process; an error there is raised on every process."""
    error = None
    if runtime.is_main:
        try:
            stats.save(stats_path)
        except Exception as err:
            error = err
    runtime.check(error)


def check_stats_path(stats_path: Union[str, Path], writable: bool = True) -> bool:
    """Check a statistics cache path before any data is read; True when it holds statistics to load.

    Raises a ValueError naming `stats_path` and the fix when the path is a directory, when an
    existing file is not a readable SAP statistics file (only its header is read here), or (with
    `writable`) when the statistics could not be saved there after the data pass.
    """
    path = Path(stats_path)
    if path.is_dir():
        raise ValueError(
            f"stats_path={str(stats_path)!r} is a directory; the SAP statistics are one file: pass a file path "
            f"such as {str(path / 'sap_stats.safetensors')!r}."
        )
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as err:  # SafetensorError, OSError, ...: the file is not what stats_path promises
            raise _unreadable_stats(stats_path, err) from err
        if header.get("format") != STATS_FORMAT:
            raise _unreadable_stats(stats_path, f"format={header.get('format')!r}, expected {STATS_FORMAT!r}")
        return True
    if writable:
        folder = next(parent for parent in path.absolute().parents if parent.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(
                f"stats_path={str(stats_path)!r} cannot be written: {str(folder)!r} is not a writable folder. Pass a "
                "stats_path in a folder you can write to (the statistics are saved there after the data pass)."
            )
    return False


def _load_stats(stats_path: Union[str, Path]) -> ActivationStats:
    try:
        return ActivationStats.load(stats_path)
    except Exception as err:
        raise _unreadable_stats(stats_path, err) from err


def _unreadable_stats(stats_path: Union[str, Path], reason: Any) -> ValueError:
    detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
    return ValueError(
        f"stats_path={str(stats_path)!r} is not a readable SAP statistics file ({detail}). Delete it to collect the "
        "statistics anew, or pass another stats_path."
    )
