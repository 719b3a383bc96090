"""The ``offload`` command: ``offload demo`` (also ``python -m offload demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the demo")
    demo.add_argument(
        "--local", action="store_true", help="a mixed workload on local process workers"
    )
    demo.add_argument("--workers", type=int, default=2, help="worker count (default 2)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._quickdemo import run_local_demo

        asyncio.run(run_local_demo(workers=args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
