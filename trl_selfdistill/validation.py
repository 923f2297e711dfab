"""Field checks for the configs: a bad value is refused where it is declared, with its name, value and what is allowed.

Python's comparisons let NaN through every range check (`nan < 0` is False), `True` pass as the integer 1, and
`"512"` or `2.5` reach code that needs an int; each of these has ruined a run silently or failed far from its cause.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def _describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> int | float:
    """`value` if it is a finite number (an int when `integer`) within the bounds; otherwise a `ValueError`.

    `low_open`/`high_open` exclude the bound itself. Booleans are refused (they are ints to Python, not to a user).
    """
    kind = "an integer" if integer else "a finite number"
    bounds = _describe_range(low, high, low_open, high_open)
    allowed = f"{kind}{' ' + bounds if bounds else ''}"
    ok_type = isinstance(value, Integral) if integer else isinstance(value, Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.{' ' + hint if hint else ''}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.{' ' + hint if hint else ''}")
    return int(value) if integer else value


def check_bool(name: str, value: Any, hint: str = "") -> bool:
    """`value` if it is True or False: a string such as `"false"` is truthy and would mean the opposite."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}.{' ' + hint if hint else ''}")
    return value
