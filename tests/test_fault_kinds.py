"""Issue 10: faults found by replaying peers' bug reports, each a *kind* of fault.

Each test names the issue's item. Where the issue gave one input, other members of the same
kind are tried too (the simplest input first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import offload
import tasks
from offload import TaskFailed, TaskTimeout, WorkerCrashed, WorkerManager

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent
SRC = HERE.parent / "src"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def manager(**options: Any) -> WorkerManager:
    options.setdefault("workers", 2)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(**options)


async def until(condition: Any, seconds: float = 10.0) -> None:
    """Wait for a state reached in the background (bounded, polled)."""
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- A. A task's work includes every process it starts -------------------------------------


@pytest.mark.parametrize("stop", ["timeout", "cancel", "shutdown"])
async def test_a1_stopping_a_task_stops_the_processes_it_started(tmp_path: Path, stop: str) -> None:
    pidfile = tmp_path / "helper.pid"
    async with manager(workers=1) as wm:
        if stop == "timeout":
            with pytest.raises(TaskTimeout):
                await wm.run(tasks.start_helper, 40, str(pidfile), timeout=1.5)
        elif stop == "cancel":
            with anyio.move_on_after(1.5):
                await wm.run(tasks.start_helper, 40, str(pidfile))
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_run_quietly, wm, tasks.start_helper, 40, str(pidfile))
                await until(pidfile.exists)
                await wm.shutdown(grace=0.2)
    helper = int(pidfile.read_text())
    await until(lambda: _gone(helper), 5.0)  # the sleep died with its task


async def _run_quietly(wm: WorkerManager, fn: Any, *args: Any) -> None:
    try:
        await wm.run(fn, *args)
    except offload.ManagerClosed:
        pass


async def test_a1_a_crashed_worker_takes_its_helpers_along(tmp_path: Path) -> None:
    pidfile = tmp_path / "helper.pid"
    async with manager(workers=1) as wm, anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(WorkerCrashed):
                await wm.run(tasks.start_helper, 40, str(pidfile))

        tg.start_soon(call)
        await until(pidfile.exists)
        (pid,) = wm.worker_pids()
        os.kill(pid, signal.SIGKILL)  # the worker dies from outside
    await until(lambda: _gone(int(pidfile.read_text())), 5.0)


@pytest.mark.parametrize("how", ["block", "exit"])
async def test_a2_a_forked_child_does_not_hold_back_the_outcome(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "child.pid"
    async with manager(workers=1) as wm:
        started = time.perf_counter()
        expected = TaskTimeout if how == "block" else WorkerCrashed
        with pytest.raises(expected):
            await wm.run(tasks.fork_then, how, str(pidfile), timeout=1.5)
        assert time.perf_counter() - started < 5.0  # at once: not when the child exits
        assert await wm.run(tasks.add, 1, 1) == 2
    await until(lambda: _gone(int(pidfile.read_text())), 5.0)


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(body))
    return path


def _python(script: Path, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, str(script), *args], env=env, text=True, **kwargs)


def test_a3_workers_exit_with_their_parent_even_after_it_forked(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = _script(
        tmp_path,
        f"""
        import os, signal, time, anyio, offload

        async def main():
            async with offload.WorkerManager(workers=2) as wm:
                await wm.run(pow, 2, 2)
                with open({str(pids)!r}, "w") as out:
                    out.write(" ".join(map(str, wm.worker_pids())))
                if os.fork() == 0:  # a child that keeps copies of every descriptor
                    time.sleep(30)
                    os._exit(0)
                os.kill(os.getpid(), signal.SIGKILL)  # the parent dies without a word

        if __name__ == "__main__":
            anyio.run(main)
    """,
    )
    # (its output goes nowhere: the forked child would hold a pipe open for 30 s)
    app = _python(script, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app.wait(30)
    workers = [int(pid) for pid in pids.read_text().split()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(pid) for pid in workers):
        time.sleep(0.05)
    assert all(_gone(pid) for pid in workers)
    for proc in psutil.process_iter():  # the forked child: not ours to keep
        try:
            if str(script) in " ".join(proc.cmdline()):
                proc.kill()
        except psutil.Error:
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a3_signals_to_the_group_belong_to_the_application(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM or Ctrl-C sent to the application's process group (as systemd, Docker and a
    terminal do), and to each worker (as a cgroup-wide SIGTERM does): the application
    drains, the running task finishes, nothing crashes and no worker is respawned."""
    ready = tmp_path / "ready"
    script = _script(
        tmp_path,
        f"""
        import signal, sys, time, anyio, offload, tasks

        async def main():
            async with offload.WorkerManager(workers=1, shutdown_grace=20) as wm:
                async with anyio.create_task_group() as tg:
                    async def work():
                        print("result", await wm.run(tasks.spin, 1.5), flush=True)
                    tg.start_soon(work)
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        open({str(ready)!r}, "w").write(" ".join(map(str, wm.worker_pids())))
                        async for _ in signals:
                            await wm.shutdown()  # drain: the running task finishes
                            break
                s = wm.stats()
                print("stats", s.crashed, s.worker_restarts, s.completed, flush=True)

        if __name__ == "__main__":
            anyio.run(main)
    """,
    )
    app = _python(script, start_new_session=True)  # its own group, like a service
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        workers = [int(pid) for pid in ready.read_text().split()]
        os.killpg(app.pid, signum)
        for pid in workers:
            os.kill(pid, signum)  # the cgroup-wide signal reaches workers too
        out, err = app.communicate(timeout=30)
    finally:
        if app.poll() is None:
            app.kill()
    assert "result 1.5" in out, err
    assert "stats 0 0 1" in out, err


