"""Counters and latency samples, and the frozen snapshot ``WorkerManager.stats()`` returns."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ("Stats", "StatsRecorder", "TaskRecord")

_SAMPLES = 4096  # the percentiles describe the most recent tasks


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a manager. Times are in seconds, over the last 4096 finished tasks.

    >>> s = wm.stats()  # doctest: +SKIP
    >>> s.completed, s.queued, s.wait_p99  # doctest: +SKIP
    (120, 3, 0.0021)
    """

    kind: str
    workers: int  #: workers ready to take work
    spares: int  #: warm spare workers, ready to take a lost or recycled worker's slot
    running: int  #: tasks a worker holds right now (running or next in line there)
    queued: int  #: tasks waiting in the queue
    queued_by_priority: Mapping[str, int] = field(default_factory=dict)
    submitted: int = 0  #: accepted tasks (after validation and admission)
    completed: int = 0  #: returned a result
    failed: int = 0  #: raised, or their result could not come back
    timed_out: int = 0  #: TIMEOUT
    cancelled: int = 0  #: their caller was cancelled
    rejected: int = 0  #: QUEUE_FULL at submit (not counted in ``submitted``)
    crashed: int = 0  #: WORKER_CRASHED
    shutdown: int = 0  #: cancelled by shutdown (SHUTDOWN)
    worker_restarts: int = 0  #: workers replaced after a crash, a kill or a quarantine
    worker_recycles: int = 0  #: workers replaced by policy (task count, memory, age)
    retried: int = 0  #: retry attempts made under a ``Retry`` policy
    wait_p50: float = 0.0
    wait_p95: float = 0.0
    wait_p99: float = 0.0
    run_p50: float = 0.0
    run_p95: float = 0.0
    run_p99: float = 0.0

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


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What ``on_task_done`` hears once per accepted task, when it gets its outcome."""

    seq: int  #: arrival number within the manager
    task_id: str | None
    name: str  #: the function's qualified name
    priority: str  #: "high", "normal" or "low"
    kind: str  #: the worker kind that ran (or would have run) it
    outcome: str  #: "ok", an OffloadError code, "CANCELLED", or the exception's type name
    wait: float  #: seconds from submit to start (approximate for tasks that did not run)
    run: float  #: seconds the worker spent running it (0 if it did not run)


class StatsRecorder:
    """Mutable counters owned by the manager; ``snapshot`` freezes them."""

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.cancelled = 0
        self.rejected = 0
        self.crashed = 0
        self.shutdown = 0
        self.worker_restarts = 0
        self.worker_recycles = 0
        self.retried = 0
        self.waits: deque[float] = deque(maxlen=_SAMPLES)
        self.runs: deque[float] = deque(maxlen=_SAMPLES)

    def timing(self, wait: float, run: float) -> None:
        self.waits.append(wait)
        self.runs.append(run)

    def snapshot(
        self, kind: str, workers: int, spares: int, running: int, queued: Mapping[str, int]
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
            worker_restarts=self.worker_restarts,
            worker_recycles=self.worker_recycles,
            retried=self.retried,
            wait_p50=w50,
            wait_p95=w95,
            wait_p99=w99,
            run_p50=r50,
            run_p95=r95,
            run_p99=r99,
        )


def _percentiles(samples: deque[float]) -> tuple[float, float, float]:
    if not samples:
        return (0.0, 0.0, 0.0)
    ordered = sorted(samples)
    last = len(ordered) - 1
    return tuple(ordered[round(last * q)] for q in (0.5, 0.95, 0.99))  # type: ignore[return-value]
