"""The app's own lifespan start-up fails after the middleware started its backend.

Starlette answers ``lifespan.startup.failed`` and raises; the middleware had already
started its backend (the Redis backend's grant listener, heartbeat, batcher and
learning loop; a process registration) and chained onto the server's SIGTERM handler.
A server usually exits then, but one that embeds the app (a test harness, a
supervisor that retries start-up in the same process) would keep those running:
the backend is stopped and the handler restored, as after a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.types import Message

from throttle_mw import ThrottleMiddleware

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def servers_handler() -> Iterator[Any]:
    """A server's own SIGTERM handler, as uvicorn installs one (restored afterwards)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_failed_app_start_up_stops_the_backend_and_restores_the_signal(
    store: str, servers_handler: Any, request: pytest.FixtureRequest
) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the database is down")
        yield  # pragma: no cover

    settings: dict[str, Any] = {"concurrency": 2}
    if store == "redis":
        redis = request.getfixturevalue("clean_redis_server")
        settings |= {"redis_url": redis.url, "key_prefix": "lifespan-failed"}
    app = Starlette(lifespan=lifespan)
    app.add_middleware(ThrottleMiddleware, **settings)

    async def scenario() -> tuple[list[str], list[str], Any]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        await queue.put({"type": "lifespan.startup"})
        sent: list[str] = []

        async def send(message: Message) -> None:
            sent.append(message["type"])

        before = asyncio.all_tasks()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        with contextlib.suppress(RuntimeError):  # Starlette re-raises after reporting it
            await app(scope, queue.get, send)
        await asyncio.sleep(0.1)
        left = asyncio.all_tasks() - before - {asyncio.current_task()}
        names = [task.get_coro().__qualname__ for task in left]  # type: ignore[union-attr]
        for task in left:
            task.cancel()
        return sent, names, signal.getsignal(signal.SIGTERM)

    sent, left, handler = asyncio.run(scenario())
    assert sent == ["lifespan.startup.failed"]
    assert left == []  # nothing of the backend still runs
    assert handler is servers_handler  # the chained handler undone
