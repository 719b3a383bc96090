"""One local worker, parent side: its pipes, ring and arenas, the tickets it holds, and how the
frames it sends become ``Outcome``s.

A worker holds tickets by wire id, in the order they were sent; the first one not answered
runs, the others wait behind it. Answers are matched by wire id. When the worker ends, the
ring is read first (answers written before a crash are kept), then the ticket the control
block names as current is the one the crash cost (``LOST``); every other ticket it held never
started and goes back (``RETURNED``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import pickle
import threading
from typing import TYPE_CHECKING, Any, Final

import anyio

from .._backend import Outcome, OutcomeKind, Ticket
from .._offload_worker import codec, protocol, ring
from .._offload_worker.arena import Arena
from .._offload_worker.codec import OFFLOOP_BYTES, Payload
from .._runtime import Runtime
from ..errors import WorkerStartFailed
from ._connection import Batch, Connection, grow_pipe
from ._kinds import Handle, LocalKind

if TYPE_CHECKING:
    from ._pool import LocalPool

__all__ = ("LocalWorker", "WorkerState")

log = logging.getLogger("offload")

_barrier = threading.Lock()  # acquire+release: a full memory barrier between two accesses

_RETURNED: Final = Outcome(OutcomeKind.RETURNED)


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"  # idle or busy: see ``held``
    DRAINING = "draining"  # recycled or retired: finishes what it holds, takes nothing new
    QUARANTINED = "quarantined"  # an interpreter stuck in a call: runs nothing more
    GONE = "gone"


class LocalWorker:
    """A process or interpreter worker as the pool sees it."""

    def __init__(
        self, pool: LocalPool, kind: LocalKind, number: int, runtime: Runtime, batch: Batch
    ) -> None:
        self.pool = pool
        self.kind = kind
        self.number = number
        self.runtime = runtime
        self.batch = batch
        self.state = WorkerState.STARTING
        self.handle: Handle | None = None
        self.connection: Connection | None = None
        self.held: dict[int, Ticket] = {}  # wire id -> ticket, in the order sent
        self.absorbed: set[int] = set()  # stopped already reported: swallow their answers
        self.stopping: set[int] = set()  # STOP sent, outcome not known yet
        self.taking_back: set[int] = set()  # TAKE_BACK sent (REVOKED, or it runs here)
        self.killed_for: set[int] = set()  # killed to stop these
        # Tickets whose big buffers are being copied into an arena in a thread (ticket key ->
        # ticket, arena number); each gets its wire id when its frame is written.
        self.writing: dict[int, tuple[Ticket, int]] = {}
        self.spare = False
        self.tasks_done = 0
        self.failures = 0
        self.sent = 0
        self.started_at = 0.0  # loop clock, when it became ready
        self.last_active = 0.0
        self.busy_since = 0.0  # when the ticket now running (about) began
        self.ahead_cost = 0.0  # estimated seconds of the unstarted tickets it holds
        self.ping_sent: float | None = None
        self.pings = 0
        self.exit_seen = False
        self._next_wire = 0
        self._control_fd = -1
        self._ready: anyio.Event | None = None
        self._ready_info: dict[str, Any] | None = None
        self._ring: ring.Ring | None = None
        self._to_worker: list[Arena] = []
        self._holder: list[int | None] = []  # wire id whose buffers each inbound arena holds
        self._from_worker: Arena | None = None
        self._answers_read = 0

    def __repr__(self) -> str:
        return f"<{self.ident} {self.state.value} holding {len(self.held)}>"

    @property
    def ident(self) -> str:
        pid = self.handle.pid if self.handle is not None else None
        return f"pid {pid}" if pid is not None else f"{self.kind.name} #{self.number}"

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    # -- start -----------------------------------------------------------------------------

    async def start(self, settings: dict[str, Any], nice: int, timeout: float) -> None:
        """Launch, send the settings, and wait for READY within ``timeout`` seconds.

        Raises ``WorkerStartFailed``; a failed or cancelled start leaves nothing running.
        """
        runtime = self.runtime
        task_r, task_w = os.pipe()
        answer_r, answer_w = os.pipe()
        control_r, control_w = os.pipe()
        grow_pipe(task_w)
        grow_pipe(answer_w)
        child = (task_r, answer_w, control_r)
        shared = self._open_shared()
        self._ready = anyio.Event()
        self.connection = Connection(
            runtime, self.batch, task_w, answer_r, self._on_frame, self._on_eof
        )
        self._control_fd = control_w
        try:
            self.handle = self.kind.launch(runtime, child, shared, nice, self._on_exit)
        except BaseException:
            self._close_all()
            for fd in child:
                os.close(fd)
            raise
        if not self.kind.owns_fds:
            for fd in child:
                os.close(fd)
        seen = self.handle.shared
        init = {**settings, "ring": seen[0] if seen else None, "arenas": seen[1:]}
        self.connection.send(0, protocol.INIT, pickle.dumps(init, protocol.PICKLE_PROTOCOL))
        try:
            with anyio.fail_after(timeout):
                await self._ready.wait()
        except TimeoutError:
            self.kill()
            raise WorkerStartFailed(
                f"{self.kind.name} worker {self.ident} did not become ready within {timeout:g} s"
            ) from None
        except BaseException:  # cancelled: never leave a half-started worker behind
            self.kill()
            raise
        if self._ready_info is None:
            raise WorkerStartFailed(
                f"{self.kind.name} worker {self.ident} exited during start-up"
                f"{self.handle.exit_note()}"
            )
        if not self._ready_info.get("shared"):
            self._close_shared()
        self.state = WorkerState.READY
        self.started_at = self.last_active = runtime.now()

    def _open_shared(self) -> tuple[int, ...]:
        """The ring and arenas (memfds) this worker shares with us; none where no memfd."""
        fds = [ring.create(), *(Arena.create() for _ in range(3))]
        if None in fds:  # no memfd here: every answer and buffer goes through the pipes
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            return ()
        ring_fd, *arena_fds = (fd for fd in fds if fd is not None)
        self._ring = ring.Ring(ring_fd)
        *to_worker, from_worker = (Arena(fd) for fd in arena_fds)
        self._to_worker, self._from_worker = to_worker, from_worker
        self._holder = [None] * len(to_worker)
        return (ring_fd, *arena_fds)

    def _close_shared(self) -> None:
        for arena in (*self._to_worker, self._from_worker):
            if arena is not None:
                arena.close()
        if self._ring is not None:
            self._ring.close()
        self._to_worker, self._from_worker, self._holder, self._ring = [], None, [], None

    # -- work ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """It holds something: running, waiting, or being copied in."""
        return bool(self.held) or bool(self.writing)

    def send(self, ticket: Ticket) -> None:
        """Send ``ticket`` to run here (after what it holds)."""
        assert self.connection is not None
        payload = ticket.payload
        if (
            isinstance(payload, Payload)
            and payload.size >= OFFLOOP_BYTES
            and not ticket.via_pipe
            and None in self._holder
        ):
            # A big copy must not block the event loop: a thread writes the arena, and the
            # frame goes out when it is done (see _write_then_send).
            number = self._holder.index(None)
            self._holder[number] = -ticket.key  # reserved
            if not self.busy:
                self.busy_since = self.runtime.now()
            self.writing[ticket.key] = (ticket, number)
            self.sent += 1
            self.pool.spawn(self._write_then_send, ticket, number)
            return
        self._send_now(ticket)

    async def _write_then_send(self, ticket: Ticket, number: int) -> None:
        payload = ticket.payload
        assert isinstance(payload, Payload)
        try:
            body: list[memoryview] | None = await anyio.to_thread.run_sync(
                payload.parts, self._to_worker[number], number
            )
        except (OSError, ValueError):  # the arena could not grow (memory): inline then
            body = None
        self._holder[number] = None
        if self.writing.pop(ticket.key, None) is None or self.state is WorkerState.GONE:
            return  # stopped (or the worker ended) meanwhile: already reported
        if body is None:
            ticket.via_pipe = True
        self._send_now(ticket, body, number if body is not None else None)

    def _send_now(
        self, ticket: Ticket, body: list[memoryview] | None = None, arena: int | None = None
    ) -> None:
        assert self.connection is not None
        self._next_wire += 1
        wire = self._next_wire
        if not self.held:
            if not self.writing:
                self.busy_since = self.runtime.now()
        else:
            self.ahead_cost += ticket.cost or 0.0
        self.held[wire] = ticket
        if body is None:
            self.sent += 1
        payload = ticket.payload
        if ticket.stream:
            tag, seconds = protocol.RUN_STREAM, float(ticket.credit)
        else:
            tag, seconds = protocol.RUN, -1.0 if ticket.cost is None else ticket.cost
        if body is not None:  # written into arena ``arena`` off the loop
            assert arena is not None
            self._holder[arena] = wire
            self.connection.send(wire, tag | protocol.OOB, body, seconds)
        elif isinstance(payload, Payload):
            body = self._place(wire, payload, inline=ticket.via_pipe)
            self.connection.send(wire, tag | protocol.OOB, body, seconds)
        else:
            self.connection.send(wire, tag, payload, seconds)

    def _place(self, wire: int, payload: Payload, inline: bool) -> list[memoryview]:
        """The frame body for ``payload``: its buffers in a free arena if any, else inline."""
        if not inline:
            for number, holder in enumerate(self._holder):
                if holder is None:
                    try:
                        body = payload.parts(self._to_worker[number], number)
                    except (OSError, ValueError):  # the arena could not grow (memory)
                        break
                    self._holder[number] = wire
                    return body
        return payload.parts(None, 0)

    def wire_of(self, ticket: Ticket) -> int | None:
        for wire, held in self.held.items():
            if held is ticket:
                return wire
        return None

    def current(self) -> int:
        """The wire id being loaded or run now (0: none); without a ring, the first held."""
        if self._ring is not None:
            return self._ring.get(ring.CURRENT)
        for wire in self.held:
            if wire not in self.absorbed:
                return wire
        return 0

    def ahead(self, now: float) -> float:
        """Estimated seconds before a ticket sent now would start (``inf`` if unknown)."""
        if not self.held:
            return 0.0
        first = next(iter(self.held.values()))
        if first.cost is None:
            return float("inf")
        return max(0.0, first.cost - (now - self.busy_since)) + self.ahead_cost

    def stop(self, ticket: Ticket, interrupt_grace: float) -> None:
        """Make sure ``ticket`` (held here) never starts, or stop it if it runs."""
        if self.writing.pop(ticket.key, None) is not None:  # not sent yet: it never runs
            self.batch.dirty = True
            self.pool.report(self, ticket, Outcome(OutcomeKind.STOPPED))
            return
        wire = self.wire_of(ticket)
        if wire is None or wire in self.absorbed or wire in self.stopping:
            return
        if self._ring is not None:
            self._ring.mark_stopped(wire)  # seen by the worker before it starts the task
        if self.kind.interrupts:
            # The watcher decides under the worker's lock: never started, or interrupted now.
            # The caller hears at once; an interpreter stuck in C is quarantined after a grace.
            running = self.current() == wire
            self._control(protocol.STOP, wire)
            self.absorbed.add(wire)
            self.pool.report(self, ticket, Outcome(OutcomeKind.STOPPED))
            if running:
                self.runtime.call_at(
                    self.runtime.now() + interrupt_grace, lambda: self._check_stuck(wire)
                )
            return
        if self.current() == wire:
            self.killed_for.add(wire)
            self.kill()  # settled once the process is reaped
            return
        self.stopping.add(wire)
        self._control(protocol.STOP, wire)  # REVOKED, or RUNNING (then killed), or its answer

    def take_back(self, ticket: Ticket) -> None:
        """Ask for ``ticket`` (waiting here) back: ``REVOKED`` comes if it had not begun."""
        if self.writing.pop(ticket.key, None) is not None:
            self.batch.dirty = True
            self.pool.report(self, ticket, _RETURNED)
            return
        wire = self.wire_of(ticket)
        if wire is not None and wire not in self.stopping and wire not in self.taking_back:
            self.taking_back.add(wire)
            self._control(protocol.TAKE_BACK, wire)

    def credit(self, ticket: Ticket, items: int) -> None:
        wire = self.wire_of(ticket)
        if wire is not None:
            self._control(protocol.CREDIT, wire, items)

    def close_stream(self, ticket: Ticket) -> None:
        wire = self.wire_of(ticket)
        if wire is not None:
            self._control(protocol.CLOSE, wire)

    def ping(self, now: float) -> None:
        """Send a health ping; the worker's watcher thread answers ``PONG`` at once."""
        self.pings += 1
        self.ping_sent = now
        self._control(protocol.PING, 0, self.pings)

    def _control(self, op: int, wire: int, value: int = 0) -> None:
        if self._control_fd >= 0:
            with contextlib.suppress(OSError):  # gone: its exit is seen on its own
                os.write(self._control_fd, protocol.control_word(op, wire, value))

    # -- answers -------------------------------------------------------------------------------

    def _on_frame(self, wire: int, tag: int, payload: memoryview, seconds: float) -> None:
        if tag == protocol.RING:
            self._read_ring()
        elif tag == protocol.PONG:
            if wire == self.pings:
                self.ping_sent = None
        elif tag == protocol.READY:
            self._ready_info = pickle.loads(payload)
            if self._ready is not None:
                self._ready.set()
        elif tag == protocol.RUNNING:
            if wire in self.stopping and wire in self.held:
                self.killed_for.add(wire)
                self.kill()
        elif tag == protocol.RECYCLE:
            rss = pickle.loads(payload)
            self.pool.recycle(self, f"resident memory {rss / 2**20:.0f} MiB over the ceiling")
        else:
            self._answer(wire, tag, payload, seconds)

    def _read_ring(self) -> None:
        ring_ = self._ring
        if ring_ is None:
            return
        for wire, tag, payload, seconds in ring_.take():
            self._answer(wire, tag, payload, seconds)
        if ring_.flag(ring.WAITING):
            self._control(protocol.WAKE, 0)

    def _answer(self, wire: int, tag: int, payload: memoryview, seconds: float) -> None:
        base = tag & ~protocol.OOB
        ticket = self.held.get(wire)
        if base == protocol.PROGRESS or base == protocol.ITEM:
            if ticket is not None and wire not in self.absorbed:
                outcome = self._decoded(
                    OutcomeKind.ITEM if base == protocol.ITEM else OutcomeKind.PROGRESS,
                    tag,
                    payload,
                    seconds,
                )
                self.pool.report(self, ticket, outcome)
            else:
                self._discard(tag, payload)
            return
        if ticket is None:
            self._discard(tag, payload)
            return  # not ours (any more)
        self._forget(wire, ticket)
        if wire in self.absorbed:  # stopped already reported
            self.absorbed.discard(wire)
            self._discard(tag, payload)
            return
        if base == protocol.REVOKED:
            outcome = _RETURNED
        elif base == protocol.MAP_FAILED:
            ticket.via_pipe = True
            outcome = _RETURNED
        elif base == protocol.INTERRUPTED:
            outcome = Outcome(OutcomeKind.STOPPED, seconds=seconds)
        else:
            self.tasks_done += 1
            if base != protocol.OK:
                self.failures += 1
            outcome = self._decoded(OutcomeKind.ANSWER, tag, payload, seconds)
        self.pool.report(self, ticket, outcome)

    def _forget(self, wire: int, ticket: Ticket) -> None:
        """``wire`` has its answer: it leaves the line (and its arena is free)."""
        first = next(iter(self.held))
        del self.held[wire]
        self.batch.dirty = True  # room for more
        self._free_arena_of(wire)
        self.stopping.discard(wire)
        self.taking_back.discard(wire)
        now = self.runtime.now()
        self.last_active = now
        if not self.held:
            self.ahead_cost = 0.0
        elif wire == first:  # the next one starts now
            self.busy_since = now
            following = next(iter(self.held.values()))
            self.ahead_cost = max(0.0, self.ahead_cost - (following.cost or 0.0))
        else:  # one that waited left the line
            self.ahead_cost = max(0.0, self.ahead_cost - (ticket.cost or 0.0))

    def _discard(self, tag: int, payload: memoryview) -> None:
        """An answer no one will read: only its outbound arena needs freeing."""
        if tag & protocol.OOB:
            outcome = self._decoded(OutcomeKind.ANSWER, tag, payload, 0.0)
            if outcome.release is not None:
                outcome.release()

    def _decoded(self, kind: OutcomeKind, tag: int, payload: memoryview, seconds: float) -> Outcome:
        """An outcome for an answer frame. Out-of-band buffers inline in the frame come with
        it; those in the outbound arena are read by ``outcome.load()`` (in a thread, when big:
        the dispatcher decides), and ``outcome.release()`` frees the arena after."""
        if not tag & protocol.OOB:
            return Outcome(kind, tag, payload, seconds)
        tag &= ~protocol.OOB
        if codec.body_arena(payload) is None:
            data, buffers, _ = codec.decode_body(payload, [])

            def release() -> None:
                codec.release(buffers, None)

            return Outcome(kind, tag, data, seconds, buffers=buffers, release=release)
        arena = self._from_worker

        def load() -> tuple[memoryview, list[Any]]:
            data, buffers, _ = codec.decode_body(payload, [arena] if arena is not None else [])
            return data, buffers

        return Outcome(
            kind,
            tag,
            payload,
            seconds,
            loader=load,
            size=codec.body_size(payload),
            release=self._arena_read,
        )

    def _arena_read(self) -> None:
        """An answer's buffers were read out of the outbound arena: the worker may reuse it."""
        if self._ring is None:
            return
        if self._from_worker is not None:
            self._from_worker.shrink()
        self._answers_read += 1
        self._ring.set(ring.ACKED, self._answers_read)
        if self._ring.flag(ring.WAITING):
            self._control(protocol.WAKE, 0)

    def _free_arena_of(self, wire: int) -> None:
        for number, holder in enumerate(self._holder):
            if holder == wire:
                self._holder[number] = None

    # -- the end ---------------------------------------------------------------------------

    def quit(self) -> None:
        """Finish what it holds, then exit (it takes nothing new)."""
        if self.state in (WorkerState.READY, WorkerState.STARTING):
            self.state = WorkerState.DRAINING
        if self.connection is not None:
            self.connection.send(0, protocol.QUIT)

    def kill(self) -> None:
        """End it now as far as its kind allows (an interpreter is quarantined)."""
        if self.kind.interrupts:
            self.quarantine()
            return
        if self.handle is not None:
            self.handle.kill()

    def _check_stuck(self, wire: int) -> None:
        if self.state is WorkerState.GONE or wire not in self.held or self.current() != wire:
            return  # the interrupt worked: the worker answered and goes on
        log.warning(
            "offload: %s did not stop within the interrupt grace (blocked in C code?); "
            "quarantined until its call returns, a fresh interpreter takes its slot",
            self.ident,
        )
        self.quarantine()

    def quarantine(self) -> None:
        """Run nothing more: what waits here goes back at once; it ends when its call does."""
        if self.state in (WorkerState.QUARANTINED, WorkerState.GONE):
            return
        self.state = WorkerState.QUARANTINED
        keep = 0
        if self._ring is not None:
            self._ring.set_flag(ring.STOP, True)
            with _barrier:  # the worker reads the flag after writing its current id
                pass
            keep = self._ring.get(ring.CURRENT)  # it runs (or refused) this one: wait for it
        else:
            keep = self.current()
        for wire, ticket in list(self.held.items()):
            if wire != keep and wire not in self.absorbed:
                self._forget(wire, ticket)
                self.pool.report(self, ticket, _RETURNED)
        if self.connection is not None:
            self.connection.send(0, protocol.QUIT)
        self.pool.lost(self)

    def _on_eof(self) -> None:
        """The answer pipe closed: the worker is ending (its exit is reported separately)."""

    def _on_exit(self) -> None:
        """The process was reaped, or the interpreter's thread ended."""
        if self.exit_seen:
            return
        self.exit_seen = True
        if self.handle is not None and self.kind.interrupts:
            self.handle.reaped()
        if self._ready is not None and not self._ready.is_set():
            self._ready.set()  # a start waiting for READY hears it failed
        was = self.state
        self.state = WorkerState.GONE  # it takes nothing from now on
        self.batch.begin()
        try:
            if self.connection is not None:
                self.connection.read_available()  # doorbells and answers sent before the end
            self._read_ring()
            self._settle_held()
            self.pool.gone(self, was)
        finally:
            self.batch.end()
            self._close_all()

    def _settle_held(self) -> None:
        """After the end: the ticket it was running was lost (unless it was killed to stop
        it); every other ticket it held never started and goes back."""
        current = self.current()
        note = self.handle.exit_note() if self.handle is not None else ""
        for ticket, _ in list(self.writing.values()):  # never sent: they never started
            self.pool.report(self, ticket, _RETURNED)
        self.writing.clear()
        for wire, ticket in list(self.held.items()):
            self._forget(wire, ticket)
            if wire in self.absorbed:
                continue
            if wire in self.killed_for:
                outcome = Outcome(OutcomeKind.STOPPED)
            elif wire == current and not self.killed_for:
                self.failures += 1
                outcome = Outcome(OutcomeKind.LOST, note=note)
            else:
                outcome = _RETURNED  # it never started (or was cut short by a kill for another)
            self.pool.report(self, ticket, outcome)

    def _close_all(self) -> None:
        if self.connection is not None:
            self.connection.close()
        if self._control_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._control_fd)
            self._control_fd = -1
        self._close_shared()

    def abandon(self) -> None:
        """Shutdown gave up waiting: close our ends (an interpreter still in a call ends when
        the call returns; it cannot keep the process alive)."""
        self._close_all()

    # -- statistics ------------------------------------------------------------------------------

    def running_ticket(self) -> Ticket | None:
        wire = self.current()
        return self.held.get(wire) if wire else None
