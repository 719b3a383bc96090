"""pytest fixtures for code that uses offload (registered as the ``pytest11`` entry point).

Installed with offload, nothing to enable. Two fixtures:

``worker_manager``
    A ``WorkerManager(workers=2, shutdown_grace=5)`` for one test. Use it directly (it starts
    on first use, in the test's own event loop) or as ``async with worker_manager as wm:``::

        async def test_hashes(worker_manager):
            assert await worker_manager.run(pow, 2, 10) == 1024

    Other settings for one test: ``@pytest.mark.offload(workers=1, max_queue=0)``.

``worker_manager_factory``
    Makes managers with any settings, for tests that need several or need to control start
    and shutdown::

        async def test_backpressure(worker_manager_factory):
            async with worker_manager_factory(workers=1, max_queue=0) as wm:
                ...

Teardown checks that no worker process (or interpreter thread) of those managers is still
alive, and fails the test otherwise (the survivors are killed). A manager the test left running
is shut down for you, in its own event loop:

* under anyio's plugin (asyncio, uvloop or trio): at the fixture's teardown. The fixture holds
  anyio's test runner open from its setup to its teardown, so the loop the test ran in is still
  there, and the shutdown runs in it (on trio, the manager's background service is a system task
  that the end of the run would cancel, killing the workers unreaped: this is what avoids that);
* under pytest-asyncio: when the loop's runner closes, right after the test (it cancels the
  tasks left behind, and a background task of the manager shuts it down then). A manager left
  running in a loop that outlives the test (``loop_scope="module"``) cannot be reached from the
  teardown: the test fails, naming it (use ``async with`` in such tests).

Why plain (synchronous) fixtures returning an unstarted manager: the manager binds to the
event loop it starts in, and the ways of running async tests disagree about who runs async
fixtures (pytest-asyncio strict or auto mode, anyio's plugin). A sync fixture works the same
under all of them; the manager starts inside the test, on the test's loop. Setup:

* pytest-asyncio, strict mode: mark the tests (``pytestmark = pytest.mark.asyncio``);
* pytest-asyncio, auto mode (``asyncio_mode = "auto"``): nothing;
* anyio: ``pytestmark = pytest.mark.anyio``, and an ``anyio_backend`` fixture returning
  ``"asyncio"``, ``("asyncio", {"use_uvloop": True})`` or ``"trio"`` (or parametrized over
  them): offload runs on each.

Nothing here knows which event loop runs: the manager starts through anyio, and its
background task is spawned through offload's runtime seam.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Self, TypeVar

import anyio
import pytest

from ._manager import WorkerManager
from ._runtime import Runtime, current_runtime

__all__ = ("DEFAULTS", "ManagerFactory", "worker_manager", "worker_manager_factory")

log = logging.getLogger("offload")

R = TypeVar("R")

#: ``worker_manager``'s settings unless a test's ``@pytest.mark.offload(...)`` says otherwise.
DEFAULTS: Final[dict[str, Any]] = {"workers": 2, "shutdown_grace": 5.0}

_THREAD_PREFIX: Final = "offload-interpreter"
_WORKER_MARK: Final = "offload._offload_worker.boot"  # in every process worker's command line
#: The longest the fixture waits for a left-running manager to shut down (seconds).
_SHUTDOWN_WAIT: Final = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "offload(**options): WorkerManager options for the worker_manager fixture "
        "(e.g. workers=1, max_queue=0)",
    )


class _TestManager(WorkerManager):
    """A ``WorkerManager`` that starts on first use and remembers every worker it had."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen_pids: set[int] = set()
        #: The runtime of the loop it started in (``None``: never started).
        self.runtime: Runtime | None = None
        #: ``shutdown`` returned: every worker has exited.
        self.finished = False
        self._started: anyio.Event | None = None
        self._start_error: BaseException | None = None
        self._released: anyio.Event | None = None

    @property
    def started(self) -> bool:
        return self.runtime is not None

    async def start(self) -> Self:
        if self._started is not None and not self.closed:  # started on first use already
            await self._wait_started()
            return self
        runtime = current_runtime()
        started = self._started = anyio.Event()
        try:
            await super().start()
        except BaseException as exc:
            self.finished = True  # a failed start stops what it started
            self._start_error = exc
            raise
        finally:
            self.runtime = runtime
            started.set()
        self._note_pids()
        # Shut down in this loop when its runner ends, if the test has not done it.
        self._released = anyio.Event()
        runtime.spawn_system_task(self._guard, name=f"offload-test-guard-{id(self):x}")
        return self

    async def _wait_started(self) -> None:
        assert self._started is not None
        await self._started.wait()
        if self._start_error is not None:
            raise RuntimeError(
                f"this manager failed to start ({type(self._start_error).__name__}: "
                f"{self._start_error})"
            ) from self._start_error

    async def _guard(self) -> None:
        """Waits in the background; when the loop's runner cancels it (the loop is ending) and
        the manager was never shut down, shuts it down there (a system task: never raises)."""
        released = self._released
        assert released is not None
        try:
            await released.wait()
        except anyio.get_cancelled_exc_class():
            # Not if a shutdown already began (the test's own, or the manager's own
            # emergency stop when its background service saw the loop end first).
            if not self.closed:
                with anyio.move_on_after(_SHUTDOWN_WAIT, shield=True):
                    try:
                        await self.shutdown(grace=0)
                    except Exception:
                        log.exception("offload: shutting down a test's manager failed")
            raise

    async def shutdown(self, grace: float | None = None) -> None:
        self._note_pids()
        await super().shutdown(grace)
        self.finished = True  # shutdown returned: every worker has exited
        if self._released is not None:
            self._released.set()

    async def _ensure_started(self) -> None:
        if self._started is None:
            await self.start()
        else:
            await self._wait_started()
        self._note_pids()

    # Forwards everything unchanged; a test's type checker sees WorkerManager.run.
    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:  # type: ignore[override]
        await self._ensure_started()
        return await super().run(fn, *args, **kwargs)

    async def execute_task(self, task: Any, **kwargs: Any) -> Any:
        await self._ensure_started()
        return await super().execute_task(task, **kwargs)

    def _note_pids(self) -> None:
        self.seen_pids.update(self.worker_pids())


