"""``throttle-mw`` (``python -m throttle_mw``): a budget's live state in Redis, and its live limits.

``status`` (the default) shows tokens, requests in flight, queue depth per
priority, live processes, the limits in force and the busiest tenants.
``set`` changes limits and tenant weights at run time; ``reset`` removes those
live overrides, so each process's ``THROTTLE_*`` values apply again.

Live limits are fields of the hash ``{prefix}:cfg`` and live weights of
``{prefix}:w`` (by tenant digest); the Lua scripts read both on every call,
so every process of the fleet follows from its next decision. This tool also
keeps the names behind those digests in ``{prefix}:wn``, only to show them.

The connection comes from ``--redis-url`` / ``--prefix`` or the app's own
``THROTTLE_REDIS_URL`` / ``THROTTLE_KEY_PREFIX``. Run it where the app's
``THROTTLE_*`` variables are set and it shows them as the defaults the live
overrides replace. Exit codes: 0 done, 1 Redis unreachable or refused, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn, TextIO
from urllib.parse import urlsplit

from .priorities import PRIORITIES
from .settings import TENANT_PATTERN, ConfigError, Settings

#: The live limits, as fields of ``{prefix}:cfg``.
LIMITS: Final = ("rate", "burst", "concurrency", "tenant_rate", "tenant_burst")
#: Limits a live override may switch off (the stored value ``none``).
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
        redis = _redis_module()
        client = _connect(redis, loose)
        try:
            return _run(args, client, loose, env)
        finally:
            _close(client)
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


def _run(args: argparse.Namespace, client: Any, loose: Settings, env: Settings | None) -> int:
    command = args.command or "status"
    budget = Budget(client, loose.key_prefix)
    if command == "set":
        changes, weights = _changes(args, loose)
        _check_budget(budget.live_limits(), changes, env)
        budget.set(changes, weights)
        print(_describe_overrides(budget.live_limits(), budget.live_weights()))
        return 0
    if command == "reset":
        fields = [name for name in LIMITS if getattr(args, name)]
        tenants = [_tenant(t) for t in args.weight or ()]
        everything = not (fields or tenants or args.weights)
        budget.reset(fields, tenants, everything=everything, all_weights=args.weights)
        print(_describe_overrides(budget.live_limits(), budget.live_weights()))
        return 0
    return _status(args, budget, loose, env, sys.stdout)


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
    change.add_argument("--concurrency", metavar="N|none", help="fleet-wide requests in flight")
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
            changes[burst] = repr(max(1.0, float(loose.max_cost), float(changes[rate]) / 5.0))
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
    live: Mapping[str, float | None], changes: Mapping[str, str], env: Settings | None
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


def _connect(redis: Any, settings: Settings) -> Any:
    options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "decode_responses": True}
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def _close(client: Any) -> None:
    # redis-py's RedisCluster.close() leaves its nodes' pools connected.
    disconnect = getattr(client, "disconnect_connection_pools", None)
    if disconnect is not None:
        disconnect()
    client.close()


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


class Budget:
    """One budget's keys in Redis, as this tool reads and writes them."""

    def __init__(self, client: Any, prefix: str) -> None:
        from .backends.redis.keys import hash_tag, state_key

        self.client = client
        self.tag = hash_tag(prefix)
        self.state_key = state_key(self.tag)
        self.cfg_key = f"{self.tag}:cfg"
        self.weights_key = f"{self.tag}:w"
        self.names_key = f"{self.tag}:wn"

    def live_limits(self) -> dict[str, float | None]:
        """The overridden limits only (None: switched off)."""
        raw = self.client.hgetall(self.cfg_key)
        return {k: None if raw[k] == "none" else float(raw[k]) for k in LIMITS if k in raw}

    def live_weights(self) -> dict[str, float]:
        """Live weights by tenant name (a digest's first 12 characters when the name is lost)."""
        weights = self.client.hgetall(self.weights_key)
        names = self.client.hgetall(self.names_key) if weights else {}
        return {names.get(h, "#" + h[:12]): float(w) for h, w in sorted(weights.items())}

    def set(self, changes: Mapping[str, str], weights: Mapping[str, float]) -> None:
        from .backends.redis.keys import tenant_digest

        pipe = self.client.pipeline(transaction=False)
        if changes:
            pipe.hset(self.cfg_key, mapping=dict(changes))
        for tenant, weight in weights.items():
            digest = tenant_digest(tenant)
            pipe.hset(self.weights_key, digest, repr(weight))
            pipe.hset(self.names_key, digest, tenant)
        pipe.execute()

    def reset(
        self,
        fields: Sequence[str],
        tenants: Sequence[str],
        *,
        everything: bool = False,
        all_weights: bool = False,
    ) -> None:
        from .backends.redis.keys import tenant_digest

        if everything:
            self.client.delete(self.cfg_key, self.weights_key, self.names_key)
            return
        if all_weights:
            self.client.delete(self.weights_key, self.names_key)
        if fields:
            self.client.hdel(self.cfg_key, *fields)
        if tenants:
            digests = [tenant_digest(t) for t in tenants]
            self.client.hdel(self.weights_key, *digests)
            self.client.hdel(self.names_key, *digests)

    def snapshot(self, defaults: Mapping[str, float | int | None], top: int) -> dict[str, Any]:
        """snapshot.lua's answer: the live state, with `defaults` as this caller's limits."""
        from .backends.redis.scripts import source

        def opt(name: str) -> str:
            value = defaults.get(name)
            return "" if value is None else repr(float(value))

        script = self.client.register_script(source("snapshot"))
        raw = script(keys=[self.state_key], args=["", self.tag, *map(opt, LIMITS), str(top)])
        data: dict[str, Any] = json.loads(raw)
        return data


