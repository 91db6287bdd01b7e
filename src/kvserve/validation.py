"""Checks shared by every place a user's value enters the engine: a named ValueError, never a crash later.

Messages name the parameter, the allowed range and the value, but never echo
more than about 200 characters of it: a megabyte-long field must not come back
as a megabyte-long error (nor cost a full `repr` to build one).
"""

from __future__ import annotations

import math
import re
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


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# vLLM's token counts (--max-model-len): a lower-case suffix is decimal, an upper-case one binary
_TOKEN_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*"


def parse_bytes(text: str, parameter: str = "size") -> float:
    """Bytes in ``text``: ``"40GB"`` → 40e9, ``"32GiB"`` → 32·2³⁰, ``"819200"`` → 819200 (units in any case)."""
    match = re.fullmatch(_NUMBER, text)
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{parameter}: got {text!r}; expected a number with an optional unit "
                         f"({', '.join(u for u in _BYTE_UNITS if u)}), e.g. 40GB or 1MiB")
    return float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()]


def parse_tokens(text: str, parameter: str = "tokens") -> int:
    """A whole number of tokens as vLLM spells it: ``"8k"`` → 8000, ``"8K"`` → 8192, ``"1.5k"`` → 1500."""
    match = re.fullmatch(_NUMBER, text)
    if match and match.group(2) in _TOKEN_UNITS:
        value = float(match.group(1)) * _TOKEN_UNITS[match.group(2)]
        if value.is_integer():
            return int(value)
    raise ValueError(f"{parameter}: got {text!r}; expected a whole number of tokens with an optional suffix "
                     "k/m/g (x1000) or K/M/G (x1024), e.g. 8k or 4096")
