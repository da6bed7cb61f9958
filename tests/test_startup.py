"""What an operator meets first: misspelt variables and a missing extra stop start-up clearly.

A ``THROTTLE_*`` name that is not a setting stops the app (and the CLI) with a
message naming it and the closest setting; deliberate extra names are listed
in ``THROTTLE_EXTRA_VARIABLES``. Anything that stops the middleware from being
built (a bad value, ``THROTTLE_REDIS_URL`` without redis-py) fails the ASGI
lifespan start-up, so uvicorn exits non-zero instead of serving 500s. The
missing extra is tested in a real uvicorn process where ``import redis`` fails
as it does without the extra (tests/support/without.py).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.support.servers import (
    HOST,
    REPO_ROOT,
    AppServer,
    child_env,
    end_process,
    free_port,
    is_alive,
    log_tail,
    release_port,
    run_failing_app,
    spawn,
    wait_until,
)
from throttle_mw import ConfigError, Settings, ThrottleMiddleware, cli
from throttle_mw.settings import EXTRA_VARIABLES, KNOWN_VARIABLES, UnknownVariable

PLAIN = "tests.apps.plain:app"
MISSING_EXTRA = "pip install 'throttle_mw[redis]'"
#: The variables docs/design.md fixes (a contract with users): all must be known names.
DESIGN_VARIABLES = (
    "THROTTLE_ENABLED",
    "THROTTLE_REDIS_URL",
    "THROTTLE_KEY_PREFIX",
    "THROTTLE_RATE",
    "THROTTLE_BURST",
    "THROTTLE_CONCURRENCY",
    "THROTTLE_CONCURRENCY_MIN",
    "THROTTLE_CONCURRENCY_MAX",
    "THROTTLE_TENANT_HEADER",
    "THROTTLE_TENANT_WEIGHTS",
    "THROTTLE_TENANT_RATE",
    "THROTTLE_MAX_WAIT",
    "THROTTLE_QUEUE_LIMIT",
    "THROTTLE_TENANT_QUEUE_LIMIT",
    "THROTTLE_ROUTE_PRIORITIES",
    "THROTTLE_DEFAULT_PRIORITY",
    "THROTTLE_FAILURE_MODE",
    "THROTTLE_DRY_RUN",
)


pytestmark = pytest.mark.usefixtures("clean_env")


# --- misspelt names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("THROTTLE_CONCURENCY", "THROTTLE_CONCURRENCY"),
        ("THROTTLE_RATEE", "THROTTLE_RATE"),
        ("THROTTLE_REDIS_ULR", "THROTTLE_REDIS_URL"),
        ("THROTTLE_MAXWAIT", "THROTTLE_MAX_WAIT"),
        ("THROTTLE_TENANT_WEIGHT", "THROTTLE_TENANT_WEIGHTS"),
        ("THROTTLE_FAILUREMODE", "THROTTLE_FAILURE_MODE"),
        ("THROTTLE_CONCURRENCY_MAXIMUM", "THROTTLE_CONCURRENCY_MAX"),
        ("THROTTLE_EXTRA_VARIABLE", "THROTTLE_EXTRA_VARIABLES"),
        ("throttle_rate", "THROTTLE_RATE"),  # the case counts: this one is never read
        ("Throttle_Concurrency", "THROTTLE_CONCURRENCY"),
    ],
)
def test_a_misspelt_name_is_named_with_the_setting_it_resembles(variable: str, meant: str) -> None:
    with pytest.raises(UnknownVariable) as caught:
        Settings.from_env({"THROTTLE_RATE": "5", variable: "2"})
    assert str(caught.value).startswith(f"{variable}: unknown setting; did you mean {meant}?")
    assert EXTRA_VARIABLES in str(caught.value)  # the way out for a deliberate name
    assert isinstance(caught.value, ConfigError)


def test_the_misspelling_is_reported_before_the_missing_budget_it_causes() -> None:
    # THROTTLE_RATEE alone used to report only "no budget is set".
    with pytest.raises(UnknownVariable, match="did you mean THROTTLE_RATE"):
        Settings.from_env({"THROTTLE_RATEE": "5"})


def test_every_unknown_name_is_listed_and_no_value_is_shown() -> None:
    env = {
        "THROTTLE_RATE": "5",
        "THROTTLE_REDIS_ULR": "redis://:hunter2@redis:6379/0",
        "THROTTLE_BANANA": "hunter2",
    }
    with pytest.raises(UnknownVariable) as caught:
        Settings.from_env(env)
    text = str(caught.value)
    assert "THROTTLE_BANANA: unknown setting." in text  # nothing close: no suggestion
    assert "THROTTLE_REDIS_ULR: unknown setting; did you mean THROTTLE_REDIS_URL?" in text
    assert "hunter2" not in text
    assert caught.value.names == ["THROTTLE_BANANA", "THROTTLE_REDIS_ULR"]


def test_other_variables_and_disabled_throttles_are_checked_as_documented() -> None:
    # Not ours: never looked at.
    others = {"THROTTLE": "x", "THROTTLER_X": "1", "RATE": "1", "MY_THROTTLE_RATE": "2"}
    assert Settings.from_env({**others, "THROTTLE_RATE": "5"}).rate == 5.0
    # A disabled throttle still stops on a misspelling: it would bite once enabled.
    with pytest.raises(UnknownVariable, match="did you mean THROTTLE_RATE"):
        Settings.from_env({"THROTTLE_ENABLED": "false", "THROTTLE_RAT": "5"})


def test_design_and_readme_names_are_known_and_every_read_name_is_documented() -> None:
    assert set(DESIGN_VARIABLES) <= KNOWN_VARIABLES
    readme = (REPO_ROOT / "README.md").read_text()
    in_readme = set(re.findall(r"\bTHROTTLE_[A-Z0-9_]*[A-Z0-9]\b", readme))
    examples = {"THROTTLE_CONCURENCY", "THROTTLE_GATEWAY"}  # a misspelling, an extra variable
    assert in_readme - examples <= KNOWN_VARIABLES, in_readme - examples - KNOWN_VARIABLES
    assert in_readme >= KNOWN_VARIABLES, KNOWN_VARIABLES - in_readme


# --- the escape hatch: THROTTLE_EXTRA_VARIABLES ----------------------------------------------


def test_listed_extra_names_and_prefixes_are_left_alone() -> None:
    env = {
        "THROTTLE_RATE": "5",
        "THROTTLE_MYAPP_MODE": "blue",
        "THROTTLE_MYAPP_COLOUR": "red",
        "THROTTLE_GATEWAY": "on",
        EXTRA_VARIABLES: "THROTTLE_GATEWAY, THROTTLE_MYAPP_*",
    }
    assert Settings.from_env(env).rate == 5.0
    # Listing some names does not excuse others.
    with pytest.raises(UnknownVariable) as caught:
        Settings.from_env({**env, "THROTTLE_GATEWAYS": "x", "THROTTLE_MYAP_X": "y"})
    assert caught.value.names == ["THROTTLE_GATEWAYS", "THROTTLE_MYAP_X"]
    # The prefix of everything switches the check off: the operator's explicit choice.
    assert Settings.from_env({**env, "THROTTLE_RATEE": "1", EXTRA_VARIABLES: "THROTTLE_*"})


@pytest.mark.parametrize(
    "listed",
    [
        "THROTTLE_RATE",  # a setting: always read, cannot be "extra"
        "MYAPP_MODE",  # not a THROTTLE_* name: never checked, so listing it is a mistake
        "THROTTLE_MY APP",
        "THROTTLE_*_MODE",  # only a trailing * is a prefix
    ],
)
def test_a_bad_extra_list_is_refused_naming_the_entry(listed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"THROTTLE_RATE": "5", EXTRA_VARIABLES: f"THROTTLE_OK,{listed}"})
    assert str(caught.value).startswith(f"{EXTRA_VARIABLES}={listed}: invalid, expected")


# --- every reader: the middleware, the CLI, uvicorn ---------------------------------------------


def lifespan_messages(app: Any) -> list[dict[str, Any]]:
    """Drive one lifespan start-up (and shutdown) as a server does; what the app sent."""
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


def test_the_middleware_fails_start_up_on_a_misspelt_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLE_RATE", "5")
    monkeypatch.setenv("THROTTLE_CONCURENCY", "2")
    app = Starlette()
    app.add_middleware(ThrottleMiddleware)
    (failed,) = lifespan_messages(app)
    assert failed["type"] == "lifespan.startup.failed"
    expected = "THROTTLE_CONCURENCY: unknown setting; did you mean THROTTLE_CONCURRENCY?"
    assert expected in failed["message"]


def test_a_middleware_whose_settings_failed_says_so_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad value: every start-up names it, however often it is tried (a supervisor or a
    test harness retrying in the same process), never an AttributeError of a middleware
    half built; draining and stopping it do nothing; a request gets a clean 503."""
    monkeypatch.setenv("THROTTLE_RATE", "fast")
    expected = "THROTTLE_RATE=fast: invalid, expected a positive number"
    app = Starlette()
    app.add_middleware(ThrottleMiddleware)
    for _ in range(2):  # the same app: Starlette builds its middleware once
        (failed,) = lifespan_messages(app)
        assert failed["type"] == "lifespan.startup.failed"
        assert expected in failed["message"]

    middleware = ThrottleMiddleware(Starlette())
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    depths: list[int] = []

    async def calls() -> None:
        for _ in range(3):
            with pytest.raises(ConfigError, match=re.escape(expected)) as caught:
                await middleware.startup()
            assert caught.value is middleware.error
            depths.append(len(traceback.extract_tb(caught.value.__traceback__)))
        middleware.begin_drain()
        await middleware.shutdown()
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "path": "/",
            "root_path": "",
            "headers": [],
            "client": ("10.0.0.7", 1234),
        }
        await middleware(scope, receive, send)

    asyncio.run(calls())
    assert depths[0] == depths[-1]  # raised from where it was, not from every call before
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 503
    (failed,) = lifespan_messages(middleware)  # after all that, still the message
    assert expected in failed["message"]


