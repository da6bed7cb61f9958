"""Real server processes for tests: child-process plumbing and ASGI app servers.

`AppServer` runs an app under uvicorn, gunicorn (uvicorn workers), hypercorn
or granian, started as their users start them. Every child runs in its own
process group (so a server's parent process and its workers die together),
writes stdout and stderr to a log file (so a failure can show its tail), is
killed at interpreter exit if a test forgot it, and, when started from the
main thread, is killed by the kernel if this process dies without running
atexit (pytest-timeout's thread method, `kill -9`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, get_args

from tests.support.ports import HOST, free_port, release_port

__all__ = [
    "HOST",
    "REPO_ROOT",
    "SERVERS",
    "AppServer",
    "FailedStart",
    "ServerKind",
    "child_env",
    "end_process",
    "free_port",
    "is_alive",
    "log_tail",
    "make_temp_dir",
    "release_port",
    "remove_temp_dir",
    "run_failing_app",
    "spawn",
    "start_all",
    "sweep_stale_temp_dirs",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The ASGI servers an `AppServer` can run (gunicorn runs uvicorn's worker class).
ServerKind = Literal["uvicorn", "gunicorn", "hypercorn", "granian"]
SERVERS: tuple[ServerKind, ...] = get_args(ServerKind)

_PR_SET_PDEATHSIG = 1
# Looked up before any fork: the child may only make this one call.
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
_TEMP_PREFIX = "throttle-test-"
_children: set[subprocess.Popen[bytes]] = set()
_temp_dirs: set[Path] = set()
_children_lock = threading.Lock()


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new process group, appending its output to `log_path`.

    The caller must end it with `end_process`; atexit kills it otherwise. Ask
    `is_alive(proc)`, not `proc.poll()`: poll reaps the leader, after which its
    group (say, orphaned workers) can no longer be killed safely, as its id may
    be reused.
    """
    # PDEATHSIG fires when the *thread* that forked exits: only safe from the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if in_main else None,
        )
    with _children_lock:
        _children.add(proc)
    return proc


