"""``WorkerManager``: the public façade (run, execute_task, map, stream, statistics) and the
manager's lifecycle. Jobs and outcomes belong to the dispatcher; workers to the backends."""

from __future__ import annotations

import enum
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, TypeVarTuple

import anyio
import anyio.abc

from ._backend import Backend
from ._config import DEFAULT_MAX_PAYLOAD, Config, make_config
from ._dispatch import CANCELLED, Dispatcher, Job, JobState, Submission
from ._estimates import flow_of
from ._offload_worker import codec
from ._outcome import alias_main
from ._policy import should_retry
from ._registry import RegisteredTask, task_from_dict
from ._runtime import Runtime, current_runtime
from ._spawn import Spawner
from ._stats import Progress, Stats, WorkerInfo
from ._task import Priority, PriorityLike, Retry, Task, coerce_priority, coerce_timeout
from .errors import (
    InvalidTask,
    MainGuardMissing,
    ManagerClosed,
    NotSerializable,
    NotStarted,
    PayloadTooLarge,
    UnsupportedKind,
)

__all__ = ("WorkerManager",)

log = logging.getLogger("offload")

R = TypeVar("R")
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: How long a cancelled caller waits for its work to be stopped (a kill and reap takes ms).
_STOP_WAIT: Final = 5.0
_LOCAL_KINDS: Final = frozenset({"process", "interpreter"})


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


