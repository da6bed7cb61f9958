"""The learned limit wired in: samples from the middleware, the in-memory backend, the
fleet's one step per window through a real Redis, the scripts reading one number, the
live switch, the status tool and the gauge.

The estimator's own rules are tested on a fake clock in test_limit_estimator.py; here
the parts around it, fast, with real Redis servers where Redis is involved.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.redis_server import RedisServer
from throttle_mw import ThrottleMiddleware, cli
from throttle_mw.backends import MemoryBackend
from throttle_mw.backends.redis import RedisBackend, protocol
from throttle_mw.backends.redis.fallback import share
from throttle_mw.backends.redis.keys import Keys
from throttle_mw.backends.redis.learner import (
    SHARE_FIELD,
    STATE_FIELD,
    FleetLearner,
    fleet_step,
    fleet_window,
)
from throttle_mw.scheduler import Limits, Policy
from throttle_mw.scheduler import Request as ThrottleRequest
from throttle_mw.scheduler.limit import (
    InFlight,
    LimitConfig,
    LimitState,
    Sample,
    WindowSummary,
    step,
)
from throttle_mw.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")


class Recording(MemoryBackend):
    """The in-memory backend, keeping every sample the middleware reports."""

    def __init__(self, **settings: Any) -> None:
        s = Settings.from_env({}, **settings)
        super().__init__(s.limits(), s.policy(), s.limit_config())
        self.samples: list[Sample] = []

    def observe(self, sample: Sample) -> None:
        self.samples.append(sample)
        super().observe(sample)


def _app(backend: Recording) -> Starlette:
    async def ok(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("s", "0")))
        return PlainTextResponse("ok")

    async def error(request: Request) -> Response:
        return PlainTextResponse("no", status_code=503)

    async def boom(request: Request) -> Response:
        raise RuntimeError("the app failed")

    async def stream(request: Request) -> Response:
        async def body() -> Any:
            yield b"a"
            await asyncio.sleep(0.05)
            yield b"b"

        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/ok", ok), Route("/error", error), Route("/boom", boom),
                Route("/stream", stream)]
    )  # fmt: skip
    app.add_middleware(ThrottleMiddleware, backend=backend)
    return app


@pytest.mark.anyio
async def test_each_admitted_request_gives_one_sample_with_its_outcome() -> None:
    backend = Recording()
    app = _app(backend)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/ok", params={"s": "0.05"})).status_code == 200
        assert (await client.get("/error")).status_code == 503
        assert (await client.get("/boom")).status_code == 500
        assert (await client.get("/stream")).text == "ab"
    ok, error, boom, stream = backend.samples
    assert 0.04 <= ok.service_s < 1.0
    assert not ok.failed
    assert ok.in_flight == 1
    assert error.failed  # the app answered 5xx: an overload signal
    assert boom.failed  # the app raised
    assert not stream.failed
    assert stream.service_s >= 0.04  # to the last body chunk, not to the first


@pytest.mark.anyio
async def test_a_request_queued_for_the_limit_says_it_waited() -> None:
    """`Sample.waited`: queued for the limit, then admitted; not a request admitted at
    once."""
    backend = Recording(concurrency="auto", concurrency_min=2, concurrency_max=2)
    transport = httpx.ASGITransport(app=_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = await asyncio.gather(*(client.get("/ok", params={"s": "0.1"}) for _ in range(3)))
        assert [a.status_code for a in answers] == [200] * 3
        await client.get("/ok")  # alone: at once
    assert [s.waited for s in backend.samples] == [False, False, True, False]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "pacing",
    [{"rate": 20.0, "burst": 1.0}, {"tenant_rate": 20.0, "tenant_burst": 1.0}],
    ids=["rate", "tenant_rate"],
)
async def test_a_request_queued_for_rate_tokens_or_a_cap_did_not_wait_for_the_limit(
    pacing: dict[str, float],
) -> None:
    """`Sample.waited` is the limit's: requests queued only for THROTTLE_RATE's tokens or
    THROTTLE_TENANT_RATE's cap, the limit (4) never full, did not wait for it (they read
    as waited before branch carry2, and the held-back rule grew a limit the rate held)."""
    backend = Recording(concurrency="auto", concurrency_min=4, concurrency_max=4, **pacing)
    transport = httpx.ASGITransport(app=_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = await asyncio.gather(*(client.get("/ok") for _ in range(3)))
    assert [a.status_code for a in answers] == [200] * 3
    assert len(backend.samples) == 3
    assert max(s.in_flight for s in backend.samples) < 4
    assert [s.waited for s in backend.samples] == [False] * 3


class RecordingRedis(RedisBackend):
    """The Redis backend, keeping every sample the middleware reports."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.samples: list[Sample] = []

    def observe(self, sample: Sample) -> None:
        self.samples.append(sample)
        super().observe(sample)


