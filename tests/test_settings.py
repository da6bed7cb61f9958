"""Configuration: every bad value stops start-up with a message naming variable, value and fix."""

from __future__ import annotations

import re

import pytest

from throttle_mw import ConfigError, Settings


def test_no_budget_set_learns_the_concurrency_limit() -> None:
    settings = Settings.from_env({})
    assert settings.concurrency == "auto"
    assert settings.learns_concurrency
    limits = settings.limits()
    assert limits.learned
    assert limits.rate is None
    config = settings.limit_config()
    assert limits.concurrency == config.initial
    assert config.minimum <= config.initial <= config.maximum


def test_numbers_set_mean_exactly_those_numbers() -> None:
    for env in ({"THROTTLE_RATE": "5"}, {"THROTTLE_CONCURRENCY": "8"}):
        settings = Settings.from_env(env)
        assert not settings.learns_concurrency
        assert not settings.limits().learned
    assert Settings.from_env({"THROTTLE_RATE": "5"}).concurrency is None
    assert Settings.from_env({"THROTTLE_CONCURRENCY": "8"}).limits().concurrency == 8


def test_auto_with_a_rate_and_bounds() -> None:
    env = {
        "THROTTLE_RATE": "80",
        "THROTTLE_CONCURRENCY": " Auto ",
        "THROTTLE_CONCURRENCY_MIN": "10",
        "THROTTLE_CONCURRENCY_MAX": "40",
    }
    settings = Settings.from_env(env)
    assert settings.rate == 80.0
    assert settings.learns_concurrency
    config = settings.limit_config()
    assert (config.minimum, config.maximum) == (10, 40)
    assert config.initial == 10  # the default start, raised to the floor
    assert settings.limits().concurrency == 10


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"THROTTLE_CONCURRENCY": "eight"}, "THROTTLE_CONCURRENCY=eight: invalid.*or auto"),
        ({"THROTTLE_CONCURRENCY": "0"}, "THROTTLE_CONCURRENCY=0: invalid"),
        (
            {"THROTTLE_CONCURRENCY": "8", "THROTTLE_CONCURRENCY_MIN": "2"},
            "THROTTLE_CONCURRENCY_MIN=2: invalid, expected THROTTLE_CONCURRENCY=auto",
        ),
        (
            {"THROTTLE_RATE": "5", "THROTTLE_CONCURRENCY_MAX": "50"},
            "THROTTLE_CONCURRENCY_MAX=50: invalid, expected THROTTLE_CONCURRENCY=auto",
        ),
        (
            {"THROTTLE_CONCURRENCY_MIN": "20", "THROTTLE_CONCURRENCY_MAX": "10"},
            "THROTTLE_CONCURRENCY_MAX=10: invalid, expected at least THROTTLE_CONCURRENCY_MIN",
        ),
        ({"THROTTLE_CONCURRENCY_MIN": "zero"}, "THROTTLE_CONCURRENCY_MIN=zero: invalid"),
        (
            {
                "THROTTLE_CONCURRENCY_MIN": "2",
                "THROTTLE_ROUTE_PRIORITIES": "/big=normal:cost=5",
            },
            "THROTTLE_CONCURRENCY_MIN=2: invalid, expected at least the largest route cost",
        ),
    ],
)
def test_bad_learned_limit_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_disabled_needs_nothing() -> None:
    assert Settings.from_env({"THROTTLE_ENABLED": "false"}).enabled is False


def test_rate_sets_default_burst() -> None:
    settings = Settings.from_env({"THROTTLE_RATE": "80"})
    assert settings.rate == 80.0
    assert settings.burst == 16.0
    assert settings.concurrency is None


def test_tenant_queue_limit_defaults_to_a_tenth_of_the_fleet_limit() -> None:
    assert Settings.from_env({"THROTTLE_RATE": "80"}).queue_limit_per_tenant == 100
    settings = Settings.from_env({"THROTTLE_RATE": "80", "THROTTLE_QUEUE_LIMIT": "50"})
    assert settings.queue_limit_per_tenant == 5
    explicit = Settings.from_env({"THROTTLE_RATE": "80", "THROTTLE_TENANT_QUEUE_LIMIT": "7"})
    assert explicit.queue_limit_per_tenant == 7


