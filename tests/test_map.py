"""Issue 14: ``wm.map`` and several short tasks in flight per worker."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import tasks
from offload import TaskTimeout, WorkerCrashed, WorkerManager

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_map_returns_results_in_order() -> None:
    async with WorkerManager(workers=2) as wm:
        assert [r async for r in wm.map(tasks.square, range(1000))] == [i * i for i in range(1000)]
        assert [r async for r in wm.map(tasks.square, [])] == []
        assert [r async for r in wm.map(tasks.square, [3])] == [9]


@pytest.mark.parametrize("chunksize", [None, 1, 7, 5000])
async def test_map_chunk_sizes(chunksize: int | None) -> None:
    async with WorkerManager(workers=2) as wm:
        got = [r async for r in wm.map(tasks.square, range(300), chunksize=chunksize)]
    assert got == [i * i for i in range(300)]


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize(
    ("items", "chunksize", "max_in_flight"), [(20_000, 100, None), (1_000, 7, 50)]
)
async def test_every_chunk_is_whole_however_results_are_taken(
    ordered: bool, items: int, chunksize: int, max_in_flight: int | None
) -> None:
    # Once: after the first fill, each result handed out freed room for one item, and the map
    # sent one-item chunks from then on (a 100,000-item map ran ~100x slower than it should).
    async with WorkerManager(workers=2) as wm:
        before = wm.stats().submitted
        results = wm.map(
            tasks.square,
            range(items),
            ordered=ordered,
            chunksize=chunksize,
            max_in_flight=max_in_flight,
        )
        got = [r async for r in results]
        chunks = wm.stats().submitted - before
    assert sorted(got) == [i * i for i in range(items)]
    assert chunks == -(-items // chunksize)


async def test_adaptive_chunks_grow_past_the_first_for_short_items() -> None:
    async with WorkerManager(workers=2) as wm:
        before = wm.stats().submitted
        got = [r async for r in wm.map(tasks.square, range(20_000))]
        chunks = wm.stats().submitted - before
    assert got == [i * i for i in range(20_000)]
    assert chunks <= 20_000 // 8 // 4  # far fewer chunks than 8-item ones (items take µs)


async def test_unordered_map_yields_every_result_once() -> None:
    async with WorkerManager(workers=2) as wm:
        got = [r async for r in wm.map(tasks.square, range(500), ordered=False, chunksize=3)]
    assert sorted(got) == [i * i for i in range(500)]


async def test_map_reads_its_iterable_lazily() -> None:
    read = 0

    def endless() -> Iterator[int]:
        nonlocal read
        for i in itertools.count():
            read += 1
            yield i

    async with WorkerManager(workers=2) as wm:
        results = wm.map(tasks.square, endless(), max_in_flight=50, chunksize=10)
        got = []
        async for r in results:
            got.append(r)
            if len(got) == 100:
                break
    assert got == [i * i for i in range(100)]
    assert read <= 100 + 50 + 10  # what was handed out, plus the bound in flight


async def test_map_takes_an_async_iterable() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(50):
            await anyio.lowlevel.checkpoint()
            yield i

    async with WorkerManager(workers=2) as wm:
        assert [r async for r in wm.map(tasks.square, numbers())] == [i * i for i in range(50)]


async def test_an_items_exception_is_raised_at_its_place_with_its_index() -> None:
    async with WorkerManager(workers=2) as wm:
        got = []
        with pytest.raises(ValueError, match="bad item") as info:
            async for r in wm.map(tasks.fail_on, range(100), chunksize=5):
                got.append(r)
        assert got == list(range(37))  # every result before it, in order
        assert any("item 37" in note for note in info.value.__notes__)
        assert str(info.value) == "bad item (wm.map's item 37)"  # in the message too
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_leaving_the_loop_early_stops_the_rest(tmp_path: Any) -> None:
    async with WorkerManager(workers=2) as wm:
        results = wm.map(tasks.spin, [0.5] * 40, chunksize=1, max_in_flight=6)
        async for _ in results:
            break
        del results  # (break frees the iterator: what it started is stopped)
        with anyio.fail_after(5):  # (a killed worker is reaped within milliseconds)
            while wm.stats().running or wm.stats().queued:
                await anyio.sleep(0.01)
        assert wm.stats().cancelled >= 1
        assert wm.stats().completed <= 4  # the rest of the 40 never ran


async def test_a_crash_fails_only_its_chunk() -> None:
    async with WorkerManager(workers=2) as wm:
        items = [0.0] * 20 + [-1.0] + [0.0] * 20  # -1: the worker dies on that item
        got = []
        with pytest.raises(WorkerCrashed):
            async for r in wm.map(tasks.spin_or_die, items, chunksize=1):
                got.append(r)
        assert got == [0.0] * 20
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_map_timeout_is_per_item() -> None:
    async with WorkerManager(workers=1) as wm:
        with pytest.raises(TaskTimeout):
            async for _ in wm.map(tasks.spin, [0.01, 5.0], chunksize=1, timeout=0.3):
                pass


def test_map_options_are_checked() -> None:
    wm = WorkerManager(workers=1)
    for bad in ({"chunksize": 0}, {"max_in_flight": 0}, {"chunksize": True}):
        with pytest.raises(ValueError):
            wm.map(tasks.square, [1], **bad)


# -- several tasks waiting on one worker ------------------------------------------------------


async def test_short_tasks_wait_several_deep_and_keep_their_results() -> None:
    async with WorkerManager(workers=2, max_queue=5000) as wm:
        await wm.run(tasks.square, 1)  # measured: short
        results: dict[int, int] = {}
        deepest = 0
        pool = wm._backends["process"]  # white-box: how many one worker held at once

        async def one(i: int) -> None:
            nonlocal deepest
            deepest = max(deepest, *(len(w.held) for w in pool.active))  # type: ignore[attr-defined]
            results[i] = await wm.run(tasks.square, i)

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(one, i)
        assert results == {i: i * i for i in range(2000)}
        assert deepest > 1  # several short tasks waited on one worker


async def test_a_crash_behind_short_tasks_fails_only_itself() -> None:
    async with WorkerManager(workers=1, spare_workers=0) as wm:
        await wm.run(tasks.spin_or_die, 0.0)  # measured: short
        outcomes: dict[int, Any] = {}

        async def one(i: int, arg: float) -> None:
            try:
                outcomes[i] = await wm.run(tasks.spin_or_die, arg)
            except WorkerCrashed as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i, -1.0 if i == 30 else 0.0)
        crashed = [i for i, o in outcomes.items() if isinstance(o, WorkerCrashed)]
        assert crashed == [30]  # only the task that crashed; the rest ran once, elsewhere
        assert all(o == 0.0 for i, o in outcomes.items() if i != 30)


async def test_a_chunk_that_fails_as_a_whole_names_its_items() -> None:
    async with WorkerManager(workers=1) as wm:
        items = [0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]  # -1: the worker dies on item 3
        with pytest.raises(WorkerCrashed) as info:
            async for _ in wm.map(tasks.spin_or_die, items, chunksize=6):
                pass
    notes = "\n".join(info.value.__notes__)
    assert "items 0 to 5" in notes
    assert "item 0" not in notes.replace("items 0 to 5", "")  # not blamed on the first item


async def test_map_on_a_manager_that_is_not_running_says_so() -> None:
    from offload import ManagerClosed, NotStarted

    wm = WorkerManager(workers=1)
    with pytest.raises(NotStarted):
        wm.map(tasks.square, [1])
    async with wm:
        pass
    with pytest.raises(ManagerClosed):
        wm.map(tasks.square, [1])


async def test_results_already_here_do_not_hold_the_event_loop() -> None:
    # 5,000 results all in: handing them out must still let other tasks run now and then.
    async with WorkerManager(workers=2) as wm, anyio.create_task_group() as tg:
        turns = 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                await anyio.lowlevel.checkpoint()
                turns += 1

        results = wm.map(tasks.square, range(5000), chunksize=100, max_in_flight=5000)
        assert await results.__anext__() == 0
        while wm.stats().completed < 50:  # every chunk done: the rest is already here
            await anyio.sleep(0.01)
        tg.start_soon(other_task)
        await anyio.lowlevel.checkpoint()
        before = turns
        rest = [r async for r in results]  # no await of its own in this loop
        during = turns - before
        tg.cancel_scope.cancel()
    assert rest == [i * i for i in range(1, 5000)]
    assert during >= 4999 // 256 - 1
