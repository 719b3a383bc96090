"""WorkerManager on Dask: the process kind's acceptance checks against real LocalClusters.

Most tests share one module-scoped cluster (two worker processes) through
``DaskKind(address=...)``; tests that need to watch workers die or a cluster start and stop
start their own with ``WorkerManager(kind="dask")``. The Dask kind runs on asyncio only (its
client is asyncio's): every test runs there but the one that checks trio's refusal.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.resource_tracker
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

distributed = pytest.importorskip("distributed")

import offload.tasks  # noqa: E402
import tasks  # noqa: E402
from conftest import release  # noqa: E402
from offload import (  # noqa: E402
    ManagerClosed,
    NotSerializable,
    PayloadTooLarge,
    Priority,
    QueueFull,
    Task,
    TaskFailed,
    TaskTimeout,
    UnsupportedKind,
    WorkerCrashed,
    WorkerManager,
    WorkerStartFailed,
)
from offload._offload_worker import codec, protocol  # noqa: E402
from offload._outcome import decode  # noqa: E402
from offload.dask import DaskKind  # noqa: E402
from offload.dask._backend import _body  # noqa: E402
from offload.dask._isolated import close_isolated, run_isolated  # noqa: E402
from offload.dask._runner import run_here  # noqa: E402

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def anyio_backend() -> str:
    """Dask's client is asyncio's (``test_trio_is_refused_clearly`` overrides this)."""
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def resource_tracker() -> None:
    """LocalCluster starts workers with multiprocessing's "spawn", which starts Python's
    resource tracker: one helper process per interpreter, alive until it exits. Start it
    before the first test so the leak check does not take it for a worker."""
    multiprocessing.resource_tracker.ensure_running()


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A two-worker LocalCluster for the module; yields its scheduler address."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs={"allowed_failures": 0},
    ) as local:
        yield local.scheduler_address


def manager(address: str, *, isolate: bool = False, in_flight: int | None = None,
            **options: Any) -> WorkerManager:  # fmt: skip
    options.setdefault("shutdown_grace", 5.0)
    kind = DaskKind(address=address, isolate=isolate, in_flight=in_flight)
    return WorkerManager(kind=kind, **options)


async def worker_pids(address: str) -> set[int]:
    """The pids of the cluster's Dask worker processes (asked through a client of our own)."""
    async with distributed.Client(address, asynchronous=True, set_as_default=False) as client:
        return set((await client.run(os.getpid)).values())


# -- results -------------------------------------------------------------------------------


async def test_results_and_registered_tasks(cluster: str) -> None:
    async with manager(cluster) as wm:
        assert await wm.run(tasks.add, 1, 2) == 3
        assert await wm.execute_task(Task(tasks.add, args=(2, 3), priority=Priority.LOW)) == 5
        assert await wm.execute_task(Task(functools.partial(tasks.add, b=10), args=(1,))) == 11
        spec = {"id": "a1", "type": "test:add", "data": {"a": 2, "b": 40}, "timeout": 5}
        assert await wm.execute_task(spec) == 42
        stats = wm.stats()
        assert (stats.kind, stats.workers, stats.completed) == ("dask", 2, 4)
        assert wm.worker_pids() == []  # not our cluster: its workers are not ours to list


@pytest.mark.parametrize("isolate", [False, True])
async def test_builtin_tasks_run_unchanged(cluster: str, isolate: bool) -> None:
    import jwt

    async with manager(cluster, isolate=isolate) as wm:
        digest = await wm.execute_task({"type": "crypto:hash", "data": {"data": "abc"}})
        assert digest == offload.tasks.digest("abc")
        frame = await wm.execute_task({"type": "compress:gzip", "data": {"data": b"z" * 10_000}})
        assert offload.tasks.decompress_gzip(frame) == b"z" * 10_000
        token = await wm.execute_task(
            {"type": "jwt:sign", "data": {"claims": {"sub": "7"}, "key": SECRET}}
        )
        assert jwt.decode(token, SECRET, algorithms=["HS256"]) == {"sub": "7"}


async def test_many_concurrent_tasks(cluster: str) -> None:
    async with manager(cluster, max_queue=1000) as wm:
        results = await asyncio.gather(*(wm.run(tasks.add, i, 1) for i in range(200)))
        assert results == [i + 1 for i in range(200)]
        assert wm.stats().completed == 200


