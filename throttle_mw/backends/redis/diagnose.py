"""Why Redis cannot be used, in words an operator can act on.

Exception texts from redis-py and the ssl module name hosts and ports (and a
future version could name more), so nothing of them is repeated: the cause is
recognised from the exception types in its chain (and, for certificates, the
OpenSSL reason code) and described in fixed words that point at the setting
to check.
"""

from __future__ import annotations

import ssl

from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen and len(seen) < 8:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def describe(exc: BaseException) -> str:
    """A fixed description of why a call to Redis failed; never the exception's text."""
    chain = _chain(exc)

    def has(kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
        return any(isinstance(e, kind) for e in chain)

    if has(AuthenticationError):
        return "Redis refused the credentials (check the user and password in THROTTLE_REDIS_URL)"
    if has(ssl.SSLCertVerificationError) or any(
        "CERTIFICATE_VERIFY_FAILED" in str(e) for e in chain
    ):
        return (
            "the TLS certificate of Redis could not be verified (for a private CA, add"
            " ssl_ca_certs=/path/to/ca.pem to THROTTLE_REDIS_URL)"
        )
    if has(ssl.SSLError) or any("SSL" in type(e).__name__ for e in chain):
        return "the TLS handshake with Redis failed (rediss:// needs Redis' TLS port)"
    if has(ConnectionRefusedError) or any("Connection refused" in str(e) for e in chain):
        return "the connection was refused (is Redis running at THROTTLE_REDIS_URL?)"
    if has((RedisTimeoutError, TimeoutError)):
        return "Redis did not answer within THROTTLE_REDIS_TIMEOUT"
    if has(NoPermissionError):
        return "the Redis user may not run what throttle_mw needs (ACL: see the README)"
    return f"{type(exc).__name__} from Redis"
