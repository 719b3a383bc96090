"""offload in ASGI apps (Starlette, FastAPI): one manager per app, errors as HTTP responses.

Needs Starlette (offload's ``web`` extra: ``pip install '.[web]'`` in offload's checkout);
``import offload`` never imports it.

A Starlette app::

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import offload
    from offload.asgi import handle_offload_error, lifespan

    async def login(request: Request) -> JSONResponse:
        body = await request.json()
        stored = await request.state.workers.execute_task(
            {"type": "crypto:hash_password", "data": {"password": body["password"]}}
        )
        return JSONResponse({"hash": stored})

    app = Starlette(
        routes=[Route("/login", login, methods=["POST"])],
        lifespan=lifespan(workers=2, max_queue=64, shutdown_grace=10),
        exception_handlers={offload.OffloadError: handle_offload_error},
    )

FastAPI takes the same two pieces: ``FastAPI(lifespan=lifespan(...))`` and
``app.add_exception_handler(offload.OffloadError, handle_offload_error)``; a handler gets the
manager with ``wm: WorkerManager = Depends(offload.asgi.get_manager)``.

Where the manager is:

* ``request.state.workers`` in a handler (the lifespan state, copied into every request);
* ``offload.current_manager()`` anywhere below a handler. The lifespan sets a context variable
  *and* binds the manager to the server's event loop: servers such as uvicorn run the lifespan
  in its own task, so the context variable alone does not reach request tasks, but the loop
  does. One app with one manager per loop (the usual case) needs nothing else. Several apps
  with their own managers in one server: add ``Middleware(OffloadMiddleware)`` to each, which
  sets the context variable from the request's state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import Any, Final, TypeVar

try:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"offload.asgi needs Starlette ({exc.name} is missing): install offload's web extra"
        " (pip install '.[web]' in offload's checkout)"
    ) from None

from ._context import use_manager
from ._manager import WorkerManager
from .errors import OffloadError, WouldTimeOut

__all__ = (
    "MESSAGES",
    "RETRY_AFTER",
    "STATE_KEY",
    "STATUS_BY_CODE",
    "OffloadMiddleware",
    "error_response",
    "get_manager",
    "handle_offload_error",
    "lifespan",
    "workers_endpoint",
)

log = logging.getLogger("offload.asgi")

AppT = TypeVar("AppT")

#: The lifespan state key (so ``request.state.workers``).
STATE_KEY: Final = "workers"

#: ``Retry-After`` (seconds) sent with every 503.
RETRY_AFTER: Final = 1

#: HTTP status per ``OffloadError.code``; any other code is 500.
STATUS_BY_CODE: Final[Mapping[str, int]] = MappingProxyType(
    {
        # Transient: the client may retry (503s carry Retry-After).
        "QUEUE_FULL": 503,
        "WOULD_TIME_OUT": 503,  # it could not start in time: Retry-After from the estimate
        "SHUTDOWN": 503,  # this instance is draining; another one (or this one later) can serve
        "TIMEOUT": 504,
        # What the client sent: a task type, task or input taken from the request.
        "INVALID_TASK": 400,
        "UNKNOWN_TASK": 400,
        "INVALID_INPUT": 400,
        "DECRYPT_FAILED": 400,
        "PAYLOAD_TOO_LARGE": 413,
        "OUTPUT_TOO_LARGE": 413,
        # offload.jobs: a store that is busy or out of reach now may serve a retry
        "STORE_LOCKED": 503,
        "STORE_UNAVAILABLE": 503,
        "STORE_FULL": 507,
        "JOB_NOT_FOUND": 404,
    }
)

#: The message per code. Messages are fixed: ``str(exc)`` may quote a task's data or its own
#: exception (a key, a password, a token), so it is never put in a response.
MESSAGES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "QUEUE_FULL": "The server is busy; retry later.",
        "WOULD_TIME_OUT": "The server is too busy to finish this in time; retry later.",
        "SHUTDOWN": "The server is shutting down; retry later.",
        "TIMEOUT": "The work did not finish within its deadline.",
        "INVALID_TASK": "The request does not describe a valid task.",
        "UNKNOWN_TASK": "The request names an unknown task type.",
        "INVALID_INPUT": "The input is invalid or unsupported.",
        "DECRYPT_FAILED": "The data could not be decrypted.",
        "PAYLOAD_TOO_LARGE": "The payload is too large.",
        "OUTPUT_TOO_LARGE": "The output would be too large.",
        "STORE_LOCKED": "The job store is busy; retry later.",
        "STORE_UNAVAILABLE": "The job store cannot be reached; retry later.",
        "STORE_FULL": "The job store is out of space.",
        "JOB_NOT_FOUND": "No such job.",
    }
)
_INTERNAL_MESSAGE: Final = "An internal error occurred while running the work."

StatefulLifespan = Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def lifespan(
    app_lifespan: StatefulLifespan[AppT] | None = None, **manager_options: Any
) -> Callable[[AppT], AbstractAsyncContextManager[dict[str, Any]]]:
    """A Starlette/FastAPI lifespan that runs a ``WorkerManager(**manager_options)``.

    >>> app = Starlette(routes=routes, lifespan=lifespan(workers=2, max_queue=64))  # doctest: +SKIP

    Startup waits until every worker is ready (a worker that cannot start fails the startup);
    shutdown lets queued and running tasks finish for up to ``shutdown_grace`` seconds, then
    stops the workers. The manager is the lifespan state ``"workers"`` (``request.state.workers``)
    and ``offload.current_manager()``.

    With the app's own lifespan, both run: the manager starts first, so the app's startup
    can already use it, and stops last. The app's lifespan may yield a state dict (merged
    with ``{"workers": wm}``) or nothing::

        @asynccontextmanager
        async def app_lifespan(app):
            async with httpx.AsyncClient() as client:
                yield {"http": client}

        app = Starlette(lifespan=lifespan(app_lifespan, workers=4, shutdown_grace=10))

    The options are checked here (a typo fails at import, not at startup). Each time the
    app starts it gets a fresh manager.
    """
    config = WorkerManager(**manager_options).config  # checked now, once; nothing starts yet

    @asynccontextmanager
    async def run(app: AppT) -> AsyncIterator[dict[str, Any]]:
        async with WorkerManager.from_config(config) as wm:
            with use_manager(wm):
                if app_lifespan is None:
                    yield {STATE_KEY: wm}
                    return
                async with app_lifespan(app) as app_state:
                    yield _merge(app_state, wm)

    return run


def _merge(app_state: Mapping[str, Any] | None, wm: WorkerManager) -> dict[str, Any]:
    state = dict(app_state or {})
    if STATE_KEY in state:
        raise RuntimeError(
            f"the app's lifespan state already has {STATE_KEY!r}, which offload.asgi.lifespan "
            "uses for its WorkerManager; rename the app's key"
        )
    state[STATE_KEY] = wm
    return state


def get_manager(request: Request) -> WorkerManager:
    """The app's manager from the request's lifespan state (a FastAPI dependency too).

    >>> @app.post("/hash")  # doctest: +SKIP
    ... async def hash_(wm: WorkerManager = Depends(get_manager)): ...
    """
    wm = getattr(request.state, STATE_KEY, None)
    if not isinstance(wm, WorkerManager):
        raise LookupError(
            "no offload manager in the request state: create the app with "
            "lifespan=offload.asgi.lifespan(...)"
        )
    return wm


class OffloadMiddleware:
    """Sets ``offload.current_manager()`` for each request from the app's lifespan state.

    >>> app = Starlette(  # doctest: +SKIP
    ...     routes=routes,
    ...     lifespan=lifespan(workers=2),
    ...     middleware=[Middleware(OffloadMiddleware)],
    ... )

    Only needed when several apps with their own managers share one event loop; with one,
    the lifespan alone makes ``current_manager()`` work.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wm = scope.get("state", {}).get(STATE_KEY) if scope["type"] != "lifespan" else None
        if isinstance(wm, WorkerManager):
            with use_manager(wm, bind_loop=False):
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def workers_endpoint(request: Request) -> JSONResponse:
    """A route: the app's manager's ``stats()`` and ``worker_statistics()`` as JSON.

    >>> Route("/workers", workers_endpoint)  # doctest: +SKIP

    ``{"stats": {...}, "workers": [{"id": 1, "state": "busy", ...}, ...]}``: what
    ``offload top URL`` shows live. It says how busy the server is: mount it where only
    operators reach it.
    """
    wm = get_manager(request)
    stats = dataclasses.asdict(wm.stats())
    stats["queued_by_priority"] = dict(stats["queued_by_priority"])
    workers = [dataclasses.asdict(info) for info in wm.worker_statistics()]
    return JSONResponse({"stats": stats, "workers": workers})


