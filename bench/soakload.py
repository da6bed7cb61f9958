"""The soak's load: mixed tenants and priorities, open loop, and clients that leave early.

Built from the project's own load engine (`demo_app.loadtest.engine`). The app
is ``tests.apps.story``, whose routes get their priorities from
``THROTTLE_ROUTE_PRIORITIES`` (`ROUTE_PRIORITIES`):

- ``POST /upload`` (2 KB body: read ahead before admission) ``critical``;
- ``GET /slow?s=0.2`` ``high``;
- ``GET /work`` (the app's real capacity, 100 ms +-20 %) ``normal``;
- ``GET /stream`` (five chunks 20 ms apart) ``low``;
- ``GET /hello`` ``low``, sheddable: refused at once while anything waits.

Tenants: two steady ones under their share (``acme`` 10/s, ``globex`` 20/s), a
flood (``flood`` 60/s, far over its share), five small ones at 1/s, and
*churn*: short-lived tenants, a new one every 4 s on average, each active for
20 s (their state must expire, so Redis' key count stays flat). *Quitters* send the same routes
with client timeouts of 30 ms, 150 ms and 600 ms: they disconnect while
queued, while the app works, and in the middle of a streamed body.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo_app.loadtest.engine import Phase, Route, Scenario, TenantLoad, schedule

ROUTE_PRIORITIES = (
    "POST /upload=critical,GET /slow=high,GET /work=normal,GET /stream=low,GET /hello=low:sheddable"
)
UPLOAD = Route("upload", "POST", "/upload", "critical", body=b"u" * 2048)
SLOW = Route("slow", "GET", "/slow?s=0.2", "high")
WORK = Route("work", "GET", "/work", "normal")
STREAM = Route("stream", "GET", "/stream?chunks=5&delay=0.02", "low")
HELLO = Route("hello", "GET", "/hello", "low")

#: Client timeouts of the quitters (seconds): queued, working, mid-stream.
QUIT_AFTER_S = (0.03, 0.15, 0.6)
#: The timeout of every other client: longer than any maximum wait plus Redis' timeout.
TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Load:
    """The scenarios of one soak: `main` (timeout `TIMEOUT_S`) and one per quitter timeout."""

    main: Scenario
    quitters: tuple[Scenario, ...]

    @property
    def planned(self) -> int:
        return sum(len(schedule(s)) for s in (self.main, *self.quitters))


def load(duration_s: float, seed: int, scale: float = 1.0) -> Load:
    """The soak's load over `duration_s`; `scale` multiplies every rate."""
    rng = random.Random(f"{seed}/churn")
    tenants = [
        TenantLoad("acme", 10 * scale, ((0.6, WORK), (0.2, UPLOAD), (0.2, HELLO))),
        TenantLoad("globex", 20 * scale, ((0.5, WORK), (0.3, STREAM), (0.2, SLOW))),
        TenantLoad("flood", 60 * scale, ((0.7, WORK), (0.3, HELLO))),
    ]
    tenants += [
        TenantLoad(f"small-{i}", 1 * scale, ((0.5, WORK), (0.5, UPLOAD)), arrivals="even")
        for i in range(5)
    ]
    # Churn: a new tenant every 4 s on average, each active for 20 s (a third of a short
    # run): if their state did not expire, Redis' key count would grow with the run.
    span = min(20.0, duration_s / 3)
    for i in range(max(5, round(duration_s / 4))):
        start = rng.uniform(0, duration_s - span)
        phases = (Phase(start, start + span, 2 * scale),)
        tenants.append(TenantLoad(f"churn-{i}", 0.0, ((1.0, WORK),), phases=phases))
    main = Scenario("soak", duration_s, seed, tuple(tenants), timeout_s=TIMEOUT_S)
    quit_mix = ((0.5, WORK), (0.3, STREAM), (0.2, SLOW))
    quitters = tuple(
        Scenario(
            f"quit-{int(after * 1000)}ms",
            duration_s,
            seed + 1 + i,
            (TenantLoad(f"quitter-{i}", 3 * scale, quit_mix),),
            timeout_s=after,
        )
        for i, after in enumerate(QUIT_AFTER_S)
    )
    return Load(main, quitters)
