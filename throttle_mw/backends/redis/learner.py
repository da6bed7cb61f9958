"""The fleet's learned concurrency limit: every process measures, one steps.

N processes that each stepped the estimator on their own samples would
multiply the loop's gain and oscillate. Instead each process summarises its
window of samples (`WindowSummary`: counts, a coarse latency histogram, peak
in flight, and its mean in flight over the time since its last push, `InFlight`)
and pushes it onto ``P:lw`` every half window while learning, an idle one too,
tagged with its process token (``token|summary``); whichever process
first finds the window over claims the step (``SET P:lstep NX PX window``:
exactly one claim per window for the whole fleet), merges every summary
pushed since the last step (`fleet_window`: one process's parts pooled, the
processes' added up), takes one step of the estimator
(`throttle_mw.scheduler.limit.step`, in Python) and stores the limit in
force as ``P:cfg``'s ``learned`` field with the estimator's state beside it.
The scripts only read that number (store.lua, ``load_limits``), so the next
decision of every process uses it, and every batch reply tells each process
the limit in force (its responses and its failure mode use it).

A budget whose keys were lost (Redis restarted empty, a failover) gets the
fleet's last limit and estimator state back with the next push of any process
(``HSETNX``, in one transaction), not the cold start: every push reads the
stored state back, so every process knows the fleet's latest, not only the
one that took the last step.

How many of a summary's requests waited for the limit (`WindowSummary.waited`) goes
beside it, onto ``P:lq`` as ``token|n`` (only when n > 0), in the same transaction:
the summary's wire text cannot carry it, as an older build's process, sharing Redis
in a rolling deploy, rejects any field it does not know. Such a process neither
pushes counts (its requests read as not waited) nor reads them (its steps grow as
before); what it leaves on ``P:lq`` is taken by the next step of this build, at most
the window's count.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ...scheduler.limit import (
    InFlight,
    LimitConfig,
    LimitState,
    Sample,
    WindowSummary,
    initial_state,
    step,
)
from ...scheduler.limit.wire import natural
from . import protocol
from .keys import Keys

logger = logging.getLogger("throttle_mw.redis")

#: P:cfg's field with the estimator's state (`LimitState.encode`), and with when the
#: last step was taken (the claimant's clock, seconds since the epoch).
STATE_FIELD = "learn_state"
STEP_AT_FIELD = "learn_at"
#: P:cfg's field with a second shift test's first share (`LimitState.encode_share`,
#: "" when there is none), written with the state: an older build neither reads nor
#: writes it, and its step makes it stale (the step count it carries is not the state's).
SHARE_FIELD = "learn_share"
#: A step after a long silence counts at most this long as elapsed (baseline decay).
_MAX_ELAPSED_S = 3600.0
#: How much of the way a process's in-flight lag moves toward each summary's mean
#: service time (`fleet_lag`).
LAG_SMOOTHING = 0.25
#: Summaries a window's list keeps at most (a runaway fleet cannot grow it without bound).
_MAX_SUMMARIES = 10_000


class FleetLearner:
    """This process's part in the fleet's learned limit (see the module docstring)."""

    def __init__(
        self,
        keys: Keys,
        config: LimitConfig,
        *,
        process: str,
        live_ttl_s: float,
        clock: Callable[[], float] = time.time,
        flight: InFlight | None = None,
    ) -> None:
        self.config = config
        self._keys = keys
        self._process = process
        self._live_ttl_ms = int(live_ttl_s * 1000)
        self._window_ms = max(1, int(config.window_s * 1000))
        self._clock = clock
        self._summary = WindowSummary()
        #: This process's requests in the app over time (the middleware brackets each
        #: learning request): each pushed summary's mean in flight, over the time
        #: since the last push.
        self.flight = InFlight() if flight is None else flight
        #: How far back this process's in flight is read (`fleet_lag`).
        self._lag = 0.0
        #: The estimator's state as this process last saw or stored it.
        self.state: LimitState = initial_state(config)
        #: Steps this process took for the fleet (tests and logs).
        self.steps_taken = 0

    @property
    def interval_s(self) -> float:
        """How often to call `flush`: twice a window, so a step is never late by more
        than half a window."""
        return self.config.window_s / 2

    def observe(self, sample: Sample) -> None:
        self._summary.add(sample)

    async def flush(self, client: Any) -> bool:
        """Push this process's summary; take the fleet's step if the window is over.

        Returns whether this process took the step. Redis errors propagate (the caller
        counts them like any other failed call); the samples of a failed push are lost,
        which a step with a minimum sample count tolerates.
        """
        keys = self._keys
        summary, self._summary = self._summary, WindowSummary()
        self._lag = fleet_lag(self._lag, summary)
        summary.measure(*self.flight.take(self._lag))
        # One transaction: the limit and the state it came from are restored together.
        pipe = client.pipeline(transaction=True)
        # Pushed even without a request: the step pools a process's parts as equal
        # stretches of time (`WindowSummary.pool`), so a quiet one must count too.
        pipe.rpush(keys.learn_windows, _entry(self._process, summary))
        pipe.ltrim(keys.learn_windows, -_MAX_SUMMARIES, -1)
        pipe.pexpire(keys.learn_windows, self._live_ttl_ms)
        if summary.waited:
            pipe.rpush(keys.learn_waited, _entry_waited(self._process, summary.waited))
            pipe.ltrim(keys.learn_waited, -_MAX_SUMMARIES, -1)
            pipe.pexpire(keys.learn_waited, self._live_ttl_ms)
        # A budget that lost its keys gets the fleet's last limit seen here back, and the
        # estimator's state with it (its baseline), not the cold start.
        pipe.hsetnx(keys.cfg, protocol.LEARNED, self.state.in_force)
        pipe.hsetnx(keys.cfg, STATE_FIELD, self.state.encode())
        pipe.hget(keys.cfg, STATE_FIELD)  # the fleet's: whoever steps, every process keeps it
        pipe.pexpire(keys.cfg, self._live_ttl_ms)
        pipe.set(keys.learn_step, self._process, nx=True, px=self._window_ms)
        *_, restored, _, raw_state, _, claimed = await pipe.execute()
        if restored:  # a lost limit written back: the scripts read P:cfg anew
            pipe = client.pipeline(transaction=False)
            keys.live_changed(pipe)
            await pipe.execute()
        if raw_state is not None:
            with contextlib.suppress(ValueError):  # _step says so, if this process steps
                self.state = LimitState.decode(_text(raw_state))
        if not claimed:
            return False
        await self._step(client)
        return True

    async def _step(self, client: Any) -> None:
        keys = self._keys
        pipe = client.pipeline(transaction=True)
        pipe.lrange(keys.learn_windows, 0, -1)
        pipe.lrange(keys.learn_waited, 0, -1)
        pipe.delete(keys.learn_windows, keys.learn_waited)
        pipe.hmget(keys.cfg, STATE_FIELD, STEP_AT_FIELD, SHARE_FIELD)
        entries, waits, _, (raw_state, raw_at, raw_share) = await pipe.execute()
        entries_text = [_text(entry) for entry in entries]
        waits_text = [_text(entry) for entry in waits]
        state = self.state
        if raw_state is not None:
            try:
                share = "" if raw_share is None else _text(raw_share)
                state = LimitState.decode(_text(raw_state), share)
            except ValueError:
                logger.warning("throttle_mw: the learned limit's state in Redis was malformed")
        now = self._clock()
        elapsed = self.config.window_s
        if raw_at is not None:
            try:
                elapsed = float(_text(raw_at))
                elapsed = min(max(now - elapsed, self.config.window_s), _MAX_ELAPSED_S)
            except ValueError:
                elapsed = self.config.window_s
        new, kept, kept_waits = fleet_step(self.config, state, entries_text, elapsed, waits_text)
        if kept:
            pipe = client.pipeline(transaction=False)
            pipe.rpush(keys.learn_windows, *kept)
            pipe.pexpire(keys.learn_windows, self._live_ttl_ms)
            if kept_waits:
                pipe.rpush(keys.learn_waited, *kept_waits)
                pipe.pexpire(keys.learn_waited, self._live_ttl_ms)
            await pipe.execute()
            self.state = state
            return
        pipe = client.pipeline(transaction=False)
        pipe.hset(
            keys.cfg,
            mapping={
                protocol.LEARNED: new.in_force,
                STATE_FIELD: new.encode(),
                SHARE_FIELD: new.encode_share(),
                STEP_AT_FIELD: repr(now),
            },
        )
        pipe.pexpire(keys.cfg, self._live_ttl_ms)
        keys.live_changed(pipe)
        await pipe.execute()
        if new.in_force != state.in_force:
            logger.debug(
                "throttle_mw: learned concurrency limit %d -> %d (%s)",
                state.in_force,
                new.in_force,
                new.reason,
            )
        self.state = new
        self.steps_taken += 1


def fleet_step(
    config: LimitConfig,
    state: LimitState,
    entries: Iterable[str],
    elapsed_s: float,
    waits: Iterable[str] = (),
) -> tuple[LimitState, list[str], list[str]]:
    """The fleet's step from the summaries pushed since the last one (`entries`, and
    their waited counts, `waits`: ``P:lq``): the state after it, and nothing to keep;
    or, for a window too thin to judge, `state` and the entries and waited counts to
    push back, each still its process's, so that the next step gets these samples too
    (as `LimitEstimator` keeps collecting). A process's kept parts go back pooled, one
    entry (the list stays one entry per process): in the next step they weigh as one
    more part, so its mean in flight leans to the newer parts (only in so thin a
    stretch, and only if the in flight moved in it)."""
    merged, parts = fleet_window(entries, waits)
    new = step(config, state, merged, elapsed_s)
    if new.reason == "few-samples":
        kept = [_entry(process, part) for process, part in parts.items()]
        kept_waits = [_entry_waited(p, part.waited) for p, part in parts.items() if part.waited]
        return state, kept, kept_waits
    return new, [], []


def fleet_window(
    entries: Iterable[str], waits: Iterable[str] = ()
) -> tuple[WindowSummary, dict[str, WindowSummary]]:
    """The fleet's window from the entries pushed since the last step, and each
    process's part of it; `waits` (``token|n``) add to each process's part the
    requests that waited for the limit, at most its count (an older build's step
    leaves its window's counts behind: `P:lq`).

    A process pushes twice a window or more, and a window kept for lack of samples
    carries parts over: its parts are pooled first (`WindowSummary.pool`: its mean in
    flight over all their time, not more of it), then the processes' are added up
    (`WindowSummary.merge`: each a process's in flight over the same time, so the sum
    is the fleet's). Malformed entries are skipped with a warning.
    """
    parts: dict[str, WindowSummary] = {}
    for entry in entries:
        process, _, text = entry.rpartition("|")
        try:
            summary = WindowSummary.decode(text)
        except ValueError:
            logger.warning("throttle_mw: ignored a malformed window summary in Redis")
            continue
        if process in parts:
            parts[process].pool(summary)
        else:
            parts[process] = summary
    for entry in waits:
        process, _, text = entry.rpartition("|")
        part = parts.get(process)
        if part is None:
            continue  # its summary was malformed, or trimmed: the count says nothing
        try:
            n = natural(text)
        except ValueError:
            logger.warning("throttle_mw: ignored a malformed waited count in Redis")
            continue
        part.add_waited(min(n, part.count - part.waited))
    merged = WindowSummary()
    for summary in parts.values():
        merged.merge(summary)
    return merged, parts


def fleet_lag(lag: float, summary: WindowSummary) -> float:
    """How far back a process reads the in flight of its next summary: the requests'
    mean service time (`WindowSummary.lag`), smoothed over its summaries by
    LAG_SMOOTHING. The step pools a process's parts as equal stretches of time; a lag
    that jumped from one part to the next would stretch one and shrink the next."""
    if summary.count <= summary.failures:
        return lag
    return lag + LAG_SMOOTHING * (summary.lag() - lag)


def _entry(process: str, summary: WindowSummary) -> str:
    """One pushed summary: ``token|summary`` (a summary holds no '|')."""
    return f"{process}|{summary.encode()}"


def _entry_waited(process: str, waited: int) -> str:
    """One pushed waited count: ``token|n``."""
    return f"{process}|{waited}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
