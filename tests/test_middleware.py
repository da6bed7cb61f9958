"""The ASGI glue in-process: tags, tenants, responses, dry run, pass-through.

Behaviour that needs real sockets (disconnects, streaming, several processes)
is in the end-to-end tests; these run the app through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from throttle_mw import ThrottleEvent, ThrottleMiddleware, priority
from throttle_mw.asgi import responses, tenants
from throttle_mw.backends import MemoryBackend
from throttle_mw.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")


def decision_json(request: Request) -> JSONResponse:
    d = request.state.throttle
    return JSONResponse(
        {"tenant": d.tenant, "priority": d.priority, "degraded": d.degraded, "outcome": d.outcome}
    )


def fastapi_app(**overrides: Any) -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/api")

    @router.post("/surveys/{survey_id}/responses")
    @priority("critical")
    async def submit(request: Request, survey_id: str) -> Response:
        return decision_json(request)

    @priority("low", degradable=True)
    @router.get("/stats/live")
    async def stats(request: Request) -> Response:
        return decision_json(request)

    @router.get("/plain")
    async def plain(request: Request) -> Response:
        return decision_json(request)

    app.include_router(router)

    outer, inner = APIRouter(), APIRouter()

    @inner.get("/nested")
    @priority("high")
    async def nested(request: Request) -> Response:
        return decision_json(request)

    outer.include_router(inner, prefix="/in")
    app.include_router(outer, prefix="/out")

    sub = FastAPI()

    @sub.get("/deep")
    @priority("high")
    async def deep(request: Request) -> Response:
        return decision_json(request)

    app.mount("/sub", sub)

    @app.get("/healthz")
    @priority("exempt")
    async def healthz() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(ThrottleMiddleware, **{"rate": 1000.0, **overrides})
    return app


@priority("high")
class Items(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return decision_json(request)

    @priority("critical")
    async def post(self, request: Request) -> Response:
        return decision_json(request)


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def starlette_app(**overrides: Any) -> Starlette:
    @priority("low")
    async def low(request: Request) -> Response:
        return decision_json(request)

    inner = Starlette(routes=[Route("/low", low), Route("/items", Items, methods=["GET", "POST"])])
    app = Starlette(
        routes=[
            Route("/low", low),
            Route("/items", Items, methods=["GET", "POST"]),
            Mount("/inner", app=inner),
            WebSocketRoute("/ws", ws_echo),
        ]
    )
    app.add_middleware(ThrottleMiddleware, **{"rate": 1000.0, **overrides})
    return app


async def call(
    app: Any, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, headers=headers)


# --- route tags --------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/surveys/s1/responses", "critical"),
        ("GET", "/api/stats/live", "low"),
        ("GET", "/api/plain", "normal"),
        ("GET", "/sub/deep", "high"),
        ("GET", "/out/in/nested", "high"),
    ],
)
async def test_fastapi_tags_through_routers_and_mounts(
    method: str, path: str, expected: str
) -> None:
    response = await call(fastapi_app(), method, path)
    assert response.status_code == 200
    assert response.json()["priority"] == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/low", "low"),
        ("GET", "/items", "high"),
        ("POST", "/items", "critical"),
        ("GET", "/inner/low", "low"),
        ("POST", "/inner/items", "critical"),
    ],
)
async def test_starlette_tags_on_functions_classes_methods_and_mounts(
    method: str, path: str, expected: str
) -> None:
    response = await call(starlette_app(), method, path)
    assert response.json()["priority"] == expected


@pytest.mark.anyio
async def test_env_rules_override_decorators_and_default_priority_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "THROTTLE_ROUTE_PRIORITIES", "POST /api/surveys/*/responses=low,GET /api/**=high"
    )
    monkeypatch.setenv("THROTTLE_DEFAULT_PRIORITY", "low")
    app = fastapi_app()
    assert (await call(app, "POST", "/api/surveys/s9/responses")).json()["priority"] == "low"
    assert (await call(app, "GET", "/api/stats/live")).json()["priority"] == "high"
    assert (await call(app, "GET", "/sub/deep")).json()["priority"] == "high"  # decorator
    monkeypatch.setenv("THROTTLE_ROUTE_PRIORITIES", "")
    assert (await call(fastapi_app(), "GET", "/api/plain")).json()["priority"] == "low"


@pytest.mark.anyio
async def test_exempt_routes_bypass_the_throttle() -> None:
    response = await call(fastapi_app(rate=1.0, burst=1.0), "GET", "/healthz")
    assert response.status_code == 200
    assert "server-timing" not in response.headers


def test_route_resolution_is_cached_per_method_and_path() -> None:
    from throttle_mw.asgi.routing import RouteTags
    from throttle_mw.priorities import RouteTag

    calls = 0

    class CountingRoute:
        def matches(self, scope: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            nonlocal calls
            calls += 1
            from starlette.routing import Match

            return Match.NONE, {}

    class App:
        def __init__(self) -> None:
            self.routes = [CountingRoute() for _ in range(50)]

    tags = RouteTags((), RouteTag(), App())
    scope = {"method": "GET", "path": "/x", "root_path": "", "type": "http"}
    for _ in range(100):
        tags.tag_for(scope)
    assert calls == 100  # one walk for /x and one for /x/ (slash redirects), then the cache


# --- tenants ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("x" * 8192, 400),
        ("ünïcode", 400),
        ("has space", 400),
        ("-leading-dash", 400),
        ("acme", 200),
        ("tenant.with:allowed@chars+=/_-", 200),
    ],
)
async def test_tenant_header_is_length_and_charset_checked(value: str, status: int) -> None:
    app = fastapi_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/api/plain", headers=[(b"X-Tenant-ID", value.encode("utf-8"))])
    assert response.status_code == status
    if status == 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert value not in response.text
    else:
        assert response.json()["tenant"] == value


@pytest.mark.anyio
async def test_missing_or_empty_tenant_falls_back_to_client_address() -> None:
    app = fastapi_app()
    assert (await call(app, "GET", "/api/plain")).json()["tenant"] == "ip:127.0.0.1"
    response = await call(app, "GET", "/api/plain", {"X-Tenant-ID": "  "})
    assert response.json()["tenant"] == "ip:127.0.0.1"


@pytest.mark.anyio
async def test_a_tenant_per_domain_from_the_host_header() -> None:
    app = fastapi_app(tenant_header="Host")
    response = await call(app, "GET", "/api/plain", {"Host": "acme.example.com:8443"})
    assert response.json()["tenant"] == "acme.example.com:8443"


@pytest.mark.anyio
async def test_duplicated_tenant_headers() -> None:
    app = fastapi_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        same = await client.get("/api/plain", headers=[("X-Tenant-ID", "a"), ("X-Tenant-ID", "a")])
        differ = await client.get(
            "/api/plain", headers=[("X-Tenant-ID", "a"), ("X-Tenant-ID", "b")]
        )
    assert same.json()["tenant"] == "a"
    assert differ.status_code == 400


def test_tenant_header_values_are_checked_once_and_bad_ones_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from throttle_mw.settings import TENANT_PATTERN as pattern

    checks: list[str] = []

    class Counting:
        def fullmatch(self, value: str) -> object:
            checks.append(value)
            return pattern.fullmatch(value)

    monkeypatch.setattr(tenants, "TENANT_PATTERN", Counting())
    monkeypatch.setattr(tenants, "_NAMED", {})
    named = tenants._NAMED
    resolve = tenants.Tenants("X-Tenant-ID").from_header
    for _ in range(3):
        assert resolve({"headers": [(b"x-tenant-id", b" acme ")]}) == "acme"
        with pytest.raises(tenants.InvalidTenant):
            resolve({"headers": [(b"x-tenant-id", b"has space")]})
    assert checks == ["acme", "has space", "has space", "has space"]
    assert named == {b"acme": "acme"}  # a bad value is never remembered
    monkeypatch.setattr(tenants, "_ADDRESS_CACHE_SIZE", 4)
    for n in range(10):
        assert tenants.header_tenant(b"t%d" % n) == f"t{n}"
        assert len(named) <= 4  # bounded: client-chosen values


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True])
async def test_resolver_hook_replaces_the_header(is_async: bool) -> None:
    keys = {"key-1": "acme", "key-2": "auth0|abc"}

    def lookup(scope: dict[str, Any]) -> str | None:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        return keys.get(auth.removeprefix("Bearer "))

    async def lookup_async(scope: dict[str, Any]) -> str | None:
        await asyncio.sleep(0)
        return lookup(scope)

    app = fastapi_app(tenant_resolver=lookup_async if is_async else lookup)
    headers = {"Authorization": "Bearer key-1", "X-Tenant-ID": "spoofed"}
    assert (await call(app, "GET", "/api/plain", headers)).json()["tenant"] == "acme"
    odd = (await call(app, "GET", "/api/plain", {"Authorization": "Bearer key-2"})).json()
    assert odd["tenant"].startswith("h:")  # a trusted id of any shape, hashed to a safe one
    anonymous = (await call(app, "GET", "/api/plain", {"X-Tenant-ID": "spoofed"})).json()
    assert anonymous["tenant"] == "ip:127.0.0.1"


@pytest.mark.anyio
async def test_a_resolver_that_fails_falls_back_to_the_address_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Never a 500: a wrong type or an exception is a resolver that found no tenant, and
    each kind of failure is one log line per process, whatever the number of requests."""
    keys = {"key-1": "acme"}
    answers: dict[str, Any] = {"int": 42, "bytes": b"acme", "object": object(), "bool": True}

    async def resolver(scope: dict[str, Any]) -> Any:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        kind = auth.removeprefix("Bearer ")
        if kind == "bad":
            raise tenants.InvalidTenant("Unknown API key.")  # the resolver's own 400
        return answers[kind] if kind in answers else keys[kind]  # KeyError: the key

    app = fastapi_app(tenant_resolver=resolver)
    seen: dict[str, tuple[int, str]] = {}
    with caplog.at_level("INFO", logger="throttle_mw"):
        for _ in range(3):
            for kind in ("int", "bytes", "object", "bool", "sk-secret", "key-1", "bad"):
                response = await call(app, "GET", "/api/plain", {"Authorization": f"Bearer {kind}"})
                body = response.json()
                seen[kind] = (response.status_code, body.get("tenant", body.get("title")))
    assert seen == {
        "int": (200, "42"),
        "bytes": (200, "acme"),  # the text they hold (test_a_resolver_s_bytes_are_...)
        "object": (200, "ip:127.0.0.1"),
        "bool": (200, "ip:127.0.0.1"),
        "sk-secret": (200, "ip:127.0.0.1"),
        "key-1": (200, "acme"),
        "bad": (400, "Invalid tenant"),
    }
    lines = [r.getMessage() for r in caplog.records if "tenant_resolver" in r.getMessage()]
    assert len(lines) == 3, lines  # object, bool, KeyError: once each
    assert {line.split(" (")[0] for line in lines} == {
        "tenant_resolver returned object",
        "tenant_resolver returned bool",
        "tenant_resolver raised KeyError",
    }
    assert all("\n" not in line and "client address" in line for line in lines)
    assert "sk-secret" not in caplog.text  # the exception's message is never logged
    assert "in resolver" in lines[-1]  # but where it was raised is


