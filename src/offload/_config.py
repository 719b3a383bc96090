"""A manager's options, checked once into a frozen ``Config`` (``asgi.lifespan`` reuses it).

Every option is checked at its edges when the manager (or the lifespan) is created: a bad
value is a ``ValueError`` that names the option and its range, never a surprise later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ._task import Retry, coerce_retry
from .errors import UnsupportedKind

__all__ = ("Config", "default_workers", "make_config", "server_processes")

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024

#: Kinds given by name that are objects of an integration (``"dask"``): the name's factory,
#: set by the ``offload`` package (the core never imports the integrations).
NAMED_KINDS: dict[str, Callable[[], Any]] = {}
KIND_NAMES: Final = ("process", "interpreter", "dask")
SCHEDULING: Final = ("fifo", "fair")


@dataclass(frozen=True, slots=True)
class Config:
    """Every ``WorkerManager`` option, validated (see ``WorkerManager`` for their meaning)."""

    kind: str
    kind_object: Any  # a WorkerKind object, or None for a named local kind
    workers: int  # fixed size, or the starting size when scaling
    min_workers: int
    max_workers: int
    idle_timeout: float | None
    max_queue: int
    max_wait: float | None
    scheduling: str
    inline_below: float | None
    process_workers: int
    max_payload: int
    default_timeout: float | None
    shutdown_grace: float
    start_timeout: float
    interrupt_grace: float
    on_task_done: Callable[[Any], None] | None
    retry: Retry | None
    poison_after: int | None
    spare_workers: int
    max_tasks_per_worker: int | None
    max_worker_memory: int | None
    worker_memory_limit: int | None
    max_worker_age: float | None
    health_interval: float | None
    health_timeout: float
    worker_nice: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> bool:
        """Whether the pool grows and shrinks with load (``min_workers``/``max_workers``)."""
        return self.min_workers != self.max_workers


class _UnknownKind(UnsupportedKind, ValueError):
    """Not a kind at all: a bad option (``ValueError``, as every other) that is also
    ``UNSUPPORTED_KIND``, as it always was."""


def _cpus() -> int:
    counter = getattr(os, "process_cpu_count", None)  # 3.13+: honours CPU affinity
    if counter is not None:
        return int(counter() or 1)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def server_processes() -> int:
    """How many server processes share this machine: ``WEB_CONCURRENCY`` (the convention of
    uvicorn and gunicorn), else 1."""
    raw = os.environ.get("WEB_CONCURRENCY", "").strip()
    try:
        value = int(raw)
    except ValueError:
        return 1
    return max(1, value)


def default_workers(servers: int | None = None) -> int:
    """Cores left after one per server process, shared between the server processes.

    ``max(1, (cpus - servers) // servers)``: with ``WEB_CONCURRENCY=2`` on 8 cores, each of the
    two servers gets 3 workers (2 cores serve the event loops); on 2 cores, 1 each.
    """
    servers = server_processes() if servers is None else servers
    return max(1, (_cpus() - servers) // servers)


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int {_range(low, high)}, not {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_range(low, high)}, not {value!r}")
    return value


def _optional_int(name: str, value: object, low: int) -> int | None:
    return None if value is None else _int(name, value, low)


def _range(low: float, high: float | None) -> str:
    return f">= {low}" if high is None else f"from {low} to {high}"


def _seconds(
    name: str, value: object, *, low: float = 0.0, strict: bool = False, optional: bool = False
) -> float | None:
    """A finite number of seconds ``>= low`` (``> low`` when ``strict``), or ``None``."""
    if value is None and optional:
        return None
    what = f"a number of seconds {'>' if strict else '>='} {low:g}" + (
        " or None" if optional else ""
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be {what}, not {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number) or number < low or (strict and number == low):
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return number


def make_config(
    *,
    workers: int | None,
    kind: Any,
    min_workers: int | None,
    max_workers: int | None,
    idle_timeout: float | None,
    max_queue: int,
    max_wait: float | None,
    scheduling: str,
    inline_below: float | None,
    process_workers: int,
    max_payload: int,
    default_timeout: float | None,
    shutdown_grace: float,
    start_timeout: float,
    interrupt_grace: float,
    on_task_done: Callable[[Any], None] | None,
    retry: Retry | int | None,
    poison_after: int | None,
    spare_workers: int | None,
    max_tasks_per_worker: int | None,
    max_worker_memory: int | None,
    worker_memory_limit: int | None,
    max_worker_age: float | None,
    health_interval: float | None,
    health_timeout: float,
    worker_nice: int,
    server_processes_: int | None,
) -> Config:
    """Check every option and build the frozen ``Config`` (``ValueError`` names the range)."""
    from .errors import InvalidTask

    kind_object: Any = None
    if isinstance(kind, str) and kind in NAMED_KINDS:
        kind = NAMED_KINDS[kind]()  # e.g. "dask": a local Dask cluster (needs its extra)
    if isinstance(kind, str):
        if kind not in KIND_NAMES:
            raise _UnknownKind(
                f"kind must be one of {KIND_NAMES} or a kind object such as "
                f"offload.dask.DaskKind(...), not {kind!r}"
            )
        kind_name = kind
    else:
        name = getattr(kind, "name", None)
        if not isinstance(name, str) or not hasattr(kind, "create_backend"):
            raise _UnknownKind(
                f"kind must be one of {KIND_NAMES} or a kind object such as "
                f"offload.dask.DaskKind(...), not {kind!r}"
            )
        kind_object, kind_name = kind, name
    servers = None if server_processes_ is None else _int("server_processes", server_processes_, 1)
    if workers is not None:
        fixed = _int("workers", workers, 1)
        if min_workers is not None or max_workers is not None:
            raise ValueError(
                "give workers=N (a fixed pool) or min_workers/max_workers (a pool that scales), "
                "not both"
            )
        low = high = start = fixed
    elif min_workers is None and max_workers is None:
        low = high = start = default_workers(servers)
    else:
        high = _int(
            "max_workers", default_workers(servers) if max_workers is None else max_workers, 1
        )
        low = _int("min_workers", 0 if min_workers is None else min_workers, 0)
        if low > high:
            default = (
                " (the default on this machine: give max_workers too)"
                if max_workers is None
                else ""
            )
            raise ValueError(
                f"min_workers ({low}) must not be more than max_workers ({high}{default})"
            )
        start = low
    if idle_timeout is not None and low == high:
        raise ValueError("idle_timeout is for a pool that scales: give min_workers/max_workers")
    idle = _seconds("idle_timeout", idle_timeout, strict=True, optional=True)
    if low != high and idle is None:
        idle = 60.0
    if scheduling not in SCHEDULING:
        raise ValueError(f"scheduling must be one of {SCHEDULING}, not {scheduling!r}")
    if process_workers and kind_name == "process":
        raise ValueError("process_workers is for kind='interpreter'; raise workers instead")
    if spare_workers is None:
        spare_workers = 1 if (servers or server_processes()) == 1 else 0
    try:
        retry_policy = coerce_retry(retry)
    except InvalidTask as exc:
        raise ValueError(str(exc.message)) from None
    return Config(
        kind=kind_name,
        kind_object=kind_object,
        workers=start,
        min_workers=low,
        max_workers=high,
        idle_timeout=idle,
        max_queue=_int("max_queue", max_queue, 0),
        max_wait=_seconds("max_wait", max_wait, strict=True, optional=True),
        scheduling=scheduling,
        inline_below=_seconds("inline_below", inline_below, optional=True),
        process_workers=_int("process_workers", process_workers, 0),
        max_payload=_int("max_payload", max_payload, 1),
        default_timeout=_seconds("default_timeout", default_timeout, strict=True, optional=True),
        shutdown_grace=_seconds("shutdown_grace", shutdown_grace) or 0.0,
        start_timeout=_seconds("start_timeout", start_timeout, strict=True) or 0.0,
        interrupt_grace=_seconds("interrupt_grace", interrupt_grace, strict=True) or 0.0,
        on_task_done=_callable("on_task_done", on_task_done),
        retry=retry_policy,
        poison_after=_optional_int("poison_after", poison_after, 1),
        spare_workers=_int("spare_workers", spare_workers, 0),
        max_tasks_per_worker=_optional_int("max_tasks_per_worker", max_tasks_per_worker, 1),
        max_worker_memory=_optional_int("max_worker_memory", max_worker_memory, 1),
        worker_memory_limit=_optional_int("worker_memory_limit", worker_memory_limit, 1 << 20),
        max_worker_age=_seconds("max_worker_age", max_worker_age, strict=True, optional=True),
        health_interval=_seconds("health_interval", health_interval, strict=True, optional=True),
        health_timeout=_seconds("health_timeout", health_timeout, strict=True) or 0.0,
        worker_nice=_int("worker_nice", worker_nice, 0, 19),
    )


def _callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable or None, not {type(value).__name__}")
    return value


SchedulingName = Literal["fifo", "fair"]
