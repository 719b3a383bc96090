"""Interpreter workers (Python 3.13+): a subinterpreter with its own GIL, in its own thread.

The thread enters the interpreter once and stays in offload's worker loop, so a task costs
two pipe wake-ups and no per-call ``exec``, and the event loop's thread never runs
interpreter code. Stopping a running task sends an interrupt down the control pipe: a
watcher thread inside the interpreter raises an exception in the task (pure-Python code
stops within milliseconds; code blocked in C runs on until it returns, see the pool's
quarantine). ``os._exit`` or a segfault in a task ends the whole process: use process workers
for code that may crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import _worker as wire
from ..errors import UnsupportedKind
from ._base import Worker

if TYPE_CHECKING:
    from .._queue import Job

__all__ = ("InterpreterWorker", "interpreters_available")

log = logging.getLogger("offload")

_NEEDS = (3, 13)  # subinterpreters with their own GIL that load stdlib extension modules

_BOOT = """\
import sys
_path = {path!r}
_ns = {{"__name__": "__offload_worker__", "__file__": _path}}
with open(_path, "rb") as _f:
    exec(compile(_f.read(), _path, "exec"), _ns)
_ns["serve"]({task_r}, {answer_w}, {control_r}, in_process=False, stop_flag=stop_flag)
"""
_JOIN = '_ns["join_watcher"]()'


def interpreters_available() -> None:
    """Raise ``UnsupportedKind`` unless this Python can run interpreter workers."""
    if tuple(sys.version_info[:2]) < _NEEDS:
        raise UnsupportedKind(
            'kind="interpreter" needs Python 3.13 or newer (subinterpreters with their own GIL); '
            f'this is Python {sys.version_info.major}.{sys.version_info.minor}: use kind="process"'
        )
    try:
        import _interpreters  # noqa: F401
    except ImportError:
        raise UnsupportedKind(
            'kind="interpreter": this Python build has no _interpreters module; use kind="process"'
        ) from None


class InterpreterWorker(Worker):
    """A subinterpreter driven by a dedicated thread, never by the event loop's thread."""

    kind = "interpreter"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interpreter_id: int | None = None
        self.stop_flag = bytearray(1)  # set: give nothing more to run (see _worker.serve)
        self._done: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self.failure = ""

    @property
    def ident(self) -> str:
        return f"interpreter #{self.number}"

    @property
    def gone(self) -> bool:
        return self._done is None or self._done.done()

    async def _launch(self, task_r: int, answer_w: int, control_r: int) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._done = done
        boot = _BOOT.format(
            path=wire.__file__, task_r=task_r, answer_w=answer_w, control_r=control_r
        )

        def host() -> None:
            try:
                self._host(boot, (task_r, answer_w, control_r))
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(_set_done, done)

        self._thread = threading.Thread(target=host, name=f"offload-interpreter-{self.number}")
        self._thread.start()

    def _host(self, boot: str, fds: tuple[int, int, int]) -> None:
        import _interpreters

        interp = _create_interpreter()
        if isinstance(interp, Exception):
            self.failure = f"could not create a subinterpreter: {_describe_failure(interp)}"
            _close_all(fds)
            return
        self.interpreter_id = interp
        try:
            _interpreters.exec(interp, "import _interpreters")
            _interpreters.set___main___attrs(interp, {"stop_flag": memoryview(self.stop_flag)})
            error = _interpreters.exec(interp, boot)
            if error is not None:
                self.failure = str(getattr(error, "formatted", error))
        finally:
            # Closing the pipes tells the parent the worker is gone; it then closes the
            # control pipe, which ends the watcher thread inside the interpreter.
            _close_all(fds)
            _interpreters.exec(interp, _JOIN)
            with contextlib.suppress(Exception):
                _interpreters.destroy(interp)

    def _after_launch(self, child_fds: tuple[int, int, int]) -> None:
        pass  # the host thread closes the worker's ends when the interpreter is done

    def stop_running(self, job: Job) -> None:
        self.interrupt(job)

    def quarantine(self) -> None:
        """Run nothing more (what waits here is requeued elsewhere); end after the current call."""
        self.retired = True
        self.stop_flag[0] = 1
        self.close()

    async def wait_closed(self, timeout: float) -> None:
        if self._done is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._done)
        except TimeoutError:
            log.warning(
                "offload: %s is still inside a call after %.1f s; it cannot be killed and "
                "ends when the call returns",
                self.ident,
                timeout,
            )
            return
        if self._thread is not None:
            self._thread.join()  # it is past its last line: only the thread's exit is left

    def stop_now(self) -> None:
        self.quarantine()  # an interpreter cannot be killed: it runs nothing more

    async def kill_and_wait(self) -> None:
        # An interpreter cannot be killed: stop giving it work and let its call end.
        self.stop_now()
        await self.wait_closed(float("inf"))

    def exit_note(self) -> str:
        return f" ({self.failure.strip().splitlines()[-1]})" if self.failure else ""


def _create_interpreter(attempts: int = 3) -> int | Exception:
    """A new isolated subinterpreter's id, or why none could be made.

    CPython 3.13 occasionally fails a creation made while other threads create or destroy
    interpreters ("interpreter creation failed", seen in its own test suite too); a retry
    a moment later succeeds, so a transient failure does not fail a worker start.
    """
    import _interpreters

    failure: Exception = RuntimeError("no attempt made")
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.05 * attempt)
        try:
            return int(_interpreters.create("isolated"))
        except Exception as exc:
            failure = exc
    return failure


def _describe_failure(exc: BaseException) -> str:
    """``exc`` and what it was raised from (CPython chains the real reason)."""
    reasons = [f"{exc}"]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        reasons.append(f"{type(cause).__name__}: {cause}")
    return "; ".join(reasons)


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
