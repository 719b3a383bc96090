"""Plain values of ``offload.jobs``: job records, statistics, and the checks made at enqueue."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from .._policy import class_name, retries_on
from .._task import TASK_ERROR, Priority
from ..errors import InvalidTask, OffloadError, TaskFailed

__all__ = (
    "DEFAULT_RETRY_ON",
    "STATES",
    "TASK_ERROR",
    "FailedJob",
    "JobInfo",
    "JobState",
    "JobStats",
    "QueueStats",
    "Unrunnable",
)

JobState = Literal["queued", "running", "done", "failed"]
#: Every state a job can be in, in its life's order.
STATES: Final[tuple[JobState, ...]] = ("queued", "running", "done", "failed")

# TASK_ERROR, in ``retry_on``: any exception the task itself raised (not an ``OffloadError``
# of the machinery, such as ``TIMEOUT``; ``WORKER_ERROR``, a task exception that could not be
# rebuilt here, counts as the task's own). The same as in ``offload.Retry(on=...)``.
#: What is retried when a job sets no ``retry_on``.
DEFAULT_RETRY_ON: Final[tuple[str, ...]] = (TASK_ERROR, "WORKER_CRASHED")

MAX_NAME: Final = 200  # characters in a queue name, a type name or a job id

_PRIORITIES: Final = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}


def _when(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job as the store holds it (``JobQueue.get``). Times are aware UTC datetimes.

    - ``state``: ``"queued"`` (due or delayed: compare ``run_at``), ``"running"``, ``"done"``,
      ``"failed"``.
    - ``attempts``: how many times a worker took the job (a host that died counts one).
    - ``error``: ``"Type: message"`` of the last failed attempt (also while it waits for a
      retry, and ``UNKNOWN_TASK`` while no worker knows its type), else ``None``.
    - ``result``: the task's return value when it is JSON, else ``None``.
    - ``run_at``: when the job is (or was last) due; ``finished_at``: when it became done or
      failed.
    """

    id: str
    queue: str
    type: str
    data: Any
    state: JobState
    attempts: int
    error: str | None
    result: Any
    created_at: datetime
    run_at: datetime
    finished_at: datetime | None
    #: ``"high"``, ``"normal"`` or ``"low"``.
    priority: str = "normal"
    #: How many times a failed attempt may be retried (at most ``retries + 1`` attempts).
    retries: int = 0
    #: The task deadline of each attempt, in seconds.
    timeout: float | None = None
    #: When the last attempt started.
    started_at: datetime | None = None
    #: The ``OffloadError`` code of the last error (``"TIMEOUT"``, ...), if it had one.
    error_code: str | None = None
    #: The worker (``host:pid:n``) that runs the job, or ran it last.
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class FailedJob:
    """A failed-job record (``JobQueue.failed``): what ran, how often, and how it ended.

    ``error`` is ``"{error_type}: {message}"``; ``traceback`` is the full text, the worker's
    own traceback included (empty when the host died: ``LEASE_EXPIRED``).
    """

    id: str
    queue: str
    type: str
    data: Any
    attempts: int
    retries: int
    error_type: str
    message: str
    traceback: str
    failed_at: datetime
    error_code: str | None = None

    @property
    def error(self) -> str:
        return f"{self.error_type}: {self.message}"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts for one queue. ``queued == due + delayed``; ages in seconds."""

    queued: int = 0
    due: int = 0
    delayed: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    #: Seconds since the oldest due job became due (``None`` when nothing is due).
    oldest_due_age: float | None = None

    def count(self, state: str) -> int:
        """The count for ``state`` (one of ``STATES``, or ``"due"``/``"delayed"``)."""
        if state not in (*STATES, "due", "delayed"):
            raise ValueError(f"unknown state {state!r}; states are {STATES}")
        value: int = getattr(self, state)
        return value


@dataclass(frozen=True, slots=True)
class Unrunnable:
    """Due jobs that no worker can run: their type is not registered where they are worked."""

    queue: str
    type: str
    count: int
    error: str


@dataclass(frozen=True, slots=True)
class JobStats:
    """``JobQueue.stats()``: counts per queue and state, and the oldest due job's age.

    >>> stats.queues["emails"].failed  # doctest: +SKIP
    2
    >>> stats.counts  # doctest: +SKIP
    {'emails': {'queued': 3, 'running': 1, 'done': 40, 'failed': 2}}
    """

    queues: Mapping[str, QueueStats] = field(default_factory=dict)
    #: Seconds since the oldest due job (any queue) became due; ``None`` when nothing is due.
    oldest_due_age: float | None = None
    #: Due jobs whose type is not registered in the workers that saw them (``UNKNOWN_TASK``).
    unrunnable: tuple[Unrunnable, ...] = ()

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """``{queue: {state: count}}`` for the four states."""
        return {q: {s: s_.count(s) for s in STATES} for q, s_ in self.queues.items()}

    def total(self, state: str) -> int:
        """The count for ``state`` summed over every queue."""
        return sum(q.count(state) for q in self.queues.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for a health route)."""
        return {
            "queues": {
                name: {
                    "queued": q.queued,
                    "due": q.due,
                    "delayed": q.delayed,
                    "running": q.running,
                    "done": q.done,
                    "failed": q.failed,
                    "oldest_due_age": q.oldest_due_age,
                }
                for name, q in self.queues.items()
            },
            "oldest_due_age": self.oldest_due_age,
            "unrunnable": [
                {"queue": u.queue, "type": u.type, "count": u.count, "error": u.error}
                for u in self.unrunnable
            ],
        }


