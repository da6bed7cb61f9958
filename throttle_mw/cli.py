"""``throttle-mw`` (``python -m throttle_mw``): a budget's live state in Redis, and its live limits.

``status`` (the default) shows tokens, requests in flight, queue depth per
priority, live processes, the limits in force and the busiest tenants.
``set`` changes limits and tenant weights at run time; ``reset`` removes those
live overrides, so each process's ``THROTTLE_*`` values apply again.

Live limits and weights are stored in Redis by
`throttle_mw.backends.redis.admin.Budget` (the same code the backend uses);
the scripts read them on every call, so every process of the fleet follows
from its next decision.

The connection comes from ``--redis-url`` / ``--prefix`` or the app's own
``THROTTLE_REDIS_URL`` / ``THROTTLE_KEY_PREFIX``. Run it where the app's
``THROTTLE_*`` variables are set and it shows them as the defaults the live
overrides replace. Exit codes: 0 done, 1 Redis unreachable or refused, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, TextIO
from urllib.parse import urlsplit

from .priorities import PRIORITIES
from .scheduler import AUTO, Limits
from .scheduler.limit import LimitConfig
from .settings import TENANT_PATTERN, ConfigError, Settings, default_burst, redis_endpoint

if TYPE_CHECKING:
    from .backends.redis.admin import Budget

#: The limits a live override may set (fields of ``{prefix}:cfg``).
LIMITS: Final = ("rate", "burst", "concurrency", "tenant_rate", "tenant_burst")
#: Limits a live override may switch off.
NULLABLE: Final = frozenset({"rate", "concurrency", "tenant_rate"})
_FLAG = {name: "--" + name.replace("_", "-") for name in LIMITS}
_FLAG.update(redis_url="--redis-url", key_prefix="--prefix", tenant_weights="--weight")
_CLEAR = "\x1b[H\x1b[2J"


class UsageError(Exception):
    """Bad input: reported on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    secret = ""
    try:
        args = _parser().parse_args(argv)
        loose, env = _settings(args)
        secret = urlsplit(loose.redis_url or "").password or ""
        _redis_module()
        return asyncio.run(_connected(args, loose, env))
    except UsageError as exc:
        print(f"throttle-mw: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        if not _is_redis_error(exc):
            raise
        what = "Redis unreachable" if _is_connection_error(exc) else "Redis refused"
        message = _scrub(f"{type(exc).__name__}: {exc}", secret)
        print(f"throttle-mw: error: {what} ({message})", file=sys.stderr)
        return 1


async def _connected(args: argparse.Namespace, loose: Settings, env: Settings | None) -> int:
    from .backends.redis.admin import Budget

    client = _connect(loose)
    try:
        budget = Budget(client, loose.key_prefix, live_limits_ttl_s=loose.live_limits_ttl_s)
        return await _run(args, budget, loose, env)
    finally:
        await _close(client)


async def _run(
    args: argparse.Namespace, budget: Budget, loose: Settings, env: Settings | None
) -> int:
    command = args.command or "status"
    if command == "set":
        changes, weights = _changes(args, loose)
        _check_budget(await budget.live_limits(), changes, env)
        await budget.set(changes, weights)
        print(_describe_overrides(await budget.live_limits(), await budget.live_weights()))
        return 0
    if command == "reset":
        fields = [name for name in LIMITS if getattr(args, name)]
        tenants = [_tenant(t) for t in args.weight or ()]
        everything = not (fields or tenants or args.weights)
        await budget.reset(fields, tenants, everything=everything, all_weights=args.weights)
        print(_describe_overrides(await budget.live_limits(), await budget.live_weights()))
        return 0
    return await _status(args, budget, loose, env, sys.stdout)


# --- arguments ----------------------------------------------------------------------


def _parser() -> _Parser:
    parser = _Parser(
        prog="throttle-mw",
        description="Show a throttle_mw budget's live state in Redis, or change its limits.",
        epilog="Exit codes: 0 done, 1 Redis unreachable or refused, 2 bad input.",
    )
    _connection_options(parser)
    _status_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="{status,set,reset}")
    status = commands.add_parser("status", help="the budget's live state (the default command)")
    _connection_options(status)
    _status_options(status)
    change = commands.add_parser(
        "set",
        help="change limits and tenant weights at run time (every process follows)",
        description="Store live limits in Redis. --rate without --burst also sets the burst "
        "to its default for the new rate (a fifth of a second of it); likewise --tenant-rate. "
        "'none' switches a rate or the concurrency budget off.",
    )
    _connection_options(change)
    change.add_argument("--rate", metavar="PER_S|none", help="fleet-wide admissions per second")
    change.add_argument("--burst", metavar="TOKENS", help="admissions at once above the rate")
    change.add_argument(
        "--concurrency",
        metavar="N|auto|none",
        help="fleet-wide requests in flight; auto: learned from the app's latency",
    )
    change.add_argument("--tenant-rate", metavar="PER_S|none", help="cap per tenant")
    change.add_argument("--tenant-burst", metavar="TOKENS", help="burst of the cap per tenant")
    change.add_argument(
        "--weight", action="append", metavar="TENANT=W", help="a tenant's weight (repeatable)"
    )
    reset = commands.add_parser(
        "reset",
        help="remove live overrides (all of them without options)",
        description="Remove live overrides: each process's THROTTLE_* values apply again.",
    )
    _connection_options(reset)
    for name in LIMITS:
        reset.add_argument(_FLAG[name], action="store_true", help=f"only the live {name}")
    reset.add_argument("--weight", action="append", metavar="TENANT", help="one tenant's weight")
    reset.add_argument("--weights", action="store_true", help="every live tenant weight")
    parser.set_defaults(
        command=None, redis_url=None, prefix=None, json=False, watch=False, top=10, interval=1.0
    )
    return parser


