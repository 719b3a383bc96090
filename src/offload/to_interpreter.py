"""``anyio.to_interpreter.run_sync`` on offload's interpreter workers: change one import.

>>> from offload import to_interpreter  # was: from anyio import to_interpreter
>>> async def main():  # doctest: +SKIP
...     digest = await to_interpreter.run_sync(crunch, data)

Python 3.13+ (subinterpreters with their own GIL). Same signature and semantics as anyio's
function (anyio 4.x), with one deliberate difference, below:

* ``run_sync(func, *args, limiter=None)`` calls ``func(*args)`` in a subinterpreter of this
  process and returns its result. ``func`` and the arguments are pickled (module-level
  functions, picklable values; a module that refuses to load in subinterpreters, such as
  ``cryptography`` or ``zstandard`` on 3.13, raises ``offload.UnsupportedKind``). An exception
  ``func`` raises comes back as itself, with the interpreter's traceback as its ``__cause__``.
* Each call holds one token of ``limiter`` (default: ``current_default_interpreter_limiter()``,
  one token per CPU, one limiter per event loop) while it runs.
* If the interpreter breaks under the call, it raises :class:`BrokenWorkerInterpreter`, which is
  both anyio's interpreter error (``anyio.BrokenWorkerInterpreter``) and
  ``offload.WorkerCrashed`` (code ``WORKER_CRASHED``).
* One pool per event loop, started on the first call and shut down when the loop ends: as many
  interpreters as the limiter has tokens (the larger of the call's limiter and the default one,
  at most 64), created on their own threads (never on the event loop's, as anyio does) when the
  first call comes; unlike anyio's, idle ones are kept.

**The difference: a cancelled call is interrupted.** anyio cannot stop a call once it runs in
a subinterpreter (a cancellation waits for it to finish). Here a cancellation of the caller (any
cancel scope: ``move_on_after``, ``fail_after``, a task group's cancel) stops the call: pure
Python code in the interpreter gets an exception at its next bytecode and the call ends there,
and the interpreter is reused. Code blocked in C (``time.sleep``, a long C call) cannot be
interrupted: after a short grace its interpreter is set aside until the C call returns, and a
fresh one takes its slot; the caller is not kept waiting either way. Code that must run to
completion once started should shield the call (``with anyio.CancelScope(shield=True):``).

Works on asyncio (uvloop too) and trio.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Final, TypeVar, TypeVarTuple

import anyio
from anyio.lowlevel import RunVar, checkpoint_if_cancelled

from ._default_pool import default_limiter, pool_for, size_for
from .errors import WorkerCrashed

__all__ = ("BrokenWorkerInterpreter", "current_default_interpreter_limiter", "run_sync")

T_Retval = TypeVar("T_Retval")
PosArgsT = TypeVarTuple("PosArgsT")

_default_interpreter_limiter: RunVar[anyio.CapacityLimiter] = RunVar(
    "offload_default_interpreter_limiter"
)


def _anyio_interpreter_error() -> type[Exception]:
    """anyio's error for a broken subinterpreter: ``BrokenWorkerInterpreter`` (anyio 4.9+),
    spelt ``BrokenWorkerIntepreter`` in anyio 4.8; older anyio has none (then ``Exception``)."""
    cls = getattr(anyio, "BrokenWorkerInterpreter", None)
    if cls is None:
        with warnings.catch_warnings():  # newer anyio warns about the old spelling
            warnings.simplefilter("ignore", DeprecationWarning)
            cls = getattr(anyio, "BrokenWorkerIntepreter", None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return Exception


_AnyioBrokenWorkerInterpreter: Final = _anyio_interpreter_error()


class BrokenWorkerInterpreter(WorkerCrashed, _AnyioBrokenWorkerInterpreter):  # type: ignore[misc,valid-type]
    """The interpreter running the call broke under it (its link to this thread was lost).

    Both ``offload.WorkerCrashed`` (``code == "WORKER_CRASHED"``) and anyio's
    ``BrokenWorkerInterpreter``; offload's own error is its ``__cause__``. Unlike anyio's, it
    carries no ``excinfo`` of the interpreter (``excinfo`` is ``None``).
    """

    def __init__(self, message: str = "", *, task_id: str | None = None) -> None:
        # anyio's __init__ wants the interpreter's excinfo: offload's error has a message.
        Exception.__init__(self, message)
        self.message = message
        self.task_id = task_id
        self.excinfo: Any = None

    def __str__(self) -> str:
        return self.message


async def run_sync(
    func: Callable[[*PosArgsT], T_Retval],
    *args: *PosArgsT,
    limiter: anyio.CapacityLimiter | None = None,
) -> T_Retval:
    """Call ``func(*args)`` in a subinterpreter and return its result (Python 3.13+).

    >>> await offload.to_interpreter.run_sync(math.factorial, 5000)  # doctest: +SKIP

    Args:
        func: a picklable callable (a module-level function).
        args: its positional arguments (picklable).
        limiter: the ``CapacityLimiter`` whose token the call holds while it runs (default:
            ``current_default_interpreter_limiter()``).

    Returns what ``func`` returned. Raises what ``func`` raised (the interpreter's traceback as
    its ``__cause__``); :class:`BrokenWorkerInterpreter` (``WORKER_CRASHED``) if the
    interpreter broke; ``offload.UnsupportedKind`` before Python 3.13 or for a module that
    cannot load in a subinterpreter; ``offload.NotSerializable`` for what cannot be pickled.
    A cancellation interrupts the call (see the module's docstring): unlike anyio's.
    """
    await checkpoint_if_cancelled()
    default = current_default_interpreter_limiter()
    if limiter is None:
        limiter = default
    pool = pool_for("interpreter")
    async with limiter:
        wm = await pool.get(size_for(limiter, default))
        try:
            return await wm.run(func, *args)
        except WorkerCrashed as exc:
            if isinstance(exc, BrokenWorkerInterpreter):
                raise
            raise BrokenWorkerInterpreter(exc.message, task_id=exc.task_id) from exc


def current_default_interpreter_limiter() -> anyio.CapacityLimiter:
    """The ``CapacityLimiter`` that bounds ``run_sync`` calls given no ``limiter``.

    One per event loop, with one token per CPU (``os.cpu_count()``); change its
    ``total_tokens`` to allow more or fewer calls at once.
    """
    return default_limiter(_default_interpreter_limiter)
