"""Rejections as RFC 9457 problem documents with Retry-After and RateLimit fields.

Bodies carry a fixed reason per case and nothing internal (no Redis text,
hosts, keys or tracebacks). ``RateLimit-Policy`` and ``RateLimit`` follow
draft-ietf-httpapi-ratelimit-headers-10: named policies with ``q``, ``qu``,
``w``; and ``r`` (remaining) and ``t`` (seconds until it frees up).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from starlette.types import Send

from ..scheduler import Limits, Reason, Reject

_TITLES: Final[Mapping[Reason, tuple[str, str]]] = {
    "tenant_over_share": (
        "Tenant over its fair share",
        "This tenant is sending more than its share of the service's capacity; "
        "the excess cannot be served within its maximum wait.",
    ),
    "tenant_rate_cap": (
        "Tenant rate cap reached",
        "This tenant has reached its own rate cap; the request cannot be served "
        "within its maximum wait.",
    ),
    "tenant_queue_full": (
        "Tenant queue full",
        "This tenant already has as many requests waiting as it may.",
    ),
    "overloaded": (
        "Service overloaded",
        "The service cannot serve this request within its maximum wait.",
    ),
    "queue_full": ("Service overloaded", "The service's queue is full."),
    "shed": (
        "Feature paused under load",
        "This nonessential feature is paused while the service is under load.",
    ),
    "expired": (
        "Service overloaded",
        "The request waited its maximum time without being served.",
    ),
    "shutting_down": ("Service restarting", "This server is shutting down; retry elsewhere."),
    "unavailable": (
        "Service temporarily unavailable",
        "The service cannot check its capacity right now.",
    ),
}

PROBLEM_TYPE = "urn:throttle-mw:problem:"


def policy_header(limits: Limits) -> bytes:
    """The RateLimit-Policy field value for these limits."""
    items = []
    if limits.rate is not None:
        items.append(f'"fleet";q={_number(limits.rate)};w=1')
    if limits.concurrency is not None:
        items.append(f'"inflight";q={limits.concurrency};qu="concurrent-requests"')
    if limits.tenant_rate is not None:
        items.append(f'"tenant";q={_number(limits.tenant_rate)};w=1')
    return ", ".join(items).encode("ascii")


def _number(value: float) -> str:
    """An sf-integer when whole, else an sf-decimal with at most 3 decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def _policy_for(reason: Reason, limits: Limits) -> str | None:
    if reason == "tenant_rate_cap" and limits.tenant_rate is not None:
        return "tenant"
    if limits.rate is not None:
        return "fleet"
    if limits.concurrency is not None:
        return "inflight"
    return None


def problem_headers(reject: Reject, limits: Limits) -> list[tuple[bytes, bytes]]:
    retry_after = reject.retry_after_header
    headers = [(b"retry-after", str(retry_after).encode("ascii"))]
    policy = policy_header(limits)
    name = _policy_for(reject.reason, limits)
    if policy and name is not None:
        headers.append((b"ratelimit-policy", policy))
        headers.append((b"ratelimit", f'"{name}";r=0;t={retry_after}'.encode("ascii")))
    return headers


def problem_body(reject: Reject) -> bytes:
    title, detail = _TITLES[reject.reason]
    body = {
        "type": PROBLEM_TYPE + reject.reason.replace("_", "-"),
        "title": title,
        "status": reject.status,
        "detail": detail,
        "reason": reject.reason,
        "retry_after_s": reject.retry_after_header,
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


async def send_problem(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Send an answer the middleware makes itself; every one goes through here.

    Each is a problem document that holds for this request only (a rejection, a bad
    tenant, a body timeout), so each says ``cache-control: no-store``: a cache between
    client and app must never serve one to the next request.
    """
    start = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_rejection(send: Send, reject: Reject, limits: Limits) -> None:
    await send_problem(send, reject.status, problem_body(reject), problem_headers(reject, limits))


async def send_bad_request(send: Send, detail: str) -> None:
    body = json.dumps(
        {
            "type": PROBLEM_TYPE + "invalid-tenant",
            "title": "Invalid tenant",
            "status": 400,
            "detail": detail,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    await send_problem(send, 400, body, [])


REQUEST_TIMEOUT_BODY: Final = json.dumps(
    {
        "type": PROBLEM_TYPE + "body-timeout",
        "title": "Request body too slow",
        "status": 408,
        "detail": "The request's body did not arrive in time.",
        "reason": "body_timeout",
    },
    separators=(",", ":"),
).encode("utf-8")


async def send_request_timeout(send: Send) -> None:
    """408 for a body that did not arrive in time; the connection closes (RFC 9110 15.5.9)."""
    await send_problem(send, 408, REQUEST_TIMEOUT_BODY, [(b"connection", b"close")])
