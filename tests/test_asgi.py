"""offload.asgi on real servers: lifespan, current_manager(), errors as HTTP, trio, uvloop.

Every test that should work on both event loops runs on both (``anyio_backend``): on asyncio
the app is served by uvicorn, on trio by hypercorn's trio worker (tests/asgi_serving.py).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import psutil
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import offload
import tasks
from asgi_serving import serving
from conftest import release
from offload import ManagerClosed, OffloadError, WorkerManager
from offload._context import NoCurrentManager, current_manager, use_manager
from offload._runtime import current_runtime
from offload.asgi import (
    STATUS_BY_CODE,
    OffloadMiddleware,
    get_manager,
    handle_offload_error,
    lifespan,
)

pytestmark = pytest.mark.anyio

SECRET = "sk_live_9f8e7d6c5b4a-hunter2"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def loop_name() -> str:
    """The running loop: ``"trio"``, or the module of the asyncio loop's class."""
    if current_runtime().name == "trio":
        return "trio"
    return type(asyncio.get_running_loop()).__module__


def info_app(**options: Any) -> Starlette:
    """An app whose /info reports what a handler sees of the manager."""

    def deep() -> WorkerManager:  # "deep code": no request in sight
        return current_manager()

    async def info(request: Request) -> JSONResponse:
        wm = request.state.workers
        try:
            same = deep() is wm
        except NoCurrentManager as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        pid = await deep().run(tasks.pid)
        return JSONResponse(
            {
                "same": same,
                "pid": pid,
                "pids": wm.worker_pids(),
                "ready": wm.stats().workers,
                "greeting": getattr(request.state, "greeting", None),
                "loop": loop_name(),
            }
        )

    return Starlette(routes=[Route("/info", info)], **options)


# -- lifespan -------------------------------------------------------------------------------


async def test_lifespan_on_a_server_state_and_current_manager(anyio_backend: str) -> None:
    app = info_app(lifespan=lifespan(workers=2, shutdown_grace=5))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = (await client.get("/info")).json()
        assert body["loop"] == ("trio" if anyio_backend == "trio" else "asyncio.unix_events")
        assert body["same"] is True  # current_manager() in a request task is request.state.workers
        assert body["ready"] == 2  # startup waited for both workers
        assert body["pid"] in body["pids"]
        pids = body["pids"]
        assert all(psutil.pid_exists(pid) for pid in pids)
    assert not any(psutil.pid_exists(pid) for pid in pids)  # stopped with the server


async def test_lifespan_composes_with_the_apps_lifespan() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        wm = current_manager()  # the manager is up before the app's startup
        events.append(f"app startup {await wm.run(tasks.add, 1, 1)}")
        yield {"greeting": "hello"}
        events.append(f"app shutdown {await wm.run(tasks.add, 2, 2)}")  # still up

    app = info_app(lifespan=lifespan(app_lifespan, workers=1, shutdown_grace=5))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = (await client.get("/info")).json()
        assert body["greeting"] == "hello"
        assert body["same"] is True
    assert events == ["app startup 2", "app shutdown 4"]


async def test_lifespan_with_an_app_lifespan_yielding_nothing() -> None:
    @asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[None]:
        yield

    async with lifespan(app_lifespan=app_lifespan, workers=1)(object()) as state:
        assert list(state) == ["workers"]
        assert await state["workers"].run(tasks.add, 1, 2) == 3


async def test_lifespan_refuses_a_clashing_state_key() -> None:
    @asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, Any]]:
        yield {"workers": "mine"}

    with pytest.raises(RuntimeError, match="already has 'workers'"):
        async with lifespan(app_lifespan, workers=1)(object()):
            pass


def test_lifespan_checks_options_when_created() -> None:
    with pytest.raises(ValueError, match="workers"):
        lifespan(workers=0)
    with pytest.raises(TypeError):
        lifespan(worker=2)


class AppLifetime:
    """Runs a lifespan in a task of its own, as a server does; ``stop()`` begins the shutdown.

    ``await tg.start(lifetime.run)`` returns the manager once the startup is done.
    """

    def __init__(self, make: Callable[[object], Any]) -> None:
        self._make = make
        self._stop = anyio.Event()
        self.done = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[WorkerManager]) -> None:
        try:
            async with self._make(object()) as state:
                task_status.started(state["workers"])
                await self._stop.wait()
        finally:
            self.done.set()

    def stop(self) -> None:
        self._stop.set()


async def test_lifespan_shutdown_drains_within_grace(fifo: Path) -> None:
    outcome: list[str] = []
    lifetime = AppLifetime(lifespan(workers=1, shutdown_grace=10))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            wm = await tg.start(lifetime.run)

            async def running() -> None:
                outcome.append(await wm.run(tasks.wait_for_fifo, str(fifo)))

            tg.start_soon(running)
            await anyio.wait_all_tasks_blocked()  # sent to the worker, which waits on the FIFO
            lifetime.stop()
            await anyio.wait_all_tasks_blocked()  # the lifespan's shutdown waits for the task
            assert wm.closed  # draining: takes no more work, waits for the running task
            assert not lifetime.done.is_set()
            with pytest.raises(ManagerClosed):
                await wm.run(tasks.add, 1, 1)
            await anyio.to_thread.run_sync(release, fifo)
    assert outcome == ["go"]
    assert lifetime.done.is_set()
    assert wm.worker_pids() == []


