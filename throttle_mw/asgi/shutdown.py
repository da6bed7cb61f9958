"""Notice that the server begins a graceful shutdown.

Servers run the ASGI lifespan shutdown only after every request has finished,
too late to turn queued requests away. So the middleware chains onto the
server's SIGTERM/SIGINT handlers (uvicorn, gunicorn workers and hypercorn
install Python-level ones) and starts draining the moment the signal arrives.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_termination(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> Callable[[], None]:
    """Run `callback` on the loop when SIGTERM/SIGINT arrives; returns an undo function.

    Only chains onto handlers that are Python callables (set by the server); the
    previous handler still runs, so the server's own shutdown is unchanged.
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
