"""Budget backends: in process memory, or shared by the fleet through Redis."""

from __future__ import annotations

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
    "make_backend",
]


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
    return MemoryBackend(settings.limits(), settings.policy(), settings.limit_config())
