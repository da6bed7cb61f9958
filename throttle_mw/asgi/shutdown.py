"""Notice that the server begins a graceful shutdown.

Servers run the ASGI lifespan shutdown only after every request has finished,
too late to turn queued requests away. So the middleware listens for the
server's own shutdown trigger and starts draining the moment it fires:

- a signal, where the process serving requests gets one: uvicorn (and its
  workers, also under gunicorn), granian's workers and hypercorn with
  ``--workers 0`` install Python-level SIGTERM/SIGINT handlers, and the
  middleware chains onto them (theirs still runs, so their shutdown is unchanged);
- hypercorn's worker processes get no signal: hypercorn's parent catches it and
  sets a multiprocessing event that the worker polls. The middleware watches
  the same event.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: How often hypercorn's shutdown event is looked at (hypercorn's worker looks as often).
EVENT_POLL_S = 0.1


class Flag(Protocol):
    def is_set(self) -> bool: ...


def on_termination(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> Callable[[], None]:
    """Run `callback` on the loop when the server begins to shut down; returns an undo function."""
    undo_signals = _chain_signals(loop, callback)
    event = hypercorn_shutdown_event()
    if event is None:
        return undo_signals
    undo_watch = _watch(loop, event, callback)

    def undo() -> None:
        undo_signals()
        undo_watch()

    return undo


def _chain_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> Callable[[], None]:
    """Chain onto SIGTERM/SIGINT handlers that are Python callables (set by the server).

    The previous handler still runs, so the server's own shutdown is unchanged.
    A default or ignored disposition is left alone: replacing it would change
    what the signal does to the process.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: dict[signal.Signals, Any] = {}
    for sig in _SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(
            signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
        ) -> None:
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (previous, handler)

    def undo() -> None:
        for sig, (previous, handler) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return undo


def hypercorn_shutdown_event() -> Flag | None:
    """The event hypercorn's parent sets on SIGTERM/SIGINT, if this is one of its workers.

    hypercorn passes it to the worker function as ``shutdown_event``, and
    multiprocessing keeps a spawned process's arguments on its process object.
    None anywhere else (and if a hypercorn version stops passing it this way).
    """
    process = multiprocessing.current_process()
    target = getattr(process, "_target", None)
    if not str(getattr(target, "__module__", "")).startswith("hypercorn."):
        return None
    kwargs = getattr(process, "_kwargs", None)
    event = kwargs.get("shutdown_event") if isinstance(kwargs, dict) else None
    return event if callable(getattr(event, "is_set", None)) else None


def _watch(
    loop: asyncio.AbstractEventLoop, event: Flag, callback: Callable[[], None]
) -> Callable[[], None]:
    async def watch() -> None:
        # Polled as hypercorn polls it: a multiprocessing event cannot be awaited, and a
        # thread blocked on it would hold up the loop's executor shutdown at exit.
        while not event.is_set():  # noqa: ASYNC110
            await asyncio.sleep(EVENT_POLL_S)
        callback()

    task = loop.create_task(watch(), name="throttle_mw: hypercorn shutdown watch")

    def undo() -> None:
        task.cancel()

    return undo
