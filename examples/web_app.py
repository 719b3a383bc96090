"""A Starlette app whose CPU-heavy work runs on offload workers, not on the event loop.

Run it (on 127.0.0.1 only)::

    pip install 'offload[web,jwt,zstd]'
    python examples/web_app.py --port 8000

On trio, with hypercorn's trio worker (``pip install hypercorn trio``; from the checkout's
root)::

    hypercorn --worker-class trio --bind 127.0.0.1:8000 'examples/web_app.py:create_app()'

The app is the same: offload, Starlette and the lifespan run on either loop. SIGTERM (or
Ctrl-C) drains: requests in flight finish (within hypercorn's ``--graceful-timeout``, 3 s by
default; uvicorn waits for them), then the lifespan stops the workers.

Then::

    curl -s localhost:8000/health
    curl -s localhost:8000/password/hash -d '{"password": "hunter2"}'
    curl -s localhost:8000/password/verify -d '{"password": "hunter2", "hash": "$scrypt$..."}'
    curl -s localhost:8000/token -d '{"sub": "alice"}'
    curl -s localhost:8000/token/verify -d '{"token": "eyJ..."}'
    curl -s localhost:8000/compress?codec=zstd --data-binary @some-file -o some-file.zst

``/health`` is answered on the event loop (it is cheap); everything else is a built-in task
type (``crypto:hash_password``, ``jwt:sign``, ``compress:zstd``, ...) run by the manager
that ``offload.asgi.lifespan`` opens for the app's lifetime. When the queue is full the
client gets ``503`` with ``Retry-After``, when a task misses its deadline ``504``, both as
``{"error": {"code": ..., "message": ...}}`` (``offload.asgi.handle_offload_error``).

The same app works with FastAPI: ``FastAPI(lifespan=lifespan(...))`` and
``app.add_exception_handler(OffloadError, handle_offload_error)``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from offload import OffloadError, builtins
from offload.asgi import handle_offload_error, lifespan

MAX_BODY = 16 * 1024 * 1024  # bytes accepted by /compress
CODECS = {"zstd": "application/zstd", "gzip": "application/gzip"}


class BadRequest(Exception):
    """The request itself is malformed (caught by ``bad_request`` below)."""


async def json_body(request: Request, *fields: str) -> dict[str, str]:
    """The JSON object in the body, with ``fields`` present as strings."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for field in fields:
        if not isinstance(body.get(field), str):
            raise BadRequest(f"{field!r} must be a string")
    return body


async def bad_request(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"code": "BAD_REQUEST", "message": str(exc)}}, status_code=400)


def create_app(
    *, jwt_secret: str | None = None, task_timeout: float = 10.0, **manager_options: Any
) -> Starlette:
    """The app. ``manager_options`` go to ``WorkerManager`` (``workers``, ``max_queue``...).

    ``task_timeout`` is every task's deadline in seconds (a miss is a 504). The JWT secret
    comes from ``jwt_secret``, else ``$JWT_SECRET``, else a random one per process.
    """
    secret = jwt_secret or os.environ.get("JWT_SECRET") or secrets.token_urlsafe(32)
    options = {"max_queue": 64, "shutdown_grace": 10.0} | manager_options

    async def health(request: Request) -> Response:
        stats = request.state.workers.stats()
        return JSONResponse({"status": "ok", "workers": stats.workers, "queued": stats.queued})

    async def hash_password(request: Request) -> Response:
        body = await json_body(request, "password")
        stored = await builtins.hash_password(
            request.state.workers, body["password"], timeout=task_timeout
        )
        return JSONResponse({"hash": stored})

    async def verify_password(request: Request) -> Response:
        body = await json_body(request, "password", "hash")
        valid = await builtins.verify_password(
            request.state.workers, body["password"], body["hash"], timeout=task_timeout
        )
        return JSONResponse({"valid": valid})

    async def issue_token(request: Request) -> Response:
        body = await json_body(request, "sub")
        token = await builtins.jwt_sign(
            request.state.workers,
            {"sub": body["sub"]},
            secret,
            algorithm="HS256",
            expires_in=3600,
            timeout=task_timeout,
        )
        return JSONResponse({"token": token})

    async def verify_token(request: Request) -> Response:
        body = await json_body(request, "token")
        result = await builtins.jwt_verify(
            request.state.workers,
            body["token"],
            secret,
            algorithms=["HS256"],
            priority="high",  # on the request path of every API call: ahead of the queue
            timeout=task_timeout,
        )
        return JSONResponse(dict(result))

    async def compress(request: Request) -> Response:
        codec = request.query_params.get("codec", "zstd")
        if codec not in CODECS:
            raise BadRequest(f"codec must be one of {sorted(CODECS)}")
        data = await request.body()
        if len(data) > MAX_BODY:
            raise BadRequest(f"at most {MAX_BODY} bytes")
        packed = await builtins.compress(
            request.state.workers,
            data,
            "zstd" if codec == "zstd" else "gzip",
            priority="low",  # bulk work: behind interactive requests
            timeout=task_timeout,
        )
        return Response(packed, media_type=CODECS[codec])

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/password/hash", hash_password, methods=["POST"]),
            Route("/password/verify", verify_password, methods=["POST"]),
            Route("/token", issue_token, methods=["POST"]),
            Route("/token/verify", verify_token, methods=["POST"]),
            Route("/compress", compress, methods=["POST"]),
        ],
        lifespan=lifespan(**options),
        exception_handlers={OffloadError: handle_offload_error, BadRequest: bad_request},
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="offload workers")
    args = parser.parse_args(argv)
    app = create_app(workers=args.workers)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
