"""Serve an ASGI app in the test's own event loop on a free 127.0.0.1 port.

asyncio: uvicorn; trio: hypercorn's trio worker. Both run the app's lifespan, and both have
started it (so the workers are up) by the time the URL is handed out.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio

#: The longest a server may take to stop (seconds).
STOP_TIMEOUT = 15


def backend_name(anyio_backend: Any) -> str:
    return str(anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend)


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` on this loop (uvicorn on asyncio, hypercorn on trio); its base URL.

    Leaving the block shuts the server down gracefully (requests in flight finish, then the
    lifespan's shutdown runs) and waits for it, bounded.
    """
    from offload._runtime import current_runtime

    if current_runtime().name == "trio":
        async with _hypercorn_trio(app) as url:
            yield url
    else:
        async with _uvicorn(app) as url:
            yield url


@asynccontextmanager
async def _uvicorn(app: Any) -> AsyncIterator[str]:
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", ws="none", http="h11"
    )
    server = uvicorn.Server(config)
    try:
        with anyio.CancelScope() as bound:
            async with anyio.create_task_group() as tg:
                # The socket listens before uvicorn starts: a request made at once waits in
                # the backlog until the lifespan (and so the workers) are up.
                tg.start_soon(partial(server.serve, sockets=[sock]))
                try:
                    yield f"http://127.0.0.1:{port}"
                finally:
                    server.should_exit = True
                    bound.deadline = anyio.current_time() + STOP_TIMEOUT
        if bound.cancelled_caught:
            raise TimeoutError(f"uvicorn did not stop within {STOP_TIMEOUT} s")
    finally:
        sock.close()


@asynccontextmanager
async def _hypercorn_trio(app: Any) -> AsyncIterator[str]:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 15
    stop = anyio.Event()
    with anyio.CancelScope() as bound:
        async with anyio.create_task_group() as tg:
            # Returns once the lifespan has started and the socket listens.
            binds = await tg.start(partial(serve, app, config, shutdown_trigger=stop.wait))
            try:
                yield binds[0]
            finally:
                stop.set()
                bound.deadline = anyio.current_time() + STOP_TIMEOUT
    if bound.cancelled_caught:
        raise TimeoutError(f"hypercorn did not stop within {STOP_TIMEOUT} s")
