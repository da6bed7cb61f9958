"""The shift test's verdicts on the simulated app, and what a queue taken for slower work costs.

    python bench/learnedshift.py verdicts --seeds 1-60
    python bench/learnedshift.py harm --seeds 1-20
    python bench/learnedshift.py learning --seeds 1-20

The harness is the estimator's own (`tests/support/app_model.py`, the scenarios of
`tests/test_limit_estimator.py`): at 30 s the app's slots halve (a queue) or its work
doubles (slower work); c = 8 and 32; one process, or four with the requests spread at
random; uniform and lognormal work; load 2.5x the capacity.

- ``verdicts``: every shift test's share (`estimator._verdict` wrapped), first or second
  test, and what it decided; ``--order random``: the app serves its own queue in random
  order, not first come, first served.
- ``harm``: the queue scenario, its first verdict after the halving forced to "slower
  work" (the baseline moves to the reference's median, as a real one does), against
  the same seed left alone; each second's median latency over the bare work's median,
  and how long the limit stays above 1.5 times the slots left.
- ``learning``: the slower-work scenario (seeds 1-20, 60 s): lowest limit / c, mean
  limit over 45-60 s / c (shiftfix's table).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.app_model import AppModel, Item
from throttle_mw.scheduler.limit import LimitState
from throttle_mw.scheduler.limit import estimator as est

MEAN_S = {8: 0.1, 32: 0.1}
LOAD = 2.5


class Timed(AppModel):
    """The app model, keeping each finished request's (finish time, latency)."""

    def __post_init__(self) -> None:
        self.latencies: list[tuple[float, float]] = []
        super().__post_init__()

    def _done(self, now: float, item: Item) -> None:
        self.latencies.append((now, now - item[0]))
        super()._done(now, item)