async def test_lifespan_shutdown_grace_passes_through(fifo: Path) -> None:
    errors: list[BaseException] = []
    lifetime = AppLifetime(lifespan(workers=1, shutdown_grace=0.2))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            wm = await tg.start(lifetime.run)

            async def running() -> None:
                try:
                    await wm.run(tasks.wait_for_fifo, str(fifo))
                except ManagerClosed as exc:
                    errors.append(exc)

            tg.start_soon(running)
            await anyio.wait_all_tasks_blocked()
            lifetime.stop()  # the task never finishes: it is stopped after 0.2 s
    assert len(errors) == 1
    assert lifetime.done.is_set()


async def test_each_start_gets_a_fresh_manager() -> None:
    make = lifespan(workers=1)
    async with make(object()) as first:
        pass
    async with make(object()) as second:
        assert second["workers"] is not first["workers"]
        assert await second["workers"].run(tasks.add, 2, 3) == 5


def starlette_test_client() -> Any:
    """Starlette's TestClient (it warns when used with httpx rather than httpx2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_starlette_test_client_runs_the_lifespan(backend: str) -> None:
    app = info_app(lifespan=lifespan(workers=1, shutdown_grace=5))
    with starlette_test_client()(app, backend=backend) as client:
        body = client.get("/info").json()
    assert body["same"] is True
    assert body["loop"] == ("trio" if backend == "trio" else "asyncio.unix_events")
    assert not any(psutil.pid_exists(pid) for pid in body["pids"])


# -- current_manager ------------------------------------------------------------------------


def test_current_manager_is_exported() -> None:
    if not hasattr(offload, "current_manager"):
        pytest.skip("offload/__init__.py does not export current_manager yet")
    assert offload.current_manager is current_manager


def test_current_manager_without_one_says_what_to_do() -> None:
    with pytest.raises(LookupError, match=r"offload\.asgi\.lifespan"):
        current_manager()
    with pytest.raises(RuntimeError, match="use_manager"):
        current_manager()


async def test_use_manager_sets_and_restores(anyio_backend: str) -> None:
    async with WorkerManager(workers=1) as wm:
        with use_manager(wm):
            assert current_manager() is wm
            seen: list[WorkerManager] = []

            async def other_task() -> None:
                seen.append(await anyio.to_thread.run_sync(current_manager))

            async with anyio.create_task_group() as tg:
                tg.start_soon(other_task)
            assert seen == [wm]  # the context is copied into threads and tasks
        with pytest.raises(NoCurrentManager):
            current_manager()


async def test_two_apps_on_one_loop_need_the_middleware() -> None:
    plain = [info_app(lifespan=lifespan(workers=1)) for _ in range(2)]
    async with serving(plain[0]) as url1, serving(plain[1]) as url2, httpx.AsyncClient() as client:
        await client.get(f"{url2}/info", timeout=10)  # both lifespans have started now
        response = await client.get(f"{url1}/info", timeout=10)
        assert response.status_code == 500
        assert "OffloadMiddleware" in response.json()["error"]

    middleware = [Middleware(OffloadMiddleware)]
    apps = [info_app(lifespan=lifespan(workers=1), middleware=middleware) for _ in range(2)]
    async with serving(apps[0]) as url1, serving(apps[1]) as url2, httpx.AsyncClient() as client:
        first = (await client.get(f"{url1}/info", timeout=10)).json()
        second = (await client.get(f"{url2}/info", timeout=10)).json()
    assert first["same"] is True
    assert second["same"] is True
    assert not set(first["pids"]) & set(second["pids"])


# -- errors as HTTP responses ---------------------------------------------------------------


def raising_app() -> Starlette:
    errors: dict[str, Callable[[str], Exception]] = {cls.code: cls for cls in _every_error()}
    errors["OFFLOAD_ERROR"] = OffloadError

    async def fail(request: Request) -> JSONResponse:
        code = request.path_params["code"]
        if code == "PLAIN":
            raise RuntimeError(f"database password is {SECRET}")
        raise errors[code](f"the key {SECRET} was rejected")

    return Starlette(
        routes=[Route("/fail/{code}", fail)],
        exception_handlers={OffloadError: handle_offload_error},
    )


def _every_error() -> list[type[OffloadError]]:
    import offload.jobs  # noqa: F401  (its store errors are OffloadErrors too)

    found, todo = [], list(OffloadError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


EXPECTED = {
    "STORE_ERROR": 500,
    "STORE_LOCKED": 503,
    "STORE_UNAVAILABLE": 503,
    "STORE_FULL": 507,
    "STORE_CORRUPT": 500,
    "SCHEMA_TOO_NEW": 500,
    "JOB_NOT_FOUND": 404,
    "LEASE_EXPIRED": 500,
    "QUEUE_FULL": 503,
    "WOULD_TIME_OUT": 503,
    "SHUTDOWN": 503,
    "NOT_STARTED": 500,  # a programming error, not a busy server
    "NO_CURRENT_MANAGER": 500,
    "MAIN_GUARD_MISSING": 500,
    "POISON_TASK": 500,
    "TIMEOUT": 504,
    "INVALID_TASK": 400,
    "UNKNOWN_TASK": 400,
    "INVALID_INPUT": 400,
    "DECRYPT_FAILED": 400,
    "PAYLOAD_TOO_LARGE": 413,
    "OUTPUT_TOO_LARGE": 413,
    "WORKER_ERROR": 500,
    "WORKER_CRASHED": 500,
    "NOT_SERIALIZABLE": 500,
    "UNSUPPORTED_KIND": 500,
    "WORKER_START_FAILED": 500,
    "OFFLOAD_ERROR": 500,
}


async def test_every_error_code_maps_to_a_status_without_leaking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    codes = {cls.code for cls in _every_error()} | {"OFFLOAD_ERROR"}
    assert codes == set(EXPECTED)  # a new code needs a decision here
    transport = httpx.ASGITransport(app=raising_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for code, status in EXPECTED.items():
            response = await client.get(f"/fail/{code}")
            assert response.status_code == status, code
            body = response.json()
            assert set(body) == {"error"}
            assert set(body["error"]) == {"code", "message"}
            assert body["error"]["code"] == code
            assert body["error"]["message"]
            assert SECRET not in response.text
            assert "sk_live" not in response.text
            assert "hunter2" not in response.text
            assert SECRET not in str(response.headers)
            if status == 503:
                assert response.headers["Retry-After"] == "1"
            else:
                assert "Retry-After" not in response.headers
    # 500s are logged on the server, with the detail that the client never sees.
    logged = [r for r in caplog.records if r.name == "offload.asgi"]
    assert len(logged) == sum(1 for status in EXPECTED.values() if status in (500, 507))
    assert all(r.levelno == logging.ERROR and r.exc_info for r in logged)
    assert STATUS_BY_CODE["QUEUE_FULL"] == 503


async def test_other_exceptions_are_not_handled_here() -> None:
    transport = httpx.ASGITransport(app=raising_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/fail/PLAIN")
    assert response.status_code == 500
    assert SECRET not in response.text


async def test_the_handler_on_a_non_offload_error_is_generic() -> None:
    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": []})
    response = await handle_offload_error(request, KeyError(SECRET))
    assert response.status_code == 500
    assert SECRET.encode() not in response.body
    assert b'"INTERNAL_ERROR"' in response.body


# -- other event loops ----------------------------------------------------------------------


def test_uvicorn_and_manager_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> dict[str, Any]:
        app = info_app(lifespan=lifespan(workers=1, shutdown_grace=5))
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            return (await client.get("/info")).json()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        body = runner.run(main())
    assert body["loop"].startswith("uvloop")
    assert body["same"] is True
    assert body["pid"] in body["pids"]


def test_import_offload_does_not_import_starlette() -> None:
    code = (
        "import sys, offload, offload.tasks, offload.builtins, offload.pytest_plugin\n"
        "web = {'starlette', 'uvicorn', 'httpx', 'fastapi', 'rich'}\n"
        "bad = sorted(m for m in sys.modules if m.partition('.')[0] in web)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_fastapi_app() -> None:
    pytest.importorskip("fastapi")
    from fastapi import Depends, FastAPI

    app = FastAPI(lifespan=lifespan(workers=1, shutdown_grace=5))
    app.add_exception_handler(OffloadError, handle_offload_error)

    @app.get("/add")
    async def add(wm: WorkerManager = Depends(get_manager)) -> dict[str, Any]:  # noqa: B008
        return {"sum": await wm.run(tasks.add, 2, 3), "same": current_manager() is wm}

    @app.get("/bad")
    async def bad() -> None:
        await current_manager().execute_task({"type": "no:such-task", "data": SECRET})

    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.get("/add")).json() == {"sum": 5, "same": True}
        response = await client.get("/bad")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "UNKNOWN_TASK"
    assert SECRET not in response.text


def test_without_starlette_offload_asgi_says_what_to_install() -> None:
    code = "import sys\nsys.modules['starlette'] = None\nimport offload.asgi\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "pip install '.[web]'" in result.stderr.strip().splitlines()[-1]


def test_manager_features_under_uvloop() -> None:
    """The transport's add_reader (pipes, pidfds) on uvloop: results, deadlines, crashes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with WorkerManager(workers=1, shutdown_grace=5) as wm:
            assert await wm.run(tasks.add, 2, 3) == 5
            (first,) = wm.worker_pids()
            with pytest.raises(offload.TaskTimeout):
                await wm.run(tasks.block_in_c, 5.0, timeout=0.2)  # the worker is killed
            assert await wm.run(tasks.add, 1, 1) == 2  # on its replacement
            assert first not in wm.worker_pids()
            with pytest.raises(offload.WorkerCrashed):
                await wm.run(tasks.exit_now)
            results = await asyncio.gather(*(wm.run(tasks.add, i, i) for i in range(20)))
            assert results == [2 * i for i in range(20)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
