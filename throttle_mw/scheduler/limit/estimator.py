"""The learned concurrency limit: one pure step per window, no I/O, no clock of its own.

`step` is the whole rule: given the state after the last window and a summary of
this window's finished requests, it returns the next state. The in-memory
backend runs it per process through `LimitEstimator`; with Redis, one process
merges every process's window summary and takes the fleet's step. The numbers
are in ``constants.py``; the scheduler README ("The learned limit") derives the
rule in prose. In short, with ``p`` the window's median service time and
``r = p / baseline``:

- failures at FAILURE_SHARE of the window or more: cut by FAILURE_CUT;
- fewer than ``min_samples`` successes: hold (the window says too little);
- r above CUT_ABOVE (with confidence): overload, cut toward ``in flight * TARGET / r``,
  smoothed, never below STEP_DOWN_MIN times the limit; unless the cuts stopped
  explaining the latency: then test whether it is slower work (``episode.py``);
- r below GROW_BELOW (with confidence) while the limit is in use: grow toward
  ``in flight * TARGET / r``, at most GROW_MAX times the limit, at least by one;
  and while it is not, but WAITED_SHARE of the window's requests waited for it:
  grow the same way from the limit (the limit held them back, not demand);
- otherwise hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final, Literal, get_args

from .constants import (
    BASELINE_DECAY_S,
    BASELINE_SAMPLES,
    BASELINE_Z,
    CUT_ABOVE,
    CUT_SMOOTHING,
    DECISION_Z,
    FAILURE_CUT,
    FAILURE_MIN_COUNT,
    FAILURE_SHARE,
    GROW_BELOW,
    GROW_MAX,
    IN_USE_SHARE,
    ONSET_WINDOWS,
    QUANTILE,
    RAISE_WAIT,
    RAMP,
    REANCHOR,
    SHIFT_DEPTH,
    SHIFT_MARGIN,
    SHIFT_NOISE,
    SHIFT_RAISE,
    STEP_DOWN_DOUBT,
    STEP_DOWN_MIN,
    TARGET,
    TEST_SAMPLES,
    UNUSED_SHARE,
    WAITED_SHARE,
)
from .episode import CUTTING, DOUBT, EPISODE_FIELDS, RAISED, REFERENCE, Episode, Measure
from .flight import InFlight
from .sample import Sample
from .summary import WindowSummary
from .wire import natural, number, signed

#: Why the last step did what it did.
StepReason = Literal[
    "initial",  # no step yet
    "idle",  # no finished request in the window: hold
    "few-samples",  # too few successes to judge, failures below the threshold: hold
    "failures",  # failures at FAILURE_SHARE or more: cut
    "overload",  # latency above CUT_ABOVE times the baseline: cut
    "hold",  # latency between GROW_BELOW and CUT_ABOVE times the baseline
    # latency near the baseline and the limit in use, or most requests waited for it:
    # grow. (Waits have no reason of their own: an older build's `LimitState.decode`,
    # sharing Redis in a rolling deploy, would reject the fleet's state.)
    "grow",
    "unused",  # latency near the baseline, but the limit was not in use: hold
    "shift-test",  # overload, but the cuts stopped explaining the latency: testing why
    "shift",  # the test found slower work, not a queue: the baseline is re-measured
]
REASONS: Final[frozenset[str]] = frozenset(get_args(StepReason))

_STATE_VERSION: Final = "1"
_STATE_FIELDS: Final = 6


@dataclass(frozen=True)
class LimitConfig:
    """Bounds and pace of a learned limit.

    `initial` is where a fleet with no learned state starts, clamped into
    [minimum, maximum]; the scheduler README says why 4.
    """

    minimum: int = 2
    maximum: int = 1000
    initial: int = 4
    window_s: float = 0.5
    min_samples: int = 20

    def __post_init__(self) -> None:
        if self.minimum < 1:
            raise ValueError(f"minimum must be at least 1, got {self.minimum}")
        if self.maximum < self.minimum:
            raise ValueError(f"maximum ({self.maximum}) must be at least minimum ({self.minimum})")
        if self.initial < 1:
            raise ValueError(f"initial must be at least 1, got {self.initial}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {self.window_s}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")

    def clamp(self, limit: float) -> float:
        """`limit` within [minimum, maximum]."""
        return min(max(limit, float(self.minimum)), float(self.maximum))


@dataclass(frozen=True)
class LimitState:
    """The learned limit after a step: what the fleet stores between steps.

    Every step keeps `limit` within its config's bounds; `in_force` is the whole
    number of requests it allows (nearest, halves up). `baseline_s` is the median
    service time without a queue (0.0: not measured yet). `slow_start`: no sign of
    overload yet, so growth steps are RAMP times. `episode` is the overload episode
    under way, if any. `first_share`: while a second shift test runs, the first test's
    share, pooled into its verdict (None otherwise); `encode` leaves it out (every
    build parses that text), `encode_share` writes it for a field beside it.
    """

    limit: float
    baseline_s: float
    reason: StepReason
    steps: int
    slow_start: bool = False
    episode: Episode | None = None
    first_share: float | None = None

    @property
    def in_force(self) -> int:
        return max(1, math.floor(self.limit + 0.5))

    def encode(self) -> str:
        """``1,limit,baseline_s,reason,steps,slow_start``, then the episode's fields if
        there is one (see `Episode.fields`): ASCII, no spaces, '|', ';' or newlines."""
        fields = [_STATE_VERSION, repr(self.limit), repr(self.baseline_s), self.reason]
        fields += [str(self.steps), str(int(self.slow_start))]
        if self.episode is not None:
            fields += self.episode.fields()
        return ",".join(fields)

    def encode_share(self) -> str:
        """``steps:share`` while a second shift test carries its first test's share, else
        "" (ASCII, no spaces, '|', ';' or newlines). A text of its own, beside `encode`'s:
        an older build's `decode` rejects any field it does not know, so a state with one
        more field would be lost to its processes in a rolling deploy. The step count ties
        it to the state it was written with: an older build's step rewrites the state
        but not this text, and a share whose count is not the state's is stale."""
        if self.first_share is None:
            return ""
        return f"{self.steps}:{self.first_share!r}"

    @classmethod
    def decode(cls, text: str, share: str = "") -> LimitState:
        """The state `encode` wrote, with the share `encode_share` wrote beside it;
        ValueError("not a limit state: ...") for a state text that is not one. A share
        text that is stale (another step's), malformed, or beside a state in no second
        shift test is left out: the second test's verdict then goes on its own."""
        try:
            state = cls._parse(text)
        except ValueError as exc:
            raise ValueError(f"not a limit state: {text[:60]!r} ({exc})") from None
        first_share = _parse_share(share, state)
        return state if first_share is None else replace(state, first_share=first_share)

    @classmethod
    def _parse(cls, text: str) -> LimitState:
        fields = text.split(",")
        if len(fields) not in (_STATE_FIELDS, _STATE_FIELDS + EPISODE_FIELDS):
            raise ValueError("wrong number of fields")
        version, limit, baseline_s, reason, steps, slow = fields[:_STATE_FIELDS]
        if version != _STATE_VERSION or reason not in REASONS or slow not in ("0", "1"):
            raise ValueError("unknown version, reason or slow-start flag")
        if number(limit) < 1.0:
            raise ValueError("a limit below 1")
        episode = Episode.parse(fields[_STATE_FIELDS:]) if len(fields) > _STATE_FIELDS else None
        return cls(
            number(limit),
            number(baseline_s),
            reason,  # type: ignore[arg-type]  # checked against REASONS above
            natural(steps),
            slow == "1",
            episode,
        )


