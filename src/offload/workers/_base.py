"""What every worker kind shares: pipes, the READY handshake, the line of jobs it holds."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import pickle
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from .. import _worker as wire
from .._connection import Connection, grow_pipe
from ..errors import WorkerStartFailed

if TYPE_CHECKING:
    from .._queue import Job

__all__ = ("Worker", "WorkerEvents")


class WorkerEvents(Protocol):
    """How a worker reports to its pool."""

    def on_answer(
        self,
        worker: Worker,
        task_id: int,
        tag: int,
        payload: memoryview,
        seconds: float,
        buffers: list[Any] | None,
    ) -> None: ...

    def on_lost(self, worker: Worker) -> None: ...

    def recycle(self, worker: Worker, why: str) -> None: ...

    def on_stolen(self, worker: Worker, task_id: int) -> None: ...


class Worker(abc.ABC):
    """One worker: a process or an interpreter, running one task at a time, in order.

    ``inflight`` holds what it was sent: the first job is running (or about to), at most one
    more waits behind it. Answers come back in the same order.
    """

    kind: str = ""

    def __init__(self, events: WorkerEvents, number: int) -> None:
        self.events = events
        self.number = number
        self.inflight: deque[Job] = deque()
        self.connection: Connection | None = None
        self.retired = False  # no longer takes work (being replaced, stopped or gone)
        self.draining = False  # being recycled: finishes what it holds, then exits
        self.killed_to_stop = False  # killed by the pool to stop its running job
        self.tasks_done = 0
        self.started_at = 0.0  # loop time when it became ready
        self.ping_sent: float | None = None  # loop time of the unanswered health ping
        self._pings = 0
        self._next_wire_id = 0
        self._ready_future: asyncio.Future[dict[str, Any]] | None = None
        self._control_fd = -1
        # Shared memory for big buffers (see _worker): two arenas towards the worker, with the
        # wire id of the task whose buffers each holds, and one back, with how many answers
        # in it were read (sent to the worker with every frame).
        self.nice = 0  # the CPU priority it runs at (processes: from the start)
        self.arena_fds: tuple[int, ...] = ()
        self._to_worker: list[wire.Arena] = []
        self._holder: list[int | None] = []
        self._from_worker: wire.Arena | None = None
        self._answers_read = 0
        self._reading: tuple[list[Any], memoryview | None] | None = None

    @property
    @abc.abstractmethod
    def ident(self) -> str:
        """A short identity for messages: ``pid 1234`` or ``interpreter 3``."""

    # -- start -----------------------------------------------------------------------------

    async def start(self, settings: dict[str, Any], timeout: float) -> None:
        """Launch, send the settings, and wait for READY within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        control_r, control_w = os.pipe()
        grow_pipe(to_worker_w)
        grow_pipe(from_worker_w)
        child_fds = (to_worker_r, from_worker_w, control_r)
        self._open_arenas()
        settings = {**settings, "arenas": self.arena_fds}
        self.nice = int(settings.get("nice") or 0)
        self._ready_future = loop.create_future()
        self.connection = Connection(
            loop, to_worker_w, from_worker_r, self._on_frame, self._on_connection_lost
        )
        self._control_fd = control_w
        try:
            await self._launch(*child_fds)
        except BaseException:
            self.connection.close()
            self._close_arenas()
            os.close(control_w)
            self._control_fd = -1
            raise
        finally:
            self._after_launch(child_fds)
        self.connection.send(0, wire.INIT, pickle.dumps(settings, wire.PICKLE_PROTOCOL))
        try:
            async with asyncio.timeout(timeout):
                await self._ready_future
        except TimeoutError:
            await self.kill_and_wait()
            raise WorkerStartFailed(
                f"{self.kind} worker {self.ident} did not become ready within {timeout:g} s"
            ) from None
        except BaseException:  # failed or cancelled: never leave a half-started worker behind
            # Stopped now, synchronously: a second cancellation may end the wait below early.
            self.stop_now()
            await asyncio.shield(self.kill_and_wait())
            raise
        self.started_at = loop.time()

    def _open_arenas(self) -> None:
        fds = [wire.Arena.create() for _ in range(3)]
        if None in fds:  # no memfd here: every buffer goes inline
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            return
        self.arena_fds = tuple(fd for fd in fds if fd is not None)
        *to_worker, from_worker = (wire.Arena(fd) for fd in self.arena_fds)
        self._to_worker, self._from_worker = to_worker, from_worker
        self._holder = [None] * len(to_worker)

    def _close_arenas(self) -> None:
        for arena in (*self._to_worker, self._from_worker):
            if arena is not None:
                arena.close()
        self._to_worker, self._from_worker, self._holder = [], None, []

    @abc.abstractmethod
    async def _launch(self, task_r: int, answer_w: int, control_r: int) -> None:
        """Start the process or interpreter on the worker's ends of the three pipes."""

    def _after_launch(self, child_fds: tuple[int, int, int]) -> None:
        """Close the worker's pipe ends here once it has them (processes: always)."""
        for fd in child_fds:
            os.close(fd)

    def _on_frame(self, task_id: int, tag: int, payload: memoryview, seconds: float) -> None:
        if tag == wire.PONG:
            if task_id == self._pings:
                self.ping_sent = None
            return
        if tag == wire.STOLEN:
            # Its arena is free too. The worker may still be loading the task from it, but
            # a task given back never runs and is never answered, so what it reads is moot.
            self._free_arena_of(task_id)
            self.events.on_stolen(self, task_id)
            return
        if tag == wire.RECYCLE:
            rss = pickle.loads(payload)
            self.events.recycle(self, f"resident memory {rss / 2**20:.0f} MiB over the ceiling")
            return
        if tag == wire.READY:
            info = pickle.loads(payload)
            if not info.get("arenas"):  # the worker could not map them
                self._close_arenas()
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(info)
            return
        # Any other frame answers task_id: the arena that held its buffers is free again.
        self._free_arena_of(task_id)
        buffers = None
        if tag & wire.OOB:
            tag &= ~wire.OOB
            arenas = [self._from_worker] if self._from_worker is not None else []
            try:
                payload, buffers, held = wire.decode_body(payload, arenas)
            except Exception as exc:  # e.g. no memory to map the arena: the task must hear
                why = (type(exc).__name__, f"its buffers could not be mapped here: {exc}")
                tag, payload = wire.RESULT_NOT_SERIALIZABLE, memoryview(pickle.dumps(why))
            else:
                self._reading = (buffers, held)
        self.events.on_answer(self, task_id, tag, payload, seconds, buffers)
        self.answer_read()

    def _free_arena_of(self, task_id: int) -> None:
        for number, holder in enumerate(self._holder):
            if holder == task_id:
                self._holder[number] = None

    def answer_read(self) -> None:
        """The answer being handled is decoded: its arena may take the next one."""
        if self._reading is None:
            return
        buffers, held = self._reading
        self._reading = None
        if wire.release(buffers, held) and held is not None:
            self._answers_read += 1  # else never again: the worker then sends all inline

    def _on_connection_lost(self) -> None:
        self.close()  # the control pipe too: a worker still alive then exits (or its watcher)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(
                WorkerStartFailed(
                    f"{self.kind} worker {self.ident} exited during start-up{self.exit_note()}"
                )
            )
            return
        self.retired = True
        self.events.on_lost(self)

    # -- work ------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        assert self.connection is not None
        self._next_wire_id += 1
        job.wire_id = self._next_wire_id
        job.worker = self
        self.inflight.append(job)
        payload = job.payload
        if isinstance(payload, wire.Payload):
            self.connection.send(
                job.wire_id, wire.RUN | wire.OOB, self._place(job, payload), self._answers_read
            )
        else:
            self.connection.send(job.wire_id, wire.RUN, payload, self._answers_read)

    def _place(self, job: Job, payload: wire.Payload) -> list[memoryview]:
        """The frame body for ``payload``: its buffers in a free arena if any, else inline."""
        for number, holder in enumerate(self._holder):
            if holder is None:
                try:
                    body = payload.parts(self._to_worker[number], number)
                except (OSError, ValueError):  # the arena could not grow (memory): inline
                    break
                self._holder[number] = job.wire_id
                return body
        return payload.parts(None, 0)

    def cancel_waiting(self, job: Job) -> None:
        """Ask the worker to skip ``job``, sent but not started; it answers ``INTERRUPTED``.

        Through the control pipe, so the worker hears it even while it runs the task before.
        """
        self.interrupt(job)

    @abc.abstractmethod
    def stop_running(self, job: Job) -> None:
        """Stop ``job``, which this worker is running now (deadline or caller cancelled)."""

    def interrupt(self, job: Job) -> None:
        """Send an interrupt request for ``job`` down the control pipe."""
        self._control(job.wire_id)

    def _control(self, word: int) -> None:
        if self._control_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._control_fd, word.to_bytes(8, "little"))

    def take_back(self, job: Job) -> None:
        """Ask for ``job`` (waiting here, not started) back; ``STOLEN`` answers if it was."""
        job.taking_back = True
        self._control(job.wire_id | wire.STEAL_BIT)

    def ping(self, now: float) -> None:
        """Send a health ping; the worker's watcher thread answers ``PONG`` at once."""
        self._pings += 1
        self.ping_sent = now
        self._control(self._pings | wire.PING_BIT)

    # -- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pipes: an idle worker exits on its own."""
        self.retired = True
        if self.connection is not None:
            self.connection.close()
        self._close_arenas()
        if self._control_fd >= 0:
            os.close(self._control_fd)
            self._control_fd = -1

    @property
    @abc.abstractmethod
    def gone(self) -> bool:
        """The process or interpreter has ended and been waited for (or never started)."""

    @abc.abstractmethod
    async def wait_closed(self, timeout: float) -> None:
        """Wait for the worker to end after ``close``; force it after ``timeout`` if possible."""

    @abc.abstractmethod
    def stop_now(self) -> None:
        """Close the pipes and end the worker as far as its kind allows, without waiting."""

    @abc.abstractmethod
    async def kill_and_wait(self) -> None:
        """End the worker now (as far as its kind allows) and wait until it is gone."""

    def exit_note(self) -> str:
        """How the worker ended, for messages (``" (killed by SIGSEGV)"``), if known."""
        return ""
