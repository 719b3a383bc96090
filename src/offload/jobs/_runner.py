"""The worker loop behind ``JobQueue.work``: claim, run on the manager, renew, record.

One loop per call, with up to ``concurrency`` jobs in flight::

    claim loop ──claim(n free)──► store                 renewer ──every lease/3──► store
        │  (sleeps until: a ring, a free slot,                 │  lost a lease: that job's
        │   the next due time or lease expiry, or stop)       ▼  cancel scope fires
        └──► one task per job: manager.execute_task({...}) inside a cancel scope whose
             deadline is the lease (minus a margin) ──► store.finish(outcome)

A job's cancel scope ends shortly *before* its lease does on the store, so a worker that can
no longer renew (the store is unreachable, the host is stalled) stops the work before another
host may take the job: no job runs on two hosts at once. Cancelling a job's scope cancels
``execute_task``, which stops the work on the worker (a process worker is killed).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Final, Protocol

import anyio

from .. import _registry as registry
from ..errors import ManagerClosed, QueueFull
from ._errors import StoreError
from ._model import (
    backoff_delay,
    encode_json,
    error_code,
    error_type_name,
    is_json,
    priority_name,
    should_retry,
)
from ._store import Claimed, Outcome, Store, Subscription

__all__ = ("Executor", "Runner")

log = logging.getLogger("offload.jobs")

_worker_numbers = count(1)
_UNKNOWN_EVERY: Final = 30.0  # seconds between checks for due jobs of unknown types
_RELEASE_TIMEOUT: Final = 10.0  # seconds allowed to hand jobs back when stopping


class Executor(Protocol):
    """What ``work`` needs of a manager: ``offload.WorkerManager`` is one."""

    async def execute_task(self, task: Mapping[str, Any]) -> Any: ...


@dataclass(eq=False)
class _Running:
    job: Claimed
    scope: anyio.CancelScope
    #: Why the scope was cancelled by us: "lease" (lost it), "release" (stopping).
    why: str = ""
    renewed_at: float = field(default=0.0)


class _NoDoorbell(Subscription):
    async def wait(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        pass


def registered_types() -> list[str]:
    """The task types this process can run (``@offload.task`` and the built-in ones)."""
    return registry.registered_names()


class Runner:
    def __init__(
        self,
        store: Store,
        manager: Executor,
        queues: Sequence[str],
        *,
        concurrency: int,
        once: bool,
        lease: float,
        grace: float,
        poll_interval: float,
        stop: anyio.Event | None,
    ) -> None:
        self.store = store
        self.manager = manager
        self.queues = list(queues)
        self.concurrency = concurrency
        self.once = once
        self.lease = lease
        # Stop a job this long before its lease ends on the store (clock drift, kill time).
        self.margin = min(max(lease * 0.2, 0.2), 10.0)
        self.grace = grace
        self.poll_interval = poll_interval
        self.stop = stop
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{next(_worker_numbers)}"
        self.running: dict[str, _Running] = {}
        self._batch = max(1, concurrency // 2)
        self.done = 0
        self._wake = anyio.Event()
        self._stopping = False
        self._idle = anyio.Event()
        self._started = anyio.Event()  # set when a job starts (the renewer waits for one)
        self._unknown_at = -math.inf

    def _ring(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping or (self.stop is not None and self.stop.is_set())

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            subscription = await self.store.subscribe()
        except OSError as exc:  # e.g. no room for the doorbell socket next to the database
            log.warning(
                "worker %s: cannot listen for new jobs (%s); looking every %.1f s instead",
                self.worker,
                exc,
                self.poll_interval,
            )
            subscription = _NoDoorbell()
        try:
            async with anyio.create_task_group() as jobs, anyio.create_task_group() as helpers:
                helpers.start_soon(self._listen, subscription)
                helpers.start_soon(self._renew_loop)
                if self.stop is not None:
                    helpers.start_soon(self._watch_stop, self.stop)
                await self._claim_loop(jobs)
                await self._wind_down()
                helpers.cancel_scope.cancel()
        finally:
            await subscription.aclose()
        return self.done

    async def _watch_stop(self, stop: anyio.Event) -> None:
        await stop.wait()
        log.info("worker %s: stopping (grace %.1f s)", self.worker, self.grace)
        self._stopping = True
        self._ring()

    async def _listen(self, subscription: Any) -> None:
        while True:
            await subscription.wait()
            self._ring()

    async def _claim_loop(self, jobs: anyio.abc.TaskGroup) -> None:
        types = registered_types()
        failures = 0
        while not self.stopping:
            self._wake = anyio.Event()
            free = self.concurrency - len(self.running)
            wait: float | None = None
            # While jobs run, claim in batches (half the slots): one transaction for several.
            if free > 0 and (not self.running or free >= self._batch):
                started = anyio.current_time()
                try:
                    result = await self.store.claim(
                        self.queues, types, free, self.worker, self.lease
                    )
                except StoreError as exc:
                    if not exc.transient:
                        raise
                    failures += 1
                    wait = min(0.1 * 2**failures, 5.0)
                    log.warning("worker %s: %s; trying again in %.1f s", self.worker, exc, wait)
                    await self._sleep(wait)
                    continue
                failures = 0
                for job in result.jobs:
                    self._start(jobs, job, started)
                if len(result.jobs) == free:
                    continue  # maybe more are due: claim again when a slot frees
                wait = result.next_in
                if anyio.current_time() - self._unknown_at >= _UNKNOWN_EVERY:
                    await self._note_unknown(types)
                drained = self.once and not result.jobs and not self.running
                if drained and (wait is None or wait > 0):
                    return  # nothing due, nothing running
            await self._sleep(wait)

    async def _sleep(self, seconds: float | None) -> None:
        """Until a ring, a free slot, a stop, or ``seconds`` (capped at ``poll_interval``)."""
        timeout = self.poll_interval if seconds is None else min(seconds, self.poll_interval)
        with anyio.move_on_after(timeout):
            await self._wake.wait()

    async def _note_unknown(self, types: list[str]) -> None:
        self._unknown_at = anyio.current_time()
        try:
            pairs = await self.store.note_unrunnable(self.queues, types, self.worker)
        except StoreError as exc:
            log.warning("worker %s: %s", self.worker, exc)
            return
        for queue, type_ in pairs:
            log.error(
                "worker %s: due jobs in queue %r name the task type %r, which is not "
                "registered here: they stay queued (see JobQueue.stats().unrunnable)",
                self.worker,
                queue,
                type_,
            )

    async def _wind_down(self) -> None:
        """Let running jobs finish within ``grace`` (when stopping), then hand back the rest."""
        if not self.running:
            return
        if self.stopping and self.grace > 0:
            with anyio.move_on_after(self.grace):
                while self.running:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        for run in list(self.running.values()):
            run.why = run.why or "release"
            run.scope.cancel()
        while self.running:  # each job task records its release, then leaves
            self._idle = anyio.Event()
            await self._idle.wait()

    # -- one job ---------------------------------------------------------------------------

    def _start(self, jobs: anyio.abc.TaskGroup, job: Claimed, claimed_at: float) -> None:
        scope = anyio.CancelScope(deadline=claimed_at + self.lease - self.margin)
        run = _Running(job, scope, renewed_at=claimed_at)
        self.running[job.id] = run
        self._started.set()
        jobs.start_soon(self._run_job, run, name=f"offload-job {job.id}")

    async def _run_job(self, run: _Running) -> None:
        job = run.job
        outcome: Outcome | None = None
        try:
            with run.scope:
                outcome = await self._execute(job)
            if outcome is None:  # our scope fired: lost the lease, or stopping
                if run.why == "release":
                    outcome = Outcome(job.id, job.token, "release")
                else:
                    log.warning(
                        "worker %s: job %r stopped: its lease could not be renewed in time "
                        "(it will come back on the store when the lease expires)",
                        self.worker,
                        job.id,
                    )
        except anyio.get_cancelled_exc_class():
            # The whole work() was cancelled: hand the job back, then let cancellation go on.
            with anyio.move_on_after(_RELEASE_TIMEOUT, shield=True):
                await self._record(Outcome(job.id, job.token, "release"))
            self._forget(job)
            raise
        if outcome is not None:
            with anyio.CancelScope(shield=True):
                await self._record(outcome)
        self._forget(job)

    def _forget(self, job: Claimed) -> None:
        if self.running.pop(job.id, None) is not None:
            self._idle.set()
            self._ring()

    async def _execute(self, job: Claimed) -> Outcome:
        spec = {
            "id": job.id,
            "type": job.type,
            "data": job.data,
            "priority": priority_name(job.priority),
            "timeout": job.timeout,
        }
        pause = 0.02
        while True:
            try:
                result = await self.manager.execute_task(spec)
            except QueueFull:
                # The manager is shared and busy: keep the job (its lease is renewed) and wait.
                await anyio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            except ManagerClosed:
                self._stopping = True
                self._ring()
                return Outcome(job.id, job.token, "release")
            except Exception as exc:
                return self._failure(job, exc)
            break
        self.done += 1
        return Outcome(job.id, job.token, "done", result=_result_json(job, result))

    def _failure(self, job: Claimed, exc: Exception) -> Outcome:
        retry = job.attempts <= job.retries and should_retry(exc, job.retry_on)
        return Outcome(
            job.id,
            job.token,
            "retry" if retry else "failed",
            delay=backoff_delay(job.backoff, job.attempts) if retry else 0.0,
            error_code=error_code(exc),
            error_type=error_type_name(exc),
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )

    async def _record(self, outcome: Outcome) -> None:
        """Write the outcome; a transient store error is retried while the lease lasts."""
        run = self.running.get(outcome.id)
        deadline = run.scope.deadline + self.margin if run is not None else math.inf
        pause = 0.05
        while True:
            try:
                state = await self.store.finish(outcome)
            except StoreError as exc:
                if not exc.transient or anyio.current_time() + pause >= deadline:
                    log.error(
                        "worker %s: could not record that job %r is %s (%s): it will come back "
                        "when its lease expires",
                        self.worker,
                        outcome.id,
                        outcome.kind,
                        exc,
                    )
                    return
                await anyio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            if state is None:
                log.warning(
                    "worker %s: job %r ended (%s) after its lease was taken back: the outcome "
                    "was not recorded",
                    self.worker,
                    outcome.id,
                    outcome.kind,
                )
            elif state == "failed":
                log.error(
                    "job %r failed for good: %s: %s", outcome.id, outcome.error_type, outcome.error
                )
            return

    # -- leases ----------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            if not self.running:  # nothing to renew: sleep until a job starts (no idle wakes)
                self._started = anyio.Event()
                await self._started.wait()
            await anyio.sleep(self.lease / 3)
            if not self.running:
                continue
            runs = list(self.running.values())
            sent = anyio.current_time()
            try:
                held = await self.store.renew(sorted({r.job.token for r in runs}), self.lease)
            except StoreError as exc:
                log.warning("worker %s: could not renew leases: %s", self.worker, exc)
                continue
            for run in runs:
                if (run.job.id, run.job.token) in held:
                    run.renewed_at = sent
                    run.scope.deadline = sent + self.lease - self.margin
                elif run.job.id in self.running and not run.scope.cancel_called:
                    run.why = "lease"
                    run.scope.cancel()


def _result_json(job: Claimed, result: Any) -> str | None:
    if result is None or not is_json(result):
        if result is not None:
            log.info("job %r: its result is not JSON and is not kept", job.id)
        return None
    return encode_json(result, "result")
