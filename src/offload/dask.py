"""Dask worker kind: run offload tasks on a Dask ``distributed`` cluster (``offload[dask]``).

Only the manager's construction changes; tasks, priorities, deadlines and error codes stay
the same::

    >>> from offload import WorkerManager
    >>> from offload.dask import DaskKind
    >>> async def main():  # doctest: +SKIP
    ...     # development: a LocalCluster of 4 worker processes, started and stopped here
    ...     async with WorkerManager(kind="dask", workers=4) as wm:
    ...         print(await wm.run(pow, 2, 10, priority="high", timeout=5))
    ...     # production: an existing cluster (its size is the cluster's business)
    ...     async with WorkerManager(kind=DaskKind(address="tcp://scheduler:8786")) as wm:
    ...         print(await wm.execute_task({"type": "crypto:hash", "data": {"data": "x"}}))

How tasks map onto Dask:

* **Admission control stays local.** At most ``in_flight`` tasks are handed to Dask at once
  (by default the cluster's total threads, followed as workers come and go); the rest wait
  in the manager's own priority queue, so ``max_queue``/``QUEUE_FULL`` and strict
  high-normal-low order behave exactly as with process workers. Handed-over tasks also carry a
  Dask priority (high 10, normal 0, low -10).
* **Deadlines and cancellation.** The caller gets ``TIMEOUT`` (or its cancellation) on time and
  the Dask future is released. **Dask cannot interrupt a task that is already running**: by
  default the call goes on in its Dask worker thread until it returns, and its result is
  dropped. With ``DaskKind(isolate=True)`` each call runs in a child process of the Dask worker
  (offload's own worker script), which is killed when the task is stopped, so a deadline does
  stop the work. Cost: one extra pipe hop and copy of the arguments and result per task, one
  idle child process per busy Dask worker thread (started on first use, ~20-50 ms, then
  reused), and imports happen in that child rather than in the Dask worker.
* **Worker loss** gives ``WORKER_CRASHED``. Without ``isolate``, a task that kills its Dask
  worker (``os._exit``, a segfault, the OOM killer) is reported by Dask as ``KilledWorker``;
  the development cluster is created with ``distributed.scheduler.allowed-failures: 0`` so
  the first death fails the task. A cluster you pass in keeps its own setting (Dask's default
  3 retries the task on up to 3 more workers, killing each). With ``isolate=True`` only the
  child dies: the task fails at once, on any cluster, and the Dask worker lives on.
* **Code and data.** Tasks travel as offload's pickled ``(fn, args, kwargs)``; the functions
  must be importable on the Dask workers (install your package and offload there). The
  development cluster's workers share this machine's ``sys.path``. Arguments over 1 MiB are
  scattered to the cluster first instead of riding in the task graph.
* ``WorkerManager(workers=N)`` sizes the development cluster only; ``wm.worker_pids()`` lists
  its worker processes (nothing for a cluster you pass in); ``stats().workers`` counts Dask
  workers.
* A ``client``/``address`` you pass in is never closed or shut down by offload; a client that
  offload created (from ``address``) is closed, and the development cluster is shut down, when
  the manager shuts down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from . import _worker as wire
from ._outcome import decode_answer
from ._pool import Backend, Ledger, PoolConfig, stopped_error
from ._queue import Job, JobQueue, JobState
from ._task import Priority
from .errors import TaskFailed, UnsupportedKind, WorkerCrashed, WorkerStartFailed

__all__ = ("DaskKind",)

log = logging.getLogger("offload")

#: Dask runs higher numbers first.
DASK_PRIORITY: Final = {Priority.HIGH: 10, Priority.NORMAL: 0, Priority.LOW: -10}
#: Arguments larger than this (pickled) are scattered to the cluster, not put in the graph.
SCATTER_ABOVE: Final = 1 << 20
#: How often the pool asks the scheduler how many workers and threads there are.
REFRESH_INTERVAL: Final = 1.0

# Answers only the isolated runner gives (the wire module's own tags are below 100).
_CHILD_LOST: Final = 101  # payload: pickled text saying how the child ended
_STOPPED: Final = 102  # the task was stopped by its pool before or while it ran
_CHILD_START_FAILED: Final = 103  # payload: pickled text


def _distributed() -> Any:
    """The ``distributed`` module, or ``UnsupportedKind`` saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise UnsupportedKind(
            f"the dask worker kind needs 'distributed' ({exc}): pip install 'offload[dask]'"
        ) from None
    return distributed


