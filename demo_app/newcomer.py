"""``python -m demo_app``: the SurveyTool story on this machine, throttle off and then on.

Starts SurveyTool locally (under uvicorn, or hypercorn or granian with
``--server``; the budget in memory unless ``--redis-url`` or
``THROTTLE_REDIS_URL`` names a Redis), plays the ``seed``
scenario against it with the throttle off and then on, prints the two reports
side by side with one PASS/FAIL line per claim of the story, and writes the
charts and a report into ``--out`` (default ``./surveytool-report/``). With the
defaults it takes about 100 s.

``--budget auto`` (the default) sets no budget number: the concurrency limit is
learned from the store's latency; ``--budget static`` sets the rate and
concurrency an operator who knows the capacity would. ``--slowdown``: the store
loses half its slots midway through each phase, and the limit must follow.

How it measures (docs/design.md, "Measuring the story honestly"): open-loop load,
latency from when each request was due, served rates by completion time in
the steady window. Besides: the app and the load generator run on different
cores when ``taskset`` exists; the store's own queue is sampled from the
app's stats endpoint, since waiting inside the store hides in the app's
``Server-Timing`` figure; and the machine's load is reported, since a busy
machine adds latency that no throttle can take away. The settings and why
are in `demo_app.story`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from asyncio import CancelledError
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeVar

import httpx

from demo_app import machine, summary
from demo_app.fleet import (
    HOST,
    SERVERS,
    Child,
    FleetError,
    app_argv,
    check_server,
    free_port,
    http_ok,
    wait_for,
    with_repo_on_path,
)
from demo_app.loadtest.engine import Record, Scenario, run
from demo_app.loadtest.progress import ProgressLine
from demo_app.loadtest.report import summarize
from demo_app.story import BUDGETS, Phase, Sample, Story, checks, verdicts

_T = TypeVar("_T")

#: How often the store's queue is sampled from ``/api/throttle/stats``.
SAMPLE_EVERY_S: Final = 0.5
#: Exit status of ``--check`` when a claim fails.
CLAIM_FAILED: Final = 3


@dataclass(frozen=True)
class PhaseSpec:
    label: str
    slug: str
    env: dict[str, str]


@dataclass(frozen=True)
class Measured:
    """One phase's outcome and how busy the machine was meanwhile."""

    phase: Phase
    usage: machine.Usage | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app",
        description="Run SurveyTool locally, play the story's load with the throttle off and "
        "then on, and show whether the story holds (see demo_app/README.md).",
    )
    parser.add_argument(
        "--duration", type=float, metavar="S",
        help="seconds of load per phase (30; 40 with --slowdown; 5 more with --budget auto)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", choices=BUDGETS, default="auto",
        help="auto: the concurrency limit learned from latency, no number set (default); "
        "static: the rate and concurrency an operator who knows the capacity sets",
    )  # fmt: skip
    parser.add_argument(
        "--slowdown", action="store_true",
        help="the store loses half its slots midway through each phase (16 -> 8)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="S",
        help="seconds left out of the figures (5, at most a quarter of the duration; with "
        "--budget auto 10, at most 30%%: the learned limit's cold start)",
    )
    parser.add_argument(
        "--rate-scale", type=float, default=1.0, metavar="F",
        help="scale the whole story by F (tenants' rates, budget, store capacity), for a "
        "machine where the load generator cannot keep up at full scale",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("surveytool-report"), metavar="DIR",
        help="folder for the report and charts (./surveytool-report)",
    )  # fmt: skip
    parser.add_argument(
        "--redis-url", default=os.environ.get("THROTTLE_REDIS_URL") or None, metavar="URL",
        help="share the budget through this Redis (default: THROTTLE_REDIS_URL, else in memory)",
    )  # fmt: skip
    parser.add_argument(
        "--server", choices=SERVERS, default="uvicorn", help="the app's ASGI server (uvicorn)"
    )
    parser.add_argument(
        "--check", action="store_true", help=f"exit with {CLAIM_FAILED} if a claim fails"
    )
    args = parser.parse_args(argv)
    learned = args.budget == "auto"
    if args.duration is None:
        # A learned limit's cold start (README, "The learned limit") takes its own 5 s.
        args.duration = (40.0 if args.slowdown else 30.0) + (5.0 if learned else 0.0)
    if not 0 < args.duration <= 600:
        parser.error("--duration must be within (0, 600] seconds")
    if args.warmup is None:
        args.warmup = min(10.0, args.duration * 0.3) if learned else min(5.0, args.duration / 4)
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be >= 0 and less than --duration")
    if not 0 < args.rate_scale <= 4:
        parser.error("--rate-scale must be within (0, 4]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    story = Story(args.rate_scale, args.budget, args.slowdown)
    scenario = story.scenario(args.duration, args.warmup)
    pins = machine.pinning()
    load_before = machine.load_average()
    say(summary.intro(story, scenario, args.redis_url, args.server))
    say(pins.describe() if pins else "not pinning to cores (needs taskset and 2 cores)")
    ignored = sorted(set(filter(_ours, os.environ)) - {"THROTTLE_REDIS_URL"})
    if ignored:
        say(f"note: ignoring {', '.join(ignored)} from your environment: the story sets its own")
    workdir = Path(tempfile.mkdtemp(prefix="surveytool-demo-"))
    # SIGTERM too unwinds through the `finally`s: the app stops, the temp folder goes.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        check_server(args.server)
        off = run_phase(_spec(story, workdir, False, None), scenario, pins, args.server, story)
        on = run_phase(
            _spec(story, workdir, True, args.redis_url), scenario, pins, args.server, story
        )
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(workdir, ignore_errors=True)
    claims, health = verdicts(off.phase, on.phase, story), checks(off.phase, on.phase, story)
    context = summary.Context(
        argv=list(sys.argv[1:] if argv is None else argv),
        story=story,
        redis_url=args.redis_url,
        pinning=pins.describe() if pins else None,
        load_before=load_before,
        load_after=machine.load_average(),
        usage={"throttle off": off.usage, "throttle on": on.usage},
    )
    text = summary.text(off.phase, on.phase, claims, health, context)
    say("\n" + text)
    say(f"writing the report and charts to {args.out}/…")
    written = summary.write(args.out, off.phase, on.phase, claims, health, context, text)
    say(f"wrote {', '.join(p.name for p in written)}")
    say(f"done in {time.monotonic() - began:.0f} s")
    return CLAIM_FAILED if args.check and not all(v.passed for v in claims) else 0


def _spec(story: Story, workdir: Path, enabled: bool, redis_url: str | None) -> PhaseSpec:
    label = "throttle on" if enabled else "throttle off"
    slug = label.replace(" ", "-")
    base = {k: v for k, v in os.environ.items() if not _ours(k)}
    env = with_repo_on_path({**base, **story.env()})
    env["THROTTLE_ENABLED"] = "true" if enabled else "false"
    # A fresh database per phase: both start from the same (empty) data.
    env["SURVEYTOOL_DB"] = str(workdir / f"{slug}.sqlite3")
    if enabled and redis_url:
        env["THROTTLE_REDIS_URL"] = redis_url
        env["THROTTLE_KEY_PREFIX"] = f"surveytool-demo-{os.getpid()}-{int(time.time())}"
    return PhaseSpec(label, slug, env)


def run_phase(
    spec: PhaseSpec,
    scenario: Scenario,
    pins: machine.Pinning | None,
    server: str = "uvicorn",
    story: Story | None = None,
) -> Measured:
    """Start the app with `spec` under `server`, play `scenario` against it (the store
    slowing down midway if the story says so), stop it."""
    port = free_port()
    argv = [*(pins.prefix if pins else ()), *app_argv(server, port, graceful_s=2)]
    log = Path(spec.env["SURVEYTOOL_DB"]).with_suffix(".log")
    app = Child(f"the app ({spec.label})", argv, log, spec.env)
    say(f"starting the app ({spec.label})…")
    app.start()
    try:
        wait_for(lambda: http_ok(port), app, 60.0)
        assert app.proc is not None
        say(f"the app is up at http://{HOST}:{port}/ (pid {app.proc.pid}): open it to watch")
        say(f"running {scenario.duration_s:g} s with the {spec.label}…")
        drop = None
        if story is not None and (at := story.drop_at(scenario)) is not None:
            say(
                f"the store loses half its slots {at:g} s in ({story.slots} -> {story.slots_after})"
            )
            drop = (at, story.slots_after)
        records, sampler, usage = measure(
            scenario, f"http://{HOST}:{port}", app.proc.pid, pins, drop
        )
        if not app.alive:
            raise FleetError(f"{app.name} died during the run; its log:\n{app.log_tail()}")
    finally:
        app.stop(timeout_s=5.0)
    report = summarize(records, scenario, label=spec.label)
    phase = Phase(records, report, scenario, sampler.max_waiting, tuple(sampler.samples))
    return Measured(phase, usage)


def measure(
    scenario: Scenario,
    url: str,
    app_pid: int,
    pins: machine.Pinning | None,
    drop: tuple[float, int] | None = None,
) -> tuple[list[Record], StoreSampler, machine.Usage | None]:
    """Run the load on the load generator's cores (at ``drop = (s, slots)`` the store is
    resized); CPU use of the machine, app and us."""
    previous = machine.pin_self(pins.loadgen_cpus) if pins else None
    # What exists now (imports, the first phase's records) is never garbage: keep the
    # collector off it, or a full collection stops the client for tens of milliseconds.
    gc.collect()
    gc.freeze()
    meter = machine.Meter(app_pid)
    try:
        records, sampler = _run_fast(_load(scenario, url, drop))
    finally:
        gc.unfreeze()
        machine.unpin_self(previous)
    usage = meter.usage()
    return records, sampler, usage


async def _load(
    scenario: Scenario, url: str, drop: tuple[float, int] | None
) -> tuple[list[Record], StoreSampler]:
    display = ProgressLine(sys.stdout, tty=sys.stdout.isatty())
    sampler = StoreSampler(url)
    tasks = [asyncio.create_task(sampler.run())]
    if drop is not None:
        tasks.append(asyncio.create_task(_slow_down(url, *drop)))
    try:
        records = await run(scenario, [url], on_progress=display)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        display.close()
    failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, CancelledError)]
    if failed:
        raise FleetError(f"could not slow the store down: {failed[0]}")
    return records, sampler


