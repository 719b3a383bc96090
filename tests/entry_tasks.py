"""Tasks for the tests of ``offload.to_process`` / ``offload.to_interpreter`` (module level, so
workers import them by name). FIFOs are the rendezvous: opening one blocks until the other end
opens it, so the test knows exactly when a call has begun, and decides when it may end."""

from __future__ import annotations

import os
import threading
import time


def announce_then_wait(started: str, gate: str) -> str:
    """Write ``pid thread`` to the FIFO ``started``, then wait for a line on the FIFO ``gate``."""
    with open(started, "w") as out:
        out.write(f"{os.getpid()} {threading.get_ident()}\n")
    fd = os.open(gate, os.O_RDONLY)
    try:
        return os.read(fd, 3).decode().strip()  # one "go\n" exactly: others wait for theirs
    finally:
        os.close(fd)


def announce_then_spin(started: str, seconds: float) -> str:
    """Write ``pid thread`` to the FIFO ``started``, then spin in pure Python for ``seconds``."""
    with open(started, "w") as out:
        out.write(f"{os.getpid()} {threading.get_ident()}\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "spun to the end"
