"""Pure ASGI glue: the middleware, route tags, tenants, responses."""

from .middleware import ThrottleDecision, ThrottleMiddleware
from .tenants import InvalidTenant, client_address, digest_tenant

__all__ = [
    "InvalidTenant",
    "ThrottleDecision",
    "ThrottleMiddleware",
    "client_address",
    "digest_tenant",
]