@pytest.mark.anyio
async def test_with_redis_only_a_request_queued_for_the_limit_waited(
    clean_redis_server: RedisServer,
) -> None:
    """The scripts' queued reply says whether the limit was full for the request
    (`Enqueue.limited`, protocol.REPLY's Q|deadline|wait_s|limited): with Redis too, a
    request queued for rate tokens did not wait for the limit; one queued behind a full
    limit did."""
    settings = _settings(
        clean_redis_server,
        concurrency="auto",
        concurrency_min=2,
        concurrency_max=2,
        rate=10.0,
        burst=1.0,
        rate_lease_s=0,
    )
    backend = RecordingRedis(settings)
    app = Starlette(routes=[Route("/ok", _sleepy)])
    app.add_middleware(ThrottleMiddleware, backend=backend)
    await backend.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            # Paced by the rate (10/s), 10 ms each: the limit of 2 never full.
            answers = await asyncio.gather(*(http.get("/ok") for _ in range(3)))
            assert [a.status_code for a in answers] == [200] * 3
            assert [s.waited for s in backend.samples] == [False] * 3
            # Three of 0.5 s, spaced past the rate: the third finds the limit full.
            backend.samples.clear()
            await asyncio.sleep(0.2)  # (a token back)

            async def spaced(i: int) -> httpx.Response:
                await asyncio.sleep(0.12 * i)
                return await http.get("/ok", params={"s": "0.5"})

            answers = await asyncio.gather(*(spaced(i) for i in range(3)))
            assert [a.status_code for a in answers] == [200] * 3
            assert backend.limits.concurrency == 2
            assert [s.waited for s in backend.samples] == [False, False, True]
    finally:
        await backend.stop()


async def _sleepy(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "0.01")))
    return PlainTextResponse("ok")


