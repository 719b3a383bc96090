"""Start the demo server (``offload.demo._server``) as a child process, and always stop it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc

__all__ = ("Server", "demo_server")

START_TIMEOUT: Final = 60.0  # for the server to come up (workers included)
STOP_TIMEOUT: Final = 15.0


@dataclass(frozen=True, slots=True)
class Server:
    """A running demo server: its base URL and what it announced (token, hash cost)."""

    url: str
    pid: int
    token: str
    hash_seconds: float


@contextlib.asynccontextmanager
async def demo_server(spec: dict[str, Any]) -> AsyncIterator[Server]:
    """Start the app for ``spec`` in a child process; yield it once ready; always stop it.

    Raises ``RuntimeError`` (with the end of the server's log) if it does not start.
    """
    with tempfile.TemporaryFile() as log:
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "offload.demo._server",
                "--watch-stdin",
                "--spec",
                json.dumps(spec),
            ],
            stdin=subprocess.PIPE,  # never written: its end tells the server we are gone
            stdout=subprocess.PIPE,
            stderr=log,
            # Its own session: a Ctrl-C in the terminal reaches only this process, which then
            # stops the server in order (the server drains and stops its workers).
            start_new_session=True,
        )
        try:
            line = b""
            assert process.stdout is not None
            with anyio.move_on_after(START_TIMEOUT):
                async for chunk in process.stdout:
                    line += chunk
                    if b"\n" in line:
                        break
            if not line.startswith(b"READY "):
                log.seek(0)
                detail = log.read().decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    "the demo server did not start: " + (" | ".join(detail) or "no output")
                )
            ready = json.loads(line.split(b"\n", 1)[0][6:])
            # The server prints nothing after READY (its logs go to stderr), so its stdout
            # pipe is not read from here on.
            yield Server(
                url=f"http://127.0.0.1:{ready['port']}",
                pid=process.pid,
                token=ready["token"],
                hash_seconds=float(ready["hash_seconds"]),
            )
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(process)


async def _stop(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # uvicorn shuts down: lifespan, then workers
        with anyio.move_on_after(STOP_TIMEOUT) as scope:
            await process.wait()
        if scope.cancelled_caught:
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # its workers exit by themselves when it is gone
            await process.wait()
    await process.aclose()
