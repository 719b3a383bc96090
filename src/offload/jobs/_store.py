"""The store interface, and the SQL both stores share.

A store is one table (``offload_jobs``) plus a version row (``offload_jobs_meta``). Every
operation is one short statement (or a few) on a blocking DB-API connection, run in a worker
thread through ``anyio.to_thread`` with a ``CapacityLimiter`` as wide as the store's
connection pool, so the event loop never blocks and the same code runs on asyncio and trio.

A job's life in the table::

    enqueue ─► queued ─claim─► running ─┬─► done
                 ▲                      ├─► queued   (a retry: run_at = now + backoff)
                 │                      ├─► failed   (the last attempt, or not retryable)
                 └──── lease expired ◄──┘            (the host died: counts an attempt)

``claim`` sets a random ``token`` and a lease (``lease_until``); every later write about that
run names the token, so a worker that lost its lease can no longer change the job.

Times are seconds since the epoch on the store's clock: the host's for SQLite, the server's
for PostgreSQL (its offset to this host is measured when the store opens and now and then
after), so leases mean the same on every host.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

import anyio

from ._errors import SchemaTooNew
from ._model import (
    STATES,
    FailedJob,
    JobInfo,
    JobStats,
    QueueStats,
    Unrunnable,
    priority_name,
    to_datetime,
)

__all__ = ("SCHEMA_VERSION", "Claimed", "ClaimResult", "NewJob", "Outcome", "Store", "Subscription")

log = logging.getLogger("offload.jobs")

T = TypeVar("T")

#: The schema this offload writes. A store at a higher version is refused (SCHEMA_TOO_NEW).
SCHEMA_VERSION: Final = 1

COLUMNS: Final = (
    "id",
    "queue",
    "type",
    "data",
    "state",
    "priority",
    "attempts",
    "retries",
    "backoff",
    "retry_until",
    "retry_on",
    "timeout",
    "created_at",
    "run_at",
    "started_at",
    "finished_at",
    "worker",
    "error_code",
    "error_type",
    "error",
    "traceback",
    "result",
)
_SELECT: Final = ", ".join(COLUMNS)


@dataclass(frozen=True, slots=True)
class NewJob:
    """What ``enqueue`` stores; relative times are resolved on the store's clock."""

    id: str
    queue: str
    type: str
    data: str  # JSON text
    priority: int
    retries: int
    backoff: str  # JSON list of seconds
    retry_on: str | None  # JSON list of names, or None for the default
    timeout: float | None
    delay: float  # seconds from now, or...
    run_at: float | None  # ... an absolute epoch
    retry_until_in: float | None  # seconds from now, or...
    retry_until: float | None  # ... an absolute epoch


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job a worker holds: what it runs, and what it needs to decide about a failure."""

    id: str
    queue: str
    type: str
    data: Any
    priority: int
    attempts: int
    retries: int
    backoff: list[float]
    retry_on: list[str] | None
    timeout: float | None
    token: str
    run_at: float
    seq: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    jobs: list[Claimed]
    #: Seconds until the next queued job in these queues is due, or a lease there expires;
    #: ``None`` when nothing is waiting (only computed when fewer jobs than asked were due).
    next_in: float | None
    #: How many leases had expired and were taken back (their jobs requeued or failed).
    reaped: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one run ended. ``kind``: done, retry, failed or release (no attempt counted)."""

    id: str
    token: str
    kind: str
    result: str | None = None
    delay: float = 0.0
    error_code: str | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None


