"""examples/web_app.py on real servers, driven with httpx: uvicorn on asyncio, and hypercorn's
trio worker on trio (in this process, and as the ``hypercorn --worker-class trio`` command)."""

from __future__ import annotations

import gzip
import importlib.util
import math
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import httpx
import psutil
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from starlette.requests import Request
from starlette.responses import JSONResponse

import asgi_serving
import tasks
from conftest import release

pytest.importorskip("jwt")
zstandard = pytest.importorskip("zstandard")

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).parent.parent / "examples" / "web_app.py"
WORKER_MARK = "offload._offload_worker.boot"  # in every process worker's command line


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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
    """Serve ``app`` in this loop (uvicorn on asyncio, hypercorn on trio); a client for it."""
    async with (
        asgi_serving.serving(app) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as client,
    ):
        yield client


def add_blocking_route(app: Any, fifo: Path, entered: MemoryObjectSendStream[Any]) -> None:
    """``/test/block``: a task that waits on ``fifo``; ``entered`` hears of each submission."""

    async def block(request: Request) -> JSONResponse:
        wm = request.state.workers
        timeout = request.query_params.get("timeout")
        # Submitted before this handler first yields: whoever wakes on `entered` sees it queued.
        entered.send_nowait(wm)
        result = await wm.run(
            tasks.wait_for_fifo, str(fifo), timeout=float(timeout) if timeout else None
        )
        return JSONResponse(result)

    app.add_route("/test/block", block)


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

        workers = (await client.get("/workers")).json()
        assert workers["stats"]["completed"] >= 6
        serving_workers = [w for w in workers["workers"] if not w["spare"]]
        assert [w["state"] for w in serving_workers] == ["idle"]
        assert serving_workers[0]["tasks_done"] >= 6
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "offload_tasks_finished_total" in metrics.text


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


async def test_full_queue_is_503_with_retry_after(fifo: Path) -> None:
    app = web_app.create_app(workers=1, max_queue=0)
    entered, submitted = anyio.create_memory_object_stream[Any](math.inf)
    add_blocking_route(app, fifo, entered)
    first: list[httpx.Response] = []
    with entered, submitted:
        await full_queue(app, fifo, submitted, first)
    assert first[0].json() == "go"