@pytest.mark.anyio
async def test_requests_running_together_report_how_many_ran() -> None:
    backend = Recording(concurrency="auto", concurrency_min=8)
    transport = httpx.ASGITransport(app=_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = await asyncio.gather(*(client.get("/ok", params={"s": "0.1"}) for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert max(s.in_flight for s in backend.samples) == 5
    # The meter saw them in and out: five for about 0.1 s, none now.
    assert backend.flight.running == 0
    area, span = backend.flight.take()
    assert 0.4 <= area < 5 * span


@pytest.mark.anyio
async def test_a_static_limit_takes_no_samples() -> None:
    backend = Recording(concurrency=8)
    assert not backend.learning
    transport = httpx.ASGITransport(app=_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/ok")
    assert backend.samples == []


@pytest.mark.anyio
async def test_a_live_switch_to_a_learned_limit_and_back_starts_and_stops_the_samples() -> None:
    """The middleware's fast path is bound by the first request; whether the backend
    learns is still read per request after that (`set_limits` may switch it)."""
    backend = Recording(concurrency=8)
    transport = httpx.ASGITransport(app=_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/ok")
        assert backend.samples == []
        await backend.set_limits(Limits(concurrency=8, learned=True))
        await client.get("/ok")
        assert len(backend.samples) == 1
        await backend.set_limits(Limits(concurrency=8))
        await client.get("/ok")
        assert len(backend.samples) == 1


async def feed_until_steps(backend: MemoryBackend, sample: Sample, steps: int) -> None:
    """Ten `sample`s every 10 ms until the estimator has taken `steps` more steps (windows
    with enough samples to judge), 20 s at most."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    learned = backend.learned
    assert learned is not None
    until = learned.steps + steps
    while learned.steps < until:
        assert loop.time() < deadline, f"{learned.steps} steps, not {until}"
        for _ in range(10):
            backend.observe(sample)
        await asyncio.sleep(0.01)
        learned = backend.learned
        assert learned is not None


@pytest.mark.anyio
async def test_the_memory_backend_steps_the_limit_and_reports_it() -> None:
    """Samples that grow with the load (an app queueing) bring the limit down; the
    scheduler, the responses' limits and the snapshot all take the new number."""
    config = LimitConfig(minimum=2, maximum=100, initial=40, window_s=0.05, min_samples=5)
    backend = MemoryBackend(Limits(concurrency=40, learned=True), Policy({}), config)
    await backend.start()
    assert backend.learning
    first = backend.limits.concurrency
    assert first == 40
    # Fast requests first (the baseline), then the same requests ten times slower at the
    # limit: the latency of a queue inside the app. Each phase lasts a number of the
    # estimator's steps (6, then 20: 0.3 s and 1 s on a quiet machine), not a time: a
    # stall of the loop as long as a phase (a loaded machine) would leave it fewer
    # windows, or none of its own.
    await feed_until_steps(backend, Sample(0.01, False, 2), 6)
    await feed_until_steps(backend, Sample(0.1, False, 40), 20)
    snapshot = await backend.snapshot()
    assert snapshot.limits is not None
    assert snapshot.limits.learned
    assert snapshot.limits.concurrency is not None
    assert snapshot.limits.concurrency < first
    assert backend.limits.concurrency == snapshot.limits.concurrency
    assert snapshot.learned is not None
    assert 0.005 <= snapshot.learned.baseline_s <= 0.02
    # A number set live switches learning off; auto switches it back on.
    await backend.set_limits(Limits(concurrency=7))
    assert not backend.learning
    assert backend.limits.concurrency == 7
    await backend.set_limits(Limits(concurrency=7, learned=True))
    assert backend.learning
    await backend.stop()


# --- the fleet, through a real Redis ----------------------------------------------------------


def _learner(process: str, clock: list[float], config: LimitConfig) -> FleetLearner:
    return FleetLearner(
        Keys("fleet"), config, process=process, live_ttl_s=3600.0, clock=lambda: clock[0]
    )


@pytest.mark.anyio
async def test_one_step_per_window_for_the_whole_fleet(clean_redis_server: RedisServer) -> None:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(clean_redis_server.url, decode_responses=True)
    # A window of a minute: the claim of a window (its TTL the window's, by Redis's clock)
    # must outlast the four flushes of a window here, a few round trips, however slow the
    # machine (with a window of 0.2 s, a stall of 0.2 s let a second learner claim); its
    # end is then made at once, below, not waited for.
    config = LimitConfig(minimum=2, maximum=100, initial=10, window_s=60.0, min_samples=5)
    clock = [1000.0]
    learners = [_learner(f"p{i}", clock, config) for i in range(4)]
    try:
        # Four windows; the first claimant sees only its own 30 samples, too few for a
        # first baseline (100): it keeps them for the next step, so three steps are taken.
        for _ in range(4):
            for learner in learners:
                for _ in range(30):  # the fleet's window: enough for a first baseline
                    learner.observe(Sample(0.01, False, 3))
            took = [await learner.flush(client) for learner in learners]
            assert sum(took) == 1, took  # one claimant per window, whoever comes first
            # The claim expires with the window (its TTL the window's, not extended by
            # the others' flushes); then the window ends: the claim goes, as its expiry
            # would take it.
            ttl_ms = await client.pttl(Keys("fleet").learn_step)
            assert config.window_s * 1000 - 10_000 < ttl_ms <= config.window_s * 1000
            await client.delete(Keys("fleet").learn_step)
            clock[0] += config.window_s
        assert sum(learner.steps_taken for learner in learners) == 3
        cfg = await client.hgetall(Keys("fleet").cfg)
        stored = LimitState.decode(str(cfg[STATE_FIELD]))
        assert int(cfg[protocol.LEARNED]) == stored.in_force
        assert stored.steps == 3
        # The claimant pushed first, then stepped; the other three pushed after the step:
        # their summaries wait for the next one.
        assert await client.llen(Keys("fleet").learn_windows) == 3
        # Every key the learner writes expires.
        for key in (Keys("fleet").cfg, Keys("fleet").learn_step):
            assert await client.pttl(key) != -1
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_every_process_pushes_its_in_flight_over_time(
    clean_redis_server: RedisServer,
) -> None:
    """Each flush pushes the process's mean in flight since its last one, measured by
    its meter, a quiet process's (none in flight, no request finished) too: the step
    adds up 3 + 0, and pools the quiet process's parts as quiet time."""
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(clean_redis_server.url, decode_responses=True)
    config = LimitConfig(window_s=0.2)
    now = [100.0]
    flights = [InFlight(lambda: now[0]) for _ in range(2)]
    learners = [
        FleetLearner(Keys("pushes"), config, process=f"p{i}", live_ttl_s=60.0, flight=flights[i])
        for i in range(2)
    ]
    try:
        for learner in learners:
            learner.flight.take()  # the window starts now
        for _ in range(3):
            flights[0].admit(now[0])  # three requests, all through the window
        now[0] += 0.1
        flights[0].finish(now[0])
        learners[0].observe(Sample(0.1, False, 3))
        flights[0].admit(now[0])  # ... and its next at once: still three
        now[0] += 0.1
        # No claim is taken (a claim from another fleet's step is in place).
        await client.set(Keys("pushes").learn_step, "other", px=60_000)
        assert [await learner.flush(client) for learner in learners] == [False, False]
        entries = [str(e) for e in await client.lrange(Keys("pushes").learn_windows, 0, -1)]
        assert sorted(e.partition("|")[0] for e in entries) == ["p0", "p1"]
        merged, parts = fleet_window(entries)
        assert parts["p0"].mean_in_flight == pytest.approx(3.0)
        assert parts["p1"].mean_in_flight == 0.0
        assert parts["p1"].empty
        assert merged.mean_in_flight == pytest.approx(3.0)
    finally:
        await client.aclose()


def test_the_fleet_window_pools_a_process_parts_and_adds_the_processes() -> None:
    """A process pushes twice a window or more (and a kept window carries its parts
    over): its parts are the same requests in flight, so they must not add up. Adding
    them up once doubled the fleet's in flight and fooled the shift test into
    re-measuring a queued latency as the baseline: the limit climbed to 49 for 4 slots."""
    p1a = WindowSummary()
    p1b = WindowSummary()
    p2 = WindowSummary()
    for _ in range(20):
        p1a.add(Sample(0.1, False, 2))
        p1b.add(Sample(0.1, False, 4))
        p2.add(Sample(0.1, False, 3))
    entries = [f"p1|{p1a.encode()}", f"p2|{p2.encode()}", f"p1|{p1b.encode()}", "p3|bad"]
    merged, parts = fleet_window(entries)
    assert set(parts) == {"p1", "p2"}
    assert merged.count == 60
    assert merged.mean_in_flight == pytest.approx(3.0 + 3.0)  # p1's mean 3, p2's 3
    assert merged.max_in_flight == 4 + 3
    # A kept window's parts go back per process and pool again with the next ones.
    again, _ = fleet_window([f"{p}|{s.encode()}" for p, s in parts.items()])
    assert again.mean_in_flight == pytest.approx(merged.mean_in_flight)


def test_the_fleet_window_adds_the_waited_counts_pushed_beside_the_summaries() -> None:
    """P:lq's ``token|n`` entries add to their processes' parts (pooled across pushes),
    at most each part's count; a count without its summary, or malformed, says
    nothing. A process of an older build pushes none: its requests read as not
    waited. A thin window keeps the counts with its summaries, per process."""
    new, old = WindowSummary(), WindowSummary()
    for i in range(20):
        new.add(Sample(0.1, False, 2, i < 15))
        old.add(Sample(0.1, False, 2))
    entries = [f"new|{new.encode()}", f"old|{old.encode()}", f"new|{new.encode()}"]
    waits = [f"new|{new.waited}", f"new|{new.waited}", "gone|7", "new|x", "old|99"]
    merged, parts = fleet_window(entries, waits)
    assert (parts["new"].waited, parts["old"].waited) == (30, 20)  # "old|99": at most 20
    assert merged.waited == 50
    assert fleet_window(entries)[0].waited == 0
    config = LimitConfig(min_samples=100)
    held = LimitState(4.0, 0.1, "hold", 3)
    state, kept, kept_waits = fleet_step(config, held, entries, 0.5, waits)
    assert state.steps == 3  # too few to judge: kept
    assert sorted(kept_waits) == ["new|30", "old|20"]
    again, _ = fleet_window(kept, kept_waits)
    assert again.waited == merged.waited


@pytest.mark.anyio
async def test_the_waited_counts_go_beside_the_summaries_and_the_step_takes_them(
    clean_redis_server: RedisServer,
) -> None:
    """A flush pushes its summary's waited count onto P:lq (only when some waited), in
    the same transaction; the step reads and clears P:lw and P:lq together, and a
    fleet whose requests mostly waited at a low in flight grows."""
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(clean_redis_server.url, decode_responses=True)
    keys = Keys("waits")
    config = LimitConfig(window_s=0.2, min_samples=5)
    clock = [1000.0]
    learners = [
        FleetLearner(keys, config, process=f"p{i}", live_ttl_s=60.0, clock=lambda: clock[0])
        for i in range(2)
    ]
    learners[0].state = LimitState(4.0, 0.01, "hold", 10)
    await client.hset(keys.cfg, STATE_FIELD, learners[0].state.encode())
    try:
        await client.set(keys.learn_step, "other", px=60_000)  # no step yet
        for i, learner in enumerate(learners):
            for j in range(30):
                learner.observe(Sample(0.01, False, 2 + i if j == 0 else 1, i == 0 or j < 20))
            assert await learner.flush(client) is False
        assert sorted(await client.lrange(keys.learn_waited, 0, -1)) == ["p0|30", "p1|20"]
        assert await client.pttl(keys.learn_waited) > 0
        assert await learners[1].flush(client) is False  # nothing waited: no entry
        assert await client.llen(keys.learn_waited) == 2
        await client.delete(keys.learn_step)
        assert await learners[0].flush(client) is True
        assert await client.exists(keys.learn_windows, keys.learn_waited) == 0
        assert learners[0].state.reason == "grow"
        assert learners[0].state.in_force == 5
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_budget_that_lost_its_keys_gets_the_last_limit_back(
    clean_redis_server: RedisServer,
) -> None:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(clean_redis_server.url, decode_responses=True)
    config = LimitConfig(minimum=2, maximum=100, initial=10, window_s=0.2, min_samples=5)
    learner = _learner("p", [0.0], config)
    learner.state = LimitState(23.0, 0.01, "grow", 9)
    try:
        await learner.flush(client)
        assert await client.hget(Keys("fleet").cfg, protocol.LEARNED) == "23"
        await client.flushall()
        await learner.flush(client)
        assert await client.hget(Keys("fleet").cfg, protocol.LEARNED) == "23"
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_second_shift_test_keeps_its_first_share_through_a_rolling_deploy(
    clean_redis_server: RedisServer,
) -> None:
    """The first test's share goes beside the state in P:cfg (`SHARE_FIELD`), written
    in the step's one HSET: a step of this build reads it with the state and writes the
    next one's. An older build's process, sharing Redis in a rolling deploy, parses the
    state text as it always did (no field it does not know), and its step rewrites the
    state but not the share: the next step of this build finds the share stale (its
    step count is not the state's) and leaves it out, so the second test's verdict goes
    alone, as the older build's would."""
    import redis.asyncio as aredis

    from tests.test_limit_estimator import _replay_ci, _uniform_window

    client = aredis.Redis.from_url(clean_redis_server.url, decode_responses=True)
    keys, config = Keys("fleet"), LimitConfig()
    learner = _learner("p0", [1000.0], config)
    _, state = _replay_ci(0.106)  # a second test's reference stage; the first's share 0.53
    window = _uniform_window(40, 0.086, 6.9, 7)  # one more reference window

    async def step_here() -> tuple[str, str]:
        await client.rpush(keys.learn_windows, f"p0|{window.encode()}")
        await learner._step(client)
        text, share = await client.hmget(keys.cfg, STATE_FIELD, SHARE_FIELD)
        return str(text), str(share)

    try:
        await client.hset(
            keys.cfg, mapping={STATE_FIELD: state.encode(), SHARE_FIELD: state.encode_share()}
        )
        text, share = await step_here()
        new = LimitState.decode(text, share)
        assert (new.reason, new.steps) == ("shift-test", state.steps + 1), text
        assert new.first_share == state.first_share
        older = LimitState.decode(text)  # an older build's parse: the state, no share
        assert older == replace(new, first_share=None)
        # An older build's step: the state and the limit, not the share.
        stepped = step(config, older, window, 0.5)
        await client.hset(
            keys.cfg, mapping={protocol.LEARNED: stepped.in_force, STATE_FIELD: stepped.encode()}
        )
        text, share = await step_here()
        after = LimitState.decode(text, share)
        assert (after.reason, after.steps) == ("shift-test", state.steps + 3), text
        assert after.first_share is None
        assert share == ""
    finally:
        await client.aclose()


def test_summaries_cross_the_wire_whole() -> None:
    summary = WindowSummary()
    for i in range(50):
        summary.add(Sample(0.001 * (i + 1), i % 10 == 0, i % 7))
    again = WindowSummary.decode(summary.encode())
    assert again == summary
    assert protocol.SEP not in summary.encode()
    assert protocol.LINE not in summary.encode()


def _settings(server: RedisServer, **values: Any) -> Settings:
    # 3 s: generous, for a loaded machine's Redis (the start's PING, the first call's
    # FUNCTION LOAD); the freeze test below gives its own 1 s, which its orphan depends on.
    values.setdefault("redis_timeout_s", 3.0)
    return Settings.from_env({}, redis_url=server.url, key_prefix="auto", **values)


@pytest.mark.anyio
async def test_the_scripts_admit_up_to_the_fleet_s_learned_limit(
    clean_redis_server: RedisServer,
) -> None:
    """The scripts read one number: P:cfg's learned limit, for every process; until one is
    stored, the process's own start. A number set live wins over it."""
    client = redis.Redis.from_url(clean_redis_server.url)
    # Stored before the process starts: its learner's first step (an idle one) must not
    # read the state before this write and store its own after it.
    state = LimitState(3.0, 0.01, "grow", 1).encode()
    client.hset("{auto}:cfg", mapping={protocol.LEARNED: 3, STATE_FIELD: state})
    backend = RedisBackend(_settings(clean_redis_server, concurrency="auto"))
    await backend.start()
    try:
        outcomes = [
            await backend.acquire(ThrottleRequest(f"r{i}", "t", "normal", 1, False, False))
            for i in range(5)
        ]
        admitted = [o for o in outcomes if type(o).__name__ == "Admitted"]
        assert len(admitted) == 3
        assert backend.limits.concurrency == 3
        assert backend.limits.learned
        assert backend.learning
        # Failure mode `local` keeps this process's share of the learned limit.
        assert backend._fallback.limits.concurrency == 3
        local = share(backend._fallback.limits, 2)
        assert local.concurrency == 1
        assert not local.learned
        # An operator's number wins, and learning stops in every process.
        client.hset("{auto}:cfg", "concurrency", 5)
        Keys("auto").live_changed(client)  # as the CLI does: the scripts read P:cfg anew
        await backend.acquire(ThrottleRequest("r9", "t", "normal", 1, False, False))
        assert backend.limits.concurrency == 5
        assert not backend.limits.learned
        assert not backend.learning
    finally:
        for outcome in outcomes:
            if type(outcome).__name__ == "Waiting":
                await backend.cancel(outcome)  # type: ignore[arg-type]
        await backend.stop()
        client.close()


def test_set_concurrency_auto_switches_live_and_status_shows_the_learned_limit(
    clean_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = clean_redis_server.url
    code = cli.main(["--redis-url", url, "--prefix", "live", "set", "--concurrency", "auto"])
    assert code == 0, capsys.readouterr()
    client = redis.Redis.from_url(url, decode_responses=True)
    assert client.hget("{live}:cfg", "concurrency") == "auto"
    client.hset(
        "{live}:cfg",
        mapping={protocol.LEARNED: 12, STATE_FIELD: LimitState(12.4, 0.0421, "grow", 30).encode()},
    )
    capsys.readouterr()
    assert cli.main(["--redis-url", url, "--prefix", "live", "status"]) == 0
    out = capsys.readouterr().out
    assert "learned    concurrency limit 12; baseline 42.1 ms; last step: grow" in out
    assert cli.main(["--redis-url", url, "--prefix", "live", "status", "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["learned"] == {"limit": 12, "baseline_ms": 42.1, "reason": "grow"}
    assert cli.main(["--redis-url", url, "--prefix", "live", "set", "--concurrency", "6"]) == 0
    assert client.hget("{live}:cfg", "concurrency") == "6"
    client.close()


@pytest.mark.anyio
async def test_the_gauges_show_the_limit_in_force_and_the_baseline() -> None:
    from prometheus_client import CollectorRegistry

    from throttle_mw.metrics import ThrottleMetrics

    config = LimitConfig(initial=6, window_s=0.05, min_samples=5)
    backend = MemoryBackend(Limits(concurrency=6, learned=True), Policy({}), config)
    await backend.start()
    await feed_until_steps(backend, Sample(0.02, False, 1), 6)  # (0.3 s on a quiet machine)
    metrics = ThrottleMetrics(registry=CollectorRegistry(), backend=backend)
    await metrics.refresh()
    text = metrics.render()[0].decode()
    limit = backend.limits.concurrency
    assert f"throttle_concurrency_limit {float(limit)}" in text  # type: ignore[arg-type]
    baseline = next(
        line for line in text.splitlines() if line.startswith("throttle_concurrency_baseline")
    )
    assert 0.015 <= float(baseline.split()[1]) <= 0.025
    await backend.stop()


@pytest.mark.anyio
async def test_zero_configuration_says_so_in_one_start_up_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    middleware = ThrottleMiddleware(Starlette())
    assert middleware.error is None
    with caplog.at_level("INFO", logger="throttle_mw"):
        await middleware.startup()
    lines = [r.getMessage() for r in caplog.records if "learned" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "THROTTLE_CONCURRENCY=auto" in lines[0]
    assert "starts at 4, stays between 2 and 1000" in lines[0]
    await middleware.shutdown()
    # A number set: no such line.
    caplog.clear()
    middleware = ThrottleMiddleware(Starlette(), concurrency=8)
    with caplog.at_level("INFO", logger="throttle_mw"):
        await middleware.startup()
    assert not [r for r in caplog.records if "learned" in r.getMessage()]
    await middleware.shutdown()


@pytest.mark.anyio
async def test_the_learner_taking_the_breaker_s_probe_closes_it_again(
    redis_server: RedisServer,
) -> None:
    """After an outage the breaker lets one probe through; with a learned limit the
    learner's push (every 0.25 s) is often the first call to take it. Its success must
    close the breaker like any other call's, or the process stays in its failure mode for
    good: every request decided locally, its orphans never given back. (Found by the
    soak: a process kept 48 orphans after a freeze. A Redis that was killed does not show
    it: the grant listener's reconnect closes the breaker; a freeze shorter than the
    listener's socket timeout leaves the listener none to make.)"""
    # Lease TTL 30 s: the heartbeat sleeps 5 s, so the learner is first to call Redis.
    # Redis timeout 1 s: r1's release must time out while Redis is frozen (1.8 s).
    backend = RedisBackend(
        _settings(redis_server, concurrency="auto", lease_ttl_s=30.0, redis_timeout_s=1.0)
    )
    await backend.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        held = await backend.acquire(ThrottleRequest("r1", "t", "normal", 1, False, False))
        assert type(held).__name__ == "Admitted"
        redis_server.pause(1.8)  # shorter than the grant listener's 3 s socket timeout
        backend.release("r1")  # times out (1 s): an orphan, given back once Redis is back
        # (With kept slots, the default, r1's slot is kept and goes back T later: its
        # release may time out a moment after the learner's push opened the breaker.)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if backend._breaker.is_open and backend._orphans:
                break
        assert backend._breaker.is_open
        assert backend._orphans == {"r1"}
        for _ in range(120):  # thawed at 1.8 s; the breaker's pause is at most 1 s
            await asyncio.sleep(0.05)
            if not backend._breaker.is_open:
                break
        assert not backend._breaker.is_open
        assert not backend._orphans
        assert client.zcard("{auto}:leases") == 0  # r1 given back
        # Decided in Redis again, not locally.
        again = await backend.acquire(ThrottleRequest("r2", "t", "normal", 1, False, False))
        assert type(again).__name__ == "Admitted"
        assert client.zcard("{auto}:leases") == 1
        backend.release("r2")
    finally:
        redis_server.thaw()
        await backend.stop()
        client.close()