def error_response(exc: BaseException, *, retry_after: int | None = None) -> JSONResponse:
    """The JSON response for ``exc``: ``{"error": {"code": ..., "message": ...}}``.

    >>> error_response(offload.QueueFull("42 waiting")).headers["retry-after"]  # doctest: +SKIP
    '1'

    The status comes from ``STATUS_BY_CODE`` (else 500), the message from ``MESSAGES``
    (else a generic one): never from ``str(exc)``, which may quote secrets. A 503 carries
    ``Retry-After``: ``retry_after`` if given, else the estimate a ``WouldTimeOut`` carries
    (whole seconds, rounded up), else ``RETRY_AFTER``.
    """
    code = exc.code if isinstance(exc, OffloadError) else "INTERNAL_ERROR"
    status = STATUS_BY_CODE.get(code, 500)
    message = MESSAGES.get(code, _INTERNAL_MESSAGE)
    if retry_after is None:
        estimate = getattr(exc, "retry_after", None) if isinstance(exc, WouldTimeOut) else None
        retry_after = max(1, math.ceil(estimate)) if estimate else RETRY_AFTER
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


async def handle_offload_error(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI exception handler: an ``OffloadError`` becomes a JSON error response.

    >>> app.add_exception_handler(OffloadError, handle_offload_error)  # doctest: +SKIP

    ===========================================================  ======  ====================
    code                                                         status  why
    ===========================================================  ======  ====================
    ``QUEUE_FULL``                                               503     busy: retry (with
                                                                         ``Retry-After: 1``)
    ``WOULD_TIME_OUT``                                           503     could not start in
                                                                         time: retry after
                                                                         the estimate
    ``NOT_STARTED`` (the manager was never started)              500     a programming error
    ``SHUTDOWN``                                                 503     draining: retry
    ``TIMEOUT``                                                  504     the deadline passed
    ``INVALID_TASK``, ``UNKNOWN_TASK``, ``INVALID_INPUT``,       400     the request's data
    ``DECRYPT_FAILED``                                                   was bad
    ``PAYLOAD_TOO_LARGE``, ``OUTPUT_TOO_LARGE``                  413     too big
    anything else (a crash, ``WORKER_ERROR``, ...)               500     logged with its
                                                                         traceback
    ===========================================================  ======  ====================

    The body is ``{"error": {"code": "QUEUE_FULL", "message": "The server is busy; ..."}}``
    with a fixed message per code. 500s are logged (``offload.asgi`` logger) with the full
    exception, which stays on the server.
    """
    response = error_response(exc)
    if response.status_code >= 500 and response.status_code not in (503, 504):
        log.error(
            "%s %s failed: %s",
            request.scope.get("method", request.scope["type"]),
            request.scope.get("path", ""),
            getattr(exc, "code", type(exc).__name__),
            exc_info=exc,
        )
    return response
