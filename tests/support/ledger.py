"""A fleet's admissions in Redis's time, and how far they exceed the plain token bucket.

The bound leases of rate tokens promise (docs/scaling.md, "Leases: the exact bound"):
over any window the fleet admits at most what the plain bucket (rate r, burst b) would,
r x window + b. In Redis's time: an admission by the exact path is charged at its script
call's time; a token of a lease at any time from when Redis took it out of the bucket
until Redis stops counting it (the process may spend it at any of those), so the bound
must hold for each of three charges: when its lease took it (``leased``), when the last
renewal that kept it counted it again (``renewed``), and the last moment Redis counted it
(``late``: its lease's expiry, or the renewal that took it out of the count if it was
spent before that renewal went; LATE_S before).

`Ledger.attach(backend)` (after ``backend.start()``) stamps every admission of that
backend so, in the same process, with no change to the library:

- the exact path: each batch.lua call goes in a transaction (MULTI, the call, HGET of the
  state's packed numbers, EXEC): nothing runs in between, and the state's last refill
  time after an admitting call is that call's own ``now`` (core.lua's refill sets it; a
  call that admits has refilled and saved). The reply's acquire lines say which of its
  acquires were admitted.
- leases: ratelease.lua's reply carries Redis's time of the call; the pool's tokens are
  followed one by one (a queue per pool, oldest first, in step with ``RatePool.tokens``):
  an admission from the pool is stamped with the lease its token came from. Tokens given
  back leave from the newest end (the kept ones are the oldest). The same admissions by
  the event loop's clock (``loop``: the reply's arrival, the pool's take) are kept too.
- `settle()` once the backends have stopped: spends no renewal followed are charged
  (``late``) at their lease's expiry.

`max_excess(stamps, rate, burst)`: the largest (admissions in [s, e]) - (r (e - s) + b)
over all windows, in one pass (0 or less: within the bound).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.scripts import library
from throttle_mw.scheduler import Admit, Enqueue

#: `late`: a lease's token charged this long before the lease's expiry in Redis.
LATE_S = 1e-6
#: The state's packed numbers (store.lua's PACKED): the last refill's time is the second.
_TS = 1


def max_excess(stamps: Iterable[tuple[float, int]], rate: float, burst: float) -> float:
    """max over windows [s, e] of (tokens stamped in it) - (rate x (e - s) + burst)."""
    by_time: dict[float, int] = collections.defaultdict(int)
    for at, tokens in stamps:
        by_time[at] += tokens
    best = -burst
    lowest = float("inf")  # min over window starts s of (tokens before s) - rate x s
    before = 0
    for at in sorted(by_time):
        lowest = min(lowest, before - rate * at)
        before += by_time[at]
        best = max(best, before - rate * at - lowest - burst)
    return best


class _Pool:
    """The tokens of one backend's pool, oldest first: [leased at, renewed at, count]."""

    def __init__(self) -> None:
        self.tokens: collections.deque[list[Any]] = collections.deque()
        self.last_now = 0.0  # Redis's time of the last ratelease.lua reply
        self.last_until = 0.0  # and its lease's expiry
        #: Tokens spent, [the expiry of the lease that counted them, count], for `late`:
        #: since the last renewal went (`open`), before the renewal out went (`closing`:
        #: counted until it reached Redis at the latest) and while it is out (`during`: of
        #: the kept, counted with the next lease if Redis kept them).
        self.open: list[list[Any]] = []
        self.closing: list[list[Any]] = []
        self.during: list[list[Any]] = []
        self.out = False

    def settle(self, late: list[tuple[float, int]]) -> None:
        """No renewal to come: what was spent counted until its lease's expiry."""
        for at, spent in self.open + self.closing + self.during:
            late.append((at - LATE_S, spent))
        self.open, self.closing, self.during, self.out = [], [], [], False

    @property
    def count(self) -> int:
        return sum(entry[2] for entry in self.tokens)

    def trim(self, to: int) -> None:
        """Tokens gone from the newest end (given back, lapsed) down to `to`."""
        extra = self.count - to
        while extra > 0:
            entry = self.tokens[-1]
            gone = min(extra, entry[2])
            entry[2] -= gone
            extra -= gone
            if not entry[2]:
                self.tokens.pop()


