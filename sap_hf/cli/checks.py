"""Path checks run before any work: a wrong path fails in a second, not after loading data or a model.

Without them a missing model folder reached the Hub client ("Repo id must be in the form ...")
and an `--output_dir` that is a file failed only when the corrected model was saved, after the
whole data pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import one_line


HUB_ID_EXAMPLE = "google/vit-base-patch16-224"
CLOTHING1M_LAYOUT = "images/, *_key_list.txt, *_label_kv.txt"


def looks_like_local_path(value: str) -> bool:
    """True when `value` can only mean a local path, so that a missing folder is reported as one.

    That is: it exists (as for `from_pretrained`, a local path wins), starts with '.', '/' or '~',
    holds a backslash (or the platform's separator), or is no valid Hub repo id ('a/b/c', 'my model').
    A one-slash name that does not exist ('user/vit') stays a Hub id.
    """
    if value.startswith((".", "/", "~")) or os.path.exists(value):
        return True
    if "\\" in value or (os.sep != "/" and os.sep in value):
        return True
    try:
        validate_repo_id(value)  # 'name' or 'namespace/name'; 'a/b/c' or 'my model' cannot be on the Hub
    except HFValidationError:
        return True
    return False


def check_model_path(value: Optional[str], argument: str = "--model_name_or_path") -> None:
    """Refuse a local-looking `value` that is not a folder with config.json (a Hub id is left to the Hub)."""
    if not value or not looks_like_local_path(value):
        return
    path = Path(value)
    if (path / "config.json").is_file():
        return
    if not path.exists():
        error, reason = FileNotFoundError, "it does not exist"
    elif not path.is_dir():
        error, reason = NotADirectoryError, "it is a file"
    else:
        error, reason = FileNotFoundError, "it has no config.json"
    raise error(
        f"{argument}: no model folder at {value!r} ({reason}); pass a folder saved with save_pretrained, "
        f"or a Hub id such as {HUB_ID_EXAMPLE}."
    )


@contextmanager
def hub_model_errors(value: str, argument: str = "--model_name_or_path") -> Iterator[None]:
    """Turn `from_pretrained`'s OSError for a Hub id it cannot load into a user error naming the argument.

    A local folder is checked by `check_model_path` before any work; a Hub id can only be tried. Without
    this, a mistyped id, a private repo without a login or an id not yet cached under `HF_HUB_OFFLINE=1`
    ended in a traceback through the Hub client. FileNotFoundError is a user error of the CLI (one line).
    """
    try:
        yield
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise FileNotFoundError(
            f"{argument}: cannot load {value!r} ({one_line(error)}); check the id (a private or gated model needs "
            "`hf auth login`), unset HF_HUB_OFFLINE to download it, or pass a folder saved with save_pretrained."
        ) from error


def check_output_dir(value: Optional[str], argument: str = "--output_dir") -> None:
    """Refuse an output folder that could not be created or written, before the work whose result goes there."""
    if not value:
        return
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{argument} {value!r} is a file; pass a folder (it is created if missing).")
    absolute = path.absolute()
    existing = next(p for p in (absolute, *absolute.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{argument} {value!r} cannot be created: {str(existing)!r} is a file; pass a folder path outside it."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{argument} {value!r} cannot be written: {str(existing)!r} is not a writable folder; pass a folder you can "
            "write to."
        )


def check_data_dir(value: Optional[str], argument: str = "--data_dir") -> None:
    """Refuse a Clothing1M folder that does not exist (its layout is checked when it is read, still before the model)."""
    if not value:
        return
    path = Path(value).expanduser()
    fix = f"pass the folder of a Clothing1M copy ({CLOTHING1M_LAYOUT}), or --dataset_name for a `datasets` dataset"
    if not path.exists():
        raise FileNotFoundError(f"{argument} {value!r} does not exist; {fix}.")
    if not path.is_dir():
        raise NotADirectoryError(f"{argument} {value!r} is a file; {fix}.")


def check_label_file(value: Optional[str], argument: str = "--cifar10n_labels") -> None:
    """Refuse a CIFAR-10N label file that does not exist (its content is checked when read, before any image)."""
    if not value:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{argument} {value!r} {'is a folder' if path.is_dir() else 'does not exist'}; pass the path of "
            "CIFAR-10_human.pt, the label file of the CIFAR-N release (github.com/UCSC-REAL/cifar-10-100n, data/)."
        )


def check_paths(
    *,
    model_name_or_path: Optional[str] = None,
    data_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    cifar10n_labels: Optional[str] = None,
) -> None:
    """All the up-front path checks of a command, in the order a user reads its arguments."""
    check_model_path(model_name_or_path)
    check_data_dir(data_dir)
    check_label_file(cifar10n_labels)
    check_output_dir(output_dir)
