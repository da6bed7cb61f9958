"""The learned concurrency limit (`throttle_mw.scheduler.limit`), on a fake clock.

The rule is driven by a simulated app of `c` slots (tests/support/app_model.py):
open-loop Poisson load at 2.5x its capacity, a limiter admitting while in flight
< the learned limit, jittered service times (uniform within ±50%, and a lognormal
variant with a heavier tail). Runs are seeded and exact, and take no real time;
each claim is checked on three seeds. The scheduler README ("The learned limit")
derives the rule these tests hold it to.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import replace
from typing import Final

import pytest

from tests.support.app_model import AppModel, Jitter, Spread
from throttle_mw.scheduler.limit import (
    LimitConfig,
    LimitEstimator,
    LimitState,
    Sample,
    WindowSummary,
    initial_state,
    step,
)
from throttle_mw.scheduler.limit.constants import GROW_BELOW, GROW_MAX, RAMP, TARGET, WAITED_SHARE
from throttle_mw.scheduler.limit.summary import BUCKET_RATIO

#: Mean service time per slot count: enough requests per window at every size,
#: and short runs (c = 8 x 100 ms is the issue's end-to-end app).
MEAN_S = {4: 0.02, 8: 0.1, 32: 0.1, 128: 0.1}
SEEDS = (1, 2, 3)
LOAD = 2.5  # times the app's capacity


def app(
    c: int,
    *,
    seed: int,
    jitter: Jitter = "uniform",
    slots: tuple[tuple[float, float], ...] = (),
    mean_s: tuple[tuple[float, float], ...] = (),
    load: tuple[tuple[float, float], ...] = (),
    fail_share: tuple[tuple[float, float], ...] = ((0.0, 0.0),),
    processes: int = 1,
    spread: Spread = "round-robin",
) -> AppModel:
    """An app of `c` slots with the default schedules, some replaced; behind a fleet
    of `processes`."""
    mean = MEAN_S[c]
    return AppModel(
        slots=slots or ((0.0, c),),
        mean_s=mean_s or ((0.0, mean),),
        load=load or ((0.0, LOAD * c / mean),),
        jitter=jitter,
        fail_share=fail_share,
        seed=seed,
        processes=processes,
        spread=spread,
    )


def first_within(model: AppModel, c: float, since: float) -> float:
    """Seconds after `since` until the limit in force is first within [c, 1.5c]."""
    return next((t - since for t, limit in model.limits if t >= since and c <= limit <= 1.5 * c))


def share_within(limits: list[int], c: float) -> float:
    return sum(c <= limit <= 1.5 * c for limit in limits) / len(limits)


def cv(values: list[int]) -> float:
    return statistics.pstdev(values) / statistics.mean(values)


# --- the rule on a simulated app --------------------------------------------------------


@pytest.mark.parametrize("jitter", ["uniform", "lognormal"])
@pytest.mark.parametrize("c", [4, 8, 32, 128])
def test_cold_start_reaches_the_slots_within_15_s_and_stays(c: int, jitter: Jitter) -> None:
    for seed in SEEDS:
        model = app(c, seed=seed, jitter=jitter)
        model.run(45.0)
        steady = model.limits_between(15.0, 45.0)
        assert first_within(model, c, 0.0) <= 15.0, (seed, model.limits[:40])
        assert c <= statistics.mean(steady) <= 1.5 * c, (seed, steady)
        assert cv(steady) <= 0.2, (seed, steady)
        assert share_within(steady, c) >= 0.9, (seed, steady)


@pytest.mark.parametrize("jitter", ["uniform", "lognormal"])
@pytest.mark.parametrize("c", [8, 32, 128])
def test_after_the_slots_halve_it_is_back_within_10_s(c: int, jitter: Jitter) -> None:
    half = c // 2
    for seed in SEEDS:
        model = app(c, seed=seed, jitter=jitter, slots=((0.0, c), (30.0, half)))
        model.run(60.0)
        after = model.limits_between(40.0, 60.0)
        assert first_within(model, half, 30.0) <= 10.0, (seed, model.limits_between(30.0, 45.0))
        assert half <= statistics.mean(after) <= 1.5 * half, (seed, after)
        assert share_within(after, half) >= 0.8, (seed, after)


@pytest.mark.parametrize("spread", ["round-robin", "random"])
@pytest.mark.parametrize("jitter", ["uniform", "lognormal"])
@pytest.mark.parametrize("processes", [4, 16])
def test_a_fleet_learns_as_one_process_does(processes: int, jitter: Jitter, spread: Spread) -> None:
    """The fleet's step (`fleet_step`: every process pushes its own summaries twice a
    window, one step a window) converges as one process does, before and after the
    slots halve, the requests spread over the processes in turn or at random.
    Counting a process's two summaries as two processes once doubled the in flight
    the rule saw: after the halving the limit climbed to 17 for 4 slots."""
    c, half = 8, 4
    for seed in SEEDS:
        slots = ((0.0, c), (30.0, half))
        model = app(c, seed=seed, jitter=jitter, slots=slots, processes=processes, spread=spread)
        model.run(60.0)
        steady, after = model.limits_between(15.0, 30.0), model.limits_between(40.0, 60.0)
        assert first_within(model, c, 0.0) <= 15.0, (seed, model.limits[:40])
        assert c <= statistics.mean(steady) <= 1.5 * c, (seed, steady)
        assert first_within(model, half, 30.0) <= 10.0, (seed, model.limits_between(30.0, 45.0))
        assert half <= statistics.mean(after) <= 1.5 * half, (seed, after)
        assert share_within(after, half) >= 0.8, (seed, after)
        assert max(after) <= c, (seed, after)


@pytest.mark.parametrize("c", [8, 32, 128])
def test_slower_work_at_the_same_slots_is_no_overload(c: int) -> None:
    """The service time doubles at t = 30 s, the slots stay: the latency doubles at any
    limit, and the limit must not follow it down (it tests, finds no queue, and
    measures a new baseline)."""
    mean = MEAN_S[c]
    for seed in SEEDS:
        model = app(c, seed=seed, mean_s=((0.0, mean), (30.0, 2 * mean)))
        model.run(60.0)
        assert min(model.limits_between(30.0, 60.0)) >= 0.75 * c, (seed, model.limits[-70:])
        assert c <= statistics.mean(model.limits_between(45.0, 60.0)) <= 1.5 * c, seed
        assert any(s.reason == "shift" for s in model.states), seed


@pytest.mark.parametrize("c", [8, 32, 128])
def test_slower_work_with_a_heavy_tail_recovers(c: int) -> None:
    """The same with lognormal service times: the test needs more requests to tell a
    queue from slower work, so the limit dips further first (a known weakness, see
    the scheduler README), but it neither collapses nor stays down."""
    mean = MEAN_S[c]
    for seed in SEEDS:
        model = app(c, seed=seed, jitter="lognormal", mean_s=((0.0, mean), (30.0, 2 * mean)))
        model.run(60.0)
        assert min(model.limits_between(30.0, 60.0)) >= 0.5 * c, seed
        assert 0.75 * c <= statistics.mean(model.limits_between(45.0, 60.0)) <= 1.5 * c, seed


@pytest.mark.parametrize("c", [8, 32])
def test_constant_failures_lower_it_to_the_minimum(c: int) -> None:
    for seed in SEEDS:
        model = app(c, seed=seed, fail_share=((0.0, 0.0), (20.0, 0.3)))
        model.run(20.0)
        before = model.limit_at(20.0)
        model.run(30.0)
        assert before >= c
        assert model.limit_at(25.0) <= before / 2
        assert model.limit_at(30.0) == LimitConfig().minimum
        assert model.states[-1].reason == "failures"


def test_failures_below_the_threshold_do_not_lower_it() -> None:
    for seed in SEEDS:
        model = app(32, seed=seed, fail_share=((0.0, 0.0), (20.0, 0.05)))
        model.run(40.0)
        assert statistics.mean(model.limits_between(30.0, 40.0)) >= 32


@pytest.mark.parametrize("c", [8, 32])
def test_a_quiet_spell_then_a_burst_admits_at_most_1_5c_at_once(c: int) -> None:
    """A minute at a tenth of the capacity, then 3x: the limit did not grow while
    unused, so the burst gets at most 1.5c into the app at once."""
    capacity = c / MEAN_S[c]
    for seed in SEEDS:
        load = ((0.0, LOAD * capacity), (20.0, 0.1 * capacity), (80.0, 3 * capacity))
        model = app(c, seed=seed, load=load)
        model.run(25.0)
        settled = model.limit_at(25.0)
        model.run(79.99)
        assert max(model.limits_between(25.0, 80.0)) <= settled <= 1.5 * c
        assert any(s.reason == "unused" for s in model.states)
        model.peak_in_flight = 0
        model.run(80.49)  # the burst's first window
        assert model.peak_in_flight <= 1.5 * c


@pytest.mark.parametrize("load", [1.2, 1.5])
@pytest.mark.parametrize("c", [8, 32])
def test_no_upward_drift_under_sustained_moderate_overload(c: int, load: float) -> None:
    """Five simulated minutes at 1.2x and 1.5x the capacity: the limit's last minute is
    no higher than its first one after settling (Gradient2's `+queueSize` drifts here)."""
    capacity = c / MEAN_S[c]
    for seed in SEEDS:
        model = app(c, seed=seed, load=((0.0, load * capacity),))
        model.run(300.0)
        first = statistics.mean(model.limits_between(30.0, 90.0))
        last = statistics.mean(model.limits_between(240.0, 300.0))
        assert last <= 1.05 * first, (seed, first, last)
        assert c <= last <= 1.5 * c, (seed, last)


def test_the_limit_never_leaves_its_bounds() -> None:
    """Random configs and random windows (any latencies, failures, in flight and gaps):
    every step stays within [minimum, maximum] and its state survives the wire."""
    rng = random.Random(7)
    for _ in range(40):
        minimum = rng.randint(1, 6)
        config = LimitConfig(
            minimum=minimum,
            maximum=rng.randint(minimum, minimum + 60),
            initial=rng.randint(1, 80),
            window_s=rng.choice([0.1, 0.5, 2.0]),
            min_samples=rng.randint(1, 30),
        )
        state = initial_state(config)
        for _ in range(120):
            state = step(config, state, random_window(rng, state.in_force), random_gap(rng))
            assert config.minimum <= state.limit <= config.maximum
            assert config.minimum <= state.in_force <= config.maximum
            assert state.baseline_s >= 0.0
            assert LimitState.decode(state.encode(), state.encode_share()) == state


def random_window(rng: random.Random, limit: int) -> WindowSummary:
    summary = WindowSummary()
    scale = 10 ** rng.uniform(-5, 2)
    shape = rng.choice(["constant", "uniform", "lognormal", "bimodal"])
    failing = rng.choice([0.0, 0.0, 0.05, 0.5, 1.0])
    crowd = rng.choice([1, limit, 3 * limit])
    for _ in range(rng.choice([0, 3, 25, 120, 300])):
        if shape == "constant":
            service = scale
        elif shape == "uniform":
            service = scale * rng.uniform(0.5, 1.5)
        elif shape == "lognormal":
            service = scale * rng.lognormvariate(0.0, 1.0)
        else:
            service = scale * rng.choice([0.1, 10.0])
        summary.add(Sample(service, rng.random() < failing, rng.randint(1, crowd)))
    return summary


def random_gap(rng: random.Random) -> float:
    return rng.choice([0.0, 1e-6, 0.5, 0.5, 7.0, 1e6])


# --- the estimator driver ---------------------------------------------------------------


def test_estimator_steps_once_a_window_and_keeps_collecting_a_thin_one() -> None:
    config = LimitConfig(window_s=0.5, min_samples=20)
    estimator = LimitEstimator(config, now=10.0)
    assert (estimator.limit, estimator.next_due) == (4, 10.5)
    for _ in range(10):
        estimator.observe(Sample(0.1, False, 4))
    assert estimator.poll(10.4) is False  # not due
    assert estimator.poll(10.5) is False  # due, but ten samples say too little
    assert estimator.state.steps == 0
    assert estimator.next_due == 11.0
    for _ in range(120):  # the first baseline wants BASELINE_SAMPLES
        estimator.observe(Sample(0.1, False, 4))
    assert estimator.poll(11.0) is True  # a first baseline, and a first (slow-start) growth
    assert estimator.state.reason == "grow"
    assert estimator.limit == 6
    assert estimator.state.baseline_s == pytest.approx(0.1, rel=BUCKET_RATIO - 1)
    assert estimator.poll(11.2) is False
    assert estimator.next_due == 11.5


def test_growth_is_sized_from_the_in_flight_the_window_measured() -> None:
    """A window whose in flight stayed below the limit (10 of 11: a fleet's processes
    still taking up their grants) read its median at 10 in flight: the limit grows to
    10 * TARGET / r, not 11 * TARGET / r (which overshot to 13.75 on a loaded machine)."""
    config = LimitConfig()
    state = LimitState(11.0, 0.11, "hold", 40)
    window = summary_of(Sample(0.1, False, 11 if i % 2 else 9) for i in range(40))
    assert window.mean_in_flight == 10.0
    new = step(config, state, window, 0.5)
    median = window.quantile(0.5)
    assert new.reason == "grow"
    assert new.limit == pytest.approx(10.0 * TARGET * new.baseline_s / median)
    assert 12.0 < new.limit < 11.0 * GROW_MAX
    # At the limit, the same latency grows it by the same ratio from the limit.
    full = summary_of(Sample(0.1, False, 11) for _ in range(40))
    grown = step(config, state, full, 0.5)
    assert grown.limit == pytest.approx(11.0 * min(GROW_MAX, TARGET * grown.baseline_s / median))
    # And never by less than one.
    thin = summary_of(Sample(0.1, False, 11 if i % 4 == 0 else 8) for i in range(40))
    assert step(config, LimitState(11.0, 0.1, "hold", 40), thin, 0.5).limit == 12.0


def held_back(waited: int, *, peak: int = 4, service_s: float = 0.001) -> WindowSummary:
    """A window of 40 requests at `service_s`, `waited` of them queued for a limit of
    4, the app's own in flight about 1.6 (the fleet's slots held in Redis longer than
    in the app), its peak `peak`."""
    window = summary_of(
        Sample(service_s, False, peak if i % 10 == 0 else 1 + i % 2, i < waited) for i in range(40)
    )
    assert window.mean_in_flight < 0.75 * 4  # not in use: below IN_USE_SHARE
    assert window.waited == waited
    return window


def test_a_limit_that_held_most_requests_back_grows_with_the_latency_at_the_baseline() -> None:
    """The Redis fleet of docs/performance.md ("The learned limit at its start, four
    processes"): the app holds about 2 of a limit of 4, yet most requests queue for
    it. Not in use by the app's in flight, but the limit held them back: grow, from
    the limit (the load that queued), as an in-use limit grows. Without the waits:
    "unused", held."""
    config = LimitConfig()
    state = LimitState(4.0, 0.001, "hold", 40)
    waited = step(config, state, held_back(30), 0.5)
    median = held_back(30).quantile(0.5)
    assert waited.reason == "grow"
    assert waited.limit == pytest.approx(
        max(5.0, min(4.0 * GROW_MAX, 4.0 * TARGET * waited.baseline_s / median))
    )
    assert waited.in_force == 5
    # The same window without waits, or with too few, or whose in flight never reached
    # the limit (a queue for something else: a rate): unused.
    share = math.ceil(WAITED_SHARE * 40)
    for window in (held_back(0), held_back(share - 1), held_back(30, peak=3)):
        unused = step(config, state, window, 0.5)
        assert (unused.limit, unused.reason) == (4.0, "unused")
    assert step(config, state, held_back(share), 0.5).reason == "grow"
    # In slow start, by RAMP, as any growth.
    ramp = step(config, LimitState(4.0, 0.001, "grow", 40, slow_start=True), held_back(30), 0.5)
    assert (ramp.limit, ramp.reason) == (4.0 * RAMP, "grow")


def test_a_held_back_limit_grows_only_while_its_latency_stays_at_the_baseline() -> None:
    """Why waits cannot over-grow it: the latency guards come first. After an unused
    window it holds one window (its latency flattered by an idle app), as any growth;
    a window above GROW_BELOW holds and one above CUT_ABOVE cuts, waits or not."""
    config = LimitConfig()
    after_unused = step(config, LimitState(4.0, 0.001, "unused", 40), held_back(30), 0.5)
    assert (after_unused.limit, after_unused.reason) == (4.0, "hold")
    climbing = LimitState(8.0, 0.001, "grow", 40)
    slower = held_back(30, peak=8, service_s=0.001 * (GROW_BELOW + 0.1))
    assert step(config, climbing, slower, 0.5).reason == "hold"
    queueing = held_back(30, peak=8, service_s=0.002)
    cut = step(config, climbing, queueing, 0.5)
    assert cut.reason == "overload"
    assert cut.limit < 8.0


def test_step_without_requests_holds() -> None:
    config = LimitConfig()
    state = step(config, initial_state(config), WindowSummary(), 0.5)
    assert (state.limit, state.reason, state.steps) == (4.0, "idle", 1)


# --- window summaries -------------------------------------------------------------------


def samples(rng: random.Random, n: int) -> list[Sample]:
    return [
        Sample(rng.lognormvariate(-2.0, 1.0), rng.random() < 0.1, rng.randint(1, 50))
        for _ in range(n)
    ]


def summary_of(items: Iterable[Sample]) -> WindowSummary:
    summary = WindowSummary()
    for sample in items:
        summary.add(sample)
    return summary


def test_summary_counts_and_quantiles() -> None:
    summary = summary_of(Sample(0.001 * (i + 1), i % 10 == 0, i % 7 + 1) for i in range(1000))
    assert (summary.count, summary.failures, summary.max_in_flight) == (1000, 100, 7)
    assert not summary.empty
    assert WindowSummary().empty
    ok = sorted(0.001 * (i + 1) for i in range(1000) if i % 10)
    for q in (0.1, 0.5, 0.9):
        exact = ok[int(q * len(ok))]
        assert abs(math.log(summary.quantile(q) / exact)) < math.log(BUCKET_RATIO)
    assert summary.mean() == pytest.approx(statistics.mean(ok), rel=0.05)
    assert summary.mean(0.5) == pytest.approx(statistics.mean(ok[: len(ok) // 2]), rel=0.05)
    assert summary.mean_in_flight == pytest.approx(statistics.mean(i % 7 + 1 for i in range(1000)))
    with pytest.raises(ValueError, match="no successful"):
        summary_of([Sample(0.1, True, 1)]).quantile(0.5)
    with pytest.raises(ValueError, match="quantile"):
        summary.quantile(1.5)


def test_summary_clamps_to_its_edge_buckets() -> None:
    summary = summary_of([Sample(0.0, False, 1), Sample(1e-9, False, 1), Sample(1e4, False, 1)])
    assert summary.quantile(0.0) == pytest.approx(1e-4)
    assert summary.quantile(1.0) >= 60.0


def test_merge_equals_one_summary_of_all_samples() -> None:
    rng = random.Random(3)
    parts = [samples(rng, n) for n in (0, 1, 57, 400)]
    merged = WindowSummary()
    for part in parts:
        merged.merge(summary_of(part))
    whole = summary_of(s for part in parts for s in part)
    assert (merged.count, merged.failures) == (whole.count, whole.failures)
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert merged.quantile(q) == whole.quantile(q)
    assert merged.mean() == whole.mean()
    # In flight adds up across parts (processes): an upper bound of the fleet's.
    assert merged.max_in_flight == sum(max((s.in_flight for s in p), default=0) for p in parts)
    means = [statistics.mean(s.in_flight for s in p) for p in parts if p]
    assert merged.mean_in_flight == pytest.approx(sum(means))


def test_pool_is_one_process_more_samples() -> None:
    """Two half windows of one process pooled: the in flight is the mean of theirs, each
    an equal stretch of time, not their sum (the fleet pools a process's parts before
    adding the processes up)."""
    rng = random.Random(4)
    first, second = samples(rng, 40), samples(rng, 25)
    parts = [summary_of(first), summary_of(second)]
    parts[0].measure(2.5, 0.25)  # 10 in flight on average
    parts[1].measure(1.5, 0.25)  # 6
    pooled = WindowSummary.decode(parts[0].encode())
    pooled.pool(WindowSummary.decode(parts[1].encode()))
    whole = summary_of(first + second)
    assert (pooled.count, pooled.failures) == (whole.count, whole.failures)
    assert pooled.quantile(0.5) == whole.quantile(0.5)
    assert pooled.max_in_flight == whole.max_in_flight
    assert pooled.mean_in_flight == pytest.approx(8.0)
    # A quiet half window (nothing finished, nothing in flight) counts as much.
    quiet = WindowSummary()
    quiet.measure(0.0, 0.25)
    pooled.pool(WindowSummary.decode(quiet.encode()))
    assert pooled.mean_in_flight == pytest.approx(16.0 / 3)
    # ... and it still merges as one process's part.
    other = summary_of(samples(rng, 30))
    other.measure(1.0, 0.5)
    pooled.merge(other)
    assert pooled.mean_in_flight == pytest.approx(16.0 / 3 + 2.0)


def wire_safe(text: str) -> bool:
    """ASCII, and none of the characters the fleet's wire uses around these forms."""
    return text.isascii() and not any(ch in text for ch in " |;\n\r\t")


def test_summary_counts_the_requests_that_waited_beside_its_wire_text() -> None:
    """`waited` adds up over samples, pools and merges; the wire text leaves it out,
    byte for byte the text of the same window without waits: an older build's process
    (its parser rejects any field it does not know, a trailing one too) reads this
    build's summaries as it always did, and this build reads its."""
    rng = random.Random(6)
    plain = samples(rng, 60)
    waited = [Sample(s.service_s, s.failed, s.in_flight, i % 3 == 0) for i, s in enumerate(plain)]
    summary = summary_of(waited)
    assert summary.waited == 20
    assert summary.encode() == summary_of(plain).encode()
    with pytest.raises(ValueError, match="not a window summary"):
        WindowSummary.decode(summary.encode() + ",20")  # why it is not a trailing field
    again = WindowSummary.decode(summary.encode())
    assert again.waited == 0
    again.add_waited(20)
    assert again == summary
    pooled = summary_of(waited[:30])
    pooled.pool(summary_of(waited[30:]))
    merged = summary_of(waited[:10])
    merged.merge(summary_of(waited[10:]))
    assert pooled.waited == merged.waited == 20


def test_summary_wire_round_trip() -> None:
    rng = random.Random(5)
    for n in (0, 1, 2, 30, 1000):
        summary = summary_of(samples(rng, n))
        text = summary.encode()
        assert wire_safe(text)
        again = WindowSummary.decode(text)
        assert again == summary
        assert again.encode() == text
    merged = summary_of(samples(rng, 50))
    merged.merge(summary_of(samples(rng, 70)))
    assert WindowSummary.decode(merged.encode()) == merged


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2,1,0,1,1.0,50:1",  # unknown version
        "1,1,0,1",  # too short
        "1,1,0,1,1.0",  # one sample, no bucket
        "1,2,0,1,1.0,50:1",  # the histogram misses a sample
        "1,1,2,1,1.0",  # more failures than samples
        "1,1,0,1,1.0,50:1,50:1",  # a bucket twice
        "1,2,0,1,1.0,51:1,50:1",  # buckets out of order
        "1,1,0,1,1.0,9999:1",  # no such bucket
        "1,1,0,1,1.0,50:0",  # an empty bucket listed
        "1,1,0,1,1.0,50",  # no count
        "1,1,0,1,nan,50:1",
        "1,1,0,1,inf,50:1",
        "1,-1,0,1,1.0",
        "1, 1,0,1,1.0,50:1",
        "1,1_0,0,1,1.0,50:1",
        "1,1,0,1,1.0,50:1;",
    ],
)
def test_summary_decode_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a window summary"):
        WindowSummary.decode(text)


# --- config and state -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"minimum": 0}, "minimum must be at least 1"),
        ({"minimum": 10, "maximum": 5}, "maximum .5. must be at least minimum .10."),
        ({"initial": 0}, "initial must be at least 1"),
        ({"window_s": 0.0}, "window_s must be a positive"),
        ({"window_s": math.nan}, "window_s must be a positive"),
        ({"window_s": math.inf}, "window_s must be a positive"),
        ({"min_samples": 0}, "min_samples must be at least 1"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LimitConfig(**kwargs)  # type: ignore[arg-type]


def test_initial_state_is_the_initial_limit_within_bounds() -> None:
    assert initial_state(LimitConfig()).in_force == 4
    assert initial_state(LimitConfig(minimum=10, maximum=20)).in_force == 10
    assert initial_state(LimitConfig(maximum=3)).in_force == 3
    state = initial_state(LimitConfig())
    assert (state.baseline_s, state.reason, state.steps, state.slow_start) == (
        0.0,
        "initial",
        0,
        True,
    )


def test_in_force_rounds_to_nearest() -> None:
    assert [LimitState(x, 0.0, "hold", 0).in_force for x in (2.0, 2.49, 2.5, 3.7)] == [2, 2, 3, 4]


def test_state_wire_round_trip_through_every_stage() -> None:
    """Every state of a run that cuts, tests a latency shift and re-measures its
    baseline survives the wire unchanged."""
    model = app(32, seed=1, mean_s=((0.0, 0.1), (30.0, 0.2)))
    model.run(45.0)
    reasons = {state.reason for state in model.states}
    assert {"grow", "hold", "overload", "shift-test", "shift"} <= reasons
    assert {s.episode.stage for s in model.states if s.episode} == {0, 1, 2, 3}
    for state in model.states:
        text = state.encode()
        assert wire_safe(text)
        assert LimitState.decode(text, state.encode_share()) == state


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1,4.0,0.0,initial,0",  # no slow-start field
        "1,4.0,0.0,initial,0,1,0",  # a cut-off episode
        "2,4.0,0.0,initial,0,1",
        "1,0.5,0.0,hold,3,0",  # a limit below 1
        "1,4.0,0.0,sideways,3,0",
        "1,4.0,0.0,hold,3,2",
        "1,nan,0.0,hold,3,0",
        "1,4.0,-1.0,hold,3,0",
        "1,4.0,0.0,hold,-3,0",
        "1,4.0,0.0,hold,3,0," + ",".join(["9"] + ["0"] * 13),  # no such stage
    ],
)
def test_state_decode_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a limit state"):
        LimitState.decode(text)


# --- the shift test, replayed from a CI run ---------------------------------------------


def _uniform_window(n: int, wait_s: float, in_flight: float, in_force: int) -> WindowSummary:
    """A half-second window of `n` requests, each waiting `wait_s` and then working a
    time spread evenly over 50-150 ms (tests/apps/story.py's work, jitter 0.5), at a
    time-weighted mean in flight of `in_flight`; every request waited for the limit."""
    summary = WindowSummary()
    for i in range(n):
        summary.add(Sample(wait_s + 0.05 + 0.1 * (i + 0.5) / n, False, in_force, True))
    summary.measure(in_flight * 0.5, 0.5)
    return summary


#: CI's fleet state at step 64 (tests/test_e2e_learned.py, 18:00 UTC), in its reference stage.
_CI_STATE: Final = (
    "1,6.988385888832431,0.1084865989705148,shift-test,64,0,2,3,"
    "9.837148303301072,0.2382062931177347,0,0.0,0.0,0.0,0.0,0,0.0,0.0,0.0,0.0"
)


def _replay_ci(
    raised_wait_s: float, state: LimitState | None = None
) -> tuple[list[str], LimitState]:
    """CI's shift test from its stored state (or from `state`): its reference windows,
    then four raised windows of CI's size and in flight whose requests wait
    `raised_wait_s` (CI's: 96.5 ms). The reasons of the raised windows' steps, and the
    state after them."""
    config = LimitConfig()
    state = state or LimitState.decode(_CI_STATE)
    reference = [(34, 0.086, 6.845), (54, 0.087, 6.99), (20, 0.085, 6.5)]
    for n, wait_s, in_flight in reference:
        state = step(config, state, _uniform_window(n, wait_s, in_flight, 7), 0.5)
    if (state.in_force, state.reason) != (8, "shift-test"):  # the raise, as in CI
        pytest.fail(f"not CI's raise: {state.encode()}")
    reasons: list[str] = []
    for n in (30, 29, 27, 27):
        state = step(config, state, _uniform_window(n, raised_wait_s, 8.14, 8), 0.5)
        reasons.append(state.reason)
    return reasons, state


def test_the_ci_runs_queue_at_four_slots_is_no_shift() -> None:
    """CI, 18:00 UTC (tests/test_e2e_learned.py, four processes, the app's slots 8 -> 4,
    its work unchanged): the fleet's stored state at step 64, in its reference stage,
    then windows whose pooled measures are the ones CI stored (reference: 108 requests
    at 6.83 in flight, median 189 ms, fastest half 162 ms; raised to 8.04: 59 requests at
    8.14, median 195 ms, fastest half 172 ms; the last two raised windows are taken as
    the first two, which CI's state did not show). The work did not change: the verdict
    must not be a shift. The fastest half rose about a quarter of what a queue
    predicts, within the test's noise of a half (SHIFT_NOISE): the rule cannot tell,
    and goes back to the reference's limit to test again. (The rule before it said
    shift and moved the baseline from 108 to 186 ms; CI: 189 ms.)"""
    reasons, state = _replay_ci(0.0965)
    assert "shift" not in reasons, (reasons, state.encode())
    assert state.baseline_s < 0.125, state.encode()
    assert (reasons[-1], state.in_force) == ("shift-test", 7), state.encode()  # again
    # ... and runs afresh, measuring what CI's did: it cannot tell again, and cuts (gently,
    # from the raised stage's in flight) as for a queue, the baseline where it was.
    again, state = _replay_ci(0.0965, state)
    assert again == ["shift-test"] * 3 + ["overload"], (again, state.encode())
    assert state.baseline_s < 0.125, state.encode()
    assert state.in_force == 8, state.encode()  # the raised limit, 8.04 x 0.95


def test_slower_work_beside_the_ci_runs_noise_is_a_shift() -> None:
    """The same run, stage for stage, but the raise leaves the latency where it was
    (the raised windows' requests wait as the reference's did, 86 ms): slower work, and
    the test says so at once, with CI's stages' sizes and in flight, moving the
    baseline as far as CI's verdict did (to the reference's median); and so does the
    test run again after CI's own, which could not tell. A rule that never finds a
    shift fails here."""
    reasons, state = _replay_ci(0.086)
    assert reasons[-1] == "shift", (reasons, state.encode())
    assert 0.17 < state.baseline_s < 0.2, state.encode()
    _, state = _replay_ci(0.0965)
    reasons, state = _replay_ci(0.086, state)
    assert reasons[-1] == "shift", (reasons, state.encode())
    assert 0.17 < state.baseline_s < 0.2, state.encode()


def test_a_second_test_judges_both_tests_shares() -> None:
    """A first test that cannot tell leaves its share to the second, whose verdict is
    on the mean of both (their noise over sqrt(2)). A queue's first test at 0.53 and a
    second at 0.13: the second alone would say slower work (below 0.2) and move the
    baseline for good; both say 0.33, which cannot tell: a gentle cut, the baseline
    where it was. And slower work read at 0.23 twice: alone, each cannot tell (the
    second cut gently); both, 0.23 against a band of 0.5 - 0.21: a shift."""
    _, first = _replay_ci(0.106)  # a first share of 0.53: cannot tell
    reasons, state = _replay_ci(0.09, first)  # a second of 0.13
    assert reasons[-1] == "overload", (reasons, state.encode())
    assert state.baseline_s < 0.125, state.encode()
    assert first.first_share == pytest.approx(0.53, abs=0.01), first
    assert state.first_share is None
    _, first = _replay_ci(0.094)  # 0.23: cannot tell
    reasons, state = _replay_ci(0.094, first)
    assert reasons[-1] == "shift", (reasons, state.encode())
    assert 0.17 < state.baseline_s < 0.2, state.encode()
    assert first.first_share == pytest.approx(0.23, abs=0.01), first
    assert state.first_share is None


def test_the_first_share_goes_beside_the_state_text() -> None:
    """The first test's share crosses the wire as a text of its own, beside the state's
    (`encode_share`): the state's text is byte for byte what an older build writes and
    parses (its parser rejects a field it does not know), old states load, and a share
    that is not the state's own (another step's: an older build's step rewrote the
    state and left the share; or beside a state in no second test; or malformed) is
    left out, so the second test's verdict goes alone, as an older build's does."""
    _, state = _replay_ci(0.106)
    assert state.first_share is not None
    old_form = replace(state, first_share=None)
    assert state.encode() == old_form.encode()
    share = state.encode_share()
    assert wire_safe(share)
    assert share == f"{state.steps}:{state.first_share!r}"
    assert LimitState.decode(state.encode(), share) == state
    assert LimitState.decode(state.encode()) == old_form  # an old state, or no share field
    assert LimitState.decode(_CI_STATE) == LimitState.decode(_CI_STATE, "")
    assert old_form.encode_share() == ""
    negative = replace(state, first_share=-0.25)
    assert LimitState.decode(negative.encode(), negative.encode_share()) == negative
    stale = replace(state, steps=state.steps + 1)  # an older build's step
    assert LimitState.decode(stale.encode(), share).first_share is None
    for text in ("", "garbage", f"{state.steps}:", f"{state.steps}:nan", f"{state.steps}:inf",
                 f"{state.steps}:1_0", f"{state.steps}: 0.5", f"-{state.steps}:0.5",
                 f"{state.steps}:0.5:0.5"):  # fmt: skip
        assert LimitState.decode(state.encode(), text).first_share is None, text
    # Beside a first test's state, or a state after the verdict: no second test to pool.
    first = LimitState.decode(_CI_STATE)
    assert LimitState.decode(_CI_STATE, f"{first.steps}:0.5").first_share is None
    done = LimitState(8.0, 0.1, "overload", state.steps)
    assert LimitState.decode(done.encode(), share).first_share is None
