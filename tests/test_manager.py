"""WorkerManager on real process workers: results, order, backpressure, deadlines, failures."""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import offload
import tasks
from conftest import release
from offload import (
    InvalidTask,
    ManagerClosed,
    NotSerializable,
    OffloadError,
    PayloadTooLarge,
    Priority,
    QueueFull,
    Task,
    TaskFailed,
    TaskTimeout,
    UnknownTask,
    WorkerCrashed,
    WorkerManager,
)

pytestmark = pytest.mark.asyncio


def manager(**options: Any) -> WorkerManager:
    options.setdefault("workers", 2)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(**options)


async def test_run_returns_result() -> None:
    async with manager() as wm:
        assert await wm.run(tasks.add, 1, 2) == 3
        assert await wm.execute_task(Task(tasks.add, args=(2, 3), priority=Priority.LOW)) == 5
        assert await wm.execute_task(Task(functools.partial(tasks.add, b=10), args=(1,))) == 11


async def test_dict_task_from_registry() -> None:
    async with manager() as wm:
        spec = {"id": "a1", "type": "test:add", "data": {"a": 2, "b": 40}, "priority": "normal"}
        assert await wm.execute_task({**spec, "timeout": 5}) == 42


async def test_workers_belong_to_the_manager() -> None:
    async with manager(workers=2) as first, manager(workers=1) as second:
        assert len(first.worker_pids()) == 2
        assert len(second.worker_pids()) == 1
        assert not set(first.worker_pids()) & set(second.worker_pids())
        pids = await asyncio.gather(*(first.run(tasks.pid) for _ in range(20)))
        assert set(pids) <= set(first.worker_pids())


async def test_default_worker_count() -> None:
    wm = WorkerManager()
    assert repr(wm).startswith("<WorkerManager kind=process workers=")
    assert f"workers={max(1, (psutil.cpu_count() or 2) - 1)}" in repr(wm)


async def test_priority_order_and_fifo_within_priority(fifo: Path) -> None:
    order: list[str] = []

    async def submit(name: str, priority: str) -> None:
        await wm.run(tasks.echo, name, priority=priority)
        order.append(name)

    async with manager(workers=1) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)  # the blocker is sent to the only worker
        # Nothing waits on a busy worker (its run time is unknown): order is the queue's.
        names = [("ahead", "low"), ("low1", "low"), ("n1", "normal"), ("h1", "high"),
                 ("n2", "normal"), ("h2", "high"), ("low2", "low"), ("h3", "high")]  # fmt: skip
        waiting = [asyncio.create_task(submit(n, p)) for n, p in names]
        await asyncio.sleep(0)
        assert wm.stats().queued == len(names)
        assert wm.stats().queued_by_priority == {"high": 3, "normal": 2, "low": 3}
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        await asyncio.gather(*waiting)
    assert order == ["h1", "h2", "h3", "n1", "n2", "ahead", "low1", "low2"]


async def test_queue_full_raises_at_once(fifo: Path) -> None:
    async with manager(workers=1, max_queue=2) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)
        accepted = [asyncio.create_task(wm.run(tasks.add, i, 0)) for i in range(2)]
        await asyncio.sleep(0)  # both queued: nothing waits on a busy worker
        assert wm.stats().queued == 2
        refused = wm.run(tasks.add, 1, 1)
        with pytest.raises(QueueFull) as info:
            refused.send(None)  # the first step raises: the caller never waits
        assert info.value.code == "QUEUE_FULL"
        assert wm.stats().rejected == 1
        await asyncio.to_thread(release, fifo)
        await blocker
        assert await asyncio.gather(*accepted) == [0, 1]
        stats = wm.stats()
    assert stats.rejected == 1
    assert stats.completed == 3
    assert stats.submitted == 3


async def test_max_queue_zero_accepts_only_what_a_worker_can_take(fifo: Path) -> None:
    async with manager(workers=1, max_queue=0) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):  # the only worker is busy, and nothing may wait
            await wm.run(tasks.add, 1, 1)
        await asyncio.to_thread(release, fifo)
        await blocker
        assert await wm.run(tasks.add, 1, 1) == 2  # an idle worker takes it at once


async def test_a_task_waiting_behind_a_long_one_moves_to_an_idle_worker(fifo: Path) -> None:
    async with manager(workers=2) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        short = asyncio.create_task(wm.run(tasks.add, 1, 1))
        await asyncio.sleep(0)  # the blocker and the short task each have a worker
        behind = asyncio.create_task(wm.run(tasks.pid))  # queued: both workers are busy
        await asyncio.sleep(0)
        assert await short == 2
        # The short task's worker fell idle: the waiting task runs there, while the blocker
        # still blocks.
        ran_on = await asyncio.wait_for(behind, 10)
        assert not blocker.done()
        assert ran_on in wm.worker_pids()
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        assert wm.stats().completed == 3


