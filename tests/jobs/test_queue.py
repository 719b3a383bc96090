"""The producing and operating side of JobQueue, on both stores and both event loops."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload
from offload.jobs import STATES, JobInfo, JobQueue

pytestmark = pytest.mark.anyio

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

not_json = st.one_of(
    st.tuples(st.integers()),
    st.sets(st.integers(), min_size=1),
    st.binary(),
    st.just(math.nan),
    st.just(math.inf),
    st.dictionaries(st.integers(), st.integers(), min_size=1),
    st.just(datetime(2024, 1, 1, tzinfo=UTC)),
    st.just(object()),
    st.builds(lambda v: {"nested": [1, {"deep": v}]}, st.just((1, 2))),
)


async def test_enqueue_then_get(jobs: JobQueue) -> None:
    job_id = await jobs.enqueue(
        "jobs-test:add", {"a": 1, "b": 2}, queue="maths", retries=3, timeout=5, priority="high"
    )
    info = await jobs.get(job_id)
    assert isinstance(info, JobInfo)
    assert (info.id, info.queue, info.type, info.data) == (
        job_id,
        "maths",
        "jobs-test:add",
        {
            "a": 1,
            "b": 2,
        },
    )
    assert info.state == "queued"
    assert info.attempts == 0
    assert info.error is None
    assert info.result is None
    assert info.finished_at is None
    assert info.run_at == info.created_at
    assert info.created_at.tzinfo is not None
    assert abs((datetime.now(UTC) - info.created_at).total_seconds()) < 60
    assert (info.priority, info.retries, info.timeout) == ("high", 3, 5.0)


async def test_get_of_an_unknown_id_is_none(jobs: JobQueue) -> None:
    assert await jobs.get("no-such-job") is None


async def test_enqueue_of_an_existing_job_id_returns_it_and_stores_nothing(jobs: JobQueue) -> None:
    first = await jobs.enqueue("jobs-test:echo", {"v": 1}, job_id="welcome-42", queue="emails")
    again = await jobs.enqueue("jobs-test:echo", {"v": 2}, job_id="welcome-42", queue="other")
    assert first == again == "welcome-42"
    info = await jobs.get("welcome-42")
    assert info is not None
    assert info.data == {"v": 1}
    assert info.queue == "emails"
    stats = await jobs.stats()
    assert stats.total("queued") == 1
    assert set(stats.queues) == {"emails"}


async def test_delay_and_run_at_set_the_due_time(jobs: JobQueue) -> None:
    delayed = await jobs.get(await jobs.enqueue("jobs-test:echo", delay=60))
    assert delayed is not None
    assert 59 < (delayed.run_at - delayed.created_at).total_seconds() < 61
    when = datetime.now(UTC) + timedelta(hours=1)
    at = await jobs.get(await jobs.enqueue("jobs-test:echo", run_at=when))
    assert at is not None
    assert abs((at.run_at - when).total_seconds()) < 0.01
    stats = await jobs.stats()
    assert (stats.queues["default"].delayed, stats.queues["default"].due) == (2, 0)
    assert stats.oldest_due_age is None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=json_values)
async def test_json_data_comes_back_as_it_went_in(jobs: JobQueue, data: Any) -> None:
    info = await jobs.get(await jobs.enqueue("jobs-test:echo", data))
    assert info is not None
    assert info.data == data


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=not_json)
async def test_data_that_is_not_json_is_refused_at_enqueue(jobs: JobQueue, data: Any) -> None:
    before = (await jobs.stats()).total("queued")
    with pytest.raises(offload.InvalidTask) as caught:
        await jobs.enqueue("jobs-test:echo", data)
    assert caught.value.code == "INVALID_TASK"
    assert "data" in str(caught.value)
    assert (await jobs.stats()).total("queued") == before


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"priority": "urgent"}, "priority"),
        ({"delay": -1}, "delay"),
        ({"delay": math.nan}, "delay"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff": []}, "backoff"),
        ({"backoff": [1, -2]}, "backoff[1]"),
        ({"timeout": 0}, "timeout"),
        ({"queue": ""}, "queue"),
        ({"job_id": "x" * 201}, "job_id"),
        ({"run_at": datetime(2030, 1, 1)}, "aware"),
        ({"delay": 5, "run_at": datetime(2030, 1, 1, tzinfo=UTC)}, "not both"),
        ({"retry_until": -3}, "retry_until"),
        ({"retry_on": [42]}, "retry_on"),
    ],
)
async def test_bad_options_are_refused_with_invalid_task(
    jobs: JobQueue, options: dict[str, Any], says: str
) -> None:
    with pytest.raises(offload.InvalidTask, match=r"\[INVALID_TASK\]") as caught:
        await jobs.enqueue("jobs-test:echo", {}, **options)
    assert says in str(caught.value)
    assert (await jobs.stats()).queues == {}


async def test_an_unregistered_type_is_refused_unless_types_are_not_checked(
    jobs: JobQueue, store_url: str
) -> None:
    with pytest.raises(offload.UnknownTask) as caught:
        await jobs.enqueue("jobs-test:nope", {})
    assert caught.value.code == "UNKNOWN_TASK"
    async with JobQueue(store_url, check_types=False) as producer:
        job_id = await producer.enqueue("jobs-test:nope", {})
    info = await jobs.get(job_id)
    assert info is not None
    assert info.state == "queued"


async def test_stats_count_per_queue_and_state(jobs: JobQueue) -> None:
    for _ in range(3):
        await jobs.enqueue("jobs-test:echo", queue="a")
    await jobs.enqueue("jobs-test:echo", queue="b", delay=3600)
    stats = await jobs.stats()
    assert stats.counts == {
        "a": {"queued": 3, "running": 0, "done": 0, "failed": 0},
        "b": {"queued": 1, "running": 0, "done": 0, "failed": 0},
    }
    assert (stats.queues["a"].due, stats.queues["b"].delayed) == (3, 1)
    assert stats.oldest_due_age is not None
    assert stats.oldest_due_age >= 0
    assert stats.queues["b"].oldest_due_age is None
    assert stats.as_dict()["queues"]["a"]["due"] == 3
    assert all(stats.total(state) >= 0 for state in STATES)


async def test_purge_and_forget_queued_jobs(jobs: JobQueue) -> None:
    keep = await jobs.enqueue("jobs-test:echo", queue="keep")
    for _ in range(3):
        await jobs.enqueue("jobs-test:echo", queue="clear")
    assert await jobs.purge("clear") == 0  # only done records by default
    assert await jobs.purge("clear", state="queued", older_than=3600) == 0
    assert await jobs.purge("clear", state="queued") == 3
    assert await jobs.forget(keep) is True
    assert await jobs.forget(keep) is False
    assert await jobs.get(keep) is None
    with pytest.raises(offload.InvalidTask):
        await jobs.purge(state="running")


async def test_retry_of_a_job_that_has_not_failed_is_refused(jobs: JobQueue) -> None:
    job_id = await jobs.enqueue("jobs-test:echo")
    assert await jobs.retry(job_id) is False
    assert await jobs.retry("no-such-job") is False
    assert await jobs.retry_all() == 0
    assert await jobs.failed() == []


async def test_operations_need_an_open_queue(store_url: str) -> None:
    jobs = JobQueue(store_url)
    with pytest.raises(RuntimeError, match="not open"):
        await jobs.get("x")
    async with jobs:
        assert await jobs.get("x") is None
    with pytest.raises(RuntimeError, match="not open"):
        await jobs.enqueue("jobs-test:echo")
    assert "closed" in repr(jobs)
