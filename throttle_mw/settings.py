"""Settings: read once from the environment, validated eagerly.

This is the only module that reads ``os.environ``. Every bad value raises
`ConfigError` naming the variable (or keyword argument), the value and what
would be valid, so a misconfigured app stops at start-up instead of misbehaving
under load. So does every ``THROTTLE_*`` name that is not a setting (a
misspelling would leave a limit silently unset), unless it is listed in
``THROTTLE_EXTRA_VARIABLES``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qs, urlsplit

from .priorities import PRIORITIES, Priority, RouteTag, make_tag
from .scheduler import AUTO, Limits, Policy
from .scheduler.limit import LimitConfig

FailureMode = Literal["open", "closed", "local"]
FAILURE_MODES: Final = get_args(FailureMode)

#: Tenant ids: what `validate_tenant` accepts (also used for configured ids).
TENANT_MAX_LENGTH: Final = 64
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,63}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: THROTTLE_KEEP_SLOTS unset, with a concurrency budget alone (fixed or learned): the T
#: a process keeps its finished requests' slots for (README, "Kept concurrency slots";
#: chosen by measurement, docs/performance.md, branch `slotsdefault`).
DEFAULT_KEEP_SLOTS_S: Final = 0.1
#: The heartbeat renews this process's leases every third of THROTTLE_LEASE_TTL, but
#: never more often than this.
HEARTBEAT_MIN_S: Final = 0.2
#: The smallest number other than 0 any setting takes: a microsecond, a rate of one a
#: million seconds, a weight of a millionth. Below it nothing is meant, and a rate or a
#: lease time whose inverse overflows to infinity failed per request (an OverflowError for
#: every rejection of THROTTLE_RATE=1e-320, a 500) or in the background (the rate lease).
SMALLEST: Final = 1e-6
#: THROTTLE_LEASE_TTL's floor, three beats: below it a held lease lapses between two
#: beats and the fleet admits above its concurrency limit.
LEASE_TTL_MIN_S: Final = round(3 * HEARTBEAT_MIN_S, 6)

DEFAULT_MAX_WAIT_S: Final[Mapping[Priority, float]] = MappingProxyType(
    {"critical": 10.0, "high": 8.0, "normal": 5.0, "low": 2.0}
)
#: The scheduler's own defaults, which the settings' defaults are.
_POLICY: Final = Policy(max_wait_s=DEFAULT_MAX_WAIT_S)
#: A rate's default burst: this many seconds of it (at least 1, and the largest route cost).
BURST_S: Final = 0.2
#: Live limits in Redis outlive their budget's last use by this much (a week), unless set.
LIVE_LIMITS_TTL_S: Final = 7 * 86400.0
#: Redis' port and database when a URL names none.
REDIS_DEFAULT_PORT: Final = 6379


def default_burst(rate: float, max_cost: int) -> float:
    """The token bucket a rate gets unless a burst is set: a fifth of a second of it."""
    return max(1.0, float(max_cost), rate * BURST_S)


class ConfigError(ValueError):
    """A setting has a value the throttle cannot run with."""

    def __init__(self, source: str, value: object, expected: str) -> None:
        self.source = source
        self.value = value
        self.expected = expected
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(shown, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{source}={shown!s}: invalid, expected {expected}")


class UnknownVariable(ConfigError):
    """``THROTTLE_*`` variables that are not settings: most likely misspelt ones.

    Their values are never shown (a misspelt THROTTLE_REDIS_URL holds a password).
    """

    def __init__(self, names: Iterable[str], known: Collection[str]) -> None:
        self.names = sorted(names)
        hints = [f"{name}: unknown setting{_did_you_mean(name, known)}" for name in self.names]
        self.source = self.names[0]
        self.value = "(not shown)"
        self.expected = f"one of the THROTTLE_* settings, or a name listed in {EXTRA_VARIABLES}"
        ValueError.__init__(
            self,
            " ".join(hints)
            + f" (a variable not meant for throttle_mw: list it in {EXTRA_VARIABLES})",
        )


def _did_you_mean(name: str, known: Collection[str]) -> str:
    """``; did you mean THROTTLE_X?`` for the closest known name, if one is close."""
    if name.upper() in known:
        return f"; did you mean {name.upper()}?"  # only the case differs
    # Compared without the shared prefix, which would make every name look alike.
    tails = {variable.removeprefix(PREFIX): variable for variable in known}
    close = difflib.get_close_matches(name.upper().removeprefix(PREFIX), tails, n=1, cutoff=0.6)
    return f"; did you mean {tails[close[0]]}?" if close else "."


def check_variable_names(env: Mapping[str, str]) -> None:
    """Stop on any ``THROTTLE_*`` name (in any case) that is not a setting nor listed as extra.

    Deliberate extra variables (another tool's, a test harness's) are listed in
    ``THROTTLE_EXTRA_VARIABLES``: names, or prefixes ending in ``*``.
    """
    extra = _extra_variables(env.get(EXTRA_VARIABLES, ""))
    unknown = [
        name
        for name in env
        if name.upper().startswith(PREFIX)
        and name not in KNOWN_VARIABLES
        and not any(name == e or (e.endswith("*") and name.startswith(e[:-1])) for e in extra)
    ]
    if unknown:
        raise UnknownVariable(unknown, KNOWN_VARIABLES)


def _extra_variables(raw: str) -> tuple[str, ...]:
    expected = (
        f"comma-separated names of {PREFIX}* variables that are not throttle_mw's "
        f"(a trailing * matches a prefix), e.g. {PREFIX}MYAPP_MODE,{PREFIX}MYAPP_*"
    )
    entries = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    for entry in entries:
        if not _EXTRA_ENTRY.fullmatch(entry) or entry in KNOWN_VARIABLES:
            raise ConfigError(EXTRA_VARIABLES, entry, expected)
    return entries


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One entry of THROTTLE_ROUTE_PRIORITIES: a method and path glob, and its tag.

    ``*`` matches one path segment, ``**`` any number of segments.
    """

    method: str | None
    pattern: str
    tag: RouteTag
    regex: re.Pattern[str] = field(compare=False, repr=False)

    def matches(self, method: str, path: str) -> bool:
        # Starlette serves a GET route's HEAD requests with the GET endpoint.
        if (
            self.method is not None
            and self.method != method
            and (method != "HEAD" or self.method != "GET")
        ):
            return False
        return self.regex.match(path) is not None


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A rule's path as a regex, for ``match``: it matches what Starlette's router does
    (its ``^...$``: a ``$`` also matches before a final newline, and every part of a
    path, ``%0A`` decoded included, may hold newlines), so a path the app serves cannot
    dodge its rule."""
    parts = re.split(r"(\*\*|\*)", pattern)
    out = []
    for part in parts:
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + "$", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the throttle is configured with. Build it with `Settings.from_env`."""

    enabled: bool = True
    redis_url: str | None = None
    #: The URL names a Redis Cluster node (keys of one budget share one slot).
    redis_cluster: bool = False
    key_prefix: str = "throttle"
    #: Fleet-wide admissions per second; None: no rate budget.
    rate: float | None = None
    #: Token bucket capacity; defaults to a fifth of a second of `rate` (at least 1).
    burst: float | None = None
    #: Fleet-wide requests in flight; ``"auto"``: learned from the app's latency (the
    #: default when no budget is set); None: no concurrency budget.
    concurrency: int | Literal["auto"] | None = None
    #: Bounds of a learned limit (``THROTTLE_CONCURRENCY=auto`` only); None: the default.
    concurrency_min: int | None = None
    concurrency_max: int | None = None
    tenant_header: str = "x-tenant-id"
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    tenant_rate: float | None = None
    tenant_burst: float | None = None
    max_wait_s: Mapping[Priority, float] = field(default_factory=lambda: DEFAULT_MAX_WAIT_S)
    queue_limit: int = _POLICY.queue_limit
    tenant_queue_limit: int | None = None
    route_priorities: tuple[RouteRule, ...] = ()
    default_priority: Priority = "normal"
    failure_mode: FailureMode = "local"
    dry_run: bool = False
    #: Seconds of its fair share a tenant may bank while it sends less than that share.
    credit_s: float = _POLICY.credit_s
    #: A concurrency lease left unrenewed this long is given back (crashed workers).
    lease_ttl_s: float = 30.0
    #: T of a process's lease of rate tokens (Redis, rate budgets only); 0 (``off``): no
    #: leases, every admission decided in Redis; "auto": T chosen by the library, leases
    #: only while this process's own rate makes them pay (ratepool.py's AUTO_LEASE_S,
    #: AUTO_MIN_TOKENS). Unset: "auto" for a rate alone (no concurrency budget, no
    #: tenant rate), 0 otherwise (`_finish`); this field's own default is for settings
    #: not read by `from_env` (a disabled throttle).
    rate_lease_s: float | Literal["auto"] = 0.0
    #: T a process keeps its finished requests' concurrency slots for its next ones
    #: (Redis, concurrency budgets only); 0 (``off``): every slot is released at once.
    #: Unset: DEFAULT_KEEP_SLOTS_S for a concurrency budget alone (no rate, no tenant
    #: rate), 0 otherwise (`_finish`); this field's own default is for settings not read
    #: by `from_env` (a disabled throttle).
    keep_slots_s: float = 0.0
    #: Socket timeout for Redis calls; beyond it the failure mode applies.
    redis_timeout_s: float = 0.25
    #: Tenant states kept at most (idle ones are evicted first).
    max_tenants: int = _POLICY.max_tenants
    #: Idle tenants' state is dropped after this many seconds.
    tenant_idle_s: float = _POLICY.tenant_idle_s
    #: Live limits and weights (``throttle-mw set``) outlast this long the last process
    #: that used the budget (refreshed while it is in use): a week.
    live_limits_ttl_s: float = LIVE_LIMITS_TTL_S
    #: Resolver hook: ``(scope) -> tenant id (str or int) | None``, replacing the header lookup.
    tenant_resolver: Callable[[Any], str | bytes | int | None] | None = None
    #: Request body bytes read ahead before a request asks for budget (0: none).
    body_buffer_bytes: int = 256 * 1024
    #: All bodies read ahead in this process at once, in bytes.
    body_buffer_total_bytes: int = 32 * 1024 * 1024
    #: A body (up to `body_buffer_bytes`) not received within this gets a 408.
    receive_timeout_s: float = 30.0
    #: An admitted request's slot waits on a slow client at most this long in all.
    client_hold_s: float = 2.0
    #: Cancel the app's work for a request whose client left while the app ran (its
    #: slot then comes back at once); off: the slot is held until the handler returns.
    cancel_on_disconnect: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``THROTTLE_*`` variables, apply keyword overrides, validate everything."""
        env = os.environ if environ is None else environ
        # First: a misspelt name explains a missing or wrong value better than that value.
        check_variable_names(env)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                unknown[0], overrides[unknown[0]], f"one of {', '.join(sorted(names))}"
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, (var, parse) in _PARSERS.items():
            if name in overrides:
                raw, source = overrides[name], f"{name} (keyword argument)"
            elif var in env and env[var].strip() != "":
                raw, source = env[var], var
            else:
                continue
            values[name] = parse(raw, source)
            sources[name] = source
        if "tenant_resolver" in overrides:
            resolver = overrides["tenant_resolver"]
            if resolver is not None and not callable(resolver):
                raise ConfigError("tenant_resolver", resolver, "a callable (scope) -> str | None")
            values["tenant_resolver"] = resolver
        return _finish(values, sources)

    @property
    def queue_limit_per_tenant(self) -> int:
        """THROTTLE_TENANT_QUEUE_LIMIT, by default a tenth of the fleet-wide limit."""
        if self.tenant_queue_limit is not None:
            return self.tenant_queue_limit
        return max(1, self.queue_limit // 10) if self.queue_limit else 0

    @property
    def max_cost(self) -> int:
        return max([1, *(r.tag.cost for r in self.route_priorities)])

    @property
    def learns_concurrency(self) -> bool:
        """The concurrency limit is learned (``THROTTLE_CONCURRENCY=auto``)."""
        return self.concurrency == AUTO

    def limit_config(self) -> LimitConfig:
        """How a learned limit is bounded (`learns_concurrency`)."""
        default = _LIMIT_DEFAULTS
        low = max(self.max_cost, self.concurrency_min or default.minimum)
        high = max(low, self.concurrency_max or default.maximum)
        initial = min(max(default.initial, low), high)
        return LimitConfig(minimum=low, maximum=high, initial=initial)

    def limits(self) -> Limits:
        """The budget these settings ask the scheduler for (a learned limit starts at
        its initial value)."""
        concurrency = self.concurrency
        if concurrency == AUTO:
            concurrency = self.limit_config().initial
        return Limits(
            rate=self.rate,
            burst=self.burst if self.burst is not None else 1.0,
            concurrency=concurrency,
            learned=self.learns_concurrency,
            weights=dict(self.tenant_weights),
            tenant_rate=self.tenant_rate,
            tenant_burst=self.tenant_burst if self.tenant_burst is not None else 1.0,
        )

    def policy(self) -> Policy:
        """The scheduler's queueing rules from these settings."""
        return Policy(
            max_wait_s=self.max_wait_s,
            queue_limit=self.queue_limit,
            tenant_queue_limit=self.queue_limit_per_tenant,
            credit_s=self.credit_s,
            tenant_idle_s=self.tenant_idle_s,
            max_tenants=self.max_tenants,
        )


