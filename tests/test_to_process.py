"""``offload.to_process`` / ``offload.to_interpreter``: what anyio documents for its own
``to_process.run_sync`` / ``to_interpreter.run_sync``, checked against offload's, on asyncio
and trio. Real worker processes and subinterpreters; FIFOs say when a call has begun."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_process
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entry_tasks
import offload
import tasks
from conftest import requires_interpreters
from offload import _default_pool, to_interpreter, to_process

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def interpreter_threads_end() -> Iterator[None]:
    """The loop's end stops its interpreter pool; each interpreter's thread ends a moment
    later, once it has destroyed its interpreter. Wait for that (bounded) before the leak check.
    """
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("offload-interpreter"):
            thread.join(10)


class Announcements:
    """A FIFO that calls write ``pid thread`` lines into when they begin; read one by one.

    The test holds a writer open too, so a call's open never waits and the reader never sees
    the end of the file between calls.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(path, os.O_WRONLY)
        os.set_blocking(rfd, True)
        self._file = os.fdopen(rfd)

    async def next(self) -> tuple[int, int]:
        """Wait (bounded) until the next call announces itself: its (pid, thread id)."""
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(self._file.readline, abandon_on_cancel=True)
        pid, thread = line.split()
        return int(pid), int(thread)

    def close(self) -> None:
        os.close(self._keep)  # a reader left waiting sees the end of the file
        self._file.close()


class Gate:
    """A FIFO that calls wait on for a line; ``open()`` lets exactly one of them go."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._fd = os.open(path, os.O_RDWR)  # a writer is always there: opening never waits

    def open(self) -> None:
        os.write(self._fd, b"go\n")

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Announcements]:
    announcements = Announcements(tmp_path / "started")
    yield announcements
    announcements.close()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = Gate(tmp_path / "gate")
    yield g
    g.close()


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pool_manager(kind: str) -> offload.WorkerManager | None:
    """This loop's default pool of ``kind`` (``None``: not started)."""
    return _default_pool.pool_for(kind).manager


Runner = Callable[..., Any]
ENTRY_POINTS = [
    pytest.param(to_process.run_sync, id="to_process"),
    pytest.param(to_interpreter.run_sync, id="to_interpreter", marks=requires_interpreters),
]


# -- results and exceptions -------------------------------------------------------------------


async def test_the_result_comes_back_from_another_process() -> None:
    assert await to_process.run_sync(tasks.add, 2, 3) == 5
    pid = await to_process.run_sync(tasks.pid)
    assert pid != os.getpid()
    assert process_alive(pid)  # kept for the next call, as anyio keeps its workers


@requires_interpreters
async def test_to_interpreter_runs_in_this_process_off_the_loop_thread() -> None:
    assert await to_interpreter.run_sync(tasks.add, 2, 3) == 5
    pid, thread = await to_interpreter.run_sync(tasks.ident)
    assert pid == os.getpid()
    assert thread != threading.get_ident()


@pytest.mark.parametrize("run_sync", ENTRY_POINTS)
async def test_exceptions_come_back_as_themselves(run_sync: Runner) -> None:
    with pytest.raises(ValueError, match="bad thing") as info:
        await run_sync(tasks.boom)
    assert "in boom" in str(info.value.__cause__)  # the worker's traceback
    # Not an Exception (anyio would raise SystemExit here): reported, never re-raised.
    with pytest.raises(offload.TaskFailed, match="SystemExit"):
        await run_sync(tasks.raise_system_exit)
    assert await run_sync(tasks.add, 1, 1) == 2  # the worker is fine


@pytest.mark.parametrize("run_sync", ENTRY_POINTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text()
        | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )
)
async def test_any_picklable_value_round_trips(run_sync: Runner, value: Any) -> None:
    assert await run_sync(tasks.echo, value) == value


async def test_a_crashed_worker_raises_brokenworkerprocess_of_both_libraries() -> None:
    with pytest.raises(anyio.BrokenWorkerProcess) as info:
        await to_process.run_sync(tasks.exit_now, 3)
    exc = info.value
    assert isinstance(exc, to_process.BrokenWorkerProcess)
    assert isinstance(exc, offload.WorkerCrashed)
    assert exc.code == "WORKER_CRASHED"
    assert "exit code 3" in str(exc)
    assert isinstance(exc.__cause__, offload.WorkerCrashed)
    assert await to_process.run_sync(tasks.add, 1, 2) == 3  # only that call failed


