"""``JobQueue``: the public face of ``offload.jobs``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import anyio

from .. import _registry as registry
from .._task import Priority
from ..errors import InvalidTask
from ._errors import JobNotFound
from ._model import (
    STATES,
    FailedJob,
    JobInfo,
    JobStats,
    backoff_list,
    check_name,
    encode_json,
    priority_number,
    retry_on_names,
    seconds,
)
from ._runner import Executor, Runner
from ._store import NewJob, Store

__all__ = ("JobQueue",)


def open_store(url: str | os.PathLike[str], pool_size: int) -> Store:
    """The store for ``url``: ``postgresql://``/``postgres://`` or SQLite (the default)."""
    text = os.fspath(url)
    if text.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresStore

        return PostgresStore(text, pool_size=pool_size)
    if "://" in text and not text.startswith("sqlite:"):
        raise ValueError(
            f"unknown job store {text.split('://', 1)[0]!r}: use sqlite:///path/to/jobs.db "
            "or postgresql://..."
        )
    from ._sqlite import SqliteStore

    return SqliteStore(text)


class JobQueue:
    """Durable background jobs in SQLite (one host) or PostgreSQL (several hosts).

    >>> jobs = JobQueue("sqlite:///var/app/jobs.db")  # doctest: +SKIP
    >>> async with jobs:  # doctest: +SKIP
    ...     job_id = await jobs.enqueue("email:welcome", {"user": 42}, queue="emails",
    ...                                 delay=60, retries=3, backoff=[1, 5, 10], timeout=30)
    ...     async with WorkerManager(workers=4) as wm:
    ...         await jobs.work(wm, queues=["emails", "default"], concurrency=8)

    Args:
        url: ``sqlite:///absolute/path.db`` (``sqlite:relative.db``, or a plain path; options
            ``?timeout=SECONDS&synchronous=normal|full``), or a libpq URL
            ``postgresql://user@host/dbname`` (needs offload's ``postgres`` extra:
            ``pip install '.[postgres]'`` in offload's checkout).
        check_types: refuse at ``enqueue`` a type that is not registered here
            (``UNKNOWN_TASK``). Turn off in a process that enqueues jobs for workers that
            import task modules it does not.
        pool_size: PostgreSQL connections this queue may hold (plus one per worker loop, for
            ``LISTEN``).

    Entering ``async with`` opens the store and creates or upgrades its schema; it raises
    ``StoreCorrupt`` (``STORE_CORRUPT``), ``SchemaTooNew`` (``SCHEMA_TOO_NEW``),
    ``StoreLocked`` or ``StoreUnavailable`` without changing anything. One ``JobQueue`` may
    serve enqueues and ``work`` loops at once.
    """

    def __init__(
        self, url: str | os.PathLike[str], *, check_types: bool = True, pool_size: int = 4
    ) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, not {pool_size!r}")
        self._store = open_store(url, pool_size)
        self.check_types = check_types

    @property
    def url(self) -> str:
        """The store's URL, without any password."""
        return self._store.display_url

    def __repr__(self) -> str:
        state = "open" if self._store.is_open else "closed"
        return f"<JobQueue {self.url} {state}>"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Self:
        """Open the store and create or migrate its schema (``async with`` does this)."""
        if not self._store.is_open:
            await self._store.open()
        return self

    async def aclose(self) -> None:
        """Close the store's connections (waits for operations in flight)."""
        await self._store.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- producing -------------------------------------------------------------------------

    async def enqueue(
        self,
        type: str,
        data: Any = None,
        *,
        queue: str = "default",
        delay: float | timedelta = 0,
        run_at: datetime | None = None,
        retries: int = 0,
        backoff: float | timedelta | Sequence[float] = 0,
        retry_until: datetime | timedelta | float | None = None,
        retry_on: Iterable[str | type[BaseException]] | None = None,
        timeout: float | None = None,
        priority: Priority | str = "normal",
        job_id: str | None = None,
    ) -> str:
        """Store a job and return its id; a worker runs ``type`` with ``data`` later.

        >>> await jobs.enqueue("email:welcome", {"user": 42}, queue="emails", delay=60,
        ...                    retries=3, backoff=[1, 5, 10], timeout=30, priority="high",
        ...                    job_id="welcome-42")  # doctest: +SKIP
        'welcome-42'

        Args:
            type: a task type registered with ``@offload.task`` (the allow-list).
            data: JSON (dict, list, str, int, float, bool, None, nested): anything else is
                refused here (``INVALID_TASK``), never turned into something else.
            queue: the queue's name; workers take the queues they are given, in order.
            delay: seconds (or a ``timedelta``) before the job is due; or give ``run_at``,
                an aware ``datetime``.
            retries: how many times a failed attempt is tried again: at most
                ``retries + 1`` attempts.
            backoff: seconds to wait before each retry: one number, or a list per retry
                whose last value repeats (``[1, 5, 10]``: 1 s, 5 s, then 10 s each time).
            retry_until: no retry starts after this moment (an aware ``datetime``, or seconds
                / ``timedelta`` from now).
            retry_on: the errors retried: ``OffloadError`` codes (``"WORKER_CRASHED"``,
                ``"TIMEOUT"``...), ``"TASK_ERROR"`` (any exception the task raised), or
                exception classes. Default: ``("TASK_ERROR", "WORKER_CRASHED")``.
            timeout: each attempt's deadline in seconds: the work is stopped (``TIMEOUT``).
            priority: ``"high"``, ``"normal"`` or ``"low"`` within the queue.
            job_id: an idempotency key: enqueueing an id that exists returns it and stores
                nothing new (until the job is forgotten or purged).

        Raises:
            InvalidTask: ``INVALID_TASK``, a bad argument (the message says which).
            UnknownTask: ``UNKNOWN_TASK``, ``type`` is not registered (with ``check_types``).
            StoreError: ``STORE_LOCKED``, ``STORE_FULL``, ``STORE_UNAVAILABLE``...: nothing
                was stored.
        """
        check_name("type", type)
        if self.check_types:
            registry.registered(type)  # UnknownTask (UNKNOWN_TASK)
        check_name("queue", queue)
        if job_id is None:
            job_id = uuid.uuid4().hex
        check_name("job_id", job_id)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidTask(f"retries must be an int >= 0, not {retries!r}")
        delay_s = seconds("delay", delay)
        run_at_epoch: float | None = None
        if run_at is not None:
            if delay_s:
                raise InvalidTask("give delay or run_at, not both")
            run_at_epoch = _epoch("run_at", run_at)
        until_abs: float | None = None
        until_in: float | None = None
        if isinstance(retry_until, datetime):
            until_abs = _epoch("retry_until", retry_until)
        elif retry_until is not None:
            until_in = seconds("retry_until", retry_until)
        names = retry_on_names(retry_on)
        new = NewJob(
            id=job_id,
            queue=queue,
            type=type,
            data=encode_json(data),
            priority=priority_number(priority),
            retries=retries,
            backoff=encode_json(backoff_list(backoff)),
            retry_on=None if names is None else encode_json(names),
            timeout=None if timeout is None else seconds("timeout", timeout, allow_zero=False),
            delay=delay_s,
            run_at=run_at_epoch,
            retry_until_in=until_in,
            retry_until=until_abs,
        )
        await self._store.enqueue(new)
        return job_id

    # -- looking and operating -------------------------------------------------------------

    async def get(self, job_id: str) -> JobInfo | None:
        """The job ``job_id`` as stored now, or ``None`` if there is none."""
        return await self._store.get(job_id)

    async def failed(
        self, queue: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[FailedJob]:
        """Failed-job records, newest first (in ``queue``, or in every queue)."""
        _check_count("limit", limit)
        _check_count("offset", offset)
        return await self._store.failed(queue, limit, offset)

    async def retry(self, job_id: str) -> bool:
        """Queue the failed job ``job_id`` again, due now, with its attempts reset to 0.

        Returns ``False`` if there is no failed job with that id (it may be queued, running
        or done, or unknown).
        """
        return bool(await self._store.retry(job_id, None))

    async def retry_all(self, queue: str | None = None) -> int:
        """Queue every failed job (in ``queue``) again; how many."""
        return await self._store.retry(None, queue)

    async def forget(self, job_id: str) -> bool:
        """Delete the job ``job_id`` (queued, done or failed; never one running).

        Returns ``False`` if there was none to delete.
        """
        return await self._store.forget(job_id)

    async def purge(
        self,
        queue: str | None = None,
        *,
        state: str | Sequence[str] = "done",
        older_than: float | timedelta | None = None,
    ) -> int:
        """Delete finished records: ``state`` ``"done"`` (default), ``"failed"``, both, or
        ``"queued"`` (jobs not started: clears a queue). Only those finished (or, for queued,
        created) more than ``older_than`` seconds ago, when given. Returns how many.
        Running jobs are never purged."""
        states = [state] if isinstance(state, str) else list(state)
        for s in states:
            if s not in STATES or s == "running":
                raise InvalidTask(f"purge takes the states queued, done and failed, not {s!r}")
        older = None if older_than is None else seconds("older_than", older_than)
        return await self._store.purge(queue, states, older)

    async def stats(self) -> JobStats:
        """Counts per queue and state, the oldest due job's age, and unrunnable types."""
        return await self._store.stats()

    async def require(self, job_id: str) -> JobInfo:
        """Like ``get``, but raises ``JobNotFound`` (``JOB_NOT_FOUND``)."""
        info = await self.get(job_id)
        if info is None:
            raise JobNotFound(f"no job has the id {job_id!r}")
        return info

    # -- consuming -------------------------------------------------------------------------

    async def work(
        self,
        manager: Executor,
        queues: Sequence[str] = ("default",),
        *,
        concurrency: int = 8,
        once: bool = False,
        lease: float = 30.0,
        grace: float = 30.0,
        poll_interval: float = 30.0,
        stop: anyio.Event | None = None,
    ) -> int:
        """Run jobs from ``queues`` on ``manager`` until cancelled (or drained, with ``once``).

        >>> async with WorkerManager(workers=4) as wm:  # doctest: +SKIP
        ...     await jobs.work(wm, queues=["emails", "default"], concurrency=8)

        Queues are taken in the order given, then by priority, due time and arrival. The
        worker sleeps until a job may be due (a notification from an enqueue, the next
        delayed job's time, an expired lease) and looks at the store at least every
        ``poll_interval`` seconds anyway.

        Args:
            manager: an ``offload.WorkerManager`` (anything with ``execute_task``).
            concurrency: jobs held at once (they wait in the manager's queue for a worker).
            once: take every job due now (and those that become due meanwhile), then return
                when none is due and none is running: for cron.
            lease: seconds a claim lasts without renewal; renewed every ``lease / 3``. A job
                whose host dies comes back this long after its last renewal.
            grace: when ``stop`` is set, how long running jobs may take to finish before they
                are stopped and handed back (queued again, the attempt not counted).
            stop: set it to stop gracefully; cancelling ``work`` hands running jobs back at
                once instead.

        Returns the number of jobs this call completed (``done``).

        Raises:
            StoreCorrupt, SchemaTooNew, ...: a store error that retrying will not cure
                (transient ones, such as ``STORE_LOCKED``, are logged and retried).
        """
        queue_list = [queues] if isinstance(queues, str) else list(queues)
        if not queue_list:
            raise ValueError("work needs at least one queue")
        for queue in queue_list:
            check_name("queue", queue)
        _check_count("concurrency", concurrency, low=1)
        for name, value in (("lease", lease), ("poll_interval", poll_interval)):
            seconds(name, value, allow_zero=False)
        seconds("grace", grace)
        runner = Runner(
            self._store,
            manager,
            queue_list,
            concurrency=concurrency,
            once=once,
            lease=float(lease),
            grace=float(grace),
            poll_interval=float(poll_interval),
            stop=stop,
        )
        try:
            return await runner.run()
        except BaseExceptionGroup as group:
            single = _single(group)
            if single is None:
                raise
            raise single from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one real error in a task group's exception group, if there is exactly one."""
    cancelled = anyio.get_cancelled_exc_class()
    errors = [exc for exc in _leaves(group) if not isinstance(exc, cancelled)]
    return errors[0] if len(errors) == 1 else None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _epoch(what: str, when: datetime) -> float:
    if when.tzinfo is None:
        raise InvalidTask(f"{what} must be an aware datetime (with a tzinfo, such as UTC)")
    return when.timestamp()


def _check_count(what: str, value: object, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, not {value!r}")
