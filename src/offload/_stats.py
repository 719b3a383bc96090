"""Frozen snapshots a manager hands out, and the counters behind them.

``Stats`` (``wm.stats()``), ``TaskRecord`` (``on_task_done``), ``WorkerInfo``
(``wm.worker_statistics()``) and ``Progress`` (``on_progress``) are frozen: a caller may keep
them, compare them, pass them to another thread.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ("BUCKETS", "Progress", "Stats", "StatsRecorder", "TaskRecord", "WorkerInfo")

_SAMPLES: Final = 4096  # the percentiles describe the most recent tasks

#: Upper bounds (seconds) of the wait and run time histograms (Prometheus-style, cumulative).
BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a manager. Times are in seconds; percentiles cover the last 4096 tasks.

    >>> s = wm.stats()  # doctest: +SKIP
    >>> s.completed, s.queued, s.wait_p99  # doctest: +SKIP
    (120, 3, 0.0021)
    """

    kind: str
    workers: int  #: workers ready to take work
    spares: int  #: warm spare workers, ready to take a lost or recycled worker's slot
    running: int  #: tasks workers hold right now (running, or next in line there)
    queued: int  #: tasks waiting in the queue
    queued_by_priority: Mapping[str, int] = field(default_factory=dict)
    submitted: int = 0  #: accepted tasks (after validation and admission)
    completed: int = 0  #: returned a result
    failed: int = 0  #: raised, or their result could not come back
    timed_out: int = 0  #: TIMEOUT (including queued tasks dropped as unable to meet it)
    cancelled: int = 0  #: their caller was cancelled
    rejected: int = 0  #: QUEUE_FULL or WOULD_TIME_OUT at submit (not counted in ``submitted``)
    crashed: int = 0  #: WORKER_CRASHED
    shutdown: int = 0  #: cancelled by shutdown (SHUTDOWN)
    inline: int = 0  #: ran on the event loop's thread (``inline_below``)
    worker_restarts: int = 0  #: workers replaced after a crash, a kill or a quarantine
    worker_recycles: int = 0  #: workers replaced by policy (task count, memory, age)
    retried: int = 0  #: retry attempts made under a ``Retry`` policy
    min_workers: int = 0  #: the pool's lower bound (equal to ``max_workers`` when fixed)
    max_workers: int = 0  #: the pool's upper bound
    workers_started: int = 0  #: workers started, ever
    workers_retired: int = 0  #: workers retired for being idle (a pool that scales)
    wait_p50: float = 0.0
    wait_p95: float = 0.0
    wait_p99: float = 0.0
    run_p50: float = 0.0
    run_p95: float = 0.0
    run_p99: float = 0.0
    #: Cumulative counts per ``BUCKETS`` bound, and the sums, of every wait and run time.
    wait_buckets: tuple[int, ...] = ()
    run_buckets: tuple[int, ...] = ()
    wait_sum: float = 0.0
    run_sum: float = 0.0

    @property
    def finished(self) -> int:
        """Tasks that have their outcome (every accepted task ends up counted once here)."""
        return (
            self.completed
            + self.failed
            + self.timed_out
            + self.cancelled
            + self.crashed
            + self.shutdown
        )

    @property
    def utilization(self) -> float:
        """Busy share of the ready workers now (0 to 1)."""
        return min(1.0, self.running / self.workers) if self.workers else 0.0


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What ``on_task_done`` hears once per accepted task, when it gets its outcome."""

    seq: int  #: arrival number within the manager
    task_id: str | None
    name: str  #: the function's qualified name, or the registered type's name
    priority: str  #: "high", "normal" or "low"
    kind: str  #: the worker kind that ran (or would have run) it; "inline" on the loop
    outcome: str  #: "ok", an OffloadError code, "CANCELLED", or the exception's type name
    wait: float  #: seconds from submit to start (approximate for tasks that did not run)
    run: float  #: seconds the worker spent running it (0 if it did not run)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker, as ``wm.worker_statistics()`` sees it now. Times are Unix seconds."""

    id: int  #: the worker's number within its pool
    kind: str  #: "process", "interpreter" or "dask"
    pid: int | None  #: the process id (process workers)
    state: str  #: "starting", "idle", "busy", "draining" or "quarantined"
    tasks_done: int
    failures: int  #: tasks that raised, failed to return, or died with the worker
    current_task_id: str | None
    current_task_name: str | None
    current_task_seconds: float  #: how long the current task has run (0 when idle)
    rss: int | None  #: resident memory in bytes (process workers)
    started_at: float
    last_active: float
    spare: bool = False  #: a warm spare, holding no slot yet


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress event from a running task (``offload.report_progress`` in the task).

    ``done`` and ``total`` are the task's own units (``total`` may be ``None``); ``elapsed``
    is seconds since the task started on its worker.
    """

    task_id: str | None
    done: float
    total: float | None
    message: str | None
    elapsed: float

    @property
    def fraction(self) -> float | None:
        """``done / total`` when ``total`` is known and positive."""
        if self.total is None or self.total <= 0:
            return None
        return self.done / self.total


class StatsRecorder:
    """Mutable counters owned by the dispatcher; ``snapshot`` freezes them."""

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.rejected = 0
        self.crashed = 0
        self.shutdown = 0
        self.inline = 0
        self.retried = 0
        self.waits: deque[float] = deque(maxlen=_SAMPLES)
        self.runs: deque[float] = deque(maxlen=_SAMPLES)
        self.wait_counts = [0] * len(BUCKETS)
        self.run_counts = [0] * len(BUCKETS)
        self.wait_sum = 0.0
        self.run_sum = 0.0

    def timing(self, wait: float, run: float) -> None:
        self.waits.append(wait)
        self.runs.append(run)
        self.wait_counts[bisect.bisect_left(BUCKETS, wait)] += 1
        self.run_counts[bisect.bisect_left(BUCKETS, run)] += 1
        self.wait_sum += wait
        self.run_sum += run

    def snapshot(
        self,
        kind: str,
        workers: int,
        spares: int,
        running: int,
        queued: Mapping[str, int],
        **pool: int,
    ) -> Stats:
        w50, w95, w99 = _percentiles(self.waits)
        r50, r95, r99 = _percentiles(self.runs)
        return Stats(
            kind=kind,
            workers=workers,
            spares=spares,
            running=running,
            queued=sum(queued.values()),
            queued_by_priority=dict(queued),
            submitted=self.submitted,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            rejected=self.rejected,
            crashed=self.crashed,
            shutdown=self.shutdown,
            inline=self.inline,
            retried=self.retried,
            wait_p50=w50,
            wait_p95=w95,
            wait_p99=w99,
            run_p50=r50,
            run_p95=r95,
            run_p99=r99,
            wait_buckets=_cumulative(self.wait_counts),
            run_buckets=_cumulative(self.run_counts),
            wait_sum=self.wait_sum,
            run_sum=self.run_sum,
            **pool,
        )


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    total = 0
    out = []
    for count in counts:
        total += count
        out.append(total)
    return tuple(out)


def _percentiles(samples: deque[float]) -> tuple[float, float, float]:
    if not samples:
        return (0.0, 0.0, 0.0)
    ordered = sorted(samples)
    last = len(ordered) - 1
    return tuple(ordered[round(last * q)] for q in (0.5, 0.95, 0.99))  # type: ignore[return-value]


for _cls in (Stats, TaskRecord, WorkerInfo, Progress):
    _cls.__module__ = "offload"
del _cls
