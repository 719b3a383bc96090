"""The demo's web app (Starlette on uvicorn, 127.0.0.1), run as a child process.

``python -m offload.demo._server --spec JSON [--watch-stdin]`` serves one app with one route
pair per *mode*; the spec names the modes and how each handles the two kinds of request:

* ``GET /cheap/<mode>`` with ``Authorization: Bearer <token>``: a cheap token check, on the
  event loop (``"cheap": "inline"``) or as a task (``"cheap": "offload"``: ``jwt:verify``).
* ``POST /heavy/<mode>``: a password hash (scrypt), on the event loop (a mode with no
  manager: what naive code does) or on the mode's ``WorkerManager``.
* ``GET /_demo/stats``: the event loop's lag since the last call, and each manager's stats.

Spec (JSON)::

    {"token": "hmac" | "jwt",
     "scrypt": {"n": 16384, "r": 8, "p": 2},
     "modes": {"inline": null,
               "fifo": {"manager": {"scheduling": "fifo", "max_queue": 64},
                        "cheap": "inline", "heavy_timeout": null}}}

Once every manager's workers are ready it prints one line, ``READY {json}``, with the port,
the token to send, and the measured cost of one hash on this machine (seconds).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._http import percentile

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .._manager import WorkerManager

__all__ = ("build_app", "hmac_check", "hmac_token", "serve", "time_hash")

LAG_INTERVAL: Final = 0.005  # the event-loop lag probe's period (seconds)
PASSWORD: Final = "correct horse battery staple"


def hmac_token(key: bytes, subject: str) -> str:
    """A signed session token, ``<payload>.<HMAC-SHA256>`` (base64url): the essence of an
    HS256 JWT with the standard library only."""
    payload = base64.urlsafe_b64encode(json.dumps({"sub": subject}).encode()).rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.digest(key, payload, hashlib.sha256)).rstrip(b"=")
    return f"{payload.decode()}.{mac.decode()}"


def hmac_check(key: bytes, token: str) -> bool:
    """Whether ``token`` was made by ``hmac_token`` with ``key`` (constant-time)."""
    payload, _, mac = token.encode().partition(b".")
    expected = base64.urlsafe_b64encode(hmac.digest(key, payload, hashlib.sha256)).rstrip(b"=")
    return hmac.compare_digest(expected, mac)


def time_hash(scrypt: dict[str, int], runs: int = 3) -> float:
    """The fastest of ``runs`` password hashes with these scrypt parameters (seconds)."""
    from ..tasks import hash_password

    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        hash_password(PASSWORD, **scrypt)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - started)
    return best


class LagProbe:
    """Measures event-loop lag: how late a ``sleep(LAG_INTERVAL)`` wakes up (seconds)."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=200_000)

    async def run(self) -> None:
        while True:
            started = anyio.current_time()
            await anyio.sleep(LAG_INTERVAL)
            self.samples.append(max(0.0, anyio.current_time() - started - LAG_INTERVAL))

    def take(self) -> list[float]:
        samples = list(self.samples)
        self.samples.clear()
        return samples


def _stats(wm: WorkerManager) -> dict[str, Any]:
    stats = wm.stats()
    return {
        "workers": stats.workers,
        "submitted": stats.submitted,
        "completed": stats.completed,
        "rejected": stats.rejected,
        "timed_out": stats.timed_out,
        "inline": stats.inline,
    }


