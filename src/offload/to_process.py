"""``anyio.to_process.run_sync`` on offload's process workers: change one import.

>>> from offload import to_process  # was: from anyio import to_process
>>> async def main():  # doctest: +SKIP
...     digest = await to_process.run_sync(crunch, data)

Same signature and the same semantics as anyio's function (anyio 4.x):

* ``run_sync(func, *args, cancellable=False, limiter=None)`` calls ``func(*args)`` in a worker
  process and returns its result. ``func`` and the arguments are pickled (module-level
  functions, picklable values). An exception ``func`` raises comes back as itself (same type,
  ``except ValueError`` works), with the worker's traceback chained as its ``__cause__``.
* Each call holds one token of ``limiter`` (default: ``current_default_process_limiter()``,
  one token per CPU, one limiter per event loop) while it runs: the limiter bounds how many
  calls run at once, and a call waits for a token first (that wait can be cancelled).
* ``cancellable=False`` (the default): once it runs, a cancellation of the caller waits for the
  call to finish (the call is shielded, as in anyio); the cancellation is delivered afterwards.
  ``cancellable=True``: a cancellation (any cancel scope, ``move_on_after``, a task group's
  cancel) stops the call at once: the worker process is killed (its process group too) and
  replaced.
* If the worker process dies while running the call (``os._exit``, a signal, the OOM killer),
  the call raises :class:`BrokenWorkerProcess`, which is both anyio's
  ``anyio.BrokenWorkerProcess`` (code written for anyio catches it) and offload's
  ``offload.WorkerCrashed`` (code ``WORKER_CRASHED``). Only that call fails; the pool goes on.
* One pool per event loop, started on the first call and shut down when the loop ends: as many
  workers as the limiter has tokens (the larger of the call's limiter and the default one, at
  most 64), all started on the first call; unlike anyio's, idle workers are kept.

What is offload's own (and why switch): a warm call costs a fraction of anyio's round trip
(workers are driven through one dispatcher, answers parsed in the loop's reader callback, big
``bytes``/``memoryview`` arguments and results through shared memory), a worker that does not
answer a start handshake fails the call instead of hanging, and a worker cannot outlive the
process that started it. Works on asyncio (uvloop too) and trio.

Differences that remain: pickling errors are ``offload.NotSerializable`` (anyio raises pickle's
own error); arguments or results over 256 MiB pickled are ``offload.PayloadTooLarge``; a
``SystemExit`` or ``KeyboardInterrupt`` raised by ``func`` comes back as ``offload.TaskFailed``
(``WORKER_ERROR``, naming it) rather than being raised in the caller, and the worker goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio
from anyio.lowlevel import RunVar, checkpoint_if_cancelled

from ._default_pool import default_limiter, pool_for, size_for
from .errors import WorkerCrashed

__all__ = ("BrokenWorkerProcess", "current_default_process_limiter", "run_sync")

T_Retval = TypeVar("T_Retval")
PosArgsT = TypeVarTuple("PosArgsT")

_default_process_limiter: RunVar[anyio.CapacityLimiter] = RunVar("offload_default_process_limiter")


class BrokenWorkerProcess(WorkerCrashed, anyio.BrokenWorkerProcess):
    """The worker process running the call died (``os._exit``, a signal, the OOM killer).

    Both ``offload.WorkerCrashed`` (``code == "WORKER_CRASHED"``) and
    ``anyio.BrokenWorkerProcess``; offload's own error is its ``__cause__``.
    """


async def run_sync(
    func: Callable[[*PosArgsT], T_Retval],
    *args: *PosArgsT,
    cancellable: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
) -> T_Retval:
    """Call ``func(*args)`` in a worker process and return its result.

    >>> await offload.to_process.run_sync(math.factorial, 5000)  # doctest: +SKIP

    Args:
        func: a picklable callable (a module-level function).
        args: its positional arguments (picklable).
        cancellable: ``True`` to let a cancellation stop the call while it runs (the worker
            is killed); ``False`` (default): a cancellation waits for the call to finish.
        limiter: the ``CapacityLimiter`` whose token the call holds while it runs (default:
            ``current_default_process_limiter()``).

    Returns what ``func`` returned. Raises what ``func`` raised (the worker's traceback as its
    ``__cause__``); :class:`BrokenWorkerProcess` (``WORKER_CRASHED``) if the worker died;
    ``offload.NotSerializable`` / ``offload.PayloadTooLarge`` for arguments or a result that
    cannot be sent; ``offload.WorkerStartFailed`` if no worker could start.
    """
    await checkpoint_if_cancelled()
    default = current_default_process_limiter()
    if limiter is None:
        limiter = default
    pool = pool_for("process")
    async with limiter:
        wm = await pool.get(size_for(limiter, default))
        try:
            if cancellable:
                return await wm.run(func, *args)
            with anyio.CancelScope(shield=True):  # a cancellation waits for the call
                result = await wm.run(func, *args)
            return result  # noqa: RET504 (mypy: a CancelScope may swallow exceptions)
        except WorkerCrashed as exc:
            if isinstance(exc, BrokenWorkerProcess):
                raise
            raise BrokenWorkerProcess(exc.message, task_id=exc.task_id) from exc


def current_default_process_limiter() -> anyio.CapacityLimiter:
    """The ``CapacityLimiter`` that bounds ``run_sync`` calls given no ``limiter``.

    One per event loop, with one token per CPU (``os.cpu_count()``); change its
    ``total_tokens`` to allow more or fewer calls at once. It is offload's own (anyio's
    ``anyio.to_process.current_default_process_limiter()`` bounds anyio's pool).
    """
    return default_limiter(_default_process_limiter)
