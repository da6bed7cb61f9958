"""`ThrottleMiddleware`: pure ASGI glue between the server, the backend and the app.

Per HTTP request: resolve tag and tenant; read a body ahead (slow uploads wait
outside the budget); ask the backend; wait in the queue while watching for a
disconnect; reject with a problem document, or run the app and give the lease
back on the last body chunk, on an exception, on a disconnect, or once the app
has waited on a slow client for `THROTTLE_CLIENT_HOLD`. With
`THROTTLE_CANCEL_ON_DISCONNECT` the app runs in a task of its own, cancelled
when its client leaves before the response is complete (asgi/cancel.py).
Lifespan and websocket scopes pass through (lifespan also starts and stops
the backend).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import MethodType, TracebackType
from typing import Any, Final, Literal, NamedTuple, cast
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backends import make_backend
from ..backends.base import NOT_AT_ONCE, Admitted, Backend, FastPathBackend, RequestIds, Waiting
from ..backends.base import Outcome as BackendOutcome
from ..observe import EventKind, Observer, ThrottleEvent
from ..priorities import Priority, RouteTag, make_tag
from ..scheduler import LeaseKey, Limits, Reject, Request
from ..scheduler.limit import InFlight, Sample
from ..settings import ConfigError, Settings
from .body import BodyBuffers, RequestBody
from .cancel import Cancel
from .hold import ClientHold
from .responses import send_bad_request, send_rejection, send_request_timeout
from .routing import RouteTags
from .shutdown import on_termination
from .tenants import (
    _ADDRESSES,
    _NAMED,
    REPEATED,
    InvalidTenant,
    Tenants,
    client_address,
    header_tenant,
)

logger = logging.getLogger("throttle_mw")


def _bodyless(scope: Scope) -> bool:
    """An HTTP/1 request announcing no body (no Content-Length but 0, no Transfer-Encoding)."""
    if scope.get("http_version") not in _HTTP1:
        return False  # HTTP/2 and 3 may send a body without announcing it
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return False
    return True


def _never_held(lease_key: LeaseKey) -> None:
    """The release of a middleware without a backend (off): it never holds a lease."""


_SHUTTING_DOWN = Reject("shutting_down", 1.0)
#: The settings of a middleware that is off, or could not start.
_OFF = Settings(enabled=False)
#: A middleware that could not start: a configuration fix, not seconds, will end it.
_UNCONFIGURED = Reject("unavailable", 60.0)
_new_tuple = tuple.__new__
_SERVER_TIMING = b"server-timing"
_NO_WAIT = (_SERVER_TIMING, b"throttle;dur=0.0")
#: `Admitted`'s fields, by index.
_DEGRADED: Final = 2
_LEASE: Final = 3
_UNTHROTTLED: Final = 4
_HTTP1 = frozenset(("1.1", "1.0"))
#: The lifespan messages after which the backend is stopped.
_LIFESPAN_ENDS = frozenset(
    ("lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed")
)
#: Bounds `ThrottleMiddleware._admitted` (cleared when full, like the tenant caches).
_DECISION_CACHE_SIZE = 4096
_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding"))
#: The scheduler's ``admit_unsheddable``, bound: (now, lease key, tenant, cost) ->
#: None (declined) or whether the admission holds a lease.
AdmitAtOnce = Callable[[float, int, str, int], bool | None]

Outcome = Literal["admitted", "degraded", "unthrottled", "would_queue", "would_reject"]


#: A request admitted at once, as its send wrapper (`_send_at_once`) and `__call__` share
#: it: a list, made per request with one opcode and read by index (3.11 specializes
#: both): [the server's send, the lease key, whether the lease is still held, the
#: `ClientHold` once the app waits on its client (else None), the backend's
#: ``release_at_once``, its ``release``, the middleware]. (Literal indexes: a
#: constant's name would be a global load each.)
_AtOnce = list[Any]
_bind = MethodType


def _send_at_once(state: _AtOnce, message: Message) -> Awaitable[None]:
    """The send wrapper of a request admitted at once, bound to its state: the
    `Server-Timing` header (a constant: it waited 0.0 ms) on the response's start, the
    lease back as the last body chunk is handed to the server (so it is returned even
    if sending fails: the client went away). A plain function returning the server's
    own awaitable: no extra coroutine per message."""
    kind = message["type"]
    if kind == "http.response.start":
        # A new dict and list: the app may send the same message (and its header
        # list) again, and must not see our header in it. (A copy and a store:
        # cheaper than ``{**message, "headers": ...}``.)
        message = message.copy() if type(message) is dict else dict(message)
        message["headers"] = [*message.get("headers", ()), _NO_WAIT]
    elif kind == "http.response.body":
        if not message.get("more_body", False):
            if state[2]:
                state[2] = False
                hold: ClientHold | None = state[3]
                if (hold is None or not hold.released) and not state[4](state[1]):
                    state[5](state[1])
        elif state[2]:
            # More to come: a slow reader's back-pressure may hold this send up. From
            # then on the app's waiting on its client counts against THROTTLE_CLIENT_HOLD.
            hold = state[3]
            if hold is None:
                hold = state[3] = state[6]._hold(state[1])
            return cast("ClientHold", hold).send(state[0], message)
    send: Send = state[0]
    return send(message)


class ThrottleDecision(NamedTuple):
    """What the throttle decided; the app reads it as ``request.state.throttle``."""

    tenant: str
    priority: Priority
    waited_s: float
    degraded: bool
    outcome: Outcome
    cost: int = 1
    #: For dry-run `would_reject`: why it would have been rejected.
    reason: str | None = None


class ThrottleMiddleware:
    """Throttle an ASGI app against a budget shared by every worker and replica.

    ``app.add_middleware(ThrottleMiddleware)`` reads ``THROTTLE_*`` variables;
    keyword arguments (the `Settings` field names, e.g. ``rate=80``) override
    them. A bad setting fails the ASGI lifespan start-up with a message naming it, and
    so does anything else that stops the middleware from being built (e.g.
    ``THROTTLE_REDIS_URL`` without the ``redis`` extra).

    `backend` shares a budget built elsewhere (e.g. to read its live state);
    `observers` are called with a `ThrottleEvent` for every decision.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        backend: Backend | None = None,
        observers: Sequence[Observer] = (),
        **overrides: Any,
    ) -> None:
        self.app = app
        self._observers = tuple(observers)
        self._enabled = False
        #: Why the middleware cannot run: reported as a failed lifespan start-up.
        self.error: Exception | None = None
        #: `error`'s own traceback (from where it was raised in `__init__`), which every
        #: `startup` raises it with: raising it again would otherwise add to it each time.
        self._error_traceback: TracebackType | None = None
        self._error_logged = False
        self._backend: Backend | None = None
        # What `startup`, `begin_drain` and `shutdown` read: set before the try, so that a
        # middleware that could not be built still has them (`startup` raises `error`).
        self._draining = asyncio.Event()
        self._draining_now = False  # the event's state, read per request without a call
        self._undo_signals: Any = None
        # Set before the try, not only in it and in its handler: compiled by mypyc
        # (bench/mypyc_build.py), an attribute assigned on every path of __init__ is
        # taken as always set, and the handler's assignment then freed the value the
        # failed one never stored (a crash on every bad setting, mypyc 2.4.1).
        self.settings = _OFF
        try:
            self.settings = Settings.from_env(**overrides)
            self._build(app, backend)
        except Exception as exc:
            # Starlette builds its middleware inside the server's first ASGI call, the
            # lifespan one: raising there makes uvicorn's default `lifespan=auto` decide
            # lifespan is unsupported and serve 500s. Fail start-up instead (the config
            # errors, a missing extra, anything else that stops the middleware's build).
            self.error = exc
            self._error_traceback = exc.__traceback__
            self.settings = _OFF
            self._enabled = False

    def _build(self, app: ASGIApp, backend: Backend | None) -> None:
        settings = self.settings
        self._enabled = settings.enabled
        self._routes = RouteTags(
            settings.route_priorities, make_tag(settings.default_priority), app
        )
        self._route_cache = self._routes.by_method
        # Observers that count a failing resolver (`ThrottleMetrics`) say so by a method.
        listeners = [
            hook
            for observer in self._observers
            if callable(hook := getattr(observer, "tenant_resolver_failed", None))
        ]
        self._tenants = Tenants(settings.tenant_header, settings.tenant_resolver, listeners)
        self._resolver = settings.tenant_resolver
        self._tenant_header = self._tenants.header
        #: The request headers `__call__` reads: the tenant's and the body's.
        self._watched_headers = _BODY_HEADERS | {self._tenant_header}
        # RequestIds' call, inlined per request: its prefix and counter.
        ids = RequestIds()
        self._id_prefix, self._id_counter = ids.prefix, ids.counter
        self._background: set[asyncio.Task[Any]] = set()
        # Slow clients (guarantee 15): bodies are read ahead, except in dry run (which
        # must delay nothing) or when the operator turned it off (a buffer of 0).
        self._read_ahead = settings.body_buffer_bytes > 0 and not settings.dry_run
        self._body_limit = settings.body_buffer_bytes
        #: Request body bytes buffered by this middleware (its process), bounded in total.
        self.body_buffers = BodyBuffers(settings.body_buffer_total_bytes)
        self._backend = backend
        if settings.enabled and backend is None:
            self._backend = make_backend(settings)
        # The backend's fast path (`FastPathBackend.fast_path`: the in-memory one's, the
        # Redis one's with a lease of rate tokens or kept slots), bound by the first
        # request (in the event loop the backend runs on); `_admit_at_once` None: not
        # bound (yet), or the backend offers none.
        self._fast_pending = callable(getattr(self._backend, "fast_path", None))
        self._clock: Callable[[], float] = time.monotonic
        #: Read with ``next()``: a builtin call 3.11 specializes, where calling the
        #: counter's ``__next__`` method-wrapper is a generic call.
        self._lease_keys: Iterator[int] = itertools.count(1)
        self._admit_at_once: AdmitAtOnce | None = None
        #: The backend once `_admit_at_once` is bound, if a request it admits at once
        #: may need no more than the app run (no observers to tell, no cancel on
        #: disconnect); whether it learns its limit (samples to take) is read per
        #: request: a live change may switch it.
        self._lean_backend: Backend | None = None
        self._release_at_once: Callable[[LeaseKey], bool] = NOT_AT_ONCE
        self._decide_rest: Callable[[Request], BackendOutcome | None] | None = None
        #: `acquire` for a request `_admit_at_once` declined (`FastPath.acquire_rest`).
        self._acquire_rest: Callable[[Request], Awaitable[BackendOutcome]] | None = None
        # A lease goes back by the key it was taken with: a number only on a backend's
        # fast path (its own numbers), so a backend without one only sees id strings.
        self._release = cast(
            "Callable[[LeaseKey], None]",
            _never_held if self._backend is None else self._backend.release,
        )
        #: The `ThrottleDecision` of a request admitted at once, by tenant, with the
        #: route tag it is for: one immutable tuple shared by such requests (making a
        #: NamedTuple costs more than the rest of the fast path's bookkeeping).
        self._admitted: dict[str, tuple[RouteTag, ThrottleDecision]] = {}

    @property
    def backend(self) -> Backend | None:
        return self._backend

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything but a throttled HTTP request: lifespan, websockets, disabled."""
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif self.error is not None:
            await self._refuse(scope, send)
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        """Requests reaching a middleware that could not start (the server runs with
        ``--lifespan off``, so start-up could not fail): 503, never a 500."""
        if not self._error_logged:
            self._error_logged = True
            logger.error("throttle_mw could not start, answering 503: %s", self.start_error)
        if scope["type"] == "http":
            await send_rejection(send, _UNCONFIGURED, Limits())
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011})

    @property
    def start_error(self) -> str | None:
        """Why the middleware cannot run, as the failed start-up reports it."""
        error = self.error
        if error is None:
            return None
        if isinstance(error, ConfigError | RuntimeError):
            return str(error)  # written for the operator: names the variable or the fix
        return f"throttle_mw could not start: {type(error).__name__}: {error}"

    # --- lifespan -------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.error is not None:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": self.start_error})
            return
        if not self.settings.enabled or self._backend is None:
            await self.app(scope, receive, send)
            return

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                self.begin_drain()
            return message

        async def send_wrapper(message: Message) -> None:
            # The app's own start-up may fail after the backend started (its tasks, a
            # Redis process registration, the signal handlers): stop it then too.
            if message["type"] in _LIFESPAN_ENDS:
                await self.shutdown()
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)

    async def startup(self) -> None:
        """Start the backend and watch for the server's shutdown signal.

        A middleware that could not be built (a bad setting, a missing extra) raises
        why (`error`: a `ConfigError` for a bad setting) every time it is called.
        """
        if self.error is not None:
            raise self.error.with_traceback(self._error_traceback)
        if self._backend is not None:
            await self._backend.start()
            if self.settings.learns_concurrency:
                config = self.settings.limit_config()
                logger.info(
                    "throttle_mw: concurrency limit learned from the app's latency "
                    "(THROTTLE_CONCURRENCY=auto, the default when no budget is set): "
                    "starts at %d, stays between %d and %d (THROTTLE_CONCURRENCY_MIN/_MAX)%s",
                    config.initial,
                    config.minimum,
                    config.maximum,
                    ", one limit for the fleet" if self.settings.redis_url else "",
                )
        if self._undo_signals is None:
            self._undo_signals = on_termination(asyncio.get_running_loop(), self.begin_drain)

    def begin_drain(self) -> None:
        """Turn away queued and new requests with 503; in-flight ones finish."""
        if not self._draining_now:
            logger.info("throttle_mw draining: queued and new requests get 503")
        self._draining_now = True
        self._draining.set()

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._undo_signals is not None:
            self._undo_signals()
            self._undo_signals = None
        if self._backend is not None:
            await self._backend.stop()

    # --- http -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._enabled:
            await self._other(scope, receive, send)
            return
        # The common case, a request the backend's fast path admits at once, is written
        # out here rather than in helper coroutines: it runs for every request, and
        # each coroutine layer, and each local of this frame, costs (see
        # bench/README.md). Everything else goes to `_throttle`.
        # RouteTags.tag_for's cache hit, inlined. Subscripts in a ``try`` (which costs
        # nothing until a key is missing: a route's first request, a scope without a
        # root path), not ``.get`` calls: this runs for every request.
        tag = None
        try:
            if not scope["root_path"]:
                tag = self._route_cache[scope["method"]][scope["path"]]
        except KeyError:
            pass
        if tag is None:
            tag = self._routes.tag_for(scope)
        if tag.exempt:
            await self.app(scope, receive, send)
            return
        # One pass over the headers: the tenant header (Tenants.from_header, inlined) and
        # whether a body is announced: the first Content-Length or Transfer-Encoding
        # decides (HTTP/2 and 3 need neither).
        # Most headers are neither: one set lookup each passes them by.
        watched = self._watched_headers
        found: bytes | None = None
        announced: bool | None = None
        try:
            if self._resolver is None:
                for name, value in scope["headers"]:
                    if name not in watched:
                        continue
                    if name == self._tenant_header:
                        value = value.strip()
                        if found is not None and value != found:
                            raise InvalidTenant(REPEATED)
                        found = value
                    if announced is None and name in _BODY_HEADERS:
                        announced = name != b"content-length" or value.strip() != b"0"
                if not found:
                    # client_address's cache hit, inlined (subscripts, as above: a host
                    # misses the cache once; a client of None, e.g. on a Unix socket,
                    # is cached as None).
                    try:
                        client = scope["client"]
                        tenant = _ADDRESSES[client[0] if client else None]
                    except KeyError:
                        tenant = client_address(scope)
                else:
                    try:  # header_tenant's cache hit, inlined (a subscript, as above)
                        tenant = _NAMED[found]
                    except KeyError:
                        tenant = header_tenant(found)
            else:
                tenant = await self._tenants.resolve(scope)
                for name, value in scope["headers"]:
                    if name in _BODY_HEADERS:
                        announced = name != b"content-length" or value.strip() != b"0"
                        break
        except InvalidTenant as exc:
            await send_bad_request(send, exc.detail)
            return
        read_ahead = self._read_ahead and (
            announced if announced is not None else scope["http_version"] not in _HTTP1
        )
        # The backend's fast path (the in-memory scheduler's own test, called with no
        # backend frame in between; the Redis backend's lease of rate tokens or kept
        # slots): no `Request` made and a number for its id: the id string is made
        # only if it is declined.
        admit = self._admit_at_once
        if admit is None and self._fast_pending:
            admit = self._bind_fast_path()
        if admit is None or read_ahead or self._draining_now or tag.sheddable:
            await self._throttle(scope, receive, send, tag, tenant, read_ahead, 0, None)
            return
        lease_key: int = next(self._lease_keys)
        # The clock, a bound method kept as an attribute, is read into a local, then
        # called: ``self._clock()`` would be a generic method lookup (3.11 specializes
        # that only for methods of the class).
        clock = self._clock
        held = admit(clock(), lease_key, tenant, tag.cost)
        lean = self._lean_backend
        if held is None or lean is None or lean.learning:
            await self._throttle(scope, receive, send, tag, tenant, False, lease_key, held)
            return
        # Admitted at once (holding a lease if `held`, by `lease_key`), nothing to
        # observe or learn: run the app.
        # Subscripts, not ``.get`` calls, as above: servers give a scope its state
        # (uvicorn does), and a tenant misses the cache once.
        try:
            state = scope["state"]
        except KeyError:
            state = scope["state"] = {}
        try:
            cached = self._admitted[tenant]
        except KeyError:
            state["throttle"] = self._decided(tenant, tag)
        else:
            state["throttle"] = cached[1] if cached[0] is tag else self._decided(tenant, tag)
        # `_throttle`'s send wrapper without a learned limit's bookkeeping, for a
        # request decided at once: one module function, bound per request to its state
        # (`_AtOnce`), not a closure made per request (a function object, its defaults
        # and its cells; and the app's call site, given a new function each time, never
        # specializes its call).
        at_once: _AtOnce = [send, lease_key, held, None, self._release_at_once, self._release, self]
        app = self.app
        try:
            await app(scope, receive, _bind(_send_at_once, at_once))
        finally:
            if at_once[2]:  # still held: the app raised, or sent no last body chunk
                at_once[2] = False
                hold = at_once[3]
                if hold is None or not hold.released:
                    self._release(lease_key)

    def _decided(self, tenant: str, tag: RouteTag) -> ThrottleDecision:
        """The `ThrottleDecision` shared by the requests of `tenant` and `tag` admitted at
        once (`_admitted`), made on the first one."""
        decision = _new_tuple(
            ThrottleDecision, (tenant, tag.priority, 0.0, False, "admitted", tag.cost, None)
        )
        if len(self._admitted) >= _DECISION_CACHE_SIZE:
            self._admitted.clear()
        self._admitted[tenant] = (tag, decision)
        return decision

    async def _throttle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        tag: RouteTag,
        tenant: str,
        read_ahead: bool,
        lease_key: LeaseKey,
        held_at_once: bool | None,
    ) -> None:
        """Every throttled request but a fast path's admission at once with nothing to
        observe or learn: a body read ahead, a full decision (queueing, rejection,
        degradation, dry run), observers, a learned limit's samples.

        `held_at_once` is None unless the fast path admitted the request (observers
        or a learned limit brought it here); then it says whether that admission
        holds a lease, by `lease_key`. Else `lease_key` is 0, or the fast path's key
        if it declined the request (then `FastPath.acquire_rest` follows, not
        ``acquire``).
        """
        backend = self._backend
        assert backend is not None
        decided: Outcome = "admitted"
        reason: str | None = None
        body: RequestBody | None = None
        # Queued for the limit before its admission (a learned limit's `Sample.waited`).
        queued = False
        if held_at_once is not None:
            held = held_at_once
            degraded = unthrottled = False
            # Decided at once, in this process: microseconds, reported as 0.0 ms.
            waited_s = 0.0
            timing = _NO_WAIT
            cached = self._admitted.get(tenant)
            if cached is not None and cached[0] is tag:
                decision = cached[1]
            else:
                decision = self._decided(tenant, tag)
        else:
            declined = lease_key != 0  # (tried by the fast path, which declined it)
            lease_key = request_id = self._id_prefix + str(next(self._id_counter))
            # tuple.__new__ skips the NamedTuple's Python-level __new__.
            request = _new_tuple(
                Request,
                (request_id, tenant, tag.priority, tag.cost, tag.sheddable, tag.degradable),
            )
            outcome: Admitted | Waiting | Reject | None
            started = 0.0
            if self._draining_now:
                outcome = _SHUTTING_DOWN
            else:
                if read_ahead:
                    body = await self._read_body(scope, request, receive, send)
                    if body is None:
                        return  # a 408 was sent, or the client went away
                    receive = body.receive
                if self._admit_at_once is not None and not read_ahead:
                    assert self._decide_rest is not None
                    # The fast path declined it just now (or it is sheddable).
                    outcome = self._decide_rest(request)
                else:
                    outcome = backend.decide_now(request)
                if outcome is None:
                    started = time.perf_counter()
                    try:
                        if declined:
                            assert self._acquire_rest is not None
                            outcome = await self._acquire_rest(request)
                        else:
                            outcome = await backend.acquire(request)
                    except BaseException:
                        # Cancelled (an outer timeout, a server's forced exit): the
                        # body's bytes go back to the process's total.
                        if body is not None:
                            body.close()
                        raise
            # A NamedTuple's fields by index: its attribute access is a generic lookup in 3.11.
            if type(outcome) is Admitted and not outcome[_DEGRADED] and not outcome[_UNTHROTTLED]:
                held = outcome[_LEASE]
                degraded = unthrottled = False
                if started:
                    waited_s = time.perf_counter() - started
                    timing = (_SERVER_TIMING, b"throttle;dur=%.1f" % (waited_s * 1000.0))
                else:
                    waited_s = 0.0
                    timing = _NO_WAIT
            else:
                started = started or time.perf_counter()
                # (Queued for rate tokens, a tenant's cap or the requests ahead while
                # the limit had room: not waited for the limit.)
                queued = type(outcome) is Waiting and outcome.limited
                settled = await self._settle(scope, request, outcome, receive, send, started, body)
                if settled is None:
                    return  # rejected (the response is sent) or the client went away
                outcome, decided, reason, body = settled
                queued = queued and decided == "admitted"
                if body is not None:
                    receive = body.receive
                waited_s = time.perf_counter() - started
                _, _, degraded, held, unthrottled = outcome
                value = b"throttle;dur=%.1f" % (waited_s * 1000.0) if waited_s else _NO_WAIT[1]
                if decided != "admitted":
                    desc = decided if reason is None else f"{decided}:{reason}"
                    value += b';desc="%s"' % desc.encode("ascii")
                timing = (_SERVER_TIMING, value)
            decision = _new_tuple(
                ThrottleDecision,
                (tenant, tag.priority, waited_s, degraded, decided, tag.cost, reason),
            )
        if self._observers and decided != "would_reject":
            kind: EventKind = "degraded" if degraded else "admitted"
            self._emit(
                ThrottleEvent(
                    kind,
                    tenant,
                    tag.priority,
                    waited_s,
                    dry_run=self.settings.dry_run,
                    unthrottled=unthrottled,
                )
            )
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["throttle"] = decision
        # Made when the app first waits on its client (streaming, or a body beyond the
        # buffer): from then on that waiting counts against THROTTLE_CLIENT_HOLD.
        hold: ClientHold | None = None
        if body is not None and held and body.partial:
            hold = body.hold = self._hold(lease_key)
        # A learned limit needs each request's service time and whether it failed.
        # Whether it failed and when it ended, set by send_wrapper: a list, not two
        # closure cells that every request would make.
        ending: list[Any] | None = None
        admitted = 0.0
        running = 0
        flight: InFlight | None = None
        if backend.learning:
            ending = [False, 0.0]
            flight = backend.flight
            admitted = time.perf_counter()
            running = flight.admit(admitted)

        # A plain function returning the server's own awaitable: no extra coroutine
        # per message. The lease goes back as the last body chunk is handed to the
        # server, so it is returned even if sending fails (the client went away).
        # What it only reads comes in as defaults: plain locals, not cells.
        def send_wrapper(
            message: Message,
            send: Send = send,
            timing: tuple[bytes, bytes] = timing,
            ending: list[Any] | None = ending,
            lease_key: LeaseKey = lease_key,
            release_at_once: Callable[[LeaseKey], bool] = self._release_at_once,
            release: Callable[[LeaseKey], None] = self._release,
            middleware: ThrottleMiddleware = self,
        ) -> Awaitable[None]:
            nonlocal held, hold
            kind = message["type"]
            if kind == "http.response.start":
                if ending is not None and message["status"] >= 500:
                    ending[0] = True
                # A new dict and list: the app may send the same message (and its
                # header list) again, and must not see our header in it. (A copy and a
                # store: cheaper than ``{**message, "headers": ...}``.)
                message = message.copy() if type(message) is dict else dict(message)
                message["headers"] = [*message.get("headers", ()), timing]
            elif kind == "http.response.body":
                if not message.get("more_body", False):
                    if ending is not None:
                        ending[1] = time.perf_counter()
                    if held:
                        held = False
                        if (hold is None or not hold.released) and not release_at_once(lease_key):
                            release(lease_key)
                elif held:
                    # More to come: a slow reader's back-pressure may hold this send up.
                    if hold is None:
                        hold = middleware._hold(lease_key)
                    return hold.send(send, message)
            return send(message)

        cancelled = False
        try:
            if self.settings.cancel_on_disconnect and self._cancels():
                cancelled = await self._run_cancellable(
                    scope, receive, send_wrapper, body, decision
                )
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            if held:
                held = False
                if hold is None or not hold.released:
                    self._release(lease_key)
            if body is not None:
                body.close()
            if ending is not None:
                failed, ended = ending
                if not ended:  # the app raised, or the client left before the end
                    failed, ended = True, time.perf_counter()
                assert flight is not None
                flight.finish(ended)  # out of the app's in flight with its last chunk
                # A slot given back for a client that held it too long, or for work
                # cancelled when its client left, says nothing about the app's
                # capacity: no sample.
                if (hold is None or not hold.released) and not cancelled:
                    client_s = 0.0 if hold is None else hold.waited_s
                    sample = Sample(ended - admitted - client_s, failed, running, queued)
                    backend.observe(sample)

    def _cancels(self) -> bool:
        """Whether the app's work is cancelled when its client leaves (not in dry run,
        which enforces nothing)."""
        settings = self.settings
        return settings.cancel_on_disconnect and not settings.dry_run

    async def _run_cancellable(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: RequestBody | None,
        decision: ThrottleDecision,
    ) -> bool:
        """Run the app in a task cancelled when its client leaves before the response is
        complete (THROTTLE_CANCEL_ON_DISCONNECT); True if that ended it.

        A cancellation for the client ends here: the request ends as one whose client
        went away (no 500, nothing raised to the server). One of the server's own (its
        shutdown) goes on to the server.
        """
        # (No body of its own only if none was read ahead: a body read ahead is `body`.)
        own = body is None
        if body is None:
            body = RequestBody(receive, self.body_buffers, self._body_limit)
        cancel = Cancel(send)
        cancelled = False  # the cancellation, not the app, ended the task
        started = time.perf_counter()
        # (A task: the app's call is a coroutine; ensure_future only because its type says
        # awaitable.)
        task = asyncio.ensure_future(self.app(scope, body.receive, cancel.send))
        cancel.task = task
        try:
            # Only a body known complete (read ahead, or none announced) is watched at once.
            body.follow(cancel, bodyless=own and _bodyless(scope))
            try:
                # Cancelling this task (the server's shutdown) cancels the app's too.
                await task
                cancelled = cancel.cancelled  # (the app caught it and returned)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not cancel.cancelled or (current is not None and current.cancelling()):
                    raise
                cancelled = True
            # Anything else the app raises goes on as without the option (say, Starlette's
            # ClientDisconnect when the app's own read met the disconnect first).
        finally:
            if own:
                body.close()
        if cancelled:
            ran_s = time.perf_counter() - started
            self._log_cancelled(scope, decision, ran_s)
            if self._observers:
                self._emit(ThrottleEvent("cancelled", decision.tenant, decision.priority, ran_s))
        return cancelled

    def _bind_fast_path(self) -> AdmitAtOnce | None:
        self._fast_pending = False
        backend = cast("FastPathBackend", self._backend)
        path = backend.fast_path()
        if path is None:
            return None
        (
            self._clock,
            self._lease_keys,
            admit,
            self._release_at_once,
            self._decide_rest,
            self._acquire_rest,
        ) = path
        self._admit_at_once = admit
        # A request whose app may be cancelled goes to `_throttle`: the fast path pays nothing
        # (nor does the middleware get an attribute more: `_cancels`).
        lean = not self._observers and not self._cancels()
        self._lean_backend = backend if lean else None
        return admit

    def _hold(self, lease_key: LeaseKey) -> ClientHold:
        release = functools.partial(self._release, lease_key)
        return ClientHold(self.settings.client_hold_s, release)

    async def _read_body(
        self, scope: Scope, request: Request, receive: Receive, send: Send
    ) -> RequestBody | None:
        """Read a request's body ahead, before it asks for budget (guarantee 15).

        None if the request is finished here: the client went away, or the body
        did not arrive within THROTTLE_RECEIVE_TIMEOUT (answered with 408).
        """
        body = RequestBody(receive, self.body_buffers, self._body_limit)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.receive_timeout_s):
                await body.read_ahead()
        except TimeoutError:
            body.close()
            waited = time.perf_counter() - started
            self._log_body_timeout(scope, request, waited)
            self._emit(
                ThrottleEvent(
                    "rejected", request.tenant, request.priority, waited, 408, "body_timeout"
                )
            )
            await send_request_timeout(send)
            return None
        except BaseException:
            body.close()
            raise
        if body.disconnected.is_set():
            body.close()
            return None
        return body

    async def _settle(
        self,
        scope: Scope,
        request: Request,
        outcome: Admitted | Waiting | Reject,
        receive: Receive,
        send: Send,
        started: float,
        body: RequestBody | None,
    ) -> tuple[Admitted, Outcome, str | None, RequestBody | None] | None:
        """Everything but a plain admission: queueing, rejection, degradation, dry run.

        Returns what to run the app with, or None when the request is finished
        here (a rejection was sent, or the client left while queued). `body` is
        the body read ahead, if any; queueing watches it (or a new one) for a
        disconnect.
        """
        backend = self._backend
        assert backend is not None
        dry_run = self.settings.dry_run
        tenant, priority = request.tenant, request.priority
        decided: Outcome = "admitted"
        if isinstance(outcome, Waiting):
            self._emit(ThrottleEvent("queued", tenant, priority, dry_run=dry_run))
            if dry_run:
                outcome = await backend.cancel(outcome)
                if isinstance(outcome, Reject):
                    decided, outcome = "would_queue", Admitted(request.id, unthrottled=True)
            else:
                if body is None:
                    body = RequestBody(receive, self.body_buffers, self._body_limit)
                body.watch()
                try:
                    result = await self._wait(backend, outcome, body)
                except BaseException:
                    # Cancelled while queued (`_wait` leaves the queue): stop the
                    # watcher and give its bytes back, or they count against
                    # THROTTLE_BODY_BUFFER_TOTAL for good.
                    body.close()
                    raise
                if result is None:
                    body.close()
                    waited = time.perf_counter() - started
                    self._emit(ThrottleEvent("left", tenant, priority, waited))
                    return None
                outcome = result
                body.admit()
        if isinstance(outcome, Reject):
            waited = time.perf_counter() - started
            self._log_rejection(scope, request, outcome, waited)
            self._emit(
                ThrottleEvent(
                    "rejected", tenant, priority, waited, outcome.status, outcome.reason, dry_run
                )
            )
            if not dry_run:
                if body is not None:
                    body.close()
                await send_rejection(send, outcome, backend.limits)
                return None
            return Admitted(request.id, unthrottled=True), "would_reject", outcome.reason, body
        if outcome.degraded:
            decided = "degraded"
        elif outcome.unthrottled and decided == "admitted":
            decided = "unthrottled"
        return outcome, decided, None, body

    def _emit(self, event: ThrottleEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not fail the request
                logger.exception("throttle_mw observer failed")

    async def _wait(
        self, backend: Backend, waiting: Waiting, queued: RequestBody
    ) -> Admitted | Reject | None:
        """Wait for a grant; None if the client left. Never leaves an entry behind."""
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(queued.disconnected.wait())
        drain = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait(
                (waiting.future, gone, drain),
                timeout=max(0.0, waiting.deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            # Our task is being cancelled (server force-exit): leave the queue anyway.
            self._give_back_later(backend, loop.create_task(backend.cancel(waiting)))
            raise
        finally:
            gone.cancel()
            drain.cancel()
        if waiting.future.done():
            return waiting.future.result()
        leaving = loop.create_task(backend.cancel(waiting))
        try:
            result = await asyncio.shield(leaving)
        except asyncio.CancelledError:
            # Cancelled while leaving (the shield keeps the cancel going): a grant it
            # finds (admitted meanwhile) is given back once it is in.
            self._give_back_later(backend, leaving)
            raise
        if queued.disconnected.is_set():
            if isinstance(result, Admitted) and result.lease:
                backend.release(result.request_id)
            return None
        if self._draining.is_set() and isinstance(result, Reject):
            return Reject("shutting_down", 1.0)
        return result

    def _give_back_later(self, backend: Backend, leaving: asyncio.Task[Admitted | Reject]) -> None:
        """The cancel of a request whose task is being cancelled (nobody awaits it): kept
        running, and a grant it finds (admitted meanwhile) goes back once it is in."""
        self._background.add(leaving)
        leaving.add_done_callback(functools.partial(self._given_back, backend))

    def _given_back(self, backend: Backend, leaving: asyncio.Task[Admitted | Reject]) -> None:
        self._background.discard(leaving)
        if leaving.cancelled() or leaving.exception() is not None:
            return
        result = leaving.result()
        if isinstance(result, Admitted) and result.lease:
            backend.release(result.request_id)

    def _log_rejection(
        self, scope: Scope, request: Request, reject: Reject, waited_s: float
    ) -> None:
        """One structured line per rejection (raise the ``throttle_mw`` logger's level to
        silence them); the path is cut short and tenant ids are already validated."""
        if not logger.isEnabledFor(logging.INFO):
            return
        path = scope.get("path", "")[:200]
        fields = {
            "request_id": request.id,
            "tenant": request.tenant,
            "priority": request.priority,
            "method": scope.get("method", ""),
            "path": path,
            "cost": request.cost,
            "status": reject.status,
            "reason": reject.reason,
            "retry_after": reject.retry_after_header,
            "waited_ms": round(waited_s * 1000.0, 1),
            "dry_run": self.settings.dry_run,
        }
        logger.info(
            "throttle rejected %s %s tenant=%s priority=%s status=%d reason=%s "
            "retry_after=%d waited_ms=%.1f request_id=%s%s",
            fields["method"],
            quote(path),  # the client's: a decoded %0A must not start a line (as uvicorn's)
            request.tenant,
            request.priority,
            reject.status,
            reject.reason,
            reject.retry_after_header,
            fields["waited_ms"],
            request.id,
            " (dry run: not enforced)" if self.settings.dry_run else "",
            extra={"throttle": fields},
        )

    def _log_cancelled(self, scope: Scope, decision: ThrottleDecision, ran_s: float) -> None:
        """One structured line per app cancelled because its client left."""
        if not logger.isEnabledFor(logging.INFO):
            return
        path = scope.get("path", "")[:200]
        fields = {
            "tenant": decision.tenant,
            "priority": decision.priority,
            "method": scope.get("method", ""),
            "path": path,
            "outcome": "cancelled",
            "ran_ms": round(ran_s * 1000.0, 1),
        }
        logger.info(
            "throttle cancelled %s %s tenant=%s priority=%s ran_ms=%.1f: the client left "
            "(THROTTLE_CANCEL_ON_DISCONNECT), its slot is given back",
            fields["method"],
            quote(path),
            decision.tenant,
            decision.priority,
            fields["ran_ms"],
            extra={"throttle": fields},
        )

    def _log_body_timeout(self, scope: Scope, request: Request, waited_s: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        path = scope.get("path", "")[:200]
        fields = {
            "request_id": request.id,
            "tenant": request.tenant,
            "priority": request.priority,
            "method": scope.get("method", ""),
            "path": path,
            "status": 408,
            "reason": "body_timeout",
            "waited_ms": round(waited_s * 1000.0, 1),
        }
        logger.info(
            "throttle answered 408 %s %s tenant=%s: body not received within %.3g s "
            "(THROTTLE_RECEIVE_TIMEOUT) request_id=%s",
            fields["method"],
            quote(path),
            request.tenant,
            self.settings.receive_timeout_s,
            request.id,
            extra={"throttle": fields},
        )
