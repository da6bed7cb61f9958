"""Cancel the app's work when its client leaves: ``THROTTLE_CANCEL_ON_DISCONNECT`` (opt-in).

A concurrency slot belongs to the app's work (docs/operations.md, "Clients
that leave"): a handler that outlives its client keeps its slot until it
returns, as servers and Starlette do not cancel it. With this option on, the
middleware runs an admitted request's app in a task of its own and cancels
that task when the client's ``http.disconnect`` arrives before the response is
complete, so the work stops and the slot comes back at once (as Envoy resets
the upstream stream when the downstream one goes away).

The disconnect is noticed by the request's `RequestBody` (`RequestBody.follow`):
only once the body is complete, so the app never loses a message to the
watch. A disconnect after the response's last chunk cancels nothing: the app
may still run its background tasks, and its slot is already back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from starlette.types import Message, Send


class Cancel:
    """One request's cancellation: call it when the client leaves; `send` wraps the app's."""

    __slots__ = ("_send", "cancelled", "finished", "task")

    def __init__(self, send: Send) -> None:
        self._send = send
        #: The app's task (set once it is made).
        self.task: asyncio.Future[None] | None = None
        #: The response's last chunk was sent: a disconnect now cancels nothing.
        self.finished = False
        #: The task was cancelled because the client left.
        self.cancelled = False

    def __call__(self) -> None:
        """The client left: cancel the app's work, unless its response is complete."""
        task = self.task
        if self.finished or self.cancelled or task is None or task.done():
            return
        self.cancelled = True
        task.cancel("throttle_mw: the client left (THROTTLE_CANCEL_ON_DISCONNECT)")

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        return self._send(message)