# Options are accepted before and after the command: SUPPRESS keeps a subparser from
# overwriting with its default what the main parser already read.
_KEEP = argparse.SUPPRESS


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", default=_KEEP, metavar="URL", help="default: $THROTTLE_REDIS_URL"
    )
    parser.add_argument(
        "--prefix", default=_KEEP, help="the budget's key prefix; default: $THROTTLE_KEY_PREFIX"
    )


def _status_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=_KEEP, help="JSON for machines")
    parser.add_argument(
        "--watch", action="store_true", default=_KEEP, help="refresh every second (Ctrl-C ends)"
    )
    parser.add_argument(
        "--top", type=_top, default=_KEEP, metavar="N", help="busiest tenants to list (10)"
    )
    parser.add_argument("--interval", type=_interval, default=_KEEP, help=argparse.SUPPRESS)


def _top(raw: str) -> int:
    if raw.isdigit() and 1 <= int(raw) <= 100:
        return int(raw)
    raise argparse.ArgumentTypeError(f"{raw!r}: expected a whole number from 1 to 100")


def _interval(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if 0.05 <= value <= 3600:
        return value
    raise argparse.ArgumentTypeError(f"{raw!r}: expected seconds from 0.05 to 3600")


def _settings(args: argparse.Namespace) -> tuple[Settings, Settings | None]:
    """The connection settings, and the environment's budget if this shell has one."""
    overrides: dict[str, Any] = {}
    if args.redis_url is not None:
        overrides["redis_url"] = args.redis_url
    if args.prefix is not None:
        overrides["key_prefix"] = args.prefix
    loose = _validated(enabled=False, **overrides)
    if not loose.redis_url:
        raise UsageError("no Redis to talk to: pass --redis-url or set THROTTLE_REDIS_URL")
    env = None
    if loose.rate is not None or loose.concurrency is not None:
        env = _validated(**{**overrides, "enabled": True})  # with the defaults filled in
    return loose, env


def _validated(environ: Mapping[str, str] | None = None, **values: Any) -> Settings:
    try:
        return Settings.from_env(environ, **values)
    except ConfigError as exc:
        name = exc.source.removesuffix(" (keyword argument)")
        if name == exc.source or name not in _FLAG:
            raise UsageError(str(exc)) from None  # from the environment: it names the variable
        shown = exc.value if isinstance(exc.value, str) else repr(exc.value)
        raise UsageError(f"{_FLAG[name]} {shown}: invalid, expected {exc.expected}") from None


def _changes(args: argparse.Namespace, loose: Settings) -> tuple[dict[str, str], dict[str, float]]:
    """The live fields to store, validated by the same rules as the THROTTLE_* variables."""
    changes: dict[str, str] = {}
    for name in LIMITS:
        raw = getattr(args, name)
        if raw is None:
            continue
        if raw.strip().lower() == "none":
            if name not in NULLABLE:
                raise UsageError(f"{_FLAG[name]} none: only a rate or the concurrency can be off")
            changes[name] = "none"
            continue
        value = getattr(_validated({}, enabled=False, **{name: raw}), name)
        if name in ("burst", "tenant_burst") and value < loose.max_cost:
            raise UsageError(
                f"{_FLAG[name]} {raw}: invalid, expected at least the largest route cost "
                f"({loose.max_cost}, from THROTTLE_ROUTE_PRIORITIES)"
            )
        changes[name] = repr(value) if isinstance(value, float) else str(value)
    for rate, burst in (("rate", "burst"), ("tenant_rate", "tenant_burst")):
        if rate in changes and changes[rate] != "none" and burst not in changes:
            changes[burst] = repr(default_burst(float(changes[rate]), loose.max_cost))
    weights: dict[str, float] = {}
    for item in args.weight or ():
        weights.update(_validated({}, enabled=False, tenant_weights=item).tenant_weights)
    if not changes and not weights:
        raise UsageError(
            "nothing to set: give at least one of --rate, --burst, --concurrency, "
            "--tenant-rate, --tenant-burst, --weight"
        )
    return changes, weights


def _tenant(raw: str) -> str:
    if TENANT_PATTERN.fullmatch(raw):
        return raw
    raise UsageError(f"--weight {raw}: invalid, expected a tenant id (letters, digits, ._:@+=/-)")


def _check_budget(
    live: Mapping[str, float | str | None], changes: Mapping[str, str], env: Settings | None
) -> None:
    """Refuse a change that would leave neither a rate nor a concurrency budget."""

    def after(name: str) -> float | str | None:
        if name in changes:
            return None if changes[name] == "none" else changes[name]
        if name in live:
            return live[name]
        return getattr(env, name) if env is not None else "unknown"

    if after("rate") is None and after("concurrency") is None:
        raise UsageError(
            "that would leave no budget: the rate and the concurrency would both be off"
        )


# --- Redis ----------------------------------------------------------------------------


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        raise UsageError("needs redis-py: pip install 'throttle_mw[redis]'") from None
    return redis


def _connect(settings: Settings) -> Any:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    url = settings.redis_url
    assert url is not None
    options: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "decode_responses": True,
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


async def _close(client: Any) -> None:
    await client.aclose()


def _is_connection_error(exc: BaseException) -> bool:
    """Redis could not be reached or did not answer in time."""
    redis = sys.modules.get("redis")
    errors: tuple[type[BaseException], ...] = (OSError,)
    if redis is not None:
        errors += (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    return isinstance(exc, errors)


def _is_redis_error(exc: BaseException) -> bool:
    """Any failure talking to Redis, including refusals (e.g. an ACL's NOPERM)."""
    redis = sys.modules.get("redis")
    return _is_connection_error(exc) or (
        redis is not None and isinstance(exc, redis.exceptions.RedisError)
    )


# --- status -----------------------------------------------------------------------------


async def _nap(seconds: float) -> None:
    """The watch loop's pause between refreshes."""
    await asyncio.sleep(seconds)


async def _status(
    args: argparse.Namespace, budget: Budget, loose: Settings, env: Settings | None, out: TextIO
) -> int:
    while True:
        try:
            report = await status(budget, loose, env, args.top)
        except Exception as exc:
            if not (args.watch and _is_connection_error(exc)):
                raise
            report = None
            text = f"Redis unreachable ({type(exc).__name__}); retrying"
        if report is not None:
            text = json.dumps(report) if args.json else render(report)
        if args.watch and not args.json and out.isatty():
            out.write(_CLEAR)
        out.write(text + "\n")
        out.flush()
        if not args.watch:
            return 0
        await _nap(args.interval)


async def status(budget: Budget, loose: Settings, env: Settings | None, top: int) -> dict[str, Any]:
    """The live state as a JSON-ready dict (the ``--json`` output)."""
    live = await budget.live_limits()
    environment = None if env is None else {name: getattr(env, name) for name in LIMITS}
    in_force: dict[str, float | str | None] = {}
    for name in LIMITS:
        if name in live:
            in_force[name] = live[name]
        elif environment is not None:
            value = environment[name]
            in_force[name] = value if value is None or value == AUTO else float(value)
    data = await budget.snapshot(_known_limits(in_force), top)
    learned = None
    if data.limits is not None and data.limits.learned:
        state = data.learned
        learned = {
            "limit": data.limits.concurrency,
            "baseline_ms": None if state is None else round(state.baseline_s * 1000.0, 3),
            "reason": None if state is None else state.reason,
        }
    # The tokens depend on the rate and burst: meaningless unless both are known here.
    known = "rate" in in_force and "burst" in in_force
    return {
        "time": round(time.time(), 3),
        "redis": redis_endpoint(loose.redis_url or "", cluster=loose.redis_cluster),
        "prefix": loose.key_prefix,
        "processes": data.processes,
        "tokens": data.tokens if known else None,
        "in_flight": data.in_flight,
        "waiting": sum(data.queued_by_priority.values()),
        "queued_by_priority": {p: data.queued_by_priority[p] for p in PRIORITIES},
        "tenants": data.tenants,
        "fair_rate": data.fair_rate,
        "limits": {"in_force": in_force, "live": live, "environment": environment},
        "learned": learned,
        "weights": {
            "live": await budget.live_weights(),
            "environment": dict(env.tenant_weights) if env is not None else {},
        },
        "busiest": [{"tenant": b.tenant, "queued": b.queued} for b in data.busiest],
    }


def _known_limits(in_force: Mapping[str, float | str | None]) -> Limits:
    """The limits this tool knows are in force; where it does not, Limits' defaults (the
    answer's tokens are then not shown)."""

    def number(name: str) -> float | None:
        value = in_force.get(name)
        return value if value is None or isinstance(value, float) else None

    concurrency = in_force.get("concurrency")
    learned = concurrency == AUTO
    return Limits(
        rate=number("rate"),
        burst=number("burst") or 1.0,
        concurrency=LimitConfig().initial
        if learned
        else (None if concurrency is None else int(float(concurrency))),
        tenant_rate=number("tenant_rate"),
        tenant_burst=number("tenant_burst") or 1.0,
        learned=learned,
    )


def render(report: Mapping[str, Any]) -> str:
    """The status for people."""
    limits = report["limits"]
    force, live, env = limits["in_force"], limits["live"], limits["environment"]
    queued = report["queued_by_priority"]
    lines = [
        f"budget {report['prefix']} on {report['redis']}: "
        f"{report['processes']} live process{'es' if report['processes'] != 1 else ''} "
        f"at {time.strftime('%H:%M:%S', time.localtime(report['time']))}",
        "",
        f"  tokens     {_tokens(report, force)}",
        f"  in flight  {report['in_flight']}{_of(force, 'concurrency', report['learned'])}",
        "  queued     "
        + "  ".join(f"{p} {queued[p]}" for p in PRIORITIES)
        + f"  ({report['waiting']} in all)",
        f"  tenants    {report['tenants']} with state; fair rate "
        f"{_num(report['fair_rate'])}/s per unit of weight",
        "",
        f"  {'limit':<13} {'in force':>10} {'live':>10} {'environment':>12}",
    ]
    for name in LIMITS:
        shown = _num(force[name]) if name in force else "?"
        override = _num(live[name]) if name in live else ""
        default = "?" if env is None else _num(env[name])
        lines.append(f"  {name:<13} {shown:>10} {override:>10} {default:>12}")
    if env is None:
        lines.append(
            "  ?: this shell has no THROTTLE_RATE/THROTTLE_CONCURRENCY: each process's own"
        )
    learned = report["learned"]
    if learned is not None:
        baseline = learned["baseline_ms"]
        lines += [
            "",
            f"  learned    concurrency limit {learned['limit']}; baseline "
            + ("not measured yet" if not baseline else f"{baseline:.1f} ms")
            + f"; last step: {learned['reason'] or 'none yet'}",
        ]
    weights = report["weights"]
    lines += [
        "",
        f"  weights    live: {_pairs(weights['live'])}"
        f"   environment: {_pairs(weights['environment'])}",
        "",
        "  busiest tenants (queued)",
    ]
    busiest = report["busiest"]
    lines += [f"    {b['queued']:>6}  {b['tenant']}" for b in busiest] or ["    (none waiting)"]
    return "\n".join(lines)


def _tokens(report: Mapping[str, Any], force: Mapping[str, Any]) -> str:
    if "rate" not in force or "burst" not in force:
        return "? (the rate or burst in force is each process's own)"
    if force["rate"] is None:
        return "- (no rate budget)"
    return f"{report['tokens']:.1f} of {_num(force['burst'])} (rate {_num(force['rate'])}/s)"


def _of(force: Mapping[str, Any], name: str, learned: Mapping[str, Any] | None = None) -> str:
    if learned is not None:
        return f" of {learned['limit']} (learned)"
    value = force.get(name)
    return f" of {_num(value)}" if value is not None else ""


def _num(value: float | str | None) -> str:
    if isinstance(value, str):
        return value
    return "-" if value is None else f"{value:g}"


def _pairs(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{t}={w:g}" for t, w in weights.items()) or "-"


def _describe_overrides(
    live: Mapping[str, float | str | None], weights: Mapping[str, float]
) -> str:
    limits = ", ".join(f"{k}={_num(v)}" for k, v in live.items()) or "none"
    return (
        f"live limits: {limits}\nlive weights: {_pairs(weights)}\n"
        "(every process follows from its next decision)"
    )


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
