"""Checks shared by every place a user's value enters the engine: a named ValueError, never a crash later.

Messages name the parameter, the allowed range and the value, but never echo
more than about 200 characters of it: a megabyte-long field must not come back
as a megabyte-long error (nor cost a full `repr` to build one).
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, NoReturn

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1



class _BriefRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of a huge int is slow, and refused past 4,300 digits
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_repr = _BriefRepr()
_repr.maxstring = _repr.maxother = 200
_repr.maxlong = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def brief(value: Any) -> str:
    """`repr(value)` cut to about 200 characters, computed without formatting the whole value."""
    return _repr.repr(value)


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"{name} must be {allowed}, got {brief(value)}")


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        fail(name, value, allowed)


def is_int(x: object) -> bool:
    """An int that is not a bool, within int64 (what every tensor and seed downstream can hold)."""
    return isinstance(x, int) and not isinstance(x, bool) and INT64_MIN <= x <= INT64_MAX


def is_number(x: object) -> bool:
    """A finite int or float that is not a bool (NaN and infinities are refused)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return math.isfinite(x) if isinstance(x, float) else INT64_MIN <= x <= INT64_MAX


def utf8_error(text: str) -> str | None:
    """None if `text` can be encoded as UTF-8, else why not: a lone surrogate (JSON can spell one, "\\ud800"),
    or a byte that was not UTF-8 (a body decoded with `surrogateescape` carries it as U+DC80..U+DCFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"byte 0x{code - 0xDC00:02x} at character {exc.start} is not valid UTF-8"
        return f"it holds a lone surrogate U+{code:04X} at character {exc.start}, which is not valid Unicode text"
    return None


def text_error(value: Any) -> str | None:
    """`utf8_error` of the first string inside `value` (nested lists, tuples and dict keys and values) that has one.

    Walks with a stack, not recursion: JSON nesting is as deep as the client likes.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            error = utf8_error(item)
            if error is not None:
                return error
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None
