"""Issue 15: progress events, streamed results, workers that scale with load, per-worker
statistics, on real process and interpreter workers, on asyncio and trio."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import offload
import tasks
from offload import Progress, TaskTimeout, WorkerInfo, WorkerManager

pytestmark = pytest.mark.anyio

KINDS = [
    "process",
    pytest.param(
        "interpreter",
        marks=pytest.mark.skipif(sys.version_info < (3, 13), reason="needs Python 3.13+"),
    ),
]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def until(condition: Any, seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


# -- progress ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_progress_events_reach_a_sync_callback(kind: str) -> None:
    events: list[Progress] = []
    async with WorkerManager(workers=1, kind=kind) as wm:
        result = await wm.run(
            tasks.report_steps, 5, 0.05, task_id="export", on_progress=events.append
        )
    assert result == 5
    assert events, "no progress event arrived"
    assert all(isinstance(e, Progress) for e in events)
    assert events[-1].done == 5 and events[-1].total == 5  # the last one always arrives
    assert events[-1].message == "step 5"
    assert events[-1].fraction == 1.0
    assert all(e.task_id == "export" for e in events)
    assert [e.done for e in events] == sorted(e.done for e in events)  # in order
    assert all(e.elapsed >= 0 for e in events)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_async_callback_is_awaited_in_order(kind: str) -> None:
    seen: list[float] = []

    async def slow_callback(event: Progress) -> None:
        await anyio.sleep(0.01)
        seen.append(event.done)

    async with WorkerManager(workers=1, kind=kind) as wm:
        task = offload.Task(tasks.report_steps, args=(4, 0.05))
        assert await wm.execute_task(task, on_progress=slow_callback) == 4
    assert seen == sorted(seen) and seen[-1] == 4  # delivered before the call returned


async def test_a_tight_loop_cannot_flood_the_pipe() -> None:
    events: list[Progress] = []
    async with WorkerManager(workers=1) as wm:
        started = time.perf_counter()
        assert await wm.run(tasks.report_steps, 20_000, 0.0, on_progress=events.append) == 20_000
        took = time.perf_counter() - started
    # at most one event per 20 ms (and the last): far fewer than the 20,000 reports
    assert len(events) <= took / 0.02 + 3
    assert events[-1].done == 20_000


async def test_progress_outside_a_worker_does_nothing() -> None:
    offload.report_progress(1, 2, "ignored")  # no task runs here: nothing happens
    with pytest.raises(TypeError):  # inside a task, bad values are the task's error
        async with WorkerManager(workers=1) as wm:
            await wm.run(offload.report_progress, "one")


async def test_dict_tasks_take_on_progress_too() -> None:
    events: list[Progress] = []
    async with WorkerManager(workers=1) as wm:
        spec = {"id": "p1", "type": "test:steps", "data": {"steps": 3, "pause": 0.03}}
        assert await wm.execute_task(spec, on_progress=events.append) == 3
    assert events and events[-1].done == 3 and events[-1].task_id == "p1"


# -- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_yields_every_item_in_order(kind: str) -> None:
    async with WorkerManager(workers=1, kind=kind) as wm:
        async with wm.stream(tasks.numbers, 100) as items:
            got = [item async for item in items]
        assert got == list(range(100))
        assert await wm.run(tasks.add, 1, 1) == 2  # the worker is free again


@pytest.mark.parametrize("kind", KINDS)
async def test_leaving_early_runs_the_generators_finally(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with WorkerManager(workers=1, kind=kind) as wm:
        async with wm.stream(tasks.numbers, 10**9, str(marker), buffer=4) as items:
            async for item in items:
                if item == 10:
                    break
        assert marker.read_text() == "closed\n"  # GeneratorExit ran its finally, once
        assert await wm.run(tasks.add, 2, 2) == 4
        assert wm.stats().worker_restarts == 0  # closed, not killed


async def test_a_cancelled_consumer_closes_the_stream(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    async with WorkerManager(workers=1) as wm:
        with anyio.move_on_after(0.3):
            async with wm.stream(tasks.numbers, 10**9, str(marker), buffer=2) as items:
                async for _ in items:
                    await anyio.sleep(0.01)
        assert marker.read_text() == "closed\n"


@pytest.mark.parametrize("buffer", [1, 3, 16])
async def test_the_worker_pauses_once_buffer_items_wait(tmp_path: Path, buffer: int) -> None:
    progress = tmp_path / "produced"
    async with WorkerManager(workers=1) as wm:
        async with wm.stream(tasks.produced_count, str(progress), 1000, buffer=buffer) as items:
            first = await items.__anext__()
            assert first == 0
            await anyio.sleep(0.5)  # the consumer stalls: the producer must stop soon
            produced = int(progress.read_text())
            # consumed 1, at most `buffer` waiting here, one being made in the worker
            assert produced <= 1 + buffer + 1, produced
            rest = [item async for item in items]
        assert rest == list(range(1, 1000))


async def test_an_exception_comes_after_the_items_before_it() -> None:
    async with WorkerManager(workers=1) as wm:
        got = []
        with pytest.raises(ValueError, match="after its items"):
            async with wm.stream(tasks.numbers_then_fail, 5) as items:
                async for item in items:
                    got.append(item)
        assert got == [0, 1, 2, 3, 4]


async def test_the_deadline_covers_the_whole_stream() -> None:
    async with WorkerManager(workers=1) as wm:
        got = 0
        with pytest.raises(TaskTimeout):
            async with wm.stream(tasks.numbers, 10**9, timeout=0.5, buffer=1) as items:
                async for _ in items:
                    got += 1
                    await anyio.sleep(0.05)
        assert 0 < got < 50


async def test_big_items_come_through(tmp_path: Path) -> None:
    async with WorkerManager(workers=1) as wm, wm.stream(tasks.big_chunks, 4, 3 << 20) as items:
        sizes = [len(item) async for item in items]
    assert sizes == [3 << 20] * 4


# -- scaling -------------------------------------------------------------------------------


async def test_an_idle_pool_shrinks_and_grows_back_under_load() -> None:
    async with WorkerManager(min_workers=1, max_workers=3, idle_timeout=0.3, spare_workers=0) as wm:
        assert wm.stats().workers == 1
        assert (wm.stats().min_workers, wm.stats().max_workers) == (1, 3)
        # Load: three calls at once that meet only when all three run (a rendezvous), so
        # the pool must grow to three workers and lose none of them.
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def one(i: int) -> None:
                results.append(await wm.run(tasks.add, i, 0))
                await wm.run(tasks.spin, 0.3)

            for i in range(12):
                tg.start_soon(one, i)
        assert sorted(results) == list(range(12))
        assert wm.stats().workers_started >= 2  # it grew
        await until(lambda: wm.stats().workers == 1, 10)  # idle: back to min_workers
        assert wm.stats().workers_retired >= 1
        assert wm.stats().crashed == 0
        assert await wm.run(tasks.add, 1, 1) == 2


def test_scaling_options_are_checked() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        WorkerManager(min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="not both"):
        WorkerManager(workers=2, max_workers=3)
    with pytest.raises(ValueError, match="idle_timeout"):
        WorkerManager(workers=2, idle_timeout=5)


# -- per-worker statistics -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_worker_statistics_describe_each_worker(kind: str) -> None:
    async with WorkerManager(workers=2, kind=kind) as wm:
        assert await wm.run(tasks.add, 1, 1) == 2
        with pytest.raises(ValueError):
            await wm.run(tasks.boom)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: wm.run(tasks.spin, 0.5, task_id="long-one"))
            await until(lambda: any(w.state == "busy" for w in wm.worker_statistics()))
            infos = wm.worker_statistics()
            busy = [w for w in infos if w.state == "busy"]
            assert len(busy) == 1
            await until(
                lambda: (
                    wm.worker_statistics()[0].current_task_id is not None
                    or wm.worker_statistics()[1].current_task_id is not None
                )
            )
            infos = wm.worker_statistics()
            current = [w for w in infos if w.current_task_id is not None]
            assert current[0].current_task_id == "long-one"
            assert current[0].current_task_name == "spin"
            assert current[0].current_task_seconds >= 0
    assert all(isinstance(w, WorkerInfo) for w in infos)
    assert sum(w.tasks_done for w in infos) >= 2
    assert sum(w.failures for w in infos) >= 1
    assert all(w.kind == kind for w in infos)
    assert all((w.pid is not None) == (kind == "process") for w in infos)
    assert all((w.rss is not None and w.rss > 0) == (kind == "process") for w in infos)
    assert all(w.started_at <= w.last_active <= time.time() + 1 for w in infos)
