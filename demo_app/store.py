"""The survey store: SQLite with a fixed number of connection slots and a work-time model.

The capacity model, stated plainly: the store behaves like a database with
`slots` connections whose queries take `work_ms` (uniformly within
+-`jitter`). Every request that touches data takes one connection (a slot),
runs its real SQL on it in a worker thread, then keeps the slot until its
jittered work time has passed since it got the slot. A request that finds
every slot taken waits for one. So the store's true capacity is
``slots / work_ms`` requests per second (8 / 100 ms = 80/s, the capacity of
the story), and past that, latency grows for everyone: real overload, which
the throttle in front must absorb. The sleep stands in for the query time of
a busy production database; the SQL itself is real and usually much faster.
Without the jitter, slots would phase-lock and free up in bursts. `resize`
takes slots out of use (and gives them back) while the store runs: a database
that slows down midway, for the demo's ``--slowdown`` story.

Several app processes may share one SQLite file: it runs in WAL mode (readers
never block the one writer) with a busy timeout, and every write is one short
``BEGIN IMMEDIATE`` transaction, so every replica's dashboard sees the same
data. Slots are per process: a fleet's store has ``replicas * slots``.

Why stdlib ``sqlite3`` in a thread pool rather than ``aiosqlite``: the pool
holds exactly one thread per slot, so a slot's connection is only ever used
by one thread at a time, and the SQL never runs on the event loop. That is
what aiosqlite does too, with one more dependency and one thread per
connection besides.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from .config import AppConfig

_T = TypeVar("_T")

#: How long a write waits for another process's write lock before it fails.
BUSY_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Survey:
    id: str
    title: str
    questions: Mapping[str, str]


#: Seeded at start-up; answers may use other question ids too (new questions appear).
SURVEYS: Final = (
    Survey("s1", "Engagement pulse", {"q1": "How happy are you at work? (1-5)",
                                      "q2": "Would you recommend us? (0-10)",
                                      "q3": "What should we change?"}),
    Survey("s2", "Onboarding", {"q1": "How clear was your first week? (1-5)",
                                "q2": "Which team helped most?"}),
    Survey("s3", "Remote work", {"q1": "Days at home per week (0-5)",
                                 "q2": "Your main tool",
                                 "q3": "Meeting load (1-5)"}),
)  # fmt: skip

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS surveys (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS questions (
    survey_id TEXT NOT NULL REFERENCES surveys(id),
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (survey_id, id)
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    survey_id TEXT NOT NULL REFERENCES surveys(id),
    respondent TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_survey ON responses (tenant, survey_id, created_at);
CREATE TABLE IF NOT EXISTS answers (
    response_id INTEGER NOT NULL REFERENCES responses(id),
    tenant TEXT NOT NULL,
    survey_id TEXT NOT NULL,
    question_id TEXT NOT NULL,
    int_value INTEGER,
    text_value TEXT
);
CREATE INDEX IF NOT EXISTS answers_by_question ON answers (tenant, survey_id, question_id);
"""


class StoreBusy(Exception):
    """The database stayed locked past the busy timeout: the caller should retry later."""


