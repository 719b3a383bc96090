"""The dispatcher: the one owner of every job's state and of every caller's outcome.

Data flows one way. A caller's submission becomes a ``Job`` here (admitted or refused at once);
queued jobs go down to a backend as ``Ticket``s when it has room (``pump``); what happened to
the work comes back up as ``Outcome``s through ``on_outcome``, and only here does a job get
its one outcome (``settle``): the caller's result or error, the counters, ``on_task_done``.

States::

    QUEUED ──pump──► SENT ──answer/loss──────────────────► DONE
      │  ▲            │ └─first progress or item─► RUNNING ─┘
      │  └─returned───┤
      │               └─deadline/cancel/shutdown─► STOPPING ─outcome─► DONE
      └─deadline/cancel/shutdown/refused to start in time───────────► DONE

Admission: ``max_queue`` bounds the queue by count. With run-time history (``Estimates``) a
task with a deadline (or a ``max_wait``) whose work ahead would not let it start in time is
refused at once (``WouldTimeOut``), and a queued one that can no longer start in time is
dropped before it starts (``TIMEOUT``), never killed halfway through.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import pickle
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import anyio.to_thread

from ._backend import Backend, Outcome, OutcomeKind, Ticket
from ._config import Config
from ._estimates import Estimates
from ._offload_worker import protocol
from ._offload_worker.codec import OFFLOOP_BYTES, Payload
from ._outcome import decode
from ._policy import PoisonGuard
from ._queue import ReadyQueue
from ._runtime import Runtime, Timer, Waiter
from ._stats import Progress, Stats, StatsRecorder, TaskRecord
from ._task import Priority
from .errors import (
    ManagerClosed,
    OffloadError,
    QueueFull,
    TaskTimeout,
    WorkerCrashed,
    WouldTimeOut,
)

__all__ = ("CANCELLED", "Dispatcher", "Job", "JobState", "StreamChannel", "Submission")

log = logging.getLogger("offload")

_PRIORITY_NAMES: Final = ("high", "normal", "low")
_NOTHING: Final = object()


class _Cancelled(Exception):
    """The outcome of a job whose caller was cancelled (the caller re-raises its own)."""


CANCELLED: Final = _Cancelled()


class JobState(enum.Enum):
    QUEUED = "queued"  # in the ready queue
    SENT = "sent"  # held by a backend: running, or about to
    RUNNING = "running"  # known to have started (it sent progress or items)
    STOPPING = "stopping"  # asked to stop: waiting for the backend to say it is
    DONE = "done"  # has its outcome


class Submission:
    """One attempt of a task, ready for the dispatcher (the manager builds it).

    ``stream`` > 0: a stream, with this many items of credit.
    """

    __slots__ = (
        "flow",
        "max_wait",
        "name",
        "on_progress",
        "payload",
        "priority",
        "route",
        "stream",
        "task_id",
        "timeout",
    )

    def __init__(
        self,
        payload: bytes | Payload,
        name: str,
        flow: object,
        priority: Priority,
        timeout: float | None,
        max_wait: float | None,
        task_id: str | None,
        route: str,
        stream: int = 0,
        on_progress: Callable[[Progress], Any] | None = None,
    ) -> None:
        self.payload = payload
        self.name = name
        self.flow = flow
        self.priority = priority
        self.timeout = timeout
        self.max_wait = max_wait
        self.task_id = task_id
        self.route = route
        self.stream = stream
        self.on_progress = on_progress

    def replace(self, **changes: Any) -> Submission:
        """A copy with ``changes``."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Submission(**values)


