"""The Markdown tables of a `bench.run_all` run, built from each part's JSON document."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Throughput targets (ratio of median req/s to bare's).
TARGETS = {"memory": 0.90, "redis-rate": 0.60, "redis-concurrency": 0.60}
CAVEAT = (
    "Measured on a shared, noisy 2-core VM (other people's tests running): absolute"
    " figures move by 2x from one minute to the next. Read medians and ratios; for"
    " figures to publish, re-run `python bench/run_all.py` on a quiet machine."
)


def markdown(summary: Mapping[str, Any]) -> str:
    parts = summary["parts"]
    lines = ["## Benchmarks", ""]
    lines += _context(summary)
    for name, render in (
        ("throughput", _throughput),
        ("roundtrips", _roundtrips),
        ("grant_latency", _grant_latency),
        ("story", _story),
    ):
        if name in parts:
            lines += ["", *render(parts[name], parts)]
        elif name in summary["statuses"]:
            lines += ["", f"_{name}: no results (exit status {summary['statuses'][name]})._"]
    failed = {p: s for p, s in summary["statuses"].items() if s != 0}
    if failed:
        lines += [
            "",
            f"**Incomplete run:** {', '.join(f'{p} (exit {s})' for p, s in failed.items())}.",
        ]
    return "\n".join(lines) + "\n"


def _context(summary: Mapping[str, Any]) -> list[str]:
    env: Mapping[str, Any] = {}
    for document in summary["parts"].values():
        env = document.get("environment", {})
        if env:
            break
    git = env.get("git") or "unknown"
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    start, end = summary["loadavg_at_start"], summary["loadavg_at_end"]
    quick = (
        " **Quick run (`--quick`): a first look, not figures to quote.**"
        if summary["quick"]
        else ""
    )
    return [
        f"_{CAVEAT}_{quick}",
        "",
        f"Command: `{' '.join(_short(summary['command']))}`; commit `{str(git)[:10]}`{dirty};"
        f" {env.get('platform', '?')}, {env.get('cpus', '?')} CPUs,"
        f" Python {env.get('python', '?')};"
        f" load average {start[0]:.2f} at start, {end[0]:.2f} at end;"
        f" {summary['started_at']} to {summary['finished_at']}.",
    ]


def _short(command: Sequence[str]) -> list[str]:
    return ["python", *command[1:]] if command and command[0].endswith("python") else list(command)


def _throughput(document: Mapping[str, Any], parts: Mapping[str, Any]) -> list[str]:
    settings = document.get("settings", {})
    variants = document.get("summary", {}).get("variants", {})
    lines = [
        "### Throughput",
        "",
        f"Hello-world route, one uvicorn worker pinned to CPU {settings.get('server_cpus')},"
        f" {document['environment'].get('generator')} with"
        f" {settings.get('connections')} connections"
        f" on CPU {settings.get('load_cpus')} (Redis there too), {settings.get('rounds')}"
        f" interleaved rounds of {settings.get('duration_s')} s; limits never reached."
        " Ratios: median req/s over bare's; paired: median of per-round ratios;"
        " own: against the same framework's bare app (FastAPI for fastapi-limiter);"
        " CPU: requests per server CPU-second, over bare's.",
        "",
        *_header(
            "variant",
            "median req/s",
            "ratio to bare",
            "paired",
            "own",
            "CPU ratio",
            "Redis round trips/req",
            "target",
        ),
    ]
    for name, entry in variants.items():
        base = name == document["summary"]["baseline"]
        per = entry.get("median_counters_per_request", {})
        target = TARGETS.get(name)
        ratio = entry.get("ratio_rps")
        verdict = (
            ""
            if target is None
            else f">= {target:.2f} "
            + ("(met)" if ratio is not None and ratio >= target else "(not met)")
        )
        lines.append(
            f"| {name} | {_f(entry.get('median_rps'), ',.0f')}"
            f" | {'1' if base else _f(ratio, '.2f')}"
            f" | {'' if base else _f(entry.get('median_paired_ratio_rps'), '.2f')}"
            f" | {_f(entry.get('ratio_rps_own'), '.2f') if entry.get('own_baseline') else ''}"
            f" | {'1' if base else _f(entry.get('ratio_rps_per_cpu'), '.2f')}"
            f" | {_f(per.get('redis.round_trips'), '.3f') if 'redis.round_trips' in per else ''}"
            f" | {verdict} |"
        )
    return lines


def _roundtrips(document: Mapping[str, Any], parts: Mapping[str, Any]) -> list[str]:
    loaded: dict[str, float] = {}
    connections = None
    if "throughput" in parts:
        tp = parts["throughput"]
        connections = tp.get("settings", {}).get("connections")
        for name, entry in tp.get("summary", {}).get("variants", {}).items():
            per = entry.get("median_counters_per_request", {})
            if "redis.round_trips" in per:
                loaded[name] = per["redis.round_trips"]
    lines = [
        "### Redis round trips per admitted request",
        "",
        "Counted by the redis-server: `total_writes_processed` deltas (one per request/response"
        " exchange; commands run inside scripts are not round trips), divided by the requests"
        " admitted in the trial (see `bench/services.py`). Sequential: one client, one request"
        f" at a time; loaded: the throughput trials ({connections} connections), where"
        " throttle_mw coalesces concurrent requests' operations into one script call.",
        "",
        *_header(
            "variant",
            "sequential",
            "loaded",
            "script calls/req (seq.)",
            "commands incl. in scripts/req (seq.)",
            "Redis CPU/req (seq.)",
            "target (seq.)",
        ),
    ]
    for row in document.get("rows", []):
        if row["mode"] != "sequential":
            continue
        target = row.get("target")
        verdict = ""
        if target is not None:
            verdict = f"<= {target:g} " + (
                "(met)" if row["round_trips"] <= target + 0.05 else "(not met)"
            )
        lines.append(
            _row(
                row["variant"],
                f"{row['round_trips']:.3f}",
                _f(loaded.get(row["variant"]), ".3f"),
                _f(row.get("script_calls"), ".3f"),
                _f(row.get("commands_incl_scripts"), ".1f"),
                f"{_f(row.get('redis_cpu_us'), '.0f')} us",
                verdict,
            )
        )
    return lines


def _grant_latency(document: Mapping[str, Any], parts: Mapping[str, Any]) -> list[str]:
    lat = document.get("latency_ms", {})
    target = document.get("target_p99_ms", 5.0)
    met = "met" if document.get("meets_target") else "not met"
    per_call = document.get("redis", {}).get("script_us_per_call")
    return [
        "### Grant latency",
        "",
        "Capacity freed in one process to the waiting request resuming in another: two"
        " processes, each with its own RedisBackend, share one Redis with a concurrency budget"
        " of 1; one holds the slot, the other waits; release and resume are timestamped with"
        " CLOCK_MONOTONIC (one clock for every process on a host). Backend path only, no HTTP.",
        "",
        *_header("samples", "p50", "p90", "p99", "max", "Redis time per script call", "target"),
        _row(
            str(document.get("samples")),
            *(f"{_f(lat.get(key), '.2f')} ms" for key in ("p50", "p90", "p99", "max")),
            f"{_f(per_call, '.0f')} us",
            f"p99 <= {target:g} ms ({met})",
        ),
    ]


def _story(document: Mapping[str, Any], parts: Mapping[str, Any]) -> list[str]:
    settings = document.get("settings", {})
    variants = document.get("variants", {})
    tenants = list(next(iter(variants.values()))["tenants"]) if variants else []
    head = (
        " | ".join(f"{t} served" for t in tenants) + " | " + " | ".join(f"{t} p99" for t in tenants)
    )
    lines = [
        "### Overload story",
        "",
        f"Tenants {settings.get('tenants')} req/s (Poisson, open loop) against a backend of"
        f" {settings.get('slots')} slots x {settings.get('work_ms'):g} ms"
        f" +-{100 * settings.get('jitter', 0):.0f}% = {settings.get('capacity_per_s'):g} req/s;"
        f" {settings.get('duration'):g} s per variant, the first {settings.get('warmup'):g} s not"
        f" scored; clients give up after {settings.get('timeout'):g} s. throttle_mw: concurrency"
        f" budget = {settings.get('slots')} slots (`-both`: also a rate of 96% of capacity, burst"
        f" = the slots); peers: {settings.get('peer_rate')} req/s per"
        " tenant (the flooding tenant's max-min fair share). Served: of the requests due in the"
        " window, answered 2xx; p99: latency of the served ones from when they were due;"
        " goodput: 2xx completions per second in the window.",
        "",
        f"| variant | {head} | goodput/s | Redis round trips/req |",
        "|---|" + "---:|" * (2 * len(tenants) + 2),
    ]
    for name, result in variants.items():
        served = " | ".join(_pct(result["tenants"][t]["served_fraction"]) for t in tenants)
        p99 = " | ".join(_ms(result["tenants"][t]["served_latency_ms"]["p99"]) for t in tenants)
        redis = result.get("redis")
        trips = "" if redis is None else f"{redis['round_trips_per_request']:.2f}"
        lines.append(
            f"| {name} | {served} | {p99} | {result['all']['goodput_per_s']:.1f} | {trips} |"
        )
    return lines


def _header(*names: str) -> list[str]:
    """A Markdown header: the first column left-aligned, numbers right, the last left."""
    align = ["---", *(["---:"] * (len(names) - 2)), "---"]
    return [_row(*names), _row(*align)]


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"
