"""The script calls Redis runs, by entry script, as MONITOR sees them.

`INFO commandstats` counts every FCALL/EVALSHA alike: a test that asserts "no call" over a
stretch of requests also counts the backend's background calls that fall in it (the
heartbeat's renew.lua, every `lease_ttl_s / 3` and at start; on Redis 6.2 its first call is
a chain of round trips: FCALL refused, EVALSHA refused with NOSCRIPT, SCRIPT LOAD, EVALSHA),
and how long the stretch lasts depends on the machine's load. Here each call is named by
its entry script (the function's name under FCALL, the script's SHA1 under EVALSHA), so a
test can count only the calls its own requests cause, the background ones running for
real beside them. A stretch ends at a mark (an ECHO of a unique text on the test's own
client): MONITOR shows commands in the order Redis ran them, so every call Redis ran before
the mark has been counted when the mark is seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
from collections import Counter
from types import TracebackType

import redis.asyncio

from throttle_mw.backends.redis.scripts import ENTRY_SCRIPTS, library, source

#: The calls a backend makes on its own, whatever its requests do: the heartbeat.
BACKGROUND = frozenset({"renew"})

_CALLS = frozenset({"FCALL", "FCALL_RO", "EVALSHA", "EVALSHA_RO", "EVAL", "EVAL_RO"})
_marks = itertools.count()
_LINE = re.compile(r"\+\S+ \[\d+ ([^\]]*)\] (.*)")
_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _names() -> dict[str, str]:
    names = {}
    for name in ENTRY_SCRIPTS:
        names[library().functions[name]] = name
        names[hashlib.sha1(source(name).encode()).hexdigest()] = name
    return names


def own(calls: Counter[str]) -> Counter[str]:
    """`calls` without the background ones (`BACKGROUND`)."""
    return Counter({name: n for name, n in calls.items() if name not in BACKGROUND})


class ScriptCalls:
    """`async with ScriptCalls(client) as calls:` then `await calls.since()` at each point
    of interest: the calls Redis ran since the previous one (or since MONITOR started).

    MONITOR is read from a connection of its own, not redis-py's `monitor()`: its reader
    stops at 64 KiB a line, and a FUNCTION LOAD or SCRIPT LOAD of the library is longer."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._names = _names()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ScriptCalls:
        kwargs = self._client.connection_pool.connection_kwargs
        self._reader, self._writer = await asyncio.open_connection(
            kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379), limit=1 << 26
        )
        self._writer.write(b"MONITOR\r\n")
        await self._writer.drain()
        assert await self._reader.readline() == b"+OK\r\n"
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._writer is not None
        self._writer.close()
        await self._writer.wait_closed()

    async def since(self, timeout_s: float = 10.0) -> Counter[str]:
        """The script calls since the last mark, by entry script name (a call of anything
        else by its first word, so that it shows); then a new mark."""
        assert self._reader is not None
        # A round trip first: a call that the requests left to a task of the backend's
        # (the batcher runs when the loop gets to it, which requests served in memory may
        # not let it do until the test awaits I/O) has been sent by then, a whole round
        # trip before the mark.
        await self._client.ping()
        mark = f"script-calls-mark-{next(_marks)}-{id(self)}"
        await self._client.echo(mark)
        seen: Counter[str] = Counter()
        async with asyncio.timeout(timeout_s):
            while True:
                # +<time> [<db> <client>] "<command>" "<arg>" ... (client "lua": a
                # command a script ran)
                line = (await self._reader.readline()).decode(errors="replace")
                match = _LINE.match(line)
                assert match is not None, line[:200]
                client = match.group(1)
                words = [w.group(1) for w in itertools.islice(_WORD.finditer(match.group(2)), 2)]
                command = words[0].upper() if words else ""
                if command == "ECHO" and words[1:] == [mark]:
                    return seen
                if client != "lua" and command in _CALLS:
                    called = words[1] if len(words) > 1 else ""
                    seen[self._names.get(called, called)] += 1