@pytest.mark.anyio
async def test_a_resolver_s_bytes_are_the_text_they_hold() -> None:
    """Bytes (a header value read from the scope) are their UTF-8 text, treated as that
    `str`: an id the tenant header accepts is that tenant, the header's own for the same
    bytes; any other value is hashed like a trusted `str`; bytes that are not UTF-8 are
    hashed as they are. Never the client address, never a failure logged."""
    answers: dict[str, bytes] = {
        "plain": b"acme",
        "shaped": b"auth0|abc",
        "utf8": "café".encode(),
        "latin1": b"caf\xe9",  # not UTF-8
        "empty": b"",
    }

    def resolver(scope: dict[str, Any]) -> bytes:
        return answers[dict(scope["headers"])[b"x-kind"].decode()]

    app = fastapi_app(tenant_resolver=resolver)
    seen = {}
    for kind in answers:
        response = await call(app, "GET", "/api/plain", {"X-Kind": kind})
        assert response.status_code == 200
        seen[kind] = response.json()["tenant"]
    by_header = await call(fastapi_app(), "GET", "/api/plain", {"X-Tenant-ID": "acme"})
    assert seen["plain"] == by_header.json()["tenant"] == "acme"
    assert seen["shaped"] == tenants.digest_tenant("auth0|abc")
    assert seen["utf8"] == tenants.digest_tenant("café")
    assert seen["latin1"].startswith("h:")
    assert seen["latin1"] not in (seen["utf8"], tenants.digest_tenant("caf\xe9"))
    assert seen["empty"] == "ip:127.0.0.1"  # as an empty str: no tenant found


