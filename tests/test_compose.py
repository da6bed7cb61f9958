"""docker-compose.yml, Dockerfile and the nginx config, checked without a Docker engine.

The compose file is validated against the Compose Specification's own JSON
schema (vendored in tests/data, see its README); then what the schema cannot
know: every referenced service exists, the load balancer fronts the replicas,
the load generator targets the load balancer, and the replicas share one
Redis, one SQLite file and a budget that the real settings parsers accept.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from demo_app.config import AppConfig
from throttle_mw import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "tests" / "data" / "compose-spec.json"
APPS = ("app1", "app2", "app3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return (ROOT / "deploy" / "nginx.conf").read_text()


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    return {name: {} for name in deps} if isinstance(deps, list) else dict(deps)


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "app1", "restart_policy"), "always"),  # no such key
        (("services", "lb", "depends_on", "app1", "condition"), "service_ready"),  # bad enum
        (("services", "redis", "healthcheck", "retries"), [3]),  # wrong type
    ],
)
def test_the_schema_catches_mistakes(
    compose: dict[str, Any],
    validator: jsonschema.protocols.Validator,
    path: tuple[str, ...],
    value: object,
) -> None:
    """The vendored schema really is applied: a broken copy of our file fails it."""
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not validator.is_valid(broken)


def test_topology(compose: dict[str, Any]) -> None:
    found = services(compose)
    assert {"redis", *APPS, "lb", "loadgen"} <= set(found)
    assert str(found["redis"]["image"]).startswith("redis:7")
    assert str(found["lb"]["image"]).startswith("nginx")
    for name, service in found.items():
        for dep in depends_on(service):
            assert dep in found, f"{name} depends on {dep}, which is not a service"


def test_every_long_running_service_is_health_checked_and_waited_for(
    compose: dict[str, Any],
) -> None:
    found = services(compose)
    for name in ("redis", *APPS, "lb"):
        assert "test" in found[name].get("healthcheck", {}), f"{name} has no healthcheck"
    for app in APPS:
        assert depends_on(found[app])["redis"].get("condition") == "service_healthy"
    lb_deps = depends_on(found["lb"])
    assert all(lb_deps[app].get("condition") == "service_healthy" for app in APPS)
    assert depends_on(found["loadgen"])["lb"].get("condition") == "service_healthy"


def test_replicas_share_redis_sqlite_and_a_valid_budget(compose: dict[str, Any]) -> None:
    found = services(compose)
    envs = [environment(found[app]) for app in APPS]
    mounts = [set(found[app].get("volumes", [])) for app in APPS]
    for env in envs:
        assert env["THROTTLE_REDIS_URL"] == "redis://redis:6379/0"
        # The real parsers: a value the app would refuse at start-up fails here.
        settings = Settings.from_env(env)
        assert settings.rate == 80.0
        assert settings.concurrency is not None
        config = AppConfig.from_env(env)
        # Never more in flight than the fleet's store takes, and each replica's store has
        # room for a fair part of it even when the load balancer spreads unevenly.
        assert settings.concurrency <= config.slots * len(APPS)
        assert config.slots >= settings.concurrency / len(APPS) + 1
    assert len({env["SURVEYTOOL_DB"] for env in envs}) == 1
    assert len({env["SURVEYTOOL_REPLICA"] for env in envs}) == len(APPS)
    assert mounts[0] == mounts[1] == mounts[2]
    (volume,) = mounts[0]
    name, target = str(volume).split(":")[:2]
    assert name in compose["volumes"]
    assert envs[0]["SURVEYTOOL_DB"].startswith(target.rstrip("/") + "/")


def test_load_balancer_fronts_the_replicas(compose: dict[str, Any], nginx_conf: str) -> None:
    found = services(compose)
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", nginx_conf, re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M)
    assert sorted(host for host, _ in servers) == list(APPS)
    assert all(host in found for host, _ in servers)
    assert {port for _, port in servers} == {"8000"}  # the port the image's uvicorn listens on
    assert re.search(rf"proxy_pass\s+http://{upstream.group(1)}\s*;", nginx_conf)
    assert re.search(r"^\s*listen\s+80\s*;", nginx_conf, re.M)
    mounts = [str(v) for v in found["lb"]["volumes"]]
    assert any(v.startswith("./deploy/nginx.conf:") for v in mounts)


def test_loadgen_plays_the_seed_scenario_against_the_load_balancer(
    compose: dict[str, Any],
) -> None:
    loadgen = services(compose)["loadgen"]
    command = loadgen["command"]
    argv = command.split() if isinstance(command, str) else [str(a) for a in command]
    assert argv[:3] == ["python", "-m", "demo_app.loadtest"]

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert flag("--scenario") == "seed"
    assert flag("--target") == "http://lb:80"
    assert flag("--report") == "/reports/report.json"
    assert flag("--chart") == "/reports/chart.png"
    assert "./reports:/reports" in [str(v) for v in loadgen["volumes"]]


def test_dockerfile_installs_the_demo_extra_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \"?\.\[demo\]\"?", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "the image must switch to a non-root user"
    assert users[-1] not in ("root", "0")
    assert "uvicorn" in text
    assert "demo_app.app:app" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests", "reports"} <= set(ignored)
