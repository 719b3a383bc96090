"""Chaos under load: thousands of mixed tasks with deadlines, cancellations and worker kills.

A seeded plan (``random.Random(seed)``) submits bursts of tasks for a few seconds: fast ones,
slow pure-Python ones, ones that raise, a few that crash their worker; some get a short
deadline, some get their awaiting asyncio task cancelled after a random delay, and a separate
coroutine SIGKILLs a random worker from outside now and then. Timing is not reproducible, the
plan is. Then the invariant checker proves:

- every submitted task got exactly one outcome, one the plan allows for it: its result (the
  right one), ``QUEUE_FULL``, ``TIMEOUT`` (only with a deadline), ``CANCELLED`` (only if its
  caller was cancelled), ``WORKER_CRASHED`` (only with a crash or a kill), or its own exception;
- ``on_task_done`` heard exactly one record per accepted task, with the same outcome, and none
  for a refused one;
- ``stats()`` adds up: ``submitted == finished``, each counter equals the outcomes seen,
  ``rejected`` the QUEUE_FULLs, and ``crashed <= worker_restarts <= kills + crashed +
  timed_out + cancelled``;
- afterwards the manager is healthy (all workers back, meeting at once; a normal batch
  succeeds) and shuts down clean (no worker process left: also the autouse fixture).

Run with ``-s`` to see a summary line per run. On 3.13, interpreter workers get a reduced run:
no kills and no crashes (either would take the test process down), only deadlines,
cancellations, exceptions and a few tasks blocked in C (which a deadline quarantines).

Shutdown under load: many tasks, then ``shutdown(grace=small)``: each gets its result or
``SHUTDOWN``, nothing hangs, no process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import fault_tasks
from conftest import requires_interpreters
from offload import ManagerClosed, OffloadError, WorkerManager

from ._support import (
    Records,
    at_full_strength,
    live_children_of_us,
    new_manager,
    outcome_of,
    wait_until_settled,
)

pytestmark = pytest.mark.asyncio

WORKERS = 2
SLOW_SIZES = (3_000, 12_000, 40_000)  # crunch(n): about 0.3 to 4 ms of pure Python


@functools.cache
def crunched(n: int) -> int:
    return fault_tasks.crunch(n)


@dataclass
class Chaos:
    """What one run may do."""

    seconds: float = 3.0  # submitting stops after this long ...
    max_tasks: int = 4_000  # ... or this many tasks
    max_queue: int = 150
    pressure: float = 0.7  # new bursts wait while more calls than this * max_queue are open
    crash_rate: float = 0.004
    kill_every: tuple[float, float] | None = (0.05, 0.3)  # seconds between outside kills
    nap_rate: float = 0.0  # tasks blocked in C (interpreter workers: quarantined on deadline)
    deadline_rate: float = 0.2
    cancel_rate: float = 0.08


@dataclass
class Planned:
    """One task of the plan and what it is allowed to end as."""

    index: int
    fn: Any
    args: tuple[Any, ...]
    expected: Any  # the result, if it returns one
    priority: str
    timeout: float | None
    cancel_after: float | None
    allowed: set[str] = field(default_factory=set)


def plan_task(index: int, rng: random.Random, chaos: Chaos) -> Planned:
    roll = rng.random()
    returns = True
    if roll < chaos.crash_rate:
        how = rng.choice(fault_tasks.KILLERS)
        fn, args, expected, returns = fault_tasks.crash, (how, index), None, False
    elif roll < chaos.crash_rate + chaos.nap_rate:
        seconds = rng.choice((0.005, 0.02, 0.15))
        fn, args, expected = fault_tasks.nap, (seconds,), seconds
    elif roll < 0.12:
        fn, args, expected, returns = fault_tasks.fail, (index,), None, False
    elif roll < 0.30:
        n = rng.choice(SLOW_SIZES)
        fn, args, expected = fault_tasks.crunch, (n, index), crunched(n)
    else:
        fn, args, expected = fault_tasks.square, (index,), index * index
    timeout = rng.uniform(0.002, 0.15) if rng.random() < chaos.deadline_rate else None
    cancel_after = rng.uniform(0.0, 0.08) if rng.random() < chaos.cancel_rate else None
    allowed = {"QUEUE_FULL"}
    if returns:
        allowed.add("ok")
    if fn is fault_tasks.fail:
        allowed.add("ValueError")
    if fn is fault_tasks.crash or chaos.kill_every:
        allowed.add("WORKER_CRASHED")
    if timeout is not None:
        allowed.update({"TIMEOUT", "WOULD_TIME_OUT"})  # refused: it could not start in time
    if cancel_after is not None:
        allowed.add("CANCELLED")
    priority = rng.choice(("high", "normal", "normal", "low"))
    return Planned(index, fn, args, expected, priority, timeout, cancel_after, allowed)


class Run:
    """One chaos run against a started manager: submit, cancel, kill; then check."""

    def __init__(self, wm: WorkerManager, records: Records, seed: int, chaos: Chaos) -> None:
        self.wm = wm
        self.records = records
        self.chaos = chaos
        self.plan_rng = random.Random(seed)
        self.kill_rng = random.Random(seed + 1_000_003)  # kills do not shift the plan
        self.planned: list[Planned] = []
        self.outcomes: dict[int, str] = {}
        self.wrong: list[str] = []
        self.kills = 0
        self.raced = 0  # cancelled callers whose task had its outcome already
        self.seen_pids: set[int] = set()
        self.calls: list[asyncio.Task[None]] = []

    async def call(self, task: Planned) -> None:
        outcome = "?"
        try:
            value = await self.wm.run(
                task.fn,
                *task.args,
                priority=task.priority,  # type: ignore[arg-type]
                timeout=task.timeout,
                task_id=str(task.index),
            )
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except (OffloadError, ValueError) as exc:
            outcome = outcome_of(exc)
            if outcome == "ValueError" and f"task {task.index} " not in str(exc):
                self.wrong.append(f"task {task.index}: someone else's error {exc!r}")
        else:
            outcome = "ok"
            if value != task.expected:
                self.wrong.append(f"task {task.index}: {value!r} != {task.expected!r}")
        finally:
            if task.index in self.outcomes:
                self.wrong.append(f"task {task.index}: a second outcome {outcome}")
            self.outcomes[task.index] = outcome

    async def submit_all(self) -> None:
        loop = asyncio.get_running_loop()
        chaos, rng = self.chaos, self.plan_rng
        stop_at = loop.time() + chaos.seconds
        while loop.time() < stop_at and len(self.planned) < chaos.max_tasks:
            if len(self.calls) - len(self.outcomes) > chaos.max_queue * chaos.pressure:
                await asyncio.sleep(0.002)  # let the backlog shrink: not every task QUEUE_FULL
                continue
            for _ in range(rng.randint(1, 60)):
                task = plan_task(len(self.planned), rng, chaos)
                self.planned.append(task)
                call = loop.create_task(self.call(task))
                self.calls.append(call)
                if task.cancel_after is not None:
                    loop.call_later(task.cancel_after, call.cancel)
            self.seen_pids.update(self.wm.worker_pids())
            await asyncio.sleep(rng.choice((0, 0, 0.001, 0.004)))

    async def kill_workers(self, stop: asyncio.Event) -> None:
        assert self.chaos.kill_every is not None
        low, high = self.chaos.kill_every
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kill_rng.uniform(low, high)):
                    await stop.wait()
            pids = [p for p in self.wm.worker_pids() if p in live_children_of_us({p})]
            if stop.is_set() or not pids:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.kill_rng.choice(pids), signal.SIGKILL)
                self.kills += 1

    async def go(self) -> float:
        started = time.perf_counter()
        stop = asyncio.Event()
        killer = None
        if self.chaos.kill_every:
            killer = asyncio.create_task(self.kill_workers(stop))
        try:
            await self.submit_all()
            async with asyncio.timeout(20):  # no hang: every call ends
                await asyncio.gather(*self.calls, return_exceptions=True)
            for task, call in zip(self.planned, self.calls, strict=True):
                if task.index not in self.outcomes and call.cancelled():
                    # cancelled before its first step: it never reached the manager
                    self.outcomes[task.index] = "never-ran"
        finally:
            stop.set()
            if killer is not None:
                await killer
        await wait_until_settled(self.wm)
        return time.perf_counter() - started

    def check(self) -> Counter[str]:
        """Every invariant of the module docstring about outcomes, records and counters."""
        assert not self.wrong, self.wrong[:10]
        assert all(call.done() for call in self.calls)
        assert sorted(self.outcomes) == list(range(len(self.planned)))
        seen = Counter(self.outcomes.values())
        for task in self.planned:
            outcome = self.outcomes[task.index]
            assert outcome in task.allowed | {"never-ran"}, (task, outcome)
            if outcome == "never-ran":
                assert task.cancel_after is not None, task
        # on_task_done: one record per accepted task, with the caller's outcome; except that
        # a caller cancelled just as its task got another outcome hears CancelledError (asyncio
        # delivers the cancellation first) while the task keeps the outcome it had
        by_id = self.records.by_id()
        heard: Counter[str] = Counter()
        for task in self.planned:
            outcome = self.outcomes[task.index]
            records = by_id.get(str(task.index))
            if outcome in ("QUEUE_FULL", "WOULD_TIME_OUT", "never-ran"):
                assert records is None, (task, records)
                continue
            assert records is not None, (task, outcome)
            assert len(records) == 1, (task, records)
            (record,) = records
            heard[record] += 1
            if record != outcome:
                assert outcome == "CANCELLED", (task, outcome, record)
                self.raced += 1
        assert len(self.records.all) == sum(heard.values())
        stats = self.wm.stats()
        refused = seen["QUEUE_FULL"] + seen["WOULD_TIME_OUT"]
        assert stats.submitted == len(self.planned) - refused - seen["never-ran"]
        assert stats.submitted == sum(heard.values())
        assert stats.finished == stats.submitted
        assert stats.rejected == refused
        assert stats.completed == heard["ok"]
        assert stats.failed == heard["ValueError"]
        assert stats.timed_out == heard["TIMEOUT"]
        assert stats.cancelled == heard["CANCELLED"]
        assert stats.crashed == heard["WORKER_CRASHED"]
        assert stats.shutdown == 0
        assert (stats.queued, stats.running) == (0, 0)
        most = self.kills + stats.crashed + stats.timed_out + stats.cancelled
        assert stats.crashed <= stats.worker_restarts <= most, stats
        return seen

    def summary(self, kind: str, seed: int, elapsed: float, outcomes: Counter[str]) -> str:
        stats = self.wm.stats()
        by_code = " ".join(f"{code}={n}" for code, n in sorted(outcomes.items()))
        return (
            f"chaos kind={kind} seed={seed}: tasks={len(self.planned)} "
            f"accepted={stats.submitted} kills={self.kills} restarts={stats.worker_restarts} "
            f"raced-cancels={self.raced} in {elapsed:.2f}s | {by_code}"
        )


async def chaos_run(kind: str, seed: int, chaos: Chaos, tmp_path: Path, **options: Any) -> None:
    records = Records()
    async with new_manager(
        kind=kind, workers=WORKERS, max_queue=chaos.max_queue, on_task_done=records, **options
    ) as wm:
        run = Run(wm, records, seed, chaos)
        elapsed = await run.go()
        outcomes = run.check()
        print(run.summary(kind, seed, elapsed, outcomes))
        # healthy afterwards: every worker back and working, a normal batch succeeds
        await at_full_strength(wm, WORKERS, tmp_path)
        batch = await asyncio.gather(*(wm.run(fault_tasks.square, i) for i in range(100)))
        assert batch == [i * i for i in range(100)]
        run.seen_pids.update(wm.worker_pids())
    assert not live_children_of_us(run.seen_pids)
    if kind == "process":
        assert outcomes["ok"] > 0
        assert outcomes["WORKER_CRASHED"] > 0
        assert run.kills > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_chaos_on_process_workers(seed: int, tmp_path: Path) -> None:
    await chaos_run("process", seed, Chaos(), tmp_path)


@requires_interpreters
@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos_on_interpreter_workers(seed: int, tmp_path: Path) -> None:
    calm = Chaos(crash_rate=0.0, kill_every=None, nap_rate=0.01, seconds=2.0)
    # a short interrupt grace: naps past a deadline get their interpreter quarantined
    await chaos_run("interpreter", seed, calm, tmp_path, interrupt_grace=0.05)


# -- shutdown under load ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "grace"),
    [
        ("process", 0.2),
        ("process", 0.0),
        pytest.param("interpreter", 0.2, marks=requires_interpreters),
    ],
)
async def test_shutdown_under_load(kind: str, grace: float) -> None:
    """Hundreds of tasks queued and running, then shutdown: each gets its result or SHUTDOWN."""
    rng = random.Random(7)
    records = Records()
    wm = await new_manager(kind=kind, max_queue=10_000, on_task_done=records).start()
    pids = set(wm.worker_pids())
    # one long task: at least one task is still running when the grace ends, on any machine
    long_one = asyncio.create_task(wm.run(fault_tasks.crunch, 10**9, task_id="long"))
    expected = []
    calls = []
    for i in range(600):
        n = rng.choice((0, *SLOW_SIZES))
        if n:
            expected.append(crunched(n))
            calls.append(asyncio.create_task(wm.run(fault_tasks.crunch, n, task_id=str(i))))
        else:
            expected.append(i * i)
            calls.append(asyncio.create_task(wm.run(fault_tasks.square, i, task_id=str(i))))
    await asyncio.sleep(0.05)  # some done, some running, most queued
    started = time.perf_counter()
    async with asyncio.timeout(10):
        closing = asyncio.create_task(wm.shutdown(grace=grace))
        await asyncio.sleep(0)
        with pytest.raises(ManagerClosed):  # no new work while draining
            await wm.run(fault_tasks.square, 2)
        await asyncio.gather(closing, wm.shutdown())  # a second shutdown waits for the first
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        with pytest.raises(ManagerClosed):
            await long_one
    took = time.perf_counter() - started
    assert took < grace + 3.0
    done = closed = 0
    for i, (outcome, want) in enumerate(zip(outcomes, expected, strict=True)):
        if isinstance(outcome, ManagerClosed):
            assert outcome.code == "SHUTDOWN"
            assert outcome.task_id == str(i)
            closed += 1
        else:
            assert outcome == want, (i, outcome)
            done += 1
    stats = wm.stats()
    assert (stats.submitted, stats.completed, stats.shutdown) == (601, done, closed + 1)
    assert stats.finished == 601
    assert records.outcomes() == +Counter({"ok": done, "SHUTDOWN": closed + 1})
    assert not any(psutil.pid_exists(p) for p in pids)  # stopped and reaped
    print(f"shutdown kind={kind} grace={grace}: {done} done, {closed} SHUTDOWN in {took:.2f}s")


async def test_shutdown_while_workers_are_killed() -> None:
    """Shutdown under load with crashes and outside kills during the drain: still one outcome
    each (result, SHUTDOWN or WORKER_CRASHED), and no replacement outlives the manager."""
    rng = random.Random(11)
    wm = await new_manager(max_queue=10_000).start()
    seen: set[int] = set(wm.worker_pids())
    calls = []
    for i in range(400):
        if rng.random() < 0.03:
            calls.append(asyncio.create_task(wm.run(fault_tasks.crash, "sigkill", i)))
        else:
            calls.append(asyncio.create_task(wm.run(fault_tasks.crunch, SLOW_SIZES[1], i)))
    stop = asyncio.Event()

    async def killer() -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.01, 0.05))
            seen.update(wm.worker_pids())
            for pid in wm.worker_pids()[:1]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    killing = asyncio.create_task(killer())
    await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        await wm.shutdown(grace=0.3)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    stop.set()
    await killing
    names = Counter(
        "ok" if o == crunched(SLOW_SIZES[1]) else outcome_of(o)  # type: ignore[arg-type]
        for o in outcomes
    )
    assert set(names) <= {"ok", "SHUTDOWN", "WORKER_CRASHED"}, names
    stats = wm.stats()
    assert stats.finished == stats.submitted == 400
    assert (stats.completed, stats.shutdown, stats.crashed) == (
        names["ok"],
        names["SHUTDOWN"],
        names["WORKER_CRASHED"],
    )
    assert not live_children_of_us(seen)
    print(f"shutdown with kills: {dict(names)}, restarts={stats.worker_restarts}")
