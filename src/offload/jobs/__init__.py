"""Durable background jobs: named queues, delays, retries with backoff, failed-job records.

Jobs are stored (SQLite on one host, PostgreSQL across hosts) and run by an
``offload.WorkerManager``, so each one gets a deadline that stops the work and crash
isolation::

    from offload import WorkerManager
    from offload.jobs import JobQueue

    jobs = JobQueue("sqlite:///var/app/jobs.db")
    async with jobs:
        await jobs.enqueue("email:welcome", {"user": 42}, queue="emails", retries=3)
        async with WorkerManager(workers=4) as wm:
            await jobs.work(wm, queues=["emails", "default"], concurrency=8)

Semantics: at least once. A worker claims a job with a lease, renews it while the job runs
and records the outcome; the job of a host that died comes back when its lease expires (that
counts an attempt). A job names a registered task type and carries JSON data: nothing is
unpickled from the store. The command line: ``offload jobs --help``.

Layers: ``JobQueue`` (``_queue``) over a ``Store`` (``_store``: the shared SQL; ``_sqlite``,
``_postgres``: connections, locks, wake-ups) and the worker loop (``_runner``).
"""

from ._errors import (
    JobNotFound,
    LeaseExpired,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreUnavailable,
)
from ._model import (
    DEFAULT_RETRY_ON,
    STATES,
    TASK_ERROR,
    FailedJob,
    JobInfo,
    JobState,
    JobStats,
    QueueStats,
    Unrunnable,
)
from ._queue import JobQueue
from ._store import SCHEMA_VERSION

__all__ = (
    "JobQueue",
    "JobInfo",
    "FailedJob",
    "JobStats",
    "QueueStats",
    "Unrunnable",
    "JobState",
    "STATES",
    "TASK_ERROR",
    "DEFAULT_RETRY_ON",
    "SCHEMA_VERSION",
    "StoreError",
    "StoreLocked",
    "StoreCorrupt",
    "StoreFull",
    "StoreUnavailable",
    "SchemaTooNew",
    "JobNotFound",
    "LeaseExpired",
)
