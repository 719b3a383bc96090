"""The ``overload`` scenario: a real server at twice its capacity for expensive work.

One uvicorn server on 127.0.0.1 (``offload.demo._server``, a child process) with one
``WorkerManager`` configured as the system says, and two task types:

* cheap: an HS256 JWT check (``jwt:verify``, ~50-100 us), ``overload_cheap_rate`` per second;
* expensive: a password hash (``crypto:hash_password``, scrypt n=2^15, r=8, with p calibrated
  once per run by the orchestrator to ``overload_hash_s``, 0.6 s), whose answer is wanted
  within ``overload_deadline`` (2 s).

Three measurements on the same server, one after the other:

1. **baseline**: the cheap requests alone, at their rate: the cheap type's p99 without load;
2. **capacity**: expensive requests in a closed loop (one more client than workers, so a
   worker never waits) with the cheap stream alongside: finished hashes per second, measured
   before the overload phase (which offers twice that) and again after it; the reference is
   the mean of the two, and both are reported (a machine shared with other work drifts);
3. **overload**: an open-loop load (``benchmarks``' own HTTP client, requests sent when due
   whatever the server does) of expensive requests at ``overload_factor`` (2) times the
   measured capacity, plus the cheap stream, for ``overload_seconds``.

Figures: *goodput* (expensive requests answered within the deadline per second, and as a share
of capacity), the share of *accepted* expensive requests (not refused with 503) that met the
deadline, the p99 time to a refusal, and the cheap type's p99 under load against its baseline.
A request not answered within the deadline plus one second is counted as accepted and late.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from .scenarios import Params
    from .systems import OverloadSystem

PASSWORD_BODY = b'{"password": "correct horse battery staple"}'


def calibrate_scrypt(target: float) -> dict[str, int]:
    """scrypt parameters (n=2^15, r=8: 32 MiB) whose hash costs about ``target`` seconds of CPU
    here: ``p`` (run one after another) sets the cost in steps of one n=2^15 hash (~0.1 s).

    Timed in CPU seconds of this thread (the least of five), not wall time: on a machine busy
    with other work, wall time would make the hash look dearer and the chosen cost smaller.
    """
    from offload.tasks import hash_password

    one = float("inf")
    for _ in range(5):
        started = time.thread_time()
        hash_password("correct horse battery staple", n=2**15, r=8, p=1)
        one = min(one, time.thread_time() - started)
    return {"n": 2**15, "r": 8, "p": max(1, round(target / one))}


async def _closed_loop(url: str, path: str, clients: int, seconds: float) -> list[float]:
    """``clients`` clients sending ``POST path`` back to back; each success's finish time."""
    from offload.demo._http import HttpClient

    finished: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        http = HttpClient(url)
        try:
            while time.perf_counter() < stop:
                status, _, _ = await http.request("POST", path, PASSWORD_BODY)
                if status == 200:
                    finished.append(time.perf_counter())
        finally:
            await http.close()

    async with anyio.create_task_group() as group:
        for _ in range(clients):
            group.start_soon(client)
    return finished


def _p(values: list[float], q: float) -> float | None:
    from offload.demo._http import percentile

    return percentile(values, q) if values else None


