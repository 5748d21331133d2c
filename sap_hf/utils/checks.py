"""Argument checks shared by every configuration and entry point: one wording for every error.

Configs are filled from Python (where numbers often arrive as numpy scalars or arrays), from the
command line and from YAML. Each check here accepts the forms a number or a choice reasonably
takes, returns it as a plain Python `int`, `float` or choice (so a validated config is
JSON-serialisable as it stands), and otherwise raises a `ValueError` that names the argument,
shows the bad value and says what to pass instead: the user fixes the call without reading code.

Imports no other sap_hf module, and not numpy either: a numpy scalar, a 0-d array or a 0-d
tensor is recognised by its `ndim == 0` and unwrapped with `.item()`.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any, Optional, TypeVar


T = TypeVar("T")


def invalid(name: str, value: Any, fix: str) -> ValueError:
    """The error every check raises: `name=value is invalid: fix` (return it, the caller raises)."""
    return ValueError(f"{name}={value!r} is invalid: {fix}")


def plain_scalar(value: Any) -> Any:
    """A numpy scalar, 0-d array or 0-d tensor as the Python number/str it holds; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def is_bool(value: Any) -> bool:
    """True for `bool` and numpy's `bool_`: flags that must not pass for the number 0 or 1."""
    return isinstance(plain_scalar(value), bool)


def check_choice(name: str, value: Any, choices: Iterable[T], hint: str = "") -> T:
    """Return the member of `choices` equal to `value` (numpy strings/ints unwrapped), or raise naming them.

    A near miss gets a suggestion (`'shift-loss'` -> did you mean `'shift_loss'`?). `hint` is added to
    the message, e.g. where the choice is documented.
    """
    choices = list(choices)
    scalar = plain_scalar(value)
    for choice in choices:
        if not _same_kind(scalar, choice):
            continue
        try:
            if bool(scalar == choice):
                return choice
        except (TypeError, ValueError):  # e.g. an array compared elementwise
            continue
    close = _near_miss(scalar, choices)
    suggestion = f" (did you mean {close!r}?)" if close is not None else ""
    raise invalid(name, value, f"choose one of {choices}{suggestion}." + (f" {hint}" if hint else ""))


def _near_miss(value: Any, choices: list) -> Any:
    """The one choice a mistyped string most likely meant: same letters in another case, a unique
    prefix (`'val'` for `'validation'`), or a close spelling; None when there is no clear one."""
    if not isinstance(value, str) or not value:
        return None
    names = [choice for choice in choices if isinstance(choice, str)]
    same = [n for n in names if n.lower() == value.lower()]
    if same:
        return same[0]
    prefixed = [n for n in names if n.lower().startswith(value.lower())]
    if prefixed:  # 'float' for 'float32' or 'float64': no clear one
        return prefixed[0] if len(prefixed) == 1 else None
    close = difflib.get_close_matches(value, names, n=1)
    return close[0] if close else None


def _same_kind(value: Any, choice: Any) -> bool:
    """Whether `value` may be compared with `choice`: True must not pass for the choice 1, nor 3.0 for 3."""
    if isinstance(value, bool) or isinstance(choice, bool):
        return isinstance(value, bool) and isinstance(choice, bool)
    if isinstance(choice, numbers.Integral):
        return isinstance(value, numbers.Integral)
    if isinstance(choice, numbers.Number):
        return isinstance(value, numbers.Number)
    return isinstance(value, type(choice)) or isinstance(choice, type(value))


def integer(name: str, value: Any, minimum: Optional[int] = None, hint: str = "") -> int:
    """`value` as a Python int (numpy ints accepted), at least `minimum` when given; bools and floats raise.

    A float is refused even when whole (`10.0`): a count given as a float is usually a mistake made
    elsewhere (a division, a YAML `1e3`), and silently truncating `2.5` would hide it.
    """
    scalar = plain_scalar(value)
    bound = f" >= {minimum}" if minimum is not None else ""
    if isinstance(scalar, bool) or not isinstance(scalar, numbers.Integral):
        what = "a bool is not a count" if isinstance(scalar, bool) else f"got {type(value).__name__}"
        raise invalid(name, value, f"use an integer{bound} ({what})." + (f" {hint}" if hint else ""))
    scalar = int(scalar)
    if minimum is not None and scalar < minimum:
        raise invalid(name, value, f"use an integer{bound}." + (f" {hint}" if hint else ""))
    return scalar


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """`value` as a Python int >= 1 (sizes, counts, batch sizes)."""
    return integer(name, value, minimum=1, hint=hint)


def finite_float(name: str, value: Any, hint: str = "") -> float:
    """`value` as a finite Python float (numpy numbers accepted); bools, strings, NaN and inf raise.

    Range checks stay with the caller, which knows the range's meaning and says it in its own
    `invalid(...)` message.
    """
    scalar = plain_scalar(value)
    if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
        what = "a bool is not a number" if isinstance(scalar, bool) else f"got {type(value).__name__}"
        raise invalid(name, value, f"use a finite number ({what})." + (f" {hint}" if hint else ""))
    scalar = float(scalar)
    if not math.isfinite(scalar):
        raise invalid(name, value, "use a finite number." + (f" {hint}" if hint else ""))
    return scalar


def positive_float(name: str, value: Any, hint: str = "") -> float:
    """`value` as a finite Python float > 0 (weights, scales)."""
    number = finite_float(name, value, hint)
    if number <= 0:
        raise invalid(name, value, "use a positive number." + (f" {hint}" if hint else ""))
    return number
