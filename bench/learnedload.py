"""The learned-limit benchmark's load, in a process of its own (pinned by `bench.learned`).

    python -m bench.learnedload URL --duration 32 --drop-at 16 --slots-after 4 --out run.json

Sends the story's traffic (A 10/s and B 30/s evenly, C 150/s Poisson: open
loop, latency from the moment a request was due, `demo_app.loadtest.engine`)
at the ``/work`` route of ``tests.apps.story``; at ``--drop-at`` seconds it
halves the app's slots (``POST /_slots?n=``: its store slowed down); and every
``--sample-every`` seconds it reads the concurrency limit in force from the
app's exempt ``/_budget`` and the app's true slots and busy count from
``/_running``. Writes the records and the samples as JSON. The samples ride on a
connection of their own, so they never wait behind the story's requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.storyload import FIELDS, parse_tenants
from demo_app.loadtest.clients import new_session
from demo_app.loadtest.engine import Route, Scenario, TenantLoad, run

#: Fields of each sample, in the order they are written.
SAMPLE_FIELDS = ("t_s", "limit", "learned", "in_flight", "waiting", "slots", "busy", "running")
WORK = Route("work", "GET", "/work", "normal")
#: Tenants whose arrivals are even (the story's steady customers); the rest are Poisson.
EVEN = frozenset({"A", "B"})
_SAMPLE_TIMEOUT_S = 2.0


def scenario(tenants: dict[str, float], duration_s: float, seed: int, timeout_s: float) -> Scenario:
    return Scenario(
        name="learned",
        duration_s=duration_s,
        warmup_s=0.0,
        seed=seed,
        timeout_s=timeout_s,
        tenants=tuple(
            TenantLoad(name, rate, ((1.0, WORK),), arrivals="even" if name in EVEN else "poisson")
            for name, rate in tenants.items()
        ),
    )


async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with asyncio.timeout(_SAMPLE_TIMEOUT_S), session.get(url) as response:
        answer: dict[str, Any] = await response.json()
        return answer


async def sample(
    url: str, start: float, duration_s: float, every_s: float, out: list[list[Any]]
) -> None:
    """Read the limit in force and the app's slots until `duration_s` has passed."""
    async with new_session() as session:
        while (now := time.perf_counter() - start) < duration_s:
            try:
                budget = await _get(session, f"{url}/_budget")
                app = await _get(session, f"{url}/_running")
            except (aiohttp.ClientError, TimeoutError):
                budget, app = {}, {}
            out.append(
                [
                    round(now, 3),
                    budget.get("concurrency"),
                    budget.get("learned"),
                    budget.get("in_flight"),
                    budget.get("waiting"),
                    app.get("slots"),
                    app.get("busy"),
                    app.get("running"),
                ]
            )
            await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - start - now)))


async def drop(url: str, start: float, at_s: float | None, slots: int) -> None:
    if at_s is None:
        return
    await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - start)))
    async with new_session() as session, session.post(f"{url}/_slots?n={slots}") as response:
        response.raise_for_status()


async def drive(
    url: str, plan: Scenario, drop_at: float | None, slots_after: int, every_s: float
) -> dict[str, Any]:
    samples: list[list[Any]] = []
    start = time.perf_counter()
    records, *_ = await asyncio.gather(
        run(plan, [url]),
        sample(url, start, plan.duration_s, every_s, samples),
        drop(url, start, drop_at, slots_after),
    )
    return {
        "fields": FIELDS,
        "records": [[getattr(r, name) for name in FIELDS] for r in records],
        "sample_fields": SAMPLE_FIELDS,
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learnedload")
    parser.add_argument("url")
    parser.add_argument("--tenants", default="A=10,B=30,C=150")
    parser.add_argument("--duration", type=float, default=32.0)
    parser.add_argument("--drop-at", type=float, default=None)
    parser.add_argument("--slots-after", type=int, default=4)
    parser.add_argument("--sample-every", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    plan = scenario(parse_tenants(args.tenants), args.duration, args.seed, args.timeout)
    coroutine = drive(url, plan, args.drop_at, args.slots_after, args.sample_every)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the demo extra
        document = asyncio.run(coroutine)
    else:
        document = uvloop.run(coroutine)
    args.out.write_text(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