async def run(system: OverloadSystem, p: Params) -> dict[str, Any]:
    from offload.demo._child import demo_server
    from offload.demo._http import HttpClient, Request, drive, evenly

    if p.overload_scrypt_p:  # calibrated once by the orchestrator
        scrypt = {"n": 2**15, "r": 8, "p": p.overload_scrypt_p}
    else:
        scrypt = calibrate_scrypt(p.overload_hash_s)
    spec = system.spec(scrypt, p.overload_deadline)
    async with demo_server(spec) as server:
        auth = (("authorization", f"Bearer {server.token}"),)
        cheap_path, heavy_path = f"/cheap/{system.mode}", f"/heavy/{system.mode}"
        warm = HttpClient(server.url)
        try:  # run-time history for both types before anything is measured
            for _ in range(3):
                await warm.request("POST", heavy_path, PASSWORD_BODY)
            for _ in range(20):
                await warm.request("GET", cheap_path, None, dict(auth))
        finally:
            await warm.close()
        stats = await HttpClient.get_json(server.url, "/_demo/stats")
        workers = int(stats["managers"][system.mode]["workers"])

        def cheap_stream(seconds: float) -> list[Request]:
            return [
                Request(at, "cheap", "GET", cheap_path, None, auth)
                for at in evenly(p.overload_cheap_rate, seconds)
            ]

        # 1. baseline: the cheap type alone
        base = await drive(server.url, cheap_stream(p.overload_baseline_s), timeout=10)
        base_ok = [o.latency for o in base if o.status == 200]

        async def measure_capacity(seconds: float) -> tuple[float, int]:
            """Expensive work back to back, the cheap stream alongside: hashes/s."""
            async with anyio.create_task_group() as group:
                group.start_soon(
                    functools.partial(drive, timeout=10.0), server.url, cheap_stream(seconds)
                )
                finished = await _closed_loop(server.url, heavy_path, workers + 1, seconds)
            # Completions per second between the first and the last (the first one's wait
            # for a free worker does not count), else the count over the whole window.
            if len(finished) >= 3:
                return (len(finished) - 1) / (finished[-1] - finished[0]), len(finished)
            return len(finished) / seconds, len(finished)

        # 2. capacity, measured again after the overload phase: the mean of the two is the
        # reference, so a machine that got busier or quieter in between shows as a spread.
        capacity_before, finished_before = await measure_capacity(p.overload_capacity_s)
        capacity = capacity_before

        # 3. overload: expensive work at overload_factor x capacity, open loop
        seconds = p.overload_seconds
        rate = p.overload_factor * capacity
        deadline = p.overload_deadline
        heavy = [
            Request(at, "heavy", "POST", heavy_path, PASSWORD_BODY)
            for at in evenly(rate, seconds, offset=0.5)
        ]
        schedule = sorted(cheap_stream(seconds) + heavy, key=lambda r: r.at)
        await HttpClient.get_json(server.url, "/_demo/stats")  # resets the lag samples
        started = time.perf_counter()
        outcomes = await drive(server.url, schedule, timeout=deadline + 1.0)
        elapsed = time.perf_counter() - started
        stats = await HttpClient.get_json(server.url, "/_demo/stats")
        capacity_after, finished_after = await measure_capacity(p.overload_capacity_s)
        capacity = (capacity_before + capacity_after) / 2

    expensive = [o for o in outcomes if o.kind == "heavy"]
    cheap = [o for o in outcomes if o.kind == "cheap"]
    refused = [o for o in expensive if o.status == 503]
    accepted = [o for o in expensive if o.status != 503]
    in_time = [o for o in accepted if o.status == 200 and o.latency <= deadline]
    late = [o for o in accepted if o.status == 200 and o.latency > deadline]
    dropped = [o for o in accepted if o.status == 504]
    unanswered = [o for o in accepted if o.status == 0]
    other = [o for o in accepted if o.status not in (0, 200, 504)]
    cheap_ok = [o.latency for o in cheap if o.status == 200]
    goodput = len(in_time) / seconds
    base_p99 = _p(base_ok, 0.99)
    cheap_p99 = _p(cheap_ok, 0.99)
    manager = stats["managers"][system.mode]
    return {
        "workers": workers,
        "scrypt": scrypt,
        "hash_s": server.hash_seconds,
        "deadline_s": deadline,
        "capacity_per_s": capacity,
        "capacity_before_per_s": capacity_before,
        "capacity_after_per_s": capacity_after,
        "capacity_finished": finished_before + finished_after,
        "offered_per_s": rate,
        "seconds": seconds,
        "elapsed_s": elapsed,
        "expensive_sent": len(expensive),
        "accepted": len(accepted),
        "refused": len(refused),
        "in_time": len(in_time),
        "late": len(late),
        "dropped_504": len(dropped),
        "unanswered": len(unanswered),
        "other_errors": len(other),
        "goodput_per_s": goodput,
        # the offered rate came from the first measurement; goodput is judged by the mean
        "goodput_fraction": goodput / capacity if capacity else None,
        "met_share": len(in_time) / len(accepted) if accepted else None,
        "refusal_p99_ms": None if not refused else _p([o.latency for o in refused], 0.99) * 1000,
        "refusal_median_ms": (
            statistics.median(o.latency for o in refused) * 1000 if refused else None
        ),
        "retry_after": sorted({o.retry_after or "-" for o in refused}),
        "cheap_sent": len(cheap),
        "cheap_failed": len(cheap) - len(cheap_ok),
        "cheap_p99_ms": None if cheap_p99 is None else cheap_p99 * 1000,
        "cheap_p50_ms": None if not cheap_ok else statistics.median(cheap_ok) * 1000,
        "cheap_base_p99_ms": None if base_p99 is None else base_p99 * 1000,
        "cheap_x_base": cheap_p99 / base_p99 if cheap_p99 and base_p99 else None,
        "loop_lag_p99_ms": stats["lag_p99_ms"],
        "manager": manager,
        "late_ms": sorted(o.latency * 1000 for o in late),
    }
