"""The scenarios that the trio systems take part in, written on anyio.

``latency``, ``throughput``, ``payload`` and ``timeout`` measured as in
:mod:`benchmarks.scenarios` (same counts, budgets, result keys), but with anyio's task groups,
cancel scopes and ``wait_readable`` instead of asyncio's, so that they run under
``trio.run``. The runner uses them for a system whose ``loop`` is ``"trio"``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import _tasks
from .scenarios import MiB, Params, _pid_alive, _size, pct
from .systems import SMALL_FRAME, System, _FloorChild


class AnyioFloor:
    """The pipe floor for one call at a time: write a frame, ``anyio.wait_readable``, read."""

    async def start(self) -> None:
        self.child = _FloorChild()
        os.set_blocking(self.child.rfd, False)
        self.frame = len(SMALL_FRAME).to_bytes(4, "little") + SMALL_FRAME

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        os.write(self.child.wfd, self.frame)  # 12 bytes into an empty 1 MiB pipe
        need = len(self.frame)
        got = b""
        while len(got) < need:
            await anyio.wait_readable(self.child.rfd)
            try:
                chunk = os.read(self.child.rfd, need - len(got))
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("floor child exited")
            got += chunk
        return got[4:]

    async def aclose(self) -> None:
        self.child.close()


async def _started(system: System) -> None:
    with anyio.fail_after(60):
        await system.start()
        await system.settle()


async def _closed(system: System) -> None:
    with anyio.fail_after(30):
        await system.aclose()


async def _timed_calls(call: Callable[..., Awaitable[Any]], n: int, out: list[float]) -> None:
    perf = time.perf_counter_ns
    for i in range(n):
        t0 = perf()
        await call(_tasks.echo, i)
        out.append((perf() - t0) / 1000.0)


async def latency(system: System, p: Params) -> dict[str, Any]:
    floor = AnyioFloor()
    await floor.start()
    await _started(system)
    try:
        for _ in range(20):
            await system.call(_tasks.echo, 0)
            await floor.call(_tasks.echo, 0)
        samples: list[float] = []
        floor_samples: list[float] = []
        deadline = time.monotonic() + p.latency_budget
        while len(samples) < p.latency_calls and time.monotonic() < deadline:
            await _timed_calls(system.call, p.latency_block, samples)
            await _timed_calls(floor.call, p.latency_block, floor_samples)
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


async def throughput(system: System, p: Params) -> dict[str, Any]:
    await _started(system)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(system.call, _tasks.echo, i)
        remaining = p.throughput_tasks
        done = 0
        stop_at = time.monotonic() + p.throughput_budget

        async def submitter() -> None:
            nonlocal remaining, done
            while remaining > 0 and time.monotonic() < stop_at:
                remaining -= 1
                await system.call(_tasks.echo, remaining)
                done += 1

        t0 = time.perf_counter()
        with anyio.move_on_after(1.5 * p.throughput_budget + 0.5) as scope:
            async with anyio.create_task_group() as tg:
                for _ in range(p.throughput_inflight):
                    tg.start_soon(submitter)
        elapsed = time.perf_counter() - t0
        return {
            "tasks": done,
            "seconds": elapsed,
            "tasks_per_s": done / elapsed,
            "budget_hit": done < p.throughput_tasks,
            "cut_off": int(scope.cancelled_caught),
        }
    finally:
        await _closed(system)


async def payload(system: System, p: Params) -> dict[str, Any]:
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
        args: dict[str, Any] = {}
        for kind, make in kinds.items():
            arg = make()
            try:
                t0 = time.perf_counter()
                with anyio.fail_after(p.payload_call_timeout):
                    first = await system.call(_tasks.echo, arg)
                first_s = time.perf_counter() - t0
                if len(first) != size or bytes(first[:64]) != data[:64]:
                    raise ValueError(f"echo returned {type(first).__name__} of {len(first)}")
            except Exception as exc:
                out[kind] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            args[kind] = arg
            out[kind] = {"first_s": first_s, "result_type": type(first).__name__, "seconds": []}
        if args:
            for _ in range(2):
                with anyio.fail_after(p.payload_call_timeout):
                    await system.call(_tasks.echo, data)
            stop_at = time.monotonic() + p.payload_budget
            for _ in range(p.payload_trips):
                if time.monotonic() >= stop_at:
                    break
                for kind, arg in args.items():
                    t0 = time.perf_counter()
                    with anyio.fail_after(p.payload_call_timeout):
                        await system.call(_tasks.echo, arg)
                    out[kind]["seconds"].append(time.perf_counter() - t0)
        for kind in args:
            times = out[kind]["seconds"] or [out[kind]["first_s"]]
            med = statistics.median(times)
            out[kind]["median_ms"] = med * 1000.0
            out[kind]["mib_per_s"] = p.payload_mib / med
        return out
    finally:
        await _closed(system)


async def timeout(system: System, p: Params) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="offload-bench-timeout-")
    hb = os.path.join(tmp, "heartbeat")
    done = os.path.join(tmp, "done")
    await _started(system)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(system.call, _tasks.who)
        deadline = p.timeout_deadline
        t0 = time.perf_counter()
        outcome = "returned"
        with anyio.move_on_after(p.timeout_sleep + 15) as guard:
            try:
                await system.call_with_timeout(
                    deadline, _tasks.sleep_heartbeat, p.timeout_sleep, hb, done
                )
            except TimeoutError as exc:
                outcome = type(exc).__name__
                if type(exc).__module__ != "builtins":
                    outcome = f"{type(exc).__module__}.{outcome}"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"[:120]
        if guard.cancelled_caught:
            outcome = "no answer within the guard"
        back = time.perf_counter()
        back_ms = (back - t0) * 1000.0
        t1 = time.perf_counter()
        next_error = None
        try:
            with anyio.fail_after(20):
                await system.call(_tasks.echo, 1)
        except Exception as exc:
            next_error = f"{type(exc).__name__}: {exc}"[:120]
        next_ms = (time.perf_counter() - t1) * 1000.0
        after = []
        for _ in range(5):
            t2 = time.perf_counter()
            try:
                with anyio.fail_after(20):
                    await system.call(_tasks.echo, 1)
            except Exception:
                break
            after.append((time.perf_counter() - t2) * 1000.0)
        await anyio.sleep(max(0.0, back + 0.25 - time.perf_counter()))
        s1 = _size(hb)
        await anyio.sleep(0.3)
        s2 = _size(hb)
        worker_pid = None
        try:
            with open(hb) as f:
                worker_pid = int(f.readline().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        completed = os.path.exists(done)
        separate = worker_pid is not None and worker_pid != os.getpid()
        return {
            "deadline_ms": deadline * 1000.0,
            "control_back_ms": back_ms,
            "overshoot_ms": back_ms - deadline * 1000.0,
            "outcome": outcome,
            "next_call_ms": next_ms,
            "next_error": next_error,
            "after_ms_median": statistics.median(after) if after else None,
            "work_stopped": s1 >= 0 and s1 == s2 and not completed,
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


SCENARIOS: dict[str, Callable[[System, Params], Awaitable[dict[str, Any]]]] = {
    "latency": latency,
    "throughput": throughput,
    "payload": payload,
    "timeout": timeout,
}


async def warm(system: System) -> None:
    """The runner's untimed start/call/stop cycle, on anyio (60 s at most)."""
    system.load()
    with anyio.fail_after(60):
        await system.start()
        try:
            for _ in range(2):
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(system.call, _tasks.who)
        finally:
            await system.aclose()
