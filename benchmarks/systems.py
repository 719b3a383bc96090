"""One adapter per system under test, all with the same small async interface.

``start()`` brings the system up with two workers, ``call(fn, *args)`` runs one task and
returns its result, ``call_with_timeout(timeout, fn, *args)`` raises ``TimeoutError``
when the deadline passes (with whatever enforcement the system has), ``aclose()`` stops
everything it started, killing busy workers rather than waiting for them.

Adapters import their library lazily (``load()``), so listing systems costs nothing and a
missing package only skips that system.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from . import _tasks

WORKERS = 2
FLOOR_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_floor_child.py")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SMALL_FRAME = b"\x00" * 8


class Unavailable(Exception):
    """The system cannot run here (missing package, wrong Python); skipped with a note."""


class System:
    name: ClassVar[str]
    #: Short description for ``--list`` and the README.
    doc: ClassVar[str] = ""
    #: False for the floors, which only move bytes and cannot run a Python function.
    runs_code: ClassVar[bool] = True
    #: Scenarios the system takes part in (None: all that make sense for it).
    only: ClassVar[frozenset[str] | None] = None
    #: The module whose import cost the ``import`` scenario measures.
    import_name: ClassVar[str | None] = None
    #: Payload kinds known not to work, with why (the payload scenario skips them).
    rejects: ClassVar[dict[str, str]] = {}
    #: How the timeout scenario's deadline is applied.
    timeout_mode: ClassVar[str] = "asyncio.wait_for around the call"
    #: Whether the runner does one untimed start/call/stop cycle first (see ``_runner``).
    warm_cycle: ClassVar[bool] = True
    #: The event loop the runner must use for this system ("trio"), whatever ``--loop`` says.
    loop: ClassVar[str | None] = None
    #: Chunk sizes the map scenario tries (``None``: the system's own default); empty: no map.
    map_chunksizes: ClassVar[tuple[int | None, ...]] = ()
    #: Skipped with ``--quick`` (slow to prepare: a wheel to build, npm packages to fetch).
    slow_to_prepare: ClassVar[bool] = False
    #: Takes part in the stream scenario (``stream_count``).
    streams: ClassVar[bool] = False
    #: Measured outside this runner's event loop (``own_scenario`` only): no warm-up cycle.
    external: ClassVar[bool] = False

    @classmethod
    def prepare(cls, quick: bool) -> dict[str, str]:
        """Run in the orchestrator before the runner starts; return environment variables
        for the runner (``PYTHONPATH`` is prepended, not replaced). Raise ``Unavailable``."""
        return {}

    def own_scenario(self, scenario: str, params: Any) -> Awaitable[dict[str, Any]] | None:
        """A system that measures a scenario its own way (outside Python) returns it here."""
        return None

    async def map_all(
        self, fn: Callable[..., Any], items: list[Any], chunksize: int | None
    ) -> list[Any]:
        """``fn`` over ``items`` as the system's own map does it, results in input order."""
        raise NotImplementedError

    def load(self) -> str:
        """Import the library; return its version. Raise ``Unavailable`` to skip."""
        return ""

    async def start(self) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        """Wait until start-up work left running in the background is done (steady state)."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def call_with_timeout(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wait_for(self.call(fn, *args), timeout)

    async def aclose(self) -> None:
        raise NotImplementedError


def _need_interpreters() -> None:
    if sys.version_info < (3, 13):
        raise Unavailable(f"needs Python 3.13+ (this is {sys.version.split()[0]})")
    try:
        import _interpreters  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"no _interpreters module: {exc}") from None


def _import(name: str) -> Any:
    try:
        module = __import__(name, fromlist=["_"])
    except ImportError as exc:
        raise Unavailable(f"{name} is not installed ({exc})") from None
    return module


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- floors


class _FloorChild:
    """A persistent echo child on two pipes (1 MiB pipe buffers where the kernel allows)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", FLOOR_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        for fd in (self.wfd, self.rfd):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2)


