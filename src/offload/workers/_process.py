"""Process workers: a child Python running ``_worker.py``; stopping a task kills the process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from .. import _worker as wire
from ._base import Worker

if TYPE_CHECKING:
    from .._queue import Job

__all__ = ("ProcessWorker",)

_WORKER_SCRIPT = wire.__file__


class ProcessWorker(Worker):
    """A worker process. A deadline or a cancellation stops its task by SIGKILL."""

    kind = "process"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.process: subprocess.Popen[bytes] | None = None
        self._exited: asyncio.Future[int] | None = None

    @property
    def ident(self) -> str:
        return f"pid {self.process.pid}" if self.process is not None else "(not started)"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def gone(self) -> bool:
        return self._exited is None or self._exited.done()

    async def _launch(self, task_r: int, answer_w: int, control_r: int) -> None:
        # -P: the script's folder is not put on sys.path (it holds modules named like stdlib's)
        # Popen (fork+exec via vfork) takes about a millisecond: cheaper than a thread hop.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-P", _WORKER_SCRIPT, str(task_r), str(answer_w), str(control_r)],
            pass_fds=(task_r, answer_w, control_r, *self.arena_fds),
            stdin=subprocess.DEVNULL,
        )
        if self.nice:  # the whole process, start-up included: it never competes with the loop
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.process.pid, self.nice)
        self._exited = _watch_exit(self.process)

    def stop_running(self, job: Job) -> None:
        self.kill()

    def kill(self) -> None:
        self.retired = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def wait_closed(self, timeout: float) -> None:
        if self._exited is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._exited)
        except TimeoutError:
            await self.kill_and_wait()

    def stop_now(self) -> None:
        self.close()
        self.kill()

    async def kill_and_wait(self) -> None:
        self.stop_now()
        if self._exited is not None:
            await asyncio.shield(self._exited)

    async def wait_exited(self) -> int:
        """Wait until the process has exited and been reaped; its return code."""
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    def exit_note(self) -> str:
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return ""
        if code < 0:
            try:
                return f" (killed by {signal.Signals(-code).name})"
            except ValueError:
                return f" (killed by signal {-code})"
        return f" (exit code {code})"


def _watch_exit(process: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future for the process's exit status, reaped as soon as it exits."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits instead
        task = loop.run_in_executor(None, process.wait)
        task.add_done_callback(lambda f: None if exited.done() else exited.set_result(f.result()))
        return exited

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(process.wait())

    loop.add_reader(pidfd, on_exit)
    return exited
