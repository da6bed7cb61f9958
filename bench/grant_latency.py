"""Grant latency: from capacity freed in one process to the waiting request resuming in another.

    python bench/grant_latency.py --samples 500 --json bench/results/grant_latency.json

Two worker processes, each with its own `RedisBackend` (as two uvicorn workers
would have), share one private redis-server with a concurrency budget of 1.
Each sample:

1. the holder acquires the slot (admitted, lease held);
2. the waiter acquires: it is queued (``Waiting``), its grant listener blocked in BLPOP;
3. after a random pause of 2 to 10 ms (the waiter sits idle, as a queued
   request does), the holder reads ``time.monotonic()`` and calls
   ``release()``, which sends the release batch;
4. Redis's script dispatches the slot to the waiter and pushes the grant onto
   the waiter's list; its BLPOP returns; its listener resolves the waiting
   future; the waiting coroutine resumes and reads ``time.monotonic()``;
5. the waiter gives the slot back, ready for the next sample.

Grant latency = resume time - release time. Both are read from
CLOCK_MONOTONIC, which on Linux is one clock for every process on the host, so
the two readings compare directly. The HTTP layer is left out (it adds the same
to every request, queued or not); what is measured is the backend's grant path:
release call, release batch, Lua dispatch, RPUSH, BLPOP reply, future, task
wake-up. The target: p99 <= 5 ms on loopback.

The workers run pinned to the server CPUs (by default both on CPU 0, like two
workers sharing a core), Redis to the services' CPUs (CPU 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stats
from bench.record import new_record, save_record
from bench.server import ROOT, taskset
from bench.services import RedisService, ServiceContext
from bench.signals import sigterm_as_interrupt

RESULTS_DIR = ROOT / "bench" / "results"
TARGET_P99_MS = 5.0
_REPLY_TIMEOUT_S = 10.0
_PREFIX = "grantbench"


# --- the worker process -------------------------------------------------------------------


async def _worker(redis_url: str) -> None:
    """Serve ``hold`` / ``release`` / ``wait`` / ``quit`` lines from stdin; answer on stdout."""
    from throttle_mw.backends.base import Admitted, RequestIds, Waiting
    from throttle_mw.backends.redis import RedisBackend
    from throttle_mw.scheduler import Request
    from throttle_mw.settings import Settings

    settings = Settings.from_env({}, redis_url=redis_url, concurrency=1, key_prefix=_PREFIX)
    backend = RedisBackend(settings)
    await backend.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ids = RequestIds()
    held: str | None = None

    def say(*words: object) -> None:
        sys.stdout.write(" ".join(map(str, words)) + "\n")
        sys.stdout.flush()

    async def admitted(outcome: Any) -> Any:
        if isinstance(outcome, Waiting):
            return await asyncio.wait_for(outcome.future, _REPLY_TIMEOUT_S)
        return outcome

    say("ready")
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "quit":
                break
            if line == "hold":  # take the slot (waiting for it if the last release is in flight)
                request = Request(ids(), "holder")
                outcome = await admitted(await backend.acquire(request))
                if not isinstance(outcome, Admitted):
                    say("error", f"hold: {outcome!r}")
                    continue
                held = request.id
                say("held")
            elif line == "release" and held is not None:
                released_at = time.monotonic()
                backend.release(held)
                held = None
                say("released", repr(released_at))
            elif line == "wait":
                request = Request(ids(), "waiter")
                outcome = await backend.acquire(request)
                if not isinstance(outcome, Waiting):
                    say("error", f"wait: expected to be queued, got {outcome!r}")
                    if isinstance(outcome, Admitted) and outcome.lease:
                        backend.release(request.id)
                    continue
                say("queued")
                result = await asyncio.wait_for(outcome.future, _REPLY_TIMEOUT_S)
                resumed_at = time.monotonic()
                if isinstance(result, Admitted):
                    backend.release(request.id)
                    say("resumed", repr(resumed_at))
                else:
                    say("error", f"wait: {result!r}")
            else:
                say("error", f"unknown command {line!r}")
    finally:
        await backend.stop()


# --- the coordinator ------------------------------------------------------------------------


class Worker:
    """A worker process, spoken to in lines; replies are awaited with a timeout."""

    def __init__(self, role: str, redis_url: str, cpus: str | None) -> None:
        self.role = role
        self.process = subprocess.Popen(
            [*taskset(cpus), sys.executable, "-m", "bench.grant_latency", "--worker", redis_url],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self._buffer = b""
        try:
            self.expect("ready")
        except BaseException:
            self.close()
            raise

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    def expect(self, word: str) -> str:
        """The rest of the next line, which must start with `word`."""
        line = self._line()
        kind, _, rest = line.partition(" ")
        if kind != word:
            raise RuntimeError(f"{self.role}: expected {word!r}, got {line!r}")
        return rest

    def _line(self) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + _REPLY_TIMEOUT_S
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"{self.role}: no answer within {_REPLY_TIMEOUT_S:.0f} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{self.role} exited with {self.process.wait()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(5.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def measure(samples: int, redis_url: str, worker_cpus: str | None, seed: int = 1) -> list[float]:
    """Grant latencies in milliseconds, one per sample."""
    rng = random.Random(seed)
    workers: list[Worker] = []
    try:
        holder = Worker("holder", redis_url, worker_cpus)
        workers.append(holder)
        waiter = Worker("waiter", redis_url, worker_cpus)
        workers.append(waiter)
        latencies = []
        for _ in range(samples):
            holder.send("hold")
            holder.expect("held")
            waiter.send("wait")
            waiter.expect("queued")
            time.sleep(rng.uniform(0.002, 0.010))
            holder.send("release")
            released = float(holder.expect("released"))
            resumed = float(waiter.expect("resumed"))
            latencies.append((resumed - released) * 1000.0)
        return latencies
    finally:
        for worker in workers:
            worker.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/grant_latency.py",
        description="Capacity freed in one process -> waiting request resumes in another.",
    )
    parser.add_argument("--worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--worker-cpus", default="0", help="taskset -c list for both workers")
    parser.add_argument("--service-cpus", default="1", help="taskset -c list for Redis")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "grant_latency.json")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    return args


def run_grant_latency(
    samples: int, worker_cpus: str | None, service_cpus: str | None, seed: int, workdir: Path
) -> dict[str, Any]:
    """Start Redis, measure, stop everything; the results document's body."""
    service = RedisService(ServiceContext(service_cpus, workdir))
    try:
        service.start()
        redis = dict(service.describe())
        before = service.counters()
        latencies = measure(samples, service.url, worker_cpus, seed)
        after = service.counters()
    finally:
        service.stop()
    counters = {key: after[key] - before.get(key, 0.0) for key in after}
    calls = counters.get("script_calls", 0.0)
    redis["counters"] = counters
    # Each sample runs 4 scripts (hold, wait, release + dispatch, the waiter's release).
    redis["script_us_per_call"] = counters.get("script_us", 0.0) / calls if calls else None
    summary = stats.summary(latencies)
    return {
        "samples": len(latencies),
        "worker_cpus": worker_cpus,
        "redis": redis,
        "latency_ms": summary,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": summary["p99"] is not None and summary["p99"] <= TARGET_P99_MS,
        "latencies_ms": latencies,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        asyncio.run(_worker(args.worker))
        return 0
    import tempfile

    worker_cpus = None if args.no_pin else args.worker_cpus
    service_cpus = None if args.no_pin else args.service_cpus
    document = new_record("grant_latency", argv, method=__doc__)
    status = 0
    print(
        f"grant latency: {args.samples} samples, workers on CPUs {worker_cpus},"
        f" Redis on CPUs {service_cpus}",
        flush=True,
    )
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="throttle_mw-bench-") as tmp:
        try:
            document.update(
                run_grant_latency(args.samples, worker_cpus, service_cpus, args.seed, Path(tmp))
            )
        except RuntimeError as exc:
            document["error"] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            document["error"] = "interrupted"
            print("interrupted: workers and Redis stopped", file=sys.stderr)
            status = 130
    document["complete"] = status == 0
    if status == 0:
        lat = document["latency_ms"]
        print(
            f"grant latency over {document['samples']} samples: p50 {lat['p50']:.2f} ms,"
            f" p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms"
            f" (target p99 <= {TARGET_P99_MS:g} ms:"
            f" {'met' if document['meets_target'] else 'NOT met'})"
        )
        per_call = document["redis"].get("script_us_per_call")
        if per_call is not None:
            print(f"Redis time per script call (mean): {per_call:.0f} us")
    save_record(document, args.json)
    return status


if __name__ == "__main__":
    sys.exit(main())
