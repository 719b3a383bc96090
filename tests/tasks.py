"""Task functions for the tests: module-level so workers can import them by reference."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import offload


def add(a: int, b: int) -> int:
    return a + b


def echo(value: Any) -> Any:
    return value


def pid() -> int:
    return os.getpid()


def ident() -> tuple[int, int]:
    """(process id, thread id): tells workers apart, interpreter workers included."""
    return os.getpid(), threading.get_ident()


def boom(message: str = "bad thing") -> None:
    raise ValueError(message)


def exit_now(code: int = 3) -> None:
    os._exit(code)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def raise_system_exit() -> None:
    raise SystemExit(4)


class NeedsTwoArgs(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ wants two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_unrebuildable() -> None:
    raise NeedsTwoArgs("x", "y")


def return_unpicklable() -> Any:
    return threading.Lock()


def spin(seconds: float) -> float:
    """Pure-Python busy loop (interruptible in a subinterpreter)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def count(n: int) -> int:
    """A fixed amount of pure-Python work."""
    total = 0
    for i in range(n):
        total += i & 7
    return total


def gil_rendezvous(path: str, role: int, bound: float) -> bool:
    """Meet the other role through a shared mmap without ever letting go of the GIL.

    Each side raises its own byte and spins in pure Python until it sees the other's. The
    switch interval is set far beyond ``bound``, so a side that shares its GIL with the other
    never hands it over and both give up after ``bound`` seconds: only two GILs can meet.
    """
    import mmap
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # per GIL: no forced hand-over inside the loop below
    try:
        with open(path, "r+b") as file, mmap.mmap(file.fileno(), 2) as shared:
            shared[role] = 1
            end = time.monotonic() + bound  # neither call below releases the GIL
            while time.monotonic() < end:
                if shared[1 - role]:
                    return True
            return False
    finally:
        sys.setswitchinterval(interval)


def block_in_c(seconds: float) -> float:
    """Blocked in C (time.sleep): no interrupt reaches it."""
    time.sleep(seconds)
    return seconds


def wait_for_fifo(path: str) -> str:
    """Block until the test writes a line into the FIFO at ``path`` (a cross-process event)."""
    with open(path) as fifo:
        return fifo.readline().strip()


def sleep_then_mark(seconds: float, marker: str) -> None:
    time.sleep(seconds)
    with open(marker, "w") as f:
        f.write("ran to the end")


def big(n: int) -> bytes:
    return b"x" * n


@offload.task("test:add")
def add_task(data: dict[str, int]) -> int:
    return data["a"] + data["b"]


@offload.task("test:process-only", kinds=("process",), why_not="it needs a process")
def process_only(data: Any) -> str:
    return "ran"


def import_module(name: str) -> str:
    import importlib

    return importlib.import_module(name).__name__


def crash_once(marker: str) -> str:
    """Crash the worker the first time (no marker yet), succeed after."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(9)
    return "ok"


_hoard: list[bytes] = []


def hoard(megabytes: int) -> int:
    """Keep ``megabytes`` MiB alive in the worker (resident memory stays up)."""
    _hoard.append(os.urandom(megabytes * 2**20))
    return os.getpid()


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 2**20))


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def raise_bad_str() -> None:
    raise BadStr()


def stop_iteration() -> None:
    next(iter([]))


def _interrupt_if_not(pid: int) -> None:
    if os.getpid() != pid:
        raise KeyboardInterrupt


class InterruptsOnLoad:
    """Pickles in the worker; loading it in the caller raises KeyboardInterrupt."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _interrupt_if_not, (os.getpid(),)


def return_interrupting() -> InterruptsOnLoad:
    return InterruptsOnLoad()


class Kept:
    """Holds a buffer it was rebuilt from (as a numpy array does): pickled out of band."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        import pickle

        return Kept, (pickle.PickleBuffer(self.data),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Kept) and bytes(self.data) == bytes(other.data)


def kept(size: int, fill: int) -> Kept:
    return Kept(bytearray([fill]) * size)


class Explodes:
    """Pickles fine (with an out-of-band buffer); unpickling it raises."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        import pickle

        return _explode, (pickle.PickleBuffer(b"x" * self.size),)


