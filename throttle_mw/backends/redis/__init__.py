"""The Redis backend: one budget shared by every worker and replica."""

from .backend import RedisBackend

__all__ = ["RedisBackend"]
