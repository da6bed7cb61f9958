"""The learned limit's in flight: time-weighted per process, so a fleet's adds up.

Every test runs on an injected clock (discrete events, no sleeps). The old measure,
the mean of the in flight each request saw at its admission (itself included),
is what a `WindowSummary` without `measure` still reads: the tests show it next to
the new one, as the figure the new one must not read (a fleet holding 10 over four
processes spread at random read 13 and more).
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from throttle_mw.backends.redis.learner import fleet_lag, fleet_window
from throttle_mw.scheduler.limit import InFlight, LimitConfig, LimitEstimator, Sample, WindowSummary

WINDOW_S = 0.5
PUSH_S = WINDOW_S / 2


@dataclass
class Fleet:
    """Processes on one simulated clock: each with its `InFlight` and a window summary,
    each request's service time drawn from `service`; `truth` integrates the whole
    fleet's in flight independently (a plain step function)."""

    processes: int
    service: Callable[[random.Random], float]
    spread: str = "random"  # or "round-robin"
    seed: int = 1
    now: float = 0.0
    events: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.flights = [InFlight(lambda: self.now) for _ in range(self.processes)]
        self.summaries = [WindowSummary() for _ in range(self.processes)]
        self.admitted: dict[int, tuple[float, int, int]] = {}  # id: (at, process, in flight)
        self.in_flight = 0
        self._ids = 0
        self._turn = 0
        self._area = 0.0
        self._since = 0.0
        #: Called with each finished request's sample, besides its process's summary.
        self.observers: list[Callable[[Sample], None]] = []

    def _truth_step(self, change: int) -> None:
        self._area += self.in_flight * (self.now - self._since)
        self._since = self.now
        self.in_flight += change

    def truth(self) -> float:
        """The fleet's in-flight seconds since the last call."""
        self._truth_step(0)
        area, self._area = self._area, 0.0
        return area

    def admit(self) -> None:
        if self.spread == "random":
            process = self.rng.randrange(self.processes)
        else:
            process, self._turn = self._turn, (self._turn + 1) % self.processes
        self._ids += 1
        running = self.flights[process].admit(self.now)
        self._truth_step(+1)
        self.admitted[self._ids] = (self.now, process, running)
        heapq.heappush(self.events, (self.now + self.service(self.rng), self._ids, 0))

    def finish(self, rid: int) -> None:
        at, process, running = self.admitted.pop(rid)
        self.flights[process].finish(self.now)
        self._truth_step(-1)
        sample = Sample(self.now - at, False, running)
        self.summaries[process].add(sample)
        for observe in self.observers:
            observe(sample)

    def run(self, until: float, on_finish: Callable[[], None] = lambda: None) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, rid, _ = heapq.heappop(self.events)
            self.finish(rid)
            on_finish()
        self.now = until

    def push(self, lag: Callable[[int, WindowSummary], float] | None = None) -> list[str]:
        """Every process's summary as `FleetLearner.flush` pushes it (all at `now`)."""
        entries = []
        for p in range(self.processes):
            summary, self.summaries[p] = self.summaries[p], WindowSummary()
            summary.measure(*self.flights[p].take(0.0 if lag is None else lag(p, summary)))
            entries.append(f"p{p}|{summary.encode()}")
        return entries


def uniform_100ms(rng: random.Random) -> float:
    return rng.uniform(0.05, 0.15)


def closed_loop(fleet: Fleet, clients: int) -> Callable[[], None]:
    """`clients` in a closed loop across the fleet: each finished request is followed at
    once by the next (the fleet holds exactly `clients` in flight)."""
    for _ in range(clients):
        fleet.admit()
    return fleet.admit