async def test_timeout_while_queued_removes_the_task(fifo: Path) -> None:
    async with manager(workers=1) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        ahead = asyncio.create_task(wm.run(tasks.add, 1, 1))
        await asyncio.sleep(0)
        with pytest.raises(TaskTimeout) as info:
            await wm.run(tasks.add, 2, 2, timeout=0.1)
        assert info.value.code == "TIMEOUT"
        assert isinstance(info.value, TimeoutError)
        assert "waiting in the queue" in str(info.value)
        assert wm.stats().queued == 1  # only the one ahead of it
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        assert await ahead == 2
        assert wm.stats().timed_out == 1


async def test_timeout_while_running_kills_the_worker(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with manager(workers=1) as wm:
        (worker_pid,) = wm.worker_pids()
        started = time.perf_counter()
        with pytest.raises(TaskTimeout) as info:
            await wm.run(tasks.sleep_then_mark, 3.0, str(marker), timeout=0.3)
        elapsed = time.perf_counter() - started
        assert 0.3 <= elapsed < 2.0  # long before the 3 s of work would end
        assert "running" in str(info.value)
        assert not psutil.pid_exists(worker_pid)  # stopped and reaped before we got TIMEOUT
        assert await wm.run(tasks.add, 1, 1) == 2  # the replacement works
        (new_pid,) = wm.worker_pids()
        assert new_pid != worker_pid
        assert wm.stats().worker_restarts == 1
    assert not marker.exists()  # the work itself was stopped


async def test_a_timeout_kill_leaves_the_task_queued_behind_it_unharmed() -> None:
    async with manager(workers=1) as wm:
        slow = asyncio.create_task(wm.run(tasks.spin, 5.0, timeout=0.3))
        await asyncio.sleep(0)
        behind = asyncio.create_task(wm.run(tasks.add, 20, 22))
        with pytest.raises(TaskTimeout):
            await slow
        assert await behind == 42


async def test_caller_cancellation_stops_the_work(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with manager(workers=1) as wm:
        (worker_pid,) = wm.worker_pids()
        call = asyncio.create_task(wm.run(tasks.sleep_then_mark, 2.0, str(marker)))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        psutil.Process(worker_pid).wait(timeout=5) if psutil.pid_exists(worker_pid) else None
        assert not psutil.pid_exists(worker_pid)
        assert await wm.run(tasks.add, 1, 2) == 3
        assert wm.stats().cancelled == 1
    assert not marker.exists()


async def test_cancelled_waiting_task_never_runs(fifo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    async with manager(workers=1) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)
        behind = asyncio.create_task(wm.run(tasks.sleep_then_mark, 0.0, str(marker)))
        queued = asyncio.create_task(wm.run(tasks.sleep_then_mark, 0.0, str(marker)))
        await asyncio.sleep(0)
        behind.cancel()
        queued.cancel()
        await asyncio.gather(behind, queued, return_exceptions=True)
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        assert await wm.run(tasks.add, 1, 1) == 2  # the worker skipped the cancelled one
        assert wm.stats().cancelled == 2
    assert not marker.exists()


@pytest.mark.parametrize("crash", [tasks.exit_now, tasks.segfault])
async def test_crash_fails_only_its_task(crash: Any) -> None:
    async with manager(workers=2) as wm:
        others = [asyncio.create_task(wm.run(tasks.spin, 0.05)) for _ in range(4)]
        with pytest.raises(WorkerCrashed) as info:
            await wm.run(crash)
        assert info.value.code == "WORKER_CRASHED"
        assert ("exit code 3" if crash is tasks.exit_now else "SIGSEGV") in str(info.value)
        assert await asyncio.gather(*others) == [0.05] * 4
        assert await wm.run(tasks.add, 1, 1) == 2
        while wm.stats().workers < 2:
            await asyncio.sleep(0.01)
        stats = wm.stats()
    assert stats.crashed == 1
    assert stats.worker_restarts == 1


async def test_crash_requeues_the_task_handed_off_behind() -> None:
    async with manager(workers=1) as wm:
        crash = asyncio.create_task(wm.run(tasks.exit_now))
        await asyncio.sleep(0)
        behind = asyncio.create_task(wm.run(tasks.add, 1, 2))
        with pytest.raises(WorkerCrashed):
            await crash
        assert await behind == 3


async def test_exception_round_trips_with_remote_traceback() -> None:
    async with manager() as wm:
        with pytest.raises(ValueError, match="bad thing") as info:
            await wm.run(tasks.boom)
        cause = info.value.__cause__
        assert cause is not None
        assert "in boom" in str(cause)
        assert "raise ValueError(message)" in str(cause)
        assert wm.stats().failed == 1


async def test_unrebuildable_exception_becomes_task_failed() -> None:
    async with manager() as wm:
        with pytest.raises(TaskFailed) as info:
            await wm.run(tasks.raise_unrebuildable)
        assert info.value.code == "WORKER_ERROR"
        assert info.value.exc_type == "tasks.NeedsTwoArgs"
        assert "x/y" in str(info.value)
        assert "raise_unrebuildable" in info.value.remote_traceback
        with pytest.raises(TaskFailed, match="SystemExit"):
            await wm.run(tasks.raise_system_exit)
        assert await wm.run(tasks.add, 1, 1) == 2  # the worker survived both


async def test_unpicklable_argument_and_result() -> None:
    async with manager() as wm:
        with pytest.raises(NotSerializable) as info:
            await wm.run(tasks.echo, lambda: None)
        assert info.value.code == "NOT_SERIALIZABLE"
        with pytest.raises(NotSerializable, match="result"):
            await wm.run(tasks.return_unpicklable)
        with pytest.raises(NotSerializable):
            await wm.run(lambda: 1)
        assert await wm.run(tasks.add, 1, 1) == 2
        assert wm.stats().submitted == 2  # refused arguments never entered the queue


async def test_payload_limit_both_ways() -> None:
    async with manager(max_payload=10_000) as wm:
        with pytest.raises(PayloadTooLarge) as info:
            await wm.run(tasks.echo, b"x" * 20_000)
        assert info.value.code == "PAYLOAD_TOO_LARGE"
        with pytest.raises(PayloadTooLarge, match="result"):
            await wm.run(tasks.big, 20_000)
        assert len(await wm.run(tasks.big, 5_000)) == 5_000


async def test_large_payload_round_trip() -> None:
    data = bytes(range(256)) * (32 * 1024)  # 8 MiB
    async with manager() as wm:
        assert await wm.run(tasks.echo, data) == data
        assert await wm.run(tasks.echo, bytearray(data)) == bytearray(data)


async def test_unknown_and_malformed_tasks() -> None:
    async with manager() as wm:
        with pytest.raises(UnknownTask) as unknown:
            await wm.execute_task({"id": "t9", "type": "nope:never"})
        assert unknown.value.code == "UNKNOWN_TASK"
        assert unknown.value.task_id == "t9"
        bad: list[Any] = [
            {"type": "test:add", "data": {}, "priority": "urgent"},
            {"type": "test:add", "data": {}, "timeout": -1},
            {"type": "test:add", "data": {}, "timeout": "5"},
            {"data": {"a": 1}},
            {"type": "test:add", "data": {}, "callback": "x"},
            ["not", "a", "dict"],
        ]
        for spec in bad:
            with pytest.raises(InvalidTask) as info:
                await wm.execute_task(spec)
            assert info.value.code == "INVALID_TASK"
        with pytest.raises(InvalidTask):
            await wm.run(tasks.add, 1, 2, priority="urgent")  # type: ignore[arg-type]
        with pytest.raises(InvalidTask):
            await wm.run(tasks.add, 1, 2, timeout=0)
        assert wm.stats().submitted == 0


async def test_drain_on_exit_finishes_queued_work() -> None:
    async with manager(workers=1) as wm:
        calls = [asyncio.create_task(wm.run(tasks.spin, 0.02)) for _ in range(6)]
        await asyncio.sleep(0)
        pids = wm.worker_pids()
    assert await asyncio.gather(*calls) == [0.02] * 6
    assert not any(psutil.pid_exists(p) for p in pids)


async def test_forced_shutdown_after_grace(fifo: Path) -> None:
    wm = await manager(workers=1).start()
    pids = wm.worker_pids()
    blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
    queued = [asyncio.create_task(wm.run(tasks.add, i, 1)) for i in range(3)]
    await asyncio.sleep(0)
    await wm.shutdown(grace=0.2)
    for call in (blocker, *queued):
        with pytest.raises(ManagerClosed) as info:
            await call
        assert info.value.code == "SHUTDOWN"
    assert not any(psutil.pid_exists(p) for p in pids)
    assert wm.stats().shutdown == 4
    with pytest.raises(ManagerClosed):
        await wm.run(tasks.add, 1, 1)
    await wm.shutdown()  # idempotent


async def test_submit_before_start_and_after_shutdown() -> None:
    wm = manager()
    with pytest.raises(offload.NotStarted, match="never started") as never:
        await wm.run(tasks.add, 1, 1)
    assert never.value.code == "NOT_STARTED"
    with pytest.raises(offload.NotStarted):
        await wm.execute_task({"type": "test:add", "data": {"a": 1, "b": 1}})
    async with wm:
        pass
    with pytest.raises(ManagerClosed) as info:
        await wm.execute_task({"type": "test:add", "data": {"a": 1, "b": 1}})
    assert info.value.code == "SHUTDOWN"


async def test_cancelled_body_shuts_down_fast(fifo: Path) -> None:
    pids: list[int] = []

    async def body() -> None:
        async with manager(workers=1, shutdown_grace=30) as wm:
            pids.extend(wm.worker_pids())
            await wm.run(tasks.wait_for_fifo, str(fifo))

    runner = asyncio.create_task(body())
    await asyncio.sleep(0.3)
    started = time.perf_counter()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert time.perf_counter() - started < 2.0
    assert not any(psutil.pid_exists(p) for p in pids)


async def test_stats_snapshot_counts_everything() -> None:
    async with manager() as wm:
        await asyncio.gather(*(wm.run(tasks.add, i, i) for i in range(10)))
        with pytest.raises(ValueError):
            await wm.run(tasks.boom)
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.spin, 2.0, timeout=0.1)
        stats = wm.stats()
    assert stats.kind == "process"
    assert (stats.submitted, stats.completed, stats.failed, stats.timed_out) == (12, 10, 1, 1)
    assert stats.finished == stats.submitted
    assert stats.running == 0
    assert stats.queued == 0
    assert 0 <= stats.run_p50 <= stats.run_p95 <= stats.run_p99
    assert 0 <= stats.wait_p50 <= stats.wait_p95 <= stats.wait_p99
    with pytest.raises(AttributeError):
        stats.completed = 0  # type: ignore[misc]


async def test_task_ids_appear_in_errors() -> None:
    async with manager() as wm:
        with pytest.raises(TaskTimeout) as info:
            await wm.execute_task(Task(tasks.spin, args=(2.0,), timeout=0.1, id="job-7"))
        assert info.value.task_id == "job-7"
        assert "job-7" in str(info.value)


async def test_many_concurrent_tasks_all_get_their_result() -> None:
    async with manager(max_queue=10_000) as wm:
        results = await asyncio.gather(*(wm.run(tasks.add, i, 1) for i in range(3000)))
        assert results == [i + 1 for i in range(3000)]


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="checks the pre-3.13 error")
async def test_interpreter_kind_needs_313() -> None:
    with pytest.raises(offload.UnsupportedKind, match=r"3\.13"):
        WorkerManager(kind="interpreter")


