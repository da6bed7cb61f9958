"""How the middleware learns that the server begins to shut down (throttle_mw/asgi/shutdown.py).

The real servers are in tests/test_e2e_servers.py; these check the two
mechanisms on their own: chaining onto a server's signal handler, and watching
the multiprocessing event of a hypercorn worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import types
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from throttle_mw.asgi import shutdown
from throttle_mw.asgi.shutdown import hypercorn_shutdown_event, on_termination


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("restore_sigterm")
def test_the_server_s_handler_still_runs_after_ours_and_undo_restores_it() -> None:
    seen: list[str] = []

    def servers_handler(signum: int, frame: FrameType | None) -> None:
        seen.append("server")

    signal.signal(signal.SIGTERM, servers_handler)

    async def scenario() -> None:
        undo = on_termination(asyncio.get_running_loop(), lambda: seen.append("drain"))
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)  # the handler runs between bytecodes; the callback on the loop
        undo()

    asyncio.run(scenario())
    assert seen == ["server", "drain"]
    assert signal.getsignal(signal.SIGTERM) is servers_handler


@pytest.mark.usefixtures("restore_sigterm")
def test_a_default_disposition_is_left_alone() -> None:
    # hypercorn's workers keep SIGTERM's default: replacing it would change what it does.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    async def scenario() -> None:
        undo = on_termination(asyncio.get_running_loop(), lambda: None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        undo()

    asyncio.run(scenario())


def test_outside_a_hypercorn_worker_there_is_no_event_to_watch() -> None:
    assert hypercorn_shutdown_event() is None


def _fake_hypercorn_worker(event: Any) -> Any:
    """A process object as multiprocessing leaves it in a worker hypercorn spawned."""

    def asyncio_worker(config: object, shutdown_event: object, sockets: object) -> None: ...

    asyncio_worker.__module__ = "hypercorn.asyncio.run"
    return types.SimpleNamespace(
        _target=asyncio_worker, _kwargs={"config": None, "shutdown_event": event, "sockets": None}
    )


def test_a_hypercorn_worker_drains_when_its_parent_sets_the_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = multiprocessing.get_context("spawn").Event()
    monkeypatch.setattr(multiprocessing, "current_process", lambda: _fake_hypercorn_worker(event))
    assert hypercorn_shutdown_event() is event

    async def scenario() -> tuple[bool, bool]:
        drained = asyncio.Event()
        undo = on_termination(asyncio.get_running_loop(), drained.set)
        await asyncio.sleep(3 * shutdown.EVENT_POLL_S)
        early = drained.is_set()
        event.set()  # what hypercorn's parent does on SIGTERM
        await asyncio.wait_for(drained.wait(), 10 * shutdown.EVENT_POLL_S)
        undo()
        return early, drained.is_set()

    assert asyncio.run(scenario()) == (False, True)


def test_undo_stops_watching(monkeypatch: pytest.MonkeyPatch) -> None:
    event = multiprocessing.get_context("spawn").Event()
    monkeypatch.setattr(multiprocessing, "current_process", lambda: _fake_hypercorn_worker(event))

    async def scenario() -> bool:
        drained = asyncio.Event()
        on_termination(asyncio.get_running_loop(), drained.set)()
        event.set()
        await asyncio.sleep(3 * shutdown.EVENT_POLL_S)
        return drained.is_set()

    assert asyncio.run(scenario()) is False
