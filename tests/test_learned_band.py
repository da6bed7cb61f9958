"""The fleet test's band check (tests/test_e2e_learned.py) over synthetic traces: a shift
test's planned raise (the state says so) is not a departure; any other excursion is.

The traces are the fleet's stored limit states, as the test's watcher reads them each
0.25 s, for the 8-slot app with a baseline of 105 ms: a band of 8 to 13
(`learned_band`). Pure: no server, no clock.
"""

from __future__ import annotations

from tests.test_e2e_learned import SLOTS, Sampled, band_departures, learned_band, raised_band
from throttle_mw.scheduler.limit import LimitConfig, LimitState
from throttle_mw.scheduler.limit.constants import SHIFT_RAISE
from throttle_mw.scheduler.limit.episode import CUTTING, RAISED, REFERENCE, Episode, Measure

BASELINE = 0.105
BAND = learned_band(SLOTS, BASELINE)
#: The reference stage's measure, then the raised stage's limit: what `estimator._test`
#: sets from a reference limit at the band's top.
REFERENCE_LIMIT = 12.6
MEASURE = Measure(100, 12.0, 0.16, 0.12, 1.2)
RAISED_LIMIT = LimitConfig().clamp(max(REFERENCE_LIMIT * SHIFT_RAISE, REFERENCE_LIMIT + 1.0))


def _state(limit: float, reason: str, episode: Episode | None = None) -> str:
    return LimitState(limit, BASELINE, reason, 1, episode=episode).encode()  # type: ignore[arg-type]


def _trace(*steps: tuple[float, str, Episode | None], each: int = 2) -> list[Sampled]:
    """Each step's state read `each` times, 0.25 s apart, from 15 s."""
    out: list[Sampled] = []
    for limit, reason, episode in steps:
        state = _state(limit, reason, episode)
        for _ in range(each):
            out.append((15.0 + 0.25 * len(out), LimitState.decode(state).in_force, state, BAND))
    return out


def _old_check(trace: list[Sampled]) -> bool:
    """The band check as it was: every limit within its band."""
    return all(low <= n <= high for _, n, _, (low, high) in trace)


ANCHOR = Episode(CUTTING, 12.0, 0.16, windows=3)
REFERENCE_STAGE = Episode(REFERENCE, 12.0, 0.16, measure=MEASURE)
RAISED_STAGE = Episode(RAISED, 12.0, 0.16, reference=MEASURE)
#: Hold, a test's reference stage, its raised stage (a test that cannot tell runs a
#: second one: back to the reference's limit, raised again), the verdict's cut, hold.
WITH_RAISE = _trace(
    (12.0, "hold", None),
    (REFERENCE_LIMIT, "shift-test", REFERENCE_STAGE),
    (RAISED_LIMIT, "shift-test", RAISED_STAGE),
    (REFERENCE_LIMIT, "shift-test", Episode(REFERENCE)),
    (RAISED_LIMIT, "shift-test", Episode(RAISED, reference=MEASURE)),
    (RAISED_LIMIT * 0.9, "overload", ANCHOR),
    (12.0, "hold", None),
)


def test_the_raise_leaves_the_band() -> None:
    assert BAND == (8, 13)
    assert round(RAISED_LIMIT) == 14  # 12.6 * 1.15 = 14.49


def test_the_old_check_fails_on_a_planned_raise_and_the_new_one_does_not() -> None:
    assert not _old_check(WITH_RAISE)
    assert band_departures(WITH_RAISE) == []


def test_a_real_departure_still_fails() -> None:
    # The same limit as the raise, but the rule grew or held there: out of band.
    for reason, episode in (("grow", None), ("hold", None), ("overload", ANCHOR)):
        trace = _trace((12.0, "hold", None), (RAISED_LIMIT, reason, episode))
        assert [(n, why) for _, n, _, why in band_departures(trace)] == [(14, reason)] * 2
    # A shift test's other stages have no room: the reference stage, the doubt.
    trace = _trace((RAISED_LIMIT, "shift-test", REFERENCE_STAGE))
    assert len(band_departures(trace)) == 2
    # Below the band in a raise: a departure.
    trace = _trace((7.0, "shift-test", RAISED_STAGE))
    assert len(band_departures(trace)) == 2
    # Above what a raise from the band can reach: a departure, raise or not.
    top = raised_band(BAND)[1]
    assert top == 16  # (13.5 * 1.15 = 15.525: in force 16)
    assert band_departures(_trace((top - 0.4, "shift-test", RAISED_STAGE))) == []
    assert len(band_departures(_trace((top + 0.6, "shift-test", RAISED_STAGE)))) == 2
    # No state read (none stored yet): the plain band.
    assert len(band_departures([(15.0, 14, None, BAND)])) == 1