async def _slow_down(url: str, at_s: float, slots: int) -> None:
    """At `at_s` into the load, the store keeps only `slots` (the app's admin route)."""
    await asyncio.sleep(at_s)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, trust_env=False) as http:
        response = await http.post("/api/admin/store", params={"slots": slots})
        response.raise_for_status()


class StoreSampler:
    """Polls the app's stats: requests waiting for a store slot (keeps the largest), and
    the limit in force against the store's slots over time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.max_waiting: int | None = None
        self.samples: list[Sample] = []

    async def run(self) -> None:
        start = time.perf_counter()  # within a millisecond of the load's own start
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0, trust_env=False) as http:
            while True:  # until cancelled
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    response = await http.get("/api/throttle/stats")
                    body = response.json()
                    waiting = int(body["store"]["waiting"])
                    self.max_waiting = max(self.max_waiting or 0, waiting)
                    throttle = body["throttle"]
                    limit = throttle["concurrency"] if throttle["enabled"] else None
                    self.samples.append(
                        Sample(
                            round(time.perf_counter() - start, 3),
                            None if limit is None else int(limit),
                            int(body["store"]["slots"]),
                            waiting,
                        )
                    )
                await asyncio.sleep(SAMPLE_EVERY_S)


def _run_fast(coro: Coroutine[Any, Any, _T]) -> _T:
    """On uvloop when installed (it comes with uvicorn[standard]): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ours(variable: str) -> bool:
    """A setting of the throttle or the app: the story sets those itself."""
    return variable.startswith(("THROTTLE_", "SURVEYTOOL_"))


def say(text: str) -> None:
    print(text, flush=True)
