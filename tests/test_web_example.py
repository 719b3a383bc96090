"""examples/web_app.py on a real uvicorn server, driven with httpx."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psutil
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse

import tasks
from conftest import release

pytest.importorskip("jwt")
zstandard = pytest.importorskip("zstandard")

EXAMPLE = Path(__file__).parent.parent / "examples" / "web_app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("offload_example_web_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


web_app = load_example()


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``app`` with uvicorn in this loop on a free port; a client for it.

    The socket listens before uvicorn starts: early requests wait in the backlog until the
    lifespan (and so the workers) are up.
    """
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", ws="none", http="h11"
    )
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            yield client
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await serve
        sock.close()


def add_blocking_route(app: Any, fifo: Path, entered: asyncio.Queue[Any]) -> None:
    """``/test/block``: a task that waits on ``fifo``; ``entered`` hears of each submission."""

    async def block(request: Request) -> JSONResponse:
        wm = request.state.workers
        timeout = request.query_params.get("timeout")
        # Submitted before this handler first yields: whoever wakes on `entered` sees it queued.
        entered.put_nowait(wm)
        result = await wm.run(
            tasks.wait_for_fifo, str(fifo), timeout=float(timeout) if timeout else None
        )
        return JSONResponse(result)

    app.add_route("/test/block", block)


@pytest.mark.asyncio
async def test_endpoints_give_correct_results() -> None:
    app = web_app.create_app(workers=1, jwt_secret="test-secret-0123456789abcdef-0123456789")
    async with serving(app) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "workers": 1, "queued": 0}

        stored = (await client.post("/password/hash", json={"password": "hunter2"})).json()["hash"]
        assert stored.startswith("$scrypt$")
        good = await client.post("/password/verify", json={"password": "hunter2", "hash": stored})
        bad = await client.post("/password/verify", json={"password": "hunter3", "hash": stored})
        assert good.json() == {"valid": True}
        assert bad.json() == {"valid": False}

        token = (await client.post("/token", json={"sub": "alice"})).json()["token"]
        verified = (await client.post("/token/verify", json={"token": token})).json()
        assert verified["valid"] is True
        assert verified["claims"]["sub"] == "alice"
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        rejected = (await client.post("/token/verify", json={"token": forged})).json()
        assert rejected["valid"] is False
        assert rejected["reason"]

        payload = b"offload " * 10_000
        packed = await client.post("/compress?codec=zstd", content=payload)
        assert packed.headers["content-type"] == "application/zstd"
        assert zstandard.ZstdDecompressor().decompress(packed.content) == payload
        packed = await client.post("/compress?codec=gzip", content=payload)
        assert gzip.decompress(packed.content) == payload
        assert len(packed.content) < len(payload) // 10


@pytest.mark.asyncio
async def test_bad_requests_are_400_without_echoing_input() -> None:
    app = web_app.create_app(workers=1)
    async with serving(app) as client:
        response = await client.post("/password/hash", content=b"not json")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "BAD_REQUEST"
        response = await client.post("/compress?codec=lz4", content=b"x")
        assert response.status_code == 400
        # Input the task itself rejects: a malformed stored hash (INVALID_INPUT).
        secret = "hunter2-do-not-echo"
        response = await client.post(
            "/password/verify", json={"password": secret, "hash": f"$scrypt${secret}"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "INVALID_INPUT"
        assert secret not in response.text


@pytest.mark.asyncio
async def test_full_queue_is_503_with_retry_after(fifo: Path) -> None:
    app = web_app.create_app(workers=1, max_queue=0)
    entered: asyncio.Queue[Any] = asyncio.Queue()
    add_blocking_route(app, fifo, entered)
    async with serving(app) as client:
        first = asyncio.create_task(client.get("/test/block"))
        wm = await asyncio.wait_for(entered.get(), 30)  # running on the only worker
        second = await client.get("/test/block")  # no room: nothing waits on a busy worker
        assert second.status_code == 503
        response = await client.post("/password/hash", json={"password": "hunter2"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "QUEUE_FULL"
        assert "hunter2" not in response.text
        assert wm.stats().rejected == 2
        await asyncio.to_thread(release, fifo)
        assert (await first).json() == "go"
        assert (await client.get("/health")).status_code == 200


@pytest.mark.asyncio
async def test_missed_deadline_is_504(fifo: Path) -> None:
    app = web_app.create_app(workers=1)
    entered: asyncio.Queue[Any] = asyncio.Queue()
    add_blocking_route(app, fifo, entered)
    async with serving(app) as client:
        response = await client.get("/test/block", params={"timeout": "0.2"})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "TIMEOUT"
        wm = entered.get_nowait()
        assert wm.stats().timed_out == 1
        health = await client.get("/health")  # the stopped worker was replaced
        assert health.status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def script_server(
    timeout: float,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, httpx.AsyncClient]]:
    """``python examples/web_app.py`` on a free port, up and answering; never left running."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, str(EXAMPLE), "--port", str(port), "--workers", "1"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=timeout
        ) as client:
            async with asyncio.timeout(30):  # bounded wait for the server to come up
                while True:
                    try:
                        await client.get("/health")
                        break
                    except httpx.ConnectError:
                        assert process.returncode is None
                        await asyncio.sleep(0.05)
            yield process, client
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop(process: asyncio.subprocess.Process, sig: int) -> bytes:
    """Send ``sig`` and wait (bounded) for the server to exit; its stderr."""
    process.send_signal(sig)
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    return err


@pytest.mark.asyncio
async def test_the_script_serves_and_stops_cleanly() -> None:
    async with script_server(timeout=5) as (process, client):
        health = await client.get("/health")
        assert health.json()["workers"] == 1
        hashed = await client.post("/password/hash", json={"password": "x"})
        assert hashed.status_code == 200
        workers = psutil.Process(process.pid).children()
        assert workers
        err = await stop(process, signal.SIGINT)
    assert b"Application shutdown complete" in err
    assert not any(w.is_running() for w in workers)


@pytest.mark.asyncio
async def test_sigterm_drains_requests_in_flight() -> None:
    """SIGTERM to the server: requests already taken finish (200), then workers stop."""
    async with script_server(timeout=30) as (process, client):
        workers = psutil.Process(process.pid).children()
        hashes = [
            asyncio.create_task(client.post("/password/hash", json={"password": f"p{i}"}))
            for i in range(3)
        ]
        # One worker: one hash runs, one waits behind it, one waits in the queue.
        async with asyncio.timeout(30):
            while (await client.get("/health")).json()["queued"] < 1:
                await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*hashes)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(r.json()["hash"].startswith("$scrypt$") for r in responses)
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    # uvicorn re-raises the signal once it has shut down cleanly
    assert process.returncode in (0, -signal.SIGTERM), err.decode()[-2000:]
    assert b"Application shutdown complete" in err
    assert not any(w.is_running() for w in workers)
