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
alive, and fails the test otherwise (the survivors are killed). A manager left running is
shut down first, in its own event loop: when the loop's runner closes (it cancels the
tasks left behind), or at teardown if the loop outlives the test (a module-scoped loop).

Why plain (synchronous) fixtures returning an unstarted manager: the manager binds to the
event loop it starts in, and the three ways of running async tests disagree about who runs
async fixtures (pytest-asyncio strict or auto mode, anyio's plugin). A sync fixture works
the same under all of them; the manager starts inside the test, on the test's loop. Setup:

* pytest-asyncio, strict mode: mark the tests (``pytestmark = pytest.mark.asyncio``);
* pytest-asyncio, auto mode (``asyncio_mode = "auto"``): nothing;
* anyio: ``pytestmark = pytest.mark.anyio`` (``anyio_backend`` is ``"asyncio"`` by default;
  ``("asyncio", {"use_uvloop": True})`` for uvloop). offload needs asyncio: under
  ``anyio_backend = "trio"`` the fixtures skip the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest

from ._manager import WorkerManager

__all__ = ("DEFAULTS", "ManagerFactory", "worker_manager", "worker_manager_factory")

R = TypeVar("R")

#: ``worker_manager``'s settings unless a test's ``@pytest.mark.offload(...)`` says otherwise.
DEFAULTS: Final[dict[str, Any]] = {"workers": 2, "shutdown_grace": 5.0}

_THREAD_PREFIX: Final = "offload-interpreter"
_WORKER_MARK: Final = "offload._offload_worker.boot"  # in every process worker's command line


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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.finished = False
        self._starting: asyncio.Future[None] | None = None
        self._guard: asyncio.Task[None] | None = None

    async def start(self) -> _TestManager:
        if self._starting is not None and not self.closed:  # started on first use already
            await asyncio.shield(self._starting)
            return self
        self.loop = asyncio.get_running_loop()
        self._starting = self.loop.create_future()
        try:
            await super().start()
        except BaseException as exc:
            self.finished = True  # a failed start stops what it started
            self._starting.set_exception(exc)
            self._starting.exception()  # retrieved: only the caller needs to hear it
            raise
        self._starting.set_result(None)
        self._note_pids()
        # Shut down in this loop when its runner closes, if the test has not done it.
        self._guard = self.loop.create_task(self._shutdown_when_cancelled())
        return self

    async def _shutdown_when_cancelled(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.finished:
                await self.shutdown(grace=0)
            raise

    async def shutdown(self, grace: float | None = None) -> None:
        self._note_pids()
        await super().shutdown(grace)
        self.finished = True  # shutdown returned: every worker has exited
        guard, self._guard = self._guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()

    async def _ensure_started(self) -> None:
        if self._starting is None:
            await self.start()
        else:
            await asyncio.shield(self._starting)
        self._note_pids()

    # Forwards everything unchanged; a test's type checker sees WorkerManager.run.
    async def run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:  # type: ignore[override]
        await self._ensure_started()
        return await super().run(fn, *args, **kwargs)

    async def execute_task(self, task: Any) -> Any:
        await self._ensure_started()
        return await super().execute_task(task)

    def _note_pids(self) -> None:
        self.seen_pids.update(self.worker_pids())


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

    def close(self) -> list[str]:
        """Shut down what is still running (where its loop allows), then list leftovers.

        Returns one line per problem: a manager that could not be shut down, a worker
        process or interpreter thread still alive. Survivors are killed.
        """
        problems = []
        for wm in self.managers:
            assert isinstance(wm, _TestManager)
            if wm.loop is None:
                continue  # never started
            if not wm.finished and not wm.loop.is_closed() and not wm.loop.is_running():
                wm.loop.run_until_complete(wm.shutdown(grace=0))
            if not wm.finished:
                problems.append(
                    f"{wm!r} was never shut down and its event loop is gone; use "
                    "`async with` (or await wm.shutdown()) inside the test"
                )
        known = {pid for wm in self.managers for pid in getattr(wm, "seen_pids", ())}
        alive = sorted({pid for pid in known if _alive(pid)} | _worker_children())
        alive = [pid for pid in alive if pid not in self._children_before]
        if alive:
            problems.append(f"worker processes still alive after shutdown: {alive}")
            for pid in alive:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
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
    """Whether ``pid`` is a live process (a zombie, dead but not reaped, counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pid reused by another user's process: not ours any more
        return False
    return True


def _skip_unless_asyncio(request: pytest.FixtureRequest) -> None:
    if "anyio_backend" not in request.fixturenames:
        return
    backend = request.getfixturevalue("anyio_backend")
    name = backend[0] if isinstance(backend, tuple) else backend
    if name != "asyncio":
        pytest.skip(
            f"offload runs on asyncio only (add_reader on pipes, asyncio futures); "
            f"anyio_backend={name!r} is not supported"
        )


@pytest.fixture
def worker_manager_factory(request: pytest.FixtureRequest) -> Iterator[ManagerFactory]:
    """Make ``WorkerManager``\\ s with any settings; no worker may outlive the test.

    Unset options take ``WorkerManager``'s defaults, except ``shutdown_grace`` (5 s).

    >>> async def test_one_worker(worker_manager_factory):  # doctest: +SKIP
    ...     async with worker_manager_factory(workers=1, max_queue=0) as wm:
    ...         assert len(wm.worker_pids()) == 1
    """
    _skip_unless_asyncio(request)
    factory = ManagerFactory(shutdown_grace=DEFAULTS["shutdown_grace"])
    yield factory
    problems = factory.close()
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