# -- checks made at enqueue ----------------------------------------------------------------


def check_name(what: str, value: object) -> str:
    """A queue name, task type or job id: a non-empty string of at most ``MAX_NAME`` chars."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise InvalidTask(f"{what} must be a non-empty string of at most {MAX_NAME} characters")
    if "\x00" in value:
        raise InvalidTask(f"{what} must not contain NUL characters")
    return value


def encode_json(data: object, what: str = "data") -> str:
    """``data`` as JSON text, or ``InvalidTask`` saying where it is not JSON.

    JSON here is: dict with str keys, list, str, int, finite float, bool, None. A tuple, a
    set, bytes, a datetime or a NaN is refused rather than silently changed.
    """
    _check_json(data, what, 0)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _check_json(value: object, where: str, depth: int) -> None:
    if depth > 100:
        raise InvalidTask(f"{where} is nested more than 100 levels deep")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if type(value) is not int:
            raise InvalidTask(f"{where} is a {type(value).__name__}, not JSON; use int()")
        return
    if isinstance(value, float):
        if type(value) is not float or not math.isfinite(value):
            raise InvalidTask(f"{where} is {value!r}: JSON has no NaN or infinity")
        return
    if type(value) is list:
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidTask(f"{where} has the key {key!r}: JSON object keys are strings")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    hint = "; use a list" if isinstance(value, tuple) else ""
    raise InvalidTask(f"{where} is a {type(value).__name__}, which is not JSON{hint}")


def is_json(value: object) -> bool:
    try:
        _check_json(value, "result", 0)
    except InvalidTask:
        return False
    return True


def priority_number(value: object) -> int:
    """``"high"``/``Priority.HIGH`` -> 0, ``"normal"`` -> 1, ``"low"`` -> 2."""
    if isinstance(value, Priority):
        return int(value)
    if isinstance(value, str) and value.lower() in _PRIORITIES:
        return int(_PRIORITIES[value.lower()])
    raise InvalidTask(f"priority must be 'high', 'normal' or 'low', not {value!r}")


def priority_name(number: int) -> str:
    return Priority(number).name.lower()


def seconds(what: str, value: object, *, allow_zero: bool = True) -> float:
    """A finite number of seconds (or a ``timedelta``), >= 0 (> 0 unless ``allow_zero``)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTask(f"{what} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise InvalidTask(
            f"{what} must be a finite number of seconds {'>=' if allow_zero else '>'} 0"
        )
    return number


def backoff_list(value: object) -> list[float]:
    """``backoff``: a number of seconds, or a non-empty list (the last value repeats)."""
    if isinstance(value, int | float | timedelta) and not isinstance(value, bool):
        return [seconds("backoff", value)]
    if isinstance(value, list | tuple) and value:
        return [seconds(f"backoff[{i}]", item) for i, item in enumerate(value)]
    raise InvalidTask(f"backoff must be a number of seconds or a non-empty list, not {value!r}")


def backoff_delay(backoff: Sequence[float], attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next."""
    return backoff[min(attempt, len(backoff)) - 1] if backoff else 0.0


def retry_on_names(value: Iterable[str | type[BaseException]] | None) -> list[str] | None:
    """``retry_on`` as stored: error codes, ``TASK_ERROR`` and exception class names."""
    if value is None:
        return None
    if isinstance(value, str | type):
        value = [value]
    names: list[str] = []
    for item in value:
        if isinstance(item, str) and item:
            names.append(item)
        elif isinstance(item, type) and issubclass(item, BaseException):
            names.append(class_name(item))
        else:
            raise InvalidTask(
                f"retry_on takes error codes ('TIMEOUT', 'WORKER_CRASHED', 'TASK_ERROR') and "
                f"exception classes, not {item!r}"
            )
    return names


def error_code(exc: BaseException) -> str | None:
    return exc.code if isinstance(exc, OffloadError) else None


def should_retry(exc: BaseException, retry_on: Sequence[str] | None) -> bool:
    """Whether ``exc`` is one of the errors ``retry_on`` names (``None``: the default): the
    same rule as ``offload.Retry(on=...)``."""
    return retries_on(frozenset(DEFAULT_RETRY_ON if retry_on is None else retry_on), exc)


def error_type_name(exc: BaseException) -> str:
    if isinstance(exc, TaskFailed) and exc.exc_type:
        return exc.exc_type
    return class_name(type(exc))


def to_datetime(epoch: float | None) -> datetime | None:
    return _when(epoch)
