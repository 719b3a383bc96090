"""The worker's loop: run the tasks the parent sends, in arrival order, and answer each once.

Answers go into the answer ring (shared memory) and are announced with one ``RING`` frame when
the worker has nothing more to run right away, so a burst of short tasks costs one wake-up of
the parent. A task the parent expects to be long (the estimate rides in the frame's seconds
field) first announces what is waiting, and the watcher announces answers that wait longer than
``watcher.FLUSH_AFTER`` while a task runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import time
from typing import Any, Final

from . import codec, mainmod
from . import protocol as p
from . import ring as ring_module
from .arena import Arena
from .channel import Channel
from .codec import Payload
from .locks import locked
from .watcher import FINISHING, IDLE, LOADING, RUNNING, Gate, Interrupted, Watcher, set_async_exc

#: A task estimated above this announces the answers before it first (seconds).
_LONG: Final = 0.0002
#: Progress events per task are sent at most this often (seconds); the latest value wins.
PROGRESS_INTERVAL: Final = 0.02
_MAX_MESSAGE: Final = 1000


class _Progress:
    """The running task's progress reporter (``offload.report_progress`` reaches it)."""

    __slots__ = ("channel", "gate", "last_sent", "latest", "started", "wire_id")

    def __init__(self, channel: Channel, gate: Gate, wire_id: int, started: float) -> None:
        self.channel = channel
        self.gate = gate
        self.wire_id = wire_id
        self.started = started  # time.monotonic() when the task began
        self.last_sent = 0.0
        self.latest: tuple[float, float | None, str | None, float] | None = None

    def report(self, done: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()

        def record() -> None:
            self.latest = (done, total, message, now - self.started)
            if now - self.last_sent >= PROGRESS_INTERVAL:
                self._send(now)

        locked(self.gate.lock, record)  # (the task runs: an interrupt may land here)

    def due(self) -> float | None:
        """Seconds until a pending event may be sent (the watcher asks), or ``None``."""
        if self.latest is None:
            return None
        return max(0.0, self.last_sent + PROGRESS_INTERVAL - time.monotonic())

    def flush(self) -> None:
        """Send the pending event, if any (the lock is held)."""
        if self.latest is not None:
            self._send(time.monotonic())

    def flush_if_due(self) -> None:
        """The watcher's timer: send a pending event whose interval has passed."""
        with self.gate.lock:
            if self.latest is not None and self.due() == 0.0:
                self._send(time.monotonic())

    def _send(self, now: float) -> None:
        assert self.latest is not None
        self.channel.send(self.wire_id, p.PROGRESS, pickle.dumps(self.latest, p.PICKLE_PROTOCOL))
        self.latest = None
        self.last_sent = now


_progress: _Progress | None = None  # the running task's reporter, made on its first report
#: The task running on this worker, if any: (channel, gate, wire id, monotonic start).
_running: tuple[Channel, Gate, int, float] | None = None


def report_progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Send a progress event for the task running here; nothing outside a worker's task."""
    global _progress
    running = _running
    if running is None or threading.get_ident() != running[1].target:
        return
    reporter = _progress
    if reporter is None or reporter.wire_id != running[2]:
        reporter = _progress = _Progress(*running)
    if isinstance(done, bool) or not isinstance(done, int | float):
        raise TypeError(f"done must be a number, not {type(done).__name__}")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int | float)):
        raise TypeError(f"total must be a number or None, not {type(total).__name__}")
    if message is not None:
        message = str(message)[:_MAX_MESSAGE]
    reporter.report(done, total, message)


