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

from ._context import NoCurrentManager, current_manager, use_manager
from ._manager import WorkerManager
from ._stats import Stats, TaskRecord
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


def __getattr__(name: str) -> Any:
    # The built-in tasks load on first use (they register their types then): `import offload`
    # stays cheap for code that never touches them.
    if name in ("builtins", "tasks"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