class DaskKind:
    """Run a manager's tasks on a Dask cluster: ``WorkerManager(kind=DaskKind(...))``.

    >>> kind = DaskKind(address="tcp://10.0.0.5:8786", isolate=True)  # doctest: +SKIP
    >>> async with WorkerManager(kind=kind, max_queue=10_000) as wm:  # doctest: +SKIP
    ...     await wm.run(crunch, data, timeout=30)

    Args:
        address: a scheduler address; offload connects its own ``Client`` (closed on shutdown).
        client: an already started ``distributed.Client(..., asynchronous=True)`` on the
            manager's event loop; offload uses it and never closes it.
        isolate: run each call in a killable child process of its Dask worker, so that a
            deadline, a cancellation or a shutdown stops the work itself and a crashing call
            does not take its Dask worker down (see the module docstring for the cost).
        in_flight: how many tasks may be handed to Dask at once. Default: the cluster's
            total threads, so a task reaches Dask only when a thread is free (strict priority
            order, and a dying worker fails only the task it ran). Raise it to keep workers
            fed when tasks are tiny, or to let an adaptive cluster see more demand.

    With neither ``address`` nor ``client``, the pool starts a development
    ``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)`` on this
    machine and shuts it down with the manager (``WorkerManager(kind="dask")`` does that).
    """

    name = "dask"

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        isolate: bool = False,
        in_flight: int | None = None,
    ) -> None:
        _distributed()
        if address is not None and client is not None:
            raise ValueError("give DaskKind an address or a client, not both")
        if in_flight is not None and (
            isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1
        ):
            raise ValueError(f"in_flight must be an int >= 1 or None, not {in_flight!r}")
        self.address = address
        self.client = client
        self.isolate = isolate
        self.in_flight = in_flight

    def __repr__(self) -> str:
        where = self.address or ("a client" if self.client is not None else "a local cluster")
        return f"<DaskKind {where} isolate={self.isolate} in_flight={self.in_flight}>"

    def create_pool(self, size: int, ledger: Ledger, config: PoolConfig) -> Backend:
        """The manager calls this once, at start: a pool bound to this kind's cluster."""
        return DaskPool(self, size, ledger, config)