class _Outbox:
    """Answers out: into the ring (announced later), or the pipe when too big or no ring."""

    def __init__(
        self, channel: Channel, ring: ring_module.Ring | None, arena: Arena | None, gate: Gate
    ) -> None:
        self.channel = channel
        self.ring = ring
        self.arena = arena
        self.gate = gate
        self.announced = 0
        self.arena_written = 0  # answers put in the outbound arena (the parent acks each)

    def body(self, answer: bytes | Payload) -> tuple[bytes | list[memoryview], int]:
        """The frame payload for ``answer`` and the tag bit to add (``OOB`` or 0)."""
        if not isinstance(answer, Payload):
            return answer, 0
        arena = self.arena if self._arena_free() else None
        try:
            parts = answer.parts(arena, 0)
        except (OSError, ValueError):  # the arena could not grow (memory): inline then
            arena, parts = None, answer.parts(None, 0)
        self.arena_written += arena is not None
        return parts, p.OOB

    def _arena_free(self) -> bool:
        if self.arena is None or self.ring is None:
            return False
        return self.ring.get(ring_module.ACKED) >= self.arena_written

    def send(self, wire_id: int, tag: int, answer: bytes | Payload, seconds: float) -> None:
        payload, bit = self.body(answer)
        parts = p.frame(wire_id, tag | bit, payload, seconds)
        ring = self.ring
        size = sum(part.nbytes for part in parts)
        if ring is not None and size <= ring_module.MAX_RECORD:
            while not ring.put(parts, size):
                self._wait_for_space()
            if self.gate.unflushed_since is None:
                self.gate.unflushed_since = time.monotonic()
            return
        self.announce()  # what waits in the ring goes first: answers keep their order
        self.channel.send_parts(parts)

    def _wait_for_space(self) -> None:
        ring = self.ring
        assert ring is not None
        ring.set_flag(ring_module.WAITING, True)
        self.announce()
        with self.gate.changed:
            self.gate.changed.wait(0.05)
        ring.set_flag(ring_module.WAITING, False)

    def announce(self) -> None:
        """Ring the parent's doorbell if answers wait in the ring (either thread may call)."""
        ring = self.ring
        if ring is None:
            return
        written = ring.get(ring_module.WRITE)
        if written != self.announced:
            self.announced = written
            self.gate.unflushed_since = None
            self.channel.send(0, p.RING)