class Subscription(abc.ABC):
    """A worker's doorbell: ``wait`` returns when a job may have become due."""

    @abc.abstractmethod
    async def wait(self) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class Store(abc.ABC):
    """One store behind ``JobQueue``: the SQL is shared, subclasses give the dialect."""

    #: ``?`` for sqlite3, ``%s`` for psycopg: named parameters are written ``:name`` here.
    named_params_pct: bool = False
    #: Added to the claim's row selection (``FOR UPDATE SKIP LOCKED`` on PostgreSQL).
    claim_lock: str = ""
    #: How many operations may run at once (the connection pool's size).
    width: int = 1

    def __init__(self, display_url: str) -> None:
        self.display_url = display_url  # the URL without its password
        self._limiter: anyio.CapacityLimiter | None = None
        self._sql_cache: dict[str, str] = {}
        self._enqueues: Batcher[NewJob, bool] = Batcher(self, self._insert_many)
        self._finishes: Batcher[Outcome, str | None] = Batcher(self, self._finish_many)

    # -- dialect ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _connect_all(self) -> None:
        """Open the connection(s); raise a ``StoreError`` saying why not."""

    @abc.abstractmethod
    def _close_all(self) -> None: ...

    @abc.abstractmethod
    def _with_connection(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` on a free connection, mapping driver errors to ``StoreError``."""

    @abc.abstractmethod
    def _migrate(self, conn: Any) -> None:
        """Create or upgrade the schema under a lock; ``SchemaTooNew`` if it is newer."""

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds since the epoch on the store's clock."""

    @abc.abstractmethod
    def in_list(self, column: str, param: str) -> str:
        """SQL for ``column IN (the list bound to :param)``."""

    @abc.abstractmethod
    def list_param(self, values: Sequence[str]) -> Any: ...

    @abc.abstractmethod
    def _insert(self, conn: Any, sql: str, params: dict[str, Any]) -> set[str]:
        """Run the INSERT (``... ON CONFLICT DO NOTHING RETURNING id, queue``) and wake
        workers; the ids inserted."""

    @abc.abstractmethod
    def _wake(self, conn: Any, queues: Sequence[str]) -> None:
        """Tell waiting workers that jobs in ``queues`` became due (once the write commits)."""

    @abc.abstractmethod
    def _transaction(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        """A write transaction: committed on success, rolled back on an error."""

    def _pipeline(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """Send statements without waiting for each answer (PostgreSQL's pipeline mode)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    async def subscribe(self) -> Subscription:
        """A doorbell for one worker loop, listening from now on."""

    # -- plumbing --------------------------------------------------------------------------

    def sql(self, text: str) -> str:
        if not self.named_params_pct:
            return text
        cached = self._sql_cache.get(text)
        if cached is None:
            cached = re.sub(r"(?<![:\w]):([a-z_][a-z0-9_]*)", r"%(\1)s", text)
            self._sql_cache[text] = cached
        return cached

    def execute(self, conn: Any, text: str, params: dict[str, Any] | None = None) -> Any:
        return conn.execute(self.sql(text), params or {})

    async def _run(self, fn: Callable[[Any], T]) -> T:
        limiter = self._limiter
        if limiter is None:
            raise RuntimeError(
                f"the job store {self.display_url} is not open: "
                "use `async with JobQueue(...)` (or `await jobs.open()`)"
            )
        return await anyio.to_thread.run_sync(self._with_connection, fn, limiter=limiter)

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._connect_all)
        self._limiter = anyio.CapacityLimiter(self.width)
        try:
            await self._run(self._migrate)
        except BaseException:
            self._limiter = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_all)
            raise

    async def aclose(self) -> None:
        if self._limiter is None:
            return
        limiter, self._limiter = self._limiter, None
        # Wait for operations in flight, then close (shielded: nothing is left open).
        with anyio.CancelScope(shield=True):
            async with limiter:
                await anyio.to_thread.run_sync(self._close_all)

    @property
    def is_open(self) -> bool:
        return self._limiter is not None

    def check_version(self, found: int | None) -> None:
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the job store {self.display_url} has schema version {found}, and this "
                f"offload knows versions up to {SCHEMA_VERSION}: upgrade offload. "
                "Nothing was changed."
            )

    # -- the operations --------------------------------------------------------------------

    async def enqueue(self, job: NewJob) -> bool:
        """Store ``job``; False if a job with its id exists (nothing stored).

        Concurrent calls share one statement and one commit (group commit).
        """
        return await self._enqueues.submit(job)

    def _insert_many(self, conn: Any, values: list[NewJob]) -> list[bool]:
        jobs = values
        now = self.now()
        rows: list[str] = []
        params: dict[str, Any] = {"now": now}
        first: dict[str, int] = {}
        for i, job in enumerate(jobs):
            if job.id in first:
                continue  # the same id twice in one batch: the first one wins
            first[job.id] = i
            rows.append(_VALUES.format(i=i))
            params.update(
                {
                    f"id_{i}": job.id,
                    f"queue_{i}": job.queue,
                    f"type_{i}": job.type,
                    f"data_{i}": job.data,
                    f"priority_{i}": job.priority,
                    f"retries_{i}": job.retries,
                    f"backoff_{i}": job.backoff,
                    f"retry_on_{i}": job.retry_on,
                    f"timeout_{i}": job.timeout,
                    f"run_at_{i}": job.run_at if job.run_at is not None else now + job.delay,
                    f"retry_until_{i}": (
                        job.retry_until
                        if job.retry_until is not None
                        else (None if job.retry_until_in is None else now + job.retry_until_in)
                    ),
                }
            )
        inserted = self._insert(conn, _INSERT.format(values=", ".join(rows)), params)
        return [job.id in inserted and first[job.id] == i for i, job in enumerate(jobs)]

    async def claim(
        self,
        queues: Sequence[str],
        types: Sequence[str],
        limit: int,
        worker: str,
        lease: float,
    ) -> ClaimResult:
        """Reap expired leases in ``queues``, then take up to ``limit`` due jobs of ``types``,
        queue by queue in the order given, then by priority, due time and arrival."""

        def claim(conn: Any) -> ClaimResult:
            # Pipelined on PostgreSQL: with one queue the whole transaction is one round trip.
            with self._pipeline(conn), self._transaction(conn):
                return claim_in(conn)

        def claim_in(conn: Any) -> ClaimResult:
            now = self.now()
            qlist = self.list_param(queues)
            tlist = self.list_param(types)
            reap = self.execute(
                conn,
                _REAP.format(queues=self.in_list("queue", "queues")),
                {"now": now, "queues": qlist, "message": _LEASE_MESSAGE},
            )
            token = uuid.uuid4().hex
            jobs: list[Claimed] = []
            pending = []
            for queue in queues:
                if len(jobs) >= limit:
                    break
                cur = self.execute(
                    conn,
                    _CLAIM.format(types=self.in_list("type", "types"), lock=self.claim_lock),
                    {
                        "now": now,
                        "queue": queue,
                        "types": tlist,
                        "limit": limit - len(jobs),
                        "token": token,
                        "worker": worker,
                        "lease_until": now + lease,
                    },
                )
                if len(queues) == 1:
                    pending.append(cur)  # fetched below, with the rest of the pipeline
                    break
                got = [_claimed(row, token) for row in cur.fetchall()]
                got.sort(key=lambda j: (j.priority, j.run_at, j.seq))
                jobs.extend(got)
            for cur in pending:
                got = [_claimed(row, token) for row in cur.fetchall()]
                got.sort(key=lambda j: (j.priority, j.run_at, j.seq))
                jobs.extend(got)
            reaped = reap.fetchall()
            requeued = [r[1] for r in reaped if r[2] == "queued"]
            for job_id, queue, state in reaped:
                log.warning(
                    "job %r in queue %r: its lease expired (the host running it died or lost "
                    "the store); it is %s",
                    job_id,
                    queue,
                    "queued again" if state == "queued" else "failed (no attempts left)",
                )
            if requeued:
                self._wake(conn, requeued)
            next_in = None
            if len(jobs) < limit:  # nothing more is due: when will something be?
                params: dict[str, Any] = {"queues": qlist, "types": tlist}
                parts = []
                for i, queue in enumerate(queues):
                    params[f"q_{i}"] = queue
                    parts.append(_NEXT_DUE.format(i=i, types=self.in_list("type", "types")))
                sql = _NEXT.format(due=", ".join(parts), queues=self.in_list("queue", "queues"))
                times = [t for t in self.execute(conn, sql, params).fetchone() if t is not None]
                if times:
                    next_in = max(0.0, min(times) - self.now())
            return ClaimResult(jobs, next_in, len(reaped))

        return await self._run(claim)

    async def renew(self, tokens: Sequence[str], lease: float) -> set[tuple[str, str]]:
        """Extend the leases of the jobs held under ``tokens``; the (id, token) still held."""

        def renew(conn: Any) -> set[tuple[str, str]]:
            rows = self.execute(
                conn,
                _RENEW.format(tokens=self.in_list("token", "tokens")),
                {"tokens": self.list_param(tokens), "lease_until": self.now() + lease},
            ).fetchall()
            return {(row[0], row[1]) for row in rows}

        return await self._run(renew)

    async def finish(self, outcome: Outcome) -> str | None:
        """Record how a run ended; the job's new state, or ``None`` if the lease was lost.

        Concurrent calls share one transaction (group commit).
        """
        return await self._finishes.submit(outcome)

    def _finish_many(self, conn: Any, values: list[Outcome]) -> list[str | None]:
        outcomes = values
        states: list[str | None] = []
        with self._pipeline(conn), self._transaction(conn):
            now = self.now()
            requeued: set[str] = set()
            cursors = []
            done = [o for o in outcomes if o.kind == "done"]
            done_states: dict[str, str] = {}
            if done:  # one statement for every job that succeeded
                params: dict[str, Any] = {"now": now}
                rows = []
                for i, o in enumerate(done):
                    params.update({f"id_{i}": o.id, f"token_{i}": o.token, f"result_{i}": o.result})
                    rows.append(f"(:id_{i}, :token_{i}, :result_{i})")
                for job_id, state in self.execute(
                    conn, _DONE_MANY.format(values=", ".join(rows)), params
                ).fetchall():
                    done_states[job_id] = state
            for outcome in outcomes:
                params = {"id": outcome.id, "token": outcome.token, "now": now}
                if outcome.kind == "done":
                    continue
                if outcome.kind == "release":
                    cursors.append(self.execute(conn, _RELEASE, params))
                else:
                    params.update(
                        retry=1 if outcome.kind == "retry" else 0,
                        delay=outcome.delay,
                        error_code=outcome.error_code,
                        error_type=outcome.error_type,
                        error=outcome.error,
                        traceback=outcome.traceback,
                    )
                    cursors.append(self.execute(conn, _FAIL, params))
            others = iter(cursors)
            for outcome in outcomes:
                if outcome.kind == "done":
                    states.append(done_states.get(outcome.id))
                    continue
                row = next(others).fetchone()
                states.append(None if row is None else row[0])
                if row is not None and row[0] == "queued":
                    requeued.add(row[1])
            if requeued:
                self._wake(conn, sorted(requeued))
        return states

    async def note_unrunnable(
        self, queues: Sequence[str], types: Sequence[str], worker: str
    ) -> list[tuple[str, str]]:
        """Mark due jobs in ``queues`` whose type is not in ``types`` with ``UNKNOWN_TASK``
        (they stay queued); the (queue, type) pairs newly marked."""

        def note(conn: Any) -> list[tuple[str, str]]:
            with self._transaction(conn):
                return note_in(conn)

        def note_in(conn: Any) -> list[tuple[str, str]]:
            params = {
                "now": self.now(),
                "queues": self.list_param(queues),
                "types": self.list_param(types),
            }
            pairs = self.execute(
                conn,
                _UNRUNNABLE.format(
                    queues=self.in_list("queue", "queues"), types=self.in_list("type", "types")
                ),
                params,
            ).fetchall()
            for queue, type_ in pairs:
                message = (
                    f"[UNKNOWN_TASK] no task type {type_!r} is registered in worker {worker}: "
                    "the job stays queued until a worker that registers it takes it "
                    "(import the module that defines it: offload jobs work --import ...)"
                )
                self.execute(
                    conn,
                    _MARK_UNRUNNABLE,
                    {**params, "queue": queue, "type": type_, "message": message},
                )
            return [(q, t) for q, t in pairs]

        return await self._run(note)

    async def get(self, job_id: str) -> JobInfo | None:
        def get(conn: Any) -> JobInfo | None:
            row = self.execute(
                conn, f"SELECT {_SELECT} FROM offload_jobs WHERE id = :id", {"id": job_id}
            ).fetchone()
            return None if row is None else _info(row)

        return await self._run(get)

    async def failed(self, queue: str | None, limit: int, offset: int) -> list[FailedJob]:
        def failed(conn: Any) -> list[FailedJob]:
            where = "state = 'failed'" + ("" if queue is None else " AND queue = :queue")
            rows = self.execute(
                conn,
                f"SELECT {_SELECT} FROM offload_jobs WHERE {where} "
                "ORDER BY finished_at DESC, seq DESC LIMIT :limit OFFSET :offset",
                {"queue": queue, "limit": limit, "offset": offset},
            ).fetchall()
            return [_failed(row) for row in rows]

        return await self._run(failed)

    async def retry(self, job_id: str | None, queue: str | None) -> int:
        """Queue failed jobs again with fresh attempts: one by id, or all (in ``queue``)."""

        def retry(conn: Any) -> int:
            with self._transaction(conn):
                return retry_in(conn)

        def retry_in(conn: Any) -> int:
            where = "state = 'failed'"
            if job_id is not None:
                where += " AND id = :id"
            if queue is not None:
                where += " AND queue = :queue"
            rows = self.execute(
                conn,
                "UPDATE offload_jobs SET state = 'queued', attempts = 0, run_at = :now, "
                "finished_at = NULL, started_at = NULL, error_code = NULL, error_type = NULL, "
                f"error = NULL, traceback = NULL WHERE {where} RETURNING queue",
                {"now": self.now(), "id": job_id, "queue": queue},
            ).fetchall()
            if rows:
                self._wake(conn, sorted({row[0] for row in rows}))
            return len(rows)

        return await self._run(retry)

    async def forget(self, job_id: str) -> bool:
        def forget(conn: Any) -> bool:
            cur = self.execute(
                conn,
                "DELETE FROM offload_jobs WHERE id = :id AND state <> 'running'",
                {"id": job_id},
            )
            return bool(cur.rowcount)

        return await self._run(forget)

    async def purge(
        self, queue: str | None, states: Sequence[str], older_than: float | None
    ) -> int:
        def purge(conn: Any) -> int:
            where = self.in_list("state", "states")
            params: dict[str, Any] = {"states": self.list_param(states), "queue": queue}
            if queue is not None:
                where += " AND queue = :queue"
            if older_than is not None:
                where += " AND COALESCE(finished_at, created_at) < :cutoff"
                params["cutoff"] = self.now() - older_than
            cur = self.execute(conn, f"DELETE FROM offload_jobs WHERE {where}", params)
            return int(cur.rowcount)

        return await self._run(purge)

    async def stats(self) -> JobStats:
        def stats(conn: Any) -> JobStats:
            now = self.now()
            rows = self.execute(conn, _STATS, {"now": now}).fetchall()
            counts: dict[str, dict[str, Any]] = {}
            for queue, state, n, due, oldest in rows:
                entry = counts.setdefault(
                    queue, dict.fromkeys(STATES, 0) | {"due": 0, "oldest": None}
                )
                if state in STATES:
                    entry[state] = int(n)
                entry["due"] += int(due or 0)
                if oldest is not None:
                    entry["oldest"] = oldest
            queues = {
                name: QueueStats(
                    queued=c["queued"],
                    due=c["due"],
                    delayed=c["queued"] - c["due"],
                    running=c["running"],
                    done=c["done"],
                    failed=c["failed"],
                    oldest_due_age=None if c["oldest"] is None else max(0.0, now - c["oldest"]),
                )
                for name, c in sorted(counts.items())
            }
            ages = [q.oldest_due_age for q in queues.values() if q.oldest_due_age is not None]
            unrunnable = tuple(
                Unrunnable(queue, type_, int(n), error or "")
                for queue, type_, n, error in self.execute(conn, _STATS_UNRUNNABLE).fetchall()
            )
            return JobStats(queues, max(ages) if ages else None, unrunnable)

        return await self._run(stats)


# -- SQL --------------------------------------------------------------------------------------

_INSERT: Final = (
    "INSERT INTO offload_jobs (id, queue, type, data, state, priority, attempts, retries, "
    "backoff, retry_until, retry_on, timeout, created_at, run_at) VALUES {values} "
    "ON CONFLICT (id) DO NOTHING RETURNING id, queue"
)
_VALUES: Final = (
    "(:id_{i}, :queue_{i}, :type_{i}, :data_{i}, 'queued', :priority_{i}, 0, :retries_{i}, "
    ":backoff_{i}, :retry_until_{i}, :retry_on_{i}, :timeout_{i}, :now, :run_at_{i})"
)

_LEASE_MESSAGE: Final = (
    "[LEASE_EXPIRED] the worker running this job stopped renewing its lease: its host died "
    "(SIGKILL, power loss) or lost the store"
)

# Expired leases: back to the queue while attempts remain (the lost run counted one).
_REAP_OK: Final = "(attempts <= retries AND (retry_until IS NULL OR retry_until >= :now))"
_REAP: Final = (
    "UPDATE offload_jobs SET "
    f"state = CASE WHEN {_REAP_OK} THEN 'queued' ELSE 'failed' END, "
    f"finished_at = CASE WHEN {_REAP_OK} THEN NULL ELSE :now END, "
    "token = NULL, lease_until = NULL, error_code = 'LEASE_EXPIRED', "
    "error_type = 'offload.jobs.LeaseExpired', error = :message, traceback = '' "
    "WHERE state = 'running' AND lease_until < :now AND {queues} "
    "RETURNING id, queue, state"
)

_CLAIM: Final = (
    "WITH picked AS MATERIALIZED (SELECT seq FROM offload_jobs WHERE state = 'queued' "
    "AND queue = :queue AND run_at <= :now AND {types} ORDER BY priority, run_at, seq "
    "LIMIT :limit {lock}) "
    "UPDATE offload_jobs SET state = 'running', attempts = attempts + 1, token = :token, "
    "worker = :worker, lease_until = :lease_until, started_at = :now, "
    "error_code = CASE WHEN error_code = 'UNKNOWN_TASK' THEN NULL ELSE error_code END "
    "WHERE seq IN (SELECT seq FROM picked) "
    "RETURNING id, queue, type, data, priority, attempts, retries, backoff, retry_on, timeout, "
    "run_at, seq"
)

# The next due time per queue (each an index scan that stops at its first row), and the
# first lease to expire.
_NEXT_DUE: Final = (
    "(SELECT run_at FROM offload_jobs WHERE state = 'queued' AND queue = :q_{i} AND {types} "
    "ORDER BY run_at LIMIT 1)"
)
_NEXT: Final = (
    "SELECT {due}, (SELECT MIN(lease_until) FROM offload_jobs WHERE state = 'running' AND {queues})"
)

_RENEW: Final = (
    "UPDATE offload_jobs SET lease_until = :lease_until "
    "WHERE state = 'running' AND {tokens} RETURNING id, token"
)

_MINE: Final = "WHERE id = :id AND token = :token AND state = 'running'"

_DONE_MANY: Final = (
    "WITH v (id, token, result) AS (VALUES {values}) "
    "UPDATE offload_jobs SET state = 'done', finished_at = :now, result = v.result, "
    "error_code = NULL, error_type = NULL, error = NULL, traceback = NULL, token = NULL, "
    "lease_until = NULL FROM v WHERE offload_jobs.id = v.id AND offload_jobs.token = v.token "
    "AND offload_jobs.state = 'running' RETURNING offload_jobs.id, offload_jobs.state"
)

_RELEASE: Final = (
    "UPDATE offload_jobs SET state = 'queued', attempts = attempts - 1, token = NULL, "
    f"lease_until = NULL, started_at = NULL {_MINE} RETURNING state, queue"
)

_RETRY_OK: Final = "(:retry = 1 AND (retry_until IS NULL OR :now + :delay <= retry_until))"
_FAIL: Final = (
    "UPDATE offload_jobs SET "
    f"state = CASE WHEN {_RETRY_OK} THEN 'queued' ELSE 'failed' END, "
    f"run_at = CASE WHEN {_RETRY_OK} THEN :now + :delay ELSE run_at END, "
    f"finished_at = CASE WHEN {_RETRY_OK} THEN NULL ELSE :now END, "
    "error_code = :error_code, error_type = :error_type, error = :error, "
    f"traceback = :traceback, token = NULL, lease_until = NULL {_MINE} RETURNING state, queue"
)

_UNRUNNABLE: Final = (
    "SELECT DISTINCT queue, type FROM offload_jobs WHERE state = 'queued' AND run_at <= :now "
    "AND {queues} AND NOT {types} AND (error_code IS NULL OR error_code <> 'UNKNOWN_TASK')"
)
_MARK_UNRUNNABLE: Final = (
    "UPDATE offload_jobs SET error_code = 'UNKNOWN_TASK', "
    "error_type = 'offload.errors.UnknownTask', error = :message "
    "WHERE state = 'queued' AND run_at <= :now AND queue = :queue AND type = :type "
    "AND (error_code IS NULL OR error_code <> 'UNKNOWN_TASK')"
)

_STATS: Final = (
    "SELECT queue, state, COUNT(*), "
    "SUM(CASE WHEN state = 'queued' AND run_at <= :now THEN 1 ELSE 0 END), "
    "MIN(CASE WHEN state = 'queued' AND run_at <= :now THEN run_at END) "
    "FROM offload_jobs GROUP BY queue, state"
)
_STATS_UNRUNNABLE: Final = (
    "SELECT queue, type, COUNT(*), MAX(error) FROM offload_jobs "
    "WHERE state = 'queued' AND error_code = 'UNKNOWN_TASK' GROUP BY queue, type "
    "ORDER BY queue, type"
)


X = TypeVar("X")
R = TypeVar("R")


class Batcher(Generic[X, R]):
    """Group commit: concurrent ``submit`` calls share one ``write`` (one transaction).

    No background task: the first caller to find no writer becomes the writer, writes what is
    waiting (up to ``limit`` items a time) until its own item is written, then steps down;
    whoever is still waiting takes over. The write runs in a thread and is shielded, so a
    cancelled writer finishes its batch (and its callers hear the outcome) before it leaves.
    If the batch fails, every item in it gets the error: nothing of it was stored.
    """

    def __init__(self, store: Store, write: Callable[..., list[R]], limit: int = 256) -> None:
        self.store = store
        self.write = write
        self.limit = limit
        self.waiting: list[_Item[X, R]] = []
        self.writing = False
        self.round: anyio.Event | None = None  # set when a batch is written

    async def submit(self, value: X) -> R:
        item: _Item[X, R] = _Item(value)
        self.waiting.append(item)
        while not item.done:
            if self.writing:
                if self.round is None:
                    self.round = anyio.Event()
                await self.round.wait()
                continue
            self.writing = True
            try:
                while not item.done:
                    batch, self.waiting = self.waiting[: self.limit], self.waiting[self.limit :]
                    values = [it.value for it in batch]
                    with anyio.CancelScope(shield=True):
                        try:
                            results = await self.store._run(partial(self.write, values=values))
                        except Exception as exc:
                            for it in batch:
                                it.error, it.done = exc, True
                        else:
                            for it, result in zip(batch, results, strict=True):
                                it.result, it.done = result, True
            finally:
                self.writing = False
                if self.round is not None:
                    self.round.set()
                    self.round = None
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]


class _Item(Generic[X, R]):
    __slots__ = ("done", "error", "result", "value")

    def __init__(self, value: X) -> None:
        self.value = value
        self.done = False
        self.result: R | None = None
        self.error: Exception | None = None


def _claimed(row: Sequence[Any], token: str) -> Claimed:
    (job_id, queue, type_, data, priority, attempts, retries, backoff, retry_on, timeout) = row[:10]
    return Claimed(
        id=job_id,
        queue=queue,
        type=type_,
        data=json.loads(data),
        priority=int(priority),
        attempts=int(attempts),
        retries=int(retries),
        backoff=[float(x) for x in json.loads(backoff)],
        retry_on=None if retry_on is None else list(json.loads(retry_on)),
        timeout=None if timeout is None else float(timeout),
        token=token,
        run_at=float(row[10]),
        seq=int(row[11]),
    )


def _row(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(COLUMNS, row, strict=True))


def _error_text(r: dict[str, Any]) -> str | None:
    if r["error"] is None:
        return None
    if r["error_type"]:
        return f"{r['error_type']}: {r['error']}"
    return str(r["error"])


def _info(row: Sequence[Any]) -> JobInfo:
    r = _row(row)
    created = to_datetime(r["created_at"])
    run_at = to_datetime(r["run_at"])
    assert created is not None
    assert run_at is not None
    return JobInfo(
        id=r["id"],
        queue=r["queue"],
        type=r["type"],
        data=json.loads(r["data"]),
        state=r["state"],
        attempts=int(r["attempts"]),
        error=_error_text(r),
        result=None if r["result"] is None else json.loads(r["result"]),
        created_at=created,
        run_at=run_at,
        finished_at=to_datetime(r["finished_at"]),
        priority=priority_name(int(r["priority"])),
        retries=int(r["retries"]),
        timeout=None if r["timeout"] is None else float(r["timeout"]),
        started_at=to_datetime(r["started_at"]),
        error_code=r["error_code"],
        worker=r["worker"],
    )


def _failed(row: Sequence[Any]) -> FailedJob:
    r = _row(row)
    failed_at = to_datetime(r["finished_at"])
    assert failed_at is not None
    return FailedJob(
        id=r["id"],
        queue=r["queue"],
        type=r["type"],
        data=json.loads(r["data"]),
        attempts=int(r["attempts"]),
        retries=int(r["retries"]),
        error_type=r["error_type"] or "",
        message=r["error"] or "",
        traceback=r["traceback"] or "",
        failed_at=failed_at,
        error_code=r["error_code"],
    )


def monotonic() -> float:
    return time.monotonic()
