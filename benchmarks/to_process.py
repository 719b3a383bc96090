"""Per-call cost of ``offload.to_process.run_sync(noop)`` against ``anyio.to_process.run_sync``.

Both in one event loop, interleaved round by round (the machine's wake-up cost drifts between
runs, see MEASURING.md), with a blocking pipe ping-pong to a child process as the same-run floor.
Sequential calls on warm workers: each figure is one full round trip, in microseconds.

    python -m benchmarks.to_process                          # asyncio
    python -m benchmarks.to_process --backend trio
    python -m benchmarks.to_process --backend asyncio --uvloop --calls 2000 --rounds 7

Also ``to_interpreter`` on Python 3.13+ (``--interpreter``). Reports, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version

import anyio
import anyio.to_process

import offload.to_interpreter
import offload.to_process
from benchmarks._tasks import noop
from benchmarks.systems import FLOOR_CHILD

Call = Callable[[], Awaitable[object]]


def floor_round_trips(calls: int) -> float:
    """Seconds per blocking 8-byte round trip through a child's pipes (the floor)."""
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", FLOOR_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None
    assert child.stdout is not None
    wfd, rfd = child.stdin.fileno(), child.stdout.fileno()
    frame = (8).to_bytes(4, "little") + b"\x00" * 8
    try:
        for _ in range(50):  # warm
            os.write(wfd, frame)
            os.read(rfd, 64)
        started = time.perf_counter()
        for _ in range(calls):
            os.write(wfd, frame)
            got = os.read(rfd, 64)
            while len(got) < len(frame):
                got += os.read(rfd, 64)
        return (time.perf_counter() - started) / calls
    finally:
        child.stdin.close()
        child.wait()


async def per_call(call: Call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    systems: dict[str, Call] = {
        "offload.to_process": lambda: offload.to_process.run_sync(noop),
        "anyio.to_process": lambda: anyio.to_process.run_sync(noop),
    }
    if args.interpreter:
        systems["offload.to_interpreter"] = lambda: offload.to_interpreter.run_sync(noop)
        from anyio import to_interpreter

        systems["anyio.to_interpreter"] = lambda: to_interpreter.run_sync(noop)
    figures: dict[str, list[float]] = {name: [] for name in ["floor (pipe ping-pong)", *systems]}
    for call in systems.values():  # start the pools and warm them
        await per_call(call, 50)
    for round_no in range(args.rounds):
        order = list(systems.items())
        if round_no % 2:
            order.reverse()
        figures["floor (pipe ping-pong)"].append(
            await anyio.to_thread.run_sync(floor_round_trips, args.calls)
        )
        for name, call in order:
            figures[name].append(await per_call(call, args.calls))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--uvloop", action="store_true", help="asyncio on uvloop")
    parser.add_argument("--calls", type=int, default=1000, help="calls per system per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--interpreter", action="store_true", help="to_interpreter too (Python 3.13+)"
    )
    args = parser.parse_args(argv)
    options = {"use_uvloop": True} if args.uvloop else {}
    figures = anyio.run(measure, args, backend=args.backend, backend_options=options)
    loop = "uvloop" if args.uvloop else args.backend
    print(
        f"{loop}, Python {sys.version.split()[0]}, anyio {version('anyio')}: {args.rounds} rounds"
        f" x {args.calls} sequential calls, median (min-max) per call"
    )
    floor = statistics.median(figures["floor (pipe ping-pong)"])
    anyio_median = statistics.median(figures["anyio.to_process"])
    for name, values in figures.items():
        median = statistics.median(values)
        low, high = min(values) * 1e6, max(values) * 1e6
        line = f"  {name:26} {median * 1e6:8.1f} us  ({low:.1f}-{high:.1f})"
        line += f"  {median / floor:5.2f}x floor"
        if name.endswith("to_process"):
            line += f"  {median / anyio_median:5.2f}x anyio.to_process"
        print(line)


if __name__ == "__main__":
    main()
