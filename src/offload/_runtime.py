"""The one seam that knows which event loop runs: asyncio (uvloop too) or trio.

Everything else in offload is written against anyio, plus the few operations below that anyio
has no cheap form of. On asyncio they are callbacks (``loop.add_reader``, ``loop.call_at``,
futures): a worker's answers are parsed in the callback that sees them arrive, and the next
tasks are written in the same turn, with no task switch. anyio's own ``wait_readable`` adds
and removes the reader and makes a future on every call, which measured several times the cost
per answer here. On trio the same operations are small system tasks.

Nothing here imports trio unless the running loop is trio's.
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ("Runtime", "Timer", "Waiter", "current_runtime")

log = logging.getLogger("offload")


class Timer(abc.ABC):
    """A callback due at a time; ``cancel()`` before then and it never runs."""

    __slots__ = ()

    @abc.abstractmethod
    def cancel(self) -> None: ...


class Waiter(abc.ABC):
    """A one-shot wake-up: fired from a callback on the loop, awaited by one task."""

    __slots__ = ()

    @abc.abstractmethod
    def fire(self) -> None:
        """Wake the waiting task (idempotent)."""

    @abc.abstractmethod
    def wait(self) -> Awaitable[Any]:
        """Wait until fired (cancellable)."""


class Runtime(abc.ABC):
    """The event-loop operations offload's transport needs, for the loop running now."""

    name: str

    @abc.abstractmethod
    def now(self) -> float:
        """The loop's clock, in seconds (trio's clock, virtual under ``MockClock``)."""

    @abc.abstractmethod
    def watch_readable(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop whenever ``fd`` is readable, until unwatched."""

    @abc.abstractmethod
    def unwatch_readable(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""

    @abc.abstractmethod
    def watch_writable(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable, until unwatched."""

    @abc.abstractmethod
    def unwatch_writable(self, fd: int) -> None: ...

    @abc.abstractmethod
    def waiter(self) -> Waiter: ...

    @abc.abstractmethod
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` on the loop at ``when`` (the loop's clock)."""

    @abc.abstractmethod
    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """From any thread: call ``callback(*args)`` on the loop (dropped once it has ended)."""

    @abc.abstractmethod
    def spawn_system_task(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn()`` in the background, outside any task group, until the loop ends.

        It is cancelled when the loop ends (trio: when the main task returns; asyncio: when
        ``asyncio.run`` cancels what is left). It must not raise.
        """

    @property
    @abc.abstractmethod
    def key(self) -> object:
        """What identifies the running loop (for state bound to it)."""


# -- asyncio ---------------------------------------------------------------------------------


class _AsyncioTimer(Timer):
    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def cancel(self) -> None:
        self.handle.cancel()


class _AsyncioWaiter(Waiter):
    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        self.future = future

    def fire(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def wait(self) -> Awaitable[Any]:
        return self.future  # type: ignore[no-any-return]


class _AsyncioRuntime(Runtime):
    name = "asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.time = loop.time
        self._tasks: set[Any] = set()

    def now(self) -> float:
        return self.time()  # type: ignore[no-any-return]

    def watch_readable(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, callback)

    def unwatch_readable(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def watch_writable(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_writer(fd, callback)

    def unwatch_writable(self, fd: int) -> None:
        self.loop.remove_writer(fd)

    def waiter(self) -> Waiter:
        return _AsyncioWaiter(self.loop.create_future())

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return _AsyncioTimer(self.loop.call_at(when, callback))

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(callback, *args)

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        async def run() -> None:
            await fn()

        task = self.loop.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def key(self) -> object:
        return self.loop


# -- trio ------------------------------------------------------------------------------------


class _TrioTimer(Timer):
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _TrioWaiter(Waiter):
    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event

    def fire(self) -> None:
        self.event.set()

    def wait(self) -> Awaitable[Any]:
        return self.event.wait()  # type: ignore[no-any-return]


class _TrioRuntime(Runtime):
    """trio: fd watchers and timers are system tasks (trio has no callback API)."""

    name = "trio"

    def __init__(self) -> None:
        import trio

        self.trio = trio
        self.token = trio.lowlevel.current_trio_token()
        self._readers: dict[int, Any] = {}  # fd -> cancel scope of its watcher task
        self._writers: dict[int, Any] = {}
        self._timers: list[tuple[float, int, _TrioTimer]] = []
        self._order = itertools.count()
        self._timer_scope: Any = None
        self._timer_task_started = False

    def now(self) -> float:
        return self.trio.current_time()  # type: ignore[no-any-return,unused-ignore]

    def _watch(
        self,
        table: dict[int, Any],
        fd: int,
        callback: Callable[[], None],
        wait: Callable[[int], Awaitable[None]],
    ) -> None:
        trio = self.trio
        scope = trio.CancelScope()
        table[fd] = scope

        async def watcher() -> None:
            with scope:
                while not scope.cancel_called:
                    try:
                        await wait(fd)
                    except (trio.ClosedResourceError, OSError):
                        return
                    if scope.cancel_called:
                        return
                    try:
                        callback()
                    except Exception:
                        log.exception("offload: a callback on fd %d raised", fd)

        trio.lowlevel.spawn_system_task(watcher, name=f"offload-fd-{fd}")

    def _unwatch(self, table: dict[int, Any], fd: int) -> None:
        scope = table.pop(fd, None)
        if scope is not None:
            scope.cancel()
            with contextlib.suppress(Exception):
                self.trio.lowlevel.notify_closing(fd)

    def watch_readable(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(self._readers, fd, callback, self.trio.lowlevel.wait_readable)

    def unwatch_readable(self, fd: int) -> None:
        self._unwatch(self._readers, fd)

    def watch_writable(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(self._writers, fd, callback, self.trio.lowlevel.wait_writable)

    def unwatch_writable(self, fd: int) -> None:
        self._unwatch(self._writers, fd)

    def waiter(self) -> Waiter:
        return _TrioWaiter(self.trio.Event())

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _TrioTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        if not self._timer_task_started:
            self._timer_task_started = True
            self.trio.lowlevel.spawn_system_task(self._run_timers, name="offload-timers")
        elif self._timer_scope is not None and when < self._timer_scope.deadline:
            self._timer_scope.deadline = when
        return timer

    async def _run_timers(self) -> None:
        trio = self.trio
        timers = self._timers
        while True:
            deadline = timers[0][0] if timers else float("inf")
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if not timer.cancelled:
                    try:
                        timer.callback()
                    except Exception:
                        log.exception("offload: a timer callback raised")

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(Exception):  # trio.RunFinishedError: the run is over
            self.token.run_sync_soon(callback, *args)

    def spawn_system_task(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        self.trio.lowlevel.spawn_system_task(fn, name=name)

    @property
    def key(self) -> object:
        return self.token


_asyncio_runtimes: weakref.WeakKeyDictionary[Any, _AsyncioRuntime] = weakref.WeakKeyDictionary()
_trio_runtimes: weakref.WeakKeyDictionary[Any, _TrioRuntime] = weakref.WeakKeyDictionary()


def current_runtime() -> Runtime:
    """The ``Runtime`` of the running event loop (one per loop).

    Raises ``RuntimeError`` outside an event loop, and for a loop offload does not know.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            trio_runtime = _trio_runtimes.get(token)
            if trio_runtime is None:
                trio_runtime = _trio_runtimes[token] = _TrioRuntime()
            return trio_runtime
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("offload needs a running event loop (asyncio or trio)") from None
    runtime = _asyncio_runtimes.get(loop)
    if runtime is None:
        runtime = _asyncio_runtimes[loop] = _AsyncioRuntime(loop)
    return runtime
