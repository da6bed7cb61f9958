"""A budget's operator-facing keys: live limits, live weights and the live state.

The one owner of these operations: the live-limits tool (``throttle-mw``) and
the backend (``set_limits``, ``snapshot``) both go through `Budget`. Live limits
are fields of ``{prefix}:cfg`` and live weights of ``{prefix}:w`` (by tenant
digest); the scripts read both on every call, so every process of the fleet
follows from its next decision. ``{prefix}:wn`` keeps the names behind those
digests, only to show them.

Like every key of a budget these expire (keys.py): a live override lasts
`live_limits_ttl_s` (``THROTTLE_LIVE_LIMITS_TTL``, a week by default) from
when it is set or the budget last used, so it outlives restarts of the whole
fleet but not a budget nobody uses any more.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from ...scheduler import Limits, Snapshot
from ...scheduler.limit import LimitState
from ...settings import LIVE_LIMITS_TTL_S
from . import protocol
from .keys import Keys, tenant_digest
from .learner import STATE_FIELD as LEARN_STATE_FIELD
from .scripts import Scripts


class Budget:
    """One budget's keys in Redis, through an asyncio redis-py client."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        scripts: Scripts | None = None,
        *,
        live_limits_ttl_s: float = LIVE_LIMITS_TTL_S,
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._live_ttl_ms = int(live_limits_ttl_s * 1000)
        scripts = scripts or Scripts(client)
        self._snapshot = scripts.snapshot
        self._live = scripts.live

    async def live_limits(self) -> dict[str, float | str | None]:
        """The overridden limits only (None: switched off; "auto": learned)."""
        return protocol.decode_live_limits(_text(await self.client.hgetall(self.keys.cfg)))

    async def live_weights(self) -> dict[str, float]:
        """Live weights by tenant name (a digest's first 12 characters when the name is lost)."""
        weights = _text(await self.client.hgetall(self.keys.weights))
        names = _text(await self.client.hgetall(self.keys.weight_names)) if weights else {}
        return {names.get(h, "#" + h[:12]): float(w) for h, w in sorted(weights.items())}

    async def set(
        self, changes: Mapping[str, str], weights: Mapping[str, float], *, now: str = ""
    ) -> None:
        """Store live limits (P:cfg fields, already encoded) and live tenant weights."""
        keys = self.keys
        if weights:
            pipe = self.client.pipeline(transaction=False)
            for tenant, weight in weights.items():
                digest = tenant_digest(tenant)
                pipe.hset(keys.weights, digest, repr(weight))
                pipe.hset(keys.weight_names, digest, tenant)
            pipe.pexpire(keys.weights, self._live_ttl_ms)
            pipe.pexpire(keys.weight_names, self._live_ttl_ms)
            await pipe.execute()
        await self._change(dict(changes), now=now)

    async def set_limits(self, limits: Limits, *, now: str = "") -> None:
        """Every limit of `limits` as a live override."""
        await self.set(protocol.encode_live_limits(limits), {}, now=now)

    async def reset(
        self,
        fields: Sequence[str],
        tenants: Sequence[str],
        *,
        everything: bool = False,
        all_weights: bool = False,
        now: str = "",
    ) -> None:
        """Remove live overrides: each process's ``THROTTLE_*`` values apply again."""
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        if everything or all_weights:
            pipe.delete(keys.weights, keys.weight_names)
        if tenants and not everything:
            digests = [tenant_digest(t) for t in tenants]
            pipe.hdel(keys.weights, *digests)
            pipe.hdel(keys.weight_names, *digests)
        if len(pipe):
            await pipe.execute()
        await self._change(
            {} if everything else dict.fromkeys(fields, ""), everything=everything, now=now
        )

    async def _change(
        self, changes: dict[str, str], *, everything: bool = False, now: str = ""
    ) -> None:
        """The limits' change, last (after the weights' writes), by live.lua: the token
        bucket brought up to `now` ("": Redis's clock) at the limits in force before, then
        P:cfg's fields changed (a value "": deleted; `everything`: P:cfg deleted first),
        and the state's live stamp made anew, so the scripts read both keys anew."""
        args = protocol.live_args(
            now,
            self.keys.tag,
            secrets.token_hex(6),
            self._live_ttl_ms,
            changes,
            everything=everything,
        )
        await self._live(keys=[self.keys.state], args=args)

    async def snapshot(self, limits: Limits, top: int, *, now: str = "") -> Snapshot:
        """The live state; `limits` are the caller's (live overrides win)."""
        raw = await self._snapshot(
            keys=[self.keys.state], args=protocol.snapshot_args(now, self.keys.tag, limits, top)
        )
        snapshot = protocol.decode_snapshot(raw)
        if snapshot.limits is not None and snapshot.limits.learned:
            snapshot = dataclasses.replace(snapshot, learned=await self.learned())
        return snapshot

    async def learned(self) -> LimitState | None:
        """The fleet's learned limit's state (None: nothing learned yet)."""
        raw = await self.client.hget(self.keys.cfg, LEARN_STATE_FIELD)
        if raw is None:
            return None
        try:
            return LimitState.decode(_str(raw))
        except ValueError:
            return None


def _text(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A hash as text, whether the client decodes responses or not."""
    return {_str(k): _str(v) for k, v in raw.items()}


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
