"""A pool: the workers of one kind and the queue in front of them.

Data flow: the manager accepts a job and ``submit``s it here; ``pump`` hands queued jobs to
workers with room (an idle worker first, else at most one job waiting behind a running one);
a worker's answer comes back through ``on_answer``, and the ``Ledger`` settles the job. A
worker that dies (``on_lost``) fails only the job it was running; the one waiting behind it
goes back to the queue in its old place, and a new worker takes the dead one's slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import _worker as wire
from ._outcome import decode_answer
from ._queue import Job, JobQueue, JobState
from .errors import ManagerClosed, OffloadError, TaskTimeout, WorkerCrashed, WorkerStartFailed
from .workers import InterpreterWorker, ProcessWorker, Worker

__all__ = ("Backend", "Ledger", "Pool", "PoolConfig", "WorkerKind")

log = logging.getLogger("offload")


class Ledger(Protocol):
    """Where jobs get their outcome (the manager): counters, futures, deadlines."""

    def settle(
        self, job: Job, *, result: Any = None, error: BaseException | None = None, run: float = 0.0
    ) -> None: ...

    def timeout_error(self, job: Job) -> TaskTimeout: ...


@dataclass(frozen=True)
class PoolConfig:
    """What the manager tells every pool it creates."""

    settings: dict[str, Any]  # sent to each worker at start (sys.path, __main__, limits)
    start_timeout: float
    interrupt_grace: float
    on_restart: Callable[[], None]
    on_recycle: Callable[[], None] = lambda: None
    spare_workers: int = 0
    max_tasks_per_worker: int | None = None
    max_worker_age: float | None = None
    health_interval: float | None = None
    health_timeout: float = 10.0


class Backend(Protocol):
    """What the manager needs from a pool of any kind (``Pool`` here, ``offload.dask``...)."""

    kind: str
    queue: JobQueue

    async def start(self) -> None: ...
    async def aclose(self, grace: float) -> None: ...
    def submit(self, job: Job) -> None: ...
    def stop(self, job: Job, reason: str) -> None: ...
    def has_room(self) -> bool: ...
    def all_jobs(self) -> list[Job]: ...
    def worker_pids(self) -> list[int]: ...
    @property
    def ready_workers(self) -> int: ...
    @property
    def ready_spares(self) -> int: ...
    @property
    def holding(self) -> int: ...


class WorkerKind(Protocol):
    """A worker kind given as an object: ``WorkerManager(kind=DaskKind(...))``."""

    name: str

    def create_pool(self, size: int, ledger: Ledger, config: PoolConfig) -> Backend: ...


def stopped_error(ledger: Ledger, job: Job, reason: str) -> BaseException:
    """The outcome of a job stopped for ``reason``: "timeout", "cancelled" or "shutdown"."""
    if reason == "timeout":
        return ledger.timeout_error(job)
    if reason == "shutdown":
        return ManagerClosed("the manager shut down before this task finished", task_id=job.task_id)
    return asyncio.CancelledError()


class Pool:
    """Workers of one kind, a priority queue, and the rules that connect them.

    Slots never stay empty for long: a lost worker's slot goes to a warm spare at once (process
    kind) while a new spare starts; a worker due for recycling (task count, memory, age) keeps
    working until its replacement is ready, then finishes what it holds and exits.
    """

    def __init__(self, kind: str, size: int, ledger: Ledger, config: PoolConfig) -> None:
        self.kind = kind
        self.size = size
        self.queue = JobQueue()
        self.workers: list[Worker] = []
        self.spares: list[Worker] = []  # started and ready, holding no slot yet
        self._ledger = ledger
        self._config = config
        self._interrupt_grace = config.interrupt_grace
        self._worker_class: type[Worker] = (
            InterpreterWorker if kind == "interpreter" else ProcessWorker
        )
        self._spare_count = config.spare_workers if kind == "process" else 0
        self._numbers = itertools.count(1)
        self._starting: set[asyncio.Task[Any]] = set()  # new workers: cancelled on close
        self._reaping: set[asyncio.Task[Any]] = set()  # outcomes after exits: awaited on close
        self._retiring: set[Worker] = set()  # quarantined, killed or draining, not yet gone
        self._launched: set[Worker] = set()  # every worker started and not yet known gone
        self._health: asyncio.Task[None] | None = None
        self._start_failures = 0
        self.closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker at once (the spares after them, in the background); if one
        fails, stop the others and raise."""
        results = await asyncio.gather(
            *(self._start_worker(spare=False) for _ in range(self.size)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose(grace=0)
            raise errors[0]
        for _ in range(self._spare_count):  # not on the caller's path: capacity is there
            self._background_task(self._start_until_ready(spare=True), self._starting)
        if self._config.health_interval:
            self._health = asyncio.get_running_loop().create_task(self._check_health())

    async def _start_worker(self, *, spare: bool) -> Worker:
        worker = self._worker_class(self, next(self._numbers))
        # (A worker being started elsewhere is not "gone": _launch spawns before any await.)
        self._launched = {w for w in self._launched if not w.gone}
        self._launched.add(worker)
        await worker.start(self._config.settings, self._config.start_timeout)
        if self.closing:
            worker.close()
            await worker.wait_closed(5.0)
            raise asyncio.CancelledError
        if spare:
            self.spares.append(worker)
        else:
            self.workers.append(worker)
            self.pump()
        return worker

    def _replace_soon(self) -> None:
        """A worker was lost (crashed, killed, quarantined): refill its slot."""
        if self.closing:
            return
        self._config.on_restart()
        self._fill_slot()

    def _fill_slot(self) -> None:
        """A slot fell empty: a spare takes it now, and a new spare (or worker) starts."""
        if self.closing:
            return
        if self.spares:
            self.workers.append(self.spares.pop())
            self.pump()
            self._background_task(self._start_until_ready(spare=True), self._starting)
        else:
            self._background_task(self._start_until_ready(spare=False), self._starting)

    async def _start_until_ready(self, *, spare: bool) -> Worker | None:
        """Start a worker in the background, backing off (with jitter) while starts fail."""
        while not self.closing:
            try:
                worker = await self._start_worker(spare=spare)
            except asyncio.CancelledError:
                return None
            except OffloadError as exc:
                self._start_failures += 1
                delay = min(5.0, 0.05 * 2**self._start_failures) * (0.5 + random.random())
                log.error("offload: %s; retrying in %.2f s", exc, delay)
                if not self.workers and self._start_failures >= 3:
                    self._fail_queued(
                        WorkerStartFailed(
                            f"no {self.kind} worker could be started ({exc}); "
                            "the queued tasks cannot run"
                        )
                    )
                await asyncio.sleep(delay)
            else:
                self._start_failures = 0
                return worker
        return None

    @staticmethod
    def _background_task(coro: Any, into: set[asyncio.Task[Any]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        into.add(task)
        task.add_done_callback(into.discard)

    async def aclose(self, grace: float) -> None:
        """Stop taking work, close every worker (waiting up to ``grace`` s), reap them."""
        self.closing = True
        if self._health is not None:
            self._health.cancel()
        for task in list(self._starting):
            task.cancel()
        workers = self.workers + self.spares + list(self._retiring)
        self.workers = []
        self.spares = []
        for worker in workers:
            worker.close()
        await asyncio.gather(*(w.wait_closed(max(grace, 0.5)) for w in workers))
        await asyncio.gather(*self._starting, *self._reaping, return_exceptions=True)
        if self._health is not None:
            await asyncio.gather(self._health, return_exceptions=True)
        # A start cancelled at the wrong moment may leave its process unwaited: never leak one.
        # (An interpreter cannot be killed; wait_closed above already waited what it could.)
        stray = [w for w in self._launched if isinstance(w, ProcessWorker) and not w.gone]
        await asyncio.gather(*(w.kill_and_wait() for w in stray))
        self._launched.clear()

    # -- recycling and health --------------------------------------------------------------

    def recycle(self, worker: Worker, why: str) -> None:
        """Replace ``worker`` without a dip in capacity: the replacement first, then retire it."""
        if worker.draining or worker.retired or self.closing or worker not in self.workers:
            return
        worker.draining = True
        log.info("offload: recycling %s (%s)", worker.ident, why)
        self._config.on_recycle()
        if self.spares:
            self._fill_slot()
            self._retire_gracefully(worker)
        else:
            self._background_task(self._replace_then_retire(worker), self._starting)

    async def _replace_then_retire(self, worker: Worker) -> None:
        if await self._start_until_ready(spare=False) is not None:
            self._retire_gracefully(worker)

    def _retire_gracefully(self, worker: Worker) -> None:
        """No new work for ``worker``; it exits once what it holds is done."""
        if worker in self.workers:
            self.workers.remove(worker)
        self._retiring.add(worker)
        if not worker.inflight:
            self._close_drained(worker)

    def _close_drained(self, worker: Worker) -> None:
        worker.close()
        self._background_task(self._forget_when_gone(worker), self._reaping)

    async def _check_health(self) -> None:
        """Ping idle workers; one that does not answer in time is hung: replace it."""
        config = self._config
        assert config.health_interval
        loop = asyncio.get_running_loop()
        while not self.closing:
            await asyncio.sleep(config.health_interval)
            now = loop.time()
            for worker in [*self.workers, *self.spares]:
                if worker.retired or worker.draining:
                    continue
                if worker.inflight:  # busy: deadlines watch it; ping again once it is idle
                    worker.ping_sent = None
                    continue
                if worker.ping_sent is not None:
                    if now - worker.ping_sent > config.health_timeout:
                        self._hung(worker)
                    continue
                if config.max_worker_age and now - worker.started_at > config.max_worker_age:
                    self.recycle(worker, f"older than {config.max_worker_age:g} s")
                    continue
                worker.ping(now)

    def _hung(self, worker: Worker) -> None:
        log.warning(
            "offload: %s did not answer a health check within %.1f s; replacing it",
            worker.ident,
            self._config.health_timeout,
        )
        if isinstance(worker, ProcessWorker):
            worker.kill()  # on_lost replaces it
        elif isinstance(worker, InterpreterWorker):
            worker.quarantine()
            self._retire(worker)
            self._background_task(self._forget_when_gone(worker), self._reaping)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if isinstance(w, ProcessWorker) and w.pid]

    # -- dispatch --------------------------------------------------------------------------

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self.workers if not w.retired)

    @property
    def ready_spares(self) -> int:
        return sum(1 for w in self.spares if not w.retired)

    @property
    def holding(self) -> int:
        """Jobs the workers hold that still wait for their outcome."""
        return sum(1 for w in self.workers for j in w.inflight if j.state is JobState.SENT)

    def has_room(self) -> bool:
        """A worker can take one more job now (so a new job would not wait in the queue)."""
        return self._worker_with_room() is not None

    def submit(self, job: Job) -> None:
        self.queue.push(job)
        self.pump()

    def pump(self) -> None:
        """Hand waiting jobs to workers with room, highest priority first."""
        queue = self.queue
        while len(queue):
            worker = self._worker_with_room()
            if worker is None:
                return
            job = queue.pop()
            if job is None:
                return
            job.state = JobState.SENT
            job.taking_back = False
            worker.submit(job)
        self._take_back_for_idle_workers()

    def _take_back_for_idle_workers(self) -> None:
        """The queue is empty but a worker is idle while a job waits behind another worker's
        running one: ask for that job back, so it runs now instead of after the other."""
        idle = sum(1 for w in self.workers if not w.retired and not w.inflight)
        if not idle:
            return
        for worker in self.workers:
            if len(worker.inflight) > 1:
                job = worker.inflight[-1]
                if job.state is JobState.SENT and not job.taking_back and job.stopping is None:
                    worker.take_back(job)
                    idle -= 1
                    if not idle:
                        return

    def on_stolen(self, worker: Worker, task_id: int) -> None:
        """The worker gave a waiting job back: it will never run there. Run it elsewhere."""
        for job in worker.inflight:
            if job.wire_id == task_id:
                worker.inflight.remove(job)
                if job.state is not JobState.SENT:
                    return
                if job.stopping is not None:  # stopped meanwhile: it runs nowhere now
                    self._settle_stopped(job, job.stopping)
                    return
                self._requeue([job])
                self.pump()
                return

    def _worker_with_room(self) -> Worker | None:
        # An idle worker first; else one running a single job may hold one more behind it
        # (CPython's EXTRA_QUEUED_CALLS idea: the next job is already there when it finishes).
        behind: Worker | None = None
        for worker in self.workers:
            if worker.retired:
                continue
            held = len(worker.inflight)
            if held == 0:
                return worker
            if held == 1 and behind is None:
                behind = worker
        return behind

    def stop(self, job: Job, reason: str) -> None:
        """Stop a job: its deadline passed ("timeout"), its caller gave up ("cancelled"), or
        the manager is shutting down ("shutdown"). Running work is stopped, not abandoned."""
        if job.state is JobState.QUEUED:
            self._settle_stopped(job, reason)  # settling takes it out of the queue
            return
        worker = job.worker
        if job.state is not JobState.SENT or worker is None:
            return
        if worker.inflight and worker.inflight[0] is job:
            job.stopping = reason
            worker.killed_to_stop = isinstance(worker, ProcessWorker)
            worker.stop_running(job)
            if isinstance(worker, InterpreterWorker):
                # The caller hears at once; the interrupt should stop the call soon after.
                self._settle_stopped(job, reason)
                loop = asyncio.get_running_loop()
                loop.call_later(self._interrupt_grace, self._quarantine_if_stuck, worker, job)
            # A process worker is being killed: on_lost settles the job once it is reaped.
        else:
            worker.cancel_waiting(job)  # it answers INTERRUPTED (or a result, ignored)
            self._settle_stopped(job, reason)

    def _settle_stopped(self, job: Job, reason: str, run: float = 0.0) -> None:
        self._ledger.settle(job, error=stopped_error(self._ledger, job, reason), run=run)

    def _quarantine_if_stuck(self, worker: InterpreterWorker, job: Job) -> None:
        if worker.retired or not worker.inflight or worker.inflight[0] is not job:
            return  # the interrupt worked: the worker answered and goes on
        log.warning(
            "offload: %s did not stop within %.2f s (blocked in C code?); quarantined until "
            "its call returns, a fresh interpreter takes its slot",
            worker.ident,
            self._interrupt_grace,
        )
        worker.quarantine()
        self._retire(worker)
        self._background_task(self._forget_when_gone(worker), self._reaping)

    async def _forget_when_gone(self, worker: Worker) -> None:
        await worker.wait_closed(float("inf"))
        self._retiring.discard(worker)

    # -- answers and losses ----------------------------------------------------------------

    def on_answer(
        self,
        worker: Worker,
        task_id: int,
        tag: int,
        payload: memoryview,
        seconds: float,
        buffers: list[Any] | None,
    ) -> None:
        if not worker.inflight or worker.inflight[0].wire_id != task_id:
            log.error("offload: %s answered out of order; replacing it", worker.ident)
            if isinstance(worker, ProcessWorker):
                worker.kill()
            return
        job = worker.inflight.popleft()
        worker.tasks_done += 1
        if worker.draining and not worker.inflight and worker not in self.workers:
            self._close_drained(worker)  # retired after its replacement got ready
        elif self._config.max_tasks_per_worker and (
            worker.tasks_done >= self._config.max_tasks_per_worker
        ):
            self.recycle(worker, f"{worker.tasks_done} tasks done")
        if job.state is JobState.SENT:
            if job.stopping is not None:
                self._settle_stopped(job, job.stopping, seconds)
            elif tag == wire.INTERRUPTED:  # not asked for: a bug
                self._ledger.settle(job, error=WorkerCrashed("the worker skipped this task"))
            else:
                try:
                    result = decode_answer(tag, payload, self.kind, job.task_id, buffers)
                except BaseException as exc:
                    self._ledger.settle(job, error=exc, run=seconds)
                else:
                    self._ledger.settle(job, result=result, run=seconds)
        worker.answer_read()  # before pump(): the frames it sends say the arena is free
        self.pump()

    def on_lost(self, worker: Worker) -> None:
        """A worker's pipe closed: it died, or was killed to stop its task."""
        self._retire(worker)
        if isinstance(worker, ProcessWorker):
            self._background_task(self._after_exit(worker), self._reaping)
        else:
            self._retiring.discard(worker)
            self._settle_lost(worker)

    def _retire(self, worker: Worker) -> None:
        """Take ``worker`` out of service: requeue what waits behind its task, refill its slot."""
        had_slot = worker in self.workers
        was_spare = worker in self.spares
        if had_slot:
            self.workers.remove(worker)
        elif was_spare:
            self.spares.remove(worker)
        self._retiring.add(worker)
        held = list(worker.inflight)
        worker.inflight.clear()
        if held:
            worker.inflight.append(held[0])  # settled when the worker is gone (see _after_exit)
        self._requeue([job for job in held[1:] if job.state is JobState.SENT])
        if had_slot and not worker.draining:  # a draining worker's slot is refilled already
            self._replace_soon()
        elif was_spare and not self.closing:
            self._background_task(self._start_until_ready(spare=True), self._starting)
        self.pump()

    def _requeue(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.worker = None
            self.queue.push(job)

    async def _after_exit(self, worker: ProcessWorker) -> None:
        """Once the dead process is reaped, give its running job its outcome."""
        await worker.wait_exited()
        self._retiring.discard(worker)
        self._settle_lost(worker)

    def _settle_lost(self, worker: Worker) -> None:
        running = worker.inflight.popleft() if worker.inflight else None
        if running is None or running.state is not JobState.SENT:
            return
        if running.stopping is not None:
            self._settle_stopped(running, running.stopping)
            return
        if worker.killed_to_stop:
            # Killed to stop the job before it, which answered just before the kill landed:
            # this one did nothing wrong (it may have begun), so it runs again elsewhere.
            self._requeue([running])
            self.pump()
            return
        self._ledger.settle(
            running,
            error=WorkerCrashed(
                f"the {self.kind} worker ({worker.ident}) died while running this "
                f"task{worker.exit_note()}; it was replaced",
                task_id=running.task_id,
            ),
        )

    def _fail_queued(self, error: OffloadError) -> None:
        for job in self.queue.waiting():
            self._ledger.settle(job, error=error)  # settling takes it out of the queue

    def all_jobs(self) -> list[Job]:
        """Every job still waiting for its outcome: queued, or held by a worker."""
        held = [j for w in (*self.workers, *self._retiring) for j in w.inflight]
        return [j for j in held if j.state is JobState.SENT] + self.queue.waiting()