# --- responses -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admitted_responses_carry_server_timing_and_the_decision() -> None:
    response = await call(fastapi_app(), "GET", "/api/plain", {"X-Tenant-ID": "acme"})
    assert response.status_code == 200
    assert response.headers["server-timing"].startswith("throttle;dur=")
    assert response.json() == {
        "tenant": "acme",
        "priority": "normal",
        "degraded": False,
        "outcome": "admitted",
    }


@pytest.mark.anyio
async def test_rejections_are_problem_documents_with_retry_after_and_ratelimit_fields() -> None:
    app = fastapi_app(rate=1.0, burst=1.0, max_wait_s=0.0, tenant_rate=1.0, tenant_burst=1.0)
    first = await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"})
    second = await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"})
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.headers["content-type"] == "application/problem+json"
    assert int(second.headers["retry-after"]) >= 1
    assert second.headers["ratelimit-policy"] == '"fleet";q=1;w=1, "tenant";q=1;w=1'
    assert second.headers["ratelimit"] == f'"tenant";r=0;t={second.headers["retry-after"]}'
    body = second.json()
    assert body["status"] == 429
    assert body["type"] == "urn:throttle-mw:problem:tenant-rate-cap"
    assert set(body) == {"type", "title", "status", "detail", "reason", "retry_after_s"}


