"""How workers start, and how a worker process ended.

A process worker runs ``python -P -c <BOOT> RFD WFD CFD PARENT_PID``. The ``-c`` script
imports this module by its package name, so ``__main__`` in the worker is never offload's code
(``mainmod`` makes it the caller's script). ``-P`` keeps the working directory off ``sys.path``
until the parent's ``sys.path`` arrives with ``INIT``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Final

from .serve import serve

#: The folder that holds the ``offload`` package (put first on a new worker's ``sys.path``).
ROOT: Final = str(Path(__file__).resolve().parent.parent.parent)

_BOOT: Final = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from offload._offload_worker.boot import process_main; process_main(sys.argv)"
)


def command(rfd: int, wfd: int, ctl_fd: int) -> list[str]:
    """The command line of a process worker on these pipe ends (the caller is its parent)."""
    boot = _BOOT.format(root=ROOT)
    return [sys.executable, "-P", "-c", boot, str(rfd), str(wfd), str(ctl_fd), str(os.getpid())]


def process_main(argv: list[str]) -> None:
    """The entry point of a process worker (``argv``: as ``command`` builds it)."""
    # Ctrl-C and SIGTERM are aimed at the application: its parent decides what stops (a
    # draining server lets running tasks finish). The parent kills with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rfd, wfd, ctl_fd, parent_pid = (int(arg) for arg in argv[1:5])
    if os.getppid() != parent_pid:  # the parent is gone already
        os._exit(0)
    code = 0
    try:
        serve(rfd, wfd, ctl_fd, interruptible=False, parent_pid=parent_pid)
    except BaseException:
        code = 70
        traceback.print_exc()
    finally:
        # Never linger (a thread left behind would keep a broken worker alive): flush and go.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def interpreter_main(rfd: int, wfd: int, ctl_fd: int) -> None:
    """The entry point of an interpreter worker, run by its host thread in the interpreter."""
    serve(rfd, wfd, ctl_fd, interruptible=True, parent_pid=None)


def interpreter_boot(rfd: int, wfd: int, ctl_fd: int) -> str:
    """The code a new subinterpreter runs: the worker loop (it leaves no names in __main__)."""
    return (
        f"import sys as _s; _s.path.insert(0, {ROOT!r}); "
        "from offload._offload_worker.boot import interpreter_main as _m; "
        f"del _s; _m({rfd}, {wfd}, {ctl_fd})"
    )


def describe_exit(returncode: int | None) -> str:
    """How a process ended, for messages: ``" (killed by SIGSEGV)"``, ``" (exit code 3)"``."""
    if returncode is None:
        return ""
    if returncode < 0:
        try:
            return f" (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            return f" (killed by signal {-returncode})"
    return f" (exit code {returncode})"