def end_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 15.0
) -> int:
    """Send `sig` to the group leader, wait up to `timeout_s`, then SIGKILL the whole group.

    Stragglers in the group (uvicorn workers whose supervisor died) are killed
    too, before the leader is reaped so that its group id cannot be reused.
    Returns the leader's exit code (negative: killed by that signal).
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if sig in (signal.SIGTERM, signal.SIGINT):
                os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            os.kill(proc.pid, sig)
        _exited(proc.pid, timeout_s)
        _kill_group(proc.pid)
    returncode = proc.wait()
    with _children_lock:
        _children.discard(proc)
    return returncode


def is_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether `proc` still runs; unlike `Popen.poll` it does not reap (see `end_process`)."""
    return proc.returncode is None and not _exited(proc.pid, 0.0)


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait for `pid` to exit without reaping it (it stays a zombie, keeping its group id)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: a test that forgot to stop its server must not leave an orphan."""
    with _children_lock:
        leftovers = list(_children)
        dirs = list(_temp_dirs)
    for proc in leftovers:
        end_process(proc, signal.SIGKILL, timeout_s=5.0)
    for path in dirs:
        remove_temp_dir(path)


def make_temp_dir(kind: str) -> Path:
    """A temp dir for one server, named after this process so that it never outlives it.

    `remove_temp_dir` removes it; atexit does if nobody did, and if this process
    is killed outright, the next one to import this module sweeps it up.
    """
    path = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-{kind}-"))
    with _children_lock:
        _temp_dirs.add(path)
    return path


def remove_temp_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _children_lock:
        _temp_dirs.discard(path)


def sweep_stale_temp_dirs() -> None:
    """Remove the temp dirs of processes that no longer exist (killed before atexit)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*-*-*"):
        pid = path.name.removeprefix(_TEMP_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    return True


sweep_stale_temp_dirs()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    interval_s: float = 0.02,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll `ready` until it is true (True), `alive` turns false or time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return True
        if not alive() or time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test app: ours minus every `THROTTLE_*`, plus `env`.

    Dropping our `THROTTLE_*` first makes each test state its whole
    configuration; the repo root goes on `PYTHONPATH` so `tests.apps.x:app` imports.
    """
    merged = {k: v for k, v in os.environ.items() if not k.startswith("THROTTLE_")}
    merged.update(env or {})
    paths = [str(REPO_ROOT), *filter(None, merged.get("PYTHONPATH", "").split(os.pathsep))]
    merged["PYTHONPATH"] = os.pathsep.join(paths)
    merged["PYTHONUNBUFFERED"] = "1"  # the log shows what happened up to a crash
    return merged


def _uvicorn_argv(app: str, port: int, workers: int, extra_args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra_args,
    ]


def server_argv(
    server: ServerKind,
    app: str,
    port: int,
    *,
    workers: int = 1,
    access_log: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line that runs `app` under `server` as its documentation starts it.

    `workers` is the server's own flag: hypercorn's 0 serves in its parent
    process, every other count (its default 1 too) in spawned worker processes.
    """
    bind = f"{HOST}:{port}"
    if server == "uvicorn":
        quiet = () if access_log else ("--no-access-log",)
        return _uvicorn_argv(app, port, workers, [*quiet, *extra_args])
    python = [sys.executable, "-m", server]
    if server == "gunicorn":
        argv = [*python, app, "-k", "uvicorn.workers.UvicornWorker", "-b", bind, "-w", str(workers)]
        if access_log:
            argv += ["--access-logfile", "-"]
        if _gunicorn_has_control_socket():
            # Else every gunicorn opens the same ~/.gunicorn/gunicorn.ctl.
            argv.append("--no-control-socket")
        return [*argv, *extra_args]
    if server == "hypercorn":
        argv = [*python, "-k", "asyncio", "-b", bind, "-w", str(workers)]
        if access_log:
            argv += ["--access-logfile", "-"]
        return [*argv, *extra_args, app]
    if server == "granian":
        argv = [*python, "--interface", "asgi", "--host", HOST, "--port", str(port)]
        argv += ["--workers", str(workers), "--access-log" if access_log else "--no-access-log"]
        return [*argv, *extra_args, app]
    raise ValueError(f"unknown server {server!r}: expected one of {', '.join(SERVERS)}")


@cache
def _gunicorn_has_control_socket() -> bool:
    """gunicorn 24+ opens a control socket in the home directory unless told not to."""
    config: Any = importlib.import_module("gunicorn.config")  # gunicorn has no type hints
    return any("--no-control-socket" in (setting.cli or ()) for setting in config.KNOWN_SETTINGS)


class Managed:
    """`with` support for a process (or several) that `start` runs and `close` ends.

    `close` must be idempotent: it also runs when `start` fails half-way.
    """

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AppServer(Managed):
    """An ASGI app under an ASGI server in a separate process, on a free 127.0.0.1 port.

    `server` picks uvicorn (the default), gunicorn with uvicorn workers,
    hypercorn or granian; `workers` and `extra_args` are passed to it (see
    `server_argv`). `cpu` pins the process to cores with `taskset -c` (e.g. "0"
    or [0, 1]), so load tests can keep the app and the load generator apart.
    When workers are separate processes a TCP connect only proves the parent
    listens: give a `health_path`.
    """

    def __init__(
        self,
        app: str,
        *,
        server: ServerKind = "uvicorn",
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        cpu: str | Sequence[int] | None = None,
        extra_args: Sequence[str] = (),
        health_path: str | None = None,
        access_log: bool = False,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if server not in SERVERS:
            raise ValueError(f"unknown server {server!r}: expected one of {', '.join(SERVERS)}")
        self.app = app
        self.server: ServerKind = server
        self.env = dict(env or {})
        self.workers = workers
        self.cpu = cpu if cpu is None or isinstance(cpu, str) else ",".join(map(str, cpu))
        self.extra_args = tuple(extra_args)
        self.access_log = access_log
        self.health_path = health_path
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self._dir = make_temp_dir("app")
        self.log_path = self._dir / f"{server}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the app server has not been started")
        return self._proc.pid

    @property
    def is_running(self) -> bool:
        return self._proc is not None and is_alive(self._proc)

    def start(self) -> Self:
        """Start the server and return once it accepts connections (and the health path answers)."""
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> Self:
        """Start the server's process and return at once; `wait_ready` waits for it to serve."""
        if self.is_running:
            raise RuntimeError("the app server is already running")
        if self._proc is not None:
            end_process(self._proc)  # it crashed on its own: reap it
        argv = server_argv(
            self.server,
            self.app,
            self.port,
            workers=self.workers,
            access_log=self.access_log,
            extra_args=self.extra_args,
        )
        if self.cpu is not None:
            taskset = shutil.which("taskset")
            if taskset is None:
                raise RuntimeError("cpu pinning needs `taskset` (util-linux) on PATH")
            argv = [taskset, "-c", self.cpu, *argv]
        env = child_env(self.env)
        self._proc = spawn(argv, log_path=self.log_path, env=env, cwd=REPO_ROOT)
        return self

    def wait_ready(self) -> Self:
        """Return once the spawned server accepts connections (and the health path answers)."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("the app server has not been spawned")
        ready = wait_until(
            self._ready,
            timeout_s=self.startup_timeout_s,
            interval_s=0.05,
            alive=lambda: is_alive(proc),
        )
        if not ready:
            crashed = not is_alive(proc)
            code = end_process(proc, signal.SIGKILL)
            why = f"exited with code {code}" if crashed else f"{self.startup_timeout_s} s passed"
            raise RuntimeError(
                f"{self.server} for {self.app} on port {self.port} did not become ready ({why});"
                f" log tail:\n{log_tail(self.log_path)}"
            )
        return self

    def _ready(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0):
                pass
        except OSError:
            return False
        if self.health_path is None:
            return True
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2.0)
        try:
            conn.request("GET", self.health_path)
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return 200 <= status < 300

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the server's graceful shutdown: in-flight requests finish); the exit code.

        A clean shutdown returns -SIGTERM (-15) under uvicorn, which re-raises
        the signal it caught once it has shut down, and 0 under the others.
        -SIGKILL (-9) means it was still running after `timeout_s` and was
        killed. None if it was never started.
        """
        if self._proc is None:
            return None
        return end_process(self._proc, signal.SIGTERM, timeout_s)

    def kill(self) -> int | None:
        """SIGKILL the whole process group (a crash: nothing runs its shutdown)."""
        if self._proc is None:
            return None
        return end_process(self._proc, signal.SIGKILL, timeout_s=5.0)

    def log(self) -> str:
        """Everything the server and the app wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Kill if still running, free the port and remove the log. Idempotent."""
        self.kill()
        release_port(self.port)
        remove_temp_dir(self._dir)


def start_all(servers: Sequence[AppServer]) -> None:
    """Start several servers at once: each is spawned, then each is waited for.

    Their start-ups (an interpreter importing the app) overlap instead of queueing one
    behind another, which is what a fleet costs a test before its first request. The
    caller closes them all (even on failure), as after `start`.
    """
    for server in servers:
        server.spawn()
    for server in servers:
        server.wait_ready()


@dataclass(frozen=True)
class FailedStart:
    """What a uvicorn process that refused to start left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_failing_app(
    app: str,
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> FailedStart:
    """Run uvicorn for an app that must fail at start-up; its exit code and output.

    Raises AssertionError if the app is still running after `timeout_s` (it
    started instead of failing). Note that uvicorn's default `--lifespan auto`
    swallows exceptions in lifespan start-up: pass `--lifespan on` to test them.
    """
    port = free_port()
    argv = _uvicorn_argv(app, port, 1, extra_args)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(env),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        with proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                stdout, stderr = proc.communicate()
                raise AssertionError(
                    f"{app} was expected to fail at start-up but still ran after {timeout_s} s;"
                    f" output:\n{(stdout + stderr).decode(errors='replace')[-4000:]}"
                ) from None
    finally:
        release_port(port)
    return FailedStart(
        proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )
