"""Parsing the numbers of the limit's wire forms strictly: `int` and `float` alone
accept ' +1_0', 'nan' and 'inf', which no `encode` writes."""

from __future__ import annotations

import re
from typing import Final

_NUMBER: Final = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")
_SIGNED: Final = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def natural(text: str) -> int:
    """A non-negative decimal integer, digits only."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"not a non-negative integer: {text[:20]!r}")
    return int(text)


def number(text: str) -> float:
    """A finite non-negative number, as `repr` writes one."""
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"not a non-negative number: {text[:20]!r}")
    return float(text)


def signed(text: str) -> float:
    """A finite number of either sign, as `repr` writes one."""
    if not _SIGNED.fullmatch(text):
        raise ValueError(f"not a number: {text[:20]!r}")
    return float(text)