def _source_of(sources: Mapping[str, str], name: str) -> str:
    return sources.get(name, _PARSERS[name][0])


def _finish(values: dict[str, Any], sources: dict[str, str]) -> Settings:
    settings = Settings(**values)
    if not settings.enabled:
        return settings
    if settings.rate is None and settings.concurrency is None:
        # No budget set: protect the app anyway, with a limit learned from its latency.
        values["concurrency"] = AUTO
        settings = Settings(**values)
    for bound in ("concurrency_min", "concurrency_max"):
        if getattr(settings, bound) is not None and not settings.learns_concurrency:
            raise ConfigError(
                _source_of(sources, bound),
                getattr(settings, bound),
                "THROTTLE_CONCURRENCY=auto (bounds of a learned limit; "
                f"THROTTLE_CONCURRENCY is {settings.concurrency})",
            )
    low, high = settings.concurrency_min, settings.concurrency_max
    if low is not None and high is not None and high < low:
        raise ConfigError(
            _source_of(sources, "concurrency_max"),
            high,
            f"at least THROTTLE_CONCURRENCY_MIN ({low})",
        )
    if low is not None and low < settings.max_cost:
        raise ConfigError(
            _source_of(sources, "concurrency_min"),
            low,
            f"at least the largest route cost ({settings.max_cost})",
        )
    if settings.burst is not None and settings.rate is None:
        raise ConfigError(
            _source_of(sources, "burst"), settings.burst, "THROTTLE_RATE to be set too"
        )
    burst = settings.burst
    if settings.rate is not None and burst is None:
        burst = default_burst(settings.rate, settings.max_cost)
    if burst is not None and burst < settings.max_cost:
        raise ConfigError(
            _source_of(sources, "burst"),
            burst,
            f"at least the largest route cost ({settings.max_cost})",
        )
    if isinstance(settings.concurrency, int) and settings.concurrency < settings.max_cost:
        raise ConfigError(
            _source_of(sources, "concurrency"),
            settings.concurrency,
            f"at least the largest route cost ({settings.max_cost})",
        )
    tenant_burst = settings.tenant_burst
    if tenant_burst is not None and settings.tenant_rate is None:
        raise ConfigError(
            _source_of(sources, "tenant_burst"), tenant_burst, "THROTTLE_TENANT_RATE to be set too"
        )
    if settings.tenant_rate is not None and tenant_burst is None:
        tenant_burst = default_burst(settings.tenant_rate, settings.max_cost)
    if tenant_burst is not None and tenant_burst < settings.max_cost:
        raise ConfigError(
            _source_of(sources, "tenant_burst"),
            tenant_burst,
            f"at least the largest route cost ({settings.max_cost})",
        )
    if "rate_lease_s" not in values:
        # Unset: leases where they apply (a rate alone), the exact path elsewhere.
        leasable = (
            settings.rate is not None
            and settings.concurrency is None
            and settings.tenant_rate is None
        )
        values["rate_lease_s"] = "auto" if leasable else 0.0
    elif settings.rate_lease_s:
        _check_rate_lease(settings, sources)
    if "keep_slots_s" not in values:
        # Unset: kept slots where they apply (a concurrency budget alone), none elsewhere.
        keepable = (
            settings.concurrency is not None
            and settings.rate is None
            and settings.tenant_rate is None
        )
        values["keep_slots_s"] = DEFAULT_KEEP_SLOTS_S if keepable else 0.0
    elif settings.keep_slots_s:
        _check_keep_slots(settings, sources)
    if settings.body_buffer_total_bytes < settings.body_buffer_bytes:
        raise ConfigError(
            _source_of(sources, "body_buffer_total_bytes"),
            settings.body_buffer_total_bytes,
            f"at least THROTTLE_BODY_BUFFER ({settings.body_buffer_bytes} bytes)",
        )
    limit = settings.queue_limit_per_tenant
    if limit > settings.queue_limit:
        raise ConfigError(
            _source_of(sources, "tenant_queue_limit"),
            limit,
            f"at most THROTTLE_QUEUE_LIMIT ({settings.queue_limit})",
        )
    return Settings(
        **{**values, "burst": burst, "tenant_burst": tenant_burst, "tenant_queue_limit": limit}
    )


