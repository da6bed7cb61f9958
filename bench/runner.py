"""Interleave variants, repeat rounds, record every trial, summarise with medians.

One trial: a fresh uvicorn worker for the variant (pinned), a warm-up load run
that is discarded, then the measured run, with service counters sampled right
around it. Rounds interleave the variants (bare, throttled, bare, throttled,
...) so drift on a shared machine hits all of them alike; the summary quotes
medians, the ratio of medians against the baseline, and the median of the
per-round ratios (each against the baseline's trial of the same round).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .apps import HELLO_BODY, HELLO_PATH
from .load import LoadDriver, LoadSpec
from .server import UVICORN_ARGS, serve
from .services import SERVICES, Running, ServiceContext, running
from .variants import Variant, get_variant


@dataclass(frozen=True)
class RunConfig:
    variants: tuple[str, ...]
    rounds: int = 5
    duration_s: int = 8
    warmup_s: int = 2
    connections: int = 64
    #: ``taskset -c`` lists for the server, the generator and the services
    #: (Redis: next to the generator, see `bench.services`); None: unpinned.
    server_cpus: str | None = "0"
    load_cpus: str | None = "1"
    service_cpus: str | None = "1"
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def baseline(self) -> str:
        return self.variants[0]


@dataclass
class Trial:
    round: int
    variant: str
    generator: str
    started_at: float
    loadavg_1m: float
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    bad_status: int = 0
    socket_errors: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: CPU seconds the server used during the measured run, and requests per CPU
    #: second: less sensitive than req/s to neighbours taking the server's core.
    server_cpu_s: float | None = None
    rps_per_cpu: float | None = None
    #: Service counter deltas over the measured run, and the same per request.
    counters: dict[str, float] = field(default_factory=dict)
    counters_per_request: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class TrialFailed(RuntimeError):
    def __init__(self, trial: Trial) -> None:
        super().__init__(
            f"round {trial.round} {trial.variant}: {'; '.join(trial.problems)} "
            "(the trial does not count; the run stops)"
        )
        self.trial = trial


def resolve(names: Sequence[str]) -> list[Variant]:
    """The variants by name, checked: known, not repeated, their modules importable."""
    if len(set(names)) != len(names):
        raise ValueError(f"a variant is named twice in {', '.join(names)}")
    variants = [get_variant(name) for name in names]
    for variant in variants:
        absent = sorted(set(variant.services) - set(SERVICES))
        if absent:
            raise ValueError(
                f"variant {variant.name!r} needs services not implemented yet: {', '.join(absent)}"
            )
        missing = variant.missing()
        if missing:
            raise ValueError(
                f"variant {variant.name!r} needs {', '.join(missing)}: pip install it first"
            )
    return variants


def run(
    config: RunConfig,
    driver: LoadDriver,
    on_trial: Callable[[Trial], None] = lambda trial: None,
    trials: list[Trial] | None = None,
    services_out: dict[str, Any] | None = None,
) -> list[Trial]:
    """Run every round; each finished trial goes to `on_trial` and into `trials`.

    `services_out` receives what the services report about themselves (versions).

    Raises `TrialFailed` at the first trial with a bad response or socket error.
    Servers and services are stopped on every way out, Ctrl-C included.
    """
    trials = [] if trials is None else trials
    variants = resolve(config.variants)
    needed = [name for v in variants for name in v.services]
    with tempfile.TemporaryDirectory(prefix="throttle_mw-bench-") as scratch:
        workdir = Path(scratch)
        with running(needed, ServiceContext(config.service_cpus, workdir)) as services:
            if services_out is not None:
                services_out.update(services.describe())
            for round_no in range(1, config.rounds + 1):
                for variant in variants:
                    trial = _trial(config, driver, variant, round_no, services, workdir)
                    trials.append(trial)
                    on_trial(trial)
                    if trial.problems:
                        raise TrialFailed(trial)
    return trials


def _trial(
    config: RunConfig,
    driver: LoadDriver,
    variant: Variant,
    round_no: int,
    services: Running,
    workdir: Path,
) -> Trial:
    services.reset()
    env = {**services.env_for(variant.services), **variant.env}
    log_path = workdir / f"server-{round_no}-{variant.name}.log"
    trial = Trial(round_no, variant.name, driver.name, time.time(), os.getloadavg()[0])
    with serve(
        variant.name,
        env,
        cpus=config.server_cpus,
        log_path=log_path,
        expect_body=HELLO_BODY,
        path=HELLO_PATH,
    ) as server:
        spec = LoadSpec(
            server.url, config.connections, config.duration_s, config.headers, config.load_cpus
        )
        if config.warmup_s > 0:
            warm = driver.run(replace(spec, duration_s=config.warmup_s))
            trial.problems += [f"warm-up: {problem}" for problem in warm.problems()]
            if trial.problems:
                return trial
        before = services.sample(variant.services)
        cpu_before = server.cpu_s()
        result = driver.run(spec)
        cpu_after = server.cpu_s()
        after = services.sample(variant.services)
    if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
        trial.server_cpu_s = cpu_after - cpu_before
        trial.rps_per_cpu = result.requests / trial.server_cpu_s
    trial.requests = result.requests
    trial.duration_s = result.duration_s
    trial.rps = result.rps
    trial.bad_status = result.bad_status
    trial.socket_errors = result.socket_errors
    trial.latency_ms = dict(result.latency_ms)
    trial.counters = {key: after[key] - before.get(key, 0.0) for key in after}
    if result.requests:
        trial.counters_per_request = {
            key: delta / result.requests for key, delta in trial.counters.items()
        }
    trial.problems = result.problems()
    return trial


def summarize(
    trials: Sequence[Trial], names: Sequence[str], own: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Medians per variant, and ratios against the first name (the baseline).

    For req/s and for req per server CPU-second: the ratio of the medians, and
    the median of the per-round ratios (each trial against the baseline's trial
    of the same round, which ran next to it). Where `own` names another
    baseline for a variant (``bare-fastapi`` for a FastAPI-only peer) and it
    ran, the same ratios against it are added with the suffix ``_own``.
    Service counters: the median over the trials of each counter per request.
    """
    good = [t for t in trials if not t.problems]
    baseline = names[0]
    variants: dict[str, Any] = {}
    for name in names:
        mine = [t for t in good if t.variant == name]
        if not mine:
            continue
        entry: dict[str, Any] = {"trials": len(mine)}
        other = (own or {}).get(name, baseline)
        for metric in ("rps", "rps_per_cpu"):
            values = _values(mine, metric)
            if not values:
                continue
            entry[f"median_{metric}"] = statistics.median(values)
            entry[f"min_{metric}"] = min(values)
            entry[f"max_{metric}"] = max(values)
            entry.update(_ratios(good, name, baseline, metric, ""))
            if other != baseline and other in names:
                entry["own_baseline"] = other
                entry.update(_ratios(good, name, other, metric, "_own"))
        for key in ("p50", "p99"):
            latencies = [t.latency_ms[key] for t in mine if key in t.latency_ms]
            entry[f"median_{key}_ms"] = statistics.median(latencies) if latencies else None
        keys = sorted({k for t in mine for k in t.counters_per_request})
        if keys:
            entry["median_counters_per_request"] = {
                k: statistics.median(
                    t.counters_per_request[k] for t in mine if k in t.counters_per_request
                )
                for k in keys
            }
        variants[name] = entry
    return {"baseline": baseline, "variants": variants}