@dataclass(eq=False)
class _Sent:
    """A job handed to Dask: its key, its Dask future, the task waiting for the answer."""

    key: str
    future: Any = None  # distributed.Future, once submitted
    data: Any = None  # the scattered arguments' future, for large arguments
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class DaskPool:
    """The ``Backend`` for Dask: a local priority queue in front of a Dask client."""

    def __init__(self, spec: DaskKind, size: int, ledger: Ledger, config: PoolConfig) -> None:
        self.kind = "dask"
        self.queue = JobQueue()
        self.closing = False
        self._spec = spec
        self._size = size
        self._ledger = ledger
        self._config = config
        self._limit: int = config.settings["max_payload"]
        # What an isolated child needs from the manager's settings (sys.path is the Dask
        # worker's own): the caller's __main__, the payload limit, the address-space cap.
        self._child_settings = {
            key: config.settings.get(key) for key in ("main", "max_payload", "rlimit_as")
        }
        self._token = uuid.uuid4().hex[:12]  # this pool's keys and isolated children
        self._client: Any = None
        self._own_client = False
        self._cluster: Any = None
        self._sent: dict[Job, _Sent] = {}
        self._chores: set[asyncio.Task[Any]] = set()  # stops sent to isolated children
        self._refresher: asyncio.Task[None] | None = None
        self._workers = 0
        self._threads = 0
        self._capacity = 0
        ignored = [
            name
            for name, value in (
                ("max_tasks_per_worker", config.max_tasks_per_worker),
                ("max_worker_age", config.max_worker_age),
                ("max_worker_memory", config.settings.get("max_rss")),
                ("worker_memory_limit", None if spec.isolate else config.settings.get("rlimit_as")),
            )
            if value
        ]
        if ignored:
            log.warning(
                "offload: %s: not for dask workers (Dask has its own worker lifetime and "
                "memory limits; worker_memory_limit applies to isolate=True children); ignored",
                ", ".join(ignored),
            )

    def __repr__(self) -> str:
        return (
            f"<DaskPool {self._token} workers={self._workers} threads={self._threads} "
            f"in_flight={len(self._sent)}/{self._capacity} queued={len(self.queue)}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to (or start) the cluster and learn its size; ``WorkerStartFailed`` if not."""
        distributed = _distributed()
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
            await self._refresh()
        except BaseException as exc:
            await self.aclose(grace=0)
            if isinstance(exc, WorkerStartFailed) or not isinstance(exc, Exception):
                raise
            where = spec.address or "a local cluster"
            why = f"{type(exc).__name__}: {exc}" if str(exc) else f"not within {timeout:g} s"
            raise WorkerStartFailed(f"could not start the dask pool on {where}: {why}") from exc
        self._refresher = asyncio.get_running_loop().create_task(self._follow_cluster())

    async def _start_local_cluster(self, distributed: Any, timeout: float) -> None:
        self._cluster = distributed.LocalCluster(
            n_workers=self._size,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=":0",  # a free port: never "8787 is already in use"
            # A task that kills its worker fails at once instead of killing three more.
            scheduler_kwargs={"allowed_failures": 0},
        )
        async with asyncio.timeout(timeout):
            await self._cluster
        self._own_client = True
        self._client = await distributed.Client(
            self._cluster, asynchronous=True, set_as_default=False, timeout=timeout
        )

    async def aclose(self, grace: float) -> None:
        """Stop what is left, stop this pool's isolated children, close what offload opened.

        The manager has already stopped every job (``stop(job, "shutdown")``); jobs still here
        (a direct call) are stopped the same way.
        """
        if self.closing:
            return
        self.closing = True
        if self._refresher is not None:
            self._refresher.cancel()
        for job in list(self._sent):
            self.stop(job, "shutdown")
        for job in self.queue.waiting():  # settling takes each out of the queue
            self._ledger.settle(job, error=stopped_error(self._ledger, job, "shutdown"))
        await asyncio.gather(*self._chores, return_exceptions=True)
        client = self._client
        if client is not None and self._spec.isolate:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(grace, 5.0)):
                    await client.run(_close_isolated, self._token)
        if client is not None and self._own_client:
            with contextlib.suppress(Exception):
                await client.close(timeout=max(grace, 5.0))
        if self._cluster is not None:
            # Nannies ask their workers to stop, then kill them: none outlives this call.
            await self._cluster.close(timeout=max(grace, 10.0))

    # -- the cluster's size ----------------------------------------------------------------

    async def _refresh(self) -> None:
        threads: dict[str, int] = await self._client.nthreads()
        self._workers = len(threads)
        self._threads = sum(threads.values())
        self._capacity = self._spec.in_flight or max(1, self._threads)
        self.pump()

    async def _follow_cluster(self) -> None:
        while not self.closing:
            await asyncio.sleep(REFRESH_INTERVAL)
            try:
                await self._refresh()
            except Exception as exc:  # the scheduler is away: keep the last known size
                log.debug("offload: dask: cannot ask the scheduler for workers: %s", exc)

    def worker_pids(self) -> list[int]:
        """The development cluster's worker processes; ``[]`` for a cluster passed in."""
        if self._cluster is None:
            return []
        return [pid for w in list(self._cluster.workers.values()) if (pid := _pid_of(w))]

    @property
    def ready_workers(self) -> int:
        return self._workers

    @property
    def ready_spares(self) -> int:
        return 0  # Dask manages its own workers

    @property
    def holding(self) -> int:
        return len(self._sent)

    # -- dispatch --------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Dask can take one more task now (it would not wait in the local queue)."""
        return not self.closing and self._client is not None and len(self._sent) < self._capacity

    def submit(self, job: Job) -> None:
        self.queue.push(job)
        self.pump()

    def pump(self) -> None:
        """Hand waiting jobs to Dask while it has room, highest priority first."""
        while self.has_room():
            job = self.queue.pop()
            if job is None:
                return
            self._send(job)

    def _send(self, job: Job) -> None:
        job.state = JobState.SENT
        sent = _Sent(f"offload-{_key_name(job.name)}-{self._token}-{job.seq}")
        self._sent[job] = sent
        if len(job.payload) <= SCATTER_ABOVE:
            try:
                sent.future = self._submit(job, sent, job.payload)
            except Exception as exc:  # the client is closed or broken
                self._forget(job)
                self._ledger.settle(job, error=_dask_error(job, exc))
                return
        sent.watcher = asyncio.get_running_loop().create_task(self._watch(job, sent))

    def _submit(self, job: Job, sent: _Sent, payload: Any) -> Any:
        if self._spec.isolate:
            fn: Any = _run_isolated
            args: tuple[Any, ...] = (payload, self._child_settings, self._token, sent.key)
        else:
            fn, args = _run_here, (payload, self._limit)
        return self._client.submit(
            fn, *args, key=sent.key, priority=DASK_PRIORITY[job.priority], retries=0, pure=False
        )

    async def _watch(self, job: Job, sent: _Sent) -> None:
        """Wait for the job's answer and settle it (cancelled when the job is stopped)."""
        try:
            if sent.future is None:  # large arguments: scatter them first, then submit
                sent.data = await self._client.scatter(job.payload, hash=False)
                sent.future = self._submit(job, sent, sent.data)
            tag, answer, seconds = await sent.future
        except Exception as exc:
            if self._sent.get(job) is sent:
                self._forget(job)
                self._ledger.settle(job, error=self._lost(job, exc))
                self.pump()
            return
        if self._sent.get(job) is not sent:
            return  # stopped meanwhile: already settled
        self._forget(job)
        self._settle_answer(job, tag, answer, seconds)
        self.pump()

    def _settle_answer(self, job: Job, tag: int, answer: bytes, seconds: float) -> None:
        settle = self._ledger.settle
        if tag == _CHILD_LOST:
            self._config.on_restart()
            note = pickle.loads(answer)
            settle(
                job,
                error=WorkerCrashed(
                    f"the isolated process running this task on its dask worker died{note}; "
                    "the dask worker lives on",
                    task_id=job.task_id,
                ),
                run=seconds,
            )
        elif tag == _CHILD_START_FAILED:
            settle(job, error=WorkerStartFailed(pickle.loads(answer), task_id=job.task_id))
        elif tag == _STOPPED:
            settle(job, error=WorkerCrashed("the task was stopped", task_id=job.task_id))
        else:
            body, buffers = memoryview(answer), None
            if tag & wire.OOB:  # from an isolated child: its big buffers follow inline
                tag &= ~wire.OOB
                body, buffers, _ = wire.decode_body(body, [])
            try:
                result = decode_answer(tag, body, "dask", job.task_id, buffers)
            except BaseException as exc:
                settle(job, error=exc, run=seconds)
            else:
                settle(job, result=result, run=seconds)

    def _lost(self, job: Job, exc: Exception) -> BaseException:
        """What the caller sees when Dask itself failed the task."""
        if type(exc).__name__ == "KilledWorker":
            if self._cluster is not None:
                self._config.on_restart()  # its nanny starts a new worker
            worker = getattr(getattr(exc, "last_worker", None), "address", "?")
            return WorkerCrashed(
                f"the dask worker running this task ({worker}) died; with isolate=True a "
                "crashing task takes only its own child process down",
                task_id=job.task_id,
            )
        if isinstance(exc, concurrent.futures.CancelledError):
            return WorkerCrashed(
                f"dask dropped this task ({exc}); was the scheduler lost?", task_id=job.task_id
            )
        return _dask_error(job, exc)

    def _forget(self, job: Job) -> _Sent | None:
        """Take ``job`` out of Dask's hands: release its futures (the cluster forgets it)."""
        sent = self._sent.pop(job, None)
        if sent is not None:
            for future in (sent.future, sent.data):
                if future is not None:
                    with contextlib.suppress(Exception):
                        future.release()
        return sent

    def stop(self, job: Job, reason: str) -> None:
        """Give ``job`` its "timeout", "cancelled" or "shutdown" outcome now.

        A job still in the local queue never reaches Dask. A handed-over one is released
        (Dask drops it if it has not started); with ``isolate=True`` its child process is
        killed, otherwise a running call goes on in its Dask worker until it returns.
        """
        if job.state is JobState.QUEUED:
            self._ledger.settle(job, error=stopped_error(self._ledger, job, reason))
            return
        if job.state is not JobState.SENT:
            return
        sent = self._forget(job)
        self._ledger.settle(job, error=stopped_error(self._ledger, job, reason))
        if sent is None:
            return
        if sent.watcher is not None:
            sent.watcher.cancel()
        if self._spec.isolate and self._client is not None:
            task = asyncio.get_running_loop().create_task(self._stop_isolated(sent.key))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)
        self.pump()

    async def _stop_isolated(self, key: str) -> None:
        try:
            await self._client.run(_stop_isolated, self._token, key)
        except Exception as exc:
            log.warning("offload: dask: could not stop the isolated task %s: %s", key, exc)

    def all_jobs(self) -> list[Job]:
        """Every job still waiting for its outcome: queued, or handed to Dask."""
        return list(self._sent) + self.queue.waiting()


