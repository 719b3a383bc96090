"""The Dask backend: hands the dispatcher's tickets to a Dask client and reports their outcomes.

Admission is the dispatcher's: ``offer`` takes a ticket only while fewer than ``in_flight``
tickets are in Dask's hands, and the dispatcher keeps everything else in its own queue. Each
ticket taken becomes one Dask task (its key names the task, the manager and a number), with a
Dask priority from the ticket's, watched by a task in the manager's task group until Dask
answers; the answer goes up as an ``Outcome``, and ``on_capacity`` says there is room again.

Outcomes: ``ANSWER`` with the worker package's tag and payload (from ``_runner.run_here`` or
the isolated child), or with ``LOAD_FAILED`` and an offload error when Dask itself could not
run the task; ``LOST`` when the Dask worker (``KilledWorker``) or the isolated child died, or
Dask dropped the task; ``STOPPED`` once a stopped ticket's future is released (and, with
``isolate=True``, its child killed).

Everything here is written on anyio and awaits Dask's own awaitables (the client, its futures,
the cluster); nothing imports asyncio. The manager makes this backend only on asyncio, because
Dask's asynchronous client runs there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import re
import traceback
import uuid
from concurrent.futures import CancelledError as FutureCancelled
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from .._backend import BackendStats, Outcome, OutcomeKind, OutcomeSink, Ticket
from .._offload_worker import protocol as p
from .._offload_worker.codec import Payload, decode_body
from ..errors import OffloadError, TaskFailed, UnsupportedKind, WorkerStartFailed
from . import _isolated, _runner
from ._kind import load_distributed

if TYPE_CHECKING:
    from .._config import Config
    from .._runtime import Runtime, Waiter
    from .._stats import WorkerInfo
    from ._kind import DaskKind

__all__ = ("DASK_PRIORITY", "SCATTER_ABOVE", "DaskBackend")

log = logging.getLogger("offload")

#: Dask runs higher numbers first; a ticket's priority is 0 (high), 1 (normal) or 2 (low).
DASK_PRIORITY: Final = (10, 0, -10)
#: Arguments larger than this (pickled, bytes) are scattered to the cluster, not put in the graph.
SCATTER_ABOVE: Final = 1 << 20
#: How often the backend asks the scheduler how many workers and threads there are (seconds).
REFRESH_INTERVAL: Final = 1.0
#: How long a stop waits for the Dask workers to kill an isolated child (seconds).
_STOP_WAIT: Final = 5.0


class _Sent:
    """A ticket in Dask's hands: its key, its futures, and the scope of the task watching it."""

    __slots__ = ("body", "data", "error", "future", "key", "oob", "scope", "stopped", "ticket")

    def __init__(self, key: str, ticket: Ticket, body: bytes, oob: bool) -> None:
        self.key = key
        self.ticket = ticket
        self.body: bytes | None = body  # kept only until it is scattered
        self.oob = oob
        self.future: Any = None  # distributed.Future, once submitted
        self.data: Any = None  # the scattered arguments' future (large arguments)
        self.error: Exception | None = None  # why it could not be submitted
        # The watching task's scope (made in that task: ``stop`` may run in a loop callback,
        # where no anyio object can be made, only cancelled).
        self.scope: anyio.CancelScope | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()

    def release(self) -> None:
        """Let Dask forget it (a task that has not started is dropped)."""
        for future in (self.future, self.data):
            if future is not None:
                with contextlib.suppress(Exception):
                    future.release()
        self.future = self.data = self.body = None


