"""The open-loop load engine: sends a scenario's plan and records what happened.

Open loop means the arrival of a request never depends on the response to an
earlier one, as with real users: a slow server does not slow the load down, it
builds a queue. So a dispatcher sleeps until each request is due and starts it
as a task of its own; if the event loop falls behind it sends the late ones at
once and the record shows the lag. Latency is always measured from the due
time (never from the send time), or a lagging client would hide the very
queueing it is there to measure.

Both the CLI (``python -m demo_app.loadtest``) and the end-to-end tests use
this module; the scenario model and ``schedule`` live in ``plan`` and are
re-exported here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from demo_app.loadtest import server_timing
from demo_app.loadtest.clients import new_session
from demo_app.loadtest.plan import (
    BUILTIN_PLACEHOLDERS,
    Phase,
    Planned,
    Route,
    Scenario,
    ScenarioError,
    TenantLoad,
    schedule,
)

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "Phase",
    "Planned",
    "Progress",
    "Record",
    "Route",
    "Scenario",
    "ScenarioError",
    "TenantLoad",
    "check_targets",
    "run",
    "schedule",
]


@dataclass(slots=True)
class Record:
    """What happened to one planned request. Times: seconds since the run started."""

    tenant: str
    route: str
    priority: str
    due_s: float
    sent_s: float
    done_s: float
    #: HTTP status; 0 when no response came (transport error or timeout).
    status: int
    error: str | None = None
    throttle_ms: float | None = None
    app_ms: float | None = None
    #: ``desc`` of the ``throttle`` Server-Timing entry.
    desc: str | None = None
    retry_after: str | None = None
    degraded: bool = False
    target: str = ""

    @property
    def latency_ms(self) -> float:
        """From when the request was due (not sent) to its response."""
        return (self.done_s - self.due_s) * 1000.0

    @property
    def added_wait_ms(self) -> float | None:
        """Latency beyond the app's own work time; None without ``app;dur``."""
        return None if self.app_ms is None else self.latency_ms - self.app_ms

    @property
    def lag_ms(self) -> float:
        """How late the client sent it: the load generator's own delay."""
        return (self.sent_s - self.due_s) * 1000.0


@dataclass(frozen=True)
class Progress:
    """A snapshot during a run, for a progress display."""

    elapsed_s: float
    planned: int
    sent: int
    done: int
    in_flight: int
    served: int
    #: 2xx completions per second over the last couple of seconds.
    served_per_s: float
    max_lag_s: float


def check_targets(targets: Sequence[str]) -> list[str]:
    """The targets without trailing slashes; ValueError unless all are http(s) URLs."""
    bases = [t.rstrip("/") for t in targets]
    if not bases or not all(b.startswith(("http://", "https://")) for b in bases):
        raise ValueError(f"targets must be http(s) base URLs, got {list(targets)!r}")
    return bases


async def run(
    scenario: Scenario,
    targets: Sequence[str],
    *,
    on_progress: Callable[[Progress], None] | None = None,
    session: aiohttp.ClientSession | None = None,
    progress_interval_s: float = 0.5,
) -> list[Record]:
    """Send ``schedule(scenario)`` open-loop to ``targets`` (base URLs, round-robin).

    Returns one record per planned request, in plan order. Ends when every
    request has completed or timed out: at ``max(duration_s, dispatch end) +
    timeout_s`` at the latest. ``on_progress`` is called at the start, every
    ``progress_interval_s`` and at the end; it runs on the event loop, so keep
    it quick. A given ``session`` is used for every request and left open;
    without one the run uses (and closes) its own (see ``clients``).
    """
    bases = check_targets(targets)
    plan = schedule(scenario)
    own = session is None
    client = new_session() if session is None else session
    try:
        return await _Runner(scenario, plan, bases, client, on_progress).go(progress_interval_s)
    finally:
        if own:
            await client.close()