def _parse_share(text: str, state: LimitState) -> float | None:
    """The first test's share in `text` (``steps:share``), if it is `state`'s."""
    steps, sep, share = text.partition(":")
    if not sep or not _second_test(state.episode):
        return None
    try:
        if natural(steps) != state.steps:
            return None
        return signed(share)
    except ValueError:
        return None


def _second_test(episode: Episode | None) -> bool:
    """Is `episode` a second shift test (one without an anchor: a first always has one)?"""
    return episode is not None and episode.stage >= REFERENCE and episode.anchor_s <= 0.0


def initial_state(config: LimitConfig) -> LimitState:
    """Where a learned limit starts: `initial` within the bounds, baseline unmeasured,
    in slow start."""
    return LimitState(config.clamp(float(config.initial)), 0.0, "initial", 0, slow_start=True)


def step(
    config: LimitConfig, state: LimitState, summary: WindowSummary, elapsed_s: float
) -> LimitState:
    """One window's step: the state after `state`, given this window's `summary`.

    `elapsed_s` is the time since the previous step (about ``window_s``, longer after a
    quiet spell or a failover); the baseline's rise is per second, not per step.
    """
    steps = state.steps + 1
    limit = config.clamp(state.limit)
    if summary.empty:
        return replace(state, limit=limit, steps=steps, reason="idle")
    failures = summary.failures
    if failures >= FAILURE_MIN_COUNT and failures >= FAILURE_SHARE * summary.count:
        cut = config.clamp(limit * FAILURE_CUT)
        return LimitState(cut, state.baseline_s, "failures", steps, slow_start=False)
    ok = summary.count - failures
    if ok < config.min_samples or (state.baseline_s <= 0.0 and ok < BASELINE_SAMPLES):
        return replace(state, limit=limit, steps=steps, reason="few-samples")

    in_force = math.floor(limit + 0.5)
    in_use = _in_use(summary, in_force)
    baseline = _baseline(state.baseline_s, summary, in_force, elapsed_s)
    low, p, high = (summary.quantile(q) for q in _interval(summary, DECISION_Z))
    episode = state.episode if in_use else None  # an unused limit's cuts test nothing
    if episode is not None and episode.stage >= REFERENCE:
        if high >= GROW_BELOW * baseline:
            return _test(config, summary, limit, baseline, steps, episode, state.first_share)
        episode = None  # the overload is over: nothing to test
    if low > CUT_ABOVE * baseline:
        calm = state.reason not in ("overload", "shift-test")
        return _overload(config, summary, limit, baseline, (low, p), steps, episode, calm)
    if high >= GROW_BELOW * baseline:
        if high < CUT_ABOVE * baseline:
            episode = None  # confidently not overloaded: the episode is over
        return LimitState(limit, baseline, "hold", steps, state.slow_start, episode=episode)
    if in_use:
        # From the in flight this window measured, as a cut is: a window whose in flight
        # stayed below the limit (a fleet's processes still taking up their grants, a
        # lull in arrivals) read its latency at that load, not at the limit's.
        load = min(limit, summary.mean_in_flight)
    elif _held_back(summary, in_force):
        # The app's in flight stayed low, yet most requests queued for the limit: each
        # slot is held longer than the app holds it. The limit was the load here.
        load = limit
    else:
        return LimitState(limit, baseline, "unused", steps, state.slow_start)
    if state.reason in ("unused", "idle"):
        # This window began with an idle app: its latency flatters the limit.
        return LimitState(limit, baseline, "hold", steps, state.slow_start)
    if state.slow_start:
        grown = limit * RAMP
    else:
        grown = min(limit * GROW_MAX, load * TARGET * baseline / p)
    return LimitState(
        config.clamp(max(limit + 1.0, grown)), baseline, "grow", steps, state.slow_start
    )


