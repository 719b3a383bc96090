"""Interpreter workers (Python 3.13+): real subinterpreters, each with its own GIL."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

import tasks
from conftest import release, requires_interpreters
from offload import (
    NotSerializable,
    TaskTimeout,
    UnsupportedKind,
    WorkerManager,
)

pytestmark = [pytest.mark.asyncio, requires_interpreters]


def manager(**options: object) -> WorkerManager:
    options.setdefault("workers", 2)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(kind="interpreter", **options)  # type: ignore[arg-type]


async def test_runs_in_this_process_on_other_threads() -> None:
    async with manager() as wm:
        assert await wm.run(tasks.add, 2, 3) == 5
        pid, thread = await wm.run(tasks.ident)
        assert pid == os.getpid()
        assert thread != threading.get_ident()  # never on the event loop's thread
        assert wm.stats().kind == "interpreter"


async def test_exceptions_and_pickling_errors() -> None:
    async with manager() as wm:
        with pytest.raises(ValueError, match="bad thing") as info:
            await wm.run(tasks.boom)
        assert "in boom" in str(info.value.__cause__)
        with pytest.raises(NotSerializable):
            await wm.run(tasks.return_unpicklable)
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_dict_tasks_and_routing_to_process_workers() -> None:
    async with manager(workers=1) as wm:
        assert await wm.execute_task({"type": "test:add", "data": {"a": 1, "b": 2}}) == 3
        with pytest.raises(UnsupportedKind, match="it needs a process") as info:
            await wm.execute_task({"type": "test:process-only", "data": None})
        assert "process_workers" in str(info.value)
    async with manager(workers=1, process_workers=1) as wm:
        assert await wm.execute_task({"type": "test:process-only", "data": None}) == "ran"
        assert len(wm.worker_pids()) == 1


async def test_each_interpreter_runs_python_under_its_own_gil(tmp_path: Path) -> None:
    # Two calls that each hold their GIL while they wait for the other can only meet if they
    # hold two different GILs at once: true parallelism, shown without a timing.
    shared = tmp_path / "rendezvous"
    shared.write_bytes(b"\0\0")
    async with manager(workers=2) as wm:
        met = await asyncio.gather(
            *(wm.run(tasks.gil_rendezvous, str(shared), role, 30.0) for role in (0, 1))
        )
    assert met == [True, True]


async def test_a_shared_gil_fails_the_rendezvous(tmp_path: Path) -> None:
    # The same check on two threads of one interpreter: it can fail, so the test above means it.
    shared = tmp_path / "rendezvous"
    shared.write_bytes(b"\0\0")
    met = await asyncio.gather(
        *(asyncio.to_thread(tasks.gil_rendezvous, str(shared), role, 0.5) for role in (0, 1))
    )
    assert met != [True, True]


async def test_deadline_interrupts_pure_python_code() -> None:
    async with manager(workers=1) as wm:
        await wm.run(tasks.add, 0, 0)  # loaded: the deadline below falls inside the loop
        started = time.perf_counter()
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.spin, 30.0, timeout=0.2)
        assert time.perf_counter() - started < 5.0  # far short of the 30 s of work
        # The interrupt stopped the loop: the same interpreter answers the next call.
        assert await wm.run(tasks.add, 1, 1) == 2
        assert wm.stats().worker_restarts == 0


async def test_deadline_quarantines_code_blocked_in_c() -> None:
    async with manager(workers=1, interrupt_grace=0.1, shutdown_grace=5.0) as wm:
        await wm.run(tasks.add, 0, 0)  # loaded: the deadline below falls inside the sleep
        started = time.perf_counter()
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.block_in_c, 3.0, timeout=0.2)
        assert time.perf_counter() - started < 1.5  # the caller hears long before the sleep ends
        # A fresh interpreter takes the slot while the stuck one finishes its sleep.
        assert await wm.run(tasks.add, 2, 2) == 4
        assert wm.stats().worker_restarts == 1


async def test_cancellation_interrupts_too() -> None:
    async with manager(workers=1) as wm:
        call = asyncio.create_task(wm.run(tasks.spin, 30.0))
        await asyncio.sleep(0.05)  # cancelled while loading or running: stopped either way
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await wm.run(tasks.add, 1, 2) == 3
        stats = wm.stats()
        assert stats.cancelled == 1
        assert stats.worker_restarts == 0


async def test_module_that_refuses_subinterpreters_gives_a_clear_error() -> None:
    pytest.importorskip("zstandard")
    async with manager(workers=1) as wm:
        with pytest.raises(UnsupportedKind, match="subinterpreter"):
            await wm.run(tasks.import_module, "zstandard")


async def test_deadline_while_the_call_loads_means_it_never_begins(
    tmp_path: Path, fifo: Path
) -> None:
    marker = tmp_path / "marker"
    async with manager(workers=1) as wm:
        # Its argument waits on a FIFO while it is unpickled: the deadline lands while the
        # call loads, and once it has loaded the call must not begin.
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.mark, str(marker), tasks.SlowToLoad(str(fifo)), timeout=0.2)
        await asyncio.to_thread(release, fifo)
        assert await wm.run(tasks.add, 1, 1) == 2
    assert not marker.exists()


async def test_many_tasks() -> None:
    async with manager(max_queue=5000) as wm:
        results = await asyncio.gather(*(wm.run(tasks.add, i, 1) for i in range(2000)))
        assert results == [i + 1 for i in range(2000)]