class _Worker:
    """One worker's loop state."""

    def __init__(
        self,
        channel: Channel,
        settings: dict[str, Any],
        *,
        interruptible: bool,
        parent_pid: int | None,
        ctl_fd: int,
    ) -> None:
        self.channel = channel
        self.limit: int = settings["max_payload"]
        self.max_rss: int | None = settings.get("max_rss")
        self.interruptible = interruptible
        self.gate = Gate()
        self.ring: ring_module.Ring | None = None
        self.inbound: list[Arena] = []
        self.outbound: Arena | None = None
        self._open_shared(settings)
        self.outbox = _Outbox(channel, self.ring, self.outbound, self.gate)
        self.watcher = Watcher(
            ctl_fd,
            channel,
            self.gate,
            interruptible=interruptible,
            parent_pid=parent_pid,
            flush=self.outbox.announce,
        )
        self.watcher.progress = self._progress_due
        self.watcher.flush_progress = self._progress_flush

    def _open_shared(self, settings: dict[str, Any]) -> None:
        """This side's handles on the parent's ring and arenas (duplicated: an interpreter
        shares the parent's descriptor numbers, which the parent closes when it is done)."""
        ring_fd = settings.get("ring")
        arena_fds = settings.get("arenas") or ()
        if ring_fd is None:
            return
        opened: list[int] = []
        try:
            ring_copy = os.dup(ring_fd)
            opened.append(ring_copy)
            copies = [os.dup(fd) for fd in arena_fds]
            opened.extend(copies)
            self.ring = ring_module.Ring(ring_copy)
        except (OSError, ValueError):  # none then: every answer goes through the pipe
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.ring = None
            return
        arenas = [Arena(fd) for fd in copies]
        self.inbound, self.outbound = arenas[:-1], (arenas[-1] if arenas else None)

    def close(self) -> None:
        for arena in (*self.inbound, self.outbound):
            if arena is not None:
                arena.close()
        if self.ring is not None:
            self.ring.close()

    def _progress_due(self) -> float | None:
        reporter = _progress
        return reporter.due() if reporter is not None and _running is not None else None

    def _progress_flush(self) -> None:
        reporter = _progress
        if reporter is not None:
            reporter.flush_if_due()

    def loop(self) -> None:
        channel = self.channel
        while True:
            if not channel.frames:
                self.outbox.announce()
            frame = channel.receive()
            if frame is None:
                break
            wire_id, tag, payload, seconds = frame
            base = tag & ~p.OOB
            if base == p.QUIT:
                break
            if base == p.RUN or base == p.RUN_STREAM:
                if not self.task(wire_id, tag, payload, seconds):
                    break  # quarantined: the parent gave what waits here to other workers
                del payload
                if self.max_rss is not None and (rss := resident_bytes()) > self.max_rss:
                    channel.send(0, p.RECYCLE, pickle.dumps(rss))
        self.outbox.announce()

    # -- one task ------------------------------------------------------------------------------

    def task(self, wire_id: int, tag: int, payload: memoryview, seconds: float) -> bool:
        """Run one task and answer it; ``False`` (nothing run) once the worker is stopped."""
        gate = self.gate
        ring = self.ring
        if ring is not None:
            # Written before the lock, read back after it by the parent: whichever of this
            # and the parent's stop flag comes second sees the other (see LocalPool.quarantine).
            ring.set(ring_module.CURRENT, wire_id)
        with gate.lock:
            if ring is not None and ring.flag(ring_module.STOP):
                stopped = True
            else:
                stopped = False
                if ring is not None and ring.stopped(wire_id):
                    gate.revoked.add(wire_id)  # stopped: the watcher may not have heard yet
                if wire_id in gate.revoked:  # stopped or taken back before it began
                    announced = gate.revoke_sent.pop(wire_id, False)
                    gate.revoked.discard(wire_id)
                    gate.done_upto = wire_id
                    if ring is not None:
                        ring.set(ring_module.CURRENT, 0)
                    if not announced:
                        self.outbox.send(wire_id, p.REVOKED, b"", 0.0)
                    return True
                gate.current = wire_id
                gate.phase = LOADING
                gate.stop_current = False
                gate.stopped_running = False
        if stopped:
            self.outbox.send(wire_id, p.REVOKED, b"", 0.0)
            return False
        stream = tag & ~p.OOB == p.RUN_STREAM
        if stream or seconds < 0 or seconds > _LONG:
            self.outbox.announce()  # it may take a while: the parent hears what is done first
        answer, answer_tag, run = self._load_and_run(wire_id, tag, payload, stream, seconds)
        self.outbox.send(wire_id, answer_tag, answer, run)
        with gate.lock:
            gate.done_upto = wire_id
            gate.current = 0
            gate.phase = IDLE
            gate.granted.pop(wire_id, None)
            gate.sent.pop(wire_id, None)
            gate.closing.discard(wire_id)
            gate.revoked = {w for w in gate.revoked if w > wire_id} if gate.revoked else set()
        if ring is not None:
            ring.set(ring_module.CURRENT, 0)
        return True

    def _load_and_run(
        self, wire_id: int, tag: int, payload: memoryview, stream: bool, seconds: float
    ) -> tuple[bytes | Payload, int, float]:
        """Load and run one task: (answer, its tag, run seconds)."""
        buffers: list[Any] | None = None
        held: Any = None
        if tag & p.OOB:
            try:
                data, buffers, held = codec.decode_body(payload, self.inbound)
            except (OSError, ValueError):  # e.g. no address space left to map the arena
                return b"", p.MAP_FAILED, 0.0
        else:
            data = payload
        try:
            # Loading may import modules: an interrupt now could leave one half-imported,
            # so none is delivered until the call itself begins.
            fn, args, kwargs = codec.loads(data, buffers)
        except BaseException as exc:
            failed = codec.raised_payload(exc, self.limit)
            return self._unless_stopped(failed, p.LOAD_FAILED)
        finally:
            if held is not None or buffers:
                codec.release(buffers or [], held)
                number = codec.body_arena(payload)
                if number is not None and number < len(self.inbound):
                    self.inbound[number].shrink()
        del payload, data, buffers
        gate = self.gate
        ring = self.ring
        with gate.lock:
            if gate.stop_current or (ring is not None and ring.stopped(wire_id)):
                return b"", p.REVOKED, 0.0
            gate.phase = RUNNING
        return self._run(wire_id, fn, args, kwargs, stream, int(seconds) if stream else 0)

    def _unless_stopped(self, answer: bytes, tag: int) -> tuple[bytes, int, float]:
        with self.gate.lock:
            if self.gate.stop_current:
                return b"", p.REVOKED, 0.0
        return answer, tag, 0.0

    def _run(
        self,
        wire_id: int,
        fn: Any,
        args: Any,
        kwargs: Any,
        stream: bool,
        credit: int,
    ) -> tuple[bytes | Payload, int, float]:
        global _running
        gate = self.gate
        _running = (self.channel, gate, wire_id, time.monotonic())
        started = time.perf_counter()
        try:
            try:
                if stream:
                    self._stream(wire_id, fn, args, kwargs, credit)
                    result = None
                else:
                    result = fn(*args, **kwargs)
            finally:
                locked(gate.lock, self._finishing)
        except Interrupted:
            return b"", p.INTERRUPTED, time.perf_counter() - started
        except _StreamEnd as end:
            return end.answer, end.tag, time.perf_counter() - started
        except BaseException as exc:
            elapsed = time.perf_counter() - started
            return codec.raised_payload(exc, self.limit), p.RAISED, elapsed
        elapsed = time.perf_counter() - started
        del fn, args, kwargs
        return self._encode(result, elapsed)

    def _finishing(self) -> None:
        """The call is over: no interrupt may come from now on (the lock is held)."""
        global _progress, _running
        gate = self.gate
        gate.phase = FINISHING
        _running = None
        reporter, _progress = _progress, None
        if reporter is not None:
            reporter.flush()
        if gate.stopped_running and self.interruptible:
            set_async_exc(gate.target, None)  # drop an interrupt that came too late

    def _encode(self, result: Any, elapsed: float) -> tuple[bytes | Payload, int, float]:
        try:
            if codec.may_hold_buffers((result,)):
                data = codec.encode(result, True, snapshot=False, depth=2)  # sent at once
            else:
                data = codec.dumps_plain(result)
        except BaseException as exc:
            return pickle.dumps(codec.describe(exc)), p.RESULT_NOT_SERIALIZABLE, elapsed
        if len(data) > self.limit:
            return pickle.dumps(len(data)), p.RESULT_TOO_LARGE, elapsed
        return data, p.OK, elapsed

    # -- streams -------------------------------------------------------------------------------

    def _stream(self, wire_id: int, fn: Any, args: Any, kwargs: Any, credit: int) -> None:
        """Run a generator function, sending each item as the consumer's credit allows."""
        iterator = iter(fn(*args, **kwargs))
        try:
            for item in iterator:
                if not self._take_credit(wire_id, credit):
                    break  # the consumer left: close the generator (its finally runs)
                self._send_item(wire_id, item)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _take_credit(self, wire_id: int, initial: int) -> bool:
        """Wait until the consumer wants one more item; ``False`` if it closed the stream.

        Lock-free (the task runs: an interrupt may land anywhere here): the watcher only adds
        to ``granted``, this thread only to ``sent``.
        """
        gate = self.gate
        while True:
            if wire_id in gate.closing:
                return False
            sent = gate.sent.get(wire_id, 0)
            if initial + gate.granted.get(wire_id, 0) - sent > 0:
                gate.sent[wire_id] = sent + 1
                return True
            time.sleep(0.002)

    def _send_item(self, wire_id: int, item: Any) -> None:
        depth = 2 if codec.may_hold_buffers((item,)) else 0
        try:
            data = codec.encode(item, True, snapshot=False, depth=depth)
        except Exception as exc:
            raise _StreamEnd(p.RESULT_NOT_SERIALIZABLE, pickle.dumps(codec.describe(exc))) from None
        if len(data) > self.limit:
            raise _StreamEnd(p.RESULT_TOO_LARGE, pickle.dumps(len(data)))
        payload, bit = self.outbox.body(data)
        self.outbox.announce()  # items reach the consumer at once, after earlier answers
        self.channel.send(wire_id, p.ITEM | bit, payload)