class SurveyStore:
    """Responses in SQLite behind `slots` connections, each held for the modelled work time."""

    def __init__(self, config: AppConfig, *, rng: random.Random | None = None) -> None:
        self._path = config.db_path
        self._slots = config.slots
        self._work_s = config.work_ms / 1000.0
        self._jitter = config.jitter
        self._rng = rng or random.Random()
        self._pool: asyncio.Queue[sqlite3.Connection] | None = None
        self._connections: list[sqlite3.Connection] = []
        self._executor: ThreadPoolExecutor | None = None
        self._waiting = 0
        #: Connections taken out of use by `resize` (a store that slowed down).
        self._parked: list[sqlite3.Connection] = []
        #: Connections in use or in the pool: above `_slots` while a shrink waits for
        #: busy ones to come back.
        self._live = config.slots
        self.surveys: dict[str, Survey] = {}

    @property
    def slots(self) -> int:
        """Connection slots now (the store's true capacity is slots / work time)."""
        return self._slots

    @property
    def capacity_per_s(self) -> float:
        """The store's true capacity now: slots / mean work time."""
        return self._slots / self._work_s if self._work_s > 0 else math.inf

    @property
    def busy(self) -> int:
        """Slots in use right now."""
        return self._live - (self._pool.qsize() if self._pool is not None else self._live)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot: the store's own queue, behind the throttle."""
        return self._waiting

    async def start(self) -> None:
        """Open the slots' connections, create the schema and seed the surveys."""
        self._executor = ThreadPoolExecutor(self._slots, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        self._connections = await loop.run_in_executor(self._executor, self._open_all)
        self._pool = asyncio.Queue()
        for conn in self._connections:
            self._pool.put_nowait(conn)
        self.surveys = {survey.id: survey for survey in SURVEYS}

    def resize(self, slots: int) -> None:
        """Serve with `slots` connections from now on, at most as many as it started with:
        the store slowed down (fewer) or recovered. Busy connections beyond the new count
        are taken out as they come back; nothing running is interrupted."""
        if not 1 <= slots <= len(self._connections):
            raise ValueError(f"slots must be within [1, {len(self._connections)}], got {slots}")
        self._slots = slots
        pool = self._pool
        if pool is None:
            return
        while self._live > slots and not pool.empty():
            self._parked.append(pool.get_nowait())
            self._live -= 1
        while self._live < slots and self._parked:
            pool.put_nowait(self._parked.pop())
            self._live += 1

    def _give_back(self, conn: sqlite3.Connection) -> None:
        """A slot's connection is free again: back to the pool, or parked after a shrink."""
        if self._pool is None:
            return
        if self._live > self._slots:
            self._parked.append(conn)
            self._live -= 1
        else:
            self._pool.put_nowait(conn)

    async def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._connections:
            conn.close()
        self._connections = []
        self._parked = []
        self._pool = None

    # --- queries -----------------------------------------------------------------------

    async def add_response(
        self, tenant: str, survey_id: str, respondent: str, answers: Mapping[str, int | str]
    ) -> int:
        """Store one response and its answers; returns the response id."""

        def insert(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO responses (tenant, survey_id, respondent, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (tenant, survey_id, respondent, time.time()),
                )
                response_id = cursor.lastrowid
                assert response_id is not None
                conn.executemany(
                    "INSERT INTO answers (response_id, tenant, survey_id, question_id,"
                    " int_value, text_value) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (response_id, tenant, survey_id, question, *_split(value))
                        for question, value in answers.items()
                    ],
                )
            return response_id

        return await self._work(insert)

    async def dashboard(self, tenant: str, survey_id: str) -> dict[str, Any]:
        """A survey's results for one tenant: counts, numeric summaries, top text answers."""

        def aggregate(conn: sqlite3.Connection) -> dict[str, Any]:
            (responses,) = conn.execute(
                "SELECT COUNT(*) FROM responses WHERE tenant = ? AND survey_id = ?",
                (tenant, survey_id),
            ).fetchone()
            rows = conn.execute(
                "SELECT question_id, COUNT(*), COUNT(int_value), AVG(int_value),"
                " MIN(int_value), MAX(int_value) FROM answers"
                " WHERE tenant = ? AND survey_id = ? GROUP BY question_id"
                " ORDER BY question_id LIMIT 100",
                (tenant, survey_id),
            ).fetchall()
            top = conn.execute(
                "SELECT question_id, text_value, n FROM ("
                "  SELECT question_id, text_value, COUNT(*) AS n, ROW_NUMBER() OVER ("
                "    PARTITION BY question_id ORDER BY COUNT(*) DESC, text_value) AS rank"
                "  FROM answers WHERE tenant = ? AND survey_id = ? AND text_value IS NOT NULL"
                "  GROUP BY question_id, text_value)"
                " WHERE rank <= 3 ORDER BY question_id, rank",
                (tenant, survey_id),
            ).fetchall()
            return {"responses": responses, "rows": rows, "top": top}

        found = await self._work(aggregate)
        texts = self.surveys[survey_id].questions
        top: dict[str, list[dict[str, Any]]] = {}
        for question, text, count in found["top"]:
            top.setdefault(question, []).append({"answer": text, "count": count})
        questions = [
            {
                "question_id": question,
                "text": texts.get(question),
                "answers": answers,
                "numeric": numeric,
                "mean": round(mean, 3) if mean is not None else None,
                "min": low,
                "max": high,
                "top_answers": top.get(question, []),
            }
            for question, answers, numeric, mean, low, high in found["rows"]
        ]
        return {"survey_id": survey_id, "responses": found["responses"], "questions": questions}

    async def live_stats(self, tenant: str, survey_id: str) -> dict[str, Any]:
        """Real-time figures for one survey: totals and the last minute, by 10 s steps."""
        now = time.time()

        def recent(conn: sqlite3.Connection) -> tuple[Any, ...]:
            total, last_minute, latest = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(created_at >= ?), 0), MAX(created_at)"
                " FROM responses WHERE tenant = ? AND survey_id = ?",
                (now - 60.0, tenant, survey_id),
            ).fetchone()
            steps = conn.execute(
                "SELECT CAST((? - created_at) / 10 AS INTEGER) AS step, COUNT(*)"
                " FROM responses WHERE tenant = ? AND survey_id = ? AND created_at >= ?"
                " GROUP BY step",
                (now, tenant, survey_id, now - 60.0),
            ).fetchall()
            return total, last_minute, latest, steps

        total, last_minute, latest, steps = await self._work(recent)
        per_step = [0] * 6
        for step, count in steps:
            if 0 <= step < 6:
                per_step[5 - step] = count
        return {
            "survey_id": survey_id,
            "responses": total,
            "last_60s": last_minute,
            "per_10s": per_step,
            "latest_at": latest,
            "computed_at": now,
        }

    # --- slots -------------------------------------------------------------------------

    async def _work(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `query` on a slot's connection, holding the slot for the modelled work time."""
        pool, executor = self._pool, self._executor
        if pool is None or executor is None:
            raise RuntimeError("the store is not started")
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            conn = await pool.get()
        finally:
            self._waiting -= 1
        done_at = loop.time() + self._hold_s()
        future = executor.submit(query, conn)
        try:
            result = await asyncio.wrap_future(future)
            await asyncio.sleep(max(0.0, done_at - loop.time()))
        except asyncio.CancelledError:
            # The thread may still be using the connection: it goes back when that ends.
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._give_back, conn))
            raise
        except sqlite3.OperationalError as exc:
            self._give_back(conn)
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreBusy from exc
            raise
        except BaseException:
            self._give_back(conn)
            raise
        self._give_back(conn)
        return result

    def _hold_s(self) -> float:
        spread = self._jitter * self._work_s
        return max(0.0, self._work_s + self._rng.uniform(-spread, spread))

    def _open_all(self) -> list[sqlite3.Connection]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        first = _connect(self._path)
        # Replicas starting together race for the switch to WAL, and SQLite answers
        # "database is locked" at once rather than through the busy timeout: retry it.
        # Every statement here is idempotent, so the loser repeats it harmlessly.
        _retry_locked(lambda: first.execute("PRAGMA journal_mode=WAL"))
        _retry_locked(lambda: first.executescript(_SCHEMA))
        with _transaction(first):
            for survey in SURVEYS:
                first.execute(
                    "INSERT OR IGNORE INTO surveys (id, title) VALUES (?, ?)",
                    (survey.id, survey.title),
                )
                first.executemany(
                    "INSERT OR IGNORE INTO questions (survey_id, id, text) VALUES (?, ?, ?)",
                    [(survey.id, q, text) for q, text in survey.questions.items()],
                )
        return [first, *(_connect(self._path) for _ in range(self._slots - 1))]


def _retry_locked(step: Callable[[], object]) -> None:
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (`_transaction`), reads take no lock.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front, so the busy
    timeout applies (a deferred transaction upgrading to write can fail at once)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _split(value: int | str) -> tuple[int | None, str | None]:
    return (value, None) if isinstance(value, int) else (None, value)
