"""Tasks as users write them: ``Task``, ``Priority``, ``Retry`` (plain values, checked once)."""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .errors import InvalidTask, error_codes

__all__ = ("ALL_KINDS", "KindName", "Priority", "PriorityLike", "Retry", "Task")

KindName = Literal["process", "interpreter", "dask"]
ALL_KINDS: Final = frozenset({"process", "interpreter", "dask"})


class Priority(enum.IntEnum):
    """Queue order: every waiting ``HIGH`` task starts before any ``NORMAL``, then ``LOW``."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


PriorityLike = Priority | Literal["high", "normal", "low"]


def coerce_priority(value: object) -> Priority:
    """``"high"``, ``Priority.HIGH`` -> ``Priority.HIGH``; anything else is ``INVALID_TASK``."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority[value.upper()]
        except KeyError:
            pass
    raise InvalidTask(f"priority must be 'high', 'normal' or 'low', not {value!r}")


def coerce_timeout(value: object, name: str = "timeout") -> float | None:
    """Seconds: ``None`` (no bound) or a number > 0 (``inf`` means none)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTask(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if math.isnan(value) or value <= 0:
        raise InvalidTask(f"{name} must be > 0 seconds, not {value!r}")
    if math.isinf(value):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class Retry:
    """Run a task again when it fails with one of the ``on`` errors, up to ``attempts``
    more times: ``Retry(attempts=2)`` runs a task at most 3 times.

    >>> Retry(attempts=2).delay(1) <= 0.2
    True
    >>> Retry(on={"WORKER_CRASHED", "TIMEOUT", ValueError}).on >= {"TIMEOUT", ValueError}
    True

    ``on`` holds ``OffloadError`` codes (``"WORKER_CRASHED"``, ``"TIMEOUT"``...),
    ``"TASK_ERROR"`` (any exception the task itself raised), exception classes (matched with
    ``isinstance``) and exception class names (``"ValueError"``, matched along the class's
    bases). An unknown code is ``InvalidTask`` at once, never a policy that silently never
    matches.

    Waits ``backoff * 2**(attempt - 1)`` seconds (at most ``max_backoff``), times a random
    factor in [0.5, 1.5) when ``jitter`` is on. Retries stay inside the task's deadline: one
    that could not start before it is not made, and the last error stands. By default only
    ``WORKER_CRASHED`` is retried: an exception raised by the task itself would most likely be
    raised again.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: bool = True
    on: frozenset[str | type[BaseException]] = frozenset({"WORKER_CRASHED"})

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidTask(f"Retry.attempts must be an int, not {self.attempts!r}")
        if self.attempts < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise InvalidTask("Retry attempts and delays must be >= 0")
        given: Any = self.on  # (a lone code or class is taken as a set of one)
        on = frozenset([given] if isinstance(given, str | type) else given)
        for entry in on:
            _check_retry_entry(entry)
        object.__setattr__(self, "on", on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random()) if self.jitter else base


#: ``Retry.on``: any exception the task itself raised (as in ``offload.jobs``).
TASK_ERROR: Final = "TASK_ERROR"
_CODE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+")


def _check_retry_entry(entry: object) -> None:
    if isinstance(entry, type) and issubclass(entry, BaseException):
        return
    if isinstance(entry, str) and entry:
        codes = error_codes()
        if _CODE.fullmatch(entry) and entry != TASK_ERROR and entry not in codes:
            raise InvalidTask(
                f"Retry.on: {entry!r} is not an error code; codes are {TASK_ERROR!r} (the "
                f"task's own exceptions) and {', '.join(sorted(codes))}"
            )
        return
    raise InvalidTask(
        "Retry.on takes error codes ('WORKER_CRASHED', 'TIMEOUT', 'TASK_ERROR'...), exception "
        f"classes and exception class names, not {entry!r}"
    )


def coerce_retry(value: object, name: str = "retry") -> Retry | None:
    """``None``, a ``Retry``, or a number of retries (``0`` means none; ``2``: at most 3
    runs). ``name`` is the option's name in the error (``"retries"`` for dict tasks)."""
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Retry(attempts=value) if value else None
    raise InvalidTask(
        f"{name} must be a Retry, a number of retries >= 0 (2: at most 3 runs) or None, "
        f"not {value!r}"
    )


@dataclass(frozen=True, slots=True)
class Task:
    """A callable and its arguments, with queue options.

    >>> Task(pow, args=(2, 10), priority="high", timeout=5.0).priority
    <Priority.HIGH: 0>

    ``fn`` must be picklable by reference (a module-level function or class), because it
    runs in another process or interpreter.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: PriorityLike = Priority.NORMAL
    timeout: float | None = None
    #: Free-form identifier echoed in errors (``OffloadError.task_id``) and stats.
    id: str | None = None
    #: Retry policy (or a number of retries); ``None`` takes the manager's default.
    retry: Retry | int | None = None
    #: The longest it may wait before it starts (seconds); ``None``: the manager's.
    max_wait: float | None = None

    def __post_init__(self) -> None:
        fn: object = self.fn  # typed callers cannot get this wrong; untyped ones can
        if not callable(fn):
            raise InvalidTask(f"Task.fn must be callable, not {type(fn).__name__}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "priority", coerce_priority(self.priority))
        object.__setattr__(self, "timeout", coerce_timeout(self.timeout))
        object.__setattr__(self, "retry", coerce_retry(self.retry))
        object.__setattr__(self, "max_wait", coerce_timeout(self.max_wait, "max_wait"))

    def __repr__(self) -> str:
        # Never show argument values: they may hold secrets.
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return (
            f"Task({name}, args=<{len(self.args)}>, priority={self.priority!s}, "
            f"timeout={self.timeout!r}, id={self.id!r})"
        )


Task.__module__ = Priority.__module__ = Retry.__module__ = "offload"