def _overload(
    config: LimitConfig,
    summary: WindowSummary,
    limit: float,
    baseline: float,
    median: tuple[float, float],
    steps: int,
    episode: Episode | None,
    calm: bool,
) -> LimitState:
    """A window above CUT_ABOVE: cut, unless the cuts stopped explaining the latency.
    `median` is the window's median and its lower confidence bound; `calm`: the
    previous step was no overload."""
    load = summary.mean_in_flight
    p = median[1]
    windows = 0 if episode is None else min(episode.windows + 1, ONSET_WINDOWS + 1)
    step_down = STEP_DOWN_MIN
    if episode is None or episode.anchor_s <= 0.0 or _rises(episode, load, median, windows):
        # The anchor: this window, or a later one whose queue is still building. A rise
        # right after a calm step is an onset, its queue still building: none.
        anchor = (0.0, 0.0) if calm else (load, p)
        episode = Episode(CUTTING, *anchor, windows=0 if calm else windows)
    else:
        episode = replace(episode, windows=windows)
        queue = episode.anchor_s * load / episode.anchor_in_flight  # a queue's prediction
        deep = load <= episode.anchor_in_flight * SHIFT_DEPTH
        if p > queue:
            step_down = STEP_DOWN_DOUBT  # the cuts explain the latency less and less
        if not (deep and p > queue * (1.0 + SHIFT_MARGIN)):
            episode = replace(episode, stage=CUTTING)
        elif episode.stage == CUTTING:
            # Hold a window at this limit: a settled second look.
            doubt = replace(episode, stage=DOUBT)
            held = config.clamp(max(limit, load))
            return LimitState(held, baseline, "shift-test", steps, episode=doubt)
        else:
            # Twice in a row: test at the in flight the doubt was seen at.
            test = replace(episode, stage=REFERENCE)
            held = config.clamp(max(limit, load))
            return LimitState(held, baseline, "shift-test", steps, episode=test)
    return _cut(config, limit, load, baseline, p, steps, episode, step_down)