class Ledger:
    """Admissions of the attached backends, stamped in Redis's time."""

    def __init__(self) -> None:
        #: (Redis time, tokens): exact-path admissions, and lease admissions by their lease.
        self.exact: list[tuple[float, int]] = []
        self.leased: list[tuple[float, int]] = []
        self.renewed: list[tuple[float, int]] = []
        self.late: list[tuple[float, int]] = []
        #: The same admissions by the event loop's clock when each was made (the reply's
        #: arrival, the pool's take): what a monitor in the processes sees.
        self.loop: list[tuple[float, int]] = []
        #: Script calls stamped; lease calls seen.
        self.calls = 0
        self.lease_calls = 0
        self._pools: list[_Pool] = []
        #: Exact-path stamps not within the call's run (TIME before it, stamp): none.
        self.odd: list[tuple[float, float]] = []

    def settle(self) -> None:
        """The run is over: spends no renewal followed count until their leases' expiry."""
        for state in self._pools:
            state.settle(self.late)

    def stamps(self, how: str = "leased") -> list[tuple[float, int]]:
        return self.exact + {"leased": self.leased, "renewed": self.renewed, "late": self.late}[how]

    @property
    def admitted(self) -> int:
        return sum(tokens for _, tokens in itertools.chain(self.exact, self.leased))

    def excess(self, rate: float, burst: float) -> float:
        """The larger of the two charges' worst excess (see the module's docstring)."""
        return max(max_excess(self.stamps(how), rate, burst) for how in ("leased", "renewed"))

    def attach(self, backend: RedisBackend) -> None:
        scripts = backend._scripts
        assert scripts is not None, "attach after start()"
        client = scripts._client
        batch_script = scripts._evalsha["batch"]
        loaded: list[bool] = []
        original_lease = scripts.ratelease
        state = _Pool()
        self._pools.append(state)

        async def batch(*, keys: Sequence[str], args: Sequence[Any]) -> Any:
            if scripts.uses_functions is None:
                await scripts._load()  # (loaded, or "already exists": functions; else not)
            pipe = client.pipeline(transaction=True)
            pipe.time()  # (just before the call: a check on the stamp, `_exact`)
            if scripts.uses_functions is not False:  # (as Scripts.call: FCALL, else EVALSHA)
                pipe.fcall(library().functions["batch"], len(keys), *keys, *args)
            else:
                if not loaded:  # (a transaction cannot load it on NOSCRIPT: now, once)
                    await client.script_load(batch_script.script)
                    loaded.append(True)
                pipe.evalsha(batch_script.sha, len(keys), *keys, *args)
            pipe.hget(keys[0], "nums")
            (seconds, micros), raw, nums = await pipe.execute()
            before = seconds + micros / 1e6
            self._exact(args, raw, nums, asyncio.get_running_loop().time(), before)
            return raw

        async def ratelease(*, keys: Sequence[str], args: Sequence[Any]) -> Any:
            raw = await original_lease(keys=keys, args=args)
            reply = protocol.decode_ratelease(raw)
            state.last_now, state.last_until = reply.now, reply.until
            self.lease_calls += 1
            return raw

        scripts.batch = batch  # type: ignore[assignment]
        scripts.ratelease = ratelease  # type: ignore[assignment]
        pool = backend.rate_lease
        if pool is not None:
            self._follow(pool, state)

    def _exact(
        self, args: Sequence[Any], raw: Any, nums: Any, loop_now: float, before: float
    ) -> None:
        self.calls += 1
        ops = str(args[-1]).split(protocol.LINE)
        lines = protocol.split_reply(raw)
        admitted = 0
        for op, line in zip(ops, lines, strict=False):
            if not op.startswith(protocol.OP["acquire"]) or line == protocol.DEFERRED:
                continue  # (deferred: sent again in the next call)
            decision = protocol.decode_acquire(line)
            assert not isinstance(decision, Enqueue), "a ledger's budget lets nothing wait"
            if isinstance(decision, Admit):
                admitted += int(op.split(protocol.SEP)[6])  # (acquire_tail's cost)
        if admitted:
            text = nums.decode() if isinstance(nums, bytes) else str(nums)
            at = float(text.split(protocol.SEP)[_TS])
            # The call's own now: not before the TIME just ahead of it in the transaction,
            # and within the call's run after it (a stamp of another call would not be).
            if not before - 1e-3 <= at <= before + 0.05:
                self.odd.append((before, at))
            self.exact.append((at, admitted))
            self.loop.append((loop_now, admitted))

    def _follow(self, pool: Any, state: _Pool) -> None:
        """Keep `state` in step with the pool's tokens through its methods."""
        take, renewal, granted = pool.take, pool.renewal, pool.granted
        drop, skip = pool.drop, pool.skip

        def taken(now: float, cost: int, queue_empty: bool, tenant: str = "") -> bool:
            ok = bool(take(now, cost, queue_empty, tenant))
            if ok:
                self.loop.append((now, cost))
                left = cost
                while left:
                    entry = state.tokens[0]
                    spent = min(left, entry[2])
                    self.leased.append((entry[0], spent))
                    self.renewed.append((entry[1], spent))
                    (state.during if state.out else state.open).append([entry[3], spent])
                    entry[2] -= spent
                    left -= spent
                    if not entry[2]:
                        state.tokens.popleft()
            state.trim(pool.tokens)  # (lapsed at its expiry)
            assert state.count == pool.tokens
            return ok

        def renewed(*args: Any, **kwargs: Any) -> Any:
            out = renewal(*args, **kwargs)
            state.trim(pool.tokens)
            # Spent before this renewal goes: counted until it reaches Redis at the latest.
            state.closing, state.open, state.out = state.open, [], True
            return out

        def answered(sent: float, got: int, *args: Any, **kwargs: Any) -> None:
            before = state.count
            granted(sent, got, *args, **kwargs)
            now, until = state.last_now, state.last_until
            for at, spent in state.closing:
                self.late.append((min(at, now) - LATE_S, spent))
            kept = pool.tokens == before + got  # what it kept counts from this call on
            for at, spent in state.during:  # (spent from what it kept, while out)
                self.late.append(((until if kept else at) - LATE_S, spent))
            state.closing, state.during, state.out = [], [], False
            if kept:
                for entry in state.tokens:
                    entry[1], entry[3] = now, until
            else:
                assert pool.tokens == got, (pool.tokens, before, got)
                state.tokens.clear()
            if got:
                state.tokens.append([now, now, got, until])
            assert state.count == pool.tokens

        def dropped() -> None:
            drop()
            state.trim(pool.tokens)
            state.settle(self.late)  # (a renewal that failed: its lease counted to its end)

        def skipped(sent: float) -> None:
            skip(sent)
            state.trim(pool.tokens)
            state.open, state.closing, state.out = state.closing + state.open, [], False

        pool.take, pool.renewal, pool.granted = taken, renewed, answered
        pool.drop, pool.skip = dropped, skipped


