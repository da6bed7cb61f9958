"""Percentiles, one definition for every benchmark (nearest rank, no interpolation)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank `q`-quantile (0 < q <= 1) of `values`; None if there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def summary(values: Iterable[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of `values` (None for each if there are none)."""
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered) if ordered else None,
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else None,
        "mean": statistics.fmean(ordered) if ordered else None,
    }
