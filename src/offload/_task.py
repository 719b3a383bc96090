"""Tasks as users write them: ``Task``, ``Priority``, and the registry of named task types."""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from .errors import InvalidInput, InvalidTask, UnknownTask

__all__ = ("Priority", "PriorityLike", "RegisteredTask", "Retry", "Task", "registered", "task")

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


def coerce_timeout(value: object) -> float | None:
    """A timeout in seconds: ``None`` (no deadline) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTask(
            f"timeout must be a number of seconds or None, not {type(value).__name__}"
        )
    if math.isnan(value) or value <= 0:
        raise InvalidTask(f"timeout must be > 0 seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Retry:
    """Run a task again when it ends with one of the ``on`` codes, up to ``attempts`` more times.

    >>> Retry(attempts=2).delay(1) <= 0.2
    True

    Waits ``backoff * 2**(attempt - 1)`` seconds (at most ``max_backoff``), times a random
    factor in [0.5, 1.5) when ``jitter`` is on. Retries stay inside the task's deadline. By
    default only ``WORKER_CRASHED`` is retried: an exception raised by the task itself would
    most likely be raised again.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: bool = True
    on: frozenset[str] = frozenset({"WORKER_CRASHED"})

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidTask(f"Retry.attempts must be an int, not {self.attempts!r}")
        if self.attempts < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise InvalidTask("Retry attempts and delays must be >= 0")
        object.__setattr__(self, "on", frozenset(self.on))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random()) if self.jitter else base


def coerce_retry(value: object) -> Retry | None:
    """``None``, a ``Retry``, or a number of attempts (``0`` means none)."""
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Retry(attempts=value) if value else None
    raise InvalidTask(f"retry must be a Retry, a number of attempts or None, not {value!r}")


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
    #: Retry policy (or a number of attempts); ``None`` takes the manager's default.
    retry: Retry | int | None = None

    def __post_init__(self) -> None:
        fn: object = self.fn  # typed callers cannot get this wrong; untyped ones can
        if not callable(fn):
            raise InvalidTask(f"Task.fn must be callable, not {type(fn).__name__}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "priority", coerce_priority(self.priority))
        object.__setattr__(self, "timeout", coerce_timeout(self.timeout))
        object.__setattr__(self, "retry", coerce_retry(self.retry))

    def __repr__(self) -> str:
        # Never show argument values: they may hold secrets.
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return (
            f"Task({name}, args=<{len(self.args)}>, priority={self.priority!s}, "
            f"timeout={self.timeout!r}, id={self.id!r})"
        )


@dataclass(frozen=True, slots=True)
class RegisteredTask:
    """A named task type: what ``{"type": name, "data": ...}`` runs, and where it may run."""

    name: str
    fn: Callable[[Any], Any]
    kinds: frozenset[str]
    why_not: str = ""  # why some kinds are excluded, shown in the routing error
    #: Narrows ``kinds`` for one task's ``data`` (e.g. one scheme needs a process).
    kinds_for: Callable[[Any], tuple[str, ...] | None] | None = None
    #: Runs in the caller's process: turns ``data`` into the call the worker makes instead of
    #: ``fn(data)`` (e.g. a name looked up in a registry here, sent by reference).
    prepare: Callable[[Any], tuple[Callable[..., Any], tuple[Any, ...]]] | None = None

    def kinds_of(self, data: Any) -> frozenset[str]:
        """The worker kinds that can run this type with this ``data``."""
        narrowed = self.kinds_for(data) if self.kinds_for is not None else None
        return self.kinds if narrowed is None else self.kinds & frozenset(narrowed)


_registry: dict[str, RegisteredTask] = {}

F = TypeVar("F", bound=Callable[[Any], Any])


def task(
    name: str,
    *,
    kinds: tuple[KindName, ...] | None = None,
    why_not: str = "",
    kinds_for: Callable[[Any], tuple[str, ...] | None] | None = None,
) -> Callable[[F], F]:
    """Register ``fn`` as the task type ``name``; it receives the dict task's ``data``.

    >>> import offload
    >>> @offload.task("demo:double")
    ... def double(data):
    ...     return data * 2

    Then ``await wm.execute_task({"type": "demo:double", "data": 21})`` returns ``42``.
    The registry is an allow-list: only registered names run, never a dotted path from
    request data. ``kinds`` limits the worker kinds the type can run on (for example
    ``("process",)`` when it imports a module that refuses to load in a subinterpreter);
    ``kinds_for(data)`` may narrow them per task (return ``None`` to keep ``kinds``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a task type name must be a non-empty string")
    allowed = frozenset(kinds) if kinds is not None else ALL_KINDS
    if not allowed <= ALL_KINDS:
        raise ValueError(f"unknown worker kinds {sorted(allowed - ALL_KINDS)}")

    def register(fn: F) -> F:
        qualname = getattr(fn, "__qualname__", "")
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(
                f"task {name!r}: {qualname} cannot be pickled by reference; "
                "register a module-level function"
            )
        existing = _registry.get(name)
        if existing is not None and existing.fn is not fn and _ident(existing.fn) != _ident(fn):
            raise ValueError(f"task type {name!r} is already registered to {_ident(existing.fn)}")
        _registry[name] = RegisteredTask(name, fn, allowed, why_not, kinds_for)
        return fn

    return register


def _ident(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def prepare_in_caller(
    name: str, prepare: Callable[[Any], tuple[Callable[..., Any], tuple[Any, ...]]]
) -> None:
    """Give the registered type ``name`` a ``prepare`` step (see ``RegisteredTask``)."""
    entry = _registry[name]
    _registry[name] = dataclasses.replace(entry, prepare=prepare)


def registered(name: str) -> RegisteredTask:
    """The registered type ``name``, or ``UnknownTask``."""
    if name not in _registry and not _builtins_loaded():
        import offload.tasks  # noqa: F401  (registers the built-in types)
    try:
        return _registry[name]
    except KeyError:
        raise UnknownTask(
            f"no task type {name!r} is registered; register one with @offload.task({name!r})"
        ) from None


def registered_names() -> list[str]:
    """Every registered type name, sorted (the built-in ones included)."""
    if not _builtins_loaded():
        import offload.tasks  # noqa: F401
    return sorted(_registry)


def _builtins_loaded() -> bool:
    import sys

    return "offload.tasks" in sys.modules


_DICT_KEYS: Final = frozenset({"id", "type", "data", "priority", "timeout", "retries"})


def task_from_dict(spec: Mapping[str, Any]) -> tuple[Task, RegisteredTask]:
    """Turn ``{"id", "type", "data", "priority", "timeout"}`` into a ``Task``."""
    raw_id = spec.get("id")
    task_id = None if raw_id is None else str(raw_id)
    extra = set(spec) - _DICT_KEYS
    if extra:
        raise InvalidTask(
            f"unknown keys {sorted(extra)}; a dict task takes {sorted(_DICT_KEYS)}",
            task_id=task_id,
        )
    name = spec.get("type")
    if not isinstance(name, str) or not name:
        raise InvalidTask("a dict task needs a 'type' naming a registered task", task_id=task_id)
    try:
        entry = registered(name)
        data = spec.get("data")
        fn, args = entry.prepare(data) if entry.prepare is not None else (entry.fn, (data,))
        return (
            Task(
                fn,
                args=args,
                priority=spec.get("priority", Priority.NORMAL),
                timeout=spec.get("timeout"),
                id=task_id,
                retry=spec.get("retries"),
            ),
            entry,
        )
    except (InvalidTask, UnknownTask, InvalidInput) as exc:
        exc.task_id = task_id
        raise
