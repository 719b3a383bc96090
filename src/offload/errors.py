"""Every error offload raises, each with a stable string ``code``.

The tree::

    OffloadError
    │   refused before anything was reserved
    ├── QueueFull          QUEUE_FULL           the bounded queue said no (also queue.Full)
    │   └── WouldTimeOut   WOULD_TIME_OUT       the work ahead means it could not start in time
    ├── ManagerClosed      SHUTDOWN             submitted after shutdown, or cancelled by it
    ├── NotStarted         NOT_STARTED          the manager was never started (a programming error)
    ├── InvalidTask        INVALID_TASK         a malformed task (bad priority, timeout, ...)
    ├── UnknownTask        UNKNOWN_TASK         a dict task names no registered type
    ├── NotSerializable    NOT_SERIALIZABLE     an argument or result cannot be pickled
    ├── PayloadTooLarge    PAYLOAD_TOO_LARGE    an argument or result is over the payload limit
    ├── UnsupportedKind    UNSUPPORTED_KIND     the kind can't run here, or can't run this task
    ├── NoCurrentManager   NO_CURRENT_MANAGER   current_manager() found none (also LookupError)
    ├── MainGuardMissing   MAIN_GUARD_MISSING   the script starts a manager when a worker loads it
    │   failed while running
    ├── TaskTimeout        TIMEOUT              the deadline passed (also TimeoutError)
    ├── TaskFailed         WORKER_ERROR         the task raised; its exception can't be rebuilt
    ├── WorkerCrashed      WORKER_CRASHED       the worker died while running the task
    │   └── PoisonTask     POISON_TASK          refused: the same task crashed workers before
    │   start-up, and the built-in tasks
    ├── WorkerStartFailed  WORKER_START_FAILED  a worker failed its start-up handshake
    ├── InvalidInput       INVALID_INPUT        a built-in got corrupt or unsupported input
    ├── DecryptFailed      DECRYPT_FAILED       wrong key, tampered or truncated ciphertext
    └── OutputTooLarge     OUTPUT_TOO_LARGE     a decompression went over its limit

A task's *own* exception is not wrapped: if ``fn`` raises ``ValueError`` in a worker, the
caller gets that ``ValueError`` back, with the remote traceback chained as ``__cause__``.

Codes are attributes, never only in messages, so handlers can switch on them::

    try:
        await wm.run(crunch, data, timeout=1.0)
    except OffloadError as exc:
        if exc.code == "QUEUE_FULL":
            ...
"""

from __future__ import annotations

import queue
from typing import ClassVar

__all__ = (
    "DecryptFailed",
    "InvalidInput",
    "InvalidTask",
    "MainGuardMissing",
    "ManagerClosed",
    "NoCurrentManager",
    "NotSerializable",
    "NotStarted",
    "OffloadError",
    "OutputTooLarge",
    "PayloadTooLarge",
    "PoisonTask",
    "QueueFull",
    "TaskFailed",
    "TaskTimeout",
    "UnknownTask",
    "UnsupportedKind",
    "WorkerCrashed",
    "WorkerStartFailed",
    "WouldTimeOut",
)


class OffloadError(Exception):
    """The root of every error offload raises. ``code`` is stable; messages may change."""

    code: ClassVar[str] = "OFFLOAD_ERROR"

    def __init__(self, message: str = "", *, task_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The ``id`` of the dict task (or ``Task.id``) this error belongs to, if it had one.
        self.task_id = task_id

    def __str__(self) -> str:
        if self.task_id is not None:
            return f"[{self.code}] task {self.task_id!r}: {self.message}"
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keep task_id across pickling (errors raised inside workers travel back by pickle).
        return (_rebuild, (type(self), self.message, self.task_id))


def _rebuild(cls: type[OffloadError], message: str, task_id: str | None) -> OffloadError:
    return cls(message, task_id=task_id)


class QueueFull(OffloadError, queue.Full):
    """The queue holds ``max_queue`` tasks already; nothing was reserved. Retry later."""

    code = "QUEUE_FULL"


class WouldTimeOut(QueueFull):
    """Refused at once: by the run times measured on this manager, the work ahead of the task
    would not let it start in time for its deadline (or its ``max_wait``). Nothing was
    reserved. ``retry_after`` (seconds) is when the work ahead should be done."""

    code = "WOULD_TIME_OUT"

    def __init__(
        self, message: str = "", *, task_id: str | None = None, retry_after: float = 1.0
    ) -> None:
        super().__init__(message, task_id=task_id)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_would, (self.message, self.task_id, self.retry_after))