async def run_fleet(
    url: str,
    prefix: str,
    *,
    processes: int,
    every_s: float,
    seconds: float,
    rate: float,
    burst: float,
    lease_s: float,
    salvos: int = 0,
) -> Ledger:
    """`processes` backends in this event loop on one rate budget, each sending requests one
    at a time, one every `every_s`, for `seconds`; with `salvos`, that many times in the run
    each backend also sends `burst` requests at once (the bucket drained in one go, as many
    clients arriving together): the ledger of what they admitted. Nothing waits (what
    cannot go at once is rejected)."""
    from throttle_mw.scheduler import Request
    from throttle_mw.settings import Settings

    def settings() -> Settings:
        return Settings.from_env(
            {},
            redis_url=url,
            key_prefix=prefix,
            redis_timeout_s=10.0,  # (a retried acquire would be counted twice)
            rate=rate,
            burst=burst,
            rate_lease_s=lease_s,
            tenant_queue_limit=0,
        )

    backends = [RedisBackend(settings()) for _ in range(processes)]
    for backend in backends:
        await backend.start()
    await asyncio.sleep(0.3)  # the heartbeats: every process knows the fleet's size
    ledger = Ledger()
    for backend in backends:
        ledger.attach(backend)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    ids = itertools.count()

    async def one(backend: RedisBackend) -> None:
        await backend.acquire(Request(f"{backend.process}.{next(ids)}", f"t{next(ids) % 5}"))

    async def steady(backend: RedisBackend) -> None:
        while loop.time() < end:
            await one(backend)
            await asyncio.sleep(every_s)

    async def salvo(backend: RedisBackend) -> None:
        for i in range(salvos):
            await asyncio.sleep(seconds / salvos * (i + 0.5) - (loop.time() - end + seconds))
            await asyncio.gather(*(one(backend) for _ in range(int(burst))))

    await asyncio.gather(*(steady(b) for b in backends), *(salvo(b) for b in backends))
    for backend in backends:
        await backend.stop()
    ledger.settle()
    return ledger


def main() -> None:
    """python -m tests.support.ledger URL PROCESSES PER_S T RATE BURST SECONDS [SALVOS]"""
    import sys
    import time

    url, processes, per_s, lease_s, rate, burst, seconds = sys.argv[1:8]
    salvos = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    ledger = asyncio.run(
        run_fleet(
            url,
            f"ledger{time.time_ns()}",
            processes=int(processes),
            every_s=1 / float(per_s),
            seconds=float(seconds),
            rate=float(rate),
            burst=float(burst),
            lease_s=float(lease_s),
            salvos=salvos,
        )
    )
    r, b = float(rate), float(burst)
    print(
        f"admitted {ledger.admitted} (exact {sum(n for _, n in ledger.exact)}, lease "
        f"{sum(n for _, n in ledger.leased)}), calls {ledger.calls} + {ledger.lease_calls} lease;"
        f" excess in Redis time: as leased {max_excess(ledger.stamps('leased'), r, b):.4f},"
        f" as renewed {max_excess(ledger.stamps('renewed'), r, b):.4f},"
        f" at expiry {max_excess(ledger.stamps('late'), r, b):.4f};"
        f" by the loop's clock {max_excess(ledger.loop, r, b):.4f}"
    )


if __name__ == "__main__":
    main()
