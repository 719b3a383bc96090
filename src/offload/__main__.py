"""The ``offload`` command: ``offload demo`` (also ``python -m offload demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    from ._demo import add_arguments, run_from_args
    from .jobs import _cli as jobs_cli

    parser = argparse.ArgumentParser(prog="offload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the web demo: heavy work inline vs offloaded (--local: the task demo)"
    )
    demo.add_argument(
        "--local", action="store_true", help="a mixed workload on local process workers"
    )
    add_arguments(demo)  # --seconds, --json, --workers, ... (see offload._demo)
    jobs_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "jobs":
        return jobs_cli.run(args)
    if args.command == "demo":
        if args.local:
            from ._quickdemo import run_local_demo

            asyncio.run(run_local_demo(workers=args.workers or 2))
            return 0
        return run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
