"""A runner process: hosts one system and runs scenarios on it when told to.

``python -m benchmarks._runner SYSTEM RESULT_FD LOOP [warm|cold]``. Reads one JSON command
per line on stdin, answers one JSON line on RESULT_FD (stdout and stderr are left to the
libraries). Each scenario runs in a fresh event loop. After each one, any child process the system
left alive (other than the libraries' resource trackers) is reported and killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from typing import Any

from benchmarks import _procs
from benchmarks._tasks import who
from benchmarks.scenarios import SCENARIOS, Params
from benchmarks.systems import SYSTEMS, System, Unavailable


def _loop_factory(loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_scenario(system_cls: type[System], name: str, params: Params, loop: str) -> dict[str, Any]:
    system = system_cls()
    system.load()
    t0 = time.perf_counter()
    if system_cls.loop == "trio":
        import trio

        from benchmarks import _anyio_scenarios

        result = trio.run(_anyio_scenarios.SCENARIOS[name], system, params)
        result["runner_seconds"] = time.perf_counter() - t0
        return result
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        result = runner.run(system.own_scenario(name, params) or SCENARIOS[name](system, params))
    result["runner_seconds"] = time.perf_counter() - t0
    return result


async def _warm(system: System) -> None:
    system.load()
    await system.start()
    try:
        for _ in range(2):
            await asyncio.gather(*(system.call(who) for _ in range(2)))
    finally:
        await system.aclose()


def main() -> None:
    name, result_fd, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    warm = sys.argv[4:5] != ["cold"]
    out = os.fdopen(result_fd, "w", buffering=1)

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    system_cls = SYSTEMS[name]
    try:
        if loop == "uvloop":
            import uvloop  # noqa: F401
        version = system_cls().load()
    except Unavailable as exc:
        send({"unavailable": str(exc)})
        return
    except Exception as exc:
        send({"unavailable": f"{type(exc).__name__}: {exc}"})
        return
    # One untimed start/call/stop cycle: compiles and caches the bytecode the system's
    # workers need, so that no scenario (startup above all) pays for a cold cache.
    # (Skipped with --quick, whose figures are not compared with anything.)
    warmup_error = None
    if warm and system_cls.warm_cycle and not system_cls.external:
        try:
            if system_cls.loop == "trio":
                import trio

                from benchmarks._anyio_scenarios import warm as warm_on_anyio

                trio.run(warm_on_anyio, system_cls())
            else:
                with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
                    runner.run(asyncio.wait_for(_warm(system_cls()), 60))
        except BaseException as exc:
            warmup_error = f"{type(exc).__name__}: {exc}"[:300]
        _procs.kill_pids([p for p in _procs.descendants(os.getpid()) if not _procs.is_helper(p)])
    send(
        {
            "ready": True,
            "version": version,
            "python": sys.version.split()[0],
            "warmup_error": warmup_error,
        }
    )

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") != "run":
            break
        try:
            result = run_scenario(system_cls, cmd["scenario"], Params(**cmd["params"]), loop)
            reply: dict[str, Any] = {"result": result}
        except BaseException as exc:
            reply = {
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()[-3000:],
            }
        left = [p for p in _procs.descendants(os.getpid()) if not _procs.is_helper(p)]
        if left:
            reply["lingering"] = [_procs.cmdline(p)[:120] for p in left]
            _procs.kill_pids(left)
        send(reply)


if __name__ == "__main__":
    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Library threads (executor managers, queue feeders) must not hold up the exit;
        # the orchestrator kills anything left in this runner's tree.
        os._exit(0)