@pytest.mark.anyio
async def test_every_answer_the_middleware_makes_is_no_store() -> None:
    """400, 408, 429, 503: none may be cached and replayed to another request."""
    app = fastapi_app(rate=1.0, burst=1.0, max_wait_s=0.0, tenant_rate=1.0, tenant_burst=1.0)
    answers = [
        await call(app, "GET", "/api/plain", {"X-Tenant-ID": "has space"}),
        await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"}),
        await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"}),
    ]
    assert [a.status_code for a in answers] == [400, 200, 429]
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await responses.send_request_timeout(send)
    broken = ThrottleMiddleware(PlainTextResponse("never"), rate=-1.0)  # cannot start
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await broken(scope, None, send)  # type: ignore[arg-type]
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [408, 503]
    for answer in [a for a in answers if a.status_code != 200]:
        assert answer.headers["cache-control"] == "no-store", answer.status_code
    for start in starts:
        assert (b"cache-control", b"no-store") in start["headers"], start["status"]
    # One place sends them all: no other module of the glue starts a response itself.
    texts = {f.name: f.read_text() for f in Path(responses.__file__).parent.glob("*.py")}
    assert {name for name, text in texts.items() if '"type": "http.response.start"' in text} == {
        "responses.py"
    }
    assert texts["responses.py"].count('"http.response.start"') == 1


@pytest.mark.anyio
async def test_degradable_route_is_admitted_degraded_while_others_wait() -> None:
    app = fastapi_app(rate=1.0, burst=1.0)
    headers = {"X-Tenant-ID": "acme"}
    assert (await call(app, "GET", "/api/plain", headers)).status_code == 200
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        waiting = asyncio.create_task(client.get("/api/plain", headers=headers))
        await asyncio.sleep(0.05)
        live = await client.get("/api/stats/live", headers={"X-Tenant-ID": "other"})
        assert live.json()["degraded"] is True
        assert 'desc="degraded"' in live.headers["server-timing"]
        assert (await waiting).status_code == 200


# --- modes --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_disabled_is_a_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLE_ENABLED", "false")
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(ThrottleMiddleware)
    response = await call(app, "GET", "/")
    assert response.status_code == 200
    assert "server-timing" not in response.headers


@pytest.mark.anyio
async def test_dry_run_decides_and_reports_but_rejects_nothing() -> None:
    events: list[ThrottleEvent] = []
    app = fastapi_app(rate=1.0, burst=1.0, max_wait_s=0.0, dry_run=True, observers=[events.append])
    responses = [await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.json()["outcome"] for r in responses] == ["admitted", "would_reject", "would_reject"]
    assert 'desc="would_reject:' in responses[1].headers["server-timing"]
    assert [e.kind for e in events] == ["admitted", "rejected", "rejected"]
    assert all(e.dry_run for e in events)


