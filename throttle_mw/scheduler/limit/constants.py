"""The learned limit's tuning, written once. The scheduler README ("The learned
limit") derives each rule these numbers belong to."""

from __future__ import annotations

from typing import Final

# --- the window's statistic and the bands -------------------------------------------

#: The window's statistic: its median service time. The baseline is a median too, so
#: their ratio r does not depend on the shape of the service-time distribution.
QUANTILE: Final = 0.5
#: The limit aims at r = TARGET: about TARGET times the app's slots when the median is
#: near the mean (a queue of a fifth of the slots inside the app).
TARGET: Final = 1.2
#: r above CUT_ABOVE is overload (cut); below GROW_BELOW, room to grow; between, hold.
CUT_ABOVE: Final = 1.35
GROW_BELOW: Final = 1.15
#: Decisions need confidence: cut only if the median's lower bound, DECISION_Z standard
#: errors below it, is above CUT_ABOVE; grow only if its upper bound is below
#: GROW_BELOW. A window too noisy to tell holds.
DECISION_Z: Final = 1.0

# --- steps ---------------------------------------------------------------------------

#: A latency cut moves the limit this share of the way to its target ...
CUT_SMOOTHING: Final = 0.5
#: ... and never below this multiple of the limit in one step; nor below
#: STEP_DOWN_DOUBT times it when the latency sits above what a queue predicts from the
#: episode's anchor (the cuts explain it less and less: see the shift test below).
STEP_DOWN_MIN: Final = 0.9
STEP_DOWN_DOUBT: Final = 0.95
#: Growth per step: at most GROW_MAX times the limit (and at least one more); RAMP
#: times when the previous step grew too and the median is still below the baseline
#: (a slow start: the limit is still far below the slots, as at a cold start).
GROW_MAX: Final = 1.25
RAMP: Final = 1.5
#: The limit is in use in a window whose most in flight reached it and whose mean in
#: flight (at admissions) reached this share of it: only then may it grow.
IN_USE_SHARE: Final = 0.75
#: ... or, short of that, in a window where this share of the requests or more waited
#: in the throttle's queue for it (and the in flight reached it at least once): the
#: limit, not demand, held the app back, though the app's own in flight reads low
#: (a fleet's slot is held in Redis longer than in the app: the grant's trip, the
#: release's batching). The bar IN_USE_SHARE sets, read at the queue: a limit of L
#: held at 75% by Poisson arrivals has this share of them wait (Erlang C) about 0.51
#: at L = 4, 0.36 at 8, 0.27 at 12, 0.21 at 16. A quarter is that bar for a limit of
#: about 12, the size where a fleet of a few processes needs its limit (two slots a
#: process for kept slots); a half held four processes of 1 ms at 6 (the scheduler
#: README, "Or held back").
WAITED_SHARE: Final = 0.25
#: A window whose failures reach this share (and FAILURE_MIN_COUNT) cuts by FAILURE_CUT.
FAILURE_SHARE: Final = 0.1
FAILURE_MIN_COUNT: Final = 3
FAILURE_CUT: Final = 0.8

# --- the baseline --------------------------------------------------------------------

#: A window's baseline candidate is an upper confidence bound of its median, this many
#: standard errors above it: a minimum over many noisy window medians would sink to
#: the luckiest window and read every later window as overload.
BASELINE_Z: Final = 1.0
#: The first baseline needs this many successful requests; later, a window lowers the
#: baseline toward its candidate by its share of this many.
BASELINE_SAMPLES: Final = 100
#: A window in which in flight stays at or below this share of the limit cannot have
#: queued (the limit sits near the slots): its candidate pulls the baseline up, with
#: this time constant in seconds.
UNUSED_SHARE: Final = 0.5
BASELINE_DECAY_S: Final = 30.0

# --- telling a queue from slower work (see episode.py) -------------------------------

#: A median (its lower bound) this much above the episode's anchor moves the anchor up (its queue is
#: still building); so does, in its first ONSET_WINDOWS windows, a median per request
#: in flight above the anchor's (a queue builds up over about one latency, while the
#: cuts already lower the in flight).
REANCHOR: Final = 0.05
ONSET_WINDOWS: Final = 2
#: Doubt a window whose median is more than SHIFT_MARGIN above what a queue predicts
#: from the anchor, once the in flight is down to SHIFT_DEPTH of the anchor's; two such
#: windows in a row start a test.
SHIFT_MARGIN: Final = 0.1
SHIFT_DEPTH: Final = 0.85
#: The test: TEST_SAMPLES requests at the suspected limit, then as many at SHIFT_RAISE
#: times it, comparing the mean latency of their fastest TEST_SHARE (a queue delays
#: the fastest requests as much as any; their mean is a steadier measure than a low
#: quantile, and free of the slow tail).
SHIFT_RAISE: Final = 1.15
TEST_SAMPLES: Final = 100
#: Windows the raised stage waits for the in flight to follow the raise (the load may
#: not fill it) before it gives the test up and goes back to cutting.
RAISE_WAIT: Final = 4
TEST_SHARE: Final = 0.5
#: The verdict reads the rise of the fastest requests as a share of what a queue predicts
#: (a queue: about 1; slower work: about 0). One test's share has this standard deviation
#: from its stages' noise alone: 0.25-0.34 (0.30 overall) over 208 tests of slower work on
#: the simulated app, with 114-285 requests a stage (not less with more: a larger app's
#: in flight follows the raise less, so the prediction shrinks with the noise), and 0.34
#: over its 10 tests of a queue (docs/performance.md, branch shiftfix). Slower work only
#: when the share is below a half by DECISION_Z of it; a queue only when above by as much;
#: in between the test cannot tell: it runs once more from the reference's limit, and the
#: second judges the mean of both tests' shares (their noise SHIFT_NOISE / sqrt(2)); if
#: that cannot tell either, it cuts gently (STEP_DOWN_DOUBT), as for a queue.
SHIFT_NOISE: Final = 0.3
