"""The current manager: ``offload.current_manager()`` for code far from the request handler.

A web app opens one ``WorkerManager`` for its lifetime (``offload.asgi.lifespan``); code deep
in a call stack (a service, a repository, a helper) can then reach it without threading it
through every signature::

    import offload

    async def hash_for_storage(password: str) -> str:
        wm = offload.current_manager()
        task = {"type": "crypto:hash_password", "data": {"password": password}}
        return await wm.execute_task(task)

Lookup order:

1. the context variable, set by :func:`use_manager` (and so by ``offload.asgi.lifespan``
   within its own task, and by ``offload.asgi.OffloadMiddleware`` for each request);
2. the manager *bound to the running event loop* by :func:`use_manager`. ASGI servers run
   the lifespan in a task of its own, and a context variable set there is not seen by the
   request tasks (uvicorn creates them from the server's context, not the lifespan's). The
   event loop is what the lifespan and the requests share, so this makes
   ``current_manager()`` work in request handlers with no extra setup. If two managers are
   bound to one loop (two apps in one server), the loop cannot tell which one a request
   means: that is an error, and ``OffloadMiddleware`` (or ``request.state.workers``) is the fix.

Nothing here imports a web framework.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ._runtime import current_runtime
from .errors import NoCurrentManager

if TYPE_CHECKING:
    from ._manager import WorkerManager

__all__ = ("NoCurrentManager", "current_manager", "use_manager")

_current: ContextVar[WorkerManager | None] = ContextVar("offload_current_manager", default=None)
# The managers bound by use_manager(), per event loop (asyncio's loop, trio's token), innermost
# last. Entries are removed when use_manager() exits, so a closed loop is never kept alive.
_by_loop: dict[object, list[WorkerManager]] = {}

_HINT = (
    "open one for the app's lifetime with `lifespan=offload.asgi.lifespan(workers=...)`, "
    "or wrap the code in `with offload.use_manager(wm):`"
)


def _loop_key() -> object | None:
    try:
        return current_runtime().key
    except RuntimeError:
        return None


def current_manager() -> WorkerManager:
    """The ``WorkerManager`` of the running app (see the module docstring for the lookup).

    >>> import offload
    >>> async def handler():  # doctest: +SKIP
    ...     return await offload.current_manager().run(pow, 2, 64)

    Raises ``NoCurrentManager`` (``NO_CURRENT_MANAGER``; also a ``LookupError`` and
    ``RuntimeError``) with a hint when no manager is set, or when several are bound to the
    running loop and none to this context.
    """
    wm = _current.get()
    if wm is not None:
        return wm
    loop = _loop_key()
    if loop is None:
        raise NoCurrentManager(
            f"no current offload manager (and no running event loop here); {_HINT}"
        )
    bound = _by_loop.get(loop)
    if not bound:
        raise NoCurrentManager(f"no current offload manager; {_HINT}")
    if len(bound) > 1:
        raise NoCurrentManager(
            f"{len(bound)} offload managers are open on this event loop and none is set for "
            "this context; add `Middleware(offload.asgi.OffloadMiddleware)` to each app, or "
            "use `request.state.workers`"
        )
    return bound[0]


@contextmanager
def use_manager(wm: WorkerManager, *, bind_loop: bool = True) -> Iterator[WorkerManager]:
    """Make ``wm`` the current manager inside the ``with`` block.

    >>> async def main():  # doctest: +SKIP
    ...     async with offload.WorkerManager(workers=2) as wm, offload.use_manager(wm):
    ...         await deep_code()  # calls offload.current_manager()

    Sets the context variable (seen by this task and the tasks it creates) and, with
    ``bind_loop`` (default), also binds ``wm`` to the running event loop so other tasks on the
    loop find it. Enter and exit in the same task (as ``with`` does).
    """
    token = _current.set(wm)
    loop: object | None = None
    if bind_loop:
        loop = _loop_key()
        if loop is not None:
            _by_loop.setdefault(loop, []).append(wm)
    try:
        yield wm
    finally:
        with suppress(ValueError):  # left in another context: that one never saw the set
            _current.reset(token)
        if loop is not None:
            bound = _by_loop.get(loop, [])
            if wm in bound:
                bound.remove(wm)
            if not bound:
                _by_loop.pop(loop, None)
