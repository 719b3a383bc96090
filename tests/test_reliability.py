"""Worker recycling, health checks, start failures, retries and poison tasks (real workers)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import tasks
from offload import (
    InvalidTask,
    NotSerializable,
    PoisonTask,
    Retry,
    Task,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
    WorkerManager,
    WorkerStartFailed,
)

pytestmark = pytest.mark.asyncio


def manager(**options: Any) -> WorkerManager:
    options.setdefault("workers", 1)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(**options)


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Wait for a state the manager reaches in the background (bounded)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_retry_after_a_crash_succeeds(tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed")
    async with manager() as wm:
        assert await wm.run(tasks.crash_once, marker, retry=Retry(attempts=2, backoff=0)) == "ok"
        stats = wm.stats()
    assert (stats.crashed, stats.retried, stats.completed) == (1, 1, 1)


async def test_retries_are_exhausted_and_own_exceptions_not_retried() -> None:
    async with manager(poison_after=None) as wm:
        with pytest.raises(WorkerCrashed):
            await wm.run(tasks.exit_now, retry=Retry(attempts=2, backoff=0))
        assert wm.stats().crashed == 3
        with pytest.raises(ValueError):
            await wm.run(tasks.boom, retry=3)
        assert wm.stats().retried == 2  # only the crashes were retried


async def test_dict_task_retries_key(tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed")
    async with manager(retry=Retry(backoff=0)) as wm:
        assert await wm.execute_task(Task(tasks.crash_once, args=(marker,))) == "ok"
        assert wm.stats().retried == 1


async def test_retry_stays_inside_the_deadline() -> None:
    async with manager(poison_after=None) as wm:
        started = time.perf_counter()
        # The last attempt either crashes or meets the deadline; never a retry past it.
        with pytest.raises((WorkerCrashed, TaskTimeout)):
            await wm.run(tasks.exit_now, timeout=0.5, retry=Retry(attempts=50, backoff=0.2))
        assert time.perf_counter() - started < 1.0
        assert wm.stats().retried < 5


async def test_poison_task_is_refused_after_repeated_crashes() -> None:
    async with manager(poison_after=2) as wm:
        for _ in range(2):
            with pytest.raises(WorkerCrashed):
                await wm.run(tasks.exit_now, 7)
        restarts = wm.stats().worker_restarts
        with pytest.raises(PoisonTask) as info:
            await wm.run(tasks.exit_now, 7)
        assert info.value.code == "POISON_TASK"
        assert wm.stats().worker_restarts == restarts  # refused without touching a worker
        with pytest.raises(WorkerCrashed):  # other arguments are another task
            await wm.run(tasks.exit_now, 8)
        assert await wm.run(tasks.add, 1, 1) == 2


@pytest.mark.parametrize(
    ("workers", "spares", "calls"), [(1, 0, 9), (1, 1, 9), (2, 0, 12), (2, 1, 12)]
)
async def test_max_tasks_per_worker_is_a_bound(workers: int, spares: int, calls: int) -> None:
    # Issue: workers=1, max_tasks_per_worker=3 and nine sequential calls never recycled.
    async with manager(workers=workers, max_tasks_per_worker=3, spare_workers=spares) as wm:
        pids = [await wm.run(tasks.pid) for _ in range(calls)]
        assert all(pids.count(pid) <= 3 for pid in pids), pids  # a recycled worker takes no more
        assert len(set(pids)) >= calls // 3
        assert wm.stats().worker_recycles >= calls // 3 - 1
        assert wm.stats().crashed == 0


async def test_recycling_by_task_count_keeps_capacity() -> None:
    async with manager(workers=2, max_tasks_per_worker=3) as wm:
        await until(lambda: wm.stats().spares == 1)
        first = set(wm.worker_pids())
        for _ in range(12):
            await wm.run(tasks.pid)
        await until(lambda: wm.stats().worker_recycles >= 2)
        for pid in first:  # both first workers are retired and gone
            await until(lambda pid=pid: not psutil.pid_exists(pid))
        assert not first & set(wm.worker_pids())
        assert await wm.run(tasks.add, 1, 1) == 2
        assert wm.stats().crashed == 0


async def test_recycling_by_memory() -> None:
    async with manager(max_worker_memory=150 * 2**20) as wm:
        first = await wm.run(tasks.hoard, 200)
        await until(lambda: wm.stats().worker_recycles == 1)
        assert await wm.run(tasks.pid) != first
        await until(lambda: not psutil.pid_exists(first))


async def test_hard_memory_limit_raises_memory_error_in_the_task() -> None:
    async with manager(worker_memory_limit=400 * 2**20) as wm:
        with pytest.raises(MemoryError):
            await wm.run(tasks.allocate, 1024)
        assert await wm.run(tasks.allocate, 10) == 10 * 2**20  # the worker survived


async def test_recycling_by_age() -> None:
    async with manager(max_worker_age=0.2, health_interval=0.05) as wm:
        (first,) = wm.worker_pids()
        await until(lambda: wm.stats().worker_recycles >= 1)
        assert await wm.run(tasks.pid) != first


async def test_hung_idle_worker_is_replaced() -> None:
    async with manager(health_interval=0.05, health_timeout=0.3) as wm:
        (hung,) = wm.worker_pids()
        os.kill(hung, signal.SIGSTOP)  # alive, but answers nothing
        await until(lambda: wm.stats().worker_restarts == 1)
        assert await wm.run(tasks.add, 2, 2) == 4
        await until(lambda: not psutil.pid_exists(hung))


async def test_spare_takes_a_crashed_slot_at_once() -> None:
    async with manager(spare_workers=1) as wm:
        await until(lambda: wm.stats().spares == 1)  # it starts after the workers
        with pytest.raises(WorkerCrashed):
            await wm.run(tasks.exit_now)
        assert wm.stats().workers == 1  # the spare stepped in before the caller heard
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_worker_that_cannot_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # the interpreter cannot initialise
    with pytest.raises(WorkerStartFailed) as info:
        await manager(start_timeout=10).start()
    assert info.value.code == "WORKER_START_FAILED"
    assert "exited during start-up" in str(info.value)


async def test_handshake_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(30)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(WorkerStartFailed, match="did not become ready"):
        await manager(start_timeout=0.5).start()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_workers_exit_when_their_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, os, sys\n"
        f"sys.path.insert(0, {str(Path(tasks.__file__).parent)!r})\n"
        "import offload, tasks\n"
        "async def main():\n"
        "    async with offload.WorkerManager(workers=2) as wm:\n"
        "        print(*wm.worker_pids(), flush=True)\n"
        "        await wm.run(tasks.spin, 60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    pids = [int(p) for p in (await parent.stdout.readline()).split()]
    parent.kill()  # no cleanup runs in the parent
    await parent.wait()
    for pid in pids:  # orphans re-parented to init: they exit through their lifeline
        await until(lambda pid=pid: not psutil.pid_exists(pid))


async def test_start_failures_fail_the_queue_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    async with manager(spare_workers=0) as wm:
        monkeypatch.setattr(sys, "executable", "/bin/false")  # replacements cannot start
        crash = asyncio.create_task(wm.run(tasks.exit_now))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(wm.run(tasks.add, i, 1)) for i in range(3)]
        outcomes = await asyncio.gather(crash, *queued, return_exceptions=True)
        assert isinstance(outcomes[0], WorkerCrashed)
        assert all(isinstance(o, WorkerStartFailed) for o in outcomes[1:])
        assert wm.stats().queued == 0
        monkeypatch.undo()
        assert await wm.run(tasks.add, 1, 1) == 2  # healthy again once workers can start


async def test_worker_ignores_ctrl_c_and_broken_exceptions() -> None:
    async with manager(spare_workers=0) as wm:
        (pid,) = wm.worker_pids()
        os.kill(pid, signal.SIGINT)  # as a terminal's Ctrl-C to the process group
        failing = asyncio.create_task(wm.run(tasks.raise_bad_str))
        await asyncio.sleep(0)
        behind = asyncio.create_task(wm.run(tasks.add, 2, 3))
        with pytest.raises(tasks.BadStr):
            await asyncio.wait_for(failing, 10)
        assert await asyncio.wait_for(behind, 10) == 5
        assert wm.worker_pids() == [pid]


async def test_stop_iteration_and_interrupting_results_do_not_escape() -> None:
    async with manager() as wm:
        with pytest.raises(TaskFailed, match="StopIteration"):
            await asyncio.wait_for(wm.run(tasks.stop_iteration, timeout=5), 10)
        with pytest.raises(NotSerializable, match="KeyboardInterrupt"):
            await wm.run(tasks.return_interrupting)
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_a_killed_spare_is_replaced_by_a_spare() -> None:
    others = {p.pid for p in psutil.Process().children()}  # e.g. multiprocessing's helpers
    async with manager(workers=2, spare_workers=1) as wm:
        await until(lambda: wm.stats().spares == 1)
        children = {p.pid for p in psutil.Process().children()} - others
        (spare,) = children - set(wm.worker_pids())
        os.kill(spare, signal.SIGKILL)
        await until(
            lambda: len({p.pid for p in psutil.Process().children()} - others - {spare}) == 3
        )
        assert wm.stats().workers == 2


# ---- what Retry.on names, and what a number of retries means -----------------------------


def _runs(path: Path) -> int:
    return len(path.read_bytes())


@pytest.mark.parametrize(
    "on",
    [{"TASK_ERROR"}, {ValueError}, {"ValueError"}, {Exception}, {"Exception"}, "TASK_ERROR"],
    ids=repr,
)
async def test_retry_on_codes_classes_and_class_names(tmp_path: Path, on: Any) -> None:
    # Once: {"TASK_ERROR"} and {ValueError} were accepted and never matched anything.
    path = tmp_path / "runs"
    path.touch()
    async with manager(workers=1) as wm:
        with pytest.raises(ValueError, match="fails every time"):
            await wm.run(
                tasks.count_run_then_fail,
                str(path),
                "raise",
                retry=Retry(attempts=2, backoff=0, on=on),
            )
    assert _runs(path) == 3  # attempts=2: two more runs after the first


@pytest.mark.parametrize("on", [{"WORKER_CRASHED"}, {TypeError}, {"TypeError"}, {"TIMEOUT"}])
async def test_retry_on_leaves_other_errors_alone(tmp_path: Path, on: Any) -> None:
    path = tmp_path / "runs"
    path.touch()
    async with manager(workers=1) as wm:
        with pytest.raises(ValueError):
            await wm.run(
                tasks.count_run_then_fail,
                str(path),
                "raise",
                retry=Retry(attempts=2, backoff=0, on=on),
            )
    assert _runs(path) == 1


@pytest.mark.parametrize("on", [{"BOGUS_CODE"}, {"WORKER_CRASH"}, {3}, {""}, {int}, {None}])
async def test_retry_on_refuses_what_could_never_match(on: Any) -> None:
    with pytest.raises(InvalidTask, match=r"Retry\.on"):
        Retry(on=on)


@pytest.mark.parametrize(("retries", "runs"), [(0, 1), (1, 2), (2, 3)])
async def test_a_number_of_retries_runs_a_crashing_task_that_many_more_times(
    tmp_path: Path, retries: int, runs: int
) -> None:
    path = tmp_path / "runs"
    path.touch()
    async with manager(workers=1, retry=retries, poison_after=None) as wm:
        with pytest.raises(WorkerCrashed):
            await wm.run(tasks.count_run_then_fail, str(path), "crash")
    assert _runs(path) == runs


@pytest.mark.parametrize("bad", ["2", -1, 1.5, True])
async def test_a_dict_tasks_bad_retries_names_the_key(bad: Any) -> None:
    async with manager(workers=1) as wm:
        with pytest.raises(InvalidTask, match=r"retries must be"):
            await wm.execute_task({"type": "crypto:hash", "data": {"data": "aa"}, "retries": bad})