def test_the_cli_stops_on_a_misspelt_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before any connection: the Redis named here is never reached.
    monkeypatch.setenv("THROTTLE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("THROTTLE_KEY_PREFX", "survey")
    code = cli.main(["status"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "THROTTLE_KEY_PREFX: unknown setting; did you mean THROTTLE_KEY_PREFIX?" in err


@pytest.mark.e2e
def test_a_misspelt_name_stops_uvicorn() -> None:
    failed = run_failing_app(PLAIN, env={"THROTTLE_RATE": "5", "THROTTLE_CONCURENCY": "2"})
    assert failed.returncode != 0
    expected = "THROTTLE_CONCURENCY: unknown setting; did you mean THROTTLE_CONCURRENCY?"
    assert expected in failed.output
    assert "Application startup failed" in failed.output


@pytest.mark.e2e
def test_a_listed_extra_name_starts_and_serves(
    start_app_server: Callable[..., AppServer],
) -> None:
    server = start_app_server(
        PLAIN,
        env={
            "THROTTLE_RATE": "50",
            "THROTTLE_MYAPP_MODE": "blue",
            EXTRA_VARIABLES: "THROTTLE_MYAPP_*",
        },
        health_path="/hello",
    )
    response = httpx.get(f"{server.url}/hello", timeout=5.0)
    assert response.status_code == 200
    assert response.headers["server-timing"].startswith("throttle;dur=")  # throttled, not bypassed


# --- start-up errors other than bad values: a missing extra ----------------------------------


def test_a_missing_redis_extra_fails_the_lifespan_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes an import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "throttle_mw.backends.redis", None)
    monkeypatch.setenv("THROTTLE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("THROTTLE_RATE", "5")
    app = Starlette()
    app.add_middleware(ThrottleMiddleware)
    (failed,) = lifespan_messages(app)
    assert failed["type"] == "lifespan.startup.failed"
    assert MISSING_EXTRA in failed["message"]


def without_redis_argv(port: int, *extra: str) -> list[str]:
    """uvicorn, one worker, in an interpreter where ``import redis`` fails."""
    return [
        sys.executable, "-m", "tests.support.without", "redis",
        "-m", "uvicorn", PLAIN, "--host", HOST, "--port", str(port), "--no-access-log", *extra,
    ]  # fmt: skip


REDIS_ENV = {"THROTTLE_REDIS_URL": "redis://127.0.0.1:1/0", "THROTTLE_RATE": "5"}


def test_the_import_blocker_really_hides_redis() -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "tests.support.without", "redis", "-m", "redis.asyncio"],
        env=child_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode != 0
    assert "No module named 'redis" in probe.stderr


@pytest.mark.e2e
def test_without_redis_py_uvicorn_exits_naming_the_extra() -> None:
    port = free_port()
    try:
        done = subprocess.run(
            without_redis_argv(port),
            env=child_env(REDIS_ENV),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        release_port(port)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert MISSING_EXTRA in output
    assert "Application startup failed" in output
    assert "appears unsupported" not in output  # the old symptom: lifespan given up, 500s
    assert "Uvicorn running" not in output  # it never listened


@pytest.fixture
def lifespan_off_without_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The same app with ``--lifespan off``: start-up cannot fail, so the server runs."""
    port = free_port()
    log = tmp_path / "uvicorn.log"
    proc = spawn(
        without_redis_argv(port, "--lifespan", "off"),
        log_path=log,
        env=child_env(REDIS_ENV),
        cwd=REPO_ROOT,
    )

    def listening() -> bool:
        try:
            httpx.get(f"http://{HOST}:{port}/", timeout=1.0)
        except httpx.TransportError:
            return False
        return True

    try:
        up = wait_until(listening, timeout_s=30.0, interval_s=0.05, alive=lambda: is_alive(proc))
        assert up, log_tail(log)
        yield f"http://{HOST}:{port}", log
    finally:
        end_process(proc)
        release_port(port)


@pytest.mark.e2e
def test_without_redis_py_and_lifespan_off_requests_get_503_never_500(
    lifespan_off_without_redis: tuple[str, Path],
) -> None:
    url, log = lifespan_off_without_redis
    with httpx.Client(base_url=url, timeout=5.0) as client:
        responses = [client.get("/hello") for _ in range(3)]
    assert [r.status_code for r in responses] == [503] * 3
    for response in responses:
        assert response.headers["content-type"] == "application/problem+json"
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["reason"] == "unavailable"
        assert "redis" not in response.text.lower()  # nothing internal in the answer
    text = log.read_text()
    assert text.count(MISSING_EXTRA) == 1  # said once, clearly, in the log
    assert "Traceback" not in text
