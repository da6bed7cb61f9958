"""Whom a request is for.

By default the tenant comes from a header the client sets. That is a trust
decision: any client can name any tenant. Where that is not acceptable, pass a
resolver that reads an authenticated principal (API key, JWT claim, session)
instead; see the README. A request without a tenant falls back to its client
address, never to one shared bucket.

A resolver that fails (raises, or returns neither a string, bytes, an int nor None)
is treated as one that found no tenant: the request falls back to its client address,
and the failure is logged once per kind and middleware (a process runs one), never
once per request and never as a 500; every failure is also passed to `on_failure`
(the metrics' ``throttle_tenant_resolver_failures_total``). `InvalidTenant` alone goes
through: a resolver raises it to answer 400.

A resolver's `bytes` (a header value read from the scope, say) are the text they hold
in UTF-8, treated as that `str`: an id the tenant header would accept is used as it is
(the same tenant as the header's same bytes), any other value is hashed as a trusted
value of any shape; bytes that are not UTF-8 are hashed as they are.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.types import Scope

from ..settings import TENANT_MAX_LENGTH, TENANT_PATTERN

TenantResolver = Callable[[Scope], "str | bytes | int | Awaitable[str | bytes | int | None] | None"]

logger = logging.getLogger("throttle_mw")
#: Kinds of resolver failure logged at most, per middleware (the kinds are the
#: resolver's own exception and return types, so a bound is only a safety net); the
#: kinds beyond it are passed to `on_failure` with the type name `OTHER_FAILURE`.
_FAILURES_LOGGED = 32
OTHER_FAILURE = "other"
#: Told of every resolver failure: ("raised" or "returned", the type's name).
FailureListener = Callable[[str, str], None]


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
    return digest_bytes(value.encode("utf-8", "surrogatepass"))


def digest_bytes(value: bytes) -> str:
    """`digest_tenant` of the text `value` holds in UTF-8 (also for bytes that are not)."""
    return "h:" + hashlib.blake2b(value, digest_size=16).hexdigest()


class Tenants:
    """Resolve the tenant of a request: resolver hook, else header, else client address."""

    def __init__(
        self,
        header: str,
        resolver: Callable[[Scope], Any] | None = None,
        on_failure: Sequence[FailureListener] = (),
    ) -> None:
        #: The tenant header's name as servers pass it (lowercase bytes).
        self.header = header.lower().encode("latin-1")
        self._resolver = resolver
        self._resolver_is_async = resolver is not None and (
            inspect.iscoroutinefunction(resolver)
            or inspect.iscoroutinefunction(getattr(resolver, "__call__", None))  # noqa: B004
        )
        #: Resolver failures already logged, by kind (``raised KeyError``, ``returned float``).
        self._failures: set[str] = set()
        self._on_failure = tuple(on_failure)

    async def resolve(self, scope: Scope) -> str:
        if self._resolver is None:
            return self.from_header(scope)
        try:
            value = self._resolver(scope)
            if self._resolver_is_async or inspect.isawaitable(value):
                value = await value
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(int(value))  # an integer id (a user's, an org's): its decimal text
        except InvalidTenant:
            raise  # the resolver's own 400
        except Exception as exc:
            self._failed("raised", type(exc).__name__, _where(exc))
            return client_address(scope)
        if type(value) is bytes:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return digest_bytes(value)
        if value is None or value == "":
            return client_address(scope)
        if not isinstance(value, str):
            self._failed("returned", type(value).__name__, "expected str, bytes, int or None")
            return client_address(scope)
        return value if TENANT_PATTERN.fullmatch(value) else digest_tenant(value)

    def _failed(self, failure: str, type_name: str, detail: str) -> None:
        """Tell the listeners of a resolver failure; log its kind the first time, as one line."""
        kind = f"{failure} {type_name}"
        if kind in self._failures:
            logged = True
        elif len(self._failures) >= _FAILURES_LOGGED:
            logged, type_name = True, OTHER_FAILURE
        else:
            logged = False
        for listener in self._on_failure:
            try:
                listener(failure, type_name)
            except Exception:  # a listener's bug (the metrics') must not fail the request
                logger.exception("throttle_mw resolver failure listener failed")
        if logged:
            return
        self._failures.add(kind)
        logger.error(
            "tenant_resolver %s (%s): such requests fall back to their client address "
            "(logged once per kind of failure)",
            kind,
            detail,
        )

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


def _where(exc: BaseException) -> str:
    """Where an exception was raised: file, line and function, never its message (a
    resolver's ``KeyError`` holds the API key it did not find)."""
    tb = exc.__traceback__
    if tb is None:
        return "no traceback"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"at {code.co_filename}:{tb.tb_lineno} in {code.co_name}"
