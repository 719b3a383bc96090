"""The dispatcher against a fake backend, in virtual time (trio's MockClock).

No worker and no real sleep: deadlines, admission, priorities, fair share, returns, retries
and exactly-one-outcome are checked in milliseconds. A fake kind plugs into the real
``WorkerManager`` (``kind=FakeKind()``), so the façade, the dispatcher and its timers are the
ones users get.
"""

from __future__ import annotations

import pickle
from collections import deque
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import offload
from offload import Priority, QueueFull, Retry, TaskTimeout, WorkerManager
from offload._backend import BackendStats, Outcome, OutcomeKind, OutcomeSink, Ticket
from offload._offload_worker import protocol

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class FakeBackend:
    """``capacity`` slots; the test decides what happens to each ticket it was given."""

    kind = "fake"
    supports_progress = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: deque[Ticket] = deque()
        self.stopped: list[Ticket] = []
        self.sink: OutcomeSink | None = None
        self.started_order: list[str] = []

    def bind(self, sink: OutcomeSink) -> None:
        self.sink = sink

    async def start(self, runtime: Any, tg: anyio.abc.TaskGroup) -> None:
        pass

    def offer(self, ticket: Ticket) -> bool:
        if len(self.held) >= self.capacity:
            return False
        self.held.append(ticket)
        self.started_order.append(ticket.task_id or ticket.name)
        return True

    def stop(self, ticket: Ticket) -> None:
        self.stopped.append(ticket)
        if ticket in self.held:
            self.held.remove(ticket)
            self._report(ticket, Outcome(OutcomeKind.STOPPED))

    def credit(self, ticket: Ticket, items: int) -> None: ...

    def close_stream(self, ticket: Ticket) -> None: ...

    def drain(self) -> None: ...

    async def aclose(self, grace: float) -> None:
        for ticket in list(self.held):
            self.held.remove(ticket)
            self._report(ticket, Outcome(OutcomeKind.RETURNED))

    def statistics(self) -> BackendStats:
        return BackendStats(
            "fake",
            workers=self.capacity,
            holding=len(self.held),
            min_workers=self.capacity,
            max_workers=self.capacity,
        )

    def worker_statistics(self) -> list[Any]:
        return []

    def worker_pids(self) -> list[int]:
        return []

    # -- what the test makes happen ----------------------------------------------------------

    def _report(self, ticket: Ticket, outcome: Outcome) -> None:
        assert self.sink is not None
        self.sink.on_outcome(ticket, outcome)
        self.sink.on_capacity()

    def finish(self, value: Any = None, seconds: float = 0.01, index: int = 0) -> Ticket:
        ticket = self.held[index]
        del self.held[index]
        self._report(ticket, Outcome(OutcomeKind.ANSWER, protocol.OK, pickle.dumps(value), seconds))
        return ticket

    def crash(self, index: int = 0) -> Ticket:
        ticket = self.held[index]
        del self.held[index]
        self._report(ticket, Outcome(OutcomeKind.LOST, note=" (killed by SIGKILL)"))
        return ticket

    def give_back(self, index: int = 0) -> Ticket:
        ticket = self.held[index]
        del self.held[index]
        self._report(ticket, Outcome(OutcomeKind.RETURNED))
        return ticket


class FakeKind:
    name = "fake"
    any_loop = True

    def __init__(self, capacity: int = 1) -> None:
        self.backend = FakeBackend(capacity)

    def create_backend(self, size: int, config: Any, settings: Any) -> FakeBackend:
        return self.backend


def fn(value: Any) -> Any:  # what the fake "runs" (never called: the test answers)
    return value


def other(value: Any) -> Any:
    return value


async def test_a_deadline_while_queued_is_exact_in_virtual_time() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm, anyio.create_task_group() as tg:
        tg.start_soon(wm.run, fn, "first")  # held
        await anyio.wait_all_tasks_blocked()
        started = anyio.current_time()
        with pytest.raises(TaskTimeout, match="waiting in the queue"):
            await wm.run(fn, "late", timeout=2.5)
        assert anyio.current_time() - started == pytest.approx(2.5)
        kind.backend.finish("first")


async def test_a_deadline_while_held_stops_the_work() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm:
        started = anyio.current_time()
        with pytest.raises(TaskTimeout, match="running"):
            await wm.run(fn, "x", timeout=1.0)
        assert anyio.current_time() - started == pytest.approx(1.0)
        assert [t.name for t in kind.backend.stopped] == ["fn"]