def _rises(episode: Episode, load: float, median: tuple[float, float], windows: int) -> bool:
    """Is the queue still building: the median (its lower bound) above the anchor's,
    or, in the episode's first ONSET_WINDOWS windows, the median per request in
    flight?"""
    low, p = median
    if windows <= ONSET_WINDOWS and p / load > episode.anchor_s / episode.anchor_in_flight:
        return True
    return low > episode.anchor_s * (1.0 + REANCHOR)


def _cut(
    config: LimitConfig,
    limit: float,
    load: float,
    baseline: float,
    p: float,
    steps: int,
    episode: Episode | None,
    step_down: float = STEP_DOWN_MIN,
) -> LimitState:
    """An overload step: toward `load` * TARGET / r, by CUT_SMOOTHING of the way, at most
    down to `step_down` times `load`, never up."""
    # From the in flight this window measured: after a cut, a slow app's window still
    # shows the limit before it, and cutting from the limit again would overshoot.
    base = min(limit, load)
    target = base * TARGET * baseline / p
    cut = min(limit, max(base * step_down, base + CUT_SMOOTHING * (target - base)))
    return LimitState(config.clamp(cut), baseline, "overload", steps, episode=episode)


def _test(
    config: LimitConfig,
    summary: WindowSummary,
    limit: float,
    baseline: float,
    steps: int,
    episode: Episode,
    first_share: float | None = None,
) -> LimitState:
    """An overload window during a shift test: measure, raise, measure, judge.
    `first_share`: a second test's first test's share (kept through its stages)."""
    if not _second_test(episode):
        first_share = None
    window = Measure.of(summary)
    measure = episode.measure
    if episode.stage == REFERENCE:
        measure = window if measure is None else measure.plus(window)
        if measure.samples < TEST_SAMPLES:
            pooled = replace(episode, measure=measure)
            return LimitState(
                limit, baseline, "shift-test", steps, episode=pooled, first_share=first_share
            )
        raised = config.clamp(max(limit * SHIFT_RAISE, limit + 1.0))
        if raised < limit + 1.0:  # at the maximum: nothing to test with, so cut
            anchored = Episode(
                CUTTING, measure.in_flight, measure.median_s, windows=ONSET_WINDOWS + 1
            )
            return _cut(config, limit, window.in_flight, baseline, window.median_s, steps, anchored)
        test = replace(episode, stage=RAISED, measure=None, reference=measure, windows=0)
        return LimitState(
            raised, baseline, "shift-test", steps, episode=test, first_share=first_share
        )

    reference = episode.reference
    assert reference is not None  # RAISED always has one (Episode.parse checks)
    if window.in_flight < reference.in_flight * math.sqrt(SHIFT_RAISE):
        if episode.windows < RAISE_WAIT:  # the raise has not reached the app yet
            waiting = replace(episode, windows=episode.windows + 1)
            return LimitState(
                limit, baseline, "shift-test", steps, episode=waiting, first_share=first_share
            )
        # The load never filled the raise: no test, back to cutting.
        anchored = Episode(
            CUTTING, reference.in_flight, reference.median_s, windows=ONSET_WINDOWS + 1
        )
        return _cut(config, limit, window.in_flight, baseline, window.median_s, steps, anchored)
    measure = window if measure is None else measure.plus(window)
    if measure.samples < TEST_SAMPLES:
        pooled = replace(episode, measure=measure)
        return LimitState(
            limit, baseline, "shift-test", steps, episode=pooled, first_share=first_share
        )
    return _verdict(
        config, window, limit, baseline, steps, episode, reference, measure, first_share
    )