async def _shutdown_all(managers: Sequence[WorkerManager]) -> None:
    """Shut ``managers`` down at once, in the loop they run in (``grace=0``)."""
    with anyio.move_on_after(_SHUTDOWN_WAIT, shield=True):
        async with anyio.create_task_group() as tg:
            for wm in managers:
                tg.start_soon(wm.shutdown, 0)


class ManagerFactory:
    """Makes unstarted ``WorkerManager``\\ s for one test; ``close()`` finds leaked workers.

    >>> async with worker_manager_factory(workers=1, max_queue=0) as wm:  # doctest: +SKIP
    ...     await wm.run(pow, 2, 3)

    A manager made here also starts by itself on its first ``run``/``execute_task``.
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.managers: list[WorkerManager] = []
        self._threads_before = _interpreter_threads()
        self._children_before = _worker_children()

    def __call__(self, **options: Any) -> WorkerManager:
        wm = _TestManager(**{**self.defaults, **options})
        self.managers.append(wm)
        return wm

    def left_running(self) -> list[WorkerManager]:
        """The managers that started and whose shutdown has not begun."""
        return [
            wm
            for wm in self.managers
            if isinstance(wm, _TestManager) and wm.started and not wm.closed
        ]

    def shut_down_left(self, run: Callable[[Sequence[WorkerManager]], None]) -> None:
        """Shut down the managers left running: ``run(managers)`` must run
        ``_shutdown_all(managers)`` in the loop they run in (the test's)."""
        left = self.left_running()
        if left:
            run(left)

    def close(self) -> list[str]:
        """List what is left: managers still running (their loop outlives the test), worker
        processes or interpreter threads still alive. Survivors are killed.

        Returns one line per problem.
        """
        problems = [
            f"{wm!r} was left running, and its event loop outlives the test (a wider "
            "loop scope) so it could not be shut down from here; use `async with` (or await "
            "wm.shutdown()) inside the test"
            for wm in self.left_running()
        ]
        known = {pid for wm in self.managers for pid in getattr(wm, "seen_pids", ())}
        alive = sorted({pid for pid in known if _alive(pid)} | _worker_children())
        alive = [pid for pid in alive if pid not in self._children_before]
        if alive:
            problems.append(f"worker processes still alive after shutdown: {alive}")
            for pid in alive:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for pid in alive:
                _reap(pid, block=True)
        threads = sorted(_interpreter_threads() - self._threads_before)
        if threads:
            problems.append(f"interpreter worker threads still alive after shutdown: {threads}")
        return problems


def _interpreter_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(_THREAD_PREFIX)}