async def test_large_arguments_and_results(cluster: str) -> None:
    data = bytes(range(256)) * (80 * 1024)  # 20 MiB: over Dask's large-graph warning
    async with manager(cluster) as wm:
        assert await wm.run(tasks.echo, data) == data
    async with manager(cluster, isolate=True) as wm:
        assert await wm.run(tasks.echo, data[: 8 << 20]) == data[: 8 << 20]


# -- order and backpressure ----------------------------------------------------------------


async def test_priority_order_on_one_worker(fifo: Path) -> None:
    """A development cluster of one worker: Dask gets a task only when its thread is free,
    so everything waiting is in the local queue, in strict priority order."""
    order: list[str] = []

    async def submit(name: str, priority: str) -> None:
        await wm.run(tasks.echo, name, priority=priority)
        order.append(name)

    async with WorkerManager(kind="dask", workers=1, shutdown_grace=5.0) as wm:
        assert len(wm.worker_pids()) == 1
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)  # the blocker is handed to Dask
        names = [("low1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"),
                 ("h2", "high"), ("low2", "low"), ("h3", "high")]  # fmt: skip
        waiting = [asyncio.create_task(submit(n, p)) for n, p in names]
        await asyncio.sleep(0)
        assert wm.stats().queued_by_priority == {"high": 3, "normal": 2, "low": 2}
        assert wm.stats().running == 1
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        await asyncio.gather(*waiting)
    assert order == ["h1", "h2", "h3", "n1", "n2", "low1", "low2"]


async def test_queue_full_raises_at_once(cluster: str, fifo: Path) -> None:
    async with manager(cluster, in_flight=1, max_queue=2) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)
        accepted = [asyncio.create_task(wm.run(tasks.add, i, 0)) for i in range(2)]
        await asyncio.sleep(0)
        assert wm.stats().queued == 2
        refused = wm.run(tasks.add, 1, 1)
        with pytest.raises(QueueFull) as info:
            refused.send(None)  # the first step raises: the caller never waits
        assert info.value.code == "QUEUE_FULL"
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        assert await asyncio.gather(*accepted) == [0, 1]
        stats = wm.stats()
    assert (stats.rejected, stats.completed, stats.submitted) == (1, 3, 3)


def user_priorities(prefix: str, dask_scheduler: Any = None) -> dict[str, int]:
    """On the scheduler: the user priority of each task whose key starts with ``prefix``."""
    return {k: -ts.priority[0] for k, ts in dask_scheduler.tasks.items() if k.startswith(prefix)}


async def test_dask_priorities(cluster: str, fifo: Path, tmp_path: Path) -> None:
    """What Dask holds carries the task's priority: high 10, normal 0, low -10."""
    gates = [fifo, tmp_path / "gate2", tmp_path / "gate3"]
    for gate in gates[1:]:
        os.mkfifo(gate)
    async with (
        manager(cluster, in_flight=3) as wm,
        distributed.Client(cluster, asynchronous=True, set_as_default=False) as client,
    ):
        calls = [
            asyncio.create_task(wm.run(tasks.wait_for_fifo, str(gate), priority=priority))
            for gate, priority in zip(gates, ["high", "normal", "low"], strict=True)
        ]
        seen: dict[str, int] = {}
        async with asyncio.timeout(20):  # until the scheduler holds all three
            while len(seen) < 3:
                await asyncio.sleep(0.05)
                seen = await client.run_on_scheduler(user_priorities, "offload-wait_for_fifo-")
        assert sorted(seen.values()) == [-10, 0, 10]
        await asyncio.gather(*(asyncio.to_thread(release, gate) for gate in gates))
        assert await asyncio.gather(*calls) == ["go"] * 3


# -- deadlines and cancellation ------------------------------------------------------------


async def test_timeout_while_queued(cluster: str, fifo: Path) -> None:
    async with manager(cluster, in_flight=1) as wm:
        blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
        await asyncio.sleep(0)
        with pytest.raises(TaskTimeout) as info:
            await wm.run(tasks.add, 2, 2, timeout=0.1)
        assert "waiting in the queue" in str(info.value)
        assert wm.stats().queued == 0
        await asyncio.to_thread(release, fifo)
        assert await blocker == "go"
        assert wm.stats().timed_out == 1


