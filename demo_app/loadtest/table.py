"""Plain-text tables with aligned columns, for terminals and logs (no ``rich``)."""

from __future__ import annotations

from collections.abc import Sequence

#: A row of cells, or a bare string: a section title on a line of its own.
Row = Sequence[str] | str


def render(
    headers: Sequence[str],
    rows: Sequence[Row],
    *,
    align: str = "",
    spans: Sequence[tuple[str, int]] = (),
    gap: int = 2,
) -> str:
    """The table as lines of text.

    ``align`` has one letter per column, ``l`` or ``r`` (default: the first
    column left, the others right: names, then numbers). ``spans`` put labels
    over groups of columns, ``(label, column_count)`` from the left.
    """
    cells = [list(headers)] + [list(r) for r in rows if not isinstance(r, str)]
    count = len(headers)
    if any(len(r) != count for r in cells):
        raise ValueError("every row needs one cell per header")
    align = align or "l" + "r" * (count - 1)
    widths = [max(len(row[i]) for row in cells) for i in range(count)]
    sep = " " * gap

    def line(row: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return sep.join(parts).rstrip()

    out: list[str] = []
    if spans:
        out.append(_span_line(spans, widths, gap))
    out.append(line(headers))
    out.append("-" * len(line(["-" * w for w in widths])))
    for row in rows:
        out.append(row if isinstance(row, str) else line(row))
    return "\n".join(out)


def _span_line(spans: Sequence[tuple[str, int]], widths: Sequence[int], gap: int) -> str:
    text, column = "", 0
    for label, size in spans:
        start = sum(widths[:column]) + gap * column
        text = text.ljust(start) + label
        column += size
    return text.rstrip()