class Floor(System):
    """Round trip through a plain pipe to an echo child, awaited via ``loop.add_reader``."""

    name = "floor"
    doc = "asyncio pipe ping-pong with a stdlib echo child (add_reader): the same-run floor"
    runs_code = False
    import_name = None

    def __init__(self) -> None:
        self.child: _FloorChild | None = None
        self.waiters: deque[asyncio.Future[bytes]] = deque()
        self.rbuf = bytearray()
        self.wqueue: deque[memoryview] = deque()
        self.writing = False

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.child = _FloorChild()
        os.set_blocking(self.child.rfd, False)
        os.set_blocking(self.child.wfd, False)
        self.loop.add_reader(self.child.rfd, self._on_readable)

    def _on_readable(self) -> None:
        assert self.child is not None
        while True:
            try:
                data = os.read(self.child.rfd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                self.loop.remove_reader(self.child.rfd)
                while self.waiters:
                    fut = self.waiters.popleft()
                    if not fut.done():
                        fut.set_exception(ConnectionError("floor child exited"))
                return
            self.rbuf += data
            if len(data) < (1 << 20):
                break
        buf = self.rbuf
        pos = 0
        size = len(buf)
        with memoryview(buf) as view:
            while size - pos >= 4:
                n = int.from_bytes(view[pos : pos + 4], "little")
                if size - pos - 4 < n:
                    break
                frame = bytes(view[pos + 4 : pos + 4 + n])
                pos += 4 + n
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(frame)
        if pos:
            del buf[:pos]

    def _flush(self) -> None:
        assert self.child is not None
        while self.wqueue:
            try:
                n = os.writev(self.child.wfd, list(self.wqueue)[:64])
            except (BlockingIOError, InterruptedError):
                break
            while n:
                head = self.wqueue[0]
                if n >= len(head):
                    n -= len(head)
                    self.wqueue.popleft()
                else:
                    self.wqueue[0] = head[n:]
                    n = 0
        if self.wqueue and not self.writing:
            self.loop.add_writer(self.child.wfd, self._flush)
            self.writing = True
        elif not self.wqueue and self.writing:
            self.loop.remove_writer(self.child.wfd)
            self.writing = False

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Echo ``args[0]`` if it is bytes-like, else an 8-byte frame; ``fn`` is ignored."""
        payload = args[0] if args and isinstance(args[0], bytes | bytearray | memoryview) else None
        body = memoryview(payload if payload is not None else SMALL_FRAME).cast("B")
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.waiters.append(fut)
        self.wqueue.append(memoryview(len(body).to_bytes(4, "little")))
        self.wqueue.append(body)
        if not self.writing:
            self._flush()
        return await fut

    async def aclose(self) -> None:
        if self.child is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.child.rfd)
            if self.writing:
                with contextlib.suppress(Exception):
                    self.loop.remove_writer(self.child.wfd)
            self.child.close()
            self.child = None


class BlockingFloor(System):
    """The same echo child driven with blocking ``os.write``/``os.read``, no event loop."""

    name = "floor-blocking"
    doc = "blocking pipe ping-pong with the same echo child (latency only): the raw floor"
    runs_code = False
    only = frozenset({"latency"})
    import_name = None

    async def start(self) -> None:
        self.child = _FloorChild()
        self.frame = len(SMALL_FRAME).to_bytes(4, "little") + SMALL_FRAME

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        os.write(self.child.wfd, self.frame)
        need = len(self.frame)
        got = b""
        while len(got) < need:
            chunk = os.read(self.child.rfd, need - len(got))
            if not chunk:
                raise ConnectionError("floor child exited")
            got += chunk
        return got[4:]

    async def aclose(self) -> None:
        self.child.close()


# --------------------------------------------------------------------------- offload


class _Offload(System):
    kind: ClassVar[str]
    import_name = "offload"
    timeout_mode = "offload's own timeout= (run(..., timeout=))"
    map_chunksizes = (None,)
    streams = True

    def load(self) -> str:
        offload = _import("offload")
        if not hasattr(offload, "WorkerManager"):
            raise Unavailable("offload.WorkerManager does not exist yet")
        self.offload = offload
        return getattr(offload, "__version__", "") or _version("offload")

    async def start(self) -> None:
        self.wm = self.offload.WorkerManager(
            workers=WORKERS, kind=self.kind, max_queue=4096, shutdown_grace=5.0
        )
        await self.wm.__aenter__()

    async def settle(self) -> None:
        # The warm spare (process kind, one by default) starts in the background once the
        # workers are ready.
        while self.kind == "process" and self.wm.stats().spares < 1:
            await asyncio.sleep(0.005)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.wm.run(fn, *args)

    async def map_all(
        self, fn: Callable[..., Any], items: list[Any], chunksize: int | None
    ) -> list[Any]:
        return [r async for r in self.wm.map(fn, items, chunksize=chunksize)]

    async def stream_count(self, n: int) -> int:
        """Receive the ``n`` items of ``count_up(n)`` from one ``wm.stream``; how many came."""
        got = 0
        async with self.wm.stream(_tasks.count_up, n) as items:
            async for _ in items:
                got += 1
        return got

    async def call_with_timeout(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.wm.run(fn, *args, timeout=timeout)

    async def aclose(self) -> None:
        await self.wm.__aexit__(None, None, None)


class OffloadProcess(_Offload):
    name = "offload-process"
    doc = "offload.WorkerManager(workers=2, kind='process')"
    kind = "process"


class OffloadInterpreter(_Offload):
    name = "offload-interpreter"
    doc = "offload.WorkerManager(workers=2, kind='interpreter') (3.13+)"
    kind = "interpreter"

    def load(self) -> str:
        _need_interpreters()
        return super().load()


# --------------------------------------------------------------------------- anyio


class AnyioToProcess(System):
    name = "anyio-to_process"
    doc = "anyio.to_process.run_sync with CapacityLimiter(2)"
    import_name = "anyio"
    timeout_mode = "anyio.fail_after + run_sync(cancellable=True)"

    def load(self) -> str:
        self.anyio = _import("anyio")
        _import("anyio.to_process")
        return _version("anyio")

    async def start(self) -> None:
        # anyio spawns its worker processes lazily, on the first calls.
        self.limiter = self.anyio.CapacityLimiter(WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.anyio.to_process.run_sync(fn, *args, limiter=self.limiter)

    async def call_with_timeout(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        with self.anyio.fail_after(timeout):
            return await self.anyio.to_process.run_sync(
                fn, *args, cancellable=True, limiter=self.limiter
            )

    async def aclose(self) -> None:
        # anyio keeps its workers until the event loop closes; stop them now instead
        # (private state, used for cleanup only).
        from anyio import to_process

        try:
            workers = to_process._process_pool_workers.get()
        except LookupError:
            return
        for proc in list(workers):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.aclose(), 2)
        workers.clear()


class AnyioToInterpreter(System):
    name = "anyio-to_interpreter"
    doc = "anyio.to_interpreter.run_sync with CapacityLimiter(2) (3.13+)"
    import_name = "anyio"
    timeout_mode = "anyio.fail_after around run_sync"

    def load(self) -> str:
        _need_interpreters()
        self.anyio = _import("anyio")
        _import("anyio.to_interpreter")
        return _version("anyio")

    async def start(self) -> None:
        self.limiter = self.anyio.CapacityLimiter(WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.anyio.to_interpreter.run_sync(fn, *args, limiter=self.limiter)

    async def call_with_timeout(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        with self.anyio.fail_after(timeout):
            return await self.anyio.to_interpreter.run_sync(fn, *args, limiter=self.limiter)

    async def aclose(self) -> None:
        # Idle interpreters otherwise live until interpreter exit (atexit); destroy them.
        from anyio import to_interpreter

        try:
            idle = to_interpreter._idle_workers.get()
        except LookupError:
            return
        while idle:
            worker = idle.popleft()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(worker.destroy)


# --------------------------------------------------------------------------- executors


def _kill_mp_processes(procs: list[Any]) -> None:
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(2)


class ProcessPool(System):
    name = "ProcessPoolExecutor"
    doc = "concurrent.futures.ProcessPoolExecutor(max_workers=2) + loop.run_in_executor"
    import_name = "concurrent.futures.process"

    def load(self) -> str:
        import concurrent.futures

        self.cf = concurrent.futures
        import multiprocessing

        return f"stdlib ({multiprocessing.get_start_method()})"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ex = self.cf.ProcessPoolExecutor(max_workers=WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.ex, fn, *args)

    map_chunksizes = (64, 512, 4096, 16384)

    async def map_all(
        self, fn: Callable[..., Any], items: list[Any], chunksize: int | None
    ) -> list[Any]:
        # The executor's own (blocking) map, called as its users call it; nothing else
        # runs on this loop meanwhile.
        return list(self.ex.map(fn, items, chunksize=chunksize or 1))

    async def aclose(self) -> None:
        procs = list((getattr(self.ex, "_processes", None) or {}).values())
        pending = getattr(self.ex, "_pending_work_items", {})
        busy = any(not item.future.done() for item in list(pending.values()))
        if busy:
            # A task still runs (timeout scenario): kill rather than wait for it.
            self.ex.shutdown(wait=False, cancel_futures=True)
            _kill_mp_processes(procs)
        await asyncio.wait_for(asyncio.to_thread(self.ex.shutdown, True), 10)


class Pebble(System):
    name = "pebble"
    doc = "pebble.ProcessPool(max_workers=2), schedule() + asyncio.wrap_future"
    import_name = "pebble"
    timeout_mode = "pebble's own schedule(timeout=)"

    def load(self) -> str:
        self.pebble = _import("pebble")
        return _version("pebble")

    async def start(self) -> None:
        self.pool = self.pebble.ProcessPool(max_workers=WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.pool.schedule(fn, args=args))

    async def call_with_timeout(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.pool.schedule(fn, args=args, timeout=timeout))

    async def aclose(self) -> None:
        self.pool.stop()
        await asyncio.wait_for(asyncio.to_thread(self.pool.join, 10), 12)


class Loky(System):
    name = "loky"
    doc = "loky.get_reusable_executor(max_workers=2), submit() + asyncio.wrap_future"
    import_name = "loky"

    def load(self) -> str:
        self.loky = _import("loky")
        return _version("loky")

    async def start(self) -> None:
        self.ex = self.loky.get_reusable_executor(max_workers=WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.ex.submit(fn, *args))

    async def aclose(self) -> None:
        await asyncio.wait_for(
            asyncio.to_thread(self.ex.shutdown, wait=True, kill_workers=True), 15
        )


class AioMultiprocess(System):
    name = "aiomultiprocess"
    doc = "aiomultiprocess.Pool(processes=2) running the tasks' coroutine twins"
    import_name = "aiomultiprocess"
    rejects: ClassVar[dict[str, str]] = {
        "memoryview": "unpicklable; the queue's feeder thread drops it and the call never returns"
    }

    def load(self) -> str:
        self.amp = _import("aiomultiprocess")
        return _version("aiomultiprocess")

    async def start(self) -> None:
        self.pool = self.amp.Pool(processes=WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        twin = getattr(_tasks, "a_" + fn.__name__)
        return await self.pool.apply(twin, args)

    async def aclose(self) -> None:
        procs = [p.aio_process for p in list(self.pool.processes)]
        self.pool.terminate()
        try:
            await asyncio.wait_for(self.pool.join(), 5)
        except TimeoutError:
            _kill_mp_processes(procs)
        # Queues' feeder threads would otherwise block the runner's exit.
        for tx, rx in self.pool.queues.values():
            for q in (tx, rx):
                with contextlib.suppress(Exception):
                    q.cancel_join_thread()
                    q.close()
        # aiomultiprocess keeps a process-wide multiprocessing Manager (a server process)
        # for the life of the program; stop it so that every scenario starts cold.
        core = sys.modules.get("aiomultiprocess.core")
        manager = getattr(core, "_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(manager.shutdown), 5)
            core._manager = None  # type: ignore[union-attr]


# --------------------------------------------------------------------------- Python floors

PYFLOOR_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pyfloor_child.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PickleLink:
    """The parent's end of one Python floor worker: pickled ``(fn, args)`` frames out on
    ``wfd``, pickled ``(ok, value)`` frames back on ``rfd``, read by a ``loop.add_reader``
    callback that sets each waiting future in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rfd: int, wfd: int) -> None:
        self.loop, self.rfd, self.wfd = loop, rfd, wfd
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.rbuf = bytearray()
        self.wqueue: deque[memoryview] = deque()
        self.writing = False
        for fd in (rfd, wfd):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
            os.set_blocking(fd, False)
        loop.add_reader(rfd, self._on_readable)

    def _fail_all(self, exc: BaseException) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _on_readable(self) -> None:
        while True:
            try:
                data = os.read(self.rfd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                self.loop.remove_reader(self.rfd)
                self._fail_all(ConnectionError("python floor worker exited"))
                return
            self.rbuf += data
            if len(data) < (1 << 20):
                break
        buf, pos, size = self.rbuf, 0, len(self.rbuf)
        while size - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "little")
            if size - pos - 4 < n:
                break
            with memoryview(buf) as view:
                ok, value = pickle.loads(view[pos + 4 : pos + 4 + n])
            pos += 4 + n
            fut = self.waiters.popleft()
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(RuntimeError(value))
        if pos:
            del buf[:pos]

    def _flush(self) -> None:
        while self.wqueue:
            try:
                n = os.writev(self.wfd, list(self.wqueue)[:64])
            except (BlockingIOError, InterruptedError):
                break
            while n:
                head = self.wqueue[0]
                if n >= len(head):
                    n -= len(head)
                    self.wqueue.popleft()
                else:
                    self.wqueue[0] = head[n:]
                    n = 0
        if self.wqueue and not self.writing:
            self.loop.add_writer(self.wfd, self._flush)
            self.writing = True
        elif not self.wqueue and self.writing:
            self.loop.remove_writer(self.wfd)
            self.writing = False

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> asyncio.Future[Any]:
        body = pickle.dumps((fn, args), 5)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append(fut)
        self.wqueue.append(memoryview(len(body).to_bytes(4, "little")))
        self.wqueue.append(memoryview(body))
        if not self.writing:
            self._flush()
        return fut

    def detach(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.rfd)
        if self.writing:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.wfd)
        self._fail_all(ConnectionError("python floor closed"))