async def full_queue(app: Any, fifo: Path, submitted: Any, first: list[httpx.Response]) -> None:
    async with serving(app) as client, anyio.create_task_group() as tg:

        async def get_first() -> None:
            first.append(await client.get("/test/block"))

        tg.start_soon(get_first)
        with anyio.fail_after(30):
            wm = await submitted.receive()  # running on the only worker
        second = await client.get("/test/block")  # no room: nothing waits on a busy worker
        assert second.status_code == 503
        response = await client.post("/password/hash", json={"password": "hunter2"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "QUEUE_FULL"
        assert "hunter2" not in response.text
        assert wm.stats().rejected == 2
        await anyio.to_thread.run_sync(release, fifo)


async def test_missed_deadline_is_504(fifo: Path) -> None:
    app = web_app.create_app(workers=1)
    entered, submitted = anyio.create_memory_object_stream[Any](math.inf)
    add_blocking_route(app, fifo, entered)
    with entered, submitted:
        async with serving(app) as client:
            response = await client.get("/test/block", params={"timeout": "0.2"})
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "TIMEOUT"
            wm = submitted.receive_nowait()
            assert wm.stats().timed_out == 1
            health = await client.get("/health")  # the stopped worker was replaced
            assert health.status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVERS = {
    # The example's own entry point: uvicorn on asyncio.
    "uvicorn": lambda port: [sys.executable, str(EXAMPLE), "--port", str(port), "--workers", "1"],
    # What the README says for trio: hypercorn's trio worker on the example's app factory.
    "hypercorn-trio": lambda port: [
        *(sys.executable, "-m", "hypercorn", "--worker-class", "trio"),
        *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "30"),
        f"{EXAMPLE}:create_app(workers=1)",
    ],
}


# Each server driven from a client on the same kind of loop (the client's loop is not what is
# tested here: the server process's is).
SERVED_ON = [("uvicorn", "asyncio"), ("hypercorn-trio", "trio")]


class Server:
    """A server process running the example, and what it wrote to stderr."""

    def __init__(self, process: anyio.abc.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr

    def offload_workers(self) -> list[psutil.Process]:
        """The offload worker processes below the server (hypercorn's come from its worker)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if any(WORKER_MARK in part for part in child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    async def stop(self, sig: int) -> str:
        """Send ``sig`` and wait (bounded) for the server to exit; its stderr."""
        self.process.send_signal(sig)
        with anyio.fail_after(60):
            await self.process.wait()
        return self.stderr.read_text(errors="replace")


@asynccontextmanager
async def script_server(
    kind: str, tmp_path: Path, timeout: float
) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    """The example served by ``kind`` on a free port, up and answering; never left running."""
    port = free_port()
    stderr = tmp_path / f"{kind}.stderr"
    with stderr.open("wb") as err:
        process = await anyio.open_process(
            SERVERS[kind](port), stdin=subprocess.DEVNULL, stdout=err, stderr=err
        )
    server = Server(process, stderr)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=timeout
        ) as client:
            with anyio.fail_after(60):  # bounded wait for the server to come up
                while True:
                    try:
                        await client.get("/health")
                        break
                    except httpx.ConnectError:
                        assert process.returncode is None, stderr.read_text()
                        await anyio.sleep(0.05)
            yield server, client
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()


@pytest.mark.parametrize(("kind", "anyio_backend"), SERVED_ON)
async def test_the_server_serves_and_stops_cleanly(kind: str, tmp_path: Path) -> None:
    async with script_server(kind, tmp_path, timeout=5) as (server, client):
        health = await client.get("/health")
        assert health.json()["workers"] == 1
        hashed = await client.post("/password/hash", json={"password": "x"})
        assert hashed.status_code == 200
        workers = server.offload_workers()
        assert workers
        err = await server.stop(signal.SIGINT)
    assert server.process.returncode == 0, err[-2000:]
    if kind == "uvicorn":
        assert "Application shutdown complete" in err
    assert not any(_running(w) for w in workers)


@pytest.mark.parametrize(("kind", "anyio_backend"), SERVED_ON)
async def test_sigterm_drains_requests_in_flight(kind: str, tmp_path: Path) -> None:
    """SIGTERM to the server: requests already taken finish (200), then workers stop."""
    async with script_server(kind, tmp_path, timeout=30) as (server, client):
        workers = server.offload_workers()
        assert workers
        responses: dict[int, httpx.Response] = {}

        async def hash_password(i: int) -> None:
            responses[i] = await client.post("/password/hash", json={"password": f"p{i}"})

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(hash_password, i)
            # One worker: one hash runs, one waits behind it, one waits in the queue.
            with anyio.fail_after(30):
                while (await client.get("/health")).json()["queued"] < 1:
                    await anyio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
        assert [responses[i].status_code for i in range(3)] == [200, 200, 200]
        assert all(r.json()["hash"].startswith("$scrypt$") for r in responses.values())
        with anyio.fail_after(60):
            await server.process.wait()
        err = server.stderr.read_text(errors="replace")
    # uvicorn re-raises the signal once it has shut down cleanly; hypercorn exits 0
    assert server.process.returncode in (0, -signal.SIGTERM), err[-2000:]
    if kind == "uvicorn":
        assert "Application shutdown complete" in err
    assert not any(_running(w) for w in workers)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_offload_top_shows_the_apps_workers(capsys: pytest.CaptureFixture[str]) -> None:
    from offload._top import run_top

    app = web_app.create_app(workers=1)
    async with serving(app) as client:
        await client.post("/password/hash", json={"password": "x"})
        url = str(client.base_url.join("/workers"))
        status = await anyio.to_thread.run_sync(run_top, url, 1.0, True)
    assert status == 0
    out = capsys.readouterr().out
    assert "process: 1 workers" in out
    assert "completed 1" in out
    assert "idle" in out
