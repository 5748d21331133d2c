"""One-line errors for `sap-hf` and the recipe: a user's mistake is a sentence on stderr, not a traceback.

The library's messages already name the argument, the bad value and the fix; a traceback around
them only hides that line. So user errors (a ValueError, a missing file or folder, a usage
error) are printed as `PROG: error: MESSAGE` on one line with exit code 2, as argparse does.
Anything else (a RuntimeError from a failed worker, a bug) keeps its traceback: that is for
whoever debugs it. `--debug` shows the traceback of user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .args import UsageError


#: Exceptions that report the user's mistake (their messages say what to change), printed as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)
DEBUG_FLAG = "--debug"
EXIT_USAGE = 2  # argparse's exit code for usage errors


def pop_debug_flag(argv: Sequence[str], *, debug_takes_values: bool = False) -> tuple[bool, list[str]]:
    """Whether `--debug` was given, and `argv` without it (it is no argument of any dataclass).

    With `debug_takes_values` (the recipe: `TrainingArguments` has its own `--debug OPTION ...`),
    a `--debug` followed by a value is left for that option; only a bare `--debug` is taken.
    """
    argv = list(argv)
    kept: list[str] = []
    debug = False
    for index, arg in enumerate(argv):
        followed_by_value = index + 1 < len(argv) and not argv[index + 1].startswith("-")
        if arg == DEBUG_FLAG and not (debug_takes_values and followed_by_value):
            debug = True
        else:
            kept.append(arg)
    return debug, kept


def one_line(error: BaseException) -> str:
    """The error's message on one line: multi-line messages are joined, blank lines dropped."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


@contextmanager
def report_user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a user error raised inside into `PROG: error: MESSAGE` on stderr and exit code 2.

    With `debug` the exception propagates (full traceback); other exceptions always do.
    """
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        message = one_line(error)
        if isinstance(error, UsageError):  # argparse's text names the argument; the help names the others
            message = f"{message} (`{prog} --help` lists the arguments)."
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_USAGE) from None