# --- one process -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8, 40])
def test_one_process_under_closed_loop_load_of_n_reads_n(n: int) -> None:
    """N clients that each send the next request when the last ends: N in flight at all
    times, and every window reads N, whatever the lag (its mean service time)."""
    fleet = Fleet(1, uniform_100ms, seed=n)
    again = closed_loop(fleet, n)
    for w in range(1, 41):
        fleet.run(w * WINDOW_S, again)
        summary = fleet.summaries[0]
        fleet.summaries[0] = WindowSummary()
        summary.measure(*fleet.flights[0].take(summary.lag()))
        assert summary.mean_in_flight == pytest.approx(n, rel=1e-9)
        assert summary.max_in_flight == n


def test_poisson_arrivals_read_the_time_average_not_one_more() -> None:
    """Open Poisson arrivals, 50 a second of 100 ms: 5 in flight on average. Each window
    reads the exact time average of its stretch; the mean at admissions (the old
    measure) reads one more, every request counting itself."""
    fleet = Fleet(1, uniform_100ms, seed=7)
    rate, windows = 50.0, 400
    arrival = fleet.rng.expovariate(rate)
    new: list[float] = []
    old: list[tuple[float, int]] = []
    true: list[float] = []
    for w in range(1, windows + 1):
        end = w * WINDOW_S
        arrival = poisson_until(fleet, arrival, rate, end)
        summary = fleet.summaries[0]
        fleet.summaries[0] = WindowSummary()
        # Not measured yet: the mean at admissions, weighted by its requests.
        old.append((summary.mean_in_flight * summary.count, summary.count))
        summary.measure(*fleet.flights[0].take())
        new.append(summary.mean_in_flight)
        true.append(fleet.truth() / WINDOW_S)
    assert new == pytest.approx(true, rel=1e-9)
    average = statistics.mean(true)
    assert average == pytest.approx(5.0, rel=0.05)
    at_admission = sum(total for total, _ in old) / sum(n for _, n in old)
    assert at_admission == pytest.approx(average + 1.0, abs=0.1)


def poisson_until(fleet: Fleet, arrival: float, rate: float, end: float) -> float:
    """Admit the fleet's Poisson arrivals (`rate` a second) from `arrival` up to `end`, run
    it to `end`; returns the next arrival."""
    while arrival <= end:
        fleet.run(arrival)
        fleet.admit()
        arrival += fleet.rng.expovariate(rate)
    fleet.run(end)
    return arrival


def test_the_lag_moves_the_stretch_back_and_loses_no_second() -> None:
    """Takes with varying lags: each stretch starts where the last one ended, so over
    the run the areas and the spans add up to the whole (less the last take's lag)."""
    fleet = Fleet(1, uniform_100ms, seed=3)
    rate = 80.0
    arrival = fleet.rng.expovariate(rate)
    lags = random.Random(5)
    area = span = 0.0
    for w in range(1, 201):
        end = w * WINDOW_S
        arrival = poisson_until(fleet, arrival, rate, end)
        a, s = fleet.flights[0].take(lags.uniform(0.0, 0.3))
        area, span = area + a, span + s
    rest_area, rest_span = fleet.flights[0].take(0.0)  # what the last lag kept back
    assert area + rest_area == pytest.approx(fleet.truth(), rel=1e-9)
    assert span + rest_span == pytest.approx(200 * WINDOW_S, rel=1e-9)


def test_in_flight_counts_each_request_from_admission_to_finish() -> None:
    clock = [10.0]
    flight = InFlight(lambda: clock[0])
    assert flight.admit(10.0) == 1
    assert flight.admit(10.5) == 2
    flight.finish(11.0)
    assert flight.running == 1
    clock[0] = 12.0
    # 1 for 0.5 s, 2 for 0.5 s, 1 for 1 s: 2.5 in-flight seconds over 2 s.
    assert flight.take() == pytest.approx((2.5, 2.0))
    # A take moved back by 0.5 s keeps that for the next one (1 in flight throughout).
    assert flight.take(0.5, now=13.0) == pytest.approx((0.5, 0.5))
    assert flight.take(0.0, now=13.0) == pytest.approx((0.5, 0.5))


