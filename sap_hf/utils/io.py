"""Writing files so that an interruption never leaves a half-written one where a reader looks.

A corrected model, its record, its statistics and a label audit are read back by people and by
later runs (`from_pretrained`, `--stats_path`, a CSV opened in a spreadsheet). A crash, Ctrl-C or
a full disk in the middle of a plain `open(path, "w")` leaves a truncated file that looks complete.
Everything here writes to a temporary name in the destination's own folder (so the final move is a
same-filesystem rename) and moves it into place with `os.replace`, which is atomic: a reader sees
the old file or the new one, never a mixture. On failure the temporary file is removed and the
previous file, if any, is untouched.

* `atomic_write(path, write_fn, mode)`: `write_fn` writes into an open handle.
* `atomic_path(path)`: for writers that want a file name (`safetensors.torch.save_file`).
* `staged_save(output_dir)`: a whole folder (a model save), staged and moved in file by file.

No fsync: the guarantee is against interrupted processes, not power loss, and an fsync per file
would slow the many small writes of a save for a failure mode outside this package's scope.
Imports no other sap_hf module.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Union


STAGING_NAME = ".sap_staging"


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds, move it onto `path`.

    The temporary name is hidden (leading dot), unique per call (process id and a random token,
    so concurrent writers never share one) and opened by the caller like any file, so the result
    gets the umask's usual permissions (a `tempfile` would leave it readable by its owner only).
    If the block raises, or writes nothing, the temporary file is removed and `path` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"Nothing was written to the temporary file for {path}; {path} is unchanged.")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Union[str, Path], write_fn: Callable[[IO[Any]], Any], mode: str = "w") -> Path:
    """Open a temporary file next to `path` with `mode`, let `write_fn(handle)` fill it, move it onto `path`.

    `mode` is `"w"` (text: UTF-8, newlines written as given, as the `csv` module wants) or `"wb"`.
    Returns `path`. On any exception the temporary file is removed, `path` keeps its previous
    content and the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} is invalid: choose 'w' (text) or 'wb' (bytes).")
    path = Path(path)
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    with atomic_path(path) as tmp:
        with open(tmp, mode, **text) as handle:
            write_fn(handle)
    return path


@contextlib.contextmanager
def staged_save(
    output_dir: Union[str, Path], *, is_main: bool = True, staging_name: str = STAGING_NAME
) -> Iterator[Path]:
    """Yield a staging folder inside `output_dir`; on success move its files into `output_dir` one `os.replace` each.

    The folder-level form of `atomic_write`, for writers that produce several files at once
    (`save_pretrained`): every file in `output_dir` is at all times either its previous version or
    its new, complete one. On failure the staging folder is removed and `output_dir` keeps its
    previous files. With `is_main=False` (the other processes of a distributed run, which run the
    same saving code) the path is yielded but nothing is created, moved or removed.
    """
    output_dir = Path(output_dir)
    stage = output_dir / staging_name
    if is_main:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        if is_main:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if not is_main:
        return
    for path in sorted(stage.rglob("*")):
        if path.is_file():
            target = output_dir / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(stage, ignore_errors=True)
