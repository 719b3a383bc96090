"""Issue 10, item 0: every answer reaches its own caller, whatever else the application runs.

The input that showed the fault: 3,000 trivial calls, 16 in flight, each followed by a blocking
sqlite insert through ``anyio.to_thread.run_sync`` (as FastAPI sync endpoints do). The cause was
in the worker: a task given back to the parent was announced *after* the next answer, so the
parent, which matched answers by order, saw one "out of order", killed the worker and blamed a
task that never ran. Answers are now matched by id, and a give-back is decided and announced
under one lock.

The property test drives a real manager through interleavings of submits (several short tasks
per worker, so more than one waits on a worker at once), cancellations of waiting and running
tasks, timeouts, crashes and recycling, with threads doing blocking work beside it. Every call
must get exactly its own outcome.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import offload
import tasks
from offload import TaskTimeout, WorkerCrashed, WorkerManager

PRIORITIES = st.sampled_from(["high", "normal", "low"])


class _Inserts:
    """A sqlite database written to by threads, beside the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("create table if not exists t (x)")
        self.lock = threading.Lock()

    def insert(self, value: int) -> None:
        with self.lock, contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            db.execute("insert into t values (?)", (value,))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_reported_input_gets_no_error(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    inserts = _Inserts(tmp_path / "db.sqlite")
    errors: list[BaseException] = []
    limit = anyio.Semaphore(16)

    async def one(wm: WorkerManager, i: int) -> None:
        async with limit:
            try:
                assert await wm.run(tasks.echo, i) == i
            except BaseException as exc:
                errors.append(exc)
            await anyio.to_thread.run_sync(inserts.insert, i)

    with caplog.at_level(logging.WARNING, logger="offload"):
        async with WorkerManager(workers=2) as wm, anyio.create_task_group() as tg:
            for i in range(3000):
                tg.start_soon(one, wm, i)
    assert not errors
    assert not [r for r in caplog.records if r.name == "offload"], caplog.text
    assert wm.stats().completed == 3000
    assert wm.stats().crashed == 0


async def _quick_then_insert(
    wm: WorkerManager, value: int, priority: str, inserts: _Inserts
) -> int:
    result = await wm.run(tasks.echo, value, priority=priority)
    await anyio.to_thread.run_sync(inserts.insert, value)
    return result


class Interleavings(RuleBasedStateMachine):
    """Submit, cancel, time out, crash and recycle, in any order, with threads beside."""

    backend = "asyncio"
    folder: Path

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.wm = WorkerManager(
            workers=2,
            max_tasks_per_worker=7,
            spare_workers=1,
            shutdown_grace=10,
            health_interval=None,
        )
        self.portal.call(self.wm.start)
        self.inserts = _Inserts(self.folder / "db.sqlite")
        self.calls: list[tuple[str, Any, Future[Any]]] = []
        self.cancelled: set[int] = set()
        self.stop = threading.Event()
        self.beside = threading.Thread(target=self._blocking_work, daemon=True)
        self.beside.start()

    def _blocking_work(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.inserts.insert(-n)
            n += 1

    def _start(self, kind: str, expected: Any, fn: Any) -> None:
        self.calls.append((kind, expected, self.portal.start_task_soon(fn)))

    @rule(value=st.integers(-(2**63), 2**63 - 1), priority=PRIORITIES)
    def quick(self, value: int, priority: str) -> None:
        fn = functools.partial(_quick_then_insert, self.wm, value, priority, self.inserts)
        self._start("quick", value, fn)

    @rule(count=st.integers(1, 40), priority=PRIORITIES)
    def burst(self, count: int, priority: str) -> None:
        for i in range(count):
            self._start(
                "quick", i, functools.partial(self.wm.run, tasks.echo, i, priority=priority)
            )

    @rule(seconds=st.sampled_from([0.02, 0.1, 0.3]))
    def slow(self, seconds: float) -> None:
        self._start("quick", seconds, functools.partial(self.wm.run, tasks.spin, seconds))

    @rule()
    def raises(self) -> None:
        self._start("raises", None, functools.partial(self.wm.run, tasks.boom, "expected"))

    @rule()
    def crash(self) -> None:
        self._start("crash", None, functools.partial(self.wm.run, tasks.exit_now, 3))

    @rule(timeout=st.sampled_from([0.01, 0.05, 0.2]))
    def times_out(self, timeout: float) -> None:
        fn = functools.partial(self.wm.run, tasks.spin, 5.0, timeout=timeout)
        self._start("timeout", None, fn)

    @precondition(lambda self: bool(self.calls))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        # (the index depends only on the steps so far: a finished call is simply not cancelled)
        index = data.draw(st.integers(0, len(self.calls) - 1))
        if self.calls[index][2].cancel():
            self.cancelled.add(index)

    @rule()
    def settle_some(self) -> None:
        for _, _, future in self.calls[-5:]:
            try:
                future.result(timeout=30)
            except BaseException:
                pass

    @invariant()
    def counters_never_exceed_submissions(self) -> None:
        stats = self.wm.stats()
        assert stats.finished <= stats.submitted

    def teardown(self) -> None:
        try:
            self._check_outcomes()
            self.portal.call(self.wm.shutdown)
            stats = self.wm.stats()
            assert stats.finished == stats.submitted  # every accepted task: one outcome
        finally:
            self.stop.set()
            self.beside.join()
            self._portal_cm.__exit__(None, None, None)

    def _check_outcomes(self) -> None:
        for index, (kind, expected, future) in enumerate(self.calls):
            if index in self.cancelled:
                continue
            try:
                result = future.result(timeout=60)
            except offload.ManagerClosed:
                raise AssertionError(f"call {index} ({kind}) was shut down") from None
            except BaseException as exc:
                outcome: Any = exc
            else:
                outcome = result
            if kind == "quick":
                assert outcome == expected, (index, outcome)
            elif kind == "raises":
                assert isinstance(outcome, ValueError) and str(outcome) == "expected"
            elif kind == "crash":
                assert isinstance(outcome, WorkerCrashed), outcome
            else:  # (refused at once when its measured run time is over the deadline)
                assert isinstance(outcome, TaskTimeout | offload.WouldTimeOut), outcome


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_every_answer_reaches_its_own_caller(tmp_path: Path, backend: str) -> None:
    machine = type(
        f"Interleavings_{backend}", (Interleavings,), {"backend": backend, "folder": tmp_path}
    )
    runner = machine.TestCase()
    runner.settings = settings(
        max_examples=8,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    runner.runTest()