class DaskBackend:
    """The ``Backend`` for Dask (see the module docstring).

    ``supports_progress`` is ``False``: a Dask task sends no progress events, and a stream
    ticket fails with ``UnsupportedKind``.
    """

    kind = "dask"
    supports_progress = False

    def __init__(self, spec: DaskKind, size: int, config: Config, settings: dict[str, Any]) -> None:
        self._spec = spec
        self._config = config
        self._size = size
        self._limit = config.max_payload
        self._child_settings = self._settings_for_children(spec, config, settings)
        self._token = uuid.uuid4().hex[:12]  # this backend's keys and isolated children
        self._numbers = itertools.count(1)
        self._sink: OutcomeSink | None = None
        self._runtime: Runtime | None = None
        self._client: Any = None
        self._own_client = False
        self._cluster: Any = None
        self._sent: dict[int, _Sent] = {}  # ticket key -> what Dask holds for it
        self._stopping: dict[int, anyio.CancelScope | None] = {}  # ticket key -> stop's scope
        self._quiet: Waiter | None = None  # fired when the last stop under way is done
        self._refresher: anyio.CancelScope | None = None
        # Work for the manager's task group, from code that may run in a loop callback (a
        # deadline's timer), where no task can be started: the spawner starts it.
        self._new: list[tuple[bool, _Sent]] = []  # (a stop?, the ticket's record)
        self._wake: Waiter | None = None
        self._spawner: anyio.CancelScope | None = None
        self._workers = 0
        self._threads = 0
        self._capacity = 0
        self._restarts = 0
        self._closed = False
        self._warn_ignored(spec, config)

    def __repr__(self) -> str:
        return (
            f"<DaskBackend {self._token} workers={self._workers} threads={self._threads} "
            f"in_flight={len(self._sent)}/{self._capacity}>"
        )

    @staticmethod
    def _settings_for_children(
        spec: DaskKind, config: Config, settings: dict[str, Any]
    ) -> dict[str, Any]:
        """What an isolated child needs (its ``sys.path`` is its Dask worker's): the caller's
        ``__main__``, the payload limit, the address-space cap."""
        return {
            "main": settings.get("main"),
            "max_payload": config.max_payload,
            "rlimit_as": config.worker_memory_limit if spec.isolate else None,
        }

    @staticmethod
    def _warn_ignored(spec: DaskKind, config: Config) -> None:
        ignored = [
            name
            for name, value in (
                ("max_tasks_per_worker", config.max_tasks_per_worker),
                ("max_worker_age", config.max_worker_age),
                ("max_worker_memory", config.max_worker_memory),
                ("worker_memory_limit", None if spec.isolate else config.worker_memory_limit),
                ("min_workers/max_workers", config.scaling),
            )
            if value
        ]
        if ignored:
            log.warning(
                "offload: %s: not for dask workers (Dask has its own worker lifetime, memory "
                "limits and adaptive scaling; worker_memory_limit applies to isolate=True "
                "children); ignored",
                ", ".join(ignored),
            )

    # -- lifecycle -----------------------------------------------------------------------------

    def bind(self, sink: OutcomeSink) -> None:
        self._sink = sink

    async def start(self, runtime: Runtime, tg: anyio.abc.TaskGroup) -> None:
        """Connect to (or start) the cluster and learn its size.

        Raises ``WorkerStartFailed`` (``WORKER_START_FAILED``) when the scheduler cannot be
        reached or the cluster does not start within ``start_timeout``; nothing is left open.
        """
        self._runtime = runtime
        distributed = load_distributed()
        timeout = self._config.start_timeout
        spec = self._spec
        try:
            if spec.client is not None:
                client = spec.client
                if not getattr(client, "asynchronous", False) or client.status != "running":
                    raise WorkerStartFailed(
                        "DaskKind(client=...) needs a started asynchronous client on this "
                        "event loop: `await Client(address, asynchronous=True)`"
                    )
                self._client = client
            elif spec.address is not None:
                self._own_client = True
                self._client = await distributed.Client(
                    spec.address, asynchronous=True, set_as_default=False, timeout=timeout
                )
            else:
                await self._start_local_cluster(distributed, timeout)
            with anyio.fail_after(timeout):
                await self._refresh()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose(0)
            if isinstance(exc, WorkerStartFailed) or not isinstance(exc, Exception):
                raise
            where = spec.address or "a local cluster"
            why = f"{type(exc).__name__}: {exc}" if str(exc) else f"not within {timeout:g} s"
            raise WorkerStartFailed(f"could not start the dask pool on {where}: {why}") from exc
        tg.start_soon(self._follow_cluster)
        tg.start_soon(self._spawn, tg)

    async def _start_local_cluster(self, distributed: Any, timeout: float) -> None:
        size = self._config.max_workers if self._config.scaling else self._size
        self._cluster = distributed.LocalCluster(
            n_workers=max(1, size),
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=":0",  # a free port: never "8787 is already in use"
            # A task that kills its worker fails at once instead of killing three more.
            scheduler_kwargs={"allowed_failures": 0},
        )
        with anyio.fail_after(timeout):
            await self._cluster
        self._own_client = True
        self._client = await distributed.Client(
            self._cluster, asynchronous=True, set_as_default=False, timeout=timeout
        )

    def drain(self) -> None:
        """Shutdown began. Dask replaces its own workers; queued tickets still run until the
        manager stops them, so nothing changes here."""

    async def aclose(self, grace: float) -> None:
        """Stop following the cluster, end this manager's isolated children on every Dask
        worker (and wait until they are gone), close the client offload opened and shut the
        development cluster down. Idempotent.

        The manager has stopped every ticket first; tickets still held are released here and
        their jobs settled by the manager.
        """
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
        if self._stopping and self._runtime is not None:
            self._quiet = self._runtime.waiter()
            with anyio.move_on_after(max(grace, 0.0) + _STOP_WAIT):
                await self._quiet.wait()  # kills under way finish first
        if self._spawner is not None:
            self._spawner.cancel()
        for scope in self._stopping.values():
            if scope is not None:
                scope.cancel()
        for sent in self._sent.values():
            sent.stop()
            sent.release()
        self._sent.clear()
        client = self._client
        if client is not None and self._spec.isolate:
            with anyio.move_on_after(max(grace, 10.0)), contextlib.suppress(Exception):
                await client.run(_isolated.close_isolated, self._token)
        if client is not None and self._own_client:
            with contextlib.suppress(Exception):
                await client.close(timeout=max(grace, 5.0))
        if self._cluster is not None:
            # Nannies ask their workers to stop, then kill them: none outlives this call.
            await self._cluster.close(timeout=max(grace, 10.0))

    # -- the cluster's size --------------------------------------------------------------------

    async def _refresh(self) -> None:
        threads: dict[str, int] = await self._client.nthreads()
        self._workers = len(threads)
        self._threads = sum(threads.values())
        before = self._capacity
        self._capacity = self._spec.in_flight or max(1, self._threads)
        if self._capacity > before and self._sink is not None and not self._closed:
            self._sink.on_capacity()

    async def _spawn(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the watchers and stops that ``offer`` and ``stop`` asked for."""
        assert self._runtime is not None
        with anyio.CancelScope() as self._spawner:
            while True:
                new, self._new = self._new, []
                for stopping, sent in new:
                    tg.start_soon(self._finish_stop if stopping else self._watch, sent)
                if not self._new:
                    self._wake = self._runtime.waiter()
                    await self._wake.wait()

    def _later(self, stopping: bool, sent: _Sent) -> None:
        self._new.append((stopping, sent))
        if self._wake is not None:
            self._wake.fire()

    async def _follow_cluster(self) -> None:
        with anyio.CancelScope() as self._refresher:
            while not self._closed:
                await anyio.sleep(REFRESH_INTERVAL)
                try:
                    await self._refresh()
                except Exception as exc:  # the scheduler is away: keep the last known size
                    log.debug("offload: dask: cannot ask the scheduler for workers: %s", exc)

    # -- tickets -------------------------------------------------------------------------------

    def offer(self, ticket: Ticket) -> bool:
        """Hand ``ticket`` to Dask if fewer than ``in_flight`` tickets are there already."""
        if self._closed or self._client is None or len(self._sent) >= self._capacity:
            return False
        body, oob = _body(ticket.payload)
        key = f"offload-{_key_name(ticket.name)}-{self._token}-{next(self._numbers)}"
        sent = _Sent(key, ticket, body, oob)
        if ticket.stream:
            sent.error = UnsupportedKind(
                "dask tasks cannot stream: run generator functions on process or interpreter "
                "workers",
                task_id=ticket.task_id,
            )
        elif len(body) <= SCATTER_ABOVE:
            try:
                sent.future = self._submit(sent, body)
            except Exception as exc:  # the client is closed or broken
                sent.error = exc
        self._sent[ticket.key] = sent
        self._later(False, sent)
        return True

    def _submit(self, sent: _Sent, data: Any) -> Any:
        """Submit the call (``data``: its bytes, or the scattered future of them)."""
        if self._spec.isolate:
            fn: Any = _isolated.run_isolated
            args: tuple[Any, ...] = (data, sent.oob, self._child_settings, self._token, sent.key)
        else:
            fn, args = _runner.run_here, (data, sent.oob, self._limit)
        return self._client.submit(
            fn,
            *args,
            key=sent.key,
            priority=DASK_PRIORITY[sent.ticket.priority],
            retries=0,
            pure=False,
        )

    async def _watch(self, sent: _Sent) -> None:
        """Wait for Dask's answer to ``sent`` and report it (cancelled when it is stopped)."""
        outcome: Outcome | None = None
        if sent.stopped:
            return
        with anyio.CancelScope() as sent.scope:
            try:
                if sent.error is not None:
                    raise sent.error
                if sent.future is None:  # large arguments: scatter them first, then submit
                    sent.data = await self._client.scatter(sent.body, hash=False)
                    sent.body = None
                    sent.future = self._submit(sent, sent.data)
                answer = await sent.future
            except Exception as exc:
                outcome = self._failure(sent, exc)
            else:
                outcome = self._answer(answer)
        ticket = sent.ticket
        if outcome is None or self._sent.get(ticket.key) is not sent:
            return  # stopped meanwhile: the stop reports it
        del self._sent[ticket.key]
        sent.release()
        self._report(ticket, outcome)

    def _answer(self, answer: tuple[int, bytes, float]) -> Outcome:
        tag, payload, seconds = answer
        if tag == _isolated.CHILD_LOST:
            self._restarts += 1
            how = pickle.loads(payload)
            return Outcome(
                OutcomeKind.LOST,
                seconds=seconds,
                note=f" (isolate=True: only the task's own child process of the Dask worker "
                f"ended{how}; the Dask worker lives on)",
            )
        if tag == _isolated.CHILD_START_FAILED:
            return _failed(WorkerStartFailed(pickle.loads(payload)))
        if tag == _isolated.STOPPED:  # its manager's children were closed under it
            return Outcome(OutcomeKind.STOPPED)
        if tag & p.OOB:  # from an isolated child: the result's big buffers follow inline
            data, buffers, _ = decode_body(memoryview(payload), [])
            return Outcome(OutcomeKind.ANSWER, tag & ~p.OOB, data, seconds, buffers=buffers)
        return Outcome(OutcomeKind.ANSWER, tag, payload, seconds)

    def _failure(self, sent: _Sent, exc: Exception) -> Outcome:
        """What Dask's own failure to run ``sent`` means for its ticket."""
        if isinstance(exc, OffloadError):
            exc.task_id = sent.ticket.task_id
            return _failed(exc)
        if type(exc).__name__ == "KilledWorker":
            if self._cluster is not None:
                self._restarts += 1  # its nanny starts a new worker
            worker = getattr(getattr(exc, "last_worker", None), "address", "?")
            return Outcome(
                OutcomeKind.LOST,
                note=f" (Dask: KilledWorker, last on {worker}; with isolate=True a crashing "
                "task takes only its own child process down)",
            )
        if isinstance(exc, FutureCancelled):
            return Outcome(
                OutcomeKind.LOST, note=f" (Dask dropped the task: {exc}; was the scheduler lost?)"
            )
        type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return _failed(
            TaskFailed(
                f"dask could not run this task: {type_name}: {exc} (are offload and the task's "
                "modules installed on the dask workers?)",
                task_id=sent.ticket.task_id,
                exc_type=type_name,
                remote_traceback="".join(traceback.format_exception(exc)),
            )
        )

    def _report(self, ticket: Ticket, outcome: Outcome) -> None:
        assert self._sink is not None
        self._sink.on_outcome(ticket, outcome)
        self._sink.on_capacity()

    def stop(self, ticket: Ticket) -> None:
        """Release ``ticket``'s future (Dask drops it if it has not started) and report
        ``STOPPED``; with ``isolate=True``, first kill the child running it (or make sure it
        never starts). Without isolation a running call goes on in its Dask worker thread."""
        sent = self._sent.pop(ticket.key, None)
        if sent is None:
            return
        sent.stop()
        sent.release()
        self._stopping[ticket.key] = None
        self._later(True, sent)

    async def _finish_stop(self, sent: _Sent) -> None:
        ticket = sent.ticket
        with anyio.CancelScope() as scope:
            self._stopping[ticket.key] = scope
            if self._spec.isolate and self._client is not None and not self._closed:
                with anyio.move_on_after(_STOP_WAIT):
                    try:
                        await self._client.run(_isolated.stop_isolated, self._token, sent.key)
                    except Exception as exc:
                        log.warning(
                            "offload: dask: could not stop the isolated task %s: %s", sent.key, exc
                        )
        del self._stopping[ticket.key]
        if not self._stopping and self._quiet is not None:
            self._quiet.fire()
        if not scope.cancelled_caught:
            self._report(ticket, Outcome(OutcomeKind.STOPPED))

    def credit(self, ticket: Ticket, items: int) -> None:
        """Streams do not run on Dask (``supports_progress`` is ``False``)."""

    def close_stream(self, ticket: Ticket) -> None:
        """Streams do not run on Dask (``supports_progress`` is ``False``)."""

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> BackendStats:
        """Dask workers (as last counted, every ``REFRESH_INTERVAL``), tickets in Dask's hands,
        and lost workers or isolated children. No bounds: Dask sizes its own cluster."""
        held = len(self._sent)
        return BackendStats(
            kind=self.kind,
            workers=self._workers,
            busy=min(held, self._threads),
            holding=held,
            restarts=self._restarts,
        )

    def worker_statistics(self) -> list[WorkerInfo]:
        """Empty: Dask's own dashboard has per-worker figures."""
        return []

    def worker_pids(self) -> list[int]:
        """The development cluster's worker processes; ``[]`` for a cluster passed in."""
        if self._cluster is None:
            return []
        return [pid for w in list(self._cluster.workers.values()) if (pid := _pid_of(w))]


def _body(payload: bytes | Payload) -> tuple[bytes, bool]:
    """A ticket's call as bytes, and whether it is a ``Payload`` body (out-of-band buffers
    inline after the pickle). The manager sends Dask plain bytes; a ``Payload`` is flattened."""
    if isinstance(payload, Payload):
        return b"".join(payload.parts(None, 0)), True
    return bytes(payload), False


def _failed(error: OffloadError) -> Outcome:
    """An outcome that raises ``error`` for the caller, as a worker's LOAD_FAILED answer."""
    tb = error.remote_traceback if isinstance(error, TaskFailed) else ""
    info = (pickle.dumps(error, p.PICKLE_PROTOCOL), type(error).__qualname__, str(error), tb)
    return Outcome(OutcomeKind.ANSWER, p.LOAD_FAILED, pickle.dumps(info, p.PICKLE_PROTOCOL))


def _key_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name) or "task"


def _pid_of(worker: Any) -> int | None:
    pid = getattr(worker, "pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None
