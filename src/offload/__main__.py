"""The ``offload`` command (also ``python -m offload``): ``demo``, ``calibrate``, ``jobs``."""

from __future__ import annotations

import sys

DESCRIPTION = (
    "offload runs CPU-heavy work from async Python code on worker processes, so the event "
    "loop stays free. Commands: 'offload demo' shows it on a small web app under load; "
    "'offload calibrate' times password-hash costs on this machine; 'offload jobs' runs and "
    "inspects durable background jobs. 'offload COMMAND --help' tells more."
)


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from ._cli import OneLineParser
    from .demo import _calibrate, _web
    from .jobs import _cli as jobs_cli

    parser = OneLineParser(prog="offload", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="a web app under load: password hashes inline vs offloaded, side by side",
        description=_web.DESCRIPTION,
    )
    demo.add_argument(
        "--local",
        action="store_true",
        help="instead: a narrated mixed workload (priorities, a deadline) on local workers",
    )
    _web.add_arguments(demo)  # --seconds, --json, --workers, ...
    calibrate = commands.add_parser(
        "calibrate",
        help="time password-hash costs on this machine and suggest one",
        description=_calibrate.DESCRIPTION,
    )
    _calibrate.add_arguments(calibrate)
    jobs = jobs_cli.add_parser(commands)
    if jobs.description:  # written as reStructuredText for the docs; help is plain text
        jobs.description = jobs.description.replace("``", "'")
    args = parser.parse_args(argv)
    if args.command == "jobs":
        return jobs_cli.run(args)
    if args.command == "calibrate":
        return _calibrate.run_from_args(args)
    if args.local:
        import anyio

        from .demo._local import run_local_demo

        anyio.run(run_local_demo, args.workers or 2)
        return 0
    return _web.run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
