"""Key names: every key of one budget under one hash tag; tenants only as digests."""

from __future__ import annotations

import hashlib


def hash_tag(prefix: str) -> str:
    """``{prefix}``: every key of the budget lands in one Redis Cluster slot."""
    return "{" + prefix + "}"


def tenant_digest(tenant: str) -> str:
    """A fixed-length digest: raw tenant text never becomes part of a key."""
    return hashlib.blake2b(tenant.encode("utf-8"), digest_size=12).hexdigest()


def state_key(tag: str) -> str:
    return f"{tag}:s"


def grants_key(tag: str, process: str) -> str:
    return f"{tag}:g:{process}"