async def test_strict_priority_and_fifo_within_a_priority() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind, scheduling="fifo") as wm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: wm.run(fn, 0, task_id="blocker"))
            await anyio.wait_all_tasks_blocked()
            for name, priority in [
                ("l1", "low"),
                ("n1", "normal"),
                ("h1", "high"),
                ("n2", "normal"),
                ("h2", "high"),
                ("l2", "low"),
            ]:
                tg.start_soon(lambda n=name, p=priority: wm.run(fn, n, priority=p, task_id=n))
                await anyio.wait_all_tasks_blocked()
            for _ in range(7):
                await anyio.sleep(0.01)
                kind.backend.finish()
    assert kind.backend.started_order == ["blocker", "h1", "h2", "n1", "n2", "l1", "l2"]


async def test_fair_share_lets_a_cheap_flow_through_a_burst() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind, scheduling="fair") as wm:
        # history: fn costs 0.6 s, other costs 0.001 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(wm.run, fn, 0)
            await anyio.wait_all_tasks_blocked()
            kind.backend.finish(0, seconds=0.6)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wm.run, other, 0)
            await anyio.wait_all_tasks_blocked()
            kind.backend.finish(0, seconds=0.001)
        kind.backend.started_order.clear()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(lambda i=i: wm.run(fn, i, task_id=f"hash{i}"))
            await anyio.wait_all_tasks_blocked()
            for i in range(5):
                tg.start_soon(lambda i=i: wm.run(other, i, task_id=f"cheap{i}"))
            await anyio.wait_all_tasks_blocked()
            for _ in range(15):
                await anyio.sleep(0.01)
                ticket = kind.backend.held[0]
                kind.backend.finish(seconds=0.6 if ticket.name == "fn" else 0.001)
    order = kind.backend.started_order
    # Every cheap task starts after at most one more hash (beyond the one the worker took
    # when the burst came), not after the whole burst: by count, whatever order the ten hash
    # callers happened to reach the queue in.
    last_cheap = max(order.index(f"cheap{i}") for i in range(5))
    hashes_first = [name for name in order[:last_cheap] if name.startswith("hash")]
    assert len(hashes_first) <= 2, order


async def test_would_time_out_refuses_at_once_with_a_retry_after() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm, anyio.create_task_group() as tg:
        tg.start_soon(wm.run, fn, 0)
        await anyio.wait_all_tasks_blocked()
        kind.backend.finish(0, seconds=1.0)  # fn takes 1 s
        for i in range(5):  # 1 held + 4 queued: ~5 s of work ahead
            tg.start_soon(wm.run, fn, i)
        await anyio.wait_all_tasks_blocked()
        started = anyio.current_time()
        with pytest.raises(offload.WouldTimeOut) as info:
            await wm.run(fn, "x", timeout=2.0)
        assert anyio.current_time() == started  # at once: nothing reserved
        assert info.value.code == "WOULD_TIME_OUT"
        assert isinstance(info.value, QueueFull)
        assert info.value.retry_after >= 4
        assert wm.stats().rejected == 1
        # a deadline that leaves room is accepted
        tg.start_soon(lambda: wm.run(fn, "ok", timeout=100.0))
        await anyio.wait_all_tasks_blocked()
        for _ in range(6):
            await anyio.sleep(0.01)
            kind.backend.finish(seconds=1.0)


async def test_max_wait_refuses_and_drops_without_a_deadline() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm, anyio.create_task_group() as tg:
        tg.start_soon(wm.run, fn, 0)
        await anyio.wait_all_tasks_blocked()
        kind.backend.finish(0, seconds=1.0)
        tg.start_soon(wm.run, fn, "held")
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(offload.WouldTimeOut, match="max_wait"):
            await wm.run(fn, "x", max_wait=0.5)
        # no history for `other`: accepted (the count is the only bound), then dropped
        started = anyio.current_time()
        with pytest.raises(TaskTimeout, match="did not start within its max_wait"):
            await wm.run(other, "y", max_wait=0.5)
        assert anyio.current_time() - started == pytest.approx(0.5)
        kind.backend.finish()