def test_the_error_classes_are_offloads_and_anyios() -> None:
    assert to_process.BrokenWorkerProcess.__module__ == "offload.to_process"
    assert issubclass(to_process.BrokenWorkerProcess, offload.WorkerCrashed)
    assert issubclass(to_process.BrokenWorkerProcess, anyio.BrokenWorkerProcess)
    assert to_interpreter.BrokenWorkerInterpreter.__module__ == "offload.to_interpreter"
    assert issubclass(to_interpreter.BrokenWorkerInterpreter, offload.WorkerCrashed)
    assert issubclass(to_interpreter.BrokenWorkerInterpreter, anyio.BrokenWorkerInterpreter)
    exc = to_interpreter.BrokenWorkerInterpreter("the link broke", task_id="t1")
    assert str(exc) == "the link broke"
    assert exc.code == "WORKER_CRASHED"
    assert exc.task_id == "t1"


# -- cancellation ------------------------------------------------------------------------------


async def test_not_cancellable_a_cancellation_waits_for_the_call(
    started: Announcements, gate: Gate
) -> None:
    results: list[str] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    results.append(
                        await to_process.run_sync(
                            entry_tasks.announce_then_wait, started.path, gate.path
                        )
                    )
                    await anyio.lowlevel.checkpoint()  # the pending cancellation lands here
                    results.append("not reached")

            tg.start_soon(call)
            try:
                pid, _ = await started.next()
                scope.cancel()
                await anyio.wait_all_tasks_blocked()
                assert results == []  # still waiting for the call, which still runs
                assert process_alive(pid)
            finally:
                gate.open()  # the same worker reads the line: it was never stopped
    assert results == ["go"]
    assert scope.cancelled_caught
    assert process_alive(pid)  # and it stays in the pool


async def test_cancellable_a_cancellation_kills_the_worker(
    started: Announcements, gate: Gate
) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            outcome: list[str] = []

            async def call() -> None:
                with scope:
                    await to_process.run_sync(
                        entry_tasks.announce_then_wait, started.path, gate.path, cancellable=True
                    )
                    outcome.append("not reached")

            tg.start_soon(call)
            pid, _ = await started.next()
            scope.cancel()
    assert outcome == []
    assert scope.cancelled_caught
    assert not process_alive(pid)  # killed (and reaped) before the cancellation went on
    assert await to_process.run_sync(tasks.add, 2, 2) == 4


async def test_cancellable_with_a_deadline_raises_the_scopes_timeout() -> None:
    with pytest.raises(TimeoutError), anyio.fail_after(0.2):
        await to_process.run_sync(tasks.block_in_c, 30.0, cancellable=True)
    assert await to_process.run_sync(tasks.add, 1, 1) == 2


@requires_interpreters
async def test_to_interpreter_a_cancellation_interrupts_the_call(started: Announcements) -> None:
    """The one intended difference from anyio: the running call is interrupted."""
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            outcome: list[str] = []

            async def call() -> None:
                with scope:
                    outcome.append(
                        await to_interpreter.run_sync(
                            entry_tasks.announce_then_spin, started.path, 600.0
                        )
                    )

            tg.start_soon(call)
            await started.next()
            scope.cancel()  # 600 s of pure Python: only an interrupt ends it within the minute
    assert outcome == []
    assert scope.cancelled_caught
    # The interpreter was interrupted, not abandoned: the next call may run on the same thread.
    assert await to_interpreter.run_sync(tasks.add, 1, 2) == 3


async def test_a_cancellation_while_waiting_for_a_token_takes_nothing() -> None:
    limiter = anyio.CapacityLimiter(1)
    other = object()
    await limiter.acquire_on_behalf_of(other)  # every token is taken
    try:
        with anyio.move_on_after(0.05) as scope:
            await to_process.run_sync(tasks.add, 1, 1, limiter=limiter)
        assert scope.cancelled_caught
        assert limiter.borrowed_tokens == 1
        assert limiter.statistics().tasks_waiting == 0
    finally:
        limiter.release_on_behalf_of(other)


