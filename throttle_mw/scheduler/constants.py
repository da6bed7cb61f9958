"""Numbers the scheduler's rules share with their Lua twin, written once.

The Redis scripts do not spell these: `throttle_mw.backends.redis.scripts`
generates them into the Lua source from this module when the scripts are
loaded, so a change here changes both implementations.
"""

from __future__ import annotations

from typing import Final

#: Tolerance of comparisons between token counts and times (float rounding).
EPS: Final = 1e-6
#: Measuring window of the virtual clock's speed (the fair rate per unit weight), seconds.
WINDOW_S: Final = 1.0
#: A measurement older than this many windows is stale (the budget was idle meanwhile).
STALE_WINDOWS: Final = 3
#: Tenants' queue sequence numbers wrap at this: the Lua twin packs (queued, pushed) into
#: one sorted-set score as ``queued * PUSH_SPAN + pushed`` (longest queue first, ties to
#: the tenant that queued last).
PUSH_SPAN: Final = 2**32

#: Idle tenants are forgotten at most once a period (and whenever an operation made a
#: tenant): the Redis scripts' sweep of their idle list (a cost rule there), which the
#: Python scheduler follows so both forget a tenant at the same call (README, "Memory").
SWEEP_PERIOD_S: Final = 1.0

#: While requests wait, the last burst / RESERVE_DIVISOR tokens are kept for tenants with
#: banked credit (a burst below RESERVE_DIVISOR keeps none); see README, "The reserve".
RESERVE_DIVISOR: Final = 2

#: A rejection blames the tenant's own rate cap when the cap alone accounts for at least
#: this share of its expected wait (a capped tenant often drives the virtual clock itself,
#: so its fair wait mirrors its cap).
CAP_BLAME_SHARE: Final = 0.5

#: A tenant's state (see `throttle_mw.scheduler.state.Tenant`).
IDLE: Final = 0  # no request waiting
ACTIVE: Final = 1  # requests waiting, in line for the budget by its finish tag
CAPPED: Final = 2  # requests waiting, held back by its own rate cap until it refills