async def test_a_queued_task_that_can_no_longer_start_in_time_is_dropped_early() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm, anyio.create_task_group() as tg:
        tg.start_soon(wm.run, fn, 0)
        await anyio.wait_all_tasks_blocked()
        kind.backend.finish(0, seconds=2.0)  # fn takes 2 s
        tg.start_soon(wm.run, other, "held")
        await anyio.wait_all_tasks_blocked()
        started = anyio.current_time()
        with pytest.raises(TaskTimeout, match="could not start in time"):
            await wm.run(fn, "x", timeout=3.0)  # must start by t+1 s to finish by t+3 s
        assert anyio.current_time() - started == pytest.approx(1.0)
        assert not any(t.name == "fn" for t in kind.backend.held)  # it never started
        kind.backend.finish()


async def test_a_returned_task_keeps_its_place() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind, scheduling="fifo") as wm:
        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(lambda n=name: wm.run(fn, n, task_id=n))
                await anyio.wait_all_tasks_blocked()
            kind.backend.give_back()  # "a" never started: it goes back first in line
            for _ in range(3):
                await anyio.sleep(0.01)
                kind.backend.finish()
    assert kind.backend.started_order == ["a", "a", "b", "c"]


async def test_retries_back_off_in_virtual_time() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind) as wm:
        retry = Retry(attempts=2, backoff=1.0, jitter=False)
        async with anyio.create_task_group() as tg:
            result: list[Any] = []

            async def call() -> None:
                result.append(await wm.run(fn, "v", retry=retry))

            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            started = anyio.current_time()
            kind.backend.crash()
            await anyio.sleep(0.5)
            assert not kind.backend.held  # waiting out the backoff (1 s)
            await anyio.sleep(0.6)
            assert kind.backend.held
            kind.backend.crash()
            await anyio.sleep(2.1)  # second backoff: 2 s
            assert kind.backend.held
            kind.backend.finish("v")
        assert result == ["v"]
        assert anyio.current_time() - started == pytest.approx(3.2, abs=0.05)
        assert wm.stats().retried == 2


async def test_the_count_bound_applies_without_history() -> None:
    kind = FakeKind(capacity=1)
    async with WorkerManager(kind=kind, max_queue=2) as wm, anyio.create_task_group() as tg:
        for i in range(3):  # 1 held, 2 queued
            tg.start_soon(wm.run, fn, i)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(QueueFull):
            await wm.run(fn, "one too many", timeout=1000)
        for _ in range(3):
            await anyio.sleep(0.01)
            kind.backend.finish()


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"), st.sampled_from(list(Priority)), st.sampled_from([None, 0.5, 5.0])
        ),
        st.tuples(st.just("finish"), st.integers(0, 3)),
        st.tuples(st.just("crash"), st.integers(0, 3)),
        st.tuples(st.just("give_back"), st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("wait"), st.sampled_from([0.1, 1.0])),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_every_accepted_task_gets_exactly_one_outcome(ops: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        kind = FakeKind(capacity=2)
        outcomes: dict[int, list[str]] = {}
        scopes: list[anyio.CancelScope] = []
        async with WorkerManager(kind=kind, max_queue=10) as wm:
            async with anyio.create_task_group() as tg:

                async def call(n: int, priority: Priority, timeout: float | None) -> None:
                    with anyio.CancelScope() as scope:
                        scopes.append(scope)
                        try:
                            await wm.run(fn, n, priority=priority, timeout=timeout)
                            outcomes.setdefault(n, []).append("ok")
                        except offload.OffloadError as exc:
                            outcomes.setdefault(n, []).append(exc.code)
                    if scope.cancelled_caught:
                        outcomes.setdefault(n, []).append("cancelled")

                for number, op in enumerate(ops):
                    held = kind.backend.held
                    if op[0] == "submit":
                        tg.start_soon(call, number, op[1], op[2])
                    elif op[0] in ("finish", "crash", "give_back") and held:
                        getattr(kind.backend, op[0])(op[1] % len(held))
                    elif op[0] == "cancel" and scopes:
                        scopes[op[1] % len(scopes)].cancel()
                    elif op[0] == "wait":
                        await anyio.sleep(op[1])
                    await anyio.wait_all_tasks_blocked()
                while kind.backend.held:
                    kind.backend.finish()
                    await anyio.wait_all_tasks_blocked()
                await anyio.sleep(10)  # every deadline passes
            stats = wm.stats()
        assert all(len(o) == 1 for o in outcomes.values()), outcomes
        accepted = sum(1 for o in outcomes.values() if o[0] != "QUEUE_FULL")
        assert stats.submitted == stats.finished
        assert stats.rejected == sum(1 for o in outcomes.values() if o[0] == "QUEUE_FULL")
        assert accepted >= stats.submitted - stats.cancelled

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
