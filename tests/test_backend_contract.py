"""The backend contract, run against every worker kind through a real manager.

Every backend (the local pool with process or interpreter workers, Dask) promises the
dispatcher the same things: a result comes back as itself; a task's exception comes back as
itself; a ticket stopped before it starts never runs; a running one stopped by its deadline is
reported stopped on time; capacity reappears after every outcome; shutdown leaves nothing.
Dask's kind keeps the same promises against a module-wide LocalCluster in ``test_dask.py``
(a cluster's spawned processes do not mix well with subinterpreters in one test process).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import tasks
from conftest import release
from offload import TaskTimeout, WorkerManager

pytestmark = pytest.mark.anyio


KINDS: list[Any] = [
    "process",
    pytest.param(
        "interpreter",
        marks=pytest.mark.skipif(sys.version_info < (3, 13), reason="needs Python 3.13+"),
    ),
]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def manager(kind: str, **options: Any) -> WorkerManager:
    options.setdefault("workers", 1)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(kind=kind, **options)


async def test_results_and_exceptions_come_back_as_themselves(kind: str) -> None:
    async with manager(kind) as wm:
        assert await wm.run(tasks.add, 20, 22) == 42
        with pytest.raises(ValueError, match="bad thing"):
            await wm.run(tasks.boom)
        assert await wm.run(tasks.echo, {"k": [1, 2.5, None]}) == {"k": [1, 2.5, None]}


async def test_a_stopped_task_that_had_not_started_never_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with manager(kind) as wm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: wm.run(tasks.spin, 1.0))  # holds the only worker
            with anyio.fail_after(10):
                while wm.stats().running == 0:
                    await anyio.sleep(0.01)
            with pytest.raises(TaskTimeout):
                await wm.run(tasks.sleep_then_mark, 0.0, str(marker), timeout=0.2)
        assert await wm.run(tasks.add, 1, 1) == 2
    assert not marker.exists()


async def test_a_deadline_stops_running_pure_python_work_on_time(kind: str) -> None:
    async with manager(kind) as wm:
        await wm.run(tasks.add, 0, 0)
        started = time.perf_counter()
        with pytest.raises(TaskTimeout, match="running"):
            await wm.run(tasks.spin, 20.0, timeout=0.3)
        assert time.perf_counter() - started < 5.0  # far short of the 20 s of work
        assert await wm.run(tasks.add, 2, 2) == 4  # capacity is back


async def test_capacity_returns_after_every_outcome(kind: str) -> None:
    async with manager(kind, workers=2) as wm:
        for _ in range(3):
            with pytest.raises(ValueError):
                await wm.run(tasks.boom)
            with pytest.raises(TaskTimeout):
                await wm.run(tasks.spin, 5.0, timeout=0.1)
        results = []
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(lambda i=i: _append(results, wm.run(tasks.add, i, 0)))
        assert sorted(results) == list(range(20))


async def _append(results: list[Any], call: Any) -> None:
    results.append(await call)


async def test_statistics_add_up(kind: str) -> None:
    async with manager(kind) as wm:
        for i in range(5):
            await wm.run(tasks.add, i, 1)
        with pytest.raises(ValueError):
            await wm.run(tasks.boom)
        stats = wm.stats()
    assert stats.submitted == stats.finished == 6
    assert (stats.completed, stats.failed) == (5, 1)
    assert stats.kind == kind


async def test_a_deadline_while_the_call_loads_means_it_never_begins(
    kind: str, tmp_path: Path, fifo: Path
) -> None:
    marker = tmp_path / "ran"
    async with manager(kind) as wm:
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.mark, str(marker), tasks.SlowToLoad(str(fifo)), timeout=0.2)
        if kind == "interpreter":  # still loading (a process worker was killed instead)
            await anyio.to_thread.run_sync(release, fifo)
        assert await wm.run(tasks.add, 1, 1) == 2
    assert not marker.exists()
