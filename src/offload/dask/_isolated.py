"""What a Dask worker runs for a task with ``isolate=True``: the call, in a child process.

Each child is an offload worker process, the same code process workers run
(``offload._offload_worker``): started with ``boot.command``, given ``INIT`` settings without a
ring or arenas (so answers come back over the answer pipe), driven one call at a time with the
worker package's frames (``channel.Channel``), and described with ``boot.describe_exit`` when
it ends. It is killed (SIGKILL) when its task is stopped; a crash ends only the child.

Per Dask worker process, ``ISOLATED`` keeps the idle children of each manager (by the backend's
token) for reuse, and which child runs which Dask key so that a stop can find it. Blocking
code: the calls run in Dask worker threads; ``stop_isolated`` and ``close_isolated`` run on
the Dask worker's event loop (``Client.run``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Final

from .._offload_worker import boot
from .._offload_worker import protocol as p
from .._offload_worker.channel import Channel
from ._runner import Answer

__all__ = (
    "CHILD_LOST",
    "CHILD_START_FAILED",
    "STOPPED",
    "close_isolated",
    "run_isolated",
    "stop_isolated",
)

# Answers only this runner gives (the worker package's tags are below 100).
CHILD_LOST: Final = 101  # payload: pickled text saying how the child ended
STOPPED: Final = 102  # stopped by its manager, before or while it ran
CHILD_START_FAILED: Final = 103  # payload: pickled text
#: Stop requests for keys not seen here are kept this long (seconds).
_STOPPED_KEEP: Final = 300.0


class Child:
    """An offload worker process that is a child of this Dask worker, one call at a time.

    Blocking. ``kill`` may be called from another thread.
    """

    def __init__(self, token: str, settings: dict[str, Any]) -> None:
        self.token = token
        self.killed = False
        self._wire = 0
        task_r, task_w = os.pipe()
        answer_r, answer_w = os.pipe()
        control_r, control_w = os.pipe()
        theirs = (task_r, answer_w, control_r)
        try:
            self.process = subprocess.Popen(
                boot.command(*theirs), pass_fds=theirs, stdin=subprocess.DEVNULL
            )
        except BaseException:
            for fd in (task_w, answer_r, control_w):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        # The control pipe stays open and unused: the worker's watcher reads it, and would
        # take its end-of-file for the parent being gone.
        self._fds: tuple[int, ...] = (answer_r, task_w, control_w)
        self.channel = Channel(answer_r, task_w)
        try:
            self.channel.send(0, p.INIT, pickle.dumps(settings, p.PICKLE_PROTOCOL))
            ready = self.channel.receive()
        except OSError:
            ready = None
        if ready is None or ready[1] != p.READY:
            raise RuntimeError(f"offload's worker process did not start{self.reap()}")

    def run(self, body: bytes, oob: bool) -> Answer | None:
        """The call's answer, or ``None`` if the child died (or was killed) meanwhile."""
        self._wire += 1
        wire = self._wire
        try:
            self.channel.send(wire, p.RUN | (p.OOB if oob else 0), body)
            while True:
                frame = self.channel.receive()
                if frame is None:
                    return None
                wire_id, tag, payload, seconds = frame
                if wire_id == wire and tag & ~p.OOB in p.FINAL:
                    return tag, bytes(payload), seconds
                # anything else (progress events) does not travel through Dask
        except OSError:  # a pipe broke: it died
            return None

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(OSError):
            self.process.send_signal(signal.SIGKILL)

    def reap(self) -> str:
        """Close the pipes, wait for the child to exit, and say how it ended."""
        fds, self._fds = self._fds, ()
        for fd in fds:  # once only: a number closed twice may be another thread's by then
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.wait()
        return boot.describe_exit(code)