async def test_an_already_cancelled_caller_never_starts_anything(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with anyio.CancelScope() as scope:
        scope.cancel()
        await to_process.run_sync(tasks.sleep_then_mark, 0.0, str(marker))
    assert scope.cancelled_caught
    assert await to_process.run_sync(tasks.add, 0, 0) == 0
    assert not marker.exists()


# -- limiters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("run_sync", ENTRY_POINTS)
@pytest.mark.parametrize("tokens", [1, 2])
async def test_the_limiter_bounds_how_many_calls_run(
    run_sync: Runner, tokens: int, started: Announcements, gate: Gate
) -> None:
    limiter = anyio.CapacityLimiter(tokens)
    calls = 3
    finished, ended = anyio.create_memory_object_stream[str](calls)

    async def call() -> None:
        await finished.send(
            await run_sync(entry_tasks.announce_then_wait, started.path, gate.path, limiter=limiter)
        )

    with anyio.fail_after(60), finished, ended:
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(call)
            try:
                running = 0
                for left in range(calls, 0, -1):
                    while running < min(tokens, left):
                        await started.next()
                        running += 1
                    await anyio.wait_all_tasks_blocked()
                    # Each running call holds a token; the others wait for one, not a worker.
                    assert limiter.borrowed_tokens == running
                    assert limiter.statistics().tasks_waiting == left - running
                    gate.open()  # one call ends
                    assert await ended.receive() == "go"
                    running -= 1
            finally:
                for _ in range(calls):  # never leave a call waiting (they cannot be cancelled)
                    gate.open()
    assert limiter.borrowed_tokens == 0


async def test_the_default_limiter_is_one_per_loop_with_a_token_per_cpu() -> None:
    limiter = to_process.current_default_process_limiter()
    assert isinstance(limiter, anyio.CapacityLimiter)
    assert limiter is to_process.current_default_process_limiter()
    assert limiter.total_tokens == (os.cpu_count() or 2)
    assert limiter is not anyio.to_process.current_default_process_limiter()  # offload's own
    interpreters = to_interpreter.current_default_interpreter_limiter()
    assert interpreters is to_interpreter.current_default_interpreter_limiter()
    assert interpreters is not limiter
    elsewhere = await anyio.to_thread.run_sync(anyio.run, _default_limiters, abandon_on_cancel=True)
    assert elsewhere[0] is not limiter  # another loop, another limiter
    assert elsewhere[1] is not interpreters


async def _default_limiters() -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
    return (
        to_process.current_default_process_limiter(),
        to_interpreter.current_default_interpreter_limiter(),
    )


async def test_a_call_uses_the_default_limiter(started: Announcements, gate: Gate) -> None:
    limiter = to_process.current_default_process_limiter()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                to_process.run_sync, entry_tasks.announce_then_wait, started.path, gate.path
            )
            try:
                await started.next()
                assert limiter.borrowed_tokens == 1
            finally:
                gate.open()
    assert limiter.borrowed_tokens == 0


# -- the default pool --------------------------------------------------------------------------


async def test_one_pool_per_loop_started_on_first_use_and_stopped_with_the_loop(
    anyio_backend: str,
) -> None:
    assert pool_manager("process") is None  # nothing started before the first call
    pid = await to_process.run_sync(tasks.pid)
    pool = pool_manager("process")
    assert pool is not None
    assert pid in pool.worker_pids()
    assert await to_process.run_sync(tasks.pid) == pid  # the same warm worker
    # Another event loop (in a thread) has a pool of its own, stopped when that loop ends.
    other = await anyio.to_thread.run_sync(
        lambda: anyio.run(_pid_of_a_call, backend=anyio_backend), abandon_on_cancel=True
    )
    assert other != pid
    assert not process_alive(other)
    assert process_alive(pid)


async def _pid_of_a_call() -> int:
    return await to_process.run_sync(tasks.pid)


async def test_the_pool_grows_to_the_limiter(started: Announcements, gate: Gate) -> None:
    limiter = anyio.CapacityLimiter(2)
    pids: set[int] = set()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(
                    lambda: to_process.run_sync(
                        entry_tasks.announce_then_wait, started.path, gate.path, limiter=limiter
                    )
                )
            try:
                pids.add((await started.next())[0])
                pids.add((await started.next())[0])  # both run at once, on two workers
            finally:
                gate.open()
                gate.open()
    assert len(pids) == 2


@requires_interpreters
async def test_to_interpreter_pool_is_per_loop_too(anyio_backend: str) -> None:
    assert pool_manager("interpreter") is None
    assert await to_interpreter.run_sync(tasks.add, 1, 2) == 3
    assert pool_manager("interpreter") is not None
    assert pool_manager("process") is None  # the kinds have pools of their own


async def test_the_pool_grows_for_a_later_call_under_a_bigger_limiter(
    started: Announcements, gate: Gate
) -> None:
    # Once: the first call (the default limiter: one token per CPU) fixed the pool's size, and
    # four calls under CapacityLimiter(8) later ran on its workers two by two.
    await to_process.run_sync(tasks.pid)
    calls = (os.cpu_count() or 1) + 2
    limiter = anyio.CapacityLimiter(calls)
    pids: set[int] = set()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(
                    lambda: to_process.run_sync(
                        entry_tasks.announce_then_wait, started.path, gate.path, limiter=limiter
                    )
                )
            try:
                for _ in range(calls):  # all at once: each on a worker of its own
                    pids.add((await started.next())[0])
            finally:
                for _ in range(calls):
                    gate.open()
    assert len(pids) == calls
