"""``wm.map``: a function over an iterable, in chunks, lazily, with a bound on what is in flight.

The iterable is read only as room appears, so a generator of ten million items never
materialises. Items travel in chunks (one call per chunk: ``_offload_worker.batch``); an
adaptive chunk is about ``CHUNK_TARGET`` seconds of the function's measured run time. Leaving
the loop early stops every chunk still queued or running (synchronously: ``break`` frees the
iterator, which stops them).
"""

from __future__ import annotations

import functools
import pickle
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._dispatch import CANCELLED, Job, JobState, Submission
from ._offload_worker import protocol
from ._offload_worker.batch import run_chunk
from ._outcome import rebuild
from ._task import Priority

if TYPE_CHECKING:
    from ._manager import WorkerManager

__all__ = ("map_results",)

R = TypeVar("R")
T = TypeVar("T")

CHUNK_TARGET: Final = 0.001  # seconds of work per adaptive chunk
_FIRST_CHUNK: Final = 8
_MAX_CHUNK: Final = 4096


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
        workers = max(1, manager.stats().workers or manager.config.max_workers)
        self._limit = max_in_flight or max(64, 256 * workers)
        self._priority = priority
        self._timeout = timeout
        self._flow, self._name = manager._flow(fn)
        self._chunk_flow = f"offload.map:{self._flow}"
        self._exhausted = False
        self._next_index = 0  # index of the next item read from the iterable
        self._in_flight = 0  # items submitted, results not yet handed out
        self._chunks: deque[_Chunk] = deque()  # submitted, in submission order
        self._ready: deque[tuple[int, bool, Any]] = deque()  # unordered: done results
        self._results: dict[int, tuple[bool, Any]] = {}  # ordered: done results by index
        self._emitted = 0  # ordered: index of the next result to hand out
        self._closed = False
        self._bar = _bar() if progress else None

    def __aiter__(self) -> _Mapper:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._next()
        except BaseException:
            self.stop()
            raise

    async def _next(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        while True:
            if not self._exhausted and self._in_flight < self._limit:
                await self._fill()
            found = self._take()
            if found is not None:
                index, ok, value = found
                self._in_flight -= 1
                if self._bar is not None:
                    self._bar.advance()
                if ok:
                    return value
                raise _item_error(value, index, self._manager.kind)
            if not self._chunks:
                if self._exhausted:
                    self.stop()
                    raise StopAsyncIteration
                continue
            await self._wait()

    async def _fill(self) -> None:
        """Read items and submit chunks until the in-flight bound or the end."""
        while not self._exhausted and self._in_flight < self._limit:
            size = min(self._size(), self._limit - self._in_flight)
            items = await self._read(size)
            if not items:
                self._exhausted = True
                return
            await self._submit(items)

    def _size(self) -> int:
        if self._chunksize is not None:
            return self._chunksize
        dispatch = self._manager._dispatch
        assert dispatch is not None
        per_chunk = dispatch.estimates.get(self._chunk_flow)
        per_item = dispatch.estimates.get(self._flow)
        if per_item is None:
            if per_chunk is None:
                return _FIRST_CHUNK
            per_item = per_chunk / max(1, self._last_size)
        if per_item <= 0:
            return _MAX_CHUNK
        return max(1, min(_MAX_CHUNK, int(CHUNK_TARGET / per_item)))

    _last_size = _FIRST_CHUNK

    async def _read(self, count: int) -> list[Any]:
        items: list[Any] = []
        if self._sync is not None:
            for item in self._sync:
                items.append(item)
                if len(items) >= count:
                    break
        else:
            assert self._async is not None
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

    def _take(self) -> tuple[int, bool, Any] | None:
        """A finished result to hand out now, if any."""
        self._collect()
        if self._ordered:
            entry = self._results.pop(self._emitted, None)
            if entry is None:
                return None
            self._emitted += 1
            return (self._emitted - 1, *entry)
        return self._ready.popleft() if self._ready else None

    def _collect(self) -> None:
        """Move the results of finished chunks into the result buffers."""
        while self._chunks:
            done = [c for c in self._chunks if c.job.state is JobState.DONE]
            if not done:
                return
            for chunk in done:
                self._chunks.remove(chunk)
                self._unpack(chunk)

    def _unpack(self, chunk: _Chunk) -> None:
        job = chunk.job
        if job.error is not None and job.error is not CANCELLED:
            error = job.error  # the chunk failed as a whole (a crash, a timeout...)
            for offset in range(chunk.size):
                self._put(chunk.first + offset, False, error)
            return
        results = job.result if job.error is None else []
        dispatch = self._manager._dispatch
        assert dispatch is not None
        if chunk.size and job.run:
            dispatch.estimates.add(self._flow, job.run / chunk.size)
        for offset, (ok, value) in enumerate(results):
            self._put(chunk.first + offset, ok, value)

    def _put(self, index: int, ok: bool, value: Any) -> None:
        if self._ordered:
            self._results[index] = (ok, value)
        else:
            self._ready.append((index, ok, value))

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


def _item_error(value: Any, index: int, kind: str) -> BaseException:
    if isinstance(value, BaseException):
        error = value
    else:
        error = rebuild(pickle.loads(value), protocol.RAISED, kind, None)
    error.add_note(f"raised by wm.map's item {index}")
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