def _explode(buffer: Any) -> None:
    raise ValueError(f"cannot rebuild from {len(memoryview(buffer))} bytes")


def explodes(size: int) -> Explodes:
    return Explodes(size)


def checksum(data: bytes | bytearray | memoryview) -> tuple[str, int]:
    import hashlib

    return type(data).__name__, int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


# -- issue 10: faults by kind --------------------------------------------------------------


def start_helper(seconds: float, pidfile: str) -> int:
    """Start a helper process (as tasks that shell out do), note its pid, wait for it."""
    import subprocess

    helper = subprocess.Popen(["sleep", str(seconds)])
    write_atomically(pidfile, str(helper.pid))
    return helper.wait()


def fork_then(how: str, pidfile: str) -> None:
    """Fork a child that sleeps 25 s (it inherits the worker's pipes), then block or exit."""
    child = os.fork()
    if child == 0:  # the child: hold the pipes, do nothing
        time.sleep(25)
        os._exit(0)
    write_atomically(pidfile, str(child))
    if how == "exit":
        os._exit(3)
    time.sleep(30)


def raise_huge(size: int) -> None:
    raise ValueError("x" * size)


def length(data: bytes) -> int:
    return len(data)


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def catastrophic_regex(n: int) -> bool:
    """A regular expression that backtracks for a very long time inside C (no interrupt)."""
    import re

    return re.match(r"(a+)+$", "a" * n + "b") is not None


def report_steps(steps: int, pause: float) -> int:
    import offload

    for step in range(1, steps + 1):
        time.sleep(pause)
        offload.report_progress(step, steps, f"step {step}")
    return steps


def numbers(count: int, marker: str | None = None) -> Any:
    """A generator: yields 0..count-1; notes in ``marker`` that its finally ran."""
    try:
        yield from range(count)
    finally:
        if marker is not None:
            with open(marker, "a") as out:
                out.write("closed\n")


def numbers_then_fail(count: int) -> Any:
    yield from range(count)
    raise ValueError("generator failed after its items")


def produced_count(path: str, count: int) -> Any:
    """Yields ``count`` items, noting in ``path`` how many it has produced so far."""
    for n in range(count):
        write_atomically(path, str(n + 1))
        yield n


@offload.task("test:steps")
def steps_task(data: dict[str, Any]) -> int:
    return report_steps(int(data["steps"]), float(data["pause"]))


def big_chunks(count: int, size: int) -> Any:
    yield from (bytes([n]) * size for n in range(count))


def square(x: int) -> int:
    return x * x


def fail_on(x: int) -> int:
    if x == 37:
        raise ValueError("bad item")
    return x


def spin_or_die(seconds: float) -> float:
    if seconds < 0:
        os._exit(9)
    return spin(seconds)


class SlowToLoad:
    """An argument whose unpickling waits until a line arrives on a FIFO (a slow import)."""

    def __init__(self, gate: str) -> None:
        self.gate = gate

    def __getstate__(self) -> dict[str, str]:
        return {"gate": self.gate}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.gate = state["gate"]
        with open(self.gate) as gate:
            gate.readline()


def mark(marker: str, _slow: SlowToLoad) -> None:
    with open(marker, "w") as out:
        out.write("ran")


def count_run_then_fail(path: str, how: str) -> None:
    """Append a byte to ``path`` (one per run), then fail: ``raise`` a ValueError, or ``crash``."""
    with open(path, "ab") as f:
        f.write(b"x")
    if how == "crash":
        os._exit(3)
    raise ValueError("fails every time")


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the whole of it or no file at all (a
    test waiting for the file once read it empty: it exists from ``open`` on)."""
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as out:
        out.write(text)
    os.replace(partial, path)
