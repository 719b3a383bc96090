"""The consuming side: JobQueue.work on a real WorkerManager, on both stores."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

import offload
from offload.jobs import JobQueue

from .support import Inbox

pytestmark = pytest.mark.anyio


@pytest.fixture
def inbox(tmp_path: Path) -> Any:
    box = Inbox(tmp_path / "inbox")
    yield box
    box.close()


async def state_of(jobs: JobQueue, job_id: str) -> Any:
    info = await jobs.get(job_id)
    assert info is not None
    return info


async def test_once_runs_what_is_due_and_leaves_delayed_jobs(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    ids = [await jobs.enqueue("jobs-test:add", {"a": i, "b": 1}) for i in range(10)]
    later = await jobs.enqueue("jobs-test:add", {"a": 0, "b": 0}, delay=3600)
    assert await jobs.work(manager, queues=["default"], once=True) == 10
    for i, job_id in enumerate(ids):
        info = await state_of(jobs, job_id)
        assert (info.state, info.result, info.attempts, info.error) == ("done", i + 1, 1, None)
        assert info.finished_at is not None
        assert info.started_at is not None
        assert info.created_at <= info.started_at <= info.finished_at
    assert (await state_of(jobs, later)).state == "queued"
    stats = await jobs.stats()
    assert (stats.queues["default"].done, stats.queues["default"].delayed) == (10, 1)


async def test_queues_in_order_given_then_priority_then_due_time_then_fifo(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    names = {}
    for name, queue, priority in [
        ("b1", "b", "high"),
        ("a-low", "a", "low"),
        ("a1", "a", "normal"),
        ("a-high", "a", "high"),
        ("a2", "a", "normal"),
        ("b2", "b", "normal"),
    ]:
        names[await jobs.enqueue("jobs-test:started", queue=queue, priority=priority)] = name
    await jobs.work(manager, queues=["a", "b"], concurrency=1, once=True)
    started = {names[j]: (await state_of(jobs, j)).result for j in names}
    assert sorted(started, key=started.__getitem__) == ["a-high", "a1", "a2", "a-low", "b1", "b2"]


async def test_an_idle_worker_wakes_on_enqueue_and_honours_delays(
    jobs: JobQueue, store_url: str, manager: offload.WorkerManager, inbox: Inbox
) -> None:
    """poll_interval is an hour: only the notification path and the due-time timer can wake
    the worker in time."""
    async with anyio.create_task_group() as tg, JobQueue(store_url) as producer:
        tg.start_soon(lambda: jobs.work(manager, queues=["default"], poll_interval=3600))
        await producer.enqueue("jobs-test:ping", {"fifo": str(inbox.path), "name": "now"})
        assert (await inbox.line(timeout=30)).startswith("now ")
        job_id = await producer.enqueue(
            "jobs-test:ping", {"fifo": str(inbox.path), "name": "later"}, delay=1.0
        )
        info = await state_of(producer, job_id)
        _, at = (await inbox.line(timeout=30)).split()
        late = float(at) - info.run_at.timestamp()
        assert late >= 0, "ran before it was due"
        assert late < 10, f"woke {late:.1f} s late: it waited for a poll, not the due time"
        tg.cancel_scope.cancel()


async def test_retries_follow_the_backoff_list_then_succeed(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path, inbox: Inbox
) -> None:
    log = tmp_path / "attempts"
    job_id = await jobs.enqueue(
        "jobs-test:flaky",
        {"log": str(log), "fail": 3, "fifo": str(inbox.path)},
        retries=3,
        backoff=[0.2, 0.4],
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: jobs.work(manager, stop=stop))
        assert await inbox.line() == "succeeded"
        stop.set()  # the running job finishes (and is recorded) within the grace period
    info = await state_of(jobs, job_id)
    assert (info.attempts, info.result, info.error) == (4, "ok after 4", None)
    times = [float(line) for line in log.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.4
    assert gaps[2] >= 0.4


async def test_the_last_attempt_leaves_a_failed_record_with_the_traceback(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    job_id = await jobs.enqueue(
        "jobs-test:fail", {"message": "no mailbox"}, queue="emails", retries=1, backoff=0
    )
    await jobs.work(manager, queues=["emails"], once=True)
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts) == ("failed", 2)
    assert info.error == "KeyError: 'no mailbox'"
    [record] = await jobs.failed(queue="emails")
    assert (record.id, record.queue, record.type, record.data) == (
        job_id,
        "emails",
        "jobs-test:fail",
        {"message": "no mailbox"},
    )
    assert (record.attempts, record.retries, record.error_type) == (2, 1, "KeyError")
    assert record.message == "'no mailbox'"
    assert "jobtasks.py" in record.traceback
    assert "raise KeyError" in record.traceback
    assert record.failed_at == info.finished_at
    assert await jobs.failed(queue="other") == []
    assert (await jobs.stats()).queues["emails"].failed == 1


async def test_retry_from_the_failed_list(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path
) -> None:
    first = await jobs.enqueue("jobs-test:flaky", {"log": str(tmp_path / "1"), "fail": 1})
    second = await jobs.enqueue("jobs-test:flaky", {"log": str(tmp_path / "2"), "fail": 1})
    await jobs.work(manager, once=True)
    assert {r.id for r in await jobs.failed()} == {first, second}
    assert await jobs.retry(first) is True
    info = await state_of(jobs, first)
    assert (info.state, info.attempts, info.error) == ("queued", 0, None)
    assert await jobs.retry_all(queue="default") == 1
    assert await jobs.work(manager, once=True) == 2
    for job_id in (first, second):
        assert (await state_of(jobs, job_id)).state == "done"
    assert await jobs.failed() == []
    assert await jobs.purge(older_than=3600) == 0
    assert await jobs.purge() == 2
    assert await jobs.get(first) is None


async def test_retry_until_ends_retries(jobs: JobQueue, manager: offload.WorkerManager) -> None:
    job_id = await jobs.enqueue("jobs-test:fail", {}, retries=5, backoff=2, retry_until=1.0)
    await jobs.work(manager, once=True)
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts) == ("failed", 1)  # a retry would start after the deadline


async def test_the_timeout_stops_the_work_and_is_not_retried_by_default(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    job_id = await jobs.enqueue("jobs-test:sleep", {"seconds": 60}, timeout=0.5, retries=2)
    with anyio.fail_after(30):  # the 60 s task was stopped at its deadline
        await jobs.work(manager, once=True)
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts, info.error_code) == ("failed", 1, "TIMEOUT")


@pytest.mark.parametrize(
    ("task", "retry_on", "attempts", "code"),
    [
        ("jobs-test:sleep", ["TIMEOUT"], 2, "TIMEOUT"),
        ("jobs-test:crash", None, 2, "WORKER_CRASHED"),
        ("jobs-test:fail", ["WORKER_CRASHED"], 1, None),
        ("jobs-test:fail", [KeyError], 2, None),
        ("jobs-test:fail", [LookupError], 2, None),
    ],
)
async def test_only_errors_in_retry_on_are_retried(
    jobs: JobQueue,
    manager: offload.WorkerManager,
    task: str,
    retry_on: list[Any] | None,
    attempts: int,
    code: str | None,
) -> None:
    job_id = await jobs.enqueue(
        task,
        {"seconds": 30},
        retries=1,
        retry_on=retry_on,
        timeout=0.5 if "sleep" in task else None,
    )
    await jobs.work(manager, once=True)
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts, info.error_code) == ("failed", attempts, code)


async def test_a_result_that_is_not_json_is_not_kept(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    job_id = await jobs.enqueue("jobs-test:opaque")
    await jobs.work(manager, once=True)
    info = await state_of(jobs, job_id)
    assert (info.state, info.result) == ("done", None)


async def test_a_type_no_longer_registered_stays_queued_with_an_error_in_stats(
    jobs: JobQueue, store_url: str, manager: offload.WorkerManager
) -> None:
    async with JobQueue(store_url, check_types=False) as producer:
        gone = await producer.enqueue("jobs-test:removed", {"x": 1}, queue="q")
        fine = await producer.enqueue("jobs-test:add", {"a": 1, "b": 1}, queue="q")
    assert await jobs.work(manager, queues=["q"], once=True) == 1
    assert (await state_of(jobs, fine)).state == "done"
    info = await state_of(jobs, gone)
    assert (info.state, info.attempts, info.error_code) == ("queued", 0, "UNKNOWN_TASK")
    assert info.error is not None
    assert "jobs-test:removed" in info.error
    stats = await jobs.stats()
    [unrunnable] = stats.unrunnable
    assert (unrunnable.queue, unrunnable.type, unrunnable.count) == ("q", "jobs-test:removed", 1)
    assert "UNKNOWN_TASK" in unrunnable.error
    assert await jobs.failed() == []


async def test_the_job_of_a_dead_worker_comes_back_when_its_lease_expires(
    jobs: JobQueue, manager: offload.WorkerManager
) -> None:
    again = await jobs.enqueue("jobs-test:add", {"a": 2, "b": 2}, retries=1)
    lost = await jobs.enqueue("jobs-test:add", {"a": 3, "b": 3}, retries=0)
    # A worker that claims both, then dies without a word (its lease: 0.3 s).
    claimed = await jobs._store.claim(["default"], ["jobs-test:add"], 2, "dead:1:1", 0.3)
    assert {j.id for j in claimed.jobs} == {again, lost}
    assert (await state_of(jobs, again)).state == "running"
    await anyio.sleep(0.4)  # the lease itself is what expires here
    await jobs.work(manager, once=True)
    info = await state_of(jobs, again)
    assert (info.state, info.attempts, info.result) == ("done", 2, 4)
    failed = await state_of(jobs, lost)
    assert (failed.state, failed.attempts, failed.error_code) == ("failed", 1, "LEASE_EXPIRED")
    [record] = await jobs.failed()
    assert record.error_type == "offload.jobs.LeaseExpired"


async def test_cancelling_work_hands_running_jobs_back(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path, inbox: Inbox
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    job_id = await jobs.enqueue("jobs-test:gate", {"gate": str(gate), "started": str(inbox.path)})
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: jobs.work(manager))
        await inbox.line()
        assert (await state_of(jobs, job_id)).state == "running"
        tg.cancel_scope.cancel()
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts) == ("queued", 0)  # handed back, the attempt not counted
    await wait_no_reader(gate)  # the work itself was stopped: nobody waits on the gate


async def test_stop_lets_running_jobs_finish_within_the_grace_period(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path, inbox: Inbox
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    finish = await jobs.enqueue("jobs-test:gate", {"gate": str(gate), "started": str(inbox.path)})
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: jobs.work(manager, stop=stop, grace=60))
        await inbox.line()
        stop.set()
        waiting = await jobs.enqueue("jobs-test:add", {"a": 1, "b": 1})  # not taken: stopping
        await anyio.Path(gate).write_text("finished\n")
    info = await state_of(jobs, finish)
    assert (info.state, info.result) == ("done", "finished")
    assert (await state_of(jobs, waiting)).state == "queued"


async def test_after_the_grace_period_running_jobs_are_handed_back(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path, inbox: Inbox
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    job_id = await jobs.enqueue("jobs-test:gate", {"gate": str(gate), "started": str(inbox.path)})
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: jobs.work(manager, stop=stop, grace=0.2))
        await inbox.line()
        stop.set()
    info = await state_of(jobs, job_id)
    assert (info.state, info.attempts) == ("queued", 0)
    await wait_no_reader(gate)


async def test_a_worker_that_loses_its_lease_stops_the_job_and_records_nothing(
    jobs: JobQueue, manager: offload.WorkerManager, tmp_path: Path, inbox: Inbox
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    job_id = await jobs.enqueue("jobs-test:gate", {"gate": str(gate), "started": str(inbox.path)})
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: jobs.work(manager, lease=0.6))
        await inbox.line()
        await steal(jobs, job_id)  # as if another host had reclaimed it
        await wait_no_reader(gate)  # the renewal saw it and stopped the work
        tg.cancel_scope.cancel()
    info = await state_of(jobs, job_id)
    assert (info.state, info.worker) == ("running", "thief")


async def test_two_workers_on_one_store_never_run_a_job_twice(
    jobs: JobQueue, store_url: str, manager: offload.WorkerManager, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    ids = [
        await jobs.enqueue("jobs-test:record", {"log": str(log), "n": n, "seconds": 0})
        for n in range(60)
    ]
    async with JobQueue(store_url) as other, anyio.create_task_group() as tg:
        tg.start_soon(lambda: other.work(manager, concurrency=4, once=True))
        await jobs.work(manager, concurrency=4, once=True)
    starts = [line.split()[2] for line in log.read_text().splitlines() if line.startswith("S")]
    assert sorted(starts, key=int) == [str(n) for n in range(60)]
    for job_id in ids:
        assert (await state_of(jobs, job_id)).attempts == 1


async def steal(jobs: JobQueue, job_id: str) -> None:
    store = jobs._store

    def take(conn: Any) -> None:
        store.execute(
            conn,
            "UPDATE offload_jobs SET token = 'stolen', worker = 'thief' WHERE id = :id",
            {"id": job_id},
        )

    await store._run(take)


async def wait_no_reader(fifo: Path, timeout: float = 30) -> None:
    """Until nobody has ``fifo`` open for reading (the task waiting on it was stopped)."""
    with anyio.fail_after(timeout):
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            os.close(fd)
            await anyio.sleep(0.05)
