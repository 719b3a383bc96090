"""The event loop ends under offload's workers: nothing holds up ``asyncio.run``'s return.

Found by a newcomer's trial: ``asyncio.run`` of one ``offload.to_process`` call returned 2 s
late (the pool's shutdown waited for exits the loop's end had already reaped), and a manager
that was never shut down, with a task running at the loop's end, held it up 5 s (the caller's
cancellation waited for an outcome nobody would send). The scripts run in a child process and
print how long the loop's end took; the bounds are far above the milliseconds it takes now and
below the stalls they catch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

TO_PROCESS = """
    import asyncio, time
    from offload import to_process

    def f(x):
        return x

    async def main():
        assert await to_process.run_sync(f, 1) == 1
        global ended
        ended = time.perf_counter()

    if __name__ == "__main__":
        asyncio.run(main())
        print(f"{time.perf_counter() - ended:.3f}")
"""

UNSHUT_MANAGER = """
    import asyncio, time
    import offload

    def slow(seconds):
        time.sleep(seconds)

    async def main():
        wm = offload.WorkerManager(workers=1)
        await wm.start()
        asyncio.ensure_future(wm.run(slow, 30))
        while wm.stats().running < 1:
            await asyncio.sleep(0.01)
        global ended
        ended = time.perf_counter()

    if __name__ == "__main__":
        asyncio.run(main())
        print(f"{time.perf_counter() - ended:.3f}")
"""


@pytest.mark.parametrize(("script", "bound"), [(TO_PROCESS, 1.0), (UNSHUT_MANAGER, 1.5)])
def test_the_loops_end_is_not_held_up(tmp_path: Path, script: str, bound: float) -> None:
    path = tmp_path / "main.py"
    path.write_text(textwrap.dedent(script))
    child = subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert float(out.strip()) < bound, out
    # A worker's command line ends with its parent's pid: none of the script's is left.
    leftover = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[-1] == str(child.pid)
    ]
    assert not leftover
