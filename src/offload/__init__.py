"""offload: await CPU-heavy work on process or subinterpreter workers from asyncio code.

>>> import offload
>>> async def main():  # doctest: +SKIP
...     async with offload.WorkerManager(workers=2, max_queue=100) as wm:
...         return await wm.run(pow, 2, 100, priority="high", timeout=5.0)

Layers, each importing only those below it::

    WorkerManager (_manager)   validation, admission, deadlines, outcomes, stats, lifecycle
    Pool (_pool)               one kind's workers and the priority queue in front of them
    workers/                   process and interpreter workers behind one small protocol
    _connection / _worker      the pipe transport, parent side and worker side
"""

from typing import TYPE_CHECKING, Any

from ._task import Priority, Retry, Task, task
from .errors import (
    DecryptFailed,
    InvalidInput,
    InvalidTask,
    ManagerClosed,
    NotSerializable,
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
)

__all__ = (
    "builtins",
    "tasks",
    "DecryptFailed",
    "InvalidInput",
    "InvalidTask",
    "ManagerClosed",
    "NoCurrentManager",
    "NotSerializable",
    "OffloadError",
    "OutputTooLarge",
    "PayloadTooLarge",
    "PoisonTask",
    "Priority",
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
    "WorkerManager",
    "WorkerStartFailed",
    "current_manager",
    "task",
    "use_manager",
)

if TYPE_CHECKING:
    from . import builtins, tasks
    from ._context import NoCurrentManager, current_manager, use_manager
    from ._manager import WorkerManager
    from ._stats import Stats, TaskRecord

# Loaded on first use: `import offload` stays cheap (a worker importing a module that only
# registers tasks with @offload.task never pays for the manager and asyncio).
_LAZY = {
    "WorkerManager": "._manager",
    "Stats": "._stats",
    "TaskRecord": "._stats",
    "NoCurrentManager": "._context",
    "current_manager": "._context",
    "use_manager": "._context",
    "builtins": ".builtins",
    "tasks": ".tasks",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name, __name__)
    value = module if module_name == f".{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
