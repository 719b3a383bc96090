"""The ``offload`` command (also ``python -m offload``): ``demo``, ``calibrate``, ``jobs``,
``top``."""

from __future__ import annotations

import sys

DESCRIPTION = (
    "offload runs CPU-heavy work from async Python code on worker processes, so the event "
    "loop stays free. Commands: 'offload demo' shows it on a small web app under load; "
    "'offload calibrate' times password-hash costs on this machine; 'offload jobs' runs and "
    "inspects durable background jobs; 'offload top URL' shows an app's workers live. "
    "'offload COMMAND --help' tells more."
)


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from ._cli import OneLineParser, seconds
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
    top = commands.add_parser(
        "top",
        help="a live view of an app's workers, from its /workers route",
        description="Poll an app's /workers route (see examples/web_app.py) and show each "
        "worker: its state, tasks done, failures, the task it runs and for how long, its "
        "memory. Ctrl-C ends it.",
    )
    top.add_argument("url", help="the route, e.g. http://127.0.0.1:8000/workers")
    top.add_argument(
        "--interval", type=seconds(0.0, high=3600.0), default=1.0, help="seconds between polls (1)"
    )
    top.add_argument("--once", action="store_true", help="print one view and exit")
    jobs = jobs_cli.add_parser(commands)
    if jobs.description:  # written as reStructuredText for the docs; help is plain text
        jobs.description = jobs.description.replace("``", "'")
    args = parser.parse_args(argv)
    if args.command == "jobs":
        return jobs_cli.run(args)
    if args.command == "calibrate":
        return _calibrate.run_from_args(args)
    if args.command == "top":
        from ._top import run_top

        return run_top(args.url, args.interval, once=args.once)
    if args.local:
        import anyio

        from .demo._local import run_local_demo

        anyio.run(run_local_demo, args.workers or 2)
        return 0
    return _web.run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
