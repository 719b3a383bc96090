from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# Tests import their task functions from tests/tasks.py, and so do the workers.
sys.path.insert(0, str(Path(__file__).parent))

requires_interpreters = pytest.mark.skipif(
    sys.version_info < (3, 13), reason="interpreter workers need Python 3.13+"
)


@pytest.fixture(autouse=True)
def no_leaked_workers() -> Iterator[None]:
    """Every test ends with no child process and no interpreter thread of ours left."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before]
    for proc in leaked:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            proc.kill()
    alive = [p.pid for p in leaked if _alive(p)]
    assert not alive, f"worker processes leaked: {alive}"
    hosts = [
        t.name
        for t in threading.enumerate()
        if t.ident not in threads_before and t.name.startswith("offload-interpreter")
    ]
    assert not hosts, f"interpreter threads leaked: {hosts}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A named pipe: a worker task blocks reading it until the test writes a line."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    return path


def release(path: Path, line: str = "go") -> None:
    """Open the FIFO for writing (this waits for the reader) and send ``line``."""
    with open(path, "w") as gate:
        gate.write(line + "\n")