class PythonFloor(System):
    """The minimal Python round trip (``shared/MEASURING.md``): a spawned child unpickles
    ``(fn, args)`` from a pipe, calls it and pickles the result back; the parent awaits a
    future set from a ``loop.add_reader`` callback. Two such children, a call goes to the
    one with the fewest calls outstanding."""

    name = "python-floor"
    doc = (
        "2 spawned Python children: length-prefixed pickle of (fn, args) in, pickled result"
        " out, awaited via add_reader: the minimal Python round trip (process kind)"
    )
    only = frozenset({"latency", "throughput", "payload", "payloadlag"})

    def __init__(self) -> None:
        self.links: list[_PickleLink] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(WORKERS):
            proc = subprocess.Popen(
                [sys.executable, "-P", PYFLOOR_CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
            )
            assert proc.stdin is not None
            assert proc.stdout is not None
            self.procs.append(proc)
            self.links.append(_PickleLink(loop, proc.stdout.fileno(), proc.stdin.fileno()))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        link = min(self.links, key=lambda k: len(k.waiters))
        return await link.call(fn, args)

    async def aclose(self) -> None:
        for link in self.links:
            link.detach()
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
            except TimeoutError:
                proc.kill()
                proc.wait(2)
        self.links, self.procs = [], []


class PythonFloorInterpreter(PythonFloor):
    """The same Python floor with a subinterpreter (its own GIL, on a thread of this
    process) in place of each child, blocking on its request pipe."""

    name = "python-floor-interpreter"
    doc = (
        "the same Python floor, each worker a subinterpreter on its own thread reading a pipe"
        " (interpreter kind, 3.13+)"
    )

    def load(self) -> str:
        _need_interpreters()
        import _interpreters

        self._interp = _interpreters
        return ""

    async def start(self) -> None:
        import threading

        loop = asyncio.get_running_loop()
        self.workers: list[tuple[Any, threading.Thread, int, int, int]] = []
        for _ in range(WORKERS):
            req_r, req_w = os.pipe()
            ans_r, ans_w = os.pipe()
            iid = await asyncio.to_thread(self._interp.create)
            code = (
                f"import sys; sys.path.insert(0, {REPO_ROOT!r})\n"
                "from benchmarks._pyfloor_child import serve\n"
                f"serve({req_r}, {ans_w})\n"
            )
            thread = threading.Thread(target=self._interp.exec, args=(iid, code), daemon=True)
            thread.start()
            self.workers.append((iid, thread, req_r, ans_w, req_w))
            self.links.append(_PickleLink(loop, ans_r, req_w))

    async def aclose(self) -> None:
        for link in self.links:
            link.detach()
            os.close(link.wfd)  # end of file: serve() returns
        for iid, thread, req_r, ans_w, _ in self.workers:
            await asyncio.to_thread(thread.join, 5)
            for fd in (req_r, ans_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not thread.is_alive():
                with contextlib.suppress(Exception):
                    self._interp.destroy(iid)
        for link in self.links:
            with contextlib.suppress(OSError):
                os.close(link.rfd)
        self.links, self.workers = [], []


# --------------------------------------------------------------------------- previous release

#: The release before the anyio core: what main had before this round (issue 12 section 5).
PREVIOUS_COMMIT = "1f3e74f"


class OffloadPrevious(OffloadProcess):
    """The previous release, from a wheel built at run time from ``PREVIOUS_COMMIT`` and put
    first on this runner's ``PYTHONPATH`` (each system has its own runner process, so the two
    ``offload`` packages never meet in one interpreter)."""

    name = "offload-previous"
    doc = (
        f"the previous release (commit {PREVIOUS_COMMIT}, a wheel built at run time),"
        " WorkerManager(workers=2, kind='process')"
    )
    import_name = None
    map_chunksizes = ()
    streams = False
    slow_to_prepare = True

    @classmethod
    def prepare(cls, quick: bool) -> dict[str, str]:
        from ._external import previous_release

        path = previous_release(PREVIOUS_COMMIT)
        return {"PYTHONPATH": path, "OFFLOAD_BENCH_PREVIOUS": path}

    def load(self) -> str:
        version = super().load()
        where = os.environ.get("OFFLOAD_BENCH_PREVIOUS")
        got = os.path.abspath(self.offload.__file__ or "")
        if not where or not got.startswith(os.path.abspath(where) + os.sep):
            raise Unavailable(f"imported offload from {got}, not the previous release's wheel")
        return f"{version} ({PREVIOUS_COMMIT})"


class OffloadPreviousInterpreter(OffloadPrevious):
    name = "offload-previous-interpreter"
    doc = f"the previous release (commit {PREVIOUS_COMMIT}), kind='interpreter' (3.13+)"
    kind = "interpreter"

    def load(self) -> str:
        _need_interpreters()
        return super().load()


# --------------------------------------------------------------------------- trio

#: What the trio systems take part in (``benchmarks._anyio_scenarios``).
TRIO_SCENARIOS = frozenset({"latency", "throughput", "payload", "timeout"})


class OffloadProcessTrio(OffloadProcess):
    name = "offload-process-trio"
    doc = "offload.WorkerManager(workers=2, kind='process') on trio"
    loop = "trio"
    only = TRIO_SCENARIOS
    import_name = None
    map_chunksizes = ()
    streams = False

    def load(self) -> str:
        _import("trio")
        return super().load()

    async def settle(self) -> None:
        import anyio

        while self.wm.stats().spares < 1:
            await anyio.sleep(0.005)


class AnyioToProcessTrio(AnyioToProcess):
    name = "anyio-to_process-trio"
    doc = "anyio.to_process.run_sync with CapacityLimiter(2), on trio"
    loop = "trio"
    only = TRIO_SCENARIOS
    import_name = None

    def load(self) -> str:
        _import("trio")
        return super().load()

    async def aclose(self) -> None:
        from anyio import to_process

        try:
            workers = to_process._process_pool_workers.get()
        except LookupError:
            return
        for proc in list(workers):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with self.anyio.move_on_after(2), contextlib.suppress(Exception):
                await proc.aclose()
        workers.clear()


# --------------------------------------------------------------------------- 3.14, Node.js


class InterpreterPool(System):
    name = "InterpreterPoolExecutor"
    doc = "concurrent.futures.InterpreterPoolExecutor(max_workers=2) + loop.run_in_executor (3.14+)"
    import_name = "concurrent.futures.interpreter"
    map_chunksizes = (None,)

    def load(self) -> str:
        if sys.version_info < (3, 14):
            raise Unavailable(f"needs Python 3.14+ (this is {sys.version.split()[0]})")
        import concurrent.futures

        self.cls = concurrent.futures.InterpreterPoolExecutor  # type: ignore[attr-defined]
        return "stdlib"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ex = self.cls(max_workers=WORKERS)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.ex, fn, *args)

    async def map_all(
        self, fn: Callable[..., Any], items: list[Any], chunksize: int | None
    ) -> list[Any]:
        # Executor.map of a thread-based pool takes no chunks: one call per item.
        return list(self.ex.map(fn, items))

    async def aclose(self) -> None:
        # A running call cannot be stopped: shutting down waits for it (timeout scenario).
        self.ex.shutdown(wait=False, cancel_futures=True)
        await asyncio.wait_for(asyncio.to_thread(self.ex.shutdown, True), 25)


PISCINA_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "piscina_throughput.js")


