"""Fault matrix: one fault injected at each stage of a task's trip, on real workers.

A task crosses five stages; ``fault_tasks`` can make each of them fail in four ways: raise
(``"raise"``), exit (``os._exit(7)``), and the process sending itself SIGKILL or SIGSEGV.
Faults that end a process are only injected where a worker process is the one to die.

=======================  ===========  ==================  ==============  =====================
stage                    where        raise               exit            SIGKILL / SIGSEGV
=======================  ===========  ==================  ==============  =====================
argument pickling        caller       NOT_SERIALIZABLE    (caller dies)   (caller dies)
argument unpickling      worker       the exception [1]   WORKER_CRASHED  WORKER_CRASHED
running                  worker       the exception [1]   WORKER_CRASHED  WORKER_CRASHED
result pickling          worker       NOT_SERIALIZABLE    WORKER_CRASHED  WORKER_CRASHED
result unpickling        caller       NOT_SERIALIZABLE    (caller dies)   (caller dies)
raised-error pickling    worker       WORKER_ERROR [2]    WORKER_CRASHED  WORKER_CRASHED
raised-error unpickling  caller       WORKER_ERROR [2]    (caller dies)   (caller dies)
=======================  ===========  ==================  ==============  =====================

[1] the task's own ``FaultError`` comes back as itself, the worker's traceback chained as
    ``__cause__`` (a ``RemoteTraceback``).
[2] the task raised an exception that cannot travel back: ``TaskFailed`` with its type name.

Every cell also checks what must *not* change: an argument that cannot be pickled never
enters the manager (``submitted`` does not move); tasks running at the same time on the other
worker, and the one handed off behind the faulty task, all return their results; a dead
worker is replaced (``worker_restarts``) and the pool is back at full strength, proved by
tasks meeting on every worker at once; counters and ``on_task_done`` records agree; nothing
hangs (each cell runs under a 10 s guard) and no process outlives the manager (the autouse
fixture in ``tests/conftest.py``).

On Python 3.13 the ``raise`` column also runs on interpreter workers (a process-ending fault
there would take the test process down, which is documented: use process workers for that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import fault_tasks
from conftest import requires_interpreters
from fault_tasks import KILLERS, FaultError
from offload import NotSerializable, TaskFailed, WorkerCrashed, WorkerManager

from ._support import Records, at_full_strength, new_manager, outcome_of, wait_until_settled

pytestmark = pytest.mark.asyncio

# stage -> how to submit a task that fails there with a given fault: (fn, args)
STAGES: dict[str, Callable[[str], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
    "argument-pickling": lambda fault: (fault_tasks.echo, (fault_tasks.DumpFault(fault),)),
    "argument-unpickling": lambda fault: (fault_tasks.echo, (fault_tasks.LoadFault(fault),)),
    "running": lambda fault: (fault_tasks.run_fault, (fault,)),
    "result-pickling": lambda fault: (fault_tasks.return_dump_fault, (fault,)),
    "result-unpickling": lambda fault: (fault_tasks.return_load_fault, (fault,)),
    "error-pickling": lambda fault: (fault_tasks.raise_dump_fault, (fault,)),
    "error-unpickling": lambda fault: (fault_tasks.raise_load_fault, (fault,)),
}

# (stage, fault) -> the outcome the caller must see: an offload code or an exception type name
EXPECTED: dict[tuple[str, str], str] = {
    ("argument-pickling", "raise"): "NOT_SERIALIZABLE",
    ("argument-unpickling", "raise"): "FaultError",
    ("running", "raise"): "FaultError",
    ("result-pickling", "raise"): "NOT_SERIALIZABLE",
    ("result-unpickling", "raise"): "NOT_SERIALIZABLE",
    ("error-pickling", "raise"): "WORKER_ERROR",
    ("error-unpickling", "raise"): "WORKER_ERROR",
    **{
        (stage, fault): "WORKER_CRASHED"
        for stage in ("argument-unpickling", "running", "result-pickling", "error-pickling")
        for fault in KILLERS
    },
}

RAISE_CELLS = [cell for cell in EXPECTED if cell[1] == "raise"]
CRASH_NOTE = {
    "exit": f"exit code {fault_tasks.EXIT_CODE}",
    "sigkill": "SIGKILL",
    "sigsegv": "SIGSEGV",
}
BYSTANDERS = 6  # normal tasks submitted with the faulty one, on both workers


def submit(wm: WorkerManager, stage: str, fault: str) -> Awaitable[Any]:
    fn, args = STAGES[stage](fault)
    return wm.run(fn, *args)


def cells(selected: list[tuple[str, str]]) -> list[Any]:
    return [pytest.param(stage, fault, id=f"{stage}-{fault}") for stage, fault in selected]


async def inject(kind: str, stage: str, fault: str, tmp_path: Path) -> None:
    """Run the faulty task among bystanders and check everything the docstring promises."""
    expected = EXPECTED[stage, fault]
    fn, args = STAGES[stage](fault)
    records = Records()
    async with asyncio.timeout(10), new_manager(kind=kind, on_task_done=records) as wm:
        workers = wm.stats().workers
        # Worker A takes the faulty task; bystanders go to worker B and, one of them, behind
        # the faulty task on A (it must be requeued, not lost, if A dies).
        faulty = asyncio.create_task(wm.run(fn, *args, task_id="faulty"))
        await asyncio.sleep(0)
        bystanders = [
            asyncio.create_task(wm.run(fault_tasks.crunch, 20_000 + i, task_id=f"b{i}"))
            for i in range(BYSTANDERS)
        ]
        with pytest.raises(Exception) as info:
            await faulty
        assert outcome_of(info.value) == expected, repr(info.value)
        assert await asyncio.gather(*bystanders) == [
            fault_tasks.crunch(20_000 + i) for i in range(BYSTANDERS)
        ]
        check_error(info.value, stage, fault)

        met = await at_full_strength(wm, workers, tmp_path)
        await wait_until_settled(wm)
        stats = wm.stats()
        accepted = stage != "argument-pickling"
        assert stats.submitted == BYSTANDERS + workers + accepted
        assert stats.completed == BYSTANDERS + workers
        assert stats.crashed == (expected == "WORKER_CRASHED")
        assert stats.failed == (accepted and expected != "WORKER_CRASHED")
        assert stats.worker_restarts == (expected == "WORKER_CRASHED")
        assert (stats.timed_out, stats.cancelled, stats.shutdown, stats.rejected) == (0, 0, 0, 0)
        assert (stats.queued, stats.running) == (0, 0)
        outcomes = records.by_id()
        assert all(outcomes[f"b{i}"] == ["ok"] for i in range(BYSTANDERS))
        assert outcomes.get("faulty") == ([expected] if accepted else None)
        assert len(records.all) == stats.submitted
        pids = wm.worker_pids()
    if kind == "process":
        assert {pid for pid, _ in met} == set(pids)


def check_error(error: BaseException, stage: str, fault: str) -> None:
    """The details of the faulty task's exception."""
    if isinstance(error, WorkerCrashed):
        assert CRASH_NOTE[fault] in str(error)
        assert error.task_id == "faulty"
    elif isinstance(error, FaultError):
        assert type(error.__cause__).__name__ == "RemoteTraceback"
        assert "fire" in str(error.__cause__)  # the worker's traceback came along
    elif isinstance(error, TaskFailed):
        assert error.exc_type.endswith(("DumpFaultError", "LoadFaultError"))
        assert error.remote_traceback
        assert error.task_id == "faulty"
    else:
        assert isinstance(error, NotSerializable)
        side = "function or arguments" if stage == "argument-pickling" else "result"
        assert side in str(error)
        assert "FaultError" in str(error)


