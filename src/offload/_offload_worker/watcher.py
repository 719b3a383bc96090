"""The watcher thread: control words heard while a task runs, and the parent going away.

The main thread and the watcher agree on each task's fate under one lock (``Gate``), so a
STOP or TAKE_BACK is decided exactly once: a task that has not begun is never started
(``REVOKED``), a task that runs is interrupted (interpreter workers: ``PyThreadState_
SetAsyncExc`` from this thread reaches the interpreter's running thread) or reported
``RUNNING`` (process workers: the parent kills the process), and a task that has finished
keeps its answer.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Final

from . import protocol as p
from .channel import Channel

IDLE: Final = 0
LOADING: Final = 1
RUNNING: Final = 2
FINISHING: Final = 3

#: Answers left unannounced this long while a task runs are announced by the watcher.
FLUSH_AFTER: Final = 0.002


class Interrupted(BaseException):
    """Raised asynchronously in the running task to stop it (interpreter workers)."""


class Gate:
    """What the main thread and the watcher share: the current task and the stop requests."""

    def __init__(self) -> None:
        # (an RLock: ``locked`` can tell whether this thread still owns it)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # closes, wakes, stops
        self.current = 0  # wire id being loaded, run or finished
        self.phase = IDLE
        self.done_upto = 0  # every wire id up to this one has its answer (or was skipped)
        self.revoked: set[int] = set()  # not started yet, never to start
        self.revoke_sent: dict[int, bool] = {}  # ... and REVOKED was sent already
        self.stop_current = False  # STOP or TAKE_BACK came while the current task loaded
        self.stopped_running = False  # STOP came while it ran: it is being interrupted
        # Streams: items the consumer allowed (the watcher adds) and items sent (the main thread
        # adds); two counters with one writer each, so no lock is needed.
        self.granted: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.closing: set[int] = set()  # streams asked to close
        self.target = threading.get_ident()  # the main thread: where interrupts are raised
        self.unflushed_since: float | None = None  # answers in the ring not announced yet


class Watcher:
    """Reads the control pipe (and watches the parent process) on its own thread."""

    def __init__(
        self,
        ctl_fd: int,
        channel: Channel,
        gate: Gate,
        *,
        interruptible: bool,
        parent_pid: int | None,
        flush: Callable[[], None],
    ) -> None:
        self.ctl_fd = ctl_fd
        self.channel = channel
        self.gate = gate
        self.interruptible = interruptible
        self.flush = flush
        self.parent_fd = _pidfd(parent_pid) if parent_pid is not None else None
        self.parent_pid = parent_pid
        self.progress: Callable[[], float | None] | None = None  # when progress is due
        self.flush_progress: Callable[[], None] | None = None
        self._wake_r, self._wake_w = os.pipe()  # stop(): the worker is done
        # (not a daemon: an isolated subinterpreter allows none; stop() ends it)
        self.thread = threading.Thread(target=self._run, name="offload-watch")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the thread (the worker's loop is over) and wait for it."""
        if self.thread.is_alive():
            os.write(self._wake_w, b"x")
            self.thread.join()
        for fd in (self._wake_r, self._wake_w, self.parent_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.ctl_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if self.parent_fd is not None:
            poller.register(self.parent_fd, select.POLLIN)
        buffer = b""
        size = p.CONTROL.size
        while True:
            events = poller.poll(self._timeout_ms())
            if any(fd == self._wake_r for fd, _ in events):
                return
            self._on_timer()
            if self.parent_pid is not None and self._parent_gone(events):
                os._exit(0)  # never outlive the parent (a process worker)
            if not any(fd == self.ctl_fd for fd, _ in events):
                continue
            try:
                data = os.read(self.ctl_fd, 4096)
            except OSError:
                data = b""
            if not data:
                if self.parent_pid is not None:
                    os._exit(0)  # the parent closed its end: it is gone or wants us gone
                with self.gate.changed:
                    self.gate.changed.notify_all()
                return
            buffer += data
            while len(buffer) >= size:
                op, wire_id, value = p.CONTROL.unpack_from(buffer)
                buffer = buffer[size:]
                self._handle(op, wire_id, value)

    def _parent_gone(self, events: list[tuple[int, int]]) -> bool:
        if self.parent_fd is not None:
            return any(fd == self.parent_fd for fd, _ in events)
        return os.getppid() != self.parent_pid  # (no pidfd: checked on every wake-up)

    def _timeout_ms(self) -> int:
        gate = self.gate
        wait: float | None = None
        if gate.unflushed_since is not None and gate.phase == RUNNING:
            wait = FLUSH_AFTER
        if self.progress is not None:
            due = self.progress()
            if due is not None:
                wait = due if wait is None else min(wait, due)
        if self.parent_fd is None and self.parent_pid is not None:
            wait = 1.0 if wait is None else min(wait, 1.0)
        return -1 if wait is None else max(1, int(wait * 1000))

    def _on_timer(self) -> None:
        gate = self.gate
        if self.flush_progress is not None:
            self.flush_progress()
        since = gate.unflushed_since
        if since is not None and time.monotonic() - since >= FLUSH_AFTER:
            with gate.lock:
                if gate.unflushed_since is not None and gate.phase == RUNNING:
                    gate.unflushed_since = None
                    self.flush()

    def _handle(self, op: int, wire_id: int, value: int) -> None:
        gate = self.gate
        if op == p.PING:
            self.channel.send(value, p.PONG)
            return
        with gate.changed:
            if op == p.STOP or op == p.TAKE_BACK:
                self._stop(wire_id, take_back=op == p.TAKE_BACK)
            elif op == p.CREDIT:
                gate.granted[wire_id] = gate.granted.get(wire_id, 0) + value
            elif op == p.CLOSE:
                gate.closing.add(wire_id)
            gate.changed.notify_all()  # (WAKE: just this)

    def _stop(self, wire_id: int, *, take_back: bool) -> None:
        """Decide the fate of ``wire_id`` (the lock is held)."""
        gate = self.gate
        if wire_id <= gate.done_upto:
            return  # it has its answer already
        if wire_id == gate.current:
            if gate.phase == LOADING:
                gate.stop_current = True  # the main thread answers REVOKED once it has loaded
            elif gate.phase == RUNNING and not take_back and not gate.stopped_running:
                gate.stopped_running = True
                if self.interruptible:
                    set_async_exc(gate.target, Interrupted)
                else:
                    self.channel.send(wire_id, p.RUNNING)
            return  # FINISHING: its answer is on its way
        if wire_id > gate.current and wire_id not in gate.revoked:
            gate.revoked.add(wire_id)
            gate.revoke_sent[wire_id] = True
            self.channel.send(wire_id, p.REVOKED)


def set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


def _pidfd(pid: int) -> int | None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    return fd
