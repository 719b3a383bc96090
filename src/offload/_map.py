"""``wm.map``: a function over an iterable, in chunks, lazily, with a bound on what is in flight.

The iterable is read only as room appears, so a generator of ten million items never
materialises. Items travel in chunks (one call per chunk: ``_offload_worker.batch``); an
adaptive chunk is about ``CHUNK_TARGET`` seconds of the function's measured run time. Leaving
the loop early stops every chunk still queued or running (synchronously: ``break`` frees the
iterator, which stops them).
"""

from __future__ import annotations

import functools
import itertools
import pickle
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio.lowlevel

from ._dispatch import CANCELLED, Job, JobState, Submission
from ._offload_worker import protocol
from ._offload_worker.batch import ItemFailed, run_chunk
from ._outcome import rebuild
from ._task import Priority
from .errors import OffloadError

if TYPE_CHECKING:
    from ._manager import WorkerManager

__all__ = ("map_results",)

R = TypeVar("R")
T = TypeVar("T")

CHUNK_TARGET: Final = 0.001  # seconds of work per adaptive chunk
_FIRST_CHUNK: Final = 8
_MAX_CHUNK: Final = 4096
#: The default in-flight bound per worker (items), raised to four chunks per worker for tiny
#: items, whose chunks are bigger.
_PER_WORKER: Final = 256
#: ``__anext__`` lets the event loop run once per this many + 1 results (a mask).
_CHECKPOINT_EVERY: Final = 255


def map_results(
    manager: WorkerManager,
    fn: Callable[[T], R],
    iterable: Iterable[T] | AsyncIterable[T],
    *,
    ordered: bool,
    chunksize: int | None,
    max_in_flight: int | None,
    priority: Priority,
    timeout: float | None,
    progress: bool,
) -> AsyncIterator[R]:
    if chunksize is not None and (
        isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
    ):
        raise ValueError(f"chunksize must be an int >= 1 or None, not {chunksize!r}")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ValueError(f"max_in_flight must be an int >= 1 or None, not {max_in_flight!r}")
    manager._check_running()
    return _Mapper(
        manager, fn, iterable, ordered, chunksize, max_in_flight, priority, timeout, progress
    )


class _Chunk:
    __slots__ = ("first", "job", "size")

    def __init__(self, first: int, size: int, job: Job) -> None:
        self.first = first  # index of its first item
        self.size = size
        self.job = job