class StreamChannel:
    """Items of a stream job, from the worker to its consumer, with backpressure."""

    __slots__ = ("done", "error", "finished", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.waiter: Waiter | None = None
        self.done = False
        self.finished = False  # the generator ran to its end (not stopped)
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.fire()
            self.waiter = None


class Job:
    """One accepted task on its way to an outcome (its ``seq`` orders it in the queue)."""

    __slots__ = (
        "cost",
        "deadline",
        "error",
        "flow",
        "key",
        "latest_start",
        "loading",
        "max_wait",
        "name",
        "on_progress",
        "priority",
        "queued",
        "result",
        "route",
        "run",
        "sent_at",
        "seq",
        "state",
        "stop_reason",
        "stream",
        "submitted_at",
        "task_id",
        "ticket",
        "timeout",
        "timer",
        "waiter",
    )

    def __init__(
        self, key: int, sub: Submission, cost: float | None, now: float, waiter: Waiter
    ) -> None:
        self.key = key
        self.seq = key
        self.priority = int(sub.priority)
        self.flow = sub.flow
        self.cost = cost
        self.name = sub.name
        self.task_id = sub.task_id
        self.route = sub.route
        self.timeout = sub.timeout
        self.max_wait = sub.max_wait
        self.on_progress = sub.on_progress
        self.deadline = None if sub.timeout is None else now + sub.timeout
        latest = None if self.deadline is None else self.deadline - (cost or 0.0)
        if sub.max_wait is not None:
            wait_until = now + sub.max_wait
            latest = wait_until if latest is None else min(latest, wait_until)
        self.latest_start = latest
        self.submitted_at = time.perf_counter()
        self.sent_at = 0.0
        self.state = JobState.QUEUED
        self.queued = False
        self.stop_reason: str | None = None
        self.timer: Timer | None = None
        self.waiter = waiter
        self.result: Any = None
        self.error: BaseException | None = None
        self.run = 0.0
        self.loading = False  # its result is being read in a thread
        self.stream: StreamChannel | None = StreamChannel() if sub.stream else None
        self.ticket = Ticket(
            key,
            key,
            self.priority,
            sub.flow,
            cost,
            sub.payload,
            sub.name,
            sub.task_id,
            stream=bool(sub.stream),
            credit=sub.stream,
        )

    def __repr__(self) -> str:
        return f"<Job #{self.seq} {self.name} {_PRIORITY_NAMES[self.priority]} {self.state.value}>"

    def outcome(self) -> Any:
        """The result, or raise the error (``CANCELLED`` is never raised: callers re-raise
        their own cancellation)."""
        if self.error is not None:
            raise self.error
        return self.result


def _decode(outcome: Outcome, job: Job) -> Any:
    """The result an answer stands for (raises the error it stands for); then its shared
    memory is released. Runs in a thread for a big result."""
    try:
        if outcome.loader is not None:
            data, buffers = outcome.loader()
            return decode(outcome.tag, data, job.route, job.task_id, buffers)
        return decode(outcome.tag, outcome.payload, job.route, job.task_id, outcome.buffers)
    finally:
        if outcome.release is not None:
            outcome.release()


class Dispatcher:
    """Admission, the ready queues, deadlines, the pump, and every job's one outcome."""

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        backends: dict[str, Backend],
        *,
        poison: PoisonGuard | None = None,
        estimates: Estimates | None = None,
        spawn: Callable[..., None] | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.backends = backends
        self.queues = {route: ReadyQueue(fair=config.scheduling == "fair") for route in backends}
        self.estimates = estimates if estimates is not None else Estimates()
        self.poison = poison if poison is not None else PoisonGuard(config.poison_after)
        self.stats = StatsRecorder()
        self.jobs: dict[int, Job] = {}
        self._sent: dict[str, dict[int, Job]] = {route: {} for route in backends}
        self._keys = itertools.count(1)
        self._pumping = False
        self._pump_again = False
        self.closed = False
        self.loop_cost = 0.0001  # seconds of loop time an offloaded task costs (measured)
        self._spawn = spawn  # background work (big results are read in a thread)
        self._drained: Waiter | None = None
        for backend in backends.values():
            backend.bind(self)

    # -- submitting ----------------------------------------------------------------------------

    def submit(self, sub: Submission) -> Job:
        """Admit ``sub`` (send it on, or queue it) or refuse it at once.

        Raises ``ManagerClosed``, ``PoisonTask``, ``QueueFull``, ``WouldTimeOut``; a refused
        submission reserved nothing and has no job.
        """
        if self.closed:
            raise ManagerClosed("the manager is shutting down", task_id=sub.task_id)
        self.poison.check(sub.payload, sub.task_id)
        runtime = self.runtime
        now = runtime.now()
        cost = self.estimates.get(sub.flow)
        key = next(self._keys)
        job = Job(key, sub, cost, now, runtime.waiter())
        route = sub.route
        queue = self.queues[route]
        backend = self.backends[route]
        self.jobs[key] = job
        if not len(queue) and backend.offer(job.ticket):  # nothing waits: straight on
            self._sent_now(job, now)
        else:
            refusal = self._refusal(job, queue, now)
            if refusal is not None:
                del self.jobs[key]
                self.stats.rejected += 1
                raise refusal
            queue.push(job)
        self.stats.submitted += 1
        if job.latest_start is not None or job.deadline is not None:
            self._arm(job)
        return job

    def _refusal(self, job: Job, queue: ReadyQueue, now: float) -> OffloadError | None:
        """Why ``job`` may not wait in the queue, if it may not."""
        if len(queue) >= self.config.max_queue:
            return QueueFull(
                f"{len(queue)} tasks are waiting already (max_queue={self.config.max_queue}); "
                "retry later",
                task_id=job.task_id,
            )
        if job.latest_start is None or job.cost is None:
            return None  # no deadline, or no history yet: the count is the only bound
        start = now + self._expected_wait(job, queue, now)
        if start <= job.latest_start:
            return None
        wait = start - now
        retry_after = max(1.0, math.ceil(wait))
        if job.max_wait is None or (
            job.deadline is not None and job.deadline - job.cost < now + job.max_wait
        ):
            why = f"its {job.timeout:g} s deadline"
        else:
            why = f"its max_wait of {job.max_wait:g} s"
        return WouldTimeOut(
            f"{job.name} would wait about {wait:.3g} s for the work ahead of it and runs about "
            f"{job.cost:.3g} s: it could not finish within {why}; retry in {retry_after:g} s",
            task_id=job.task_id,
            retry_after=retry_after,
        )

    def _expected_wait(self, job: Job, queue: ReadyQueue, now: float) -> float:
        """Seconds until ``job`` would start: the queued work before it and what runs now,
        shared between the workers."""
        ahead = queue.work_ahead(job.priority, job.flow, job.cost or 0.0)
        for sent in self._sent[job.route].values():
            if sent.cost is not None:
                ahead += max(0.0, sent.cost - (now - sent.sent_at))
        stats = self.backends[job.route].statistics()
        capacity = max(1, stats.max_workers or stats.workers)
        return ahead / capacity

    def _sent_now(self, job: Job, now: float) -> None:
        job.state = JobState.SENT
        job.sent_at = now
        self._sent[job.route][job.key] = job

    def _arm(self, job: Job) -> None:
        when = job.latest_start if job.latest_start is not None else job.deadline
        if job.state is not JobState.QUEUED and job.deadline is not None:
            when = job.deadline
        if when is None:
            return
        if job.timer is not None:
            job.timer.cancel()
        job.timer = self.runtime.call_at(when, lambda: self._on_timer(job))

    def _on_timer(self, job: Job) -> None:
        job.timer = None
        state = job.state
        if state is JobState.DONE or state is JobState.STOPPING:
            return
        if state is JobState.QUEUED:
            self.settle(job, error=self._timeout_error(job, waiting=True))
            self.pump()
            return
        deadline = job.deadline
        if deadline is None:
            return  # a max_wait only: it has started in time
        if self.runtime.now() >= deadline:
            self.stop(job, "timeout")
        else:
            self._arm(job)

    def _timeout_error(self, job: Job, waiting: bool) -> TaskTimeout:
        if job.timeout is None:
            return TaskTimeout(
                f"{job.name} did not start within its max_wait of {job.max_wait:g} s",
                task_id=job.task_id,
            )
        where = "waiting in the queue and could not start in time" if waiting else "running"
        return TaskTimeout(
            f"{job.name} did not finish within its {job.timeout:g} s deadline (it was {where})",
            task_id=job.task_id,
        )

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, job: Job, reason: str) -> None:
        """Stop ``job``: its deadline passed ("timeout"), its caller left ("cancelled"), or
        the manager shuts down ("shutdown"). Running work is stopped, not abandoned."""
        state = job.state
        if state is JobState.DONE or state is JobState.STOPPING:
            return
        if state is JobState.QUEUED or job.loading:  # (loading: its work is done already)
            self.settle(job, error=self._stop_error(job, reason))
            return
        job.state = JobState.STOPPING
        job.stop_reason = reason
        self.backends[job.route].stop(job.ticket)

    def _stop_error(self, job: Job, reason: str) -> BaseException:
        if reason == "timeout":
            return self._timeout_error(job, waiting=job.state is JobState.QUEUED)
        if reason == "shutdown":
            return ManagerClosed(
                "the manager shut down before this task finished", task_id=job.task_id
            )
        return CANCELLED

    def stop_all(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            self.stop(job, reason)

    # -- outcomes (the backends' sink) ---------------------------------------------------------

    def on_outcome(self, ticket: Ticket, outcome: Outcome) -> None:
        job = self.jobs.get(ticket.key)
        kind = outcome.kind
        if job is None:
            if outcome.release is not None:
                outcome.release()
            return
        if kind is OutcomeKind.PROGRESS:
            self._progress(job, outcome)
            return
        if kind is OutcomeKind.ITEM:
            self._item(job, outcome)
            return
        if job.state is JobState.STOPPING:
            if outcome.release is not None:
                outcome.release()
            assert job.stop_reason is not None
            self.settle(job, error=self._stop_error(job, job.stop_reason), run=outcome.seconds)
            return
        if kind is OutcomeKind.RETURNED:
            self._sent[job.route].pop(job.key, None)
            job.state = JobState.QUEUED
            self.queues[job.route].push(job, returned=True)
            self.pump()
            return
        if kind is OutcomeKind.ANSWER:
            self._answer(job, outcome)
            return
        # LOST, or STOPPED without being asked (a hung worker replaced under it)
        note = outcome.note if kind is OutcomeKind.LOST else " (it was hung and replaced)"
        self.settle(
            job,
            error=WorkerCrashed(
                f"the {job.route} worker died while running this task{note}; it was replaced",
                task_id=job.task_id,
            ),
        )

    def _answer(self, job: Job, outcome: Outcome) -> None:
        tag = outcome.tag
        seconds = outcome.seconds
        if tag == protocol.OK or tag == protocol.RAISED:
            self.estimates.add(job.flow, seconds)
        if outcome.loader is not None and outcome.size >= OFFLOOP_BYTES and self._spawn:
            job.loading = True  # a big result: read and unpickled in a thread, then settled
            self._spawn(self._load_later, job, outcome)
            return
        try:
            result = _decode(outcome, job)
        except BaseException as exc:
            self.settle(job, error=exc, run=seconds)
        else:
            self.settle(job, result=result, run=seconds)

    async def _load_later(self, job: Job, outcome: Outcome) -> None:
        try:
            result = await anyio.to_thread.run_sync(_decode, outcome, job)
        except BaseException as exc:
            if job.state is not JobState.DONE:
                self.settle(job, error=exc, run=outcome.seconds)
        else:
            self.settle(job, result=result, run=outcome.seconds)

    def _progress(self, job: Job, outcome: Outcome) -> None:
        if job.state is JobState.SENT:
            job.state = JobState.RUNNING
        callback = job.on_progress
        if callback is None or job.state is JobState.DONE:
            return
        done, total, message, elapsed = pickle.loads(outcome.payload)
        event = Progress(job.task_id, done, total, message, elapsed)
        try:
            callback(event)
        except Exception:
            log.exception("offload: an on_progress callback raised")

    def _item(self, job: Job, outcome: Outcome) -> None:
        if job.state is JobState.SENT:
            job.state = JobState.RUNNING
        channel = job.stream
        if channel is None or channel.done:
            if outcome.release is not None:
                outcome.release()
            return
        outcome.tag = protocol.ITEM
        try:
            item = _decode(outcome, job)  # (it releases the shared memory)
        except BaseException as exc:
            channel.error = exc
            channel.done = True
            self.stop(job, "cancelled")
        else:
            channel.items.append(item)
        channel.wake()

    def on_capacity(self) -> None:
        self.pump()

    def on_failure(self, route: str, error: OffloadError) -> None:
        """The backend for ``route`` cannot run anything (its workers fail to start): fail
        what waits for it."""
        for job in list(self.queues[route].waiting()):
            assert isinstance(job, Job)
            self.settle(job, error=error)

    # -- the pump ------------------------------------------------------------------------------

    def pump(self) -> None:
        """Send queued jobs to backends with room, in queue order."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._pump_again = False
                for route, queue in self.queues.items():
                    if len(queue):
                        self._pump_route(route, queue)
                again = self._pump_again
        finally:
            self._pumping = False

    def _pump_route(self, route: str, queue: ReadyQueue) -> None:
        backend = self.backends[route]
        now = self.runtime.now()
        while len(queue):
            job = queue.peek()
            if job is None:
                return
            assert isinstance(job, Job)
            latest = job.latest_start
            if latest is not None and now > latest:  # it can no longer start in time
                queue.take(job)
                self.settle(job, error=self._timeout_error(job, waiting=True))
                continue
            if not backend.offer(job.ticket):
                return
            queue.take(job)
            self._sent_now(job, now)
            if job.deadline is not None:
                self._arm(job)

    # -- the one outcome -----------------------------------------------------------------------

    def settle(
        self,
        job: Job,
        *,
        result: Any = None,
        error: BaseException | None = None,
        run: float = 0.0,
    ) -> None:
        """Give ``job`` its one outcome (later calls for the same job do nothing)."""
        state = job.state
        if state is JobState.DONE:
            return
        if state is JobState.QUEUED:
            self.queues[job.route].discard(job)
        job.state = JobState.DONE
        self.jobs.pop(job.key, None)
        self._sent[job.route].pop(job.key, None)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        stats = self.stats
        wait = max(0.0, time.perf_counter() - job.submitted_at - run)
        job.run = run
        if error is None:
            stats.completed += 1
            stats.timing(wait, run)
            job.result = result
        else:
            job.error = error
            if error is CANCELLED:
                stats.cancelled += 1
            elif isinstance(error, TaskTimeout):
                stats.timed_out += 1
            elif isinstance(error, WorkerCrashed):
                stats.crashed += 1
                self.poison.note_crash(job.ticket.payload)
            elif isinstance(error, ManagerClosed):
                stats.shutdown += 1
            else:
                stats.failed += 1
                stats.timing(wait, run)
        channel = job.stream
        if channel is not None and not channel.done:
            channel.done = True
            channel.finished = error is None
            if error is not None and error is not CANCELLED:
                channel.error = error
            channel.wake()
        job.waiter.fire()
        if self.config.on_task_done is not None:
            self._report(job, error, wait, run)
        if self._drained is not None and not self.jobs:
            self._drained.fire()

    def _report(self, job: Job, error: BaseException | None, wait: float, run: float) -> None:
        if error is None:
            outcome = "ok"
        elif error is CANCELLED:
            outcome = "CANCELLED"
        elif isinstance(error, OffloadError):
            outcome = error.code
        else:
            outcome = type(error).__name__
        record = TaskRecord(
            job.seq,
            job.task_id,
            job.name,
            _PRIORITY_NAMES[job.priority],
            job.route,
            outcome,
            wait,
            run,
        )
        self._call_on_task_done(record)

    def _call_on_task_done(self, record: TaskRecord) -> None:
        try:
            assert self.config.on_task_done is not None
            self.config.on_task_done(record)
        except Exception:
            log.exception("offload: on_task_done raised")

    # -- inline --------------------------------------------------------------------------------

    def inline_ok(self, flow: object, threshold: float | None) -> bool:
        """Whether a task of ``flow`` should run on the caller's thread: its recent run time
        is below ``threshold`` and below what a round trip to a worker costs the loop."""
        if threshold is None or self.closed:
            return False
        estimate = self.estimates.get(flow)
        return estimate is not None and estimate < threshold and estimate < self.loop_cost

    def record_inline(
        self,
        name: str,
        flow: object,
        task_id: str | None,
        priority: Priority,
        run: float,
        error: BaseException | None,
    ) -> None:
        """Count a task that ran inline, as any other (stats, estimates, ``on_task_done``)."""
        stats = self.stats
        stats.submitted += 1
        stats.inline += 1
        self.estimates.add(flow, run)
        stats.timing(0.0, run)
        if error is None:
            stats.completed += 1
        else:
            stats.failed += 1
        if self.config.on_task_done is not None:
            outcome = (
                "ok"
                if error is None
                else (error.code if isinstance(error, OffloadError) else type(error).__name__)
            )
            record = TaskRecord(
                next(self._keys),
                task_id,
                name,
                _PRIORITY_NAMES[int(priority)],
                "inline",
                outcome,
                0.0,
                run,
            )
            self._call_on_task_done(record)

    def note_loop_cost(self, seconds: float) -> None:
        """One measured cost, on the loop, of sending a task and settling it."""
        self.loop_cost += 0.1 * (seconds - self.loop_cost)

    # -- draining ------------------------------------------------------------------------------

    def drained(self) -> Waiter:
        """Fired once no job waits for its outcome."""
        waiter = self.runtime.waiter()
        if not self.jobs:
            waiter.fire()
        else:
            self._drained = waiter
        return waiter

    def snapshot(self, kind: str) -> Stats:
        queued = dict.fromkeys(_PRIORITY_NAMES, 0)
        workers = spares = running = restarts = recycles = started = retired = 0
        low = high = 0
        for route, backend in self.backends.items():
            queue = self.queues[route]
            for priority, name in enumerate(_PRIORITY_NAMES):
                queued[name] += queue.counts[priority]
            info = backend.statistics()
            workers += info.workers
            spares += info.spares
            running += info.holding
            restarts += info.restarts
            recycles += info.recycles
            started += info.started
            retired += info.retired
            low += info.min_workers
            high += info.max_workers
        return self.stats.snapshot(
            kind,
            workers,
            spares,
            running,
            queued,
            worker_restarts=restarts,
            worker_recycles=recycles,
            workers_started=started,
            workers_retired=retired,
            min_workers=low,
            max_workers=high,
        )
