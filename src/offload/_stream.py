"""``wm.stream``: a generator function on a worker, its items consumed here as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._dispatch import Job, JobState, Submission
from ._task import Priority

if TYPE_CHECKING:
    from ._manager import WorkerManager

__all__ = ("ItemStream", "open_stream")

T = TypeVar("T")


class ItemStream(AsyncIterator[T]):
    """The items of one stream, in order (``async for item in items``)."""

    def __init__(self, manager: WorkerManager, job: Job, buffer: int) -> None:
        self._manager = manager
        self._job = job
        self._buffer = buffer
        self._consumed = 0  # items taken since credit was last given back

    def __aiter__(self) -> ItemStream[T]:
        return self

    async def __anext__(self) -> T:
        channel = self._job.stream
        assert channel is not None
        runtime = self._manager._runtime
        assert runtime is not None
        while not channel.items:
            if channel.done:
                if channel.error is not None:
                    raise channel.error
                raise StopAsyncIteration
            channel.waiter = runtime.waiter()
            await channel.waiter.wait()
        item: T = channel.items.popleft()
        self._consumed += 1
        if self._consumed >= max(1, self._buffer // 2) and not channel.done:
            dispatch = self._manager._dispatch
            assert dispatch is not None
            dispatch.backends[self._job.route].credit(self._job.ticket, self._consumed)
            self._consumed = 0
        return item


@asynccontextmanager
async def open_stream(
    manager: WorkerManager,
    gen_fn: Callable[..., Iterable[Any]],
    args: tuple[Any, ...],
    priority: Priority,
    timeout: float | None,
    buffer: int,
) -> AsyncIterator[ItemStream[Any]]:
    """Start the stream; on leaving, close the generator (stop it after a grace)."""
    dispatch = manager._dispatch
    runtime = manager._runtime
    assert dispatch is not None
    assert runtime is not None
    flow, name = manager._flow(gen_fn)
    payload = await manager._encode(gen_fn, args, None, None)
    if timeout is None:
        timeout = manager.default_timeout
    sub = Submission(
        payload,
        name,
        flow,
        priority,
        timeout,
        manager.config.max_wait,
        None,
        manager.kind,
        stream=buffer,
    )
    job = dispatch.submit(sub)
    try:
        yield ItemStream(manager, job, buffer)
    finally:
        with anyio.CancelScope(shield=True):
            await _close(manager, job)


async def _close(manager: WorkerManager, job: Job) -> None:
    """Close the generator in the worker (its ``finally`` runs); stop it if it does not stop
    within the interrupt grace."""
    dispatch = manager._dispatch
    runtime = manager._runtime
    assert dispatch is not None
    assert runtime is not None
    if job.state is JobState.DONE:
        return
    job.waiter = runtime.waiter()
    if job.state is JobState.QUEUED:
        dispatch.stop(job, "cancelled")
        return
    dispatch.backends[job.route].close_stream(job.ticket)
    with anyio.move_on_after(max(0.5, manager.config.interrupt_grace * 4)):
        await job.waiter.wait()
    if not _done(job):
        job.waiter = runtime.waiter()
        dispatch.stop(job, "cancelled")
        with anyio.move_on_after(5.0):
            await job.waiter.wait()


def _done(job: Job) -> bool:
    """(read after an await: the job may have settled meanwhile)"""
    return job.state is JobState.DONE