def test_the_estimator_reads_its_window_from_the_meter() -> None:
    """`LimitEstimator` with a meter steps on the time average (a closed loop of 6: 6),
    moved back by its window's mean service time."""
    fleet = Fleet(1, uniform_100ms, seed=2)
    estimator = LimitEstimator(LimitConfig(initial=6, min_samples=5), 0.0, fleet.flights[0])
    fleet.observers.append(estimator.observe)
    seen: list[float] = []
    real = WindowSummary.measure

    def spy(self: WindowSummary, area: float, span: float) -> None:
        real(self, area, span)
        seen.append(self.mean_in_flight)

    again = closed_loop(fleet, 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WindowSummary, "measure", spy)
        for w in range(1, 11):
            fleet.run(w * WINDOW_S, again)
            estimator.poll(fleet.now)
    assert len(seen) == 10
    assert seen == pytest.approx([6.0] * 10, rel=1e-9)


# --- a fleet ---------------------------------------------------------------------------


@pytest.mark.parametrize("spread", ["random", "round-robin"])
@pytest.mark.parametrize(("processes", "clients"), [(4, 10), (5, 10), (4, 40)])
def test_a_fleet_sums_to_its_true_in_flight(processes: int, clients: int, spread: str) -> None:
    """A fleet holding exactly `clients` in flight, spread over its processes at random
    or in turn: each process pushes twice a window and the step adds the processes up
    (`fleet_window`). The sum is the fleet's in flight, every window; the mean at
    admissions read about one more per process beyond the first when spread at random
    (13.1 for 10 over four processes)."""
    fleet = Fleet(processes, uniform_100ms, spread=spread, seed=processes * clients)
    again = closed_loop(fleet, clients)
    new, old = [], []
    for w in range(1, 41):
        entries = []
        for half in (1, 2):
            fleet.run((w - 1) * WINDOW_S + half * PUSH_S, again)
            old.append(sum(s.mean_in_flight for s in fleet.summaries if not s.empty))
            entries += fleet.push()
        merged, parts = fleet_window(entries)
        assert len(parts) == processes
        new.append(merged.mean_in_flight)
    assert new == pytest.approx([float(clients)] * len(new), rel=1e-9)
    if spread == "random":  # the old measure: the figure this must not read
        assert statistics.mean(old) > clients + 0.5 * (processes - 1)


def test_a_fleet_with_the_lag_reads_its_in_flight_on_average() -> None:
    """As the learner pushes (each process's lag smoothed, `fleet_lag`), processes
    reading their in flight one smoothed service time back: every window within 5% of
    the fleet's 10, and their mean within 1%."""
    fleet = Fleet(4, uniform_100ms, spread="random", seed=11)
    again = closed_loop(fleet, 10)
    lags = [0.0] * 4

    def lag(p: int, summary: WindowSummary) -> float:
        lags[p] = fleet_lag(lags[p], summary)
        return lags[p]

    new = []
    for w in range(1, 201):
        entries = []
        for half in (1, 2):
            fleet.run((w - 1) * WINDOW_S + half * PUSH_S, again)
            entries += fleet.push(lag)
        new.append(fleet_window(entries)[0].mean_in_flight)
    steady = new[4:]
    assert statistics.mean(steady) == pytest.approx(10.0, rel=0.01)
    assert all(9.5 <= value <= 10.5 for value in steady), (min(steady), max(steady))


def test_a_quiet_process_pushes_and_counts_as_quiet() -> None:
    """A process with nothing in flight for half the window pushes an empty summary:
    pooled, its mean over the window is half its busy half's."""
    busy, quiet = WindowSummary(), WindowSummary()
    busy.add(Sample(0.2, False, 4))
    busy.measure(1.0, 0.25)  # 4 in flight for the half window
    quiet.measure(0.0, 0.25)
    merged, _ = fleet_window([f"a|{busy.encode()}", f"a|{quiet.encode()}"])
    assert merged.mean_in_flight == pytest.approx(2.0)
    assert merged.count == 1