def _ratios(
    good: Sequence[Trial], name: str, baseline: str, metric: str, suffix: str
) -> dict[str, Any]:
    mine = _values([t for t in good if t.variant == name], metric)
    base = _values([t for t in good if t.variant == baseline], metric)
    if name == baseline or not base or not mine:
        return {}
    paired = _paired(good, name, baseline, metric)
    return {
        f"ratio_{metric}{suffix}": statistics.median(mine) / statistics.median(base),
        f"paired_ratios_{metric}{suffix}": paired,
        f"median_paired_ratio_{metric}{suffix}": statistics.median(paired) if paired else None,
    }


def _values(trials: Sequence[Trial], metric: str) -> list[float]:
    found = (getattr(t, metric) for t in trials)
    return [v for v in found if v is not None]


def _paired(good: Sequence[Trial], name: str, baseline: str, metric: str) -> list[float]:
    by_round: dict[tuple[int, str], float] = {
        (t.round, t.variant): getattr(t, metric) for t in good if getattr(t, metric) is not None
    }
    return [
        by_round[(r, name)] / by_round[(r, baseline)]
        for r in sorted({t.round for t in good})
        if (r, name) in by_round and (r, baseline) in by_round
    ]


def trial_dicts(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    return [asdict(t) for t in trials]


def settings_dict(config: RunConfig, variants: Mapping[str, Variant]) -> dict[str, Any]:
    return {
        **asdict(config),
        "uvicorn_args": list(UVICORN_ARGS),
        "variant_env": {name: dict(v.env) for name, v in variants.items()},
        "variant_services": {name: list(v.services) for name, v in variants.items()},
        "variant_baselines": {name: v.baseline for name, v in variants.items()},
    }
