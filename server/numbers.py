"""Numbers as requests, headers and folder names spell them: ASCII digits only, and not too many of them.

`str.isdigit()` also accepts '²' and '①' (and latin-1 header bytes such as 0xb2), which `int()` refuses, and
`int()` refuses more than 4,300 digits: every number the server reads from outside goes through here instead.
"""
from __future__ import annotations

import re

VERSION_PATTERN = r"^[0-9]{1,10}$"  # a model version in a route, a query or a load call (the schema declares it)
MAX_VERSION = 2**31 - 1  # Triton's version numbers are int64; folders past this are not versions
_DIGITS = re.compile(r"[0-9]+")  # ASCII only, unlike \d


def ascii_int(text: str, max_digits: int = 18) -> int | None:
    """The non-negative integer `text` spells in 1 to `max_digits` ASCII digits, else None."""
    if len(text) > max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def version_number(text: str) -> int | None:
    """A version as a route or a query names it (1 to 10 ASCII digits), else None."""
    return ascii_int(text, 10)


def version_parameter(value: object) -> int | None:
    """A load or unload call's `parameters.version`: a positive integer as a JSON number or a digit string, at
    most MAX_VERSION; None when it is anything else (never formatted here: a 5,000-digit int cannot be)."""
    if isinstance(value, bool):
        return None
    number = value if isinstance(value, int) else version_number(value) if isinstance(value, str) else None
    return number if number is not None and 1 <= number <= MAX_VERSION else None
