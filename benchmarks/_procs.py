"""Process-tree housekeeping (Linux ``/proc``; elsewhere these degrade to no-ops).

The suite never leaves a worker behind: each system runs in its own runner process, the
orchestrator becomes a *child subreaper* so that orphaned workers are re-parented to it,
and anything still alive at the end is killed by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

# Helper processes that libraries keep for the life of their parent on purpose.
HELPER_MARKERS = ("resource_tracker", "forkserver", "semaphore_tracker")


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        return libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    except Exception:
        return False


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    rest = data[data.rfind(b")") + 2 :].split()
    return int(rest[1]), rest[0].decode()


def children(pid: int) -> list[int]:
    """Live (non-zombie) direct children of ``pid``."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None and st[0] == pid and st[1] != "Z":
            out.append(int(name))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, parents before children."""
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt = []
        for p in frontier:
            kids = children(p)
            out.extend(kids)
            nxt.extend(kids)
        frontier = nxt
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_helper(pid: int) -> bool:
    line = cmdline(pid)
    return any(marker in line for marker in HELPER_MARKERS)


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid; reap it if it is our child."""
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, 0)


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and every descendant of it (children first collected, then all killed)."""
    kill_pids([*descendants(pid), pid])


def reap_zombies() -> None:
    """Collect exit statuses of re-parented orphans (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (None where /proc/stat is missing)."""
    import time

    a = _cpu_times()
    time.sleep(seconds)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def _proc_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process (clock ticks), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    rest = data[data.rfind(b")") + 2 :].split()
    # fields 14-17 of proc(5) are utime, stime, cutime, cstime; rest[0] is field 3
    return sum(int(x) for x in rest[11:15])


class CpuMeter:
    """How much CPU *other* processes used while we measured.

    System-wide busy ticks (``/proc/stat``) minus the ticks of this process tree (live
    processes' own and reaped children's times), as a fraction of all CPUs' capacity.
    """

    def __init__(self) -> None:
        self.root = os.getpid()
        self.start = self._sample()

    def _sample(self) -> tuple[int, int, int] | None:
        times = _cpu_times()
        if times is None:
            return None
        ours = sum(_proc_ticks(p) for p in [self.root, *descendants(self.root)])
        total, idle = times
        return total, total - idle, ours

    def foreign(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] == self.start[0]:
            return None
        total = end[0] - self.start[0]
        busy = end[1] - self.start[1]
        ours = end[2] - self.start[2]
        return max(0.0, (busy - ours) / total)