async def test_timeout_while_running_is_on_time_but_dask_finishes_the_call(
    cluster: str, tmp_path: Path
) -> None:
    """Dask cannot interrupt a running task: the caller hears TIMEOUT on time, the call
    itself runs to its end in its Dask worker (documented; isolate=True stops it)."""
    marker = tmp_path / "marker"
    async with manager(cluster) as wm:
        started = time.perf_counter()
        with pytest.raises(TaskTimeout) as info:
            await wm.run(tasks.sleep_then_mark, 2.0, str(marker), timeout=0.2)
        assert 0.2 <= time.perf_counter() - started < 1.5  # long before the call ends
        assert info.value.code == "TIMEOUT"
        assert "running" in str(info.value)
        assert await wm.run(tasks.add, 1, 1) == 2
        deadline = time.perf_counter() + 20
        while not marker.exists() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    assert marker.exists()


async def test_isolated_timeout_and_cancellation_stop_the_work(
    cluster: str, tmp_path: Path
) -> None:
    markers = [tmp_path / "timeout", tmp_path / "cancel"]
    async with manager(cluster, isolate=True) as wm:
        dask_workers = await worker_pids(cluster)
        child = await wm.run(tasks.pid)
        assert child not in dask_workers  # the call ran in a child of a Dask worker
        started = time.perf_counter()
        with pytest.raises(TaskTimeout):
            await wm.run(tasks.sleep_then_mark, 0.8, str(markers[0]), timeout=0.2)
        assert time.perf_counter() - started < 2.0
        call = asyncio.create_task(wm.run(tasks.sleep_then_mark, 0.8, str(markers[1])))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await wm.run(tasks.add, 1, 1) == 2
        await asyncio.sleep(1.0)  # both calls would have written their marker by now
        stats = wm.stats()
        assert await worker_pids(cluster) == dask_workers  # no Dask worker was restarted
    assert (stats.timed_out, stats.cancelled) == (1, 1)
    assert not any(m.exists() for m in markers)


def test_deadlines_under_a_plain_asyncio_loop(cluster: str, tmp_path: Path) -> None:
    """Under ``asyncio.run`` (no anyio runner around it) a deadline fires in a loop callback,
    where no anyio task can be started: the stop still happens, and the work stops."""
    marker = tmp_path / "marker"

    async def main() -> tuple[float, int]:
        async with manager(cluster, isolate=True) as wm:
            started = time.perf_counter()
            with pytest.raises(TaskTimeout):
                await wm.run(tasks.sleep_then_mark, 0.8, str(marker), timeout=0.2)
            took = time.perf_counter() - started
            assert await wm.run(tasks.add, 1, 1) == 2
            await asyncio.sleep(1.0)  # the call would have written its marker by now
            return took, wm.stats().timed_out

    took, timed_out = asyncio.run(main())
    assert took < 2.0
    assert timed_out == 1
    assert not marker.exists()


# -- failures ------------------------------------------------------------------------------


async def test_exceptions_round_trip(cluster: str) -> None:
    async with manager(cluster) as wm:
        with pytest.raises(ValueError, match="bad thing") as info:
            await wm.run(tasks.boom)
        assert "raise ValueError(message)" in str(info.value.__cause__)
        with pytest.raises(TaskFailed) as failed:
            await wm.run(tasks.raise_unrebuildable)
        assert failed.value.code == "WORKER_ERROR"
        assert failed.value.exc_type == "tasks.NeedsTwoArgs"
        with pytest.raises(TaskFailed, match="SystemExit"):
            await wm.run(tasks.raise_system_exit)
        assert await wm.run(tasks.add, 1, 1) == 2
        assert wm.stats().failed == 3


@pytest.mark.parametrize("isolate", [False, True])
async def test_not_serializable_and_payload_limits(cluster: str, isolate: bool) -> None:
    async with manager(cluster, isolate=isolate, max_payload=10_000) as wm:
        with pytest.raises(NotSerializable) as info:
            await wm.run(tasks.echo, lambda: None)
        assert info.value.code == "NOT_SERIALIZABLE"
        with pytest.raises(NotSerializable, match="result"):
            await wm.run(tasks.return_unpicklable)
        with pytest.raises(PayloadTooLarge):
            await wm.run(tasks.echo, b"x" * 20_000)
        with pytest.raises(PayloadTooLarge, match="result"):
            await wm.run(tasks.big, 20_000)
        assert len(await wm.run(tasks.big, 5_000)) == 5_000


@pytest.mark.parametrize("crash", [tasks.exit_now, tasks.segfault])
async def test_isolated_crash_fails_only_its_task(cluster: str, crash: Any) -> None:
    async with manager(cluster, isolate=True) as wm:
        dask_workers = await worker_pids(cluster)
        others = [asyncio.create_task(wm.run(tasks.spin, 0.05)) for _ in range(4)]
        with pytest.raises(WorkerCrashed) as info:
            await wm.run(crash)
        assert ("exit code 3" if crash is tasks.exit_now else "SIGSEGV") in str(info.value)
        assert await asyncio.gather(*others) == [0.05] * 4
        assert await wm.run(tasks.add, 1, 1) == 2
        assert await worker_pids(cluster) == dask_workers
        stats = wm.stats()
    assert (stats.crashed, stats.worker_restarts) == (1, 1)