def _verdict(
    config: LimitConfig,
    window: Measure,
    limit: float,
    baseline: float,
    steps: int,
    episode: Episode,
    reference: Measure,
    raised: Measure,
    first_share: float | None = None,
) -> LimitState:
    """The shift test's verdict on its stages: slower work, a queue, or (the first
    time) a test that cannot tell, and runs again. A second test judges the mean of
    both tests' shares (`first_share`), when its state still has the first's."""
    # A queue's wait grows with the in flight that feeds it: by the rise times the
    # mean latency (Little's law), for every request. What share of that did the
    # fastest requests slow down by? A queue: about 1; slower work: about 0. Either
    # needs the share beyond a half by DECISION_Z times its noise (SHIFT_NOISE): two
    # stages of a hundred requests can differ by as much as the raise by chance.
    queue_rise = (raised.in_flight / reference.in_flight - 1.0) * reference.spread
    share = math.log(raised.low_s / reference.low_s) / queue_rise
    doubt = DECISION_Z * SHIFT_NOISE
    if first_share is not None:
        # Two tests, each measured afresh: their mean's noise is one share's over sqrt(2).
        share = 0.5 * (first_share + share)
        doubt /= math.sqrt(2.0)
    if share < 0.5 - doubt:
        return LimitState(limit, reference.median_s, "shift", steps)
    if share <= 0.5 + doubt and episode.anchor_s > 0.0:
        # Cannot tell, the first time: test again from the reference's limit (the raise
        # undone), afresh. The second test runs without the anchor (every first test has
        # one: the doubt that starts it needs it); its verdict is the last, on both tests'
        # shares: this one's goes with it.
        back = config.clamp(min(limit / SHIFT_RAISE, limit - 1.0))
        second = Episode(REFERENCE)
        return LimitState(back, baseline, "shift-test", steps, episode=second, first_share=share)
    # A queue after all (or twice a test that could not tell): cut, from where the
    # raise measured it; gently if it could not tell (a doubt that stays tests again).
    step_down = STEP_DOWN_MIN if share > 0.5 + doubt else STEP_DOWN_DOUBT
    anchored = Episode(CUTTING, raised.in_flight, raised.median_s, windows=ONSET_WINDOWS + 1)
    return _cut(
        config, limit, window.in_flight, baseline, window.median_s, steps, anchored, step_down
    )


