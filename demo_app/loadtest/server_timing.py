"""Parse the ``Server-Timing`` response header (RFC 8297, W3C Server Timing).

Grammar, as the RFC gives it::

    Server-Timing = #server-timing-metric
    server-timing-metric = metric-name *( OWS ";" OWS server-timing-param )
    server-timing-param = token OWS "=" OWS ( token / quoted-string )

Several header lines form one list. The parser is lenient where the W3C
processing model is: a malformed entry is skipped up to the next top-level
comma, so one bad entry never hides the others; the first of repeated
parameters wins; parameter names are case-insensitive.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


@dataclass(frozen=True)
class Metric:
    """One Server-Timing entry."""

    name: str
    #: ``dur`` in milliseconds; None when absent or not a finite number.
    dur_ms: float | None
    #: ``desc``, unquoted; None when absent.
    desc: str | None
    #: Every parameter, lower-cased names, unquoted values.
    params: Mapping[str, str]


def parse(values: str | Iterable[str]) -> list[Metric]:
    """Every well-formed metric in one header value or in several header lines, in order."""
    lines = [values] if isinstance(values, str) else list(values)
    metrics: list[Metric] = []
    for line in lines:
        metrics.extend(_parse_line(line))
    return metrics


def find(metrics: Iterable[Metric], name: str) -> Metric | None:
    """The first metric called ``name`` (case-insensitive), or None."""
    wanted = name.lower()
    return next((m for m in metrics if m.name.lower() == wanted), None)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def ows(self) -> None:
        while self.peek() in (" ", "\t"):
            self.pos += 1

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TCHAR:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str | None:
        """A quoted-string starting at the current ``"``; None if unterminated."""
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
            elif char == '"':
                self.pos += 1
                return "".join(out)
            else:
                out.append(char)
                self.pos += 1
        return None

    def skip_entry(self) -> None:
        """Move to the next comma outside a quoted-string (or to the end)."""
        while self.pos < len(self.text) and self.peek() != ",":
            if self.peek() == '"':
                self.quoted()
            else:
                self.pos += 1


def _parse_line(text: str) -> list[Metric]:
    scanner = _Scanner(text)
    metrics: list[Metric] = []
    while True:
        scanner.ows()
        while scanner.peek() == ",":
            scanner.pos += 1
            scanner.ows()
        if not scanner.peek():
            return metrics
        # Each pass consumes at least one character: the entry, or up to a comma.
        metric = _parse_metric(scanner)
        if metric is not None:
            metrics.append(metric)
        scanner.ows()
        if scanner.peek() not in (",", ""):
            scanner.skip_entry()


def _parse_metric(scanner: _Scanner) -> Metric | None:
    name = scanner.token()
    if not name:
        scanner.skip_entry()
        return None
    params: dict[str, str] = {}
    while True:
        scanner.ows()
        if scanner.peek() != ";":
            break
        scanner.pos += 1
        scanner.ows()
        key = scanner.token().lower()
        if not key:
            scanner.skip_entry()
            return None
        scanner.ows()
        value: str | None = ""
        if scanner.peek() == "=":
            scanner.pos += 1
            scanner.ows()
            value = scanner.quoted() if scanner.peek() == '"' else scanner.token()
        if value is None:
            return None
        params.setdefault(key, value)
    return Metric(
        name=name, dur_ms=_number(params.get("dur")), desc=params.get("desc"), params=params
    )


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