def test_rate_lease_takes_seconds_auto_or_off() -> None:
    base = {"THROTTLE_RATE": "100", "THROTTLE_REDIS_URL": "redis://x"}
    assert Settings.from_env(base).rate_lease_s == "auto"  # a rate alone: auto by default
    assert Settings.from_env({**base, "THROTTLE_RATE_LEASE": "0.1"}).rate_lease_s == 0.1
    assert Settings.from_env({**base, "THROTTLE_RATE_LEASE": " Auto "}).rate_lease_s == "auto"
    assert Settings.from_env({**base, "THROTTLE_RATE_LEASE": "0"}).rate_lease_s == 0.0
    assert Settings.from_env({**base, "THROTTLE_RATE_LEASE": " OFF "}).rate_lease_s == 0.0
    assert Settings.from_env(base, rate_lease_s=0).rate_lease_s == 0.0
    assert Settings.from_env(base, rate_lease_s="off").rate_lease_s == 0.0
    assert Settings.from_env(base, rate_lease_s="auto").rate_lease_s == "auto"


@pytest.mark.parametrize(
    "env",
    [
        {},  # no rate: a learned concurrency limit
        {"THROTTLE_CONCURRENCY": "8"},
        {"THROTTLE_RATE": "100", "THROTTLE_CONCURRENCY": "8"},
        {"THROTTLE_RATE": "100", "THROTTLE_CONCURRENCY": "auto"},
        {"THROTTLE_RATE": "100", "THROTTLE_TENANT_RATE": "5"},
        {"THROTTLE_ENABLED": "false", "THROTTLE_RATE": "100"},
    ],
)
def test_rate_lease_unset_is_off_where_leases_do_not_apply(env: dict[str, str]) -> None:
    """Unset, THROTTLE_RATE_LEASE is auto only for a rate alone: a budget that counts
    requests in flight or a tenant's rate per request keeps the exact path (and starts,
    where an explicit auto or T would be refused)."""
    assert Settings.from_env(env).rate_lease_s == 0.0
    # And "off" or 0 is accepted whatever the budget (it asks for nothing).
    for off in ("off", "0"):
        assert Settings.from_env({**env, "THROTTLE_RATE_LEASE": off}).rate_lease_s == 0.0


@pytest.mark.parametrize("value", ["auto2", "-0.1", "11", "nan", "on", "offf"])
def test_a_bad_rate_lease_says_what_it_takes(value: str) -> None:
    env = {"THROTTLE_RATE": "100", "THROTTLE_RATE_LEASE": value}
    expected = "expected auto, off, or seconds from 0 (off) to 10, e.g. 0.1"
    with pytest.raises(
        ConfigError, match=re.escape(f"THROTTLE_RATE_LEASE={value}: invalid, {expected}")
    ):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "needs"),
    [
        ({}, "THROTTLE_RATE to be set too"),
        ({"THROTTLE_RATE": "100", "THROTTLE_CONCURRENCY": "8"}, "no concurrency budget"),
        ({"THROTTLE_RATE": "100", "THROTTLE_TENANT_RATE": "5"}, "no THROTTLE_TENANT_RATE"),
    ],
)
@pytest.mark.parametrize("lease", ["auto", "0.1"])
def test_rate_lease_auto_or_not_is_for_a_rate_budget_alone(
    env: dict[str, str], needs: str, lease: str
) -> None:
    with pytest.raises(ConfigError, match=f"THROTTLE_RATE_LEASE={lease}: .*{needs}"):
        Settings.from_env({**env, "THROTTLE_RATE_LEASE": lease})


@pytest.mark.parametrize("value", ["0.1", "0.59"])
def test_a_lease_ttl_shorter_than_three_heartbeats_is_refused(value: str) -> None:
    """Found by the hostile sweep (branch audit): THROTTLE_LEASE_TTL=0.1 was accepted, but
    the heartbeat renews leases at most every 0.2 s, so held leases lapsed between beats:
    six 1.5 s requests on uvicorn with Redis and THROTTLE_CONCURRENCY=2 were all admitted
    within 0.3 s, six in flight against a limit of two (guarantee 9)."""
    with pytest.raises(ConfigError, match=rf"THROTTLE_LEASE_TTL={value}: .*seconds >= 0.6"):
        Settings.from_env({"THROTTLE_LEASE_TTL": value, "THROTTLE_CONCURRENCY": "2"})
    assert Settings.from_env({"THROTTLE_LEASE_TTL": "0.6"}).lease_ttl_s == 0.6


