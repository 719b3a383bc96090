"""Starting background work from loop callbacks, inside a task group.

A worker's answers and exits arrive in callbacks of the event loop, where there is no task to
start another from (anyio needs one). A ``Spawner`` takes the work there and a supervisor task
in the owner's task group starts it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.abc

from ._runtime import Runtime, Waiter

__all__ = ("Spawner",)


class Spawner:
    """``spawn(fn, *args)`` from anywhere on the loop; ``run(tg)`` starts each in ``tg``."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._work: deque[tuple[Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...]]] = deque()
        self._waiter: Waiter | None = None
        self.closed = False

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self.closed:
            return
        self._work.append((fn, args))
        if self._waiter is not None:
            self._waiter.fire()

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """The supervisor: start what was asked for, until ``close``."""
        while not self.closed:
            waiter = self._waiter = self._runtime.waiter()
            while self._work:
                fn, args = self._work.popleft()
                tg.start_soon(fn, *args)
            await waiter.wait()

    def close(self) -> None:
        self.closed = True
        self._work.clear()
        if self._waiter is not None:
            self._waiter.fire()
