"""Fault injection for the fault and chaos suites: module level, so workers import it by name.

A *fault* is one of ``FAULTS``: ``"raise"`` (a ``FaultError``), ``"exit"`` (``os._exit``),
``"sigkill"`` or ``"sigsegv"`` (the process sends itself the signal). Where it fires depends
on the object that carries it:

- ``DumpFault(fault)`` fires when it is *pickled* (its ``__reduce__``);
- ``LoadFault(fault)`` fires when it is *unpickled* (its reconstructor), wherever that is;
- ``DumpFaultError`` / ``LoadFaultError``: the same, for an exception a task raises.

Only ``"raise"`` may fire in the test process itself: the others would end it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

FAULTS = ("raise", "exit", "sigkill", "sigsegv")
KILLERS = FAULTS[1:]  # the faults that end the process they fire in
EXIT_CODE = 7


class FaultError(Exception):
    """The exception a ``"raise"`` fault raises (picklable: it comes back as itself)."""


def fire(fault: str) -> NoReturn:
    """Inject ``fault`` here and now."""
    if fault == "raise":
        raise FaultError(f"injected fault in pid {os.getpid()}")
    if fault == "exit":
        os._exit(EXIT_CODE)
    if fault in ("sigkill", "sigsegv"):
        os.kill(os.getpid(), signal.SIGKILL if fault == "sigkill" else signal.SIGSEGV)
        time.sleep(5)  # the signal is delivered before this returns
    raise AssertionError(f"unknown fault {fault!r}")


def _load_fault(fault: str) -> NoReturn:
    fire(fault)


class DumpFault:
    """Fires ``fault`` when pickled."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        fire(self.fault)


class LoadFault:
    """Pickles fine; fires ``fault`` when unpickled."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __reduce__(self) -> Any:
        return (_load_fault, (self.fault,))


class DumpFaultError(Exception):
    """An exception that fires ``fault`` when pickled (to travel back from the worker)."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault

    def __reduce__(self) -> Any:
        fire(self.fault)


class LoadFaultError(Exception):
    """An exception that pickles fine and fires ``fault`` when unpickled (in the caller)."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.fault = fault

    def __reduce__(self) -> Any:
        return (_load_fault, (self.fault,))


# -- task functions ----------------------------------------------------------------------


def echo(value: Any) -> Any:
    return value


def run_fault(fault: str) -> None:
    """The task itself fails while running."""
    fire(fault)


def return_dump_fault(fault: str) -> DumpFault:
    """The result fires ``fault`` when the worker pickles it."""
    return DumpFault(fault)


def return_load_fault(fault: str) -> LoadFault:
    """The result fires ``fault`` when the caller unpickles it."""
    return LoadFault(fault)


def raise_dump_fault(fault: str) -> NoReturn:
    """Raises an exception that fires ``fault`` when the worker pickles it."""
    raise DumpFaultError(fault)


def raise_load_fault(fault: str) -> NoReturn:
    """Raises an exception that fires ``fault`` when the caller unpickles it."""
    raise LoadFaultError(fault)


def rendezvous(folder: str, parties: int, timeout: float = 4.0) -> tuple[int, int]:
    """Wait until ``parties`` calls run at once (so on different workers); (pid, thread id).

    Each call drops a file named after its process and thread in ``folder`` and waits for
    ``parties`` files: it returns only if that many workers run it at the same time, so a pool
    short of a worker fails it (by the timeout) instead of passing by luck.
    """
    me = (os.getpid(), threading.get_ident())
    Path(folder, f"{me[0]}-{me[1]}").touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(folder)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {parties} workers met")
        time.sleep(0.002)
    return me


def square(x: int) -> int:
    return x * x


def crunch(n: int, tag: int = 0) -> int:
    """Pure-Python CPU work (interruptible in a subinterpreter); a checkable result.

    ``tag`` keeps calls distinct: identical calls that keep losing their worker (to the chaos
    test's kills) would be refused as poison.
    """
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


def fail(tag: int) -> NoReturn:
    raise ValueError(f"task {tag} failed on purpose")


def crash(how: str, tag: int) -> NoReturn:
    """Ends the worker; ``tag`` keeps each call distinct (identical crashing calls get refused)."""
    fire(how)


def nap(seconds: float) -> float:
    """Blocked in C (interpreter workers cannot interrupt it)."""
    time.sleep(seconds)
    return seconds