def _key_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name) or "task"


def _pid_of(worker: Any) -> int | None:
    pid = getattr(worker, "pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None


def _dask_error(job: Job, exc: Exception) -> TaskFailed:
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    failed = TaskFailed(
        f"dask could not run this task: {type_name}: {exc} (are offload and the task's "
        "modules installed on the dask workers?)",
        task_id=job.task_id,
        exc_type=type_name,
        remote_traceback="".join(traceback.format_exception(exc)),
    )
    failed.__cause__ = exc
    return failed


# -- on the dask worker --------------------------------------------------------------------


def _run_here(payload: bytes, limit: int) -> tuple[int, bytes, float]:
    """Run one pickled call in this Dask worker's thread: ``(tag, answer, seconds)``.

    A function from the caller's ``__main__`` resolves only where that module is loaded
    already (the development cluster's workers are started from it); offload does not load
    it into a shared Dask worker. Isolated children load it as process workers do.
    """
    return wire.execute(payload, limit)


class _Child:
    """A child Python running offload's worker script, driven over pipes, one call at a time.

    Blocking; used from Dask worker threads. ``kill`` may be called from another thread.
    """

    def __init__(self, token: str, settings: dict[str, Any]) -> None:
        self.token = token
        self.stopped = False
        self._seq = 0
        task_r, self._task_w = os.pipe()
        self._answer_r, answer_w = os.pipe()
        control_r, self._control_w = os.pipe()
        child_fds = (task_r, answer_w, control_r)
        try:
            # -P: the script's folder holds modules named like stdlib ones.
            self.process = subprocess.Popen(
                [sys.executable, "-P", wire.__file__, *map(str, child_fds)],
                pass_fds=child_fds,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            self._close_fds()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self._send(0, wire.INIT, pickle.dumps(settings, wire.PICKLE_PROTOCOL))
        frame = self._receive()
        if frame is None or frame[0] != wire.READY:
            note = self.reap()
            raise RuntimeError(f"offload's worker script did not start{note}")

    def run(self, payload: bytes) -> tuple[int, bytes, float] | None:
        """The call's answer, or ``None`` if the child died (or was killed) meanwhile."""
        self._seq += 1
        try:
            self._send(self._seq, wire.RUN, payload)
        except OSError:
            return None
        frame = self._receive()
        if frame is None:
            return None
        return frame

    def _send(self, task_id: int, tag: int, payload: bytes) -> None:
        view = memoryview(wire.HEADER.pack(task_id, tag, len(payload), 0.0) + payload)
        while view:
            view = view[os.write(self._task_w, view) :]

    def _read(self, size: int) -> bytes | None:
        chunks = []
        while size:
            chunk = os.read(self._answer_r, min(size, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _receive(self) -> tuple[int, bytes, float] | None:
        header = self._read(wire.HEADER.size)
        if header is None:
            return None
        _, tag, length, seconds = wire.HEADER.unpack(header)
        payload = self._read(length) if length else b""
        return None if payload is None else (tag, payload, seconds)

    def kill(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.process.send_signal(signal.SIGKILL)

    def reap(self) -> str:
        """Wait for the child to exit (it does once its pipes close) and say how it ended."""
        self._close_fds()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.wait()
        if code < 0:
            with contextlib.suppress(ValueError):
                return f" (killed by {signal.Signals(-code).name})"
            return f" (killed by signal {-code})"
        return f" (exit code {code})"

    def _close_fds(self) -> None:
        for name in ("_task_w", "_answer_r", "_control_w"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class _Isolated:
    """Per Dask worker process: the isolated children of each pool (by the pool's token)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[str, list[_Child]] = {}  # token -> children waiting for a call
        self.busy: dict[str, _Child] = {}  # dask key -> the child running it
        self.starting: dict[str, int] = {}  # token -> children being started
        self.stopped: dict[str, float] = {}  # keys stopped before their call began -> when
        self.closed: set[str] = set()  # tokens of pools that shut down

    def take(self, token: str, key: str) -> tuple[bool, _Child | None]:
        """``(go, child)``: whether the call may run, and an idle child if there is one."""
        with self.lock:
            if self.stopped.pop(key, None) is not None or token in self.closed:
                return False, None
            idle = self.idle.get(token)
            if idle:
                child = idle.pop()
                self.busy[key] = child
                return True, child
            self.starting[token] = self.starting.get(token, 0) + 1
            return True, None

    def started(self, token: str, key: str, child: _Child | None) -> bool:
        """A new child is up (or failed to start): whether its call may run."""
        go = False
        if child is not None:
            with self.lock:
                go = self.stopped.pop(key, None) is None and token not in self.closed
                if go:
                    self.busy[key] = child
            if not go:
                self.put_back(token, child)
        with self.lock:
            self.starting[token] -= 1
            if not self.starting[token]:
                del self.starting[token]
        return go

    def put_back(self, token: str, child: _Child) -> None:
        """Keep ``child`` for the pool's next call, or end it if the pool shut down."""
        with self.lock:
            if token not in self.closed:
                self.idle.setdefault(token, []).append(child)
                return
        child.kill()
        child.reap()

    def done(self, key: str) -> None:
        with self.lock:
            self.busy.pop(key, None)

    def active(self, token: str) -> bool:
        with self.lock:
            return token in self.starting or any(c.token == token for c in self.busy.values())

    def prune(self) -> None:
        old = time.monotonic() - 300.0
        for key in [k for k, when in self.stopped.items() if when < old]:
            del self.stopped[key]


_ISOLATED: Final = _Isolated()


def _run_isolated(
    payload: bytes, settings: dict[str, Any], token: str, key: str
) -> tuple[int, bytes, float]:
    """Run one pickled call in a child process of this Dask worker (killed if stopped).

    ``settings``: the child's INIT settings but ``sys_path`` (this worker's is used).
    """
    iso = _ISOLATED
    go, child = iso.take(token, key)
    if not go:
        return _STOPPED, b"", 0.0
    if child is None:
        try:
            child = _Child(token, {**settings, "sys_path": list(sys.path)})
        except Exception as exc:
            iso.started(token, key, None)
            message = f"could not start an isolated process on the dask worker: {exc}"
            return _CHILD_START_FAILED, pickle.dumps(message), 0.0
        if not iso.started(token, key, child):
            return _STOPPED, b"", 0.0
    try:
        answer = child.run(payload)
        if answer is None:  # killed to stop it, or it died
            note = child.reap()
            return (_STOPPED, b"", 0.0) if child.stopped else (_CHILD_LOST, pickle.dumps(note), 0.0)
        iso.put_back(token, child)
        return answer
    finally:
        iso.done(key)  # last: a closing pool waits until its children are gone


def _stop_isolated(token: str, key: str) -> bool:
    """Kill the child running ``key`` here, or make sure the call never starts here."""
    iso = _ISOLATED
    with iso.lock:
        child = iso.busy.get(key)
        if child is not None and child.token == token:
            child.kill()
            return True
        iso.prune()
        iso.stopped[key] = time.monotonic()
    return False


async def _close_isolated(token: str) -> int:
    """A pool shut down: end its children on this Dask worker, and wait until they are gone.

    Runs on the Dask worker's event loop (``Client.run``).
    """
    iso = _ISOLATED
    with iso.lock:
        iso.closed.add(token)
        idle = iso.idle.pop(token, [])
        for child in iso.busy.values():
            if child.token == token:
                child.kill()  # its call's thread reaps it
    for child in idle:
        child.kill()
        child.reap()
    deadline = time.monotonic() + 10.0
    while iso.active(token) and time.monotonic() < deadline:  # noqa: ASYNC110 (threads)
        await asyncio.sleep(0.01)
    return len(idle)
