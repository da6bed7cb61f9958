"""Whose data a request touches: the tenant the throttle resolved, or an API key's tenant.

By default the tenant is the ``X-Tenant-ID`` header (the throttle's default:
any client may name any tenant, fine for a demo and a load test). With
``SURVEYTOOL_API_KEYS`` set, ``Authorization: Bearer <key>`` names the tenant
instead, for the throttle too (through its resolver hook), and data routes
answer 401 without a known key.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import HTTPException, Request
from starlette.types import Scope

from throttle_mw import client_address
from throttle_mw.settings import TENANT_PATTERN

from .config import key_digest


class ApiKeys:
    """The throttle's tenant resolver: ``(scope) -> tenant | None`` from a bearer key."""

    def __init__(self, tenants_by_digest: Mapping[str, str]) -> None:
        self._tenants = dict(tenants_by_digest)

    def __call__(self, scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and key.strip():
                    return self._tenants.get(key_digest(key.strip()))
                return None
        return None


def tenant_of(request: Request, keys: ApiKeys | None, header: str = "x-tenant-id") -> str:
    """The request's tenant; 401 if API keys are required and none is valid."""
    if keys is not None:
        tenant = keys(request.scope)
        if tenant is None:
            raise HTTPException(
                401, "A valid API key is required.", headers={"WWW-Authenticate": "Bearer"}
            )
        return tenant
    decision = getattr(request.state, "throttle", None)
    if decision is not None:
        return str(decision.tenant)
    # The throttle is off (THROTTLE_ENABLED=false): resolve as it would.
    value = request.headers.get(header, "").strip()
    if value and TENANT_PATTERN.fullmatch(value):
        return value
    if value:
        raise HTTPException(400, "The tenant header is not a valid tenant id.")
    return client_address(request.scope)