class _StreamEnd(Exception):
    """A stream item could not be sent (not picklable, or too large): the stream ends so."""

    def __init__(self, tag: int, answer: bytes) -> None:
        super().__init__(tag)
        self.tag = tag
        self.answer = answer


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak (other Unixes)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(rfd: int, wfd: int, ctl_fd: int, *, interruptible: bool, parent_pid: int | None) -> None:
    """Run tasks until the parent says QUIT or closes the task pipe.

    ``interruptible``: a STOP of the running task raises an interrupt in it (interpreter
    workers); otherwise the worker answers ``RUNNING`` and the parent kills the process.
    ``parent_pid``: exit at once when that process is gone (process workers).
    """
    channel = Channel(rfd, wfd)
    first = channel.receive()
    if first is None or first[1] != p.INIT:
        return
    settings: dict[str, Any] = pickle.loads(first[2])
    sys.path[:] = settings["sys_path"]
    mainmod.install(settings.get("main"))
    if settings.get("rlimit_as") and parent_pid is not None:
        import resource

        limit = int(settings["rlimit_as"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    worker = _Worker(
        channel, settings, interruptible=interruptible, parent_pid=parent_pid, ctl_fd=ctl_fd
    )
    try:
        worker.watcher.start()
        info = {"pid": os.getpid(), "shared": worker.ring is not None}
        channel.send(0, p.READY, pickle.dumps(info, p.PICKLE_PROTOCOL))
        worker.loop()
    finally:
        worker.watcher.stop()
        worker.close()
