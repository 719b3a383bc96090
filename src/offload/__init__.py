"""offload: await CPU-heavy work on process or subinterpreter workers, from asyncio or trio.

>>> import offload
>>> async def main():  # doctest: +SKIP
...     async with offload.WorkerManager(workers=2, max_queue=100) as wm:
...         return await wm.run(pow, 2, 100, priority="high", timeout=5.0)

Layers, each importing only those below it (checked by import-linter in the lint session)::

    offload (this package)      the public names; nothing else is public
    asgi, pytest_plugin,        integrations, on the public API
      to_process, to_interpreter, metrics, jobs, builtins, dask, demo
    tasks                       the built-in task types (they use the registry, never the core)
    _manager                    WorkerManager: the façade and its lifecycle
    _map, _stream               wm.map and wm.stream
    _dispatch                   jobs, admission, deadlines, the pump, every outcome
    _queue, _estimates, _policy, _outcome, _stats, _config, _registry, _task
    _backend                    the narrow interface to where work runs
    _local                      process and interpreter workers: pool, workers, transport
    _runtime                    the one seam that knows asyncio from trio
    _offload_worker             stdlib-only code that runs inside every worker
    errors                      the error tree
"""

from typing import TYPE_CHECKING, Any

from . import _config, _registry
from ._registry import task
from ._task import Priority, Retry, Task
from .errors import (
    DecryptFailed,
    InvalidInput,
    InvalidTask,
    MainGuardMissing,
    ManagerClosed,
    NoCurrentManager,
    NotSerializable,
    NotStarted,
    OffloadError,
    OutputTooLarge,
    PayloadTooLarge,
    PoisonTask,
    QueueFull,
    TaskFailed,
    TaskTimeout,
    UnknownTask,
    UnsupportedKind,
    WorkerCrashed,
    WorkerStartFailed,
    WouldTimeOut,
)

__all__ = (
    "__version__",
    "builtins",
    "tasks",
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
    "Priority",
    "Progress",
    "QueueFull",
    "Retry",
    "Stats",
    "Task",
    "TaskFailed",
    "TaskRecord",
    "TaskTimeout",
    "UnknownTask",
    "UnsupportedKind",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerManager",
    "WorkerStartFailed",
    "WouldTimeOut",
    "current_manager",
    "report_progress",
    "task",
    "use_manager",
)

if TYPE_CHECKING:
    from . import builtins, tasks
    from ._context import current_manager, use_manager
    from ._manager import WorkerManager
    from ._stats import Progress, Stats, TaskRecord, WorkerInfo

# Loaded on first use: `import offload` stays cheap (a worker importing a module that only
# registers tasks with @offload.task never pays for the manager and the event loop).
_LAZY = {
    "WorkerManager": "._manager",
    "Stats": "._stats",
    "TaskRecord": "._stats",
    "WorkerInfo": "._stats",
    "Progress": "._stats",
    "current_manager": "._context",
    "use_manager": "._context",
    "builtins": ".builtins",
    "tasks": ".tasks",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offload")
    except PackageNotFoundError:  # run from a checkout without being installed
        return "0+unknown"


def report_progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Inside a task: send a progress event to the caller's ``on_progress`` callback.

    >>> def export(rows):  # doctest: +SKIP
    ...     for n, row in enumerate(rows, 1):
    ...         write(row)
    ...         offload.report_progress(n, len(rows), "rows written")

    Cheap: events are sent at most every 20 ms per task (the latest value wins, and the last
    one before the task ends always arrives). Outside a worker's task it does nothing.
    ``done`` and ``total`` are numbers in the task's own units; ``message`` is cut to 1000
    characters. Raises ``TypeError`` for a ``done`` or ``total`` that is not a number.
    """
    from ._offload_worker.serve import report_progress as report

    report(done, total, message)


def _load_builtins() -> None:
    import importlib

    importlib.import_module(".tasks", __name__)


def _dask_kind() -> Any:
    from .dask import DaskKind  # optional: needs the `dask` extra

    return DaskKind()


_registry.load_builtins = _load_builtins
_config.NAMED_KINDS["dask"] = _dask_kind


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
        globals()[name] = value
        return value
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name, __name__)
    value = module if module_name == f".{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (``__all__``) and the dunders: what ``dir(offload)`` shows."""
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
