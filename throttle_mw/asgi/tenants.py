"""Whom a request is for.

By default the tenant comes from a header the client sets. That is a trust
decision: any client can name any tenant. Where that is not acceptable, pass a
resolver that reads an authenticated principal (API key, JWT claim, session)
instead; see the README. A request without a tenant falls back to its client
address, never to one shared bucket.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Scope

from ..settings import TENANT_MAX_LENGTH, TENANT_PATTERN

TenantResolver = Callable[[Scope], "str | Awaitable[str | None] | None"]


class InvalidTenant(Exception):
    """The tenant header is unusable; the client gets a 400 with this reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_ADDRESSES: dict[object, str] = {}
_ADDRESS_CACHE_SIZE = 4096  # also bounds the header values cached


def client_address(scope: Scope) -> str:
    """The fallback tenant: ``ip:<client host>`` (checked once per host, then cached)."""
    client = scope.get("client")
    host = client[0] if client else None
    tenant = _ADDRESSES.get(host)
    if tenant is None:
        candidate = f"ip:{host}"
        tenant = (
            candidate
            if isinstance(host, str) and TENANT_PATTERN.fullmatch(candidate)
            else "ip:unknown"
        )
        if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
            _ADDRESSES.clear()
        _ADDRESSES[host] = tenant
    return tenant


def digest_tenant(value: str) -> str:
    """A stable, valid id for a trusted value of any shape (e.g. ``auth0|abc``)."""
    return (
        "h:" + hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    )


class Tenants:
    """Resolve the tenant of a request: resolver hook, else header, else client address."""

    def __init__(self, header: str, resolver: Callable[[Scope], Any] | None = None) -> None:
        #: The tenant header's name as servers pass it (lowercase bytes).
        self.header = header.lower().encode("latin-1")
        self._resolver = resolver
        self._resolver_is_async = resolver is not None and (
            inspect.iscoroutinefunction(resolver)
            or inspect.iscoroutinefunction(getattr(resolver, "__call__", None))  # noqa: B004
        )

    async def resolve(self, scope: Scope) -> str:
        if self._resolver is not None:
            value = self._resolver(scope)
            if self._resolver_is_async or inspect.isawaitable(value):
                value = await value
            if value is None or value == "":
                return client_address(scope)
            if not isinstance(value, str):
                raise TypeError(f"tenant resolver returned {type(value).__name__}, expected str")
            return value if TENANT_PATTERN.fullmatch(value) else digest_tenant(value)
        return self.from_header(scope)

    def from_header(self, scope: Scope) -> str:
        found: bytes | None = None
        header = self.header  # a local: read once, not once per header
        for name, value in scope["headers"]:
            if name == header:
                value = value.strip()
                if found is not None and value != found:
                    raise InvalidTenant(REPEATED)
                found = value
        if not found:
            client = scope.get("client")  # client_address's cache hit, without a call
            tenant = _ADDRESSES.get(client[0] if client else None)
            return tenant if tenant is not None else client_address(scope)
        tenant = _NAMED.get(found)  # header_tenant's cache hit, without a call
        return tenant if tenant is not None else header_tenant(found)


#: The tenant header's error when it is sent twice with different values.
REPEATED = "The tenant header is repeated with different values."
#: Tenant header values already validated (a client's value is checked once, then cached).
_NAMED: dict[bytes, str] = {}


def header_tenant(found: bytes) -> str:
    """The tenant a stripped, non-empty tenant header value names; `InvalidTenant` if
    it is unusable."""
    tenant = _NAMED.get(found)
    if tenant is not None:
        return tenant
    if len(found) > TENANT_MAX_LENGTH:
        raise InvalidTenant(f"The tenant header is longer than {TENANT_MAX_LENGTH} characters.")
    tenant = found.decode("latin-1")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidTenant(
            "The tenant header may hold only letters, digits and . _ : @ + = / - "
            "and must start with a letter or digit."
        )
    if len(_NAMED) >= _ADDRESS_CACHE_SIZE:
        _NAMED.clear()
    _NAMED[found] = tenant
    return tenant
