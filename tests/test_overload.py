"""Issue 13 on real workers: tiny tasks inline, sizing by server processes, Retry-After."""

from __future__ import annotations

from typing import Any

import pytest

import offload
import tasks
from offload import TaskRecord, WorkerManager
from offload._config import default_workers

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_tiny_tasks_run_inline_once_measured() -> None:
    records: list[TaskRecord] = []
    async with WorkerManager(workers=1, inline_below=0.001, on_task_done=records.append) as wm:
        for i in range(20):
            assert await wm.run(tasks.add, i, 1) == i + 1
        with pytest.raises(ValueError, match="bad thing"):  # errors are the same
            await wm.run(tasks.boom)
        stats = wm.stats()
    assert stats.inline >= 18  # the first call measured it on a worker
    assert stats.completed == 20 and stats.submitted == 21
    kinds = [r.kind for r in records]
    assert kinds[0] == "process" and kinds.count("inline") >= 18
    assert all(r.outcome == "ok" for r in records if r.name == "add")


async def test_slow_tasks_are_never_inline() -> None:
    async with WorkerManager(workers=1, inline_below=0.001) as wm:
        for _ in range(3):
            await wm.run(tasks.spin, 0.01)
        assert wm.stats().inline == 0


async def test_inline_is_off_by_default_and_per_type() -> None:
    async with WorkerManager(workers=1) as wm:
        for i in range(5):
            await wm.run(tasks.add, i, 1)
        assert wm.stats().inline == 0
        for _ in range(5):
            assert await wm.execute_task({"type": "test:tiny", "data": 3}) == 6
        assert wm.stats().inline >= 3


@pytest.mark.parametrize(
    ("servers", "cpus", "expected"), [(1, 2, 1), (2, 2, 1), (1, 8, 7), (2, 8, 3), (4, 8, 1)]
)
def test_default_workers_share_the_cores_between_server_processes(
    monkeypatch: pytest.MonkeyPatch, servers: int, cpus: int, expected: int
) -> None:
    monkeypatch.setattr("offload._config._cpus", lambda: cpus)
    assert default_workers(servers) == expected
    monkeypatch.setenv("WEB_CONCURRENCY", str(servers))
    assert default_workers() == expected
    assert f"workers={expected} " in repr(WorkerManager())
    assert f"workers={expected} " in repr(WorkerManager(server_processes=servers))


def test_a_bad_web_concurrency_means_one_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "lots")
    assert default_workers() == default_workers(1)


def test_would_time_out_answers_503_with_the_estimate() -> None:
    pytest.importorskip("starlette")
    from offload.asgi import error_response

    response = error_response(offload.WouldTimeOut("busy", retry_after=3.2))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "4"
    assert error_response(offload.QueueFull("x")).headers["Retry-After"] == "1"


@offload.task("test:tiny", inline_below=0.001)
def tiny(data: Any) -> Any:
    return data * 2
