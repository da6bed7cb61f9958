"""The middleware's guarantees on every common ASGI server, over real sockets.

One suite, parametrized over the servers as their users start them: uvicorn
(httptools and h11; two workers), gunicorn with uvicorn workers, hypercorn
(its default parent-and-worker model, ``--workers 0``, and HTTP/2 with prior
knowledge), and granian (one and two workers). Several workers share their
budget through Redis. Servers differ in how they tell the app that a client
left, whether workers get the shutdown signal, and when lifespan shutdown
runs; what must not differ is the outcome:

- admission, with ``Server-Timing``;
- a queued request whose client leaves (a closed connection; an HTTP/2
  stream reset on a connection that goes on) leaves the queue, and its
  handler never runs;
- a queued chunked 1 MB upload reaches the app byte for byte;
- the slot comes back after a streaming response, an exception and a
  client that leaves mid-stream;
- concurrency never exceeds the budget, across worker processes too;
- SIGTERM with requests running and queued: running ones finish, queued ones
  get 503 with ``Retry-After`` within a second, no 500s, no resets.

Each server kind is started once for the checks that leave it as they found
it (each starts from a free budget and gives everything back), and once more
for the SIGTERM check, which ends it. Whether a handler ran is read from a
journal file every worker appends to (see tests/apps/matrix.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.h2client import H2Client
from tests.support.redis_server import RedisServer
from tests.support.servers import HOST, AppServer, ServerKind, wait_until

pytestmark = pytest.mark.e2e

APP = "tests.apps.matrix:app"
#: The budget of the shared servers: two slots, so "at once" and "one at a time" differ.
CONCURRENCY = 2
_keys = itertools.count()


@dataclass(frozen=True)
class Kind:
    """A server started one way: the parameter of every test here."""

    id: str
    server: ServerKind
    workers: int = 1
    args: tuple[str, ...] = ()
    http2: bool = False

    @property
    def processes(self) -> int:
        """Processes serving requests (hypercorn's ``--workers 0`` serves in its parent)."""
        return max(1, self.workers)

    def __str__(self) -> str:
        return self.id


MATRIX = (
    Kind("uvicorn-httptools", "uvicorn", args=("--http", "httptools")),
    Kind("uvicorn-h11", "uvicorn", args=("--http", "h11")),
    Kind("uvicorn-2-workers", "uvicorn", workers=2),
    Kind("gunicorn-2-uvicorn-workers", "gunicorn", workers=2),
    # hypercorn's default (`-w 1`): a parent that catches the signal and one worker process.
    Kind("hypercorn", "hypercorn"),
    Kind("hypercorn-workers-0", "hypercorn", workers=0),
    Kind("hypercorn-h2", "hypercorn", http2=True),
    Kind("granian", "granian"),
    Kind("granian-2-workers", "granian", workers=2),
    Kind("granian-h2", "granian", http2=True),
)
#: Kinds of several processes share their budget in Redis (redis_for): marked `redis`
#: (conftest.py), as their Redis is looked up by name.
_PARAMS = [pytest.param(k, marks=pytest.mark.redis) if k.processes > 1 else k for k in MATRIX]


@dataclass
class Served:
    """A started server of one kind, its journal and its release files."""

    kind: Kind
    server: AppServer
    dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """A client speaking the kind's protocol (HTTP/2 with prior knowledge, or HTTP/1.1)."""
        h2 = self.kind.http2
        return httpx.AsyncClient(
            base_url=self.url, http1=not h2, http2=h2, timeout=30.0, trust_env=False, **kwargs
        )

    async def budget(self) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.get(f"{self.url}/_budget")
            response.raise_for_status()
            body: dict[str, int] = response.json()
            return body

    async def until(self, check: Callable[[dict[str, int]], bool], timeout_s: float = 10.0) -> None:
        """Poll the live budget until `check` holds; fail with the last state seen."""
        deadline = time.monotonic() + timeout_s
        state = await self.budget()
        while not check(state):
            if time.monotonic() > deadline:
                raise AssertionError(f"budget still {state} after {timeout_s} s ({self.kind})")
            await asyncio.sleep(0.02)
            state = await self.budget()

    async def all_free(self) -> None:
        await self.until(lambda b: b["in_flight"] == 0 and b["waiting"] == 0)

    def wait_for_workers(self, timeout_s: float = 30.0) -> None:
        """Return once every worker process has answered (the health check needs only one)."""
        pids: set[str] = set()

        def all_answered() -> bool:
            # A new connection each time: whichever worker accepts it answers.
            pids.add(httpx.get(f"{self.url}/_pid", timeout=5.0, trust_env=False).text)
            return len(pids) >= self.kind.processes

        if not wait_until(all_answered, timeout_s=timeout_s, interval_s=0.05):
            raise AssertionError(f"{self.kind}: only workers {pids} answered in {timeout_s} s")

    def journal(self, prefix: str) -> list[dict[str, Any]]:
        """Journal lines whose tag starts with `prefix`."""
        path = self.dir / "journal.jsonl"
        if not path.exists():
            return []
        lines = (json.loads(line) for line in path.read_text().splitlines())
        return [line for line in lines if str(line["tag"]).startswith(prefix)]

    def release(self, key: str) -> None:
        (self.dir / f"release-{key}").touch()

    def holders(self, client: httpx.AsyncClient, key: str, count: int) -> list[asyncio.Task[Any]]:
        params = {"key": key, "tag": f"hold-{key}"}
        return [asyncio.create_task(client.get("/hold", params=params)) for _ in range(count)]


def throttle_ms(response: httpx.Response) -> float:
    entry = next(e for e in response.headers["server-timing"].split(",") if "throttle" in e)
    return float(entry.split("dur=")[1].split(";")[0])


def new_key() -> str:
    return f"k{os.getpid()}-{next(_keys)}"


@contextlib.contextmanager
def serve(kind: Kind, tmp: Path, redis: RedisServer | None, concurrency: int) -> Iterator[Served]:
    env = {
        "MATRIX_DIR": str(tmp),
        "THROTTLE_CONCURRENCY": str(concurrency),
        "THROTTLE_MAX_WAIT": "20",
    }
    if redis is not None:
        env |= {
            "THROTTLE_REDIS_URL": redis.url,
            "THROTTLE_KEY_PREFIX": f"matrix-{kind.id}-{new_key()}",
            # Generous for a shared 2-core machine: a slow reply must not look like an outage.
            "THROTTLE_REDIS_TIMEOUT": "1",
        }
    server = AppServer(
        APP,
        server=kind.server,
        workers=kind.workers,
        extra_args=kind.args,
        env=env,
        health_path="/healthz",
    )
    with server:
        served = Served(kind, server, tmp)
        served.wait_for_workers()
        yield served


def redis_for(kind: Kind, request: pytest.FixtureRequest) -> RedisServer | None:
    """Several worker processes share their budget through Redis, as the README says to."""
    if kind.processes == 1:
        return None
    server: RedisServer = request.getfixturevalue("redis_server_session")
    return server


@pytest.fixture(scope="module", params=_PARAMS, ids=str)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One server per kind for every check that leaves its budget free."""
    kind: Kind = request.param
    tmp = tmp_path_factory.mktemp(kind.id)
    with serve(kind, tmp, redis_for(kind, request), CONCURRENCY) as served:
        yield served


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# --- the checks -------------------------------------------------------------------------------


def test_admission_with_server_timing(served: Served) -> None:
    async def scenario() -> list[httpx.Response]:
        await served.all_free()
        async with served.client() as client:
            return list(await asyncio.gather(*(client.get("/hello") for _ in range(CONCURRENCY))))

    for response in run(scenario()):
        assert response.status_code == 200
        assert response.http_version == ("HTTP/2" if served.kind.http2 else "HTTP/1.1")
        assert response.json()["outcome"] == "admitted"
        assert throttle_ms(response) < 100.0  # admitted at once: the budget had room


async def _leave_the_queue_h1(served: Served, key: str, count: int) -> list[int]:
    async with served.client() as client:
        holders = served.holders(client, key, CONCURRENCY)
        await served.until(lambda b: b["in_flight"] == CONCURRENCY)
        leavers = [
            asyncio.create_task(client.get("/slow", params={"tag": f"gone-{key}-{i}"}))
            for i in range(count)
        ]
        await served.until(lambda b: b["waiting"] == count)
        for task in leavers:
            task.cancel()  # httpx closes the connection of a request it abandons
        await asyncio.gather(*leavers, return_exceptions=True)
        await served.until(lambda b: b["waiting"] == 0)
        held = (await served.budget())["in_flight"]
        served.release(key)
        statuses = [r.status_code for r in await asyncio.gather(*holders)]
    return [held, *statuses]


async def _leave_the_queue_h2(served: Served, key: str, count: int) -> list[int]:
    # Everything on one connection: the resets end only their own streams.
    async with H2Client(HOST, served.server.port) as client:
        holders = [await client.get(f"/hold?key={key}&tag=hold-{key}") for _ in range(CONCURRENCY)]
        await served.until(lambda b: b["in_flight"] == CONCURRENCY)
        leavers = [await client.get(f"/slow?tag=gone-{key}-{i}") for i in range(count)]
        await served.until(lambda b: b["waiting"] == count)
        for stream_id in leavers:
            await client.reset(stream_id)
        await served.until(lambda b: b["waiting"] == 0)
        held = (await served.budget())["in_flight"]
        served.release(key)
        statuses = [(await client.response(s)).status or 0 for s in holders]
    return [held, *statuses]


def test_a_client_that_leaves_the_queue_is_never_run(served: Served) -> None:
    key, count = new_key(), 3
    leave = _leave_the_queue_h2 if served.kind.http2 else _leave_the_queue_h1

    async def scenario() -> list[int]:
        await served.all_free()
        outcome = await leave(served, key, count)
        await served.all_free()
        return outcome

    held, *holders = run(scenario())
    assert held == CONCURRENCY  # they left the queue while the slots were still taken
    assert holders == [200] * CONCURRENCY
    assert served.journal(f"gone-{key}") == []  # and no handler of theirs ever ran


def test_a_queued_chunked_upload_reaches_the_app_byte_for_byte(served: Served) -> None:
    key = new_key()
    payload = os.urandom(1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]
            await asyncio.sleep(0)

    async def scenario() -> tuple[httpx.Response, list[int]]:
        await served.all_free()
        # The upload has a connection of its own: over HTTP/2, httpcore's wait for flow
        # control can miss a WINDOW_UPDATE that another stream's read took in, and then
        # stalls until its timeout (pydantic/httpx2#1133), a client bug.
        async with served.client() as client, served.client() as uploader:
            holders = served.holders(client, key, CONCURRENCY)
            await served.until(lambda b: b["in_flight"] == CONCURRENCY)
            # An async generator has no length: HTTP/1.1 sends it chunked.
            upload = asyncio.create_task(uploader.post("/upload", content=chunks()))
            await served.until(lambda b: b["waiting"] == 1)
            await asyncio.sleep(0.3)
            served.release(key)
            statuses = [r.status_code for r in await asyncio.gather(*holders)]
            return await upload, statuses

    upload, holders = run(scenario())
    assert holders == [200] * CONCURRENCY
    assert upload.status_code == 200
    assert throttle_ms(upload) > 300.0  # it really waited in the queue
    assert upload.json() == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


#: A stream the client leaves after its first chunk; 40 s if nobody stops it.
LONG_STREAM = "/stream?chunks=2000&delay=0.02"


async def _leave_mid_stream(served: Served, client: httpx.AsyncClient) -> int:
    if served.kind.http2:
        async with H2Client(HOST, served.server.port) as h2:
            stream_id = await h2.get(LONG_STREAM)
            stream = await h2.first_data(stream_id)
            await h2.reset(stream_id)
            return stream.status or 0
    async with client.stream("GET", LONG_STREAM) as response:
        async for _ in response.aiter_bytes():
            break  # leaving the block closes the connection mid-response
        return response.status_code


def test_the_slot_comes_back_after_streams_errors_and_disconnects(served: Served) -> None:
    async def stream_all(client: httpx.AsyncClient) -> bytes:
        response = await client.get("/stream", params={"chunks": 10, "delay": 0.01})
        return response.content

    async def scenario() -> dict[str, Any]:
        await served.all_free()
        async with served.client() as client:
            complete = [asyncio.create_task(stream_all(client)) for _ in range(4)]
            failures = [asyncio.create_task(client.get("/boom")) for _ in range(4)]
            gone = [asyncio.create_task(_leave_mid_stream(served, client)) for _ in range(4)]
            result = {
                "complete": await asyncio.gather(*complete),
                "failures": [r.status_code for r in await asyncio.gather(*failures)],
                "gone": await asyncio.gather(*gone),
            }
            # Left mid-stream, the streams would run for 40 s: only the disconnects free them.
            await served.all_free()
            key = new_key()
            holders = served.holders(client, key, CONCURRENCY)
            await served.until(lambda b: b["in_flight"] == CONCURRENCY)
            served.release(key)
            result["again"] = await asyncio.gather(*holders)
        return result

    result = run(scenario())
    assert all(body.count(b"chunk") == 10 for body in result["complete"])
    assert result["failures"] == [500] * 4  # the app's own error, passed through
    assert result["gone"] == [200] * 4
    # The whole budget is free again: both slots are taken at once.
    assert [r.status_code for r in result["again"]] == [200] * CONCURRENCY
    assert max(throttle_ms(r) for r in result["again"]) < 100.0


def max_overlap(runs: list[tuple[float, float]]) -> int:
    """The most runs in progress at any one moment (an end before a start at the same time)."""
    edges = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_concurrency_never_exceeds_the_budget_across_workers(served: Served) -> None:
    count = 12

    async def scenario(key: str) -> list[int]:
        await served.all_free()
        # A fresh connection per request, a few ms apart: connections that arrive together
        # are all taken by the first worker to wake (asyncio accepts all that are pending).
        limits = httpx.Limits(max_keepalive_connections=0)
        async with served.client(limits=limits) as client:
            calls = []
            for i in range(count):
                params: dict[str, str | float] = {"s": 0.2, "tag": f"share-{key}-{i}"}
                calls.append(asyncio.create_task(client.get("/slow", params=params)))
                await asyncio.sleep(0.02)
            responses = await asyncio.gather(*calls)
        return [r.status_code for r in responses]

    # The kernel decides which worker accepts a connection: a round may go to one worker
    # alone on a busy machine, so up to four rounds, until one had every worker serve.
    pids: set[int] = set()
    for _ in range(4):
        key = new_key()
        assert run(scenario(key)) == [200] * count
        lines = served.journal(f"share-{key}-")
        starts = {line["tag"]: line for line in lines if line["event"] == "start"}
        ends = {line["tag"]: line for line in lines if line["event"] == "end"}
        assert len(starts) == len(ends) == count
        runs = [(starts[tag]["t"], ends[tag]["t"]) for tag in starts]
        assert max_overlap(runs) == CONCURRENCY  # the budget was used, and never exceeded
        pids = {line["pid"] for line in starts.values()}
        if len(pids) == served.kind.processes:
            break
    assert len(pids) == served.kind.processes, f"no round had every worker serve: {pids}"


@dataclass(frozen=True)
class Answer:
    """A response as either client saw it, with the moment it arrived."""

    status: int
    headers: dict[str, str]
    body: bytes
    at: float

    @classmethod
    def of(cls, response: httpx.Response) -> Answer:
        return cls(response.status_code, dict(response.headers), response.content, time.monotonic())


async def _sigterm_h1(served: Served, key: str, count: int) -> tuple[Answer, list[Answer], float]:
    async def get(client: httpx.AsyncClient, path: str, **params: Any) -> Answer:
        return Answer.of(await client.get(path, params=params))

    async with served.client() as client:
        running = asyncio.create_task(get(client, "/hold", key=key, tag=f"hold-{key}"))
        await served.until(lambda b: b["in_flight"] == 1)
        queued = [
            asyncio.create_task(get(client, "/slow", tag=f"queued-{key}-{i}")) for i in range(count)
        ]
        await served.until(lambda b: b["waiting"] == count)
        signalled = time.monotonic()
        os.kill(served.server.pid, signal.SIGTERM)  # the parent process, as a user's would
        turned_away = await asyncio.gather(*queued)
        served.release(key)
        return await running, turned_away, signalled


async def _sigterm_h2(served: Served, key: str, count: int) -> tuple[Answer, list[Answer], float]:
    async def answer(client: H2Client, stream_id: int) -> Answer:
        stream = await client.response(stream_id)
        assert not stream.reset_by_server, f"stream {stream_id} was reset"
        return Answer(stream.status or 0, stream.headers, bytes(stream.body), time.monotonic())

    # One connection for all: the server must finish some streams and answer the others.
    async with H2Client(HOST, served.server.port) as client:
        running = await client.get(f"/hold?key={key}&tag=hold-{key}")
        await served.until(lambda b: b["in_flight"] == 1)
        queued = [await client.get(f"/slow?tag=queued-{key}-{i}") for i in range(count)]
        await served.until(lambda b: b["waiting"] == count)
        signalled = time.monotonic()
        os.kill(served.server.pid, signal.SIGTERM)
        turned_away = await asyncio.gather(*(answer(client, s) for s in queued))
        served.release(key)
        return await answer(client, running), list(turned_away), signalled


@pytest.mark.parametrize("kind", _PARAMS, ids=str)
def test_sigterm_finishes_running_requests_and_turns_queued_ones_away(
    kind: Kind, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    key, count = new_key(), 3
    scenario = _sigterm_h2 if kind.http2 else _sigterm_h1
    with serve(kind, tmp_path, redis_for(kind, request), concurrency=1) as served:
        finished, turned_away, signalled = run(scenario(served, key, count))
        exited = wait_until(lambda: not served.server.is_running, timeout_s=15.0)
        log = served.server.log()
        code = served.server.stop()

    assert (finished.status, finished.body) == (200, b"held")
    assert [answer.status for answer in turned_away] == [503] * count
    for answer in turned_away:
        assert int(answer.headers["retry-after"]) >= 1
        assert json.loads(answer.body)["reason"] == "shutting_down"
    after_s = [answer.at - signalled for answer in turned_away]
    assert max(after_s) < 1.0, after_s  # at once, not after the running request ended
    assert served.journal(f"queued-{key}") == []  # no queued handler ever ran
    assert exited, f"{kind} still running 15 s after SIGTERM; log:\n{log[-3000:]}"
    assert code in (0, -signal.SIGTERM), f"{kind} exited with {code}; log:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