# --- status -----------------------------------------------------------------------------


def _status(
    args: argparse.Namespace, budget: Budget, loose: Settings, env: Settings | None, out: TextIO
) -> int:
    while True:
        try:
            report = status(budget, loose, env, args.top)
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
        time.sleep(args.interval)


def status(budget: Budget, loose: Settings, env: Settings | None, top: int) -> dict[str, Any]:
    """The live state as a JSON-ready dict (the ``--json`` output)."""
    live = budget.live_limits()
    environment = None if env is None else {name: getattr(env, name) for name in LIMITS}
    in_force: dict[str, float | None] = {}
    for name in LIMITS:
        if name in live:
            in_force[name] = live[name]
        elif environment is not None:
            value = environment[name]
            in_force[name] = None if value is None else float(value)
    data = budget.snapshot(in_force, top)
    # The tokens depend on the rate and burst: meaningless unless both are known here.
    known = "rate" in in_force and "burst" in in_force
    return {
        "time": round(time.time(), 3),
        "redis": redact(loose.redis_url or ""),
        "prefix": loose.key_prefix,
        "processes": int(data["processes"]),
        "tokens": data["tokens"] if known else None,
        "in_flight": int(data["in_flight"]),
        "waiting": int(data["waiting"]),
        "queued_by_priority": {p: int(data["queued_by_priority"][p]) for p in PRIORITIES},
        "tenants": int(data["tenants"]),
        "fair_rate": float(data["fair_rate"]),
        "limits": {"in_force": in_force, "live": live, "environment": environment},
        "weights": {
            "live": budget.live_weights(),
            "environment": dict(env.tenant_weights) if env is not None else {},
        },
        "busiest": [
            {"tenant": b["tenant"], "queued": int(b["queued"])} for b in data.get("busiest") or []
        ],
    }


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
        f"  in flight  {report['in_flight']}{_of(force, 'concurrency')}",
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


def _of(force: Mapping[str, Any], name: str) -> str:
    value = force.get(name)
    return f" of {_num(value)}" if value is not None else ""


def _num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def _pairs(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{t}={w:g}" for t, w in weights.items()) or "-"


def _describe_overrides(live: Mapping[str, float | None], weights: Mapping[str, float]) -> str:
    limits = ", ".join(f"{k}={_num(v)}" for k, v in live.items()) or "none"
    return (
        f"live limits: {limits}\nlive weights: {_pairs(weights)}\n"
        "(every process follows from its next decision)"
    )


def redact(url: str) -> str:
    """The URL without its password (and user name)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