def model(c: int, seed: int, kind: str, jitter: str, processes: int, order: str = "fifo") -> Timed:
    mean = MEAN_S[c]
    slots = ((0.0, c), (30.0, c // 2)) if kind == "queue" else ((0.0, c),)
    mean_s = ((0.0, mean), (30.0, 2 * mean)) if kind == "slower" else ((0.0, mean),)
    return Timed(
        slots=slots,
        mean_s=mean_s,
        load=((0.0, LOAD * c / mean),),
        jitter=jitter,  # type: ignore[arg-type]
        seed=seed,
        processes=processes,
        spread="random",
        order=order,  # type: ignore[arg-type]
    )


Verdict = dict[str, Any]


@contextmanager
def recorded(force_shift_after: float | None = None) -> Iterator[list[Verdict]]:
    """Record every verdict; with `force_shift_after`, the first verdict at or after
    that time says slower work whatever its share."""
    verdicts: list[Verdict] = []
    original = est._verdict
    current = _CURRENT
    current["forced"] = False

    def wrapped(config, window, limit, baseline, steps, episode, reference, raised, carried=None):  # type: ignore[no-untyped-def]
        queue_rise = (raised.in_flight / reference.in_flight - 1.0) * reference.spread
        share = math.log(raised.low_s / reference.low_s) / queue_rise
        # The same question of every request's mean (Little's law holds for it in any
        # service order): a queue's mean rises by the in flight's ratio, slower work's not.
        rho = raised.in_flight / reference.in_flight
        mean_rise = math.log(raised.low_s * raised.spread / (reference.low_s * reference.spread))
        share_mean = mean_rise / math.log(rho)
        now = current["model"].now
        if force_shift_after is not None and now >= force_shift_after and not current.get("forced"):
            current["forced"] = True
            new = LimitState(limit, reference.median_s, "shift", steps)
        else:
            extra = () if carried is None else (carried,)  # main's has no such argument
            new = original(
                config, window, limit, baseline, steps, episode, reference, raised, *extra
            )
        first = episode.anchor_s > 0.0
        verdicts.append(
            {"t": now, "first": first, "share": share, "share_mean": share_mean,
             "first_share": carried, "reason": new.reason,
             "again": new.reason == "shift-test", "limit": limit}
        )  # fmt: skip
        return new

    est._verdict = wrapped
    try:
        yield verdicts
    finally:
        est._verdict = original


_CURRENT: dict[str, Any] = {}


def run(
    args: tuple[int, int, str, str, int] | tuple[int, int, str, str, int, str],
    until: float,
    force: float | None = None,
) -> tuple[Timed, list[Verdict]]:
    """The model of `args` (c, seed, kind, jitter, processes) run to `until`."""
    with recorded(force) as verdicts:
        m = model(*args)
        _CURRENT["model"] = m  # the wrapper reads the model's clock
        m.run(until)
    return m, verdicts


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


SCENARIOS = [(c, jitter, p) for c in (8, 32) for jitter in ("uniform", "lognormal") for p in (1, 4)]


def verdicts_cmd(seeds: list[int], until: float = 60.0, order: str = "fifo") -> None:
    out: dict[str, list[Verdict]] = {"queue": [], "slower": []}
    for kind in ("queue", "slower"):
        for c, jitter, p in SCENARIOS:
            for seed in seeds:
                _, vs = run((c, seed, kind, jitter, p, order), until)
                for v in vs:
                    if v["t"] >= 30.0:
                        v.update(c=c, jitter=jitter, p=p, seed=seed)
                        out[kind].append(v)
    for kind, vs in out.items():
        print(f"\n{kind}: {len(vs)} verdicts after 30 s")
        for first in (True, False):
            sel = [v for v in vs if v["first"] == first]
            counts: dict[str, int] = {}
            for v in sel:
                key = "again" if v["again"] else v["reason"]
                counts[key] = counts.get(key, 0) + 1
            line = f"  {'first' if first else 'second'} tests: {len(sel)} {counts}"
            for key in ("share", "share_mean"):
                xs = [v[key] for v in sel]
                sd = statistics.pstdev(xs) if len(xs) > 1 else 0.0
                mean = statistics.mean(xs) if xs else 0.0
                line += f"; {key}: mean {mean:.2f} sd {sd:.2f}"
            print(line)
        if kind == "queue":
            for v in vs:
                if v["reason"] == "shift":
                    print(f"  queue judged shift: {v}")


def _median_latency(m: Timed, start: float, end: float) -> float:
    xs = [lat for t, lat in m.latencies if start <= t < end]
    return statistics.median(xs) if xs else math.nan


def bare_median(c: int, jitter: str) -> float:
    mean = MEAN_S[c]
    return mean if jitter == "uniform" else mean * math.exp(-0.5 * 0.6 * 0.6)


def harm_cmd(seeds: list[int], until: float, force_first: bool) -> None:
    """The queue scenario with its first verdict after 30 s forced to shift."""
    print(f"queue scenario, until {until:.0f} s; latency as median over the bare work's median")
    marks = [(40, 60), (60, 90), (90, 120), (120, 180), (180, 240), (240, 300)]
    marks = [(a, b) for a, b in marks if b <= until]
    head = " | ".join(f"{a}-{b} s" for a, b in marks)
    print(f"c jitter p seed | forced at | limit/c' at | {head} | above 1.5c' until")
    agg: dict[tuple[str, int], list[float]] = {}
    for c, jitter, p in SCENARIOS:
        half = c // 2
        bare = bare_median(c, jitter)
        for seed in seeds:
            _, tested = run((c, seed, "queue", jitter, p), 60.0)
            if not any(v["t"] >= 30.0 for v in tested):
                continue  # no shift test after the halving: nothing to misjudge
            for forced in (False, True):
                m, vs = run((c, seed, "queue", jitter, p), until, 30.0 if forced else None)
                forced_at = (
                    next((v["t"] for v in vs if v["t"] >= 30.0), math.nan) if forced else math.nan
                )
                lat = [_median_latency(m, a, b) / bare for a, b in marks]
                for (a, _), x in zip(marks, lat, strict=True):
                    agg.setdefault(("forced" if forced else "alone", a), []).append(x)
                # the last time the limit was above 1.5 c' (after the first 10 s past the halving)
                above = [t for t, limit in m.limits if t >= 40.0 and limit > 1.5 * half]
                last_above = max(above) if above else math.nan
                agg.setdefault(("forced" if forced else "alone", -1), []).append(
                    (last_above - forced_at) if forced and above else 0.0
                )
                lim = (
                    m.limit_at(forced_at + 5.0) / half
                    if forced and not math.isnan(forced_at)
                    else math.nan
                )
                cells = " | ".join(f"{x:.2f}" for x in lat)
                tag = "forced" if forced else "alone "
                print(
                    f"{c} {jitter[:4]} {p} {seed} {tag} | {forced_at:.1f} | {lim:.2f} | {cells}"
                    f" | {last_above:.1f}"
                )
    print("\nmeans over runs:")
    for which in ("alone", "forced"):
        cells = " | ".join(f"{statistics.mean(agg[(which, a)]):.2f}" for a, _ in marks)
        print(f"  {which}: {cells}")


def learning_cmd(seeds: list[int]) -> None:
    print(
        "slower work at 30 s, one process, lowest limit / c (mean, least);"
        " 45-60 s mean / c (mean [range])"
    )
    for c in (8, 32):
        for jitter in ("uniform", "lognormal"):
            lows, lates, shifts = [], [], 0
            for seed in seeds:
                m, _ = run((c, seed, "slower", jitter, 1), 60.0)
                lows.append(min(m.limits_between(30.0, 60.0)) / c)
                lates.append(statistics.mean(m.limits_between(45.0, 60.0)) / c)
                shifts += any(s.reason == "shift" for s in m.states)
            print(
                f"  {c} {jitter}: {statistics.mean(lows):.2f}, {min(lows):.2f} | "
                f"{statistics.mean(lates):.2f} [{min(lates):.2f}-{max(lates):.2f}]"
                f" | runs with a shift {shifts}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["verdicts", "harm", "learning"])
    parser.add_argument("--seeds", default="1-20")
    parser.add_argument("--until", type=float, default=120.0)
    parser.add_argument(
        "--order", choices=["fifo", "random"], default="fifo", help="the app's own queue (verdicts)"
    )
    args = parser.parse_args()
    seeds = _seeds(args.seeds)
    if args.what == "verdicts":
        verdicts_cmd(seeds, order=args.order)
    elif args.what == "harm":
        harm_cmd(seeds, args.until, True)
    else:
        learning_cmd(seeds)


if __name__ == "__main__":
    main()
