"""The app's own settings, from ``SURVEYTOOL_*`` variables (the throttle reads ``THROTTLE_*``).

Read once at start-up and validated eagerly: a bad value stops the app with a
message naming the variable, the value and what would be valid, as the
throttle's own settings do.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from throttle_mw.settings import TENANT_PATTERN

_REPLICA = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: What may follow "Bearer " (an RFC 6750 b64token without "=" padding).
_KEY = re.compile(r"[A-Za-z0-9._~+/-]{1,256}")


class AppConfigError(ValueError):
    """A ``SURVEYTOOL_*`` variable has a value the app cannot run with."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        shown = "(hidden)" if variable == "SURVEYTOOL_API_KEYS" else value
        super().__init__(f"{variable}={shown}: invalid, expected {expected}")


def default_db_path() -> Path:
    """One file per machine user, so replicas started side by side share it."""
    return Path(tempfile.gettempdir()) / f"surveytool-{os.getuid()}" / "surveytool.sqlite3"


def key_digest(key: str) -> str:
    """API keys are kept and compared as digests, never as raw text."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AppConfig:
    """How big the store is and how the app identifies tenants."""

    db_path: Path = field(default_factory=default_db_path)
    #: Connection slots of the store: requests served at once.
    slots: int = 8
    #: Mean time one request holds a slot, in milliseconds.
    work_ms: float = 100.0
    #: Relative spread of the work time (0.2: uniform within +-20%).
    jitter: float = 0.2
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = 64 * 1024
    #: sha256(API key) -> tenant; empty: tenants come from the X-Tenant-ID header.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    #: Names this process in the fleet-wide live stats.
    replica: str = field(default_factory=lambda: _default_replica())
    #: Serve ``POST /api/admin/store?slots=N`` (change the store's slots live, as the
    #: demo's slowdown story does). Off by default: anyone could call it.
    admin: bool = False

    @property
    def capacity_per_s(self) -> float:
        """The store's true capacity: slots / mean work time."""
        return self.slots / (self.work_ms / 1000.0) if self.work_ms > 0 else math.inf

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if raw := env.get("SURVEYTOOL_DB", "").strip():
            values["db_path"] = Path(raw)
        if raw := env.get("SURVEYTOOL_SLOTS", "").strip():
            values["slots"] = _int("SURVEYTOOL_SLOTS", raw, 1, 1024)
        if raw := env.get("SURVEYTOOL_WORK_MS", "").strip():
            values["work_ms"] = _float("SURVEYTOOL_WORK_MS", raw, 0.0, 60_000.0)
        if raw := env.get("SURVEYTOOL_JITTER", "").strip():
            values["jitter"] = _float("SURVEYTOOL_JITTER", raw, 0.0, 1.0)
        if raw := env.get("SURVEYTOOL_MAX_BODY", "").strip():
            values["max_body_bytes"] = _int("SURVEYTOOL_MAX_BODY", raw, 256, 16 * 1024 * 1024)
        if raw := env.get("SURVEYTOOL_API_KEYS", "").strip():
            values["api_keys"] = _api_keys(raw)
        if raw := env.get("SURVEYTOOL_REPLICA", "").strip():
            if not _REPLICA.fullmatch(raw):
                raise AppConfigError("SURVEYTOOL_REPLICA", raw, "1-64 letters, digits and . _ -")
            values["replica"] = raw
        if raw := env.get("SURVEYTOOL_ADMIN", "").strip():
            values["admin"] = _bool("SURVEYTOOL_ADMIN", raw)
        return cls(**values)  # type: ignore[arg-type]


def _default_replica() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _int(variable: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise AppConfigError(variable, raw, f"a whole number in [{low}, {high}]") from None
    if not low <= value <= high:
        raise AppConfigError(variable, raw, f"a whole number in [{low}, {high}]")
    return value


def _bool(variable: str, raw: str) -> bool:
    value = raw.lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise AppConfigError(variable, raw, "true or false")
    return value in ("true", "1", "yes")


def _float(variable: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise AppConfigError(variable, raw, f"a number in [{low:g}, {high:g}]") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise AppConfigError(variable, raw, f"a number in [{low:g}, {high:g}]")
    return value


def _api_keys(raw: str) -> Mapping[str, str]:
    expected = "key=tenant pairs, e.g. key1=acme,key2=globex"
    keys: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, tenant = item.strip().partition("=")
        if not sep or not _KEY.fullmatch(key) or not TENANT_PATTERN.fullmatch(tenant):
            raise AppConfigError("SURVEYTOOL_API_KEYS", raw, expected)
        keys[key_digest(key)] = tenant
    return MappingProxyType(keys)
