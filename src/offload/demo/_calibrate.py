"""``offload calibrate``: time password-hash costs on this machine and suggest one.

A password hash should be as slow as your users can bear (it is what an attacker with your
database has to pay per guess) and no slower: each one holds a worker for its whole run. This
command runs offload's ``crypto:hash_password`` task (scrypt, r=8) at rising costs on one
process worker, as your app would, and prints each cost's run time. It suggests the strongest
cost that runs within ``--target`` seconds, says whether that cost meets OWASP's minimum for
scrypt (n x p >= 2^17 with r=8, e.g. n=2^17, p=1 or offload's default n=2^16, p=2), and with
``--rate`` how many workers that many logins per second need::

    $ offload calibrate --target 0.25 --rate 20
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import anyio

from .._cli import OneLineParser, count, seconds, share

__all__ = ("Cost", "add_arguments", "calibrate", "main", "run_from_args", "suggest")

#: The costs tried, weakest first: (n, p), r=8.
COSTS: Final = (
    (2**12, 1),
    (2**13, 1),
    (2**14, 1),
    (2**14, 2),
    (2**15, 1),
    (2**15, 2),
    (2**16, 1),
    (2**16, 2),
    (2**17, 1),
    (2**17, 2),
    (2**18, 1),
    (2**18, 2),
)
R: Final = 8
OWASP_MIN_NP: Final = 2**17  # n * p with r=8 (OWASP's password storage cheat sheet)
DESCRIPTION: Final = (
    "Time offload's crypto:hash_password (scrypt, r=8) at rising costs on one process worker "
    "and suggest the strongest cost that runs within --target seconds on this machine; with "
    "--rate, how many workers that many logins per second need."
)


@dataclass(frozen=True)
class Cost:
    """One scrypt cost and its measured run time on a worker (seconds, median of runs)."""

    n: int
    r: int
    p: int
    seconds: float
    runs: int

    @property
    def memory_mib(self) -> float:
        return 128 * self.r * self.n / 2**20

    @property
    def meets_owasp(self) -> bool:
        return self.r == R and self.n * self.p >= OWASP_MIN_NP

    def label(self) -> str:
        return f"n=2^{self.n.bit_length() - 1}, r={self.r}, p={self.p}"


async def calibrate(target: float, runs: int = 3) -> list[Cost]:
    """Time each of ``COSTS`` on one worker until a cost takes over twice ``target``."""
    from .._manager import WorkerManager
    from .._stats import TaskRecord

    last: list[float] = []

    def record(done: TaskRecord) -> None:
        last.append(done.run)

    measured: list[Cost] = []
    async with WorkerManager(workers=1, on_task_done=record, worker_nice=0) as wm:
        await wm.execute_task({"type": "crypto:hash_password", "data": {"password": "x", "n": 2}})
        for n, p in COSTS:
            last.clear()
            for _ in range(runs):
                await wm.execute_task(
                    {
                        "type": "crypto:hash_password",
                        "data": {
                            "password": "correct horse battery staple",
                            "n": n,
                            "r": R,
                            "p": p,
                        },
                    }
                )
            measured.append(Cost(n, R, p, statistics.median(last), runs))
            if measured[-1].seconds > 2 * target:
                break
    return measured


def suggest(costs: Sequence[Cost], target: float) -> Cost | None:
    """The strongest (slowest) measured cost within ``target`` seconds, if any."""
    fitting = [cost for cost in costs if cost.seconds <= target]
    return max(fitting, key=lambda cost: (cost.n * cost.p, cost.n)) if fitting else None


def report(costs: Sequence[Cost], target: float, rate: float | None) -> str:
    lines = [f"{'cost':<22}{'memory':>9}{'run time':>11}  OWASP minimum"]
    for cost in costs:
        lines.append(
            f"{cost.label():<22}{cost.memory_mib:>6.0f} MiB{cost.seconds * 1000:>8.0f} ms  "
            f"{'yes' if cost.meets_owasp else 'no'}"
        )
    best = suggest(costs, target)
    lines.append("")
    lines.extend(textwrap.fill(paragraph, 96) for paragraph in advice(costs, target, rate, best))
    return "\n".join(lines)


def advice(
    costs: Sequence[Cost], target: float, rate: float | None, best: Cost | None
) -> list[str]:
    """The suggestion, as paragraphs."""
    lines: list[str] = []
    if best is None:
        lines.append(
            f"No cost runs within {target * 1000:.0f} ms here: even {costs[0].label()} takes "
            f"{costs[0].seconds * 1000:.0f} ms. Raise --target."
        )
        return lines
    lines.append(
        f"Suggested for {target * 1000:.0f} ms: {best.label()} ({best.seconds * 1000:.0f} ms "
        f"here): hash_password(password, n={best.n}, r={best.r}, p={best.p}), or the dict task "
        f'{{"type": "crypto:hash_password", "data": {{"password": ..., "n": {best.n}, '
        f'"p": {best.p}}}}}.'
    )
    if not best.meets_owasp:
        lines.append(
            "It is below OWASP's minimum for scrypt (n x p >= 2^17 with r=8): an attacker "
            "pays less per guess. Prefer a longer target if your users can wait."
        )
    per_worker = 1 / best.seconds
    lines.append(f"One worker does about {per_worker:.1f} such hashes per second.")
    if rate is not None:
        workers = math.ceil(rate * best.seconds)
        lines.append(
            f"{rate:g} logins/s need {workers} worker(s) busy all the time ({workers} cores "
            "beside the event loops); give the manager a deadline or max_wait so a burst "
            "above that is refused at once (503) instead of queued past the deadline."
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=seconds(high=10),
        default=0.25,
        help="the longest a hash may take on this machine, in seconds (default 0.25)",
    )
    parser.add_argument(
        "--rate",
        type=share(0, 1e6, "logins per second"),
        default=None,
        help="logins per second to size the workers for (optional)",
    )
    parser.add_argument(
        "--runs", type=count(1, 20), default=3, help="runs per cost; the median counts (default 3)"
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, default=None, help="also write the figures as JSON"
    )


def run_from_args(args: argparse.Namespace) -> int:
    print(
        f"timing crypto:hash_password on one worker (target {args.target * 1000:.0f} ms)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        costs = anyio.run(calibrate, args.target, args.runs)
    except KeyboardInterrupt:
        print("offload calibrate: interrupted", file=sys.stderr)
        return 130
    print(report(costs, args.target, args.rate))
    if args.json is not None:
        best = suggest(costs, args.target)
        data = {
            "target": args.target,
            "costs": [asdict(cost) for cost in costs],
            "suggested": asdict(best) if best is not None else None,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="offload calibrate", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
