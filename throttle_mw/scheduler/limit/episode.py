"""An overload episode: the memory that tells a queue from slower work.

A queue inside the app delays a request by the work ahead of it, so cutting the
limit shortens it: the latency falls with the in flight. Slower work (a slower
database, a bigger payload) does not: below the app's slots, the latency stays
where it is whatever the limit. An `Episode` anchors the first settled overload
window, and the rule (``estimator.step``) checks each later window against the
queue's prediction. When a window's latency is not explained, it holds the limit
for a second look (`DOUBT`); if that is not explained either, it runs a test
instead of cutting further: `REFERENCE`, measure at the limit where the doubt
arose; `RAISED`, measure one step higher. A queue would have grown with the raise
(Little's law says by how much); slower work does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from .constants import QUANTILE, TEST_SHARE
from .summary import WindowSummary
from .wire import natural, number

#: Stages of an episode.
CUTTING: Final = 0  # cutting while the latency follows the in flight
DOUBT: Final = 1  # one window's latency did not follow: holding for a second look
REFERENCE: Final = 2  # two in a row: measuring at the limit where the doubt arose
RAISED: Final = 3  # ... then at a limit one step higher


@dataclass(frozen=True)
class Measure:
    """A test stage's measurement pooled over `samples` requests: their mean in flight,
    the geometric means of the windows' median and of their fastest TEST_SHARE's mean
    latency (`low_s`), and the mean of their spread (mean latency / `low_s`), each
    window weighted by its requests."""

    samples: int
    in_flight: float
    median_s: float
    low_s: float
    spread: float

    @classmethod
    def of(cls, summary: WindowSummary) -> Measure:
        low = summary.mean(TEST_SHARE)
        n = summary.count - summary.failures
        return cls(n, summary.mean_in_flight, summary.quantile(QUANTILE), low, summary.mean() / low)

    def plus(self, other: Measure) -> Measure:
        n = self.samples + other.samples
        w = other.samples / n

        def geo(a: float, b: float) -> float:
            return math.exp(math.log(a) + w * (math.log(b) - math.log(a)))

        return Measure(
            n,
            self.in_flight + w * (other.in_flight - self.in_flight),
            geo(self.median_s, other.median_s),
            geo(self.low_s, other.low_s),
            self.spread + w * (other.spread - self.spread),
        )

    def fields(self) -> list[str]:
        values = (self.in_flight, self.median_s, self.low_s, self.spread)
        return [str(self.samples), *map(repr, values)]

    @classmethod
    def parse(cls, fields: list[str]) -> Measure | None:
        samples = natural(fields[0])
        in_flight, median_s, low_s, spread = map(number, fields[1:])
        if samples == 0:
            return None
        if min(in_flight, median_s, low_s, spread) <= 0.0:
            raise ValueError("not a measurement")
        return cls(samples, in_flight, median_s, low_s, spread)


_NONE: Final = ["0", "0.0", "0.0", "0.0", "0.0"]


@dataclass(frozen=True)
class Episode:
    """An overload episode under way.

    `anchor_in_flight` and `anchor_s` are the mean in flight and median of the
    episode's anchor window (0.0 until one is set: the episode's first window is none,
    its queue was still building); `windows` counts its overload windows (while
    RAISED: the windows waited for the raise to show). During a test, `measure` pools
    the current stage's windows and `reference` holds the REFERENCE stage's result.
    """

    stage: int
    anchor_in_flight: float = 0.0
    anchor_s: float = 0.0
    measure: Measure | None = None
    reference: Measure | None = None
    windows: int = 0

    def fields(self) -> list[str]:
        """The `EPISODE_FIELDS` fields of the limit state's wire form."""
        head = [str(self.stage), str(self.windows)]
        head += [repr(self.anchor_in_flight), repr(self.anchor_s)]
        measure = self.measure.fields() if self.measure else _NONE
        reference = self.reference.fields() if self.reference else _NONE
        return head + measure + reference

    @classmethod
    def parse(cls, fields: list[str]) -> Episode:
        stage, windows = natural(fields[0]), natural(fields[1])
        anchor_in_flight, anchor_s = number(fields[2]), number(fields[3])
        if stage > RAISED or (anchor_s > 0.0) != (anchor_in_flight > 0.0):
            raise ValueError("not an overload episode")
        measure, reference = Measure.parse(fields[4:9]), Measure.parse(fields[9:14])
        if (reference is None) != (stage != RAISED):
            raise ValueError("not an overload episode")
        return cls(stage, anchor_in_flight, anchor_s, measure, reference, windows)


#: Fields `Episode.fields` writes.
EPISODE_FIELDS: Final = 14
