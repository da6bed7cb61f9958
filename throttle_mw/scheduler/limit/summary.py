"""One window's samples, summarised: mergeable, compact on the wire, cheap to add to.

`WindowSummary.add` runs once per finished request (the hot path): one `bisect`
on precomputed bucket edges and a few counter updates (about 300 ns). The window's
mean in flight is not kept there: it is the process's in flight integrated over the
window's time (`flight.InFlight`), given when the window closes (`measure`). The
fleet sends each process's window summary to the process that takes the fleet's
step, which merges them; `encode` / `decode` are that wire form. How many of the
window's requests waited for the limit (`waited`) is not in it: it travels beside it
(see `encode`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Final

from .sample import Sample
from .wire import natural, number

#: The latency histogram's buckets: geometric, each `BUCKET_RATIO` wider than the
#: last, from `BUCKET_MIN_S` to `BUCKET_MAX_S`. Bucket 0 holds what is faster than
#: the first edge, the last bucket what is slower than the last edge.
BUCKET_MIN_S: Final = 1e-4
BUCKET_MAX_S: Final = 60.0
BUCKET_RATIO: Final = 1.1
_EDGE_COUNT: Final = math.ceil(math.log(BUCKET_MAX_S / BUCKET_MIN_S) / math.log(BUCKET_RATIO)) + 1
#: Upper edges of buckets 0 .. len-1; bucket i holds [EDGES[i-1], EDGES[i]).
EDGES: Final[tuple[float, ...]] = tuple(BUCKET_MIN_S * BUCKET_RATIO**i for i in range(_EDGE_COUNT))
BUCKETS: Final = len(EDGES) + 1
_LOG_RATIO: Final = math.log(BUCKET_RATIO)
#: Where a bucket's samples are taken to be: its geometric middle (the first and last
#: buckets, open-ended, at their one edge).
_MIDDLES: Final = (
    EDGES[0],
    *(EDGES[i - 1] * math.sqrt(BUCKET_RATIO) for i in range(1, len(EDGES))),
    EDGES[-1],
)

#: Wire format version, the first field of `encode`'s text.
_VERSION: Final = "1"


class WindowSummary:
    """Counts, failures, a latency histogram, the in flight (most and mean) and the
    requests that waited for the limit of one window.

    The histogram holds the service times of the requests that did *not* fail:
    a failure's duration says how it failed (a fast 500, a slow timeout), not
    how long the app takes to serve, and failures have their own count.
    """

    __slots__ = (
        "_area",
        "_count",
        "_failures",
        "_hist",
        "_in_flight_sum",
        "_max_in_flight",
        "_merged_count",
        "_merged_in_flight",
        "_parts",
        "_pooled",
        "_span",
        "_waited",
    )

    def __init__(self) -> None:
        self._hist = [0] * BUCKETS
        self._count = 0
        self._failures = 0
        self._waited = 0
        self._max_in_flight = 0
        #: In flight at admission summed over this summary's own samples (those not
        #: merged in): the mean in flight of a summary whose window was not measured.
        self._in_flight_sum = 0.0
        #: The process's in flight integrated over the window (in-flight seconds), and
        #: the window's length in seconds (`measure`; -1.0: not measured).
        self._area = 0.0
        self._span = -1.0
        #: A decoded or pooled summary's mean in flight: the sum of its parts' means
        #: over their number (0: neither).
        self._pooled = 0.0
        self._parts = 0
        #: Samples merged in from other summaries, and the sum of their mean in flight.
        self._merged_count = 0
        self._merged_in_flight = 0.0

    # --- the hot path ---------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        """Count one finished request."""
        self._count += 1
        if sample.failed:
            self._failures += 1
        else:
            self._hist[bisect_right(EDGES, sample.service_s)] += 1
        if sample.waited:
            self._waited += 1
        self._in_flight_sum += sample.in_flight
        if sample.in_flight > self._max_in_flight:
            self._max_in_flight = sample.in_flight

    def add_waited(self, n: int) -> None:
        """`n` more of this window's requests waited for the limit: the count that
        travels beside the wire text (`encode`)."""
        self._waited += n

    def measure(self, area_s: float, span_s: float) -> None:
        """The process's in flight over (more of) this window: `area_s` in-flight
        seconds over `span_s` seconds (`InFlight.take`). A window kept open adds up."""
        self._area += area_s
        self._span = max(self._span, 0.0) + span_s

    # --- reading --------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Finished requests, failed or not."""
        return self._count

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def waited(self) -> int:
        """Requests that were queued for the limit before their admission
        (`Sample.waited`), failed or not."""
        return self._waited

    @property
    def max_in_flight(self) -> int:
        """The most in flight at an admission; after `merge`, the sum of the parts'
        maxima: an upper bound of the fleet's in flight (the parts' peaks need not
        coincide)."""
        return self._max_in_flight

    @property
    def mean_in_flight(self) -> float:
        """The process's mean in flight over the window, weighted by time (`measure`):
        the load its requests' service times were measured at. After `merge`, the sum
        of the parts' means: the fleet's in flight, as each part is one process's over
        (about) the same stretch of time.

        A summary whose window was not measured (samples alone) falls back to the mean
        in flight at its requests' admissions, which reads high: each request counts
        itself, and arrivals see more than the time average (Poisson arrivals: one
        more).
        """
        if self._parts:
            own = self._pooled / self._parts
        elif self._span >= 0.0:
            own = self._area / self._span if self._span > 0.0 else 0.0
        else:
            n = self._count - self._merged_count
            own = self._in_flight_sum / n if n else 0.0
        return own + self._merged_in_flight

    @property
    def empty(self) -> bool:
        return self._count == 0

    def quantile(self, q: float) -> float:
        """The `q`-quantile of the successful requests' service times, in seconds.

        Exact to the bucket, and interpolated geometrically within it by rank.
        Raises ValueError if no request succeeded, or `q` is outside [0, 1].
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        total = self._count - self._failures
        if total == 0:
            raise ValueError("no successful samples")
        rank = max(q * total, 0.5)  # q = 0: the first sample's bucket
        seen = 0
        for i, n in enumerate(self._hist):
            if n and seen + n >= rank:
                if i == 0:
                    return EDGES[0]
                if i == BUCKETS - 1:
                    return EDGES[-1]
                return EDGES[i - 1] * math.exp(_LOG_RATIO * (rank - seen) / n)
            seen += n
        raise AssertionError("unreachable: the histogram holds `total` samples")

    def lag(self) -> float:
        """How long before they finished this window's requests were admitted: their
        mean service time (`mean`; 0.0 if none succeeded). `InFlight.take` moves the
        window's in flight back by it."""
        return self.mean() if self._count > self._failures else 0.0

    def mean(self, fastest: float = 1.0) -> float:
        """The mean service time in seconds of the `fastest` share of the successful
        requests (1.0: all of them), from the histogram: each bucket at its geometric
        middle, so within 5%. ValueError if none succeeded."""
        total = self._count - self._failures
        if total == 0:
            raise ValueError("no successful samples")
        left = max(fastest * total, 1.0)
        weighted = 0.0
        for i, n in enumerate(self._hist):
            if n:
                take = min(n, left)
                weighted += take * _MIDDLES[i]
                left -= take
                if left <= 0.0:
                    break
        return weighted / max(fastest * total, 1.0)

    # --- combining and the wire -----------------------------------------------------

    def pool(self, other: WindowSummary) -> None:
        """Add `other`'s samples to this summary (in place) as more of the same
        process's: `max_in_flight` is the larger, `mean_in_flight` the mean of the
        parts' means, each part (or part pooled before) weighing as one. A process
        pushes one part each half window, whatever its traffic (`FleetLearner.flush`):
        equal stretches of time, so that mean is its mean over all of them. Both must be
        one process's (not results of `merge`)."""
        ours, theirs = max(self._parts, 1), max(other._parts, 1)
        pooled = self.mean_in_flight * ours + other.mean_in_flight * theirs
        self._add_counts(other)
        self._max_in_flight = max(self._max_in_flight, other._max_in_flight)
        self._pooled, self._parts = pooled, ours + theirs
        self._in_flight_sum, self._area, self._span = 0.0, 0.0, -1.0
        self._merged_count, self._merged_in_flight = 0, 0.0

    def merge(self, other: WindowSummary) -> None:
        """Add `other`'s samples to this summary (in place). `max_in_flight` and
        `mean_in_flight` add up: the parts are different processes, in flight at once
        (pool one process's parts first: `pool`)."""
        self._merged_in_flight += other.mean_in_flight
        self._merged_count += other._count
        self._add_counts(other)
        self._max_in_flight += other._max_in_flight

    def _add_counts(self, other: WindowSummary) -> None:
        hist = self._hist
        for i, n in enumerate(other._hist):
            if n:
                hist[i] += n
        self._count += other._count
        self._failures += other._failures
        self._waited += other._waited

    def encode(self) -> str:
        """Compact ASCII: ``1,count,failures,max_in_flight,mean_in_flight`` then
        ``,bucket:n`` for each non-empty bucket. No spaces, '|', ';' or newlines.

        Version 1 since the in flight became time-weighted: the field is the process's
        in flight, which every version's merge sums, so a fleet of old and new
        processes during a rolling deploy keeps stepping on every process's summary
        (an old process's figure still reads high, as it did).

        `waited` is not in the text: version 1's parser rejects any field it does not
        know (a trailing one too), and processes of an older build may read it during a
        rolling deploy. The fleet carries it beside (learner.py, ``P:lq``); a decoded
        summary has none until `add_waited`."""
        parts = [
            _VERSION,
            str(self._count),
            str(self._failures),
            str(self._max_in_flight),
            repr(self.mean_in_flight),
        ]
        parts.extend(f"{i}:{n}" for i, n in enumerate(self._hist) if n)
        return ",".join(parts)

    @classmethod
    def decode(cls, text: str) -> WindowSummary:
        """The summary `encode` wrote; ValueError("not a window summary: ...") for
        anything else."""
        try:
            return cls._parse(text)
        except ValueError as exc:
            raise ValueError(f"not a window summary: {text[:40]!r} ({exc})") from None

    @classmethod
    def _parse(cls, text: str) -> WindowSummary:
        fields = text.split(",")
        if len(fields) < 5 or fields[0] != _VERSION:
            raise ValueError("unknown version or too few fields")
        summary = cls()
        count, failures, peak = (natural(f) for f in fields[1:4])
        mean = number(fields[4])
        if failures > count:
            raise ValueError("more failures than samples")
        last, total = -1, 0
        for pair in fields[5:]:
            index, sep, n = pair.partition(":")
            i, k = natural(index), natural(n) if sep else 0
            if not last < i < BUCKETS or k == 0:
                raise ValueError(f"bad histogram bucket {pair[:20]!r}")
            summary._hist[i] = k
            last, total = i, total + k
        if total != count - failures:
            raise ValueError("the histogram does not hold the successful samples")
        summary._count, summary._failures, summary._max_in_flight = count, failures, peak
        summary._pooled, summary._parts = mean, 1
        return summary

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowSummary):
            return NotImplemented
        return self._key() == other._key()

    def _key(self) -> tuple[int, int, int, int, float, list[int]]:
        return (
            self._count,
            self._failures,
            self._waited,
            self._max_in_flight,
            self.mean_in_flight,
            self._hist,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"WindowSummary(count={self._count}, failures={self._failures}, "
            f"waited={self._waited}, max_in_flight={self._max_in_flight})"
        )
