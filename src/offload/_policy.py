"""Policies around a task's attempts: retries with backoff, and the poison-task guard."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from ._task import TASK_ERROR
from .errors import OffloadError, PoisonTask, TaskFailed

if TYPE_CHECKING:
    from ._offload_worker.codec import Payload
    from ._task import Retry

__all__ = (
    "POISON_MEMORY",
    "PoisonGuard",
    "class_name",
    "code_of",
    "retries_on",
    "should_retry",
)

POISON_MEMORY: Final = 600.0  # seconds a crash counts against an identical task
_REMEMBERED: Final = 1024


def code_of(exc: BaseException) -> str:
    """The code a retry policy matches: an ``OffloadError``'s code, else the type's name."""
    return exc.code if isinstance(exc, OffloadError) else type(exc).__name__


def retries_on(on: frozenset[str | type[BaseException]], exc: BaseException) -> bool:
    """Whether ``exc`` is one of the errors a ``Retry.on`` names (see ``Retry``)."""
    if code_of(exc) in on:
        return True
    if TASK_ERROR in on and (isinstance(exc, TaskFailed) or not isinstance(exc, OffloadError)):
        return True
    names = {entry for entry in on if isinstance(entry, str)}
    for cls in type(exc).__mro__[:-1]:  # (not ``object``)
        if cls in on or names & {cls.__name__, cls.__qualname__, class_name(cls)}:
            return True
    return False


def class_name(cls: type) -> str:
    """``ValueError`` for builtins, ``module.Qualname`` otherwise (how ``offload.jobs`` stores
    an exception class in a job's ``retry_on``)."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def should_retry(
    retry: Retry | None, exc: BaseException, attempt: int, now: float, deadline: float | None
) -> float | None:
    """Seconds to wait before retry number ``attempt`` (1-based), or ``None``: give up."""
    if retry is None or attempt > retry.attempts or not retries_on(retry.on, exc):
        return None
    delay = retry.delay(attempt)
    if deadline is not None and now + delay >= deadline:
        return None  # retries stay inside the task's deadline
    return delay


class PoisonGuard:
    """Refuses a task identical (function and arguments) to one that crashed workers
    ``poison_after`` times within ``POISON_MEMORY`` seconds."""

    def __init__(self, poison_after: int | None) -> None:
        self.poison_after = poison_after
        # payload digest -> (crashes, when the last one happened)
        self._crashes: OrderedDict[bytes, tuple[int, float]] = OrderedDict()

    def check(self, payload: bytes | Payload, task_id: str | None) -> None:
        """Raise ``PoisonTask`` for a payload that keeps crashing workers."""
        if self.poison_after is None or not self._crashes:
            return
        key = digest(payload)
        crashes, last = self._crashes.get(key, (0, 0.0))
        if time.monotonic() - last > POISON_MEMORY:
            self._crashes.pop(key, None)  # long ago: an outside kill, or since fixed
            return
        if crashes >= self.poison_after:
            raise PoisonTask(
                f"not run: this exact task (same function and arguments) crashed workers "
                f"{crashes} times; fix the input or the function",
                task_id=task_id,
            )

    def note_crash(self, payload: bytes | Payload) -> None:
        if self.poison_after is None:
            return
        key = digest(payload)
        self._crashes[key] = (self._crashes.get(key, (0, 0.0))[0] + 1, time.monotonic())
        self._crashes.move_to_end(key)
        while len(self._crashes) > _REMEMBERED:
            self._crashes.popitem(last=False)


def digest(payload: bytes | Payload) -> bytes:
    if isinstance(payload, bytes):
        return hashlib.blake2b(payload, digest_size=16).digest()
    hashed = hashlib.blake2b(payload.data, digest_size=16)
    for buffer in payload.buffers:
        hashed.update(buffer)
    return hashed.digest()