def build_app(spec: dict[str, Any], announce: Callable[[dict[str, Any]], None] | None) -> Starlette:
    """The demo app for ``spec`` (see the module docstring); ``announce`` gets the READY
    details once every manager is ready."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .._manager import WorkerManager
    from ..asgi import handle_offload_error
    from ..errors import OffloadError
    from ..tasks import hash_password

    scrypt: dict[str, int] = dict(spec["scrypt"])
    token_kind: str = spec.get("token", "hmac")
    modes: dict[str, dict[str, Any] | None] = spec["modes"]
    key = secrets.token_bytes(32)
    if token_kind == "jwt":
        from ..tasks import jwt_sign, jwt_verify

        token = jwt_sign({"sub": "demo-user"}, key, algorithm="HS256")

        def check(presented: str) -> bool:
            return bool(jwt_verify(presented, key, algorithms=["HS256"])["valid"])
    else:
        token = hmac_token(key, "demo-user")

        def check(presented: str) -> bool:
            return hmac_check(key, presented)

    # Checked now: a bad option fails before anything starts.
    configs = {
        name: WorkerManager(**mode["manager"]).config
        for name, mode in modes.items()
        if mode is not None
    }
    managers: dict[str, WorkerManager] = {}
    probe = LagProbe()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as group:
            for name, config in configs.items():
                managers[name] = await stack.enter_async_context(WorkerManager.from_config(config))
            for wm in managers.values():  # their first task imports the task modules
                await wm.execute_task(
                    {"type": "crypto:hash_password", "data": {"password": "x", "n": 2}}
                )
            cost = time_hash(scrypt)
            group.start_soon(probe.run)
            if announce is not None:
                announce({"token": token, "hash_seconds": cost})
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    def mode_of(request: Request) -> tuple[str, dict[str, Any] | None]:
        name = request.path_params["mode"]
        if name not in modes:
            raise LookupError(name)
        return name, modes[name]

    async def cheap(request: Request) -> Response:
        try:
            name, mode = mode_of(request)
        except LookupError:
            return JSONResponse({"error": "no such mode"}, status_code=404)
        presented = request.headers.get("authorization", "").removeprefix("Bearer ")
        if mode is not None and mode.get("cheap") == "offload":
            result = await managers[name].execute_task(
                {
                    "type": "jwt:verify",
                    "data": {"token": presented, "key": key, "algorithms": ["HS256"]},
                }
            )
            ok = bool(result["valid"])
        else:
            ok = check(presented)
        if not ok:
            return JSONResponse({"error": "bad token"}, status_code=401)
        return JSONResponse({"user": "demo-user"})

    async def heavy(request: Request) -> Response:
        try:
            name, mode = mode_of(request)
        except LookupError:
            return JSONResponse({"error": "no such mode"}, status_code=404)
        body = await request.json()
        if mode is None:
            stored = hash_password(body["password"], **scrypt)  # type: ignore[arg-type]
        else:
            stored = await managers[name].execute_task(
                {
                    "type": "crypto:hash_password",
                    "data": {"password": body["password"], **scrypt},
                    "timeout": mode.get("heavy_timeout"),
                }
            )
        return JSONResponse({"ok": stored.startswith("$scrypt$")})

    async def stats(request: Request) -> Response:
        lag = probe.take()
        return JSONResponse(
            {
                "lag_p99_ms": percentile(lag, 0.99) * 1000,
                "lag_samples": len(lag),
                "managers": {name: _stats(wm) for name, wm in managers.items()},
            }
        )

    return Starlette(
        routes=[
            Route("/cheap/{mode}", cheap),
            Route("/heavy/{mode}", heavy, methods=["POST"]),
            Route("/_demo/stats", stats),
        ],
        lifespan=lifespan,
        exception_handlers={OffloadError: handle_offload_error},
    )


def serve(spec: dict[str, Any], *, watch_stdin: bool = False) -> None:
    """Run the app for ``spec`` on a free 127.0.0.1 port; print ``READY {json}`` once up.

    With ``watch_stdin``, the end of stdin (the parent is gone, even killed) stops the
    server as SIGTERM would: no orphan server, no orphan workers.
    """
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]

    def announce(details: dict[str, Any]) -> None:
        print("READY " + json.dumps({"port": port, **details}), flush=True)

    app = build_app(spec, announce)
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", access_log=False, ws="none", backlog=2048
    )
    server = uvicorn.Server(config)
    if watch_stdin:

        def watch() -> None:
            stdin = sys.stdin.fileno()
            while os.read(stdin, 4096):
                pass
            server.should_exit = True  # EOF: the parent closed it or died

        threading.Thread(target=watch, name="offload-demo-stdin", daemon=True).start()
    anyio.run(server.serve, [sock])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload.demo._server")
    parser.add_argument("--spec", required=True, type=json.loads, help="the app's spec (JSON)")
    parser.add_argument("--watch-stdin", action="store_true")
    args = parser.parse_args(argv)
    serve(args.spec, watch_stdin=args.watch_stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