def _rebuild_would(message: str, task_id: str | None, retry_after: float) -> WouldTimeOut:
    return WouldTimeOut(message, task_id=task_id, retry_after=retry_after)


class TaskTimeout(OffloadError, TimeoutError):
    """The task's deadline passed while it waited or ran. A running process task was stopped."""

    code = "TIMEOUT"


class TaskFailed(OffloadError):
    """The task raised, and its exception could not be sent back as itself.

    ``exc_type`` and ``remote_traceback`` describe what happened in the worker.
    """

    code = "WORKER_ERROR"

    def __init__(
        self,
        message: str = "",
        *,
        task_id: str | None = None,
        exc_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message, task_id=task_id)
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_failed,
            (self.message, self.task_id, self.exc_type, self.remote_traceback),
        )


def _rebuild_failed(
    message: str, task_id: str | None, exc_type: str, remote_traceback: str
) -> TaskFailed:
    return TaskFailed(
        message, task_id=task_id, exc_type=exc_type, remote_traceback=remote_traceback
    )


class WorkerCrashed(OffloadError):
    """The worker running this task died (``os._exit``, a signal, the OOM killer).

    Only this task fails; the worker is replaced and other tasks go on.
    """

    code = "WORKER_CRASHED"


class PoisonTask(WorkerCrashed):
    """Refused without running: an identical task (same function and arguments) already
    crashed workers ``poison_after`` times. Fix the input; retrying will not help."""

    code = "POISON_TASK"


class NotSerializable(OffloadError):
    """An argument or a result could not be pickled (or unpickled on the other side)."""

    code = "NOT_SERIALIZABLE"


class PayloadTooLarge(OffloadError):
    """An argument or a result is larger than the manager's ``max_payload`` bytes."""

    code = "PAYLOAD_TOO_LARGE"


class UnknownTask(OffloadError, LookupError):
    """A dict task names a ``type`` that was never registered with ``@offload.task``."""

    code = "UNKNOWN_TASK"


class InvalidTask(OffloadError, ValueError):
    """A task is malformed: a bad priority, a negative timeout, a missing ``type``..."""

    code = "INVALID_TASK"


class ManagerClosed(OffloadError):
    """The manager is shut down (or shutting down) and takes no more work."""

    code = "SHUTDOWN"


class NotStarted(OffloadError, RuntimeError):
    """The manager was never started: use ``async with WorkerManager(...) as wm:`` (or
    ``await wm.start()``) before submitting. A programming error, not a busy server."""

    code = "NOT_STARTED"


class NoCurrentManager(OffloadError, LookupError, RuntimeError):
    """``offload.current_manager()`` found no manager (a ``LookupError`` and a
    ``RuntimeError`` too)."""

    code = "NO_CURRENT_MANAGER"


class MainGuardMissing(OffloadError, RuntimeError):
    """A worker loading your script (to find a task defined in it) found that the script
    starts a manager at import time: put that code under ``if __name__ == "__main__":``."""

    code = "MAIN_GUARD_MISSING"


class UnsupportedKind(OffloadError):
    """The worker kind is not available here, or cannot run this task."""

    code = "UNSUPPORTED_KIND"


class WorkerStartFailed(OffloadError):
    """A worker did not complete its start-up handshake in time, or exited during it."""

    code = "WORKER_START_FAILED"


class InvalidInput(OffloadError, ValueError):
    """A built-in task was given corrupt or unsupported input (bad frame, unknown algorithm)."""

    code = "INVALID_INPUT"


class DecryptFailed(OffloadError):
    """Decryption failed: wrong key, tampered or truncated ciphertext, or wrong associated data."""

    code = "DECRYPT_FAILED"


class OutputTooLarge(OffloadError):
    """A decompression would produce more than its ``max_output_size``."""

    code = "OUTPUT_TOO_LARGE"


for _cls in (
    OffloadError,
    QueueFull,
    WouldTimeOut,
    TaskTimeout,
    TaskFailed,
    WorkerCrashed,
    PoisonTask,
    NotSerializable,
    PayloadTooLarge,
    UnknownTask,
    InvalidTask,
    ManagerClosed,
    NotStarted,
    NoCurrentManager,
    MainGuardMissing,
    UnsupportedKind,
    WorkerStartFailed,
    InvalidInput,
    DecryptFailed,
    OutputTooLarge,
):
    _cls.__module__ = "offload"
del _cls


def error_codes() -> frozenset[str]:
    """Every ``code`` of the error classes defined so far (those of ``offload.jobs`` once it
    is imported): what a retry policy may name."""
    codes: set[str] = set()
    pending: list[type[OffloadError]] = [OffloadError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    codes.discard(OffloadError.code)
    return frozenset(codes)