class _Isolated:
    """Per Dask worker process: the isolated children of each manager (by its token)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.idle: dict[str, list[Child]] = {}  # token -> children waiting for a call
        self.busy: dict[str, Child] = {}  # dask key -> the child running it
        self.starting: dict[str, int] = {}  # token -> children being started
        self.stopped: dict[str, float] = {}  # keys stopped before their call began -> when
        self.closed: set[str] = set()  # tokens of managers that shut down

    def take(self, token: str, key: str) -> tuple[bool, Child | None]:
        """``(go, child)``: whether the call may run, and an idle child if there is one."""
        with self.changed:
            if self.stopped.pop(key, None) is not None or token in self.closed:
                return False, None
            idle = self.idle.get(token)
            if idle:
                child = idle.pop()
                self.busy[key] = child
                return True, child
            self.starting[token] = self.starting.get(token, 0) + 1
            return True, None

    def started(self, token: str, key: str, child: Child | None) -> bool:
        """A new child is up (or failed to start): whether its call may run."""
        go = False
        with self.changed:
            if child is not None:
                go = self.stopped.pop(key, None) is None and token not in self.closed
                if go:
                    self.busy[key] = child
            self.starting[token] -= 1
            if not self.starting[token]:
                del self.starting[token]
        if child is not None and not go:
            self.put_back(token, child)
        self._notify()
        return go

    def put_back(self, token: str, child: Child) -> None:
        """Keep ``child`` for the manager's next call, or end it if the manager shut down."""
        with self.changed:
            if token not in self.closed:
                self.idle.setdefault(token, []).append(child)
                return
        child.kill()
        child.reap()

    def done(self, key: str) -> None:
        with self.changed:
            self.busy.pop(key, None)
            self.changed.notify_all()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def _active(self, token: str) -> bool:
        return token in self.starting or any(c.token == token for c in self.busy.values())

    def stop(self, token: str, key: str) -> bool:
        """Kill the child running ``key``, or make sure the call never starts here."""
        with self.changed:
            child = self.busy.get(key)
            if child is not None and child.token == token:
                child.kill()  # its call's thread reaps it
                return True
            old = time.monotonic() - _STOPPED_KEEP
            for stale in [k for k, when in self.stopped.items() if when < old]:
                del self.stopped[stale]
            self.stopped[key] = time.monotonic()
        return False

    def close(self, token: str) -> list[Child]:
        """No more calls for ``token``: kill its busy children, hand back its idle ones."""
        with self.changed:
            self.closed.add(token)
            for child in self.busy.values():
                if child.token == token:
                    child.kill()
            return self.idle.pop(token, [])

    def wait_gone(self, token: str, timeout: float) -> bool:
        """Wait until no child of ``token`` runs or starts here; ``False`` on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: not self._active(token), timeout)


ISOLATED: Final = _Isolated()


def run_isolated(body: bytes, oob: bool, settings: dict[str, Any], token: str, key: str) -> Answer:
    """Run one pickled call in a child process of this Dask worker (killed if stopped).

    ``settings``: the child's ``INIT`` settings but ``sys_path`` (this worker's is used);
    ``token``: the manager's backend; ``key``: the Dask key, by which a stop finds the call.
    """
    iso = ISOLATED
    go, child = iso.take(token, key)
    if not go:
        return STOPPED, b"", 0.0
    try:
        if child is None:
            try:
                child = Child(token, {**settings, "sys_path": list(sys.path)})
            except BaseException as exc:
                iso.started(token, key, None)
                if not isinstance(exc, Exception):
                    raise
                message = f"could not start an isolated process on the dask worker: {exc}"
                return CHILD_START_FAILED, pickle.dumps(message), 0.0
            if not iso.started(token, key, child):
                return STOPPED, b"", 0.0
        answer = child.run(body, oob)
        if answer is None:  # killed to stop it, or it died
            note = child.reap()
            return (STOPPED, b"", 0.0) if child.killed else (CHILD_LOST, pickle.dumps(note), 0.0)
        iso.put_back(token, child)
        return answer
    finally:
        iso.done(key)  # last: a closing manager waits until its children are gone


def stop_isolated(token: str, key: str) -> bool:
    """On a Dask worker: stop the call of ``key`` (kill its child), or make sure it never
    starts here. ``True`` when a running child was killed."""
    return ISOLATED.stop(token, key)


async def close_isolated(token: str) -> int:
    """On a Dask worker's event loop: end the children of a manager that shut down, and wait
    (up to 10 s, in a thread) until they are gone. The number of idle children ended."""
    import anyio.to_thread

    idle = ISOLATED.close(token)
    for child in idle:
        child.kill()
        child.reap()
    await anyio.to_thread.run_sync(ISOLATED.wait_gone, token, 10.0)
    return len(idle)