# -- B. The worker's own module is never the caller's script -------------------------------

# Names that offload's own worker code defines: none may answer for the caller's script.
_NAMES = ["encode", "execute", "release", "frame", "serve", "loads", "dumps", "boot", "describe"]


def test_b4_a_reference_to_main_resolves_in_the_callers_script(tmp_path: Path) -> None:
    defs = "\n".join(f"def {name}(s): return s.upper() + {name!r}" for name in _NAMES)
    script = _script(
        tmp_path,
        f"""
        import anyio, offload

{textwrap.indent(defs, "        ")}

        async def main():
            async with offload.WorkerManager(workers=1) as wm:
                for fn in [{", ".join(_NAMES)}]:
                    print(await wm.run(fn, "abc"))

        if __name__ == "__main__":
            anyio.run(main)
    """,
    )
    out, err = _python(script).communicate(timeout=60)
    assert out.split() == [f"ABC{name}" for name in _NAMES], err


def test_b5_a_script_without_the_main_guard_gets_a_clear_error(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        """
        import sys, anyio, offload

        def double(x):
            return 2 * x

        async def main():
            async with offload.WorkerManager(workers=1) as wm:
                try:
                    print(await wm.run(double, 21))
                except offload.OffloadError as exc:
                    print("error", exc.code, str(exc).replace("\\n", " "))

        anyio.run(main)  # no `if __name__ == "__main__":` guard
    """,
    )
    out, err = _python(script).communicate(timeout=60)
    assert "error MAIN_GUARD_MISSING" in out, (out, err)
    assert 'if __name__ == "__main__":' in out


# -- D. Every bound covers everything that crosses the boundary ----------------------------


async def test_d8_a_huge_exception_message_is_capped() -> None:
    async with manager(workers=1, max_payload=1 << 20) as wm:
        with pytest.raises(ValueError, match=r"x{100}"):  # small enough: comes back as itself
            await wm.run(tasks.raise_huge, 100_000)
        with pytest.raises(TaskFailed) as info:
            await wm.run(tasks.raise_huge, 4_000_000)
        assert info.value.code == "WORKER_ERROR"
        assert len(str(info.value)) < 200_000
        assert "max_payload" in str(info.value)
        assert await wm.run(tasks.add, 1, 1) == 2


async def test_d8_the_message_crosses_once_under_the_default_cap() -> None:
    async with manager(workers=1) as wm:
        with pytest.raises(ValueError) as info:
            await wm.run(tasks.raise_huge, 40_000_000)
        assert len(str(info.value)) == 40_000_000  # rebuilt as itself, from one copy
        assert len(str(info.value.__cause__)) < 300_000  # the traceback text is clipped


# -- E. Every option does what its name says, at its edges ---------------------------------


@pytest.mark.parametrize(
    "fault",
    ["segfault", "exit_now", "raise_unrebuildable", "return_unpicklable", "raise_system_exit"],
)
async def test_e10_after_any_fault_the_spare_takes_the_slot_at_once(fault: str) -> None:
    async with manager(workers=2) as wm:
        await until(lambda: wm.stats().spares == 1)
        with pytest.raises(offload.OffloadError):
            await wm.run(getattr(tasks, fault))
        assert wm.stats().workers == 2  # at once: no wait for a new worker to start
        for i in range(10):
            assert await wm.run(tasks.add, i, 1) == i + 1
        assert wm.stats().workers == 2


async def test_e10_the_issues_sequence_of_faults() -> None:
    async with manager(workers=2) as wm:
        await until(lambda: wm.stats().spares == 1)
        for fault in ("segfault", "raise_unrebuildable", "return_unpicklable"):
            with pytest.raises(offload.OffloadError):
                await wm.run(getattr(tasks, fault))
        for i in range(10):
            await wm.run(tasks.add, i, 1)
        assert wm.stats().workers == 2


