"""Configuration: every bad value stops start-up with a message naming variable, value and fix."""

from __future__ import annotations

import pytest

from throttle_mw import ConfigError, Settings


def test_defaults_need_a_budget() -> None:
    with pytest.raises(ConfigError, match="THROTTLE_RATE / THROTTLE_CONCURRENCY"):
        Settings.from_env({})


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