def _worker_children() -> set[int]:
    """Live child processes of this process that run offload's worker script.

    Catches workers ``worker_pids()`` does not list (spares, workers being replaced). Uses
    psutil when installed, else ``/proc``; elsewhere, only the managers' own pids are checked.
    """
    script = _WORKER_MARK
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return _proc_worker_children(script)
    found = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and any(
                script in part for part in child.cmdline()
            ):
                found.add(child.pid)
    return found


def _proc_worker_children(script: str) -> set[int]:
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    me = str(os.getpid())
    found = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parens.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if fields[1] != me or fields[0] == "Z":
                continue
            if script in (entry / "cmdline").read_text():
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process. A child of ours that is dead but not reaped (a
    zombie: the loop that owned it ended before it heard of the exit) is reaped here."""
    if _reap(pid, block=False):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pid reused by another user's process: not ours any more
        return False
    return True


def _reap(pid: int, *, block: bool) -> bool:
    """Reap ``pid`` if it is an exited child of this process; whether it was (or is gone)."""
    try:
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # not our child (or reaped already)
        return False
    except OSError:
        return False
    return done == pid


@contextlib.contextmanager
def _anyio_runner(request: pytest.FixtureRequest) -> Iterator[Any]:
    """anyio's test runner for this test, held open until the fixture's teardown (``None``
    when the test is not run by anyio's plugin)."""
    if "anyio_backend" not in request.fixturenames:
        yield None
        return
    from anyio.pytest_plugin import extract_backend_and_options, get_runner

    name, options = extract_backend_and_options(request.getfixturevalue("anyio_backend"))
    with get_runner(name, options) as runner:
        yield runner


@pytest.fixture
def worker_manager_factory(request: pytest.FixtureRequest) -> Iterator[ManagerFactory]:
    """Make ``WorkerManager``\\ s with any settings; no worker may outlive the test.

    Unset options take ``WorkerManager``'s defaults, except ``shutdown_grace`` (5 s).

    >>> async def test_one_worker(worker_manager_factory):  # doctest: +SKIP
    ...     async with worker_manager_factory(workers=1, max_queue=0) as wm:
    ...         assert len(wm.worker_pids()) == 1
    """
    factory = ManagerFactory(shutdown_grace=DEFAULTS["shutdown_grace"])
    with _anyio_runner(request) as runner:
        yield factory
        if runner is not None:
            factory.shut_down_left(
                lambda left: runner.run_fixture(_shutdown_all, {"managers": left})
            )
    problems = factory.close()  # after anyio's runner (if the last lease) ended the loop
    if problems:
        pytest.fail("offload: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def worker_manager(
    request: pytest.FixtureRequest, worker_manager_factory: ManagerFactory
) -> WorkerManager:
    """A ``WorkerManager(workers=2, shutdown_grace=5)`` that starts on first use.

    >>> async def test_pow(worker_manager):  # doctest: +SKIP
    ...     assert await worker_manager.run(pow, 2, 10) == 1024
    >>> @pytest.mark.offload(workers=1, max_queue=0)  # doctest: +SKIP
    ... async def test_full(worker_manager):
    ...     async with worker_manager as wm:
    ...         ...
    """
    options = dict(DEFAULTS)
    for marker in reversed(list(request.node.iter_markers("offload"))):
        if marker.args:
            raise pytest.UsageError("@pytest.mark.offload takes keyword arguments only")
        options.update(marker.kwargs)
    return worker_manager_factory(**options)