def _check_rate_lease(settings: Settings, sources: dict[str, str]) -> None:
    """Leases of rate tokens take whole tokens out of the bucket for one process: only a
    rate budget alone can be spent that way. A concurrency budget must count each request
    in flight, and a tenant's rate cap (guarantee 6) each tenant's admissions, in Redis.
    (Without THROTTLE_REDIS_URL the setting is ignored: one process decides in memory.)"""
    source = _source_of(sources, "rate_lease_s")
    if settings.rate is None:
        raise ConfigError(source, settings.rate_lease_s, "THROTTLE_RATE to be set too")
    if settings.concurrency is not None:
        raise ConfigError(
            source,
            settings.rate_lease_s,
            "no concurrency budget (leases are for a rate budget alone; "
            f"THROTTLE_CONCURRENCY is {settings.concurrency})",
        )
    if settings.tenant_rate is not None:
        raise ConfigError(
            source,
            settings.rate_lease_s,
            "no THROTTLE_TENANT_RATE (a tenant's cap is counted per request in Redis)",
        )


def _check_keep_slots(settings: Settings, sources: dict[str, str]) -> None:
    """A kept slot admits the next request without Redis: only a concurrency budget alone
    allows that (the slot is still counted in flight there). A rate, the fleet's or a
    tenant's, must take each admission's tokens in Redis. A learned limit is fine: its
    value comes with every reply, and a change gives the kept slots back."""
    source = _source_of(sources, "keep_slots_s")
    if settings.concurrency is None:
        raise ConfigError(source, settings.keep_slots_s, "THROTTLE_CONCURRENCY to be set too")
    if settings.rate is not None:
        raise ConfigError(
            source,
            settings.keep_slots_s,
            "no THROTTLE_RATE (kept slots are for a concurrency budget alone; "
            "each admission's tokens are taken in Redis)",
        )
    if settings.tenant_rate is not None:
        raise ConfigError(
            source,
            settings.keep_slots_s,
            "no THROTTLE_TENANT_RATE (a tenant's cap is counted per request in Redis)",
        )


