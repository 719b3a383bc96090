"""The scenarios, each an async function ``(system, params) -> raw result dict``.

Every scenario starts the system, measures, and stops it again (in ``finally``), so no
system's workers are alive while another system is measured. Loops are bounded by a count
*and* a time budget; whichever comes first ends them. Raw samples go into the result so the
JSON output keeps them; the summary is computed by :mod:`benchmarks.report`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import _tasks
from .systems import Floor, System

MiB = 1 << 20


@dataclass
class Params:
    """Counts and budgets for one run; ``quick()`` is the CI-sized variant."""

    latency_calls: int = 2000
    latency_budget: float = 1.0
    latency_block: int = 20
    throughput_tasks: int = 20_000
    throughput_inflight: int = 256
    throughput_budget: float = 2.0
    cpu_tasks: int = 16
    cpu_task_ms: float = 50.0
    looplag_seconds: float = 0.75
    looplag_task_ms: float = 50.0
    payload_mib: int = 8
    payload_trips: int = 6
    payload_budget: float = 2.0
    payload_call_timeout: float = 15.0
    timeout_deadline: float = 0.1
    timeout_sleep: float = 10.0
    import_runs: int = 2
    overload_seconds: float = 20.0
    overload_capacity_s: float = 10.0
    overload_baseline_s: float = 5.0
    overload_hash_s: float = 0.6
    overload_deadline: float = 2.0
    overload_factor: float = 2.0
    overload_cheap_rate: float = 100.0
    overload_scrypt_p: int = 0  # filled in by the orchestrator's calibration (0: calibrate here)
    burn_per_ms: float = 0.0  # filled in by the orchestrator's calibration
    map_items: int = 100_000
    map_all_chunksizes: bool = True
    stream_items: int = 20_000
    stream_run_calls: int = 5_000
    stream_budget: float = 1.5
    payloadlag_mib: int = 100
    payloadlag_seconds: float = 1.5
    payloadlag_call_timeout: float = 60.0

    @classmethod
    def quick(cls) -> Params:
        return cls(
            latency_calls=100,
            latency_budget=0.2,
            throughput_tasks=500,
            throughput_inflight=64,
            throughput_budget=1.0,
            cpu_tasks=4,
            cpu_task_ms=20.0,
            looplag_seconds=0.2,
            looplag_task_ms=20.0,
            payload_trips=2,
            payload_budget=0.5,
            payload_call_timeout=5.0,
            timeout_sleep=1.0,
            import_runs=1,
            overload_seconds=8.0,
            overload_capacity_s=5.0,
            overload_baseline_s=2.0,
            map_items=5_000,
            map_all_chunksizes=False,
            stream_items=1_000,
            stream_run_calls=200,
            stream_budget=0.3,
            payloadlag_mib=16,
            payloadlag_seconds=0.3,
            payloadlag_call_timeout=20.0,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * (len(s) - 1))))
    return s[k]


async def _started(system: System, settled: bool = True) -> None:
    await asyncio.wait_for(system.start(), 60)
    if settled:  # steady state: what a system starts in the background has finished
        await asyncio.wait_for(system.settle(), 60)


async def _closed(system: System) -> float:
    t0 = time.perf_counter()
    await asyncio.wait_for(system.aclose(), 30)
    return (time.perf_counter() - t0) * 1000.0


async def _timed_calls(
    system: System, fn: Callable[..., Any], n: int, out: list[float], make_arg: Callable[[int], Any]
) -> None:
    perf = time.perf_counter_ns
    for i in range(n):
        arg = make_arg(i)
        t0 = perf()
        await system.call(fn, arg)
        out.append((perf() - t0) / 1000.0)


# --------------------------------------------------------------------------- latency


async def latency(system: System, p: Params) -> dict[str, Any]:
    """Echo round trips one at a time, in blocks alternating with an in-runner floor."""
    floor = Floor()
    await floor.start()
    await _started(system)
    try:

        def ident(i: int) -> int:
            return i

        for _ in range(20):
            await system.call(_tasks.echo, 0)
            await floor.call(_tasks.echo, 0)
        samples: list[float] = []
        floor_samples: list[float] = []
        deadline = time.monotonic() + p.latency_budget
        while len(samples) < p.latency_calls and time.monotonic() < deadline:
            await _timed_calls(system, _tasks.echo, p.latency_block, samples, ident)
            await _timed_calls(floor, _tasks.echo, p.latency_block, floor_samples, ident)
        return {
            "samples_us": samples,
            "floor_samples_us": floor_samples,
            "median_us": statistics.median(samples),
            "p99_us": pct(samples, 99),
            "floor_median_us": statistics.median(floor_samples),
            "n": len(samples),
        }
    finally:
        await _closed(system)
        await floor.aclose()


# --------------------------------------------------------------------------- throughput


async def throughput(system: System, p: Params) -> dict[str, Any]:
    """``throughput_tasks`` echo tasks with ``throughput_inflight`` in flight; tasks/s."""
    await _started(system)
    try:
        await asyncio.gather(*(system.call(_tasks.echo, i) for i in range(8)))
        remaining = p.throughput_tasks
        done = 0
        stop_at = time.monotonic() + p.throughput_budget

        async def submitter() -> None:
            # ``inflight`` of these, each with one call outstanding: the same concurrency
            # as an ``asyncio.Semaphore(inflight)`` around ``throughput_tasks`` calls,
            # without a task object per call.
            nonlocal remaining, done
            while remaining > 0 and time.monotonic() < stop_at:
                remaining -= 1
                await system.call(_tasks.echo, remaining)
                done += 1

        t0 = time.perf_counter()
        subs = [asyncio.ensure_future(submitter()) for _ in range(p.throughput_inflight)]
        # Submitters stop starting calls at the budget; calls still outstanding at 1.5x
        # the budget are cancelled and not counted (anyio's to_interpreter can otherwise
        # spend a minute creating an interpreter per outstanding call).
        finished, pending = await asyncio.wait(subs, timeout=1.5 * p.throughput_budget + 0.5)
        elapsed = time.perf_counter() - t0
        completed = done
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=30)
        for task in finished:
            task.result()  # a failed call fails the measurement
        return {
            "tasks": completed,
            "seconds": elapsed,
            "tasks_per_s": completed / elapsed,
            "budget_hit": completed < p.throughput_tasks,
            "cut_off": len(pending),
        }
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- cpu


async def cpu(system: System, p: Params) -> dict[str, Any]:
    """``cpu_tasks`` pure-Python tasks of ~``cpu_task_ms``; wall time and utilisation."""
    iters = max(1, int(p.burn_per_ms * p.cpu_task_ms))
    await _started(system)
    try:
        await asyncio.gather(*(system.call(_tasks.who) for _ in range(4)))
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(system.call(_tasks.burn, iters) for _ in range(p.cpu_tasks))
        )
        wall = time.perf_counter() - t0
        cpu_s = [r["cpu"] for r in results]
        return {
            "wall_s": wall,
            "task_cpu_s": cpu_s,
            "task_wall_s": [r["wall"] for r in results],
            "iterations": iters,
            "utilisation": sum(cpu_s) / (wall * 2),
            "task_cpu_ms_median": statistics.median(cpu_s) * 1000.0,
        }
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- looplag


async def looplag(system: System, p: Params) -> dict[str, Any]:
    """Event-loop lag seen by a 1 ms ticker while both workers run CPU tasks.

    For the floors (which cannot run code) this is the idle-loop baseline.
    """
    iters = max(1, int(p.burn_per_ms * p.looplag_task_ms))
    await _started(system)
    try:
        await asyncio.gather(*(system.call(_tasks.who) for _ in range(4)))
        stop = False
        completed = 0

        async def load() -> None:
            nonlocal completed
            while not stop:
                await system.call(_tasks.burn, iters)
                completed += 1

        loaders = []
        if system.runs_code:
            loaders = [asyncio.ensure_future(load()) for _ in range(4)]
            await asyncio.sleep(0.05)  # let both workers get busy
        lags: list[float] = []
        end = time.perf_counter() + p.looplag_seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t0 - 0.001) * 1000.0)
        stop = True
        if loaders:
            await asyncio.wait_for(asyncio.gather(*loaders), 30 + p.looplag_task_ms / 100)
        return {
            "lag_ms": lags,
            "p50_ms": pct(lags, 50),
            "p99_ms": pct(lags, 99),
            "max_ms": max(lags),
            "ticks": len(lags),
            "load_tasks": completed,
        }
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- payload


async def payload(system: System, p: Params) -> dict[str, Any]:
    """Echo an ``payload_mib`` MiB buffer: bytes, bytearray, memoryview (where accepted)."""
    size = p.payload_mib * MiB
    data = os.urandom(size)
    kinds: dict[str, Callable[[], Any]] = {
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(bytearray(data)),
    }
    await _started(system)
    out: dict[str, Any] = {"mib": p.payload_mib}
    try:
        await system.call(_tasks.echo, 0)
        # Which kinds does the system accept? One checked call each (also a warm-up).
        args: dict[str, Any] = {}
        for kind, make in kinds.items():
            if kind in system.rejects:
                out[kind] = {"error": f"not accepted: {system.rejects[kind]}"}
                continue
            arg = make()
            try:
                t0 = time.perf_counter()
                first = await asyncio.wait_for(
                    system.call(_tasks.echo, arg), p.payload_call_timeout
                )
                first_s = time.perf_counter() - t0
                if (
                    len(first) != size
                    or bytes(first[:64]) != data[:64]
                    or first[-64:] != data[-64:]
                ):
                    raise ValueError(f"echo returned {type(first).__name__} of {len(first)}")
            except Exception as exc:
                out[kind] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            args[kind] = arg
            out[kind] = {"first_s": first_s, "result_type": type(first).__name__, "seconds": []}
        if args:
            # Allocators warm up over the first few large buffers (glibc's mmap threshold
            # adapts): two more untimed trips, then the kinds interleaved round by round.
            for _ in range(2):
                await asyncio.wait_for(system.call(_tasks.echo, data), p.payload_call_timeout)
            stop_at = time.monotonic() + p.payload_budget
            for _ in range(p.payload_trips):
                if time.monotonic() >= stop_at:
                    break
                for kind, arg in args.items():
                    t0 = time.perf_counter()
                    await asyncio.wait_for(system.call(_tasks.echo, arg), p.payload_call_timeout)
                    out[kind]["seconds"].append(time.perf_counter() - t0)
        for kind in args:
            times = out[kind]["seconds"] or [out[kind]["first_s"]]
            med = statistics.median(times)
            out[kind]["median_ms"] = med * 1000.0
            out[kind]["mib_per_s"] = p.payload_mib / med
        return out
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- timeout


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


async def timeout(system: System, p: Params) -> dict[str, Any]:
    """A running ``timeout_sleep`` s task with a ``timeout_deadline`` s deadline."""
    tmp = tempfile.mkdtemp(prefix="offload-bench-timeout-")
    hb = os.path.join(tmp, "heartbeat")
    done = os.path.join(tmp, "done")
    await _started(system)
    try:
        await asyncio.gather(*(system.call(_tasks.who) for _ in range(4)))
        deadline = p.timeout_deadline
        t0 = time.perf_counter()
        outcome = "returned"
        try:
            await asyncio.wait_for(
                system.call_with_timeout(
                    deadline, _tasks.sleep_heartbeat, p.timeout_sleep, hb, done
                ),
                p.timeout_sleep + 15,
            )
        except TimeoutError as exc:
            outcome = type(exc).__name__
            if type(exc).__module__ not in ("builtins", "asyncio.exceptions"):
                outcome = f"{type(exc).__module__}.{outcome}"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"[:120]
        back = time.perf_counter()
        back_ms = (back - t0) * 1000.0

        t1 = time.perf_counter()
        next_error = None
        try:
            await asyncio.wait_for(system.call(_tasks.echo, 1), 20)
        except Exception as exc:
            next_error = f"{type(exc).__name__}: {exc}"[:120]
        next_ms = (time.perf_counter() - t1) * 1000.0
        after = []
        for _ in range(5):
            t2 = time.perf_counter()
            try:
                await asyncio.wait_for(system.call(_tasks.echo, 1), 20)
            except Exception:
                break
            after.append((time.perf_counter() - t2) * 1000.0)

        # Was the work stopped? The heartbeat file must stop growing and "done" never appear.
        await asyncio.sleep(max(0.0, back + 0.25 - time.perf_counter()))
        s1 = _size(hb)
        await asyncio.sleep(0.3)
        s2 = _size(hb)
        worker_pid = None
        try:
            with open(hb) as f:
                worker_pid = int(f.readline().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        completed = os.path.exists(done)
        stopped = s1 >= 0 and s1 == s2 and not completed
        separate = worker_pid is not None and worker_pid != os.getpid()
        return {
            "deadline_ms": deadline * 1000.0,
            "control_back_ms": back_ms,
            "overshoot_ms": back_ms - deadline * 1000.0,
            "outcome": outcome,
            "next_call_ms": next_ms,
            "next_error": next_error,
            "after_ms_median": statistics.median(after) if after else None,
            "work_stopped": stopped,
            "ran_to_completion": completed,
            "heartbeat_bytes": [s1, s2],
            "worker_pid_alive": _pid_alive(worker_pid) if separate and worker_pid else None,
            "task_started": s1 > 0,
        }
    finally:
        await _closed(system)
        for name in (hb, done):
            if os.path.exists(name):
                os.unlink(name)
        os.rmdir(tmp)


# --------------------------------------------------------------------------- startup


async def startup(system: System, p: Params) -> dict[str, Any]:
    """Construct/start until a first call and then two concurrent calls have returned."""
    t0 = time.perf_counter()
    await _started(system, settled=False)
    try:
        t_started = time.perf_counter()
        await system.call(_tasks.who)
        t_first = time.perf_counter()
        pair = await asyncio.gather(system.call(_tasks.who), system.call(_tasks.who))
        t_ready = time.perf_counter()
    finally:
        shutdown_ms = await _closed(system)
    return {
        "start_ms": (t_started - t0) * 1000.0,
        "first_call_ms": (t_first - t0) * 1000.0,
        "ready_ms": (t_ready - t0) * 1000.0,
        "pair_workers": len({tuple(x) for x in pair}) if system.runs_code else None,
        "shutdown_ms": shutdown_ms,
    }


async def overload(system: System, p: Params) -> dict[str, Any]:
    """A real server at twice its capacity for expensive work (see ``benchmarks.overload``)."""
    from . import overload as scenario
    from .systems import OverloadSystem

    assert isinstance(system, OverloadSystem)
    return await scenario.run(system, p)


# --------------------------------------------------------------------------- map


def _chunk_label(system: System, chunksize: int | None) -> str:
    if chunksize is not None:
        return str(chunksize)
    return "adaptive" if system.name.startswith("offload") else "default"


async def map_(system: System, p: Params) -> dict[str, Any]:
    """``map_items`` trivial items through the system's own map, at each of its chunk sizes
    (offload: its adaptive default); items/s at the best one."""
    sizes = list(system.map_chunksizes)
    if not p.map_all_chunksizes:  # quick: one size that still makes several chunks
        fits = [c for c in sizes if c is None or c <= p.map_items // 4]
        sizes = fits[-1:] or sizes[:1]
    items = list(range(p.map_items))
    expected = sum(items)
    await _started(system)
    out: dict[str, Any] = {"items": p.map_items, "by_chunksize": {}}
    try:
        for cs in sizes:  # warm-up: every chunk size once on a small input
            await system.map_all(_tasks.echo, items[:512], cs)
        for cs in sizes:
            t0 = time.perf_counter()
            results = await system.map_all(_tasks.echo, items, cs)
            seconds = time.perf_counter() - t0
            if len(results) != len(items) or sum(results) != expected or results[:3] != items[:3]:
                raise ValueError(f"map returned {len(results)} results, not the items in order")
            out["by_chunksize"][_chunk_label(system, cs)] = {
                "seconds": seconds,
                "items_per_s": p.map_items / seconds,
            }
        best = max(out["by_chunksize"].items(), key=lambda kv: kv[1]["items_per_s"])
        out["best_chunksize"] = best[0]
        out["items_per_s"] = best[1]["items_per_s"]
        return out
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- stream


async def stream(system: System, p: Params) -> dict[str, Any]:
    """Items/s from one ``wm.stream`` of ``stream_items`` trivial items, against one awaited
    ``run`` per item (as a consumer that takes one item at a time would do without streams).
    Two stream rounds around the run round; the stream figure is their median."""
    await _started(system)
    try:
        await system.stream_count(100)
        for _ in range(20):
            await system.call(_tasks.echo, 0)
        stream_s: list[float] = []

        async def one_stream() -> None:
            t0 = time.perf_counter()
            got = await system.stream_count(p.stream_items)
            stream_s.append(time.perf_counter() - t0)
            if got != p.stream_items:
                raise ValueError(f"the stream gave {got} items, not {p.stream_items}")

        await one_stream()
        runs = 0
        stop_at = time.monotonic() + p.stream_budget
        t0 = time.perf_counter()
        while runs < p.stream_run_calls and time.monotonic() < stop_at:
            await system.call(_tasks.echo, runs)
            runs += 1
        run_s = time.perf_counter() - t0
        await one_stream()
        stream_per_s = p.stream_items / statistics.median(stream_s)
        run_per_s = runs / run_s
        return {
            "stream_items": p.stream_items,
            "stream_seconds": stream_s,
            "stream_items_per_s": stream_per_s,
            "stream_us_per_item": 1e6 / stream_per_s,
            "run_calls": runs,
            "run_seconds": run_s,
            "run_items_per_s": run_per_s,
            "run_us_per_item": 1e6 / run_per_s,
            "x_run": stream_per_s / run_per_s,
        }
    finally:
        await _closed(system)


# --------------------------------------------------------------------------- payloadlag


async def payloadlag(system: System, p: Params) -> dict[str, Any]:
    """Event-loop lag seen by a 1 ms ticker while ``payloadlag_mib`` MiB arguments flow to
    both workers back to back (``nbytes(data)``: the argument goes, an int comes back).

    The byte floor echoes the buffer instead (it cannot run code).
    """
    size = p.payloadlag_mib * MiB
    data = os.urandom(size)
    fn = _tasks.nbytes if system.runs_code else _tasks.echo

    def check(result: Any) -> None:
        n = result if isinstance(result, int) else len(result)
        if n != size:
            raise ValueError(f"the worker saw {n} bytes, not {size}")

    await _started(system)
    try:
        check(await asyncio.wait_for(system.call(fn, data), p.payloadlag_call_timeout))
        stop = False
        trips: list[float] = []

        async def load() -> None:
            while not stop:
                t0 = time.perf_counter()
                check(await asyncio.wait_for(system.call(fn, data), p.payloadlag_call_timeout))
                trips.append(time.perf_counter() - t0)

        loaders = [asyncio.ensure_future(load()) for _ in range(2)]
        await asyncio.sleep(0.01)
        lags: list[float] = []
        end = time.perf_counter() + p.payloadlag_seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - t0 - 0.001) * 1000.0)
        stop = True
        await asyncio.wait_for(asyncio.gather(*loaders), 2 * p.payloadlag_call_timeout)
        return {
            "mib": p.payloadlag_mib,
            "lag_ms": lags,
            "p50_ms": pct(lags, 50),
            "p99_ms": pct(lags, 99),
            "max_ms": max(lags),
            "ticks": len(lags),
            "trips": len(trips),
            "trip_ms_median": statistics.median(trips) * 1000.0 if trips else None,
        }
    finally:
        await _closed(system)


SCENARIOS: dict[str, Callable[[System, Params], Awaitable[dict[str, Any]]]] = {
    "latency": latency,
    "throughput": throughput,
    "cpu": cpu,
    "looplag": looplag,
    "payload": payload,
    "timeout": timeout,
    "startup": startup,
    "overload": overload,
    "map": map_,
    "stream": stream,
    "payloadlag": payloadlag,
}
# ``import`` is measured by the orchestrator itself (a fresh interpreter per sample).
ALL_SCENARIOS = (*SCENARIOS, "import")

# Which scenarios the byte-only floors take part in.
FLOOR_SCENARIOS = frozenset(
    {"latency", "throughput", "looplag", "payload", "startup", "payloadlag"}
)


# Scenarios only the systems that name them in ``only`` take part in.
EXCLUSIVE_SCENARIOS = frozenset({"overload"})


def applies(system_cls: type[System], scenario: str) -> bool:
    if scenario in EXCLUSIVE_SCENARIOS:
        return system_cls.only is not None and scenario in system_cls.only
    if scenario == "map" and not system_cls.map_chunksizes:
        return False
    if scenario == "stream" and not system_cls.streams:
        return False
    if system_cls.only is not None:
        return scenario in system_cls.only
    if not system_cls.runs_code:
        return scenario in FLOOR_SCENARIOS
    return True