def _in_use(summary: WindowSummary, in_force: int) -> bool:
    """Did this window's load reach the limit (the app-limited guard)?"""
    return summary.max_in_flight >= in_force and summary.mean_in_flight >= IN_USE_SHARE * in_force


def _held_back(summary: WindowSummary, in_force: int) -> bool:
    """Did the limit hold this window's requests back though the app's mean in flight
    stayed below it: WAITED_SHARE of them waited for it, and the in flight reached it?
    (Only asked where the latency is confidently at the baseline: `step`.)"""
    return summary.waited >= WAITED_SHARE * summary.count and summary.max_in_flight >= in_force


def _interval(summary: WindowSummary, z: float) -> tuple[float, float, float]:
    """The quantiles bounding the window's median `z` standard errors either side
    (the rank of a sample quantile has standard error sqrt(q (1 - q) / n))."""
    n = summary.count - summary.failures
    half = min(0.4, z * math.sqrt(QUANTILE * (1.0 - QUANTILE) / n))
    return QUANTILE - half, QUANTILE, QUANTILE + half


def _baseline(baseline_s: float, summary: WindowSummary, in_force: int, elapsed_s: float) -> float:
    """The baseline after this window: the lowest candidate seen (a window moves it
    down by its share of BASELINE_SAMPLES), rising toward newer candidates only when
    the window could not have queued."""
    candidate = summary.quantile(_interval(summary, BASELINE_Z)[2])
    if baseline_s <= 0.0:
        return candidate
    if candidate <= baseline_s:
        weight = min(1.0, (summary.count - summary.failures) / BASELINE_SAMPLES)
        return baseline_s + (candidate - baseline_s) * weight
    if summary.max_in_flight <= UNUSED_SHARE * in_force:
        rise = -math.expm1(-max(elapsed_s, 0.0) / BASELINE_DECAY_S)
        return baseline_s + (candidate - baseline_s) * rise
    return baseline_s


class LimitEstimator:
    """One process's learned limit: feed it samples, poll it with the time.

    Contract: call ``observe`` once per finished admitted request, and ``poll(now)``
    at or after ``next_due`` (extra polls are cheap no-ops). A window with too few
    successes to judge (and no failure signal) is not stepped on but kept open for
    another window: an app with little traffic still learns, more slowly, and the
    state keeps the reason of its last real step. `flight` is the process's in
    flight, read as each window closes (on its own clock); without one a window's
    mean in flight is the one at its requests' admissions (`WindowSummary`).
    """

    __slots__ = ("_config", "_flight", "_limit", "_start", "_state", "_stepped_at", "_summary")

    def __init__(self, config: LimitConfig, now: float, flight: InFlight | None = None) -> None:
        self._config = config
        self._flight = flight
        if flight is not None:
            flight.take()  # the first window starts now
        self._state = initial_state(config)
        self._limit = self._state.in_force  # read on every admission: kept, not computed
        self._summary = WindowSummary()
        #: When the open window began, and when the last step that used a window was.
        self._start = now
        self._stepped_at = now

    @property
    def limit(self) -> int:
        """The concurrency limit in force."""
        return self._limit

    @property
    def state(self) -> LimitState:
        return self._state

    @property
    def next_due(self) -> float:
        return self._start + self._config.window_s

    def observe(self, sample: Sample) -> None:
        """Count one finished admitted request in the open window."""
        self._summary.add(sample)

    def poll(self, now: float) -> bool:
        """Take a step if a window is due; True if the limit in force changed."""
        if now - self._start < self._config.window_s:
            return False
        self._start = now
        if self._flight is not None:
            summary = self._summary
            summary.measure(*self._flight.take(summary.lag()))
        state = step(self._config, self._state, self._summary, now - self._stepped_at)
        if state.reason == "few-samples":
            return False  # keep collecting: the next window adds to this one
        before, self._state, self._limit = self._limit, state, state.in_force
        self._summary = WindowSummary()
        self._stepped_at = now
        return self._limit != before
