"""The local backend: a pool of process or interpreter workers on this machine.

It knows how to run tickets, never why: the dispatcher decides what runs next and settles
callers; the pool decides where a ticket goes and keeps its slots filled.

Placement (``offer``): an idle worker first. A worker that is busy may take a ticket too, when
the ticket is short and the work already there is short: the work sent ahead of any ticket
stays under ``PARK_BUDGET`` seconds of estimated run time. Long or unknown work is never
parked, so the order in which tasks *start* follows the dispatcher's order. When a worker
falls idle while another holds tickets behind a task that overran its estimate, those tickets
are taken back (they return to the dispatcher in their old places) and start on the idle one.

Slots never stay empty for long: a lost worker's slot goes to a warm spare at once (a kind with
spares) while a new spare starts; a worker due for recycling (tasks sent, memory, age) takes
nothing new, its replacement starts at once, and it exits once what it holds is done. A pool
that scales (``min_workers``/``max_workers``) adds workers while tickets wait and retires
workers idle longer than ``idle_timeout``; it never retires a busy one.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import anyio
import anyio.abc

from .._backend import BackendStats, Outcome, OutcomeKind, OutcomeSink, Ticket
from .._config import Config
from .._runtime import Runtime
from .._spawn import Spawner
from .._stats import WorkerInfo
from ..errors import OffloadError, WorkerStartFailed
from ._connection import Batch
from ._kinds import LocalKind, kind_named
from ._worker import LocalWorker, WorkerState

__all__ = ("PARK_BUDGET", "LocalPool")

log = logging.getLogger("offload")

#: The most estimated work (seconds) sent ahead of a ticket on a busy worker (issue: ~1 ms).
PARK_BUDGET: Final = 0.001
#: The most tickets one worker holds at once.
MAX_DEPTH: Final = 64


class LocalPool:
    """Workers of one local kind, and the rules that keep them filled and fed."""

    supports_progress = True

    def __init__(self, kind: str, size: int, config: Config, settings: dict[str, Any]) -> None:
        self.kind = kind
        self._kind: LocalKind = kind_named(kind)
        self._config = config
        self._settings = settings  # sent to each worker (sys.path, __main__, limits)
        scaling = size == config.workers and config.scaling
        self.min_workers = config.min_workers if scaling else size
        self.max_workers = config.max_workers if scaling else size
        self.target = size
        self._spare_count = config.spare_workers if self._kind.spares else 0
        self._idle_timeout = config.idle_timeout if scaling else None
        self.active: list[LocalWorker] = []  # ready, taking work
        self.spares: list[LocalWorker] = []  # ready and idle, holding no slot yet
        self.retiring: set[LocalWorker] = set()  # draining or quarantined, not gone yet
        self._launched: set[LocalWorker] = set()
        self._where: dict[int, LocalWorker] = {}  # ticket key -> the worker holding it
        self._starting = 0  # slot workers being started
        self._starting_spares = 0
        self._numbers = itertools.count(1)
        self._start_failures = 0
        self.restarts = 0
        self.recycles = 0
        self.started = 0
        self.retired = 0
        self.closing = False
        self._sink: OutcomeSink | None = None
        self._runtime: Runtime | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._batch = Batch(self._after_pass)
        self._all_gone: anyio.Event | None = None
        # Background work asked for from loop callbacks (no task there to start it from): a
        # supervisor task starts it in the manager's task group.
        self._spawner: Spawner | None = None

    def __repr__(self) -> str:
        return f"<LocalPool {self.kind} {len(self.active)}/{self.target}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def bind(self, sink: OutcomeSink) -> None:
        self._sink = sink

    async def start(self, runtime: Runtime, tg: anyio.abc.TaskGroup) -> None:
        """Start ``target`` workers at once (the spares after them, in the background); if one
        fails, stop the others and raise."""
        self._runtime = runtime
        self._tg = tg
        self._spawner = Spawner(runtime)
        failures: list[BaseException] = []

        async def one() -> None:
            try:
                await self._start_worker(spare=False)
            except Exception as exc:
                failures.append(exc)

        self._starting += self.target
        try:
            async with anyio.create_task_group() as starting:
                for _ in range(self.target):
                    starting.start_soon(one)
        finally:
            self._starting = 0
        if failures:
            await self.aclose(0)
            raise failures[0]
        tg.start_soon(self._spawner.run, tg)
        for _ in range(self._spare_count):
            self._spawn_spare()
        if self._config.health_interval:
            tg.start_soon(self._check_health)
        if self._idle_timeout is not None:
            tg.start_soon(self._retire_idle)

    async def _start_worker(self, *, spare: bool) -> LocalWorker | None:
        assert self._runtime is not None
        worker = LocalWorker(self, self._kind, next(self._numbers), self._runtime, self._batch)
        self._launched.add(worker)
        await worker.start(self._settings, self._config.worker_nice, self._config.start_timeout)
        self.started += 1
        if self.closing:
            worker.kill() if not self._kind.interrupts else worker.quit()
            return None
        if spare:
            worker.spare = True
            self.spares.append(worker)
        else:
            self.active.append(worker)
        self._capacity()
        return worker

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background (callable from loop callbacks)."""
        if self._spawner is not None:
            self._spawner.spawn(fn, *args)

    def _spawn_spare(self) -> None:
        if self.closing or self._tg is None:
            return
        self._starting_spares += 1
        self.spawn(self._start_in_background, True)

    def _spawn_worker(self) -> None:
        if self.closing or self._tg is None:
            return
        self._starting += 1
        self.spawn(self._start_in_background, False)

    async def _start_in_background(self, spare: bool) -> None:
        """Start a worker, backing off (with jitter) while starts fail."""
        try:
            while not self.closing:
                try:
                    await self._start_worker(spare=spare)
                except OffloadError as exc:
                    if self._closing_now():
                        return  # stopped by the pool's own shutdown
                    self._start_failures += 1
                    delay = min(5.0, 0.05 * 2**self._start_failures) * (0.5 + random.random())
                    log.error("offload: %s; retrying in %.2f s", exc, delay)
                    if not self.active and self._start_failures >= 3 and self._sink is not None:
                        self._sink.on_failure(
                            self.kind,
                            WorkerStartFailed(
                                f"no {self.kind} worker could be started ({exc}); "
                                "the queued tasks cannot run"
                            ),
                        )
                    await anyio.sleep(delay)
                else:
                    self._start_failures = 0
                    return
        finally:
            if spare:
                self._starting_spares -= 1
            else:
                self._starting -= 1

    def _closing_now(self) -> bool:
        """(read again after an await: shutdown may have begun meanwhile)"""
        return self.closing

    def _refill(self) -> None:
        """Fill empty slots: a spare now, else a new worker; keep the spares topped up."""
        if self.closing:
            return
        while len(self.active) + self._starting < self.target:
            if self.spares:
                spare = self.spares.pop()
                spare.spare = False
                self.active.append(spare)
                self._capacity()
            else:
                self._spawn_worker()
        while len(self.spares) + self._starting_spares < self._spare_count:
            self._spawn_spare()

    def drain(self) -> None:
        """Shutdown began: no worker is replaced or added from now on."""
        self.closing = True

    async def aclose(self, grace: float) -> None:
        """Stop every worker: idle ones exit at once; any still running after ``grace``
        seconds are killed (processes) or abandoned (interpreters stuck in a call)."""
        self.closing = True
        if self._spawner is not None:
            self._spawner.close()
        self.active, self.spares = [], []
        alive = self._alive()
        for worker in alive:
            if worker.state is WorkerState.STARTING:
                worker.kill()  # a start still in progress: it has nothing to finish
            else:
                worker.quit()
        await self._wait_gone(grace)
        for worker in self._alive():
            worker.kill()
        # A killed process is reaped within milliseconds: a small margin. An interrupted
        # interpreter ends within ``interrupt_grace``; one stuck in C cannot be waited for: it
        # is abandoned (it ends when its call returns, and cannot keep the process alive).
        await self._wait_gone(2.0, lambda w: not w.kind.interrupts)
        await self._wait_gone(self._config.interrupt_grace)
        for worker in self._alive():
            worker.abandon()
        self.retiring.clear()

    def _alive(self) -> list[LocalWorker]:
        return [
            w
            for w in self._launched
            if w.state is not WorkerState.GONE
            and w.handle is not None
            and not w.exit_seen
            and not w.handle.exited  # (reaped directly: the loop was ending)
        ]

    async def _wait_gone(
        self, timeout: float, which: Callable[[LocalWorker], bool] | None = None
    ) -> None:
        """Until every worker (of ``which``) has ended, or ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            while True:
                alive = self._alive()
                if which is not None:
                    alive = [w for w in alive if which(w)]
                if not alive:
                    return
                self._all_gone = anyio.Event()
                await self._all_gone.wait()

    def kill_all(self) -> None:
        """The event loop is ending under a running pool: end every worker now (processes are
        killed and reaped, which takes milliseconds; interpreters run nothing more)."""
        self.closing = True
        workers = {*self._launched, *self.active, *self.spares, *self.retiring}
        for worker in workers:
            if worker.state is not WorkerState.GONE:
                worker.kill()
        for worker in workers:
            if worker.handle is not None:
                worker.handle.reap(timeout=2.0)
            worker.abandon()

    # -- placement -----------------------------------------------------------------------------

    def offer(self, ticket: Ticket) -> bool:
        """Take ``ticket`` now if a worker has room: an idle one, else (short work) a busy one
        with little work ahead."""
        for worker in self.active:
            if not worker.busy and worker.state is WorkerState.READY:
                self._send(worker, ticket)
                return True
        cost = ticket.cost
        if cost is not None and cost <= PARK_BUDGET and not ticket.stream:
            assert self._runtime is not None
            now = self._runtime.now()
            best: LocalWorker | None = None
            best_ahead = PARK_BUDGET
            for worker in self.active:
                if len(worker.held) < MAX_DEPTH and worker.state is WorkerState.READY:
                    ahead = worker.ahead(now)
                    if ahead <= best_ahead:
                        best, best_ahead = worker, ahead
            if best is not None:
                self._send(best, ticket)
                return True
        if self._grow():
            return self.offer(ticket)
        return False

    def _send(self, worker: LocalWorker, ticket: Ticket) -> None:
        self._where[ticket.key] = worker
        worker.send(ticket)
        limit = self._config.max_tasks_per_worker
        if limit is not None and worker.sent >= limit:
            self.recycle(worker, f"{worker.sent} tasks sent")

    def _grow(self) -> bool:
        """Tickets wait and every worker is busy: add a worker if the pool may scale.
        ``True`` when a spare took the new slot at once."""
        if self.closing or len(self.active) + self._starting >= self.max_workers:
            return False
        self.target = min(self.max_workers, max(self.target, len(self.active) + self._starting + 1))
        had = len(self.active)
        self._refill()
        return len(self.active) > had

    def stop(self, ticket: Ticket) -> None:
        worker = self._where.get(ticket.key)
        if worker is not None:
            worker.stop(ticket, self._config.interrupt_grace)

    def credit(self, ticket: Ticket, items: int) -> None:
        worker = self._where.get(ticket.key)
        if worker is not None:
            worker.credit(ticket, items)

    def close_stream(self, ticket: Ticket) -> None:
        worker = self._where.get(ticket.key)
        if worker is not None:
            worker.close_stream(ticket)

    # -- what workers report -------------------------------------------------------------------

    def report(self, worker: LocalWorker, ticket: Ticket, outcome: Outcome) -> None:
        """A worker's outcome for ``ticket``: pass it up (after the pool's own bookkeeping)."""
        final = outcome.kind is not OutcomeKind.PROGRESS and outcome.kind is not OutcomeKind.ITEM
        if final:
            if self._where.get(ticket.key) is worker:
                del self._where[ticket.key]
            if worker.state is WorkerState.DRAINING and not worker.busy:
                worker.quit()
            self._batch.dirty = True
        assert self._sink is not None
        batch = self._batch
        if batch.depth:  # inside a read pass already (the usual case): it ends the batch
            self._sink.on_outcome(ticket, outcome)
            return
        batch.begin()
        try:
            self._sink.on_outcome(ticket, outcome)
        finally:
            batch.end()

    def _capacity(self) -> None:
        if self._sink is not None:
            self._batch.begin()
            self._batch.dirty = True
            self._batch.end()

    def _after_pass(self) -> None:
        """Answers were handled: the dispatcher may send more; then idle workers take back
        what waits behind a task that overran its estimate."""
        assert self._sink is not None
        self._sink.on_capacity()
        if any(not w.busy for w in self.active):
            self._rebalance()

    def _rebalance(self) -> None:
        assert self._runtime is not None
        now = self._runtime.now()
        for worker in self.active:
            if len(worker.held) < 2:
                continue
            tickets = list(worker.held.values())
            first = tickets[0]
            overdue = first.cost is None or now - worker.busy_since > first.cost + PARK_BUDGET
            if overdue:
                for ticket in tickets[1:]:
                    worker.take_back(ticket)

    def recycle(self, worker: LocalWorker, why: str) -> None:
        """Replace ``worker`` without a dip in capacity: it takes nothing new, a spare (or a
        new worker) takes its slot now, and it exits once what it holds is done."""
        if worker not in self.active or self.closing:
            return
        log.info("offload: recycling %s (%s)", worker.ident, why)
        self.recycles += 1
        self._retire(worker)

    def _retire(self, worker: LocalWorker) -> None:
        self.active.remove(worker)
        worker.state = WorkerState.DRAINING
        self.retiring.add(worker)
        self._refill()
        if not worker.busy:
            worker.quit()

    def lost(self, worker: LocalWorker) -> None:
        """``worker`` is out of service (quarantined, hung, or found dead): refill its slot."""
        if worker in self.active:
            self.active.remove(worker)
            self.restarts += 1
        elif worker in self.spares:
            self.spares.remove(worker)
        self.retiring.add(worker)
        self._refill()

    def gone(self, worker: LocalWorker, was: WorkerState) -> None:
        """``worker`` has ended (reaped, or its interpreter thread returned)."""
        self._launched.discard(worker)
        if worker in self.active:  # it died in service: a crash or an outside kill
            self.active.remove(worker)
            if not self.closing:
                self.restarts += 1
        elif worker in self.spares:
            self.spares.remove(worker)
        self.retiring.discard(worker)
        self._refill()
        if self._all_gone is not None:
            self._all_gone.set()
        self._capacity()

    # -- health and scaling --------------------------------------------------------------------

    async def _check_health(self) -> None:
        """Ping idle workers; one that does not answer in time is hung: replace it."""
        config = self._config
        assert config.health_interval is not None
        assert self._runtime is not None
        while not self.closing:
            await anyio.sleep(config.health_interval)
            now = self._runtime.now()
            for worker in [*self.active, *self.spares]:
                if worker.busy:  # deadlines watch it; ping again once it is idle
                    worker.ping_sent = None
                    continue
                if worker.ping_sent is not None:
                    if now - worker.ping_sent > config.health_timeout:
                        self._hung(worker)
                    continue
                age = config.max_worker_age
                if age is not None and now - worker.started_at > age and worker in self.active:
                    self.recycle(worker, f"older than {age:g} s")
                    continue
                worker.ping(now)

    def _hung(self, worker: LocalWorker) -> None:
        log.warning(
            "offload: %s did not answer a health check within %.1f s; replacing it",
            worker.ident,
            self._config.health_timeout,
        )
        self.lost(worker)
        worker.kill()

    async def _retire_idle(self) -> None:
        """Retire workers idle longer than ``idle_timeout`` (down to ``min_workers``)."""
        timeout = self._idle_timeout
        assert timeout is not None
        assert self._runtime is not None
        while not self.closing:
            await anyio.sleep(min(timeout / 2, 1.0))
            now = self._runtime.now()
            for worker in list(self.active):
                if len(self.active) <= self.min_workers:
                    break
                if not worker.busy and now - worker.last_active >= timeout:
                    self.retired += 1
                    self.target = max(self.min_workers, self.target - 1)
                    self._retire(worker)

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> BackendStats:
        busy = sum(1 for w in self.active if w.busy)
        holding = sum(len(w.held) - len(w.absorbed) for w in (*self.active, *self.retiring))
        return BackendStats(
            kind=self.kind,
            workers=len(self.active),
            spares=len(self.spares),
            busy=busy,
            holding=holding,
            restarts=self.restarts,
            recycles=self.recycles,
            started=self.started,
            retired=self.retired,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
        )

    def worker_statistics(self) -> list[WorkerInfo]:
        assert self._runtime is not None
        now = self._runtime.now()
        wall = time.time()
        infos = []
        for worker in [*self.active, *self.spares, *self.retiring]:
            running = worker.running_ticket()
            if worker.state is WorkerState.QUARANTINED:
                state = "quarantined"
            elif worker.state is WorkerState.DRAINING:
                state = "draining"
            elif worker.state is WorkerState.STARTING:
                state = "starting"
            else:
                state = "busy" if worker.busy else "idle"
            infos.append(
                WorkerInfo(
                    id=worker.number,
                    kind=self.kind,
                    pid=worker.pid,
                    state=state,
                    tasks_done=worker.tasks_done,
                    failures=worker.failures,
                    current_task_id=running.task_id if running is not None else None,
                    current_task_name=running.name if running is not None else None,
                    current_task_seconds=(now - worker.busy_since) if running is not None else 0.0,
                    rss=worker.handle.rss() if worker.handle is not None else None,
                    started_at=wall - (now - worker.started_at),
                    last_active=wall - (now - worker.last_active),
                    spare=worker.spare,
                )
            )
        return sorted(infos, key=lambda info: info.id)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.active if w.pid is not None]
