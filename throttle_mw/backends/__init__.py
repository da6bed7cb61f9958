"""Budget backends: in process memory, or shared by the fleet through Redis."""

from __future__ import annotations

from ..scheduler import Limits, Policy
from ..settings import Settings
from .base import Admitted, Backend, Outcome, RequestIds, Waiting
from .memory import MemoryBackend

__all__ = [
    "Admitted",
    "Backend",
    "MemoryBackend",
    "Outcome",
    "RequestIds",
    "Waiting",
    "limits_from_settings",
    "make_backend",
    "policy_from_settings",
]


def limits_from_settings(settings: Settings) -> Limits:
    return Limits(
        rate=settings.rate,
        burst=settings.burst if settings.burst is not None else 1.0,
        concurrency=settings.concurrency,
        weights=dict(settings.tenant_weights),
        tenant_rate=settings.tenant_rate,
        tenant_burst=settings.tenant_burst if settings.tenant_burst is not None else 1.0,
    )


def policy_from_settings(settings: Settings) -> Policy:
    return Policy(
        max_wait_s=settings.max_wait_s,
        queue_limit=settings.queue_limit,
        tenant_queue_limit=settings.queue_limit_per_tenant,
        credit_s=settings.credit_s,
        tenant_idle_s=settings.tenant_idle_s,
        max_tenants=settings.max_tenants,
    )


def make_backend(settings: Settings) -> Backend:
    """The backend the settings ask for: Redis when a URL is set, else memory."""
    if settings.redis_url:
        try:
            from .redis import RedisBackend
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "THROTTLE_REDIS_URL is set but redis-py is missing: "
                "pip install 'throttle_mw[redis]'"
            ) from exc
        return RedisBackend(settings)
    return MemoryBackend(limits_from_settings(settings), policy_from_settings(settings))