class WorkerManager:
    """Runs CPU-heavy callables on worker processes or subinterpreters, from ``async`` code.

    >>> async with WorkerManager(workers=2, max_queue=100) as wm:  # doctest: +SKIP
    ...     digest = await wm.run(hashlib_sha256_hex, b"data", priority="high", timeout=5)
    ...     token = await wm.execute_task({"type": "jwt:sign", "data": {...}})

    Works on asyncio (uvloop too) and trio, under anyio or directly.

    Args:
        workers: a fixed pool of this many workers (not shared with other managers). Default:
            ``max(1, (cpus - S) // S)`` where ``S`` is the number of server processes on
            this machine (``server_processes``, else ``WEB_CONCURRENCY``, else 1).
        kind: ``"process"`` (default), ``"interpreter"`` (Python 3.13+: one GIL per
            subinterpreter; a crash takes the whole process down and code blocked in C
            cannot be stopped), ``"dask"`` (a local Dask cluster, asyncio only), or a kind
            object such as ``offload.dask.DaskKind(address=...)``.
        min_workers, max_workers: a pool that scales instead of a fixed one: it starts
            ``min_workers``, adds workers while tasks wait (up to ``max_workers``), and
            retires workers idle longer than ``idle_timeout`` seconds (default 60).
        max_queue: how many tasks may wait for a worker; one more raises ``QueueFull``.
        max_wait: the longest a task may wait before it starts (seconds). With run-time
            history, a task that would wait longer is refused at once (``WouldTimeOut``);
            one still waiting then is dropped (``TIMEOUT``).
        scheduling: ``"fair"`` (default): within one priority, functions and task types
            share the workers by their measured cost, so cheap work never waits behind a
            burst of expensive work; ``"fifo"``: arrival order within a priority.
        inline_below: run a task on the caller's thread instead of a worker when its recent
            run time is below this many seconds and below what a round trip costs the event
            loop (it gives up kill-on-timeout and crash isolation; ``None``: never).
        process_workers: with ``kind="interpreter"``, extra process workers for task types
            that cannot load in a subinterpreter (``cryptography``, ``zstandard``, ...).
        max_payload: the largest pickled arguments, result or exception, in bytes
            (``PAYLOAD_TOO_LARGE``).
        default_timeout: the deadline for tasks that set none (seconds, or ``None``).
        shutdown_grace: how long shutdown waits for queued and running work (seconds >= 0);
            shutdown returns within it plus a small margin, whatever a worker does.
        start_timeout: how long a worker may take to report READY (seconds).
        interrupt_grace: interpreter workers: how long an interrupted task may take to stop
            before its interpreter is quarantined and replaced (seconds).
        on_task_done: called on the event loop with a ``TaskRecord`` when each accepted task
            gets its outcome (keep it fast; exceptions are logged).
        retry: the default ``Retry`` policy for tasks that set none, or a number of retries
            (``2``: a task runs at most 3 times).
        poison_after: refuse (``POISON_TASK``) a task identical to one that already crashed
            workers this many times (within 10 minutes); ``None`` turns this off.
        spare_workers: process workers kept started and idle, so a lost or recycled worker is
            replaced at once (default 1, or 0 with several server processes).
        max_tasks_per_worker: recycle a worker once it has been given this many tasks.
        max_worker_memory: recycle a process worker whose resident memory (checked between
            tasks) is over this many bytes.
        worker_memory_limit: a hard address-space limit per process worker (``RLIMIT_AS``,
            bytes, at least 1 MiB): an allocation over it raises ``MemoryError`` in the task.
        max_worker_age: recycle a worker older than this many seconds (checked when idle).
        health_interval: ping idle workers every this many seconds (``None``: never); one that
            does not answer within ``health_timeout`` seconds is hung and is replaced.
        worker_nice: how much lower the workers' CPU priority is than the caller's (Unix
            niceness steps, 0 to 19, capped at 19 in all): on busy cores the event loop is
            served first (``0``: equal priority).
        server_processes: how many server processes share this machine (for the default
            ``workers``); default ``WEB_CONCURRENCY``, else 1.

    Raises ``ValueError`` (naming the option and its range) for an option out of range or
    an unknown ``kind`` name, and ``UnsupportedKind`` for a kind this Python cannot run.
    """

    def __init__(
        self,
        workers: int | None = None,
        kind: Literal["process", "interpreter", "dask"] | Any = "process",
        *,
        min_workers: int | None = None,
        max_workers: int | None = None,
        idle_timeout: float | None = None,
        max_queue: int = 1000,
        max_wait: float | None = None,
        scheduling: Literal["fair", "fifo"] = "fair",
        inline_below: float | None = None,
        process_workers: int = 0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        default_timeout: float | None = None,
        shutdown_grace: float = 30.0,
        start_timeout: float = 30.0,
        interrupt_grace: float = 0.25,
        on_task_done: Callable[[Any], None] | None = None,
        retry: Retry | int | None = None,
        poison_after: int | None = 3,
        spare_workers: int | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        worker_memory_limit: int | None = None,
        max_worker_age: float | None = None,
        health_interval: float | None = 5.0,
        health_timeout: float = 10.0,
        worker_nice: int = 10,
        server_processes: int | None = None,
    ) -> None:
        config = make_config(
            workers=workers,
            kind=kind,
            min_workers=min_workers,
            max_workers=max_workers,
            idle_timeout=idle_timeout,
            max_queue=max_queue,
            max_wait=max_wait,
            scheduling=scheduling,
            inline_below=inline_below,
            process_workers=process_workers,
            max_payload=max_payload,
            default_timeout=default_timeout,
            shutdown_grace=shutdown_grace,
            start_timeout=start_timeout,
            interrupt_grace=interrupt_grace,
            on_task_done=on_task_done,
            retry=retry,
            poison_after=poison_after,
            spare_workers=spare_workers,
            max_tasks_per_worker=max_tasks_per_worker,
            max_worker_memory=max_worker_memory,
            worker_memory_limit=worker_memory_limit,
            max_worker_age=max_worker_age,
            health_interval=health_interval,
            health_timeout=health_timeout,
            worker_nice=worker_nice,
            server_processes_=server_processes,
        )
        self._init(config)

    @classmethod
    def from_config(cls, config: Config) -> WorkerManager:
        """A manager from an already checked ``Config`` (``asgi.lifespan`` uses this)."""
        manager = cls.__new__(cls)
        manager._init(config)
        return manager

    def _init(self, config: Config) -> None:
        if config.kind == "interpreter":
            from ._local._subinterp import available

            available()
        self._config = config
        #: The worker kind's name: "process", "interpreter", "dask".
        self.kind = config.kind
        self.max_queue = config.max_queue
        self.max_payload = config.max_payload
        self.default_timeout = config.default_timeout
        self.shutdown_grace = config.shutdown_grace
        self.default_retry = config.retry
        self._state = _State.NEW
        self._backends: dict[str, Backend] = {}
        self._dispatch: Dispatcher | None = None
        self._spawner: Spawner | None = None
        self._runtime: Runtime | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._service_stop: anyio.Event | None = None
        self._service_done: anyio.Event | None = None
        self._closed_event: anyio.Event | None = None
        self._flows: dict[Any, tuple[str, str]] = {}  # fn -> (flow, name)
        self._out_of_band = config.kind in _LOCAL_KINDS
        self._sample = 0
        self._warned_progress = False

    def __repr__(self) -> str:
        size = (
            f"workers={self._config.workers}"
            if not self._config.scaling
            else f"workers={self._config.min_workers}..{self._config.max_workers}"
        )
        return (
            f"<WorkerManager kind={self.kind} {size} max_queue={self.max_queue} "
            f"{self._state.value}>"
        )

    @property
    def config(self) -> Config:
        """The checked options."""
        return self._config

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
        await self.shutdown(grace=0 if cancelled else None)

    async def start(self) -> Self:
        """Start the workers and wait until each has answered READY.

        Raises ``WorkerStartFailed`` (nothing is left running), ``UnsupportedKind``,
        ``MainGuardMissing`` (this runs while a worker imports your script).
        """
        if self._state in (_State.DRAINING, _State.CLOSED):
            raise ManagerClosed(
                f"this WorkerManager is {self._state.value}: a manager runs once; create a new one"
            )
        if self._state is not _State.NEW:
            raise RuntimeError(
                f"this WorkerManager is {self._state.value} already: enter it (or start it) once"
            )
        mainmod = sys.modules.get("offload._offload_worker.mainmod")
        if mainmod is not None and getattr(mainmod, "loading", False):
            raise MainGuardMissing(
                "a worker loaded your script to find a task defined in it, and the script "
                "started a WorkerManager at import time: put the code that starts it under "
                '`if __name__ == "__main__":` (as multiprocessing requires)'
            )
        runtime = self._runtime = current_runtime()
        config = self._config
        settings = {
            "sys_path": list(sys.path),
            "main": _main_reference(),
            "max_payload": config.max_payload,
            "max_rss": config.max_worker_memory,
            "rlimit_as": config.worker_memory_limit,
        }
        alias_main()
        self._backends = self._make_backends(runtime, settings)
        self._spawner = Spawner(runtime)
        self._dispatch = Dispatcher(config, runtime, self._backends, spawn=self._spawner.spawn)
        self._closed_event = anyio.Event()
        await self._start_service(runtime)
        self._state = _State.RUNNING
        try:
            async with anyio.create_task_group() as starting:
                for backend in self._backends.values():
                    assert self._tg is not None
                    starting.start_soon(backend.start, runtime, self._tg)
        except BaseException as exc:
            self._state = _State.CLOSED
            with anyio.CancelScope(shield=True):
                await self._close_backends(0)
                await self._stop_service()
            self._closed_event.set()
            raise _first(exc) from None
        return self

    def _make_backends(self, runtime: Runtime, settings: dict[str, Any]) -> dict[str, Backend]:
        config = self._config
        if config.kind_object is not None:
            if runtime.name != "asyncio" and not getattr(config.kind_object, "any_loop", False):
                raise UnsupportedKind(
                    f"the {config.kind} kind runs on asyncio only (its client is asyncio's); "
                    f"this is {runtime.name}: use kind='process' or 'interpreter'"
                )
            kind = config.kind_object
            backends = {config.kind: kind.create_backend(config.workers, config, settings)}
        else:
            from ._local import LocalPool

            backends = {config.kind: LocalPool(config.kind, config.workers, config, settings)}
        if config.process_workers:
            from ._local import LocalPool

            backends["process"] = LocalPool("process", config.process_workers, config, settings)
        return backends

    async def _start_service(self, runtime: Runtime) -> None:
        """The manager's background work (worker starts, health checks, scaling) runs in a
        task group of its own, in a system task that lives as long as the manager."""
        ready = anyio.Event()
        self._service_stop = stop = anyio.Event()
        self._service_done = done = anyio.Event()

        async def service() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    assert self._spawner is not None
                    tg.start_soon(self._spawner.run, tg)
                    ready.set()
                    await stop.wait()
                    self._spawner.close()
                    tg.cancel_scope.cancel()
            except BaseException:  # the loop is ending without a shutdown: leave nothing
                self._emergency_stop()
                if not isinstance(_first_base(), anyio.get_cancelled_exc_class()):
                    log.exception("offload: the manager's background service failed")
            finally:
                done.set()

        runtime.spawn_system_task(service, name=f"offload-manager-{id(self):x}")
        await ready.wait()

    async def _stop_service(self) -> None:
        if self._service_stop is not None and self._service_done is not None:
            self._service_stop.set()
            await self._service_done.wait()

    def _emergency_stop(self) -> None:
        """The event loop is ending under a running manager (no shutdown, or one cut short):
        kill and reap every process worker now, and mark the manager closed."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._dispatch is not None:
            self._dispatch.closed = True
        for backend in self._backends.values():
            kill_all = getattr(backend, "kill_all", None)
            if kill_all is not None:
                kill_all()
        if self._dispatch is not None:  # callers still waiting (being cancelled) hear it now
            for job in list(self._dispatch.jobs.values()):
                self._dispatch.settle(
                    job,
                    error=ManagerClosed(
                        "the event loop ended under a running manager", task_id=job.task_id
                    ),
                )
        if self._closed_event is not None:
            self._closed_event.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking work, let queued and running tasks finish within ``grace`` seconds
        (default ``shutdown_grace``), fail what is left with ``ManagerClosed`` (``SHUTDOWN``),
        then stop every worker. Returns within ``grace`` plus a small margin, whatever a
        worker does; idempotent. Afterwards no worker process of this manager is alive (an
        interpreter stuck in a C call is left to end when the call returns).
        """
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        if self._state is not _State.RUNNING:
            assert self._closed_event is not None
            await self._closed_event.wait()
            return
        self._state = _State.DRAINING
        grace = self.shutdown_grace if grace is None else _grace(grace)
        dispatch = self._dispatch
        assert dispatch is not None
        assert self._runtime is not None
        dispatch.closed = True
        for backend in self._backends.values():
            backend.drain()
        started = self._runtime.now()
        try:
            if dispatch.jobs and grace > 0:
                with anyio.move_on_after(grace):
                    await dispatch.drained().wait()
        finally:
            # Even when the caller is cancelled here: nothing is left running.
            with anyio.CancelScope(shield=True):
                left = max(0.0, grace - (self._runtime.now() - started))
                await self._finish_shutdown(left)

    async def _finish_shutdown(self, left: float) -> None:
        dispatch = self._dispatch
        assert dispatch is not None
        dispatch.stop_all("shutdown")  # queued: settled now; running: the work is stopped
        if dispatch.jobs:
            with anyio.move_on_after(2.0):  # kills are reaped in milliseconds
                await dispatch.drained().wait()
        await self._close_backends(left)
        for job in list(dispatch.jobs.values()):  # anything a backend could not account for
            dispatch.settle(job, error=ManagerClosed("the manager shut down", task_id=job.task_id))
        await self._stop_service()
        self._state = _State.CLOSED
        assert self._closed_event is not None
        self._closed_event.set()

    async def _close_backends(self, grace: float) -> None:
        async with anyio.create_task_group() as closing:
            for backend in self._backends.values():
                closing.start_soon(backend.aclose, grace)

    @property
    def closed(self) -> bool:
        """True once ``shutdown`` began: submitting raises ``ManagerClosed``."""
        return self._state in (_State.DRAINING, _State.CLOSED)

    def _refuse(self, task_id: str | None) -> Dispatcher:
        if self._state is _State.NEW:
            raise NotStarted(
                "this WorkerManager was never started: use `async with WorkerManager(...) as "
                "wm:` (or `await wm.start()`) before submitting",
                task_id=task_id,
            )
        raise ManagerClosed("the manager is shut down; create a new one", task_id=task_id)

    # -- submitting ----------------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[[*Ts], R],
        *args: *Ts,
        priority: PriorityLike = Priority.NORMAL,
        timeout: float | None = None,
        task_id: str | None = None,
        retry: Retry | int | None = None,
        max_wait: float | None = None,
        on_progress: Callable[[Progress], Any] | None = None,
    ) -> R:
        """Run ``fn(*args)`` on a worker and return its result.

        >>> await wm.run(math.factorial, 500, priority="high", timeout=2.0)  # doctest: +SKIP

        ``fn`` must be picklable by reference (a module-level function); for keyword
        arguments pass ``functools.partial(fn, key=value)``. ``timeout`` (seconds) covers
        waiting and running; any cancel scope around the call stops the work the same way.
        ``on_progress`` receives ``offload.Progress`` events the task sends with
        ``offload.report_progress`` (an async callback is awaited in order).

        Raises what ``fn`` raised (with the worker's traceback as ``__cause__``), or an
        ``OffloadError``: ``QUEUE_FULL``, ``WOULD_TIME_OUT``, ``TIMEOUT``,
        ``WORKER_CRASHED``, ``NOT_SERIALIZABLE``, ``PAYLOAD_TOO_LARGE``, ``SHUTDOWN``...
        """
        dispatch = self._dispatch
        if dispatch is None or self._state is not _State.RUNNING:
            dispatch = self._refuse(task_id)
        prio = priority if type(priority) is Priority else _priority(priority, task_id)
        if timeout is not None:
            timeout = _timeout(timeout, task_id)
        if max_wait is not None:
            max_wait = _timeout(max_wait, task_id, "max_wait")
        retry_policy = _retry(retry, task_id) if retry is not None else self.default_retry
        flow, name = self._flow(fn)
        if retry_policy is None and on_progress is None and self._config.inline_below is None:
            # The common case, in one frame: one attempt, no progress, never inline.
            sample = self._sample = self._sample + 1
            cpu = time.thread_time() if not sample & 63 and not dispatch.jobs else None
            payload = self._encode_here(fn, args, None, task_id)
            if payload is not None:
                job = dispatch.submit(
                    Submission(
                        payload,
                        name,
                        flow,
                        prio,
                        self.default_timeout if timeout is None else timeout,
                        self._config.max_wait if max_wait is None else max_wait,
                        task_id,
                        self.kind,
                    )
                )
                try:
                    await job.waiter.wait()
                except BaseException:
                    if job.state is not JobState.DONE:
                        await self._stop_after_cancel(job)
                    raise
                if cpu is not None and len(dispatch.jobs) == 0:  # alone: its loop cost is this
                    dispatch.note_loop_cost(time.thread_time() - cpu)
                if job.error is None:
                    return job.result  # type: ignore[no-any-return]
                if job.error is CANCELLED:
                    raise ManagerClosed("the task was stopped", task_id=task_id)
                raise job.error
        result: R = await self._call(
            fn,
            args,
            None,
            flow,
            name,
            prio,
            timeout,
            max_wait,
            task_id,
            retry_policy,
            self.kind,
            self._config.inline_below,
            on_progress,
        )
        return result

    async def execute_task(
        self,
        task: Task | Mapping[str, Any],
        *,
        on_progress: Callable[[Progress], Any] | None = None,
    ) -> Any:
        """Run a ``Task``, or a dict naming a registered type, and return its result.

        >>> await wm.execute_task(Task(pow, args=(2, 10), priority=Priority.LOW))  # doctest: +SKIP
        1024
        >>> await wm.execute_task(  # doctest: +SKIP
        ...     {"id": "a1", "type": "demo:add", "data": {"a": 1, "b": 2}, "timeout": 5}
        ... )
        3

        A dict takes the keys ``id``, ``type``, ``data``, ``priority``, ``timeout``,
        ``retries`` and ``max_wait``; anything else is ``INVALID_TASK``, and an unregistered
        ``type`` is ``UNKNOWN_TASK`` (the registry is an allow-list).
        """
        if isinstance(task, Task):
            entry = None
            route = self.kind
            inline = self._config.inline_below
        elif isinstance(task, Mapping):
            task, entry = task_from_dict(task)
            data = task.args[0] if task.args and entry.prepare is None else None
            route = self._route(entry, data, task.id)
            inline = (
                entry.inline_below
                if entry.inline_below is not None
                else (self._config.inline_below)
            )
        else:
            raise InvalidTask(f"execute_task takes a Task or a dict, not {type(task).__name__}")
        if self._dispatch is None or self._state is not _State.RUNNING:
            self._refuse(task.id)
        flow, name = (entry.name, entry.name) if entry is not None else self._flow(task.fn)
        retry = task.retry if task.retry is not None else self.default_retry
        return await self._call(
            task.fn,
            task.args,
            dict(task.kwargs) or None,
            flow,
            name,
            coerce_priority(task.priority),
            task.timeout,
            task.max_wait,
            task.id,
            retry,  # type: ignore[arg-type]
            route,
            inline,
            on_progress,
        )

    def _flow(self, fn: Any) -> tuple[str, str]:
        try:
            known = self._flows.get(fn)
        except TypeError:  # unhashable callable
            flow = flow_of(fn)
            return flow, flow
        if known is None:
            flow = flow_of(fn)
            known = (flow, flow.rpartition(".")[2] if "<" not in flow else flow)
            if len(self._flows) < 4096:
                self._flows[fn] = known
        return known

    def _route(self, entry: RegisteredTask, data: Any, task_id: str | None) -> str:
        """Which of this manager's kinds runs a registered type (with this ``data``)."""
        kinds = entry.kinds_of(data)
        if self.kind in kinds:
            return self.kind
        if "process" in kinds and "process" in self._backends:
            return "process"
        hint = (
            "; give the manager process workers (WorkerManager(kind='interpreter', "
            "process_workers=1))"
            if self.kind == "interpreter" and "process" in kinds
            else ""
        )
        why = f" ({entry.why_not})" if entry.why_not else ""
        raise UnsupportedKind(
            f"task type {entry.name!r} cannot run on {self.kind} workers{why}; it runs on "
            f"{', '.join(sorted(kinds)) or 'no kind'}{hint}",
            task_id=task_id,
        )

    async def _call(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        flow: str,
        name: str,
        priority: Priority,
        timeout: float | None,
        max_wait: float | None,
        task_id: str | None,
        retry: Retry | None,
        route: str,
        inline_below: float | None,
        on_progress: Callable[[Progress], Any] | None,
    ) -> Any:
        dispatch = self._dispatch
        assert dispatch is not None
        if inline_below is not None and dispatch.inline_ok(flow, inline_below):
            return self._inline(fn, args, kwargs, flow, name, priority, task_id)
        if timeout is None:
            timeout = self.default_timeout
        if max_wait is None:
            max_wait = self._config.max_wait
        if on_progress is not None and not self._backends[route].supports_progress:
            if not self._warned_progress:
                self._warned_progress = True
                log.warning(
                    "offload: %s workers send no progress events; on_progress is "
                    "never called there",
                    route,
                )
            on_progress = None
        payload = await self._encode(fn, args, kwargs, task_id)
        sub = Submission(payload, name, flow, priority, timeout, max_wait, task_id, route)
        if on_progress is not None and inspect.iscoroutinefunction(on_progress):
            return await self._with_async_progress(sub, retry, on_progress)
        if on_progress is not None:
            sub = _replace(sub, on_progress=on_progress)
        return await self._attempts(sub, retry)

    async def _attempts(self, sub: Submission, retry: Retry | None) -> Any:
        """Run ``sub``, again under ``retry`` while it fails with a retryable code."""
        if retry is None:
            return await self._attempt(sub)
        runtime = self._runtime
        assert runtime is not None
        deadline = None if sub.timeout is None else runtime.now() + sub.timeout
        attempt = 0
        while True:
            try:
                return await self._attempt(sub)
            except Exception as exc:
                attempt += 1
                delay = should_retry(retry, exc, attempt, runtime.now(), deadline)
                if delay is None or self._state is not _State.RUNNING:
                    raise
            assert self._dispatch is not None
            self._dispatch.stats.retried += 1
            await anyio.sleep(delay)
            if deadline is not None:
                sub = _replace(sub, timeout=max(deadline - runtime.now(), 1e-6))

    async def _attempt(self, sub: Submission) -> Any:
        """One submission: admitted (or refused at once), then its one outcome."""
        dispatch = self._dispatch
        assert dispatch is not None
        sample = self._sample = self._sample + 1
        cpu = time.thread_time() if not sample & 63 and not dispatch.jobs else None
        job = dispatch.submit(sub)
        waiter = job.waiter
        try:
            await waiter.wait()
        except BaseException:
            if job.state is not JobState.DONE:
                await self._stop_after_cancel(job)
            raise
        if cpu is not None and not dispatch.jobs:  # alone: its whole loop cost is this
            dispatch.note_loop_cost(time.thread_time() - cpu)
        if job.error is CANCELLED:  # stopped on another's behalf (e.g. a stream consumer)
            raise ManagerClosed("the task was stopped", task_id=sub.task_id)
        return job.outcome()

    async def _stop_after_cancel(self, job: Job) -> None:
        """The caller left (any cancel scope): stop the work, and wait until it is stopped
        (a process worker killed and reaped) before the cancellation goes on."""
        dispatch = self._dispatch
        runtime = self._runtime
        assert dispatch is not None
        assert runtime is not None
        with anyio.CancelScope(shield=True):
            job.waiter = runtime.waiter()
            dispatch.stop(job, "cancelled")
            if job.state is not JobState.DONE:
                with anyio.move_on_after(_STOP_WAIT):
                    await job.waiter.wait()

    async def _with_async_progress(
        self, sub: Submission, retry: Retry | None, callback: Callable[[Progress], Awaitable[Any]]
    ) -> Any:
        send, receive = anyio.create_memory_object_stream[Progress](math.inf)

        async def deliver() -> None:
            async with receive:
                async for event in receive:
                    try:
                        await callback(event)
                    except Exception:
                        log.exception("offload: an on_progress callback raised")

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)
            try:
                with send:
                    return await self._attempts(_replace(sub, on_progress=send.send_nowait), retry)
            except BaseException:
                tg.cancel_scope.cancel()
                raise

    def _inline(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        flow: str,
        name: str,
        priority: Priority,
        task_id: str | None,
    ) -> Any:
        """Run a tiny task on this thread (its stats and ``on_task_done`` as any other)."""
        dispatch = self._dispatch
        assert dispatch is not None
        started = time.perf_counter()
        try:
            result = fn(*args, **kwargs) if kwargs else fn(*args)
        except Exception as exc:
            dispatch.record_inline(
                name, flow, task_id, priority, time.perf_counter() - started, exc
            )
            raise
        dispatch.record_inline(name, flow, task_id, priority, time.perf_counter() - started, None)
        return result

    async def _encode(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        task_id: str | None,
    ) -> bytes | codec.Payload:
        """The pickled call; big buffers out of band, copied off the loop when big."""
        payload = self._encode_here(fn, args, kwargs, task_id)
        if payload is None:  # big buffers: pickled (and snapshotted) in a thread
            payload = await anyio.to_thread.run_sync(
                self._pickle_call, fn, args, kwargs, task_id, True
            )
            self._check_size(payload, task_id)
        return payload

    def _encode_here(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        task_id: str | None,
    ) -> bytes | codec.Payload | None:
        """The pickled call, or ``None`` when its buffers are too big to copy on the loop."""
        scan = codec.may_hold_buffers(args) or (
            kwargs is not None and codec.may_hold_buffers(kwargs.values())
        )
        if scan and codec.big_buffer_bytes(args, 2) >= codec.OFFLOOP_BYTES:
            return None
        payload = self._pickle_call(fn, args, kwargs, task_id, scan)
        self._check_size(payload, task_id)
        return payload

    def _pickle_call(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        task_id: str | None,
        scan: bool,
    ) -> bytes | codec.Payload:
        try:
            if not scan and self._out_of_band:
                return codec.dumps_plain((fn, args, kwargs or {}))
            return codec.encode((fn, args, kwargs or {}), self._out_of_band, depth=3 if scan else 0)
        except Exception as exc:
            raise NotSerializable(
                f"the task's function or arguments cannot be pickled: {type(exc).__name__}"
                f": {_first_line(exc)}; use module-level functions and picklable arguments",
                task_id=task_id,
            ) from None

    def _check_size(self, payload: bytes | codec.Payload, task_id: str | None) -> None:
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"the arguments are {len(payload)} bytes pickled, over max_payload="
                f"{self.max_payload}; send less (e.g. a file path), or raise max_payload",
                task_id=task_id,
            )

    # -- map and stream ------------------------------------------------------------------------

    def _check_running(self) -> None:
        """``NotStarted`` or ``ManagerClosed`` unless the manager takes work now."""
        if self._dispatch is None or self._state is not _State.RUNNING:
            self._refuse(None)

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T] | AsyncIterable[T],
        *,
        ordered: bool = True,
        chunksize: int | None = None,
        max_in_flight: int | None = None,
        priority: PriorityLike = Priority.NORMAL,
        timeout: float | None = None,
        progress: bool = False,
    ) -> AsyncIterator[R]:
        """Apply ``fn`` to each item of ``iterable`` on the workers, yielding the results.

        >>> async for digest in wm.map(sha256_hex, blobs):  # doctest: +SKIP
        ...     print(digest)

        The iterable (sync or async) is read lazily: at most ``max_in_flight`` items
        (default: 256 per worker, or four chunks per worker when items are so short that chunks
        are bigger) are in flight at once, so a generator of ten million items never
        materialises. Items go out in whole chunks of ``chunksize`` (``None``: adaptive, from
        the measured run time, so that a chunk is about a millisecond of work, at most 4,096
        items). Raises ``NotStarted`` or ``ManagerClosed`` at once, like ``run``. Results come
        in input order, or as they complete with ``ordered=False``. ``timeout`` is per item.
        Leaving the loop early (``break``, a cancellation, or an item's exception) stops the
        rest: nothing of it keeps running. An item's exception is raised at its place, with
        its index in a note. ``progress=True`` shows a progress bar on a terminal (needs
        ``rich``, the ``web`` extra).
        """
        from ._map import map_results

        return map_results(
            self,
            fn,
            iterable,
            ordered=ordered,
            chunksize=chunksize,
            max_in_flight=max_in_flight,
            priority=_priority(priority, None),
            timeout=None if timeout is None else _timeout(timeout, None),
            progress=progress,
        )

    def stream(
        self,
        gen_fn: Callable[..., Iterable[T]],
        *args: Any,
        priority: PriorityLike = Priority.NORMAL,
        timeout: float | None = None,
        buffer: int = 16,
    ) -> Any:
        """Run a generator function on a worker and receive its items as they are made.

        >>> async with wm.stream(export_rows, query, buffer=16) as rows:  # doctest: +SKIP
        ...     async for row in rows:
        ...         await send(row)

        The worker pauses once ``buffer`` items wait unconsumed (backpressure). Leaving the
        block (``break``, a cancellation, an exception) closes the generator in the worker
        (``GeneratorExit``: its ``finally`` runs); one that does not stop within the
        interrupt grace is stopped as on a timeout. ``timeout`` covers the whole stream. An
        exception in the generator is raised here after the items before it. Big items travel
        through shared memory, as results do.
        """
        from ._stream import open_stream

        self._check_running()
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer must be an int >= 1, not {buffer!r}")
        if not self._backends[self.kind].supports_progress:
            raise UnsupportedKind(
                f"{self.kind} workers cannot stream results; use process or interpreter workers"
            )
        return open_stream(
            self,
            gen_fn,
            args,
            _priority(priority, None),
            None if timeout is None else _timeout(timeout, None),
            buffer,
        )

    # -- observing -----------------------------------------------------------------------------

    def stats(self) -> Stats:
        """A frozen snapshot of counters, queue lengths, pool size and wait/run percentiles."""
        if self._dispatch is None:
            from ._stats import StatsRecorder

            return StatsRecorder().snapshot(self.kind, 0, 0, 0, {})
        return self._dispatch.snapshot(self.kind)

    def worker_statistics(self) -> list[WorkerInfo]:
        """A frozen ``WorkerInfo`` per worker: state, tasks done, failures, current task and
        how long it has run, resident memory (processes), start and last activity."""
        return [info for backend in self._backends.values() for info in backend.worker_statistics()]

    def worker_pids(self) -> list[int]:
        """The process ids of this manager's live process workers (for tests and monitoring)."""
        return [pid for backend in self._backends.values() for pid in backend.worker_pids()]


WorkerManager.__module__ = "offload"


def _replace(sub: Submission, **changes: Any) -> Submission:
    return sub.replace(**changes)


def _priority(value: object, task_id: str | None) -> Priority:
    try:
        return coerce_priority(value)
    except InvalidTask as exc:
        exc.task_id = task_id
        raise


def _timeout(value: object, task_id: str | None, name: str = "timeout") -> float | None:
    try:
        return coerce_timeout(value, name)
    except InvalidTask as exc:
        exc.task_id = task_id
        raise


def _retry(value: object, task_id: str | None) -> Retry | None:
    from ._task import coerce_retry

    try:
        return coerce_retry(value)
    except InvalidTask as exc:
        exc.task_id = task_id
        raise


def _grace(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"grace must be a number of seconds >= 0, not {value!r}")
    return float(value)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _first(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _first_base() -> BaseException | None:
    return sys.exc_info()[1]