async def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkerManager(workers=0)
    with pytest.raises(ValueError, match="max_queue"):
        WorkerManager(max_queue=-1)
    with pytest.raises(OffloadError):
        WorkerManager(kind="threads")  # type: ignore[arg-type]


async def test_functions_and_classes_from_a_main_script(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio, multiprocessing, offload\n"
        "class Point:\n"
        "    def __init__(self, x): self.x = x\n"
        "def make(x): return Point(x * 2)\n"
        "async def main():\n"
        "    async with offload.WorkerManager(workers=1) as wm:\n"
        "        p = await wm.run(make, 21)\n"
        "        print(type(p).__name__, p.x, isinstance(p, Point))\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    assert child.returncode == 0
    assert out.decode().split() == ["Point", "42", "True"]


async def test_memoryview_arguments_and_results() -> None:
    async with manager() as wm:
        view = memoryview(b"abc" * 1000)
        result = await wm.run(tasks.echo, view)
        assert isinstance(result, memoryview)
        assert result.tobytes() == view.tobytes()


@pytest.mark.parametrize("kind", ["thread", "processes", "", "PROCESS"])
async def test_an_unknown_kind_name_is_a_value_error_naming_the_kinds(kind: str) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        offload.WorkerManager(kind=kind)


async def test_a_manager_runs_once() -> None:
    wm = offload.WorkerManager(workers=1)
    async with wm:
        with pytest.raises(RuntimeError, match="once"):
            await wm.start()
    with pytest.raises(offload.ManagerClosed):
        async with wm:
            pass


async def test_min_workers_above_the_default_maximum_says_to_give_max_workers() -> None:
    with pytest.raises(ValueError, match="give max_workers too"):
        offload.WorkerManager(min_workers=10_000)
    with pytest.raises(ValueError, match=r"max_workers \(2\)$"):
        offload.WorkerManager(min_workers=3, max_workers=2)
