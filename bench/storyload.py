"""The overload story's open-loop load, in a process of its own (pinned by `bench.story`).

    python -m bench.storyload URL --tenants A=10,B=30,C=150 --duration 20 --out records.json

Poisson arrivals per tenant, each request a ``GET`` of the story's route with
the tenant in ``X-Tenant-ID``, sent by the project's load generator library
(`demo_app.loadtest.engine`: open loop, latency from the moment a request was
due). Writes every record as JSON for `bench.story` to score.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.endpoints import HELLO_PATH, TENANT_HEADER
from demo_app.loadtest.engine import Route, Scenario, TenantLoad, run

#: Fields of each record, in the order they are written.
FIELDS = ("tenant", "due_s", "sent_s", "done_s", "status", "error", "throttle_ms", "app_ms")


def parse_tenants(text: str) -> dict[str, float]:
    """``A=10,B=30`` -> {"A": 10.0, "B": 30.0}."""
    found: dict[str, float] = {}
    for part in text.split(","):
        name, _, rate = part.partition("=")
        if not name.strip() or not rate.strip():
            raise ValueError(f"expected TENANT=RATE, got {part!r}")
        found[name.strip()] = float(rate)
    return found


def scenario(
    tenants: dict[str, float], duration_s: float, warmup_s: float, seed: int, timeout_s: float
) -> Scenario:
    route = Route("work", "GET", HELLO_PATH, "normal")
    return Scenario(
        name="story",
        duration_s=duration_s,
        warmup_s=warmup_s,
        seed=seed,
        timeout_s=timeout_s,
        tenants=tuple(
            TenantLoad(name, rate, ((1.0, route),), header=TENANT_HEADER)
            for name, rate in tenants.items()
        ),
    )


async def _run(url: str, plan: Scenario) -> list[list[Any]]:
    records = await run(plan, [url.rstrip("/")])
    return [[getattr(r, name) for name in FIELDS] for r in records]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storyload")
    parser.add_argument("url")
    parser.add_argument("--tenants", default="A=10,B=30,C=150")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = scenario(
        parse_tenants(args.tenants), args.duration, args.warmup, args.seed, args.timeout
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the demo extra
        rows = asyncio.run(_run(args.url, plan))
    else:
        rows = uvloop.run(_run(args.url, plan))
    args.out.write_text(json.dumps({"fields": FIELDS, "records": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
