"""Route tags cannot be dodged by a request the app's router still serves.

A client that reaches a `low:sheddable` endpoint under another tag escapes
shedding and goes ahead of low traffic (guarantees 4 and 5). Starlette's router
serves a GET route's HEAD requests, and matches paths with ``re.match`` and a
final ``$`` (which also matches before a trailing newline, and its ``{param}``
segments match newlines): the rules and the decorators must tag those requests
as the route they reach. Found by the hostile sweep (branch audit).
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from throttle_mw import ThrottleMiddleware, priority
from throttle_mw.settings import RouteRule, Settings

pytestmark = pytest.mark.usefixtures("clean_env")


async def decision(request: Request) -> Response:
    tag = request.state.throttle.priority
    return JSONResponse({"priority": tag}, headers={"x-priority": tag})


@priority("low", sheddable=True)
class Stats(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await decision(request)


class Board(HTTPEndpoint):
    @priority("low", sheddable=True)
    async def get(self, request: Request) -> Response:
        return await decision(request)


def app_with_rules() -> Starlette:
    app = Starlette(
        routes=[
            Route("/api/stats", decision),
            Route("/api/items/{item}", decision),
            Route("/board", Board),
        ]
    )
    rules = "GET /api/stats=low:sheddable,GET /api/items/**=low:sheddable"
    app.add_middleware(ThrottleMiddleware, concurrency=8, route_priorities=rules)
    return app


async def served(app: Any, method: str, path: str) -> tuple[int, str | None]:
    """Run one request with a raw scope (the path as a server decodes it); its status and
    the priority the app was told."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("203.0.113.7", 5000),
        "server": ("test", 80),
    }
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = dict(sent[0]["headers"])
    tag = headers.get(b"x-priority")
    return sent[0]["status"], tag.decode() if tag is not None else None


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/api/stats\n", "/api/items/1\n2", "/api/items/\n"])
async def test_a_newline_in_the_path_does_not_dodge_a_rule(path: str) -> None:
    """uvicorn decodes %0A into the path; Starlette still routes it to the endpoint."""
    # The router serves the tagged endpoint, so the rule's tag applies.
    assert await served(app_with_rules(), "GET", path) == (200, "low")


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/api/stats", "/board"])
async def test_head_is_tagged_as_the_get_route_it_runs(path: str) -> None:
    """Starlette answers HEAD with the GET endpoint: a GET rule or tag covers it."""
    app = app_with_rules()
    assert await served(app, "GET", path) == (200, "low")
    assert await served(app, "HEAD", path) == (200, "low")


@pytest.mark.anyio
async def test_a_class_tag_still_covers_head() -> None:
    app = Starlette(routes=[Route("/stats", Stats)])
    app.add_middleware(ThrottleMiddleware, concurrency=8)
    assert await served(app, "GET", "/stats") == (200, "low")
    assert await served(app, "HEAD", "/stats") == (200, "low")


def rule(text: str) -> RouteRule:
    (only,) = Settings.from_env(environ={"THROTTLE_ROUTE_PRIORITIES": text}).route_priorities
    return only


def test_rules_keep_their_methods_apart() -> None:
    """A GET rule covers HEAD (Starlette serves HEAD with GET); no other method."""
    get = rule("GET /x=low")
    assert get.matches("GET", "/x")
    assert get.matches("HEAD", "/x")
    assert not get.matches("POST", "/x")
    assert not get.matches("GET", "/x/y")
    assert not get.matches("GET", "/xy")
    assert not get.matches("GET", "/x\n\n")  # Starlette's `$` takes one newline only
    head = rule("HEAD /x=low")
    assert head.matches("HEAD", "/x")
    assert not head.matches("GET", "/x")


@pytest.mark.anyio
async def test_a_path_cannot_forge_a_rejection_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """The path is the client's: a decoded %0A or %0D in it must not start a new log line
    (CWE-117). The message quotes it as uvicorn's access log does; the structured field
    keeps the path as it was."""
    app = Starlette(routes=[Route("/{rest:path}", decision)])
    app.add_middleware(ThrottleMiddleware, rate=1.0, burst=1.0, max_wait_s=0.0)
    forged = "/x\nthrottle rejected GET /admin tenant=root\r"
    with caplog.at_level("INFO", logger="throttle_mw"):
        assert (await served(app, "GET", "/warm-up"))[0] == 200
        assert (await served(app, "GET", forged))[0] == 429
    (record,) = [r for r in caplog.records if r.name == "throttle_mw"]
    message = record.getMessage()
    assert "\n" not in message
    assert "\r" not in message
    assert "/x%0Athrottle%20rejected" in message
    assert record.throttle["path"] == forged  # type: ignore[attr-defined]
