"""Where offloading pays: the same work inline on the event loop and offloaded, side by side.

``python -m benchmarks.pays [--quick] [--repeat 3] [--json PATH]``

For each workload (offload's built-in task types, called as an app would):

* **inline**: the function called on the event loop's thread. Its run time is what the loop
  is blocked for per call (median), and one loop does ``1 / that`` calls per second.
* **offloaded**: the same work as a dict task on a ``WorkerManager`` (the library's default
  size for this machine, ``worker_nice`` 10). *round trip*: one call at a time, awaited
  (median). *loop time*: CPU time of the event loop's thread per call with 16 calls in flight
  (``time.thread_time``: pickling, the pipe, waking up, settling), which is all the loop gives
  up per offloaded call. *calls/s*: completed per second with 16 in flight.

The verdict: offloading **pays** when it frees most of the loop's time (the loop time per call
is at most a third of the inline time) and the work blocks the loop for at least 0.5 ms
inline; **no** when inline blocking is below the offloaded loop time (the round trip costs
the loop more than the work); **marginal** in between. Every figure is the median over
``--repeat`` repetitions (workloads interleaved within each repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

MiB = 1 << 20
IN_FLIGHT = 16
PAYS_RATIO = 3.0  # inline time / offloaded loop time
PAYS_FLOOR_US = 500.0


@dataclass(frozen=True)
class Workload:
    name: str
    task: dict[str, Any]  # the dict task (type, data)
    inline: Callable[[], Any]  # the same call, on this thread


def workloads() -> list[Workload]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from offload.tasks import digest, hash_password, jwt_sign, jwt_verify

    secret = os.urandom(32)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()

    def pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def public_pem(key: Any) -> bytes:
        return bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    claims = {"sub": "user-42", "aud": "api", "scope": "read write"}
    out: list[Workload] = []
    for alg, sign_key, verify_key in (
        ("HS256", secret, secret),
        ("RS256", pem(rsa_key), public_pem(rsa_key)),
        ("EdDSA", pem(ed_key), public_pem(ed_key)),
    ):
        token = jwt_sign(claims, sign_key, algorithm=alg)
        out.append(
            Workload(
                f"JWT {alg} sign",
                {"type": "jwt:sign", "data": {"claims": claims, "key": sign_key, "algorithm": alg}},
                lambda k=sign_key, a=alg: jwt_sign(claims, k, algorithm=a),
            )
        )
        verify_data = {"token": token, "key": verify_key, "algorithms": [alg], "audience": "api"}
        out.append(
            Workload(
                f"JWT {alg} verify",
                {"type": "jwt:verify", "data": verify_data},
                lambda d=verify_data: jwt_verify(
                    d["token"], d["key"], algorithms=d["algorithms"], audience="api"
                ),
            )
        )
    for label, size in (("100 B", 100), ("1 MiB", MiB), ("64 MiB", 64 * MiB)):
        blob = os.urandom(size)
        out.append(
            Workload(
                f"SHA-256 of {label}",
                {"type": "crypto:hash", "data": {"data": blob}},
                lambda b=blob: digest(b),
            )
        )
    for label, n, p in (
        ("scrypt n=2^14, p=1", 2**14, 1),
        ("scrypt n=2^16, p=2 (default)", 2**16, 2),
    ):
        data = {"password": "correct horse battery staple", "n": n, "p": p}
        out.append(
            Workload(
                f"password hash, {label}",
                {"type": "crypto:hash_password", "data": data},
                lambda n=n, p=p: hash_password("correct horse battery staple", n=n, p=p),
            )
        )
    return out


def _calls(budget: float, per_call: float, low: int, high: int) -> int:
    return max(low, min(high, int(budget / max(per_call, 1e-7))))


async def measure(wm: Any, w: Workload, budget: float) -> dict[str, Any]:
    # inline: the loop is blocked for the whole call
    w.inline()
    t0 = time.perf_counter()
    w.inline()
    first = time.perf_counter() - t0
    inline: list[float] = []
    for _ in range(_calls(budget, first, 3, 2000)):
        t0 = time.perf_counter()
        w.inline()
        inline.append(time.perf_counter() - t0)
    inline_s = statistics.median(inline)

    # offloaded, one at a time
    await wm.execute_task(w.task)
    trips: list[float] = []
    for _ in range(_calls(budget, inline_s + 0.0003, 3, 1000)):
        t0 = time.perf_counter()
        await wm.execute_task(w.task)
        trips.append(time.perf_counter() - t0)

    # offloaded, IN_FLIGHT at a time: throughput, and the loop thread's CPU per call
    workers = max(1, wm.stats().workers)
    total = _calls(budget * workers, inline_s + 0.0001, IN_FLIGHT, 5000)
    left = total

    async def submitter() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await wm.execute_task(w.task)

    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(IN_FLIGHT):
            group.start_soon(submitter)
    wall = time.perf_counter() - t0
    loop_cpu = time.thread_time() - cpu0
    return {
        "inline_us": inline_s * 1e6,
        "inline_per_s": 1 / inline_s,
        "round_trip_us": statistics.median(trips) * 1e6,
        "loop_us": loop_cpu / total * 1e6,
        "offloaded_per_s": total / wall,
        "calls": {"inline": len(inline), "round_trip": len(trips), "in_flight": total},
    }


def verdict(inline_us: float, loop_us: float) -> str:
    if inline_us <= loop_us:
        return "no"
    if inline_us >= PAYS_RATIO * loop_us and inline_us >= PAYS_FLOOR_US:
        return "pays"
    return "marginal"


async def run(repeat: int, budget: float) -> dict[str, Any]:
    import offload

    chosen = workloads()
    raw: dict[str, list[dict[str, Any]]] = {w.name: [] for w in chosen}
    async with offload.WorkerManager(max_queue=10_000) as wm:
        workers = wm.stats().workers
        for rep in range(repeat):
            order = chosen[rep % len(chosen) :] + chosen[: rep % len(chosen)]
            for w in order:
                result = await measure(wm, w, budget)
                raw[w.name].append(result)
                print(
                    f"[{rep + 1}/{repeat}] {w.name:<36} inline {result['inline_us']:>10,.1f} us"
                    f"  round trip {result['round_trip_us']:>10,.1f} us"
                    f"  loop {result['loop_us']:>8,.1f} us",
                    file=sys.stderr,
                    flush=True,
                )
    rows = {}
    for w in chosen:
        reps = raw[w.name]
        row = {
            key: statistics.median(r[key] for r in reps)
            for key in ("inline_us", "inline_per_s", "round_trip_us", "loop_us", "offloaded_per_s")
        }
        row["verdict"] = verdict(row["inline_us"], row["loop_us"])
        rows[w.name] = row
    return {"workers": workers, "repeat": repeat, "rows": rows, "raw": raw}


def _us(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f} ms"
    if value >= 1000:
        return f"{value / 1000:,.1f} ms"
    return f"{value:,.0f} µs" if value >= 10 else f"{value:.1f} µs"


def render(result: dict[str, Any]) -> str:
    lines = [
        "| work | inline: loop blocked per call | offloaded: round trip | offloaded: loop time "
        "per call | inline calls/s (1 loop) | offloaded calls/s | offload? |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {_us(r['inline_us'])} | {_us(r['round_trip_us'])} | {_us(r['loop_us'])} "
            f"| {r['inline_per_s']:,.0f} | {r['offloaded_per_s']:,.0f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pays", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repetition, short budgets")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    budget = 0.1 if args.quick else 0.4
    started = time.perf_counter()
    result = anyio.run(run, repeat, budget)
    title = (
        f"where offloading pays: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{result['workers']} worker(s) (the library's default here), {IN_FLIGHT} in flight "
        f"for calls/s, medians of {repeat} repetition(s)"
    )
    print(title)
    print(render(result))
    print(
        f"pays: offloaded loop time <= 1/{PAYS_RATIO:g} of inline and inline >= "
        f"{PAYS_FLOOR_US:g} µs; no: inline <= offloaded loop time; marginal: in between. "
        f"({time.perf_counter() - started:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, **result}, f, indent=1)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
