"""The statistics cache (`stats_path`): checked before any data is read, loaded on every process alike, saved by one.

Statistics are only valid for the weights they were collected on (`ActivationStats.check_model`)
and for the options that chose their layers, tokens, precision and trusted samples
(`statistics_options`, recorded in the file and compared by `check_statistics_options`), so a cache
lets alpha be re-tuned, or an interrupted correction resumed, without a data pass. An explicit
`stats_path` that does not match raises; the recipe's default cache in `output_dir` is collected anew.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..runtime.passes import Runtime
from .stats import STATS_FORMAT, ActivationStats


def cached_statistics(stats_path: Optional[Union[str, Path]], runtime: Runtime) -> Optional[ActivationStats]:
    """The statistics in `stats_path` when the main process sees the file there (every process then loads it), else None."""
    if stats_path is None or not runtime.main_value(Path(stats_path).is_file()):
        return None
    return _load_stats(stats_path)


TARGET_OPTIONS = (
    "target_modules",
    "exclude_modules",
    "project_classifier",
    "max_tokens_per_sample",
    "accumulation_dtype",
)
"""The `SAPConfig` fields that decide which layers the statistics cover and how they are accumulated."""
SELECTION_OPTIONS = (
    "trusted_source",
    "selection_rule",
    "trusted_per_class",
    "selection_subset",
    "training_loss_epochs",
    "sampling_seed",
)
"""The `SAPConfig` fields that decide which trusted samples a selection picks (not used with given trusted_indices)."""
OPTIONS_KEY = "options"
GIVEN_KEY = "trusted_indices_given"


def statistics_options(config: Any, trusted_given: bool) -> dict[str, Any]:
    """What statistics depend on besides the weights, as saved in the file's `meta` (JSON values)."""
    if not trusted_given:
        names = TARGET_OPTIONS + SELECTION_OPTIONS
    else:  # given trusted samples: the selection options play no part; the seed only in the token draw
        names = TARGET_OPTIONS + (("sampling_seed",) if config.max_tokens_per_sample is not None else ())
    return {name: json.loads(json.dumps(getattr(config, name))) for name in names}


def check_statistics_options(
    stats: ActivationStats,
    config: Any,
    stats_path: Union[str, Path],
    trusted_indices: Optional[Sequence[Any]] = None,
    trusted_given: Optional[bool] = None,
) -> None:
    """Raise a ValueError naming `stats_path`, the option and both values when the cached statistics were collected
    with other targeting, accumulation or trusted-selection options than this run's, or on other `trusted_indices`.

    `trusted_given` (default: whether `trusted_indices` are given) says whether this run brings its own trusted
    samples; given without the indices themselves (not known yet), only the options are compared. Files written
    before the options were recorded carry none: they are only checked against the weights (`check_model`).
    """
    recorded = stats.meta.get(OPTIONS_KEY)
    if recorded is None:
        return
    given = trusted_indices is not None if trusted_given is None else trusted_given
    cached_given = bool(stats.meta.get(GIVEN_KEY, False))
    fix = (
        f"Delete {str(stats_path)!r} to collect the statistics anew with this run's options, pass another "
        "stats_path, or rerun with the options the file was made with"
    )
    if given != cached_given:
        made, now = ("given trusted_indices", "selects its own") if cached_given else ("a trusted selection", "gives")
        raise ValueError(
            f"stats_path={str(stats_path)!r} holds statistics of {made}, while this run {now} trusted samples "
            f"(trusted_indices={'given' if given else None}, trusted_source={config.trusted_source!r}). {fix}."
        )
    for name, value in statistics_options(config, given).items():
        if name in recorded and recorded[name] != value:
            raise ValueError(
                f"stats_path={str(stats_path)!r} holds statistics collected with {name}={recorded[name]!r}, this run "
                f"has {name}={value!r}: reusing them would project {_effect(name)}. {fix}."
            )
    if trusted_indices is not None:
        cached = stats.meta.get("trusted_indices") or []
        if sorted(map(str, cached)) != sorted(map(str, trusted_indices)):
            raise ValueError(
                f"stats_path={str(stats_path)!r} holds statistics of {len(cached)} trusted samples other than the "
                f"{len(trusted_indices)} trusted_indices given: {fix} (trusted_indices=result.trusted_indices)."
            )


def _effect(name: str) -> str:
    if name in ("target_modules", "exclude_modules", "project_classifier"):
        return "layers this run leaves out, or miss layers it adds"
    if name in SELECTION_OPTIONS:
        return "with trusted samples this run would not select"
    return "with statistics accumulated otherwise than this run asks"


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