# --- parsers: each takes a raw value (an env string or a keyword value) and its source ---


def _bool(raw: object, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(source, raw, "true or false")


def _number(
    raw: object, source: str, *, what: str, low: float, high: float, low_open: bool
) -> float:
    if isinstance(raw, bool):
        raise ConfigError(source, raw, what)
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(source, raw, what) from None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise ConfigError(source, raw, what)
    if value and abs(value) < SMALLEST:
        raise ConfigError(source, raw, f"{what} (a value other than 0 is at least {SMALLEST:g})")
    return value


def _positive(what: str, high: float = 1e6) -> Callable[[object, str], float]:
    def parse(raw: object, source: str) -> float:
        return _number(raw, source, what=what, low=0.0, high=high, low_open=True)

    return parse


def _at_least_one(what: str) -> Callable[[object, str], float]:
    def parse(raw: object, source: str) -> float:
        return _number(raw, source, what=what, low=1.0, high=1e7, low_open=False)

    return parse


def _seconds(what: str, *, allow_zero: bool = False) -> Callable[[object, str], float]:
    def parse(raw: object, source: str) -> float:
        return _number(raw, source, what=what, low=0.0, high=86400.0, low_open=not allow_zero)

    return parse


def _lease_ttl(raw: object, source: str) -> float:
    what = f"seconds >= {LEASE_TTL_MIN_S:g} (renewed every third of it), e.g. 30"
    return _number(raw, source, what=what, low=LEASE_TTL_MIN_S, high=86400.0, low_open=False)


def _rate_lease(raw: object, source: str) -> float | Literal["auto"]:
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"
    return _pool_seconds(raw, source, "auto, off, or seconds from 0 (off) to 10, e.g. 0.1")


def _keep_slots(raw: object, source: str) -> float:
    return _pool_seconds(raw, source, "off, or seconds from 0 (off) to 10, e.g. 0.1")


def _pool_seconds(raw: object, source: str, what: str) -> float:
    """A pool's T (THROTTLE_RATE_LEASE, THROTTLE_KEEP_SLOTS): `off` or 0-10 seconds."""
    if isinstance(raw, str) and raw.strip().lower() == "off":
        return 0.0
    return _number(raw, source, what=what, low=0.0, high=10.0, low_open=False)


def _count(what: str, *, low: int, high: int = 10_000_000) -> Callable[[object, str], int]:
    def parse(raw: object, source: str) -> int:
        text = raw.strip() if isinstance(raw, str) else raw
        if isinstance(text, bool) or not isinstance(text, int | str):
            raise ConfigError(source, raw, what)
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(source, raw, what) from None
        if not low <= value <= high:
            raise ConfigError(source, raw, what)
        return value

    return parse


_SIZE = re.compile(r"(\d+)\s*(|b|k|kb|kib|m|mb|mib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10}
_UNITS.update({"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20})


def _size(what: str, *, low: int) -> Callable[[object, str], int]:
    """Bytes: a whole number, or with a K/M suffix (KiB, MiB), e.g. 256K."""

    def parse(raw: object, source: str) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            match = _SIZE.fullmatch(raw.strip()) if isinstance(raw, str) else None
            if match is None:
                raise ConfigError(source, raw, what)
            unit = match.group(2).lower()
            value = int(match.group(1)) * _UNITS[unit]
        if not low <= value <= 1 << 40:
            raise ConfigError(source, raw, what)
        return value

    return parse


def _redis_url(raw: object, source: str) -> str:
    expected = "a redis://, rediss:// or unix:// URL, e.g. redis://:password@host:6379/0"
    if not isinstance(raw, str):
        raise ConfigError(source, "(not a string)", expected)
    try:
        url = urlsplit(raw.strip())
        url.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise ConfigError(source, "(unparsable URL)", expected) from None
    if url.scheme not in ("redis", "rediss", "unix") or (url.scheme != "unix" and not url.hostname):
        # Never echo the URL: it may hold a password.
        raise ConfigError(source, f"(a {url.scheme or 'scheme-less'} URL)", expected)
    return raw.strip()


def redis_endpoint(url: str, *, cluster: bool = False) -> str:
    """Which Redis a URL names, for logs and the CLI: scheme, host, port and database.

    Never the user name, the password or any other query option (redis-py reads
    ``?password=`` too). Ports and databases are shown even when the URL leaves
    them to the defaults, so a wrong address is plain to see.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "(unparsable Redis URL)"
    query = parse_qs(parts.query)
    db = (query.get("db") or [parts.path.strip("/") if parts.scheme != "unix" else ""])[0]
    db = db if db.isdigit() else "0"
    if parts.scheme == "unix":
        where = f"unix://{parts.path}?db={db}"
    else:
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"  # IPv6
        where = f"{parts.scheme or 'redis'}://{host}:{port or REDIS_DEFAULT_PORT}"
        where += " (cluster)" if cluster else f"/{db}"
    return where


def _prefix(raw: object, source: str) -> str:
    if isinstance(raw, str) and _PREFIX.fullmatch(raw.strip()):
        return raw.strip()
    raise ConfigError(source, raw, "1-64 characters of letters, digits and . _ : - (no braces)")


#: Request headers that cannot name a tenant. Framing (the body's length or coding) and
#: hop-by-hop headers (RFC 9110 7.6.1; not even sent over HTTP/2 and 3, RFC 9113 8.2.2)
#: describe the connection, not whom a request is for. Credentials would put a secret in
#: clear where tenant ids go (logs, ``request.state.throttle``, observers, metrics): header
#: values are used as they are, only a resolver's are hashed; map a credential to its
#: tenant with a resolver instead. ``host`` stays allowed: a tenant per domain is a real
#: set-up (servers pass HTTP/2's ``:authority`` as ``host``).
NOT_TENANT_HEADERS: Final = frozenset(
    (
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "authorization",
        "proxy-authorization",
        "cookie",
    )
)


def _header(raw: object, source: str) -> str:
    if isinstance(raw, str) and _TOKEN.fullmatch(raw.strip()):
        name = raw.strip().lower()
        if name in NOT_TENANT_HEADERS:
            raise ConfigError(
                source,
                raw,
                "a header naming the tenant, e.g. X-Tenant-ID; not a framing, hop-by-hop "
                "or credential header (for a tenant from a credential, pass tenant_resolver)",
            )
        return name
    raise ConfigError(source, raw, "an HTTP header name, e.g. X-Tenant-ID")


def _tenant_id(raw: str, source: str, whole: object) -> str:
    if not TENANT_PATTERN.fullmatch(raw):
        raise ConfigError(
            source,
            whole,
            f"tenant ids of 1-{TENANT_MAX_LENGTH} letters, digits and . _ : @ + = / -",
        )
    return raw


def _pairs(raw: object, source: str, expected: str) -> list[tuple[str, str]]:
    if not isinstance(raw, str):
        raise ConfigError(source, raw, expected)
    pairs = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(source, raw, expected)
        pairs.append((key.strip(), value.strip()))
    return pairs


def _weights(raw: object, source: str) -> Mapping[str, float]:
    expected = "tenant=weight pairs with weights from 1e-06 to 1000, e.g. acme=3,globex=2"
    if isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    else:
        items = list(_pairs(raw, source, expected))
    weights: dict[str, float] = {}
    for tenant, value in items:
        _tenant_id(tenant, source, raw)
        try:
            weights[tenant] = _number(
                value, source, what=expected, low=0.0, high=1000.0, low_open=True
            )
        except ConfigError:
            raise ConfigError(source, raw, expected) from None
    return MappingProxyType(weights)


def _max_wait(raw: object, source: str) -> Mapping[Priority, float]:
    expected = (
        "seconds in [0, 3600], one number or per priority, e.g. critical=10,normal=5,low=2 "
        f"(priorities: {', '.join(PRIORITIES)})"
    )

    def seconds(value: object) -> float:
        return _number(value, source, what=expected, low=0.0, high=3600.0, low_open=False)

    if isinstance(raw, int | float | str) and not isinstance(raw, bool):
        text = raw.strip() if isinstance(raw, str) else raw
        if not isinstance(text, str) or "=" not in text:
            one = seconds(text)
            return MappingProxyType(dict.fromkeys(PRIORITIES, one))
        items: list[tuple[str, object]] = list(_pairs(text, source, expected))
    elif isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    else:
        raise ConfigError(source, raw, expected)
    waits = dict(DEFAULT_MAX_WAIT_S)
    for name, value in items:
        if name not in PRIORITIES:
            raise ConfigError(source, raw, expected)
        try:
            waits[name] = seconds(value)
        except ConfigError:
            raise ConfigError(source, raw, expected) from None
    return MappingProxyType(waits)


def _route_rules(raw: object, source: str) -> tuple[RouteRule, ...]:
    expected = (
        "comma-separated [METHOD ]/path=priority[:sheddable|:degradable|:cost=N] entries, "
        "e.g. POST /api/surveys/*/responses=critical,GET /api/stats/*=low:sheddable,"
        "GET /healthz=exempt"
    )
    if isinstance(raw, tuple | list) and all(isinstance(r, RouteRule) for r in raw):
        return tuple(raw)
    if not isinstance(raw, str):
        raise ConfigError(source, raw, expected)
    rules = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        target, sep, spec = entry.strip().partition("=")
        words = target.split()
        if not sep or len(words) not in (1, 2) or not words[-1].startswith("/"):
            raise ConfigError(source, entry.strip(), expected)
        method = words[0].upper() if len(words) == 2 else None
        if method is not None and not _TOKEN.fullmatch(method):
            raise ConfigError(source, entry.strip(), expected)
        level, *flags = [part.strip() for part in spec.split(":")]
        options: dict[str, Any] = {}
        for flag in flags:
            if flag in ("sheddable", "degradable"):
                options[flag] = True
            elif flag.startswith("cost="):
                options["cost"] = int(_count(expected, low=1, high=1_000_000)(flag[5:], source))
            else:
                raise ConfigError(source, entry.strip(), expected)
        try:
            tag = make_tag(level, **options)
        except ValueError:
            raise ConfigError(source, entry.strip(), expected) from None
        rules.append(RouteRule(method, words[-1], tag, compile_glob(words[-1])))
    return tuple(rules)


def _default_priority(raw: object, source: str) -> Priority:
    if isinstance(raw, str) and raw.strip() in PRIORITIES:
        return raw.strip()  # type: ignore[return-value]
    raise ConfigError(source, raw, f"one of {', '.join(PRIORITIES)}")


_LIMIT_DEFAULTS: Final = LimitConfig()
_CONCURRENCY_COUNT = _count("", low=1)


def _concurrency(raw: object, source: str) -> int | Literal["auto"]:
    if isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    try:
        return _CONCURRENCY_COUNT(raw, source)
    except ConfigError:
        raise ConfigError(
            source, raw, "a whole number >= 1 of requests in flight, e.g. 8, or auto"
        ) from None


def _failure_mode(raw: object, source: str) -> FailureMode:
    if isinstance(raw, str) and raw.strip().lower() in FAILURE_MODES:
        return raw.strip().lower()  # type: ignore[return-value]
    raise ConfigError(source, raw, f"one of {', '.join(FAILURE_MODES)}")


_PARSERS: Final[dict[str, tuple[str, Callable[[Any, str], Any]]]] = {
    "enabled": ("THROTTLE_ENABLED", _bool),
    "redis_url": ("THROTTLE_REDIS_URL", _redis_url),
    "redis_cluster": ("THROTTLE_REDIS_CLUSTER", _bool),
    "key_prefix": ("THROTTLE_KEY_PREFIX", _prefix),
    "rate": ("THROTTLE_RATE", _positive("a positive number of admissions per second, e.g. 80")),
    "burst": ("THROTTLE_BURST", _at_least_one("a number >= 1 of tokens")),
    "concurrency": ("THROTTLE_CONCURRENCY", _concurrency),
    "concurrency_min": (
        "THROTTLE_CONCURRENCY_MIN",
        _count("a whole number >= 1 of requests in flight, the learned limit's floor", low=1),
    ),
    "concurrency_max": (
        "THROTTLE_CONCURRENCY_MAX",
        _count("a whole number >= 1 of requests in flight, the learned limit's ceiling", low=1),
    ),
    "tenant_header": ("THROTTLE_TENANT_HEADER", _header),
    "tenant_weights": ("THROTTLE_TENANT_WEIGHTS", _weights),
    "tenant_rate": (
        "THROTTLE_TENANT_RATE",
        _positive("a positive number of admissions per second per tenant"),
    ),
    "tenant_burst": ("THROTTLE_TENANT_BURST", _at_least_one("a number >= 1 of tokens per tenant")),
    "max_wait_s": ("THROTTLE_MAX_WAIT", _max_wait),
    "queue_limit": (
        "THROTTLE_QUEUE_LIMIT",
        _count("a whole number >= 0 of waiting requests", low=0),
    ),
    "tenant_queue_limit": (
        "THROTTLE_TENANT_QUEUE_LIMIT",
        _count("a whole number >= 0 of waiting requests per tenant", low=0),
    ),
    "route_priorities": ("THROTTLE_ROUTE_PRIORITIES", _route_rules),
    "default_priority": ("THROTTLE_DEFAULT_PRIORITY", _default_priority),
    "failure_mode": ("THROTTLE_FAILURE_MODE", _failure_mode),
    "dry_run": ("THROTTLE_DRY_RUN", _bool),
    "credit_s": ("THROTTLE_CREDIT", _seconds("seconds >= 0 of banked share", allow_zero=True)),
    "lease_ttl_s": ("THROTTLE_LEASE_TTL", _lease_ttl),
    "rate_lease_s": ("THROTTLE_RATE_LEASE", _rate_lease),
    "keep_slots_s": ("THROTTLE_KEEP_SLOTS", _keep_slots),
    "redis_timeout_s": ("THROTTLE_REDIS_TIMEOUT", _seconds("seconds > 0, e.g. 0.25")),
    "max_tenants": ("THROTTLE_MAX_TENANTS", _count("a whole number >= 1 of tenants", low=1)),
    "tenant_idle_s": ("THROTTLE_TENANT_IDLE", _seconds("seconds > 0, e.g. 60")),
    "live_limits_ttl_s": (
        "THROTTLE_LIVE_LIMITS_TTL",
        _positive("seconds > 0, at most a year, e.g. 604800 (a week)", high=365 * 86400.0),
    ),
    "body_buffer_bytes": (
        "THROTTLE_BODY_BUFFER",
        _size("bytes >= 0 read ahead per request, e.g. 262144 or 256K", low=0),
    ),
    "body_buffer_total_bytes": (
        "THROTTLE_BODY_BUFFER_TOTAL",
        _size("bytes >= 1 read ahead per process in all, e.g. 32M", low=1),
    ),
    "receive_timeout_s": ("THROTTLE_RECEIVE_TIMEOUT", _seconds("seconds > 0, e.g. 30")),
    "client_hold_s": ("THROTTLE_CLIENT_HOLD", _seconds("seconds > 0, e.g. 2")),
    "cancel_on_disconnect": ("THROTTLE_CANCEL_ON_DISCONNECT", _bool),
}


PREFIX: Final = "THROTTLE_"
#: Lists the deliberate ``THROTTLE_*`` variables that are not throttle_mw's (see
#: `check_variable_names`).
EXTRA_VARIABLES: Final = "THROTTLE_EXTRA_VARIABLES"
#: Every ``THROTTLE_*`` name throttle_mw reads; any other one stops start-up.
KNOWN_VARIABLES: Final = frozenset(
    [*(variable for variable, _ in _PARSERS.values()), EXTRA_VARIABLES]
)
_EXTRA_ENTRY = re.compile(r"THROTTLE_[A-Za-z0-9_]*\*?")


def env_variable(name: str) -> str:
    """The environment variable behind a settings field."""
    return _PARSERS[name][0]
