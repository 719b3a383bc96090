"""A job (one accepted task on its way to an outcome) and the bounded priority queue of jobs."""

from __future__ import annotations

import asyncio
import enum
import heapq
import time
from typing import TYPE_CHECKING, Any

from ._task import Priority

if TYPE_CHECKING:
    from ._worker import Payload
    from .workers import Worker

__all__ = ("Job", "JobQueue", "JobState")


class JobState(enum.Enum):
    QUEUED = "queued"  # in the heap
    SENT = "sent"  # handed to a worker (running, or next in line there)
    DONE = "done"  # has its outcome (or was abandoned by its caller)


class Job:
    """One accepted task: its pickled call, its caller's future and where it is now."""

    __slots__ = (
        "deadline_handle",
        "future",
        "name",
        "payload",
        "priority",
        "route",
        "seq",
        "state",
        "stopping",
        "submitted_at",
        "taking_back",
        "task_id",
        "timeout",
        "wire_id",
        "worker",
    )

    def __init__(
        self,
        seq: int,
        priority: Priority,
        payload: bytes | Payload,
        future: asyncio.Future[Any],
        task_id: str | None,
        name: str,
        route: str,
        timeout: float | None,
    ) -> None:
        self.seq = seq  # arrival order, FIFO tie-break, and the id on the wire
        self.priority = priority
        self.payload = payload
        self.future = future
        self.task_id = task_id
        self.name = name
        self.route = route  # the worker kind that runs it
        self.timeout = timeout
        self.state = JobState.QUEUED
        self.worker: Worker | None = None
        self.wire_id = 0  # its number on the current worker's pipe (per worker, increasing)
        self.deadline_handle: asyncio.TimerHandle | None = None
        #: Why the job's worker is being stopped under it: "timeout" or "cancelled".
        self.stopping: str | None = None
        self.taking_back = False  # asked back from the worker it waits on (see Pool.pump)
        self.submitted_at = time.perf_counter()

    def __repr__(self) -> str:
        return f"<Job #{self.seq} {self.name} {self.priority.name} {self.state.value}>"


class JobQueue:
    """High before normal before low, FIFO within a priority; removal is O(1) (lazy).

    A heap of ``(priority, seq, job)`` (compared in C): a job requeued after its worker died
    keeps its ``seq`` and so its place in line.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Job]] = []
        self._counts = dict.fromkeys(Priority, 0)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def counts(self) -> dict[Priority, int]:
        return dict(self._counts)

    def push(self, job: Job) -> None:
        job.state = JobState.QUEUED
        heapq.heappush(self._heap, (job.priority, job.seq, job))
        self._counts[job.priority] += 1
        self._size += 1

    def pop(self) -> Job | None:
        """The first waiting job, or ``None``."""
        heap = self._heap
        while heap:
            job = heapq.heappop(heap)[2]
            if job.state is JobState.QUEUED:
                self._counts[job.priority] -= 1
                self._size -= 1
                return job
        return None

    def discard(self, job: Job) -> None:
        """Forget a queued job (it stays in the heap, skipped when it surfaces)."""
        if job.state is JobState.QUEUED:
            job.state = JobState.DONE
            self._counts[job.priority] -= 1
            self._size -= 1
            if not self._size:
                self._heap.clear()

    def waiting(self) -> list[Job]:
        """Every waiting job, in no particular order."""
        return [entry[2] for entry in self._heap if entry[2].state is JobState.QUEUED]