class Piscina(System):
    """Node.js's piscina worker-thread pool, measured by ``benchmarks/piscina_throughput.js``
    in a node process that this runner starts per measurement (the same task count, in-flight
    count and time budget as the Python systems)."""

    name = "piscina"
    doc = (
        "Node.js piscina (minThreads=maxThreads=2), trivial tasks from"
        " benchmarks/piscina_throughput.js (npm package cached outside the repository)"
    )
    only = frozenset({"throughput"})
    import_name = None
    slow_to_prepare = True
    external = True

    @classmethod
    def prepare(cls, quick: bool) -> dict[str, str]:
        from ._external import piscina

        return {"OFFLOAD_BENCH_PISCINA": piscina()}

    def load(self) -> str:
        import json
        import shutil

        self.node = shutil.which("node")
        self.modules = os.environ.get("OFFLOAD_BENCH_PISCINA", "")
        if not self.node:
            raise Unavailable("node is not installed")
        try:
            with open(os.path.join(self.modules, "piscina", "package.json")) as f:
                version = json.load(f)["version"]
        except (OSError, ValueError, KeyError) as exc:
            raise Unavailable(f"piscina is not installed under {self.modules!r}: {exc}") from None
        node = subprocess.run([self.node, "--version"], capture_output=True, text=True).stdout
        return f"{version} (node {node.strip()})"

    def own_scenario(self, scenario: str, params: Any) -> Awaitable[dict[str, Any]] | None:
        return self._throughput(params) if scenario == "throughput" else None

    async def _throughput(self, p: Any) -> dict[str, Any]:
        import json

        proc = await asyncio.create_subprocess_exec(
            self.node,
            PISCINA_SCRIPT,
            self.modules,
            str(WORKERS),
            str(p.throughput_tasks),
            str(p.throughput_inflight),
            str(p.throughput_budget),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60 + 2 * p.throughput_budget)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode:
            raise RuntimeError(f"node exited {proc.returncode}: {err.decode()[-300:]}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["budget_hit"] = result["tasks"] < p.throughput_tasks
        return result

    async def start(self) -> None:
        raise NotImplementedError("piscina is measured by its own node script")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError("piscina is measured by its own node script")

    async def aclose(self) -> None:
        pass


# --------------------------------------------------------------------------- overload


class OverloadSystem(System):
    """An offload configuration behind a real server, for the ``overload`` scenario only.

    The scenario starts the server itself (``offload.demo._server``) with ``spec()``; the
    runner's ``start``/``aclose`` have nothing to do.
    """

    only = frozenset({"overload"})
    import_name = None
    warm_cycle = False  # the scenario warms its own server up
    mode = "app"
    #: The manager's options (the default ``workers``: the library's, for this machine).
    manager: ClassVar[dict[str, Any]] = {}
    #: Whether the password hash carries the deadline as its ``timeout``.
    deadline_on_task: ClassVar[bool] = False
    #: "offload": the JWT check is a task (``jwt:verify``); "inline": the app runs it itself.
    cheap: ClassVar[str] = "offload"

    def load(self) -> str:
        for module in ("starlette", "uvicorn", "jwt"):
            _import(module)
        offload = _import("offload")
        _import("offload.demo._server")
        return getattr(offload, "__version__", "") or _version("offload")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def spec(self, scrypt: dict[str, int], deadline: float) -> dict[str, Any]:
        mode = {
            "manager": {**self.manager, "shutdown_grace": 2},
            "cheap": self.cheap,
            "heavy_timeout": deadline if self.deadline_on_task else None,
        }
        return {"token": "jwt", "scrypt": scrypt, "modes": {self.mode: mode}}


class OverloadFifo(OverloadSystem):
    name = "offload-fifo-count"
    doc = (
        "today's behaviour: WorkerManager(scheduling='fifo', max_queue=8), no deadline on the "
        "task, the JWT check offloaded too (admission only by count)"
    )
    manager: ClassVar[dict[str, Any]] = {"scheduling": "fifo", "max_queue": 8}


class OverloadAdmission(OverloadSystem):
    name = "offload-admission"
    doc = (
        "WorkerManager(scheduling='fair', max_queue=64, inline_below=0.001), the deadline as "
        "the hash's timeout (deadline-aware admission), the JWT check offloaded (inline_below)"
    )
    manager: ClassVar[dict[str, Any]] = {
        "scheduling": "fair",
        "max_queue": 64,
        "inline_below": 0.001,
    }
    deadline_on_task = True


class OverloadAdmissionLoopJwt(OverloadAdmission):
    name = "offload-admission-jwt-on-loop"
    doc = (
        "offload-admission, but the app checks the JWT on the event loop itself: what "
        "inline_below is meant to do for the cheap type"
    )
    cheap = "inline"


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        Floor,
        BlockingFloor,
        OffloadProcess,
        OffloadInterpreter,
        AnyioToProcess,
        AnyioToInterpreter,
        ProcessPool,
        Pebble,
        Loky,
        AioMultiprocess,
        OverloadFifo,
        OverloadAdmission,
        OverloadAdmissionLoopJwt,
        PythonFloor,
        PythonFloorInterpreter,
        OffloadPrevious,
        OffloadPreviousInterpreter,
        OffloadProcessTrio,
        AnyioToProcessTrio,
        InterpreterPool,
        Piscina,
    )
}
FLOORS = frozenset({"floor", "floor-blocking", "python-floor", "python-floor-interpreter"})
OVERLOAD = frozenset({"offload-fifo-count", "offload-admission", "offload-admission-jwt-on-loop"})
OFFLOAD = frozenset({"offload-process", "offload-interpreter", "offload-process-trio"}) | OVERLOAD
#: The release before this one, measured beside it (issue 12 section 5): not a peer.
PREVIOUS_OFFLOAD = frozenset({"offload-previous", "offload-previous-interpreter"})
#: Peers that are not Python ("best Python peer" leaves them out).
NOT_PYTHON = frozenset({"piscina"})


def perf_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