@pytest.mark.anyio
async def test_websockets_and_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    middleware = ThrottleMiddleware(inner, rate=1.0, burst=1.0)
    scope = {"type": "websocket", "path": "/ws", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        pass

    await middleware(scope, receive, send)
    assert seen == [(scope, receive, send)]


@pytest.mark.anyio
async def test_observers_see_every_decision() -> None:
    events: list[ThrottleEvent] = []
    app = starlette_app(observers=[events.append])
    await call(app, "GET", "/low", {"X-Tenant-ID": "acme"})
    assert [(e.kind, e.tenant, e.priority) for e in events] == [("admitted", "acme", "low")]


@pytest.mark.anyio
async def test_a_shared_backend_exposes_the_live_budget() -> None:
    settings = Settings.from_env(rate=5.0, burst=5.0)
    backend = MemoryBackend(settings.limits(), settings.policy())
    app = starlette_app(rate=5.0, burst=5.0, backend=backend)
    for _ in range(3):
        await call(app, "GET", "/low")
    snapshot = await backend.snapshot()
    assert snapshot.tokens is not None
    assert snapshot.tokens < 3


@pytest.mark.anyio
async def test_middlewares_sharing_a_memory_backend_give_back_every_lease() -> None:
    """The in-memory fast path keys leases by numbers: the backend's, so two
    middlewares sharing it never take one another's lease back."""
    settings = Settings.from_env(concurrency=2)
    backend = MemoryBackend(settings.limits(), settings.policy())
    entered, finish = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await finish.wait()
        return PlainTextResponse("slow")

    async def quick(request: Request) -> Response:
        return PlainTextResponse("quick")

    first, second = Starlette(routes=[Route("/", slow)]), Starlette(routes=[Route("/", quick)])
    first.add_middleware(ThrottleMiddleware, concurrency=2, backend=backend)
    second.add_middleware(ThrottleMiddleware, concurrency=2, backend=backend)
    held = asyncio.create_task(call(first, "GET", "/"))
    await entered.wait()
    assert (await backend.snapshot()).in_flight == 1
    assert (await call(second, "GET", "/")).status_code == 200
    assert (await backend.snapshot()).in_flight == 1  # the first one's lease is still held
    finish.set()
    assert (await held).status_code == 200
    assert (await backend.snapshot()).in_flight == 0


@pytest.mark.anyio
async def test_a_memory_backend_subclass_that_releases_its_own_way_is_called() -> None:
    """The in-memory fast path calls the scheduler directly: not for a subclass
    that overrides the backend's decision or release."""
    released: list[object] = []

    class Counting(MemoryBackend):
        def release(self, request_id: Any) -> None:
            released.append(request_id)
            super().release(request_id)

    settings = Settings.from_env(concurrency=2)
    backend = Counting(settings.limits(), settings.policy())
    app = starlette_app(concurrency=2, backend=backend)
    for _ in range(3):
        assert (await call(app, "GET", "/low")).status_code == 200
    assert len(released) == 3
    assert (await backend.snapshot()).in_flight == 0


# --- configuration at start-up --------------------------------------------------------------


def lifespan_messages(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await queue.put({"type": "lifespan.startup"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"].startswith("lifespan.startup"):
                await queue.put({"type": "lifespan.shutdown"})

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, queue.get, send)

    asyncio.run(run())
    return sent


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("THROTTLE_RATE", "-5"),
        ("THROTTLE_RATE", "fast"),
        ("THROTTLE_CONCURRENCY", "2.5"),
        ("THROTTLE_BURST", "0.5"),
        ("THROTTLE_MAX_WAIT", "critical=10,urgent=3"),
        ("THROTTLE_FAILURE_MODE", "maybe"),
        ("THROTTLE_ROUTE_PRIORITIES", "GET /x=urgent"),
        ("THROTTLE_TENANT_WEIGHTS", "acme=three"),
        ("THROTTLE_QUEUE_LIMIT", "-1"),
        ("THROTTLE_DRY_RUN", "perhaps"),
        ("THROTTLE_REDIS_URL", "http://user:secret@redis:6379"),
        ("THROTTLE_KEY_PREFIX", "{app}"),
        ("THROTTLE_TENANT_HEADER", "X Tenant"),
        ("THROTTLE_DEFAULT_PRIORITY", "exempt"),
    ],
)
def test_bad_values_fail_lifespan_startup_naming_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("THROTTLE_RATE", "80")
    monkeypatch.setenv(variable, value)
    app = Starlette()
    app.add_middleware(ThrottleMiddleware)
    messages = lifespan_messages(app)
    assert messages[0]["type"] == "lifespan.startup.failed"
    text = messages[0]["message"]
    assert variable in text
    assert "expected" in text
    assert "secret" not in text  # never echo credentials
    if "secret" not in value:
        assert value[:20] in text


def test_good_configuration_starts() -> None:
    app = Starlette()
    app.add_middleware(ThrottleMiddleware, rate=80.0)
    assert [m["type"] for m in lifespan_messages(app)] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.anyio
async def test_a_snapshot_that_ticks_delivers_its_grants() -> None:
    """Regression: snapshot() used to drop the events of its tick, losing a grant and its lease."""
    import time

    from throttle_mw.backends.base import Admitted, Waiting
    from throttle_mw.scheduler import Request

    settings = Settings.from_env({}, rate=10.0, burst=1.0, concurrency=1)
    backend = MemoryBackend(settings.limits(), settings.policy())
    first = await backend.acquire(Request("first", "t"))
    assert isinstance(first, Admitted)
    backend.release(first.request_id)
    queued = await backend.acquire(Request("second", "t"))
    assert isinstance(queued, Waiting)
    time.sleep(0.15)  # noqa: ASYNC251 - block the loop: the token is due, the timer has not fired
    await backend.snapshot()
    granted = await asyncio.wait_for(queued.future, 1.0)
    assert isinstance(granted, Admitted)
    backend.release(granted.request_id)
    assert (await backend.snapshot()).in_flight == 0


@pytest.mark.anyio
async def test_slash_redirects_keep_their_routes_tag() -> None:
    """/metrics on an exempt mount redirects to /metrics/: the redirect is exempt too."""

    async def metrics(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("metrics")(scope, receive, send)

    exempt = priority("exempt")(metrics)
    app = Starlette(routes=[Mount("/metrics", app=exempt)])
    app.add_middleware(ThrottleMiddleware, rate=1.0, burst=1.0, max_wait_s=0.0)
    for _ in range(3):  # far over the budget, yet never throttled
        response = await call(app, "GET", "/metrics")
        assert response.status_code == 307
        assert "server-timing" not in response.headers


@pytest.mark.anyio
async def test_each_rejection_is_one_structured_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app = fastapi_app(rate=1.0, burst=1.0, max_wait_s=0.0)
    with caplog.at_level("INFO", logger="throttle_mw"):
        await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"})
        await call(app, "GET", "/api/plain", {"X-Tenant-ID": "acme"})
    records = [r for r in caplog.records if r.name == "throttle_mw"]
    assert len(records) == 1
    fields = records[0].throttle  # type: ignore[attr-defined]
    assert fields["tenant"] == "acme"
    assert fields["method"] == "GET"
    assert fields["path"] == "/api/plain"
    assert (fields["status"], fields["reason"]) == (429, "tenant_over_share")
    assert fields["retry_after"] >= 1
    assert fields["request_id"]
    assert "GET /api/plain tenant=acme" in records[0].getMessage()


@pytest.mark.anyio
async def test_scopes_without_the_optional_keys_take_the_same_path() -> None:
    """The common path reads the scope by subscripts in a ``try``: a scope without a
    root path, a state or a client, a client of None (a Unix socket), a route's, a
    host's and a tenant's first request are decided as with every key present."""
    decisions: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        decisions.append(scope["state"]["throttle"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = ThrottleMiddleware(app, rate=1000.0, concurrency=10)
    await middleware.startup()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    full = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": "/",
        "root_path": "",
        "headers": [(b"host", b"x")],
        "client": ("10.0.0.7", 1234),
        "state": {},
    }
    scopes: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in full.items() if k not in ("root_path", "state")}, "ip:10.0.0.7"),
        ({k: v for k, v in full.items() if k != "client"}, "ip:unknown"),
        ({**full, "client": None}, "ip:unknown"),
        ({**full, "client": ("10.0.0.8", 1)}, "ip:10.0.0.8"),
        ({**full, "root_path": "/api"}, "ip:10.0.0.7"),
        ({**full, "headers": [(b"x-tenant-id", b"acme")]}, "acme"),
        ({**full, "headers": [(b"x-tenant-id", b"acme")]}, "acme"),
        (full, "ip:10.0.0.7"),
    ]
    for scope, tenant in scopes:
        sent.clear()
        await middleware(dict(scope), receive, send)
        assert sent[0]["headers"] == [(b"server-timing", b"throttle;dur=0.0")]
        assert decisions[-1].tenant == tenant
        assert decisions[-1].outcome == "admitted"
    assert middleware.backend is not None
    snapshot = await middleware.backend.snapshot()
    assert snapshot.in_flight == 0
    await middleware.shutdown()
