"""``WorkerManager``: validation, admission, deadlines, outcomes, statistics, lifecycle."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, TypeVarTuple

from . import _worker as wire
from ._outcome import alias_main
from ._pool import Backend, Pool, PoolConfig, WorkerKind
from ._queue import Job, JobState
from ._stats import Stats, StatsRecorder, TaskRecord
from ._task import (
    Priority,
    PriorityLike,
    RegisteredTask,
    Retry,
    Task,
    coerce_retry,
    coerce_timeout,
    task_from_dict,
)
from .errors import (
    InvalidTask,
    ManagerClosed,
    NotSerializable,
    OffloadError,
    PayloadTooLarge,
    PoisonTask,
    QueueFull,
    TaskTimeout,
    UnsupportedKind,
    WorkerCrashed,
)
from .workers import interpreters_available

__all__ = ("WorkerManager",)

log = logging.getLogger("offload")

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

KIND_NAMES: Final = ("process", "interpreter", "dask")
DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024
POISON_MEMORY: Final = 600.0  # seconds a crash counts against an identical task


# Kinds whose workers share memory with this process: big buffers go out of band (see _worker).
_SHARED_MEMORY_KINDS = frozenset({"process", "interpreter"})


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


def default_workers() -> int:
    """``max(1, os.cpu_count() - 1)``: leave a core for the event loop."""
    return max(1, (os.cpu_count() or 2) - 1)


class WorkerManager:
    """Runs CPU-heavy callables on worker processes or subinterpreters, from ``async`` code.

    >>> async with WorkerManager(workers=2, max_queue=100) as wm:  # doctest: +SKIP
    ...     digest = await wm.run(hashlib_sha256_hex, b"data", priority="high", timeout=5)
    ...     token = await wm.execute_task({"type": "jwt:sign", "data": {...}})

    Args:
        workers: how many workers this manager owns (not shared with other managers);
            default ``max(1, os.cpu_count() - 1)``.
        kind: ``"process"`` (default) or ``"interpreter"`` (Python 3.13+, one GIL per
            subinterpreter, lower overhead, but a crash takes the whole process down and code
            blocked in C cannot be stopped), ``"dask"`` (a local Dask cluster, see
            ``offload.dask``), or a kind object such as ``offload.dask.DaskKind(address=...)``.
        max_queue: how many tasks may wait for a worker; one more raises ``QueueFull``.
        process_workers: with ``kind="interpreter"``, extra process workers for task types
            that cannot load in a subinterpreter (``cryptography``, ``zstandard``, ...).
        max_payload: the largest pickled arguments or result, in bytes (``PAYLOAD_TOO_LARGE``).
        default_timeout: the deadline for tasks that set none (seconds, or ``None``).
        shutdown_grace: how long leaving ``async with`` waits for queued and running work.
        start_timeout: how long a worker may take to report READY.
        interrupt_grace: interpreter workers: how long an interrupted task may take to stop
            before its interpreter is quarantined and replaced.
        on_task_done: called on the event loop with a ``TaskRecord`` when each accepted task
            gets its outcome (for logs and metrics; keep it fast, exceptions are logged).
        retry: the default ``Retry`` policy (or a number of attempts) for tasks that set none;
            by default nothing is retried.
        poison_after: refuse (``POISON_TASK``) a task identical to one that already crashed
            workers this many times (within 10 minutes), so one bad input cannot keep
            killing the pool; ``None`` turns this off. Kills from outside (an operator, the
            OOM killer) count too.
        spare_workers: process workers kept started and idle, so a lost or recycled worker is
            replaced at once (default 1 for ``kind="process"``).
        max_tasks_per_worker: recycle a worker after this many tasks.
        max_worker_memory: recycle a process worker whose resident memory (checked between
            tasks) is over this many bytes.
        worker_memory_limit: a hard address-space limit per process worker (``RLIMIT_AS``,
            bytes): an allocation over it raises ``MemoryError`` in the task.
        max_worker_age: recycle a worker older than this many seconds (checked when idle).
        health_interval: ping idle workers every this many seconds (``None``: never); one that
            does not answer within ``health_timeout`` seconds is hung and is replaced.
        worker_nice: how much lower the workers' CPU priority is than the caller's (Unix
            niceness, 0 to 19): when the cores are busy, the event loop is served first, so
            it stays responsive (``0``: equal priority).
    """

    def __init__(
        self,
        workers: int | None = None,
        kind: Literal["process", "interpreter", "dask"] | WorkerKind = "process",
        *,
        max_queue: int = 1000,
        process_workers: int = 0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        default_timeout: float | None = None,
        shutdown_grace: float = 30.0,
        start_timeout: float = 30.0,
        interrupt_grace: float = 0.25,
        on_task_done: Callable[[TaskRecord], None] | None = None,
        retry: Retry | int | None = None,
        poison_after: int | None = 3,
        spare_workers: int = 1,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        worker_memory_limit: int | None = None,
        max_worker_age: float | None = None,
        health_interval: float | None = 5.0,
        health_timeout: float = 10.0,
        worker_nice: int = 10,
    ) -> None:
        if kind == "dask":
            from .dask import DaskKind  # optional: needs the `dask` extra

            kind = DaskKind()
        if isinstance(kind, str):
            if kind not in KIND_NAMES:
                raise UnsupportedKind(f"kind must be one of {KIND_NAMES}, not {kind!r}")
            if kind == "interpreter":
                interpreters_available()
            self._kind_object: WorkerKind | None = None
            kind_name: str = kind
        else:
            self._kind_object = kind
            kind_name = kind.name
        if workers is None:
            workers = default_workers()
        for name, value, low in (
            ("workers", workers, 1),
            ("max_queue", max_queue, 0),
            ("process_workers", process_workers, 0),
            ("max_payload", max_payload, 1),
            ("spare_workers", spare_workers, 0),
            ("poison_after", 1 if poison_after is None else poison_after, 1),
            ("max_tasks_per_worker", max_tasks_per_worker or 1, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, not {value!r}")
        if process_workers and kind_name == "process":
            raise ValueError("process_workers is for kind='interpreter'; raise workers instead")
        #: The worker kind's name: "process", "interpreter", "dask".
        self.kind = kind_name
        self.max_queue = max_queue
        self.max_payload = max_payload
        self.default_timeout = coerce_timeout(default_timeout)
        self.shutdown_grace = shutdown_grace
        self.default_retry = coerce_retry(retry)
        self._workers = workers
        self._process_workers = process_workers
        self._on_task_done = on_task_done
        self._poison_after = poison_after
        # payload digest -> (crashes, when the last one happened)
        self._crashes: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._config = PoolConfig(
            settings={
                "sys_path": [],  # filled in at start
                "max_payload": max_payload,
                "max_rss": max_worker_memory,
                "rlimit_as": worker_memory_limit,
                "nice": worker_nice,
            },
            start_timeout=start_timeout,
            interrupt_grace=interrupt_grace,
            on_restart=self._count_restart,
            on_recycle=self._count_recycle,
            spare_workers=spare_workers,
            max_tasks_per_worker=max_tasks_per_worker,
            max_worker_age=max_worker_age,
            health_interval=health_interval,
            health_timeout=health_timeout,
        )
        self._state = _State.NEW
        self._pools: dict[str, Backend] = {}
        self._stats = StatsRecorder()
        self._seq = itertools.count(1)
        self._outstanding = 0  # accepted jobs without an outcome yet
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed_event: asyncio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"<WorkerManager kind={self.kind} workers={self._workers} "
            f"max_queue={self.max_queue} {self._state.value}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        await self.shutdown(grace=0 if cancelled else None)

    async def start(self) -> Self:
        """Start the workers and wait until each has answered READY (or raise)."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"this WorkerManager is {self._state.value}; create a new one")
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._closed_event = asyncio.Event()
        config = self._config
        config.settings.update(sys_path=list(sys.path), main=_main_reference())
        alias_main()
        if self._kind_object is not None:
            self._pools[self.kind] = self._kind_object.create_pool(self._workers, self, config)
        else:
            self._pools[self.kind] = Pool(self.kind, self._workers, self, config)
        if self._process_workers:
            self._pools["process"] = Pool("process", self._process_workers, self, config)
        self._state = _State.RUNNING
        try:
            await asyncio.gather(*(pool.start() for pool in self._pools.values()))
        except BaseException:
            self._state = _State.CLOSED
            await asyncio.shield(self._close_pools(0))
            raise
        return self

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking work, let queued and running tasks finish within ``grace`` seconds
        (default ``shutdown_grace``), fail what is left with ``ManagerClosed`` (``SHUTDOWN``),
        then stop every worker. Idempotent; afterwards no worker of this manager is alive.
        """
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        if self._state is not _State.RUNNING:
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._state = _State.DRAINING
        grace = self.shutdown_grace if grace is None else grace
        assert self._drained is not None
        assert self._closed_event is not None
        try:
            if self._outstanding and grace > 0:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
        except TimeoutError:
            pass
        finally:
            # Even when the caller is cancelled here: nothing is left running.
            await asyncio.shield(self._finish_shutdown())

    async def _finish_shutdown(self) -> None:
        left = [(pool, job) for pool in self._pools.values() for job in pool.all_jobs()]
        for pool, job in left:
            pool.stop(job, "shutdown")  # queued: settled now; running: the work is stopped
        # Idle workers exit at once; only an interpreter stuck in C code may take longer.
        await self._close_pools(self.shutdown_grace)
        for _, job in left:  # stopped with their workers: settle what the exits did not
            self.settle(job, error=ManagerClosed("the manager shut down", task_id=job.task_id))
        self._state = _State.CLOSED
        assert self._closed_event is not None
        self._closed_event.set()

    async def _close_pools(self, grace: float) -> None:
        await asyncio.gather(*(pool.aclose(grace) for pool in self._pools.values()))

    @property
    def closed(self) -> bool:
        """True once ``shutdown`` began: submitting raises ``ManagerClosed``."""
        return self._state in (_State.DRAINING, _State.CLOSED)

    # -- submitting ------------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[[*Ts], R],
        *args: *Ts,
        priority: PriorityLike = Priority.NORMAL,
        timeout: float | None = None,
        task_id: str | None = None,
        retry: Retry | int | None = None,
    ) -> R:
        """Run ``fn(*args)`` on a worker and return its result.

        >>> await wm.run(math.factorial, 500, priority="high", timeout=2.0)  # doctest: +SKIP

        ``fn`` must be picklable by reference (a module-level function). For keyword
        arguments, pass ``functools.partial(fn, key=value)``.
        """
        task = Task(
            fn, args=tuple(args), priority=priority, timeout=timeout, id=task_id, retry=retry
        )
        result: R = await self._submit(task, self._pools_for(None))
        return result

    async def execute_task(self, task: Task | Mapping[str, Any]) -> Any:
        """Run a ``Task``, or a dict naming a registered type, and return its result.

        >>> await wm.execute_task(Task(pow, args=(2, 10), priority=Priority.LOW))  # doctest: +SKIP
        1024
        >>> await wm.execute_task(  # doctest: +SKIP
        ...     {"id": "a1", "type": "demo:add", "data": {"a": 1, "b": 2}, "timeout": 5}
        ... )
        3
        """
        if isinstance(task, Task):
            return await self._submit(task, self._pools_for(None))
        if isinstance(task, Mapping):
            parsed, entry = task_from_dict(task)
            return await self._submit(parsed, self._pools_for(entry, task.get("data")))
        raise InvalidTask(f"execute_task takes a Task or a dict, not {type(task).__name__}")

    def _pools_for(self, entry: RegisteredTask | None, data: Any = None) -> Backend:
        if self._state is not _State.RUNNING:
            raise ManagerClosed(self._closed_message())
        kinds = entry.kinds_of(data) if entry is not None else None
        if kinds is None or self.kind in kinds:
            return self._pools[self.kind]
        if "process" in kinds and "process" in self._pools:
            return self._pools["process"]
        assert entry is not None
        why = f" ({entry.why_not})" if entry.why_not else ""
        raise UnsupportedKind(
            f"task type {entry.name!r} cannot run on {self.kind} workers{why}; here it runs on "
            f"{sorted(kinds)}: use WorkerManager(kind='process') or give this manager "
            "process workers: WorkerManager(kind='interpreter', process_workers=1)"
        )

    def _closed_message(self) -> str:
        if self._state is _State.NEW:
            return "the manager is not started: use `async with WorkerManager(...) as wm:`"
        return "the manager is shut down and takes no more tasks"

    async def _submit(self, task: Task, pool: Backend) -> Any:
        policy = coerce_retry(task.retry) if task.retry is not None else self.default_retry
        timeout = task.timeout if task.timeout is not None else self.default_timeout
        payload = self._pickle_call(task, out_of_band=pool.kind in _SHARED_MEMORY_KINDS)
        if self._crashes:
            self._refuse_poison(task, payload)
        if policy is None:
            return await self._attempt(task, pool, payload, timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        attempt = 0
        while True:
            try:
                return await self._attempt(task, pool, payload, timeout)
            except OffloadError as exc:
                attempt += 1
                if exc.code not in policy.on or attempt > policy.attempts:
                    raise
                delay = policy.delay(attempt)
                if deadline is not None:
                    timeout = deadline - loop.time() - delay
                    if timeout <= 0:
                        raise
                if self._crashes:
                    self._refuse_poison(task, payload)
                self._stats.retried += 1
                await asyncio.sleep(delay)
                if self._state is not _State.RUNNING:  # shut down while waiting to retry
                    raise ManagerClosed(self._closed_message(), task_id=task.id) from exc

    async def _attempt(
        self, task: Task, pool: Backend, payload: bytes | wire.Payload, timeout: float | None
    ) -> Any:
        if len(pool.queue) >= self.max_queue and not pool.has_room():
            self._stats.rejected += 1
            raise QueueFull(
                f"{len(pool.queue)} tasks are already waiting (max_queue={self.max_queue}); "
                "retry later, or raise max_queue or workers",
                task_id=task.id,
            )
        loop = self._loop
        assert loop is not None
        job = Job(
            next(self._seq),
            task.priority,  # type: ignore[arg-type]  # coerced by Task
            payload,
            loop.create_future(),
            task.id,
            getattr(task.fn, "__qualname__", type(task.fn).__name__),
            pool.kind,
            timeout,
        )
        if timeout is not None:
            job.deadline_handle = loop.call_at(loop.time() + timeout, self._on_deadline, job, pool)
        self._outstanding += 1
        self._stats.submitted += 1
        pool.submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            if job.state is not JobState.DONE:
                pool.stop(job, "cancelled")
            raise

    def _refuse_poison(self, task: Task, payload: bytes | wire.Payload) -> None:
        key = _digest(payload)
        crashes, last = self._crashes.get(key, (0, 0.0))
        if time.monotonic() - last > POISON_MEMORY:
            self._crashes.pop(key, None)  # long ago: an outside kill, or since fixed
            return
        if self._poison_after is not None and crashes >= self._poison_after:
            raise PoisonTask(
                f"not run: this exact task (same function and arguments) crashed workers "
                f"{crashes} times; fix the input or the function",
                task_id=task.id,
            )

    def _note_crash(self, job: Job) -> None:
        key = _digest(job.payload)
        self._crashes[key] = (self._crashes.get(key, (0, 0.0))[0] + 1, time.monotonic())
        self._crashes.move_to_end(key)
        while len(self._crashes) > 1024:
            self._crashes.popitem(last=False)

    def _pickle_call(self, task: Task, out_of_band: bool) -> bytes | wire.Payload:
        try:
            call = (task.fn, task.args, dict(task.kwargs))
            # Buffers are looked for in the arguments and their items, if there may be any.
            scan = wire.may_hold_buffers(task.args) or wire.may_hold_buffers(task.kwargs.values())
            payload = wire.encode(call, out_of_band, depth=3 if scan else 0)
        except Exception as exc:
            raise NotSerializable(
                f"the task's function or arguments cannot be pickled: {type(exc).__name__}: "
                f"{_first_line(exc)}; use module-level functions and picklable arguments",
                task_id=task.id,
            ) from None
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"the arguments are {len(payload)} bytes pickled, over max_payload="
                f"{self.max_payload}; send less (e.g. a file path), or raise max_payload",
                task_id=task.id,
            )
        return payload

    def _on_deadline(self, job: Job, pool: Backend) -> None:
        job.deadline_handle = None
        if job.state is not JobState.DONE:
            pool.stop(job, "timeout")

    # -- outcomes (the pools' Ledger) ------------------------------------------------------

    def timeout_error(self, job: Job) -> TaskTimeout:
        where = "waiting in the queue" if job.state is JobState.QUEUED else "running"
        return TaskTimeout(
            f"{job.name} did not finish within its {job.timeout:g} s deadline (it was {where})",
            task_id=job.task_id,
        )

    def settle(
        self, job: Job, *, result: Any = None, error: BaseException | None = None, run: float = 0.0
    ) -> None:
        """Give ``job`` its one outcome (later calls for the same job do nothing)."""
        if job.state is JobState.DONE:
            return
        if job.state is JobState.QUEUED:
            self._pools[job.route].queue.discard(job)
        job.state = JobState.DONE
        if job.deadline_handle is not None:
            job.deadline_handle.cancel()
            job.deadline_handle = None
        stats = self._stats
        future = job.future
        wait = max(0.0, time.perf_counter() - job.submitted_at - run)
        if error is None:
            stats.completed += 1
            stats.timing(wait, run)
            if not future.done():
                future.set_result(result)
        else:
            if isinstance(error, TaskTimeout):
                stats.timed_out += 1
            elif isinstance(error, asyncio.CancelledError):
                stats.cancelled += 1
            elif isinstance(error, WorkerCrashed):
                stats.crashed += 1
                self._note_crash(job)
            elif isinstance(error, ManagerClosed):
                stats.shutdown += 1
            else:
                stats.failed += 1
                stats.timing(wait, run)
            if not future.done():
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)  # _outcome never hands over a StopIteration
        self._outstanding -= 1
        if not self._outstanding and self._drained is not None:
            self._drained.set()
        if self._on_task_done is not None:
            self._report(job, error, wait, run)

    def _report(self, job: Job, error: BaseException | None, wait: float, run: float) -> None:
        if error is None:
            outcome = "ok"
        elif isinstance(error, OffloadError):
            outcome = error.code
        elif isinstance(error, asyncio.CancelledError):
            outcome = "CANCELLED"
        else:
            outcome = type(error).__name__
        record = TaskRecord(
            job.seq, job.task_id, job.name, job.priority.name.lower(), job.route, outcome, wait, run
        )
        try:
            assert self._on_task_done is not None
            self._on_task_done(record)
        except Exception:
            log.exception("offload: on_task_done raised")

    def _count_restart(self) -> None:
        self._stats.worker_restarts += 1

    def _count_recycle(self) -> None:
        self._stats.worker_recycles += 1

    # -- observing -------------------------------------------------------------------------

    def stats(self) -> Stats:
        """A frozen snapshot of counters, queue lengths and wait/run percentiles."""
        queued = dict.fromkeys(("high", "normal", "low"), 0)
        workers = spares = running = 0
        for pool in self._pools.values():
            for priority, count in pool.queue.counts().items():
                queued[priority.name.lower()] += count
            workers += pool.ready_workers
            spares += pool.ready_spares
            running += pool.holding
        return self._stats.snapshot(self.kind, workers, spares, running, queued)

    def worker_pids(self) -> list[int]:
        """The process ids of this manager's live process workers (for tests and monitoring)."""
        return [pid for pool in self._pools.values() for pid in pool.worker_pids()]


def _main_reference() -> tuple[str, str] | None:
    """How a worker can load the caller's ``__main__`` if a task refers to it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        return ("module", spec.name)
    path = getattr(main, "__file__", None)
    if isinstance(path, str):
        return ("path", os.path.abspath(path))
    return None


def _digest(payload: bytes | wire.Payload) -> bytes:
    if isinstance(payload, bytes):
        return hashlib.blake2b(payload, digest_size=16).digest()
    digest = hashlib.blake2b(payload.data, digest_size=16)
    for buffer in payload.buffers:
        digest.update(buffer)
    return digest.digest()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