@pytest.mark.parametrize(("stage", "fault"), cells(list(EXPECTED)))
async def test_fault_on_process_workers(stage: str, fault: str, tmp_path: Path) -> None:
    await inject("process", stage, fault, tmp_path)


@requires_interpreters
@pytest.mark.parametrize(("stage", "fault"), cells(RAISE_CELLS))
async def test_fault_on_interpreter_workers(stage: str, fault: str, tmp_path: Path) -> None:
    await inject("interpreter", stage, fault, tmp_path)


async def test_every_killing_fault_in_a_row_leaves_a_working_pool(tmp_path: Path) -> None:
    """All process-ending cells against one manager, one after another and two at a time."""
    cells = [cell for cell, code in EXPECTED.items() if code == "WORKER_CRASHED"]
    async with asyncio.timeout(20), new_manager(workers=2) as wm:
        for first, second in zip(cells[::2], cells[1::2], strict=True):
            calls = [submit(wm, stage, fault) for stage, fault in (first, second)]
            calls.append(wm.run(fault_tasks.square, 12))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert [outcome_of(e) for e in outcomes[:2]] == ["WORKER_CRASHED"] * 2, outcomes
            assert outcomes[2] == 144
        await at_full_strength(wm, 2, tmp_path)
        stats = wm.stats()
    assert stats.crashed == len(cells)
    assert stats.worker_restarts == len(cells)
    assert stats.completed == len(cells) // 2 + 2
