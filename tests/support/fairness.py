"""An independent oracle for weighted max-min fair shares (water-filling).

Kept deliberately naive and separate from the scheduler: tests compare what
the scheduler admitted with what this says each tenant is owed.
"""

from __future__ import annotations

from collections.abc import Mapping


def max_min_shares(
    capacity: float, demands: Mapping[str, float], weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Each tenant's weighted max-min fair share of `capacity` given its demand.

    Repeatedly split what is left in proportion to weight among unsatisfied
    tenants; anyone asking for less than its split gets its demand and leaves.
    """
    weight = {t: (weights or {}).get(t, 1.0) for t in demands}
    shares = dict.fromkeys(demands, 0.0)
    left = capacity
    open_ = {t for t, d in demands.items() if d > 0}
    while open_ and left > 1e-12:
        total = sum(weight[t] for t in open_)
        split = {t: left * weight[t] / total for t in open_}
        satisfied = {t for t in open_ if demands[t] - shares[t] <= split[t]}
        if not satisfied:
            for t in open_:
                shares[t] += split[t]
            break
        for t in satisfied:
            left -= demands[t] - shares[t]
            shares[t] = demands[t]
        open_ -= satisfied
    return shares