class _Mapper(AsyncIterator[Any]):
    """Chunks go out in submission order; results come back per chunk.

    Ordered: only the oldest chunk's results may be handed out, so finished chunks are taken
    from the front. Unordered: any finished chunk's results. Either way they land in one
    ``_ready`` deque, so handing out an item is a ``popleft``. New chunks go out only when a
    whole chunk fits under the in-flight bound, never one item at a time.
    """

    def __init__(
        self,
        manager: WorkerManager,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        ordered: bool,
        chunksize: int | None,
        max_in_flight: int | None,
        priority: Priority,
        timeout: float | None,
        progress: bool,
    ) -> None:
        self._manager = manager
        self._fn = fn
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(iterable, AsyncIterable):
            self._async = iterable.__aiter__()
        else:
            self._sync = iter(iterable)
        self._ordered = ordered
        self._chunksize = chunksize
        self._workers = max(1, manager.stats().workers or manager.config.max_workers)
        self._max_in_flight = max_in_flight
        self._limit = max_in_flight or _PER_WORKER * self._workers
        self._priority = priority
        self._timeout = timeout
        self._flow, self._name = manager._flow(fn)
        self._chunk_flow = f"offload.map:{self._flow}"
        self._exhausted = False
        self._next_index = 0  # index of the next item read from the iterable
        self._in_flight = 0  # items submitted, results not yet handed out
        self._room_needed = 1  # free room under the bound before the next chunk goes out
        self._chunks: deque[_Chunk] = deque()  # submitted, not yet collected, in order
        self._ready: deque[Any] = deque()  # results to hand out (ItemFailed for an error)
        self._closed = False
        self._handed = 0  # calls of __anext__
        self._bar = _bar() if progress else None

    def __aiter__(self) -> _Mapper:
        return self

    async def __anext__(self) -> Any:
        ready = self._ready
        self._handed += 1
        if (
            ready
            and self._handed & _CHECKPOINT_EVERY
            and self._bar is None
            and not self._closed
            and (self._exhausted or self._limit - self._in_flight < self._room_needed)
        ):  # the common case, kept short: a result is here and no chunk is due to go out
            value = ready.popleft()
            self._in_flight -= 1
            if type(value) is not ItemFailed:
                return value
            self.stop()
            raise _item_error(value, self._manager.kind)
        try:
            if not self._handed & _CHECKPOINT_EVERY:
                # A long run of results that are already here must not hold the event loop.
                await anyio.lowlevel.checkpoint()
            return await self._next()
        except BaseException:
            self.stop()
            raise

    async def _next(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        while True:
            if not self._exhausted and self._limit - self._in_flight >= self._room_needed:
                await self._fill()
            if self._ready or self._collect():
                value = self._ready.popleft()
                self._in_flight -= 1
                if self._bar is not None:
                    self._bar.advance()
                if type(value) is not ItemFailed:
                    return value
                raise _item_error(value, self._manager.kind)
            if not self._chunks:
                if self._exhausted:
                    self.stop()
                    raise StopAsyncIteration
                continue
            await self._wait()

    async def _fill(self) -> None:
        """Read items and submit whole chunks while they fit under the in-flight bound."""
        while not self._exhausted:
            size = self._size()
            room = self._limit - self._in_flight
            if room < size:
                self._room_needed = size
                return
            items = await self._read(size)
            if not items:
                self._exhausted = True
                return
            await self._submit(items)

    def _size(self) -> int:
        """Items in the next chunk: ``chunksize``, or about ``CHUNK_TARGET`` seconds of work;
        never more than the bound allows, and (adaptive) small enough that every worker can
        hold two chunks at once."""
        if self._chunksize is not None:
            return min(self._chunksize, self._limit)
        dispatch = self._manager._dispatch
        assert dispatch is not None
        per_item = dispatch.estimates.get(self._flow)
        if per_item is None:
            per_chunk = dispatch.estimates.get(self._chunk_flow)
            if per_chunk is None:
                return min(_FIRST_CHUNK, self._limit)
            per_item = per_chunk / max(1, self._last_size)
        size = _MAX_CHUNK if per_item <= 0 else int(CHUNK_TARGET / per_item)
        if self._max_in_flight is None:  # tiny items: the default bound makes room for them
            self._limit = max(self._limit, 4 * self._workers * min(size, _MAX_CHUNK))
        return max(1, min(size, _MAX_CHUNK, self._limit // (2 * self._workers) or 1))

    _last_size = _FIRST_CHUNK

    async def _read(self, count: int) -> list[Any]:
        if self._sync is not None:
            return list(itertools.islice(self._sync, count))
        assert self._async is not None
        items: list[Any] = []
        while len(items) < count:
            try:
                items.append(await self._async.__anext__())
            except StopAsyncIteration:
                break
        return items

    async def _submit(self, items: list[Any]) -> None:
        manager = self._manager
        dispatch = manager._dispatch
        assert dispatch is not None
        call = functools.partial(run_chunk, self._fn)
        payload = await manager._encode(call, (items,), None, None)
        timeout = None if self._timeout is None else self._timeout * len(items)
        sub = Submission(
            payload,
            self._name,
            self._chunk_flow,
            self._priority,
            timeout,
            manager.config.max_wait,
            None,
            manager.kind,
        )
        job = dispatch.submit(sub)
        self._chunks.append(_Chunk(self._next_index, len(items), job))
        self._next_index += len(items)
        self._in_flight += len(items)
        self._last_size = len(items)

    def _collect(self) -> bool:
        """Move finished chunks' results to ``_ready`` (ordered: only from the front);
        whether there is one to hand out now."""
        chunks = self._chunks
        if self._ordered:
            while chunks and chunks[0].job.state is JobState.DONE:
                self._unpack(chunks.popleft())
        elif chunks:
            done = [c for c in chunks if c.job.state is JobState.DONE]
            if done:
                self._chunks = deque(c for c in chunks if c.job.state is not JobState.DONE)
                for chunk in done:
                    self._unpack(chunk)
        return bool(self._ready)

    def _unpack(self, chunk: _Chunk) -> None:
        job = chunk.job
        ready = self._ready
        if job.error is not None and job.error is not CANCELLED:
            error = job.error  # the chunk failed as a whole (a crash, a timeout...)
            span = (chunk.first, chunk.first + chunk.size - 1)
            ready.extend(
                ItemFailed(chunk.first + offset, error, span) for offset in range(chunk.size)
            )
            return
        results, failed = job.result if job.error is None else ([], 0)
        dispatch = self._manager._dispatch
        assert dispatch is not None
        if chunk.size and job.run:
            dispatch.estimates.add(self._flow, job.run / chunk.size)
        if failed:  # an item's index within the chunk becomes its index in the iterable
            for value in results:
                if type(value) is ItemFailed:
                    value.index += chunk.first
        ready.extend(results)

    async def _wait(self) -> None:
        """Until one of the chunks in flight (the oldest, when ordered) is done."""
        runtime = self._manager._runtime
        assert runtime is not None
        waiter = runtime.waiter()
        chunks = [self._chunks[0]] if self._ordered else list(self._chunks)
        for chunk in chunks:
            chunk.job.waiter = waiter
        await waiter.wait()

    def stop(self) -> None:
        """Stop every chunk still queued or running (nothing of it keeps running)."""
        if self._closed:
            return
        self._closed = True
        dispatch = self._manager._dispatch
        if dispatch is not None:
            for chunk in self._chunks:
                dispatch.stop(chunk.job, "cancelled")
        self._chunks.clear()
        if self._bar is not None:
            self._bar.close()

    async def aclose(self) -> None:
        self.stop()

    async def __aenter__(self) -> _Mapper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        self.stop()


def _item_error(failed: ItemFailed, kind: str) -> BaseException:
    if isinstance(failed.error, BaseException):
        error = failed.error
    else:
        error = rebuild(pickle.loads(failed.error), protocol.RAISED, kind, None)
    if failed.chunk is None:
        # The index goes into the message, where it is seen first (this error is the
        # worker's, rebuilt here, so changing it touches nothing of the caller's), and a note.
        where = f"wm.map's item {failed.index}"
        if isinstance(error, OffloadError):
            error.message = f"{error.message} ({where})"
        elif len(error.args) == 1 and isinstance(error.args[0], str):
            error.args = (f"{error.args[0]} ({where})",)
        error.add_note(f"raised by {where}")
    else:
        first, last = failed.chunk
        error.add_note(
            f"wm.map's items {first} to {last} went to a worker together (one chunk), and the "
            "chunk failed as a whole: one of them crashed the worker or ran out of time (a "
            "smaller chunksize narrows it down)"
        )
    return error


class _Bar:
    """A rich progress bar on a terminal (nothing elsewhere, or without rich)."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._progress.start()
        self._task = self._progress.add_task("offload.map", total=None)

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def _bar() -> _Bar | None:
    import sys

    if not sys.stderr.isatty():
        return None
    try:
        return _Bar()
    except ImportError:
        return None
