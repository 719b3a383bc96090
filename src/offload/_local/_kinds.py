"""The two local worker kinds, each declaring what it can do instead of being asked what it is.

=============  =========================================  =====================================
               process                                    interpreter (3.13+)
=============  =========================================  =====================================
runs in        a child process leading its own process    a subinterpreter with its own GIL,
               group (``python -P -c ...``)               on a daemon thread of this process
stop a task    SIGKILL to the group (its own children     an interrupt raised inside the call;
               too), then reap it                         one stuck in C is quarantined
warm spares    yes                                        no (an interpreter starts in ~20 ms)
crash          only that worker                           the whole process
=============  =========================================  =====================================
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Final

from .._offload_worker import boot
from .._runtime import Runtime
from ._subinterp import Subinterpreter, describe_failure

__all__ = ("Handle", "InterpreterKind", "LocalKind", "ProcessKind", "kind_named")

log = logging.getLogger("offload")


class Handle(abc.ABC):
    """A launched worker: how to end it and what to say about it."""

    pid: int | None = None
    exited = False
    #: The shared memfds' numbers as the worker sees them (its own copies, for a kind that
    #: shares this process: the parent may close its numbers, and another thread reuse them,
    #: before the worker has opened them).
    shared: tuple[int, ...] = ()

    @abc.abstractmethod
    def kill(self) -> None:
        """End it now if its kind can (processes); otherwise do nothing."""

    @abc.abstractmethod
    def exit_note(self) -> str:
        """How it ended, for messages (``" (killed by SIGSEGV)"``), if known."""

    def reaped(self) -> None:  # noqa: B027  (most kinds have nothing to clean up)
        """It has ended: clean up after it (kill what it left behind, join its thread)."""

    def rss(self) -> int | None:
        """Resident memory in bytes, where known."""
        return None


class LocalKind(abc.ABC):
    """What a local worker kind can do, and how to launch one."""

    name: str
    #: Keep warm spares: a lost worker's slot is filled at once.
    spares: bool
    #: A STOP of a running task interrupts it in place; the worker lives on.
    interrupts: bool

    @abc.abstractmethod
    def launch(
        self,
        runtime: Runtime,
        fds: tuple[int, int, int],
        shared: tuple[int, ...],
        nice: int,
        on_exit: Callable[[], None],
    ) -> Handle:
        """Start a worker on the child ends ``fds`` (task read, answer write, control read),
        sharing the memfds ``shared``, ``nice`` steps below the caller's CPU priority; call
        ``on_exit()`` on the loop once it has ended. The caller closes ``fds`` afterwards
        unless ``owns_fds``."""

    #: The launched worker closes the child ends itself (an interpreter's host thread).
    owns_fds: bool = False


# -- processes -------------------------------------------------------------------------------


class _ProcessHandle(Handle):
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid

    def kill(self) -> None:
        """SIGKILL the worker's process group: the worker and what its tasks started."""
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)  # (if it left its group)

    def reaped(self) -> None:
        """It has exited: anything its tasks started and left in its group goes too."""
        self.exited = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def exit_note(self) -> str:
        return boot.describe_exit(self.process.returncode)

    def rss(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


class ProcessKind(LocalKind):
    name = "process"
    spares = True
    interrupts = False

    def launch(
        self,
        runtime: Runtime,
        fds: tuple[int, int, int],
        shared: tuple[int, ...],
        nice: int,
        on_exit: Callable[[], None],
    ) -> Handle:
        # Popen (vfork+exec) takes about a millisecond: cheaper than a thread hop. The worker
        # leads its own process group, so a stop kills what its task started too, and Ctrl-C
        # at a terminal (sent to the foreground group) reaches only the application.
        process = subprocess.Popen(
            boot.command(*fds),
            pass_fds=(*fds, *shared),
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        handle = _ProcessHandle(process)
        handle.shared = shared
        if nice:  # the whole process, start-up included: it never competes with the loop
            with contextlib.suppress(OSError):
                own = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PROCESS, process.pid, min(19, own + nice))
        _watch_exit(runtime, handle, on_exit)
        return handle


def _watch_exit(runtime: Runtime, handle: _ProcessHandle, on_exit: Callable[[], None]) -> None:
    """Call ``on_exit`` once the process has exited and been reaped.

    From the process itself (a pidfd), never from end-of-file on a pipe: a task that forks
    hands its copy of the pipes to the child, which may outlive the worker.
    """
    process = handle.process
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits instead

        def wait() -> None:
            process.wait()
            runtime.call_soon_threadsafe(done)

        threading.Thread(target=wait, name="offload-reaper", daemon=True).start()
        pidfd = -1

    def done() -> None:
        if handle.exited:
            return
        handle.reaped()
        on_exit()

    def on_readable() -> None:
        if process.poll() is None:
            return
        runtime.unwatch_readable(pidfd)
        os.close(pidfd)
        done()

    if pidfd >= 0:
        runtime.watch_readable(pidfd, on_readable)


# -- interpreters ----------------------------------------------------------------------------

_hosts: set[threading.Thread] = set()  # interpreter host threads still running
_hosts_lock = threading.Lock()
_atexit_registered = False


def _exit_past_stuck_interpreters() -> None:
    """At exit: an interpreter stuck in a C call would hang the interpreter's finalisation
    (it waits for every subinterpreter). Such a worker was abandoned by its manager's
    shutdown already; end the process now rather than never."""
    with _hosts_lock:
        alive = [t for t in _hosts if t.is_alive()]
    for thread in alive:
        thread.join(0.2)
    if any(t.is_alive() for t in alive):
        log.warning(
            "offload: %d interpreter worker(s) still stuck in a call at exit; "
            "ending the process without waiting for them",
            sum(t.is_alive() for t in alive),
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(1 if getattr(sys, "last_exc", None) is not None else 0)


class _InterpreterHandle(Handle):
    def __init__(self) -> None:
        self.failure = ""
        self.thread: threading.Thread | None = None

    def kill(self) -> None:
        pass  # an interpreter cannot be killed; the pool quarantines it instead

    def reaped(self) -> None:
        """Its thread said it is done: it is past its last line, so joining is immediate."""
        if self.thread is not None:
            self.thread.join(1.0)

    def exit_note(self) -> str:
        return f" ({self.failure.strip().splitlines()[-1]})" if self.failure.strip() else ""


class InterpreterKind(LocalKind):
    name = "interpreter"
    spares = False
    interrupts = True
    owns_fds = True

    def launch(
        self,
        runtime: Runtime,
        fds: tuple[int, int, int],
        shared: tuple[int, ...],
        nice: int,
        on_exit: Callable[[], None],
    ) -> Handle:
        global _atexit_registered
        handle = _InterpreterHandle()
        code = boot.interpreter_boot(*fds)
        copies = tuple(os.dup(fd) for fd in shared)  # the host thread owns and closes these
        handle.shared = copies
        own = _own_nice()

        def host() -> None:
            try:
                if nice:
                    with contextlib.suppress(OSError):
                        os.setpriority(
                            os.PRIO_PROCESS, threading.get_native_id(), min(19, own + nice)
                        )
                try:
                    interpreter = Subinterpreter()
                except Exception as exc:
                    handle.failure = f"could not create a subinterpreter: {describe_failure(exc)}"
                    return
                try:
                    error = interpreter.run(code)
                    if error is not None:
                        handle.failure = error
                finally:
                    interpreter.close()
            finally:
                _close_all(fds)
                _close_all(copies)
                handle.exited = True
                with _hosts_lock:
                    _hosts.discard(threading.current_thread())
                runtime.call_soon_threadsafe(on_exit)

        thread = threading.Thread(target=host, name="offload-interpreter", daemon=True)
        handle.thread = thread
        with _hosts_lock:
            _hosts.add(thread)
            if not _atexit_registered:
                _atexit_registered = True
                atexit.register(_exit_past_stuck_interpreters)
        thread.start()
        return handle


def _own_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return 0


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_KINDS: Final[dict[str, LocalKind]] = {"process": ProcessKind(), "interpreter": InterpreterKind()}


def kind_named(name: str) -> LocalKind:
    return _KINDS[name]