async def test_worker_death_on_a_local_cluster() -> None:
    """Without isolation a crash kills the Dask worker: WORKER_CRASHED for that task only
    (``allowed_failures=0``), its nanny starts a new worker, and nothing outlives the manager.
    """
    async with WorkerManager(kind="dask", workers=2, shutdown_grace=5.0) as wm:
        first = set(wm.worker_pids())
        assert len(first) == 2
        others = [asyncio.create_task(wm.run(tasks.spin, 0.05)) for _ in range(4)]
        with pytest.raises(WorkerCrashed) as info:
            await wm.run(tasks.exit_now)
        assert info.value.code == "WORKER_CRASHED"
        assert await asyncio.gather(*others) == [0.05] * 4
        assert await wm.run(tasks.add, 1, 1) == 2
        deadline = time.perf_counter() + 20
        while len(wm.worker_pids()) < 2 and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        now = set(wm.worker_pids())
        assert len(now) == 2
        assert len(now & first) == 1  # one worker replaced
        stats = wm.stats()
    assert (stats.crashed, stats.worker_restarts) == (1, 1)
    assert not any(psutil.pid_exists(pid) for pid in first | now)


async def test_isolated_children_get_the_memory_limit(
    cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with manager(cluster, isolate=True, worker_memory_limit=400 * 2**20) as wm:
        with pytest.raises(MemoryError):
            await wm.run(tasks.allocate, 1024)
        assert await wm.run(tasks.allocate, 10) == 10 * 2**20  # the child survived
    async with manager(cluster, max_tasks_per_worker=10, worker_memory_limit=2**30):
        pass
    assert "max_tasks_per_worker, worker_memory_limit: not for dask workers" in caplog.text
    async with manager(cluster, min_workers=1, max_workers=3) as wm:
        assert wm.stats().workers == 2  # the cluster's own size
    assert "min_workers/max_workers: not for dask workers" in caplog.text


# -- shutdown ------------------------------------------------------------------------------


async def test_drain_on_exit_finishes_queued_work(cluster: str) -> None:
    async with manager(cluster, in_flight=1) as wm:
        calls = [asyncio.create_task(wm.run(tasks.spin, 0.02)) for _ in range(6)]
        await asyncio.sleep(0)
    assert await asyncio.gather(*calls) == [0.02] * 6


@pytest.mark.parametrize("isolate", [False, True])
async def test_forced_shutdown_after_grace(cluster: str, fifo: Path, isolate: bool) -> None:
    wm = await manager(cluster, isolate=isolate, in_flight=1).start()
    blocker = asyncio.create_task(wm.run(tasks.wait_for_fifo, str(fifo)))
    queued = [asyncio.create_task(wm.run(tasks.add, i, 1)) for i in range(3)]
    await asyncio.sleep(0.3)
    started = time.perf_counter()
    await wm.shutdown(grace=0.2)
    assert time.perf_counter() - started < 5.0
    for call in (blocker, *queued):
        with pytest.raises(ManagerClosed) as info:
            await call
        assert info.value.code == "SHUTDOWN"
    assert wm.stats().shutdown == 4
    if not isolate:  # the call is still blocked in its Dask worker: let it go
        await asyncio.to_thread(release, fifo)
    # isolate=True: the child blocked on the FIFO was killed (the leak check would see it).


async def test_a_client_passed_in_is_left_open(cluster: str) -> None:
    client = await distributed.Client(cluster, asynchronous=True, set_as_default=False)
    try:
        async with WorkerManager(kind=DaskKind(client=client), shutdown_grace=5.0) as wm:
            assert await wm.run(tasks.add, 20, 22) == 42
        assert client.status == "running"
        assert await client.submit(tasks.add, 1, 1) == 2
    finally:
        await client.close()


# -- construction --------------------------------------------------------------------------


async def test_example_runs() -> None:
    example = EXAMPLES / "dask_cluster.py"
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    done = await asyncio.to_thread(run, [sys.executable, str(example)], check=False)
    assert done.returncode == 0, done.stderr
    assert "jwt from a dask worker: True" in done.stdout
    assert "TIMEOUT after 0.5" in done.stdout


async def test_unreachable_scheduler_fails_start() -> None:
    started = time.perf_counter()
    wm = WorkerManager(kind=DaskKind(address="tcp://127.0.0.1:9"), start_timeout=1.0)
    with pytest.raises(WorkerStartFailed) as info:
        await wm.start()
    assert info.value.code == "WORKER_START_FAILED"
    assert time.perf_counter() - started < 10
    assert wm.closed


async def test_sync_client_is_refused(cluster: str) -> None:
    with distributed.Client(cluster, set_as_default=False) as client:
        wm = WorkerManager(kind=DaskKind(client=client), start_timeout=5.0)
        with pytest.raises(WorkerStartFailed, match="asynchronous"):
            await wm.start()


async def test_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not both"):
        DaskKind(address="tcp://127.0.0.1:8786", client=object())
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="in_flight"):
            DaskKind(in_flight=bad)  # type: ignore[arg-type]
    assert "isolate=True" in repr(DaskKind(isolate=True))
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(UnsupportedKind, match=r"pip install '\.\[dask\]'"):
        WorkerManager(kind="dask")