@pytest.mark.parametrize(
    "name",
    [
        *("Content-Length", "transfer-encoding", "Connection", "keep-alive", "TE", "upgrade"),
        *("trailer", "proxy-connection", "Authorization", "proxy-authorization", "cookie"),
    ],
)
def test_a_header_that_cannot_name_a_tenant_is_refused(name: str) -> None:
    """Framing and hop-by-hop headers describe the connection; a credential's value
    would be a tenant id in clear (in logs and the app's decision)."""
    with pytest.raises(ConfigError, match=f"^THROTTLE_TENANT_HEADER={name}: invalid.*resolver"):
        Settings.from_env({"THROTTLE_TENANT_HEADER": name})
    with pytest.raises(ConfigError, match=f"^tenant_header .*={name.lower()}: invalid"):
        Settings.from_env({}, tenant_header=name.lower())


@pytest.mark.parametrize(
    ("name", "expected"), [("Host", "host"), (" X-Org ", "x-org"), ("X-Tenant-ID", "x-tenant-id")]
)
def test_host_and_custom_headers_can_name_the_tenant(name: str, expected: str) -> None:
    assert Settings.from_env({"THROTTLE_TENANT_HEADER": name}).tenant_header == expected


def test_cancel_on_disconnect_is_a_boolean_off_by_default() -> None:
    assert Settings.from_env({}).cancel_on_disconnect is False
    cases = (("true", True), ("on", True), ("1", True), ("false", False), ("no", False))
    for raw, expected in cases:
        env = {"THROTTLE_CANCEL_ON_DISCONNECT": raw}
        assert Settings.from_env(env).cancel_on_disconnect is expected
    assert Settings.from_env({}, cancel_on_disconnect=True).cancel_on_disconnect is True
    with pytest.raises(ConfigError, match=r"THROTTLE_CANCEL_ON_DISCONNECT.*true or false"):
        Settings.from_env({"THROTTLE_CANCEL_ON_DISCONNECT": "sometimes"})


#: Every variable that takes a number other than a whole one, with what else it needs.
_FRACTIONAL = {
    "THROTTLE_RATE": {},
    "THROTTLE_TENANT_RATE": {"THROTTLE_RATE": "10"},
    "THROTTLE_RATE_LEASE": {"THROTTLE_RATE": "10", "THROTTLE_REDIS_URL": "redis://h"},
    "THROTTLE_KEEP_SLOTS": {"THROTTLE_CONCURRENCY": "2", "THROTTLE_REDIS_URL": "redis://h"},
    "THROTTLE_CREDIT": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_REDIS_TIMEOUT": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_TENANT_IDLE": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_LIVE_LIMITS_TTL": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_RECEIVE_TIMEOUT": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_CLIENT_HOLD": {"THROTTLE_CONCURRENCY": "2"},
    "THROTTLE_MAX_WAIT": {"THROTTLE_CONCURRENCY": "2"},
}


@pytest.mark.parametrize("variable", sorted(_FRACTIONAL))
@pytest.mark.parametrize("value", ["1e-320", "5e-7"])
def test_a_number_too_small_to_mean_anything_is_refused_at_start_up(
    variable: str, value: str
) -> None:
    """1e-320 is positive, but its inverse is infinite: THROTTLE_RATE=1e-320 passed
    start-up and made every rejection an OverflowError (a 500); THROTTLE_RATE_LEASE=1e-320
    crashed the lease's renewal. Every number other than 0 is now at least 1e-06."""
    with pytest.raises(ConfigError, match=rf"^{variable}={value}: invalid, expected .*1e-06"):
        Settings.from_env({**_FRACTIONAL[variable], variable: value})
    Settings.from_env({**_FRACTIONAL[variable], variable: "1e-6"})


def test_tenant_weights_too_small_to_mean_anything_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^THROTTLE_TENANT_WEIGHTS=.*1e-06"):
        Settings.from_env({"THROTTLE_CONCURRENCY": "2", "THROTTLE_TENANT_WEIGHTS": "a=1e-320"})
