"""The one registry of names a request may use: task types and JSON transformers.

``@offload.task("name")`` registers a module-level function; ``{"type": "name", "data": ...}``
runs it. Nothing else runs from a dict task: never a dotted path taken from request data.
``offload.tasks.json_transformer("name")`` registers a transformer the ``json:transform`` type
may name, in the same registry (``REGISTRY.transformers``). The built-in types register
themselves when ``offload.tasks`` is imported; ``offload``'s package sets ``load_builtins`` so
that a miss imports them first (the core never imports the built-ins).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._task import ALL_KINDS, KindName, Priority, Task, coerce_retry
from .errors import InvalidInput, InvalidTask, UnknownTask

__all__ = (
    "REGISTRY",
    "RegisteredTask",
    "Registry",
    "load_builtins",
    "prepare_in_caller",
    "registered",
    "registered_names",
    "task",
    "task_from_dict",
)

#: Imports the built-in task types (set by ``offload/__init__``); called on a registry miss.
load_builtins: Callable[[], None] | None = None
_builtins_loaded = False


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
    #: Run on the caller's thread when its recent run time is below this (seconds).
    inline_below: float | None = None

    def kinds_of(self, data: Any) -> frozenset[str]:
        """The worker kinds that can run this type with this ``data``."""
        narrowed = self.kinds_for(data) if self.kinds_for is not None else None
        return self.kinds if narrowed is None else self.kinds & frozenset(narrowed)


class Registry:
    """Named things a request may refer to, each table an allow-list.

    ``types``: task types (``RegisteredTask``); ``transformers``: JSON transformers
    (functions of a parsed document). A name is bound once: binding it to another function
    is a ``ValueError`` (binding the same function again is fine, as a reloaded module does).
    """

    def __init__(self) -> None:
        self.types: dict[str, RegisteredTask] = {}
        self.transformers: dict[str, Callable[[Any], Any]] = {}

    def add_transformer(self, name: str, fn: Callable[[Any], Any]) -> None:
        existing = self.transformers.get(name)
        if existing is not None and existing is not fn and _ident(existing) != _ident(fn):
            raise ValueError(
                f"json transformer {name!r} is already registered to {_ident(existing)}"
            )
        self.transformers[name] = fn


REGISTRY: Final = Registry()
_registry = REGISTRY.types

F = TypeVar("F", bound=Callable[[Any], Any])


def task(
    name: str,
    *,
    kinds: tuple[KindName, ...] | None = None,
    why_not: str = "",
    kinds_for: Callable[[Any], tuple[str, ...] | None] | None = None,
    inline_below: float | None = None,
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
    ``inline_below`` (seconds): run a task of this type on the caller's thread when its recent
    run time is below this and below the round trip's cost to the event loop (see
    ``WorkerManager``'s ``inline_below``: no kill on timeout, no crash isolation).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a task type name must be a non-empty string")
    allowed = frozenset(kinds) if kinds is not None else ALL_KINDS
    if not allowed <= ALL_KINDS:
        raise ValueError(f"unknown worker kinds {sorted(allowed - ALL_KINDS)}")
    if inline_below is not None and (
        isinstance(inline_below, bool)
        or not isinstance(inline_below, int | float)
        or not 0 <= inline_below < float("inf")
    ):
        raise ValueError(f"inline_below must be a number of seconds >= 0, not {inline_below!r}")

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
        _registry[name] = RegisteredTask(
            name, fn, allowed, why_not, kinds_for, inline_below=inline_below
        )
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


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded and load_builtins is not None:
        _builtins_loaded = True
        load_builtins()


def registered(name: str) -> RegisteredTask:
    """The registered type ``name``, or ``UnknownTask``."""
    if name not in _registry:
        _ensure_builtins()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownTask(
            f"no task type {name!r} is registered; register one with @offload.task({name!r})"
        ) from None


def registered_names() -> list[str]:
    """Every registered type name, sorted (the built-in ones included)."""
    _ensure_builtins()
    return sorted(_registry)


_DICT_KEYS: Final = frozenset({"id", "type", "data", "priority", "timeout", "retries", "max_wait"})


def task_from_dict(spec: Mapping[str, Any]) -> tuple[Task, RegisteredTask]:
    """Turn ``{"id", "type", "data", "priority", "timeout", "retries", "max_wait"}`` into a
    ``Task`` (``INVALID_TASK`` for anything else, ``UNKNOWN_TASK`` for an unknown type)."""
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
                retry=coerce_retry(spec.get("retries"), "retries"),
                max_wait=spec.get("max_wait"),
            ),
            entry,
        )
    except (InvalidTask, UnknownTask, InvalidInput) as exc:
        exc.task_id = task_id
        raise