@pytest.mark.parametrize("grace", [0.0, 2.0])
async def test_e11_shutdown_grace_bounds_shutdown_whatever_a_worker_does(grace: float) -> None:
    pytest.importorskip("_interpreters") if sys.version_info < (3, 14) else None
    if sys.version_info < (3, 13):
        pytest.skip("interpreter workers need Python 3.13+")
    wm = WorkerManager(workers=1, kind="interpreter", shutdown_grace=grace, interrupt_grace=0.1)
    await wm.start()
    async with anyio.create_task_group() as tg:

        async def stuck() -> None:
            with pytest.raises(offload.ManagerClosed):
                await wm.run(tasks.catastrophic_regex, 27)

        tg.start_soon(stuck)
        await until(lambda: wm.stats().running == 1)
        started = time.perf_counter()
        await wm.shutdown()
        assert time.perf_counter() - started < grace + 1.0  # the grace, interrupt_grace, a margin
    # The abandoned interpreter ends when its call returns (a few seconds of backtracking).
    await until(lambda: not _interpreter_threads(), 60.0)


def _interpreter_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("offload-interpreter")]


def test_e11_a_stuck_interpreter_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    if sys.version_info < (3, 13):
        pytest.skip("interpreter workers need Python 3.13+")
    script = _script(
        tmp_path,
        """
        import anyio, offload, tasks

        async def main():
            async with offload.WorkerManager(workers=1, kind="interpreter",
                                             shutdown_grace=1) as wm:
                with anyio.move_on_after(1):
                    await wm.run(tasks.catastrophic_regex, 40)
            print("shut down", flush=True)

        if __name__ == "__main__":
            anyio.run(main)
    """,
    )
    started = time.monotonic()
    app = _python(script)
    out, err = app.communicate(timeout=30)
    assert "shut down" in out, err
    assert time.monotonic() - started < 20
    assert app.returncode == 0


@pytest.mark.parametrize("size_mib", [80, 250])
async def test_e12_one_big_argument_does_not_break_later_ones(size_mib: int) -> None:
    async with manager(workers=1, worker_memory_limit=512 << 20, spare_workers=0) as wm:
        assert await wm.run(tasks.length, bytes(size_mib << 20)) == size_mib << 20
        for size in (1 << 20, 64 << 10, 3 << 20, 1 << 20):
            assert await wm.run(tasks.length, bytes(size)) == size
        assert wm.stats().crashed == 0


@pytest.mark.parametrize(("caller", "relative", "expected"), [(0, 3, 3), (5, 3, 8), (15, 10, 19)])
def test_e13_worker_nice_is_relative_to_the_caller(
    tmp_path: Path, caller: int, relative: int, expected: int
) -> None:
    script = _script(
        tmp_path,
        f"""
        import os, anyio, offload, tasks

        async def main():
            async with offload.WorkerManager(workers=1, worker_nice={relative}) as wm:
                print(os.getpriority(os.PRIO_PROCESS, 0), await wm.run(tasks.niceness))

        if __name__ == "__main__":
            anyio.run(main)
    """,
    )
    app = _python(script, preexec_fn=lambda: os.nice(caller))
    out, err = app.communicate(timeout=60)
    assert out.split() == [str(caller), str(expected)], err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("shutdown_grace", -5),
        ("shutdown_grace", float("nan")),
        ("shutdown_grace", "1"),
        ("worker_nice", 50),
        ("worker_nice", -1),
        ("worker_nice", 2.5),
        ("workers", 0),
        ("workers", -1),
        ("workers", True),
        ("max_queue", -1),
        ("start_timeout", 0),
        ("interrupt_grace", -1),
        ("health_timeout", 0),
        ("health_interval", 0),
        ("max_worker_age", 0),
        ("max_tasks_per_worker", 0),
        ("max_worker_memory", 0),
        ("worker_memory_limit", 100),
        ("max_payload", 0),
        ("spare_workers", -1),
        ("poison_after", 0),
        ("default_timeout", 0),
        ("max_wait", -1),
        ("inline_below", -0.5),
        ("scheduling", "lifo"),
        ("server_processes", 0),
    ],
)
def test_e14_out_of_range_options_are_refused_naming_the_range(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        WorkerManager(**{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("shutdown_grace", 0),
        ("worker_nice", 0),
        ("worker_nice", 19),
        ("max_queue", 0),
        ("spare_workers", 0),
        ("health_interval", None),
        ("inline_below", 0),
    ],
)
def test_e14_the_edges_of_each_range_are_accepted(option: str, value: Any) -> None:
    WorkerManager(**{option: value})


# -- F. Priority order holds for parked tasks too ------------------------------------------


async def test_f15_a_lower_priority_task_never_starts_before_a_parked_one(tmp_path: Path) -> None:
    order: list[str] = []
    async with manager(workers=2) as wm, anyio.create_task_group() as tg:

        async def call(name: str, priority: str, seconds: float) -> None:
            await wm.run(tasks.spin, seconds, priority=priority)
            order.append(name)

        tg.start_soon(call, "A", "normal", 1.0)  # long, on the first worker
        tg.start_soon(call, "D", "normal", 0.3)  # the second worker, busy a while
        await until(lambda: wm.stats().running == 2)
        tg.start_soon(call, "B", "normal", 0.01)
        await until(lambda: wm.stats().queued == 1)
        tg.start_soon(call, "C", "low", 0.01)
        await until(lambda: wm.stats().queued == 2)
    assert order.index("B") < order.index("C")  # B starts first, whoever frees a worker