class _Runner:
    """The state of one run: the dispatcher, the request tasks, the counters."""

    def __init__(
        self,
        scenario: Scenario,
        plan: list[Planned],
        bases: list[str],
        session: aiohttp.ClientSession,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.scenario = scenario
        self.plan = plan
        self.bases = bases
        self.session = session
        self.on_progress = on_progress
        self.headers = {t.tenant: t.header for t in scenario.tenants}
        self.records: list[Record | None] = [None] * len(plan)
        self.tasks: list[asyncio.Task[None]] = []
        self.start = 0.0
        self.sent = self.done = self.served = 0
        self.max_lag_s = 0.0
        self.served_history: deque[tuple[float, int]] = deque(maxlen=5)

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def go(self, progress_interval_s: float) -> list[Record]:
        self.start = time.perf_counter()
        self.report()
        ticker = asyncio.create_task(self.tick(progress_interval_s)) if self.on_progress else None
        try:
            await self.dispatch()
            await self.drain()
        finally:
            leftovers = [*self.tasks, *([ticker] if ticker is not None else [])]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        self.report()
        return [r for r in self.records if r is not None]

    async def dispatch(self) -> None:
        for index, planned in enumerate(self.plan):
            # sleep(0) when late still yields, so started requests get going.
            await asyncio.sleep(max(0.0, planned.due_s - self.now()))
            self.tasks.append(asyncio.create_task(self.send(index, planned)))

    async def drain(self) -> None:
        """Wait for the requests in flight; each times out by itself, this bounds the rest."""
        deadline_s = max(self.scenario.duration_s, self.now()) + self.scenario.timeout_s + 1.0
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline_s - self.now()))

    async def tick(self, interval_s: float) -> None:
        while True:  # ends when go() cancels it
            await asyncio.sleep(interval_s)
            self.report()

    def report(self) -> None:
        if self.on_progress is None:
            return
        now = self.now()
        self.served_history.append((now, self.served))
        then, served_then = self.served_history[0]
        rate = (self.served - served_then) / (now - then) if now > then else 0.0
        self.on_progress(
            Progress(
                elapsed_s=now,
                planned=len(self.plan),
                sent=self.sent,
                done=self.done,
                in_flight=self.sent - self.done,
                served=self.served,
                served_per_s=rate,
                max_lag_s=self.max_lag_s,
            )
        )

    async def send(self, index: int, planned: Planned) -> None:
        route = planned.route
        base = self.bases[index % len(self.bases)]
        headers = {self.headers[planned.tenant]: planned.tenant, **dict(route.headers)}
        record = Record(planned.tenant, route.name, route.priority, planned.due_s, 0.0, 0.0, 0)
        record.target = base
        record.sent_s = self.now()
        self.sent += 1
        self.max_lag_s = max(self.max_lag_s, record.sent_s - planned.due_s)
        try:
            async with (
                asyncio.timeout(self.scenario.timeout_s),
                self.session.request(
                    route.method, base + route.path, data=route.body, headers=headers
                ) as response,
            ):
                body = await response.read()
        except TimeoutError:
            record.error = "timeout"
        except aiohttp.ClientError as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        else:
            _read_response(record, response, body)
            if 200 <= record.status < 300:
                self.served += 1
        finally:
            record.done_s = self.now()
            self.done += 1
            self.records[index] = record


def _read_response(record: Record, response: aiohttp.ClientResponse, body: bytes) -> None:
    record.status = response.status
    metrics = server_timing.parse(response.headers.getall("server-timing", []))
    throttle = server_timing.find(metrics, "throttle")
    app = server_timing.find(metrics, "app")
    if throttle is not None:
        record.throttle_ms = throttle.dur_ms
        record.desc = throttle.desc
    if app is not None:
        record.app_ms = app.dur_ms
    record.retry_after = response.headers.get("retry-after")
    record.degraded = "degraded" in (record.desc or "").lower() or _body_says_degraded(
        response, body
    )


def _body_says_degraded(response: aiohttp.ClientResponse, body: bytes) -> bool:
    """``"degraded": true`` at the top of a JSON body (how the demo marks cheap answers)."""
    if "json" not in response.headers.get("content-type", "") or len(body) > 65536:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("degraded") is True