# -- what Dask does not do -------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_clearly(cluster: str) -> None:
    """Dask's client is asyncio's: on trio the manager refuses the kind before it connects."""
    for kind in ("dask", DaskKind(address=cluster)):
        wm = WorkerManager(kind=kind)
        with pytest.raises(UnsupportedKind) as info:
            await wm.start()
        assert info.value.code == "UNSUPPORTED_KIND"
        assert "asyncio only" in str(info.value)
        assert "this is trio" in str(info.value)
        assert wm.worker_pids() == []  # nothing was started (the leak check agrees)


async def test_streams_are_refused(cluster: str) -> None:
    async def consume(wm: WorkerManager) -> list[int]:
        async with wm.stream(range, 3) as items:
            return [item async for item in items]

    async with manager(cluster) as wm:
        with pytest.raises(UnsupportedKind, match="cannot stream") as info:
            await consume(wm)
        assert info.value.code == "UNSUPPORTED_KIND"
        assert await wm.run(tasks.add, 1, 1) == 2  # the manager goes on


# -- the runners, with the worker package's codec ----------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    size=st.sampled_from([0, 7, codec.SHARED_MIN - 1, codec.SHARED_MIN, 3 * codec.SHARED_MIN]),
    fill=st.binary(min_size=1, max_size=8),
    out_of_band=st.booleans(),
)
def test_run_here_answers_as_a_worker_does(size: int, fill: bytes, out_of_band: bool) -> None:
    """A call encoded as the manager encodes it (bytes, or a Payload with its buffers inline)
    comes back from ``run_here`` as a worker package answer that ``decode`` reads."""
    data = (fill * size)[:size]
    body, oob = _body(codec.encode((tasks.checksum, (bytearray(data),), {}), out_of_band))
    assert oob == (out_of_band and size >= codec.SHARED_MIN)
    tag, answer, seconds = run_here(body, oob, 1 << 20)
    assert tag == protocol.OK
    assert seconds >= 0
    assert decode(tag, answer, "dask", None) == tasks.checksum(bytearray(data))


@pytest.mark.parametrize("isolate", [False, True])
async def test_out_of_band_calls_run_on_the_cluster(cluster: str, isolate: bool) -> None:
    """A ``Payload`` call (out-of-band buffers: the manager makes them only for local kinds)
    runs on a Dask worker in its thread and in an isolated child, and its answer decodes."""
    data = bytes(range(256)) * 1024  # 256 KiB: over codec.SHARED_MIN
    payload = codec.encode((tasks.echo, (data,), {}), True)
    assert isinstance(payload, codec.Payload)
    body, oob = _body(payload)
    token = f"test{os.getpid()}{isolate}"
    settings_ = {"main": None, "max_payload": 1 << 24, "rlimit_as": None}
    async with distributed.Client(cluster, asynchronous=True, set_as_default=False) as client:
        if isolate:
            future = client.submit(run_isolated, body, oob, settings_, token, f"{token}-1")
        else:
            future = client.submit(run_here, body, oob, 1 << 24)
        tag, answer, _ = await future
        try:
            buffers = None
            if tag & protocol.OOB:  # an isolated child sends big results out of band
                tag &= ~protocol.OOB
                answer, buffers, _ = codec.decode_body(memoryview(answer), [])
            assert decode(tag, answer, "dask", None, buffers) == data
        finally:
            if isolate:
                await client.run(close_isolated, token)
