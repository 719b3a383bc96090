"""The pools behind ``offload.to_process`` and ``offload.to_interpreter``: one per event loop
and worker kind, as anyio keeps one per loop behind its own ``to_process`` / ``to_interpreter``.

A pool is a ``WorkerManager`` started on the first call in a loop with as many workers as
that call's limiter has tokens (they start together, in parallel), and shut down when the loop
ends (a background task of the loop does it, as anyio's pool does). It grows while calls wait
(a later call under a bigger limiter), up to ``MAX_POOL``; workers beyond the first ones retire
after ``IDLE_TIMEOUT`` idle seconds, as anyio's do.

How many calls run at once is the callers' limiter's business (a ``CapacityLimiter`` token per
call, as in anyio), not the pool's: the pool is sized to the limiter so that a call holding a
token finds a worker.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Final

import anyio
from anyio.lowlevel import RunVar

from ._manager import WorkerManager
from ._runtime import current_runtime

__all__ = ("DefaultPool", "default_limiter", "pool_for")

log = logging.getLogger("offload")

#: Seconds an extra worker may sit idle before it retires (anyio's ``WORKER_MAX_IDLE_TIME``).
IDLE_TIMEOUT: Final = 300.0
#: How long a shutdown at the loop's end may take (seconds).
_LOOP_END_WAIT: Final = 5.0
#: The largest pool: a limiter with more tokens lets more calls in, and those beyond this many
#: wait in the pool's queue (a limiter of ``math.inf`` tokens gets this many workers).
MAX_POOL: Final = 64


class DefaultPool:
    """One loop's pool of one kind: a ``WorkerManager`` started on first use."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.manager: WorkerManager | None = None
        self._lock = anyio.Lock()
        self._loop_ended: anyio.Event | None = None

    async def get(self, size: int) -> WorkerManager:
        """The running manager, started now (with at most ``size`` workers) if need be.

        A start that fails (or is cancelled) leaves nothing behind; the next call tries again.
        """
        wm = self.manager
        if wm is not None and not wm.closed:
            return wm
        async with self._lock:
            wm = self.manager
            if wm is None or wm.closed:
                # It starts at the limiter's size, not at zero: a scaling pool adds a worker
                # when a ticket is offered while all are busy, so one that scaled from zero
                # would run the first calls one by one while its workers start.
                wm = WorkerManager(
                    min_workers=min(max(1, size), MAX_POOL),
                    max_workers=MAX_POOL,
                    idle_timeout=IDLE_TIMEOUT,
                    kind=self.kind,
                    max_queue=1 << 30,  # the limiters bound what waits, not the pool
                    spare_workers=0,
                    poison_after=None,  # anyio runs whatever it is asked to run
                    shutdown_grace=0,
                )
                await wm.start()
                self.manager = wm
                current_runtime().spawn_system_task(
                    lambda: self._shut_down_at_loop_end(wm), name=f"offload-{self.kind}-pool"
                )
        return wm

    async def _shut_down_at_loop_end(self, wm: WorkerManager) -> None:
        """Waits in the background; when the loop ends (its runner cancels what is left),
        stops the pool there (never raises: it is a system task).

        asyncio: a shutdown (``grace=0``), which hears each worker exit. trio cancels every
        system task at once when the run ends, offload's fd watchers included, so a shutdown
        could not hear the workers exit: the manager's own service kills and reaps its process
        workers then, by itself.
        """
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if current_runtime().name != "trio" and not wm.closed:
                with anyio.move_on_after(_LOOP_END_WAIT, shield=True):
                    try:
                        await wm.shutdown(grace=0)
                    except Exception:
                        log.exception("offload: shutting down the %s pool failed", self.kind)
            raise


_pools: RunVar[dict[str, DefaultPool]] = RunVar("offload_default_pools")


def pool_for(kind: str) -> DefaultPool:
    """This loop's pool of ``kind`` (made, not started, on first use)."""
    try:
        pools = _pools.get()
    except LookupError:
        pools = {}
        _pools.set(pools)
    pool = pools.get(kind)
    if pool is None:
        pool = pools[kind] = DefaultPool(kind)
    return pool


def default_limiter(var: RunVar[anyio.CapacityLimiter]) -> anyio.CapacityLimiter:
    """The limiter in ``var`` for this loop, made with one token per CPU on first use."""
    try:
        return var.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
        var.set(limiter)
        return limiter


def size_for(limiter: anyio.CapacityLimiter, default: anyio.CapacityLimiter) -> int:
    """How many workers a pool started for a call under ``limiter`` may have."""
    tokens = max(limiter.total_tokens, default.total_tokens)
    return MAX_POOL if math.isinf(tokens) else max(1, min(MAX_POOL, int(tokens)))
