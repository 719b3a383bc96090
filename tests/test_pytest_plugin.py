"""The pytest plugin under each way of running async tests, on generated test suites.

Each test writes a small suite and runs it with pytester: pytest-asyncio in strict and auto
mode, anyio's plugin on asyncio, uvloop and trio, the leak check, the marker.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest_plugins = ("pytester",)

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None

HEADER = """
import os

import anyio
import pytest

import offload.tasks  # registers crypto:hash
from offload import WorkerManager

pytestmark = [{mark}]
"""

# What every kind of suite must be able to do (backend-neutral: anyio works on each loop).
ESSENTIAL = """

async def test_used_directly(worker_manager):
    assert await worker_manager.run(pow, 2, 10) == 1024
    assert worker_manager.stats().workers == 2
    assert os.getpid() not in worker_manager.worker_pids()


LEFT = []


async def test_factory_and_a_manager_left_running(worker_manager_factory):
    results = {}

    async def one(wm, n):
        results[n] = await wm.run(abs, -n)

    async with worker_manager_factory(workers=1) as a:
        b = await worker_manager_factory(workers=1).start()  # never shut down by the test
        LEFT.append((b, b.worker_pids()))
        assert set(a.worker_pids()).isdisjoint(b.worker_pids())
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, a, 1)
            tg.start_soon(one, b, 2)
        assert results == {1: 1, 2: 2}


async def test_the_manager_left_running_was_shut_down_cleanly():
    (b, pids), = LEFT
    assert b.closed
    assert b.finished  # its shutdown ran to the end (not the loop's end killing the workers)
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} of the left manager still exists")


async def test_started_by_concurrent_first_uses(worker_manager):
    results = []

    async def use(n):
        results.append(await worker_manager.run(abs, -n))

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(use, n)
    assert sorted(results) == [0, 1, 2, 3]
    assert len(worker_manager.worker_pids()) == 2


async def test_async_with(worker_manager):
    async with worker_manager as wm:
        assert wm is worker_manager
        assert await wm.execute_task({"type": "crypto:hash", "data": {"data": "abc"}}) == (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        )
    assert wm.closed


@pytest.mark.offload(workers=1, max_queue=0)
async def test_marker_settings(worker_manager):
    async with worker_manager as wm:
        assert wm.stats().workers == 1
        assert wm.max_queue == 0


async def test_plain_manager_in_a_test():
    async with WorkerManager(workers=1) as wm:
        assert await wm.run(divmod, 7, 2) == (3, 1)
"""
N_ESSENTIAL = 7

# anyio's plugin over each backend it can run: asyncio, uvloop, trio.
ANYIO_BACKENDS = """

@pytest.fixture(scope="module", params={params})
def anyio_backend(request):
    return request.param


async def test_runs_on_the_backend(worker_manager, anyio_backend):
    assert await worker_manager.run(abs, -3) == 3
    name = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
    assert offload._runtime.current_runtime().name == name
    if name == "asyncio":
        import asyncio

        module = type(asyncio.get_running_loop()).__module__
        assert module.startswith("uvloop") == isinstance(anyio_backend, tuple)
"""

UVLOOP_CONFTEST = """
import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
"""

UVLOOP_TEST = """
import asyncio

import pytest

pytestmark = pytest.mark.asyncio


@pytest.mark.offload(workers=1)
async def test_on_each_loop(worker_manager, request):
    assert await worker_manager.run(abs, -4) == 4
    module = type(asyncio.get_running_loop()).__module__
    assert module.startswith("uvloop") == ("uvloop" in request.node.name)
"""

LEAK_TEST = """
import pytest

from offload._local._pool import LocalPool

{backend}

async def test_broken_shutdown(worker_manager, monkeypatch):
    async def keep_workers(self, grace):  # a shutdown that leaves the workers alive
        return None

    monkeypatch.setattr(LocalPool, "aclose", keep_workers)
    async with worker_manager as wm:
        assert await wm.run(abs, -1) == 1
"""

MODULE_LOOP_TEST = """
import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_left_running_in_a_wider_loop(worker_manager):
    assert await worker_manager.run(abs, -5) == 5
"""


def ini(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = {mode}
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        """
    )


def backends() -> list[str]:
    params = ['"asyncio"', '"trio"']
    if HAS_UVLOOP:
        params.insert(1, '("asyncio", {"use_uvloop": True})')
    return params


def test_pytest_asyncio_strict_mode(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    pytester.makepyfile(test_strict=HEADER.format(mark="pytest.mark.asyncio") + ESSENTIAL)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:anyio", "-v")
    result.assert_outcomes(passed=N_ESSENTIAL)


def test_pytest_asyncio_auto_mode(pytester: pytest.Pytester) -> None:
    ini(pytester, "auto")
    pytester.makepyfile(test_auto=HEADER.format(mark="") + ESSENTIAL)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=N_ESSENTIAL)


@pytest.mark.parametrize("backend", backends())
def test_anyio_plugin_on_each_backend(pytester: pytest.Pytester, backend: str) -> None:
    """anyio's plugin (pytest-asyncio loaded too, in strict mode): nothing is skipped."""
    ini(pytester, "strict")
    pytester.makepyfile(
        test_anyio=HEADER.format(mark="pytest.mark.anyio")
        + "\nimport offload._runtime\n"
        + ESSENTIAL
        + ANYIO_BACKENDS.format(params=f"[{backend}]")
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "-W", "error")
    result.assert_outcomes(passed=N_ESSENTIAL + 1)


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
def test_pytest_asyncio_with_uvloop(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    pytester.makeconftest(UVLOOP_CONFTEST)
    pytester.makepyfile(test_uv=UVLOOP_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_on_each_loop?uvloop? PASSED*"])


LEAK_BACKENDS = {
    "pytest-asyncio": "pytestmark = pytest.mark.asyncio",
    "anyio-asyncio": (
        "pytestmark = pytest.mark.anyio\n\n\n@pytest.fixture\ndef anyio_backend():\n"
        "    return 'asyncio'\n"
    ),
    "anyio-trio": (
        "pytestmark = pytest.mark.anyio\n\n\n@pytest.fixture\ndef anyio_backend():\n"
        "    return 'trio'\n"
    ),
}


@pytest.mark.parametrize("runner", list(LEAK_BACKENDS))
def test_leaked_workers_fail_the_test_and_are_killed(
    pytester: pytest.Pytester, runner: str
) -> None:
    """In a subprocess: the suite abandons live workers on purpose."""
    ini(pytester, "strict")
    pytester.makepyfile(test_leak=LEAK_TEST.format(backend=LEAK_BACKENDS[runner]))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_broken_shutdown*", "*offload: worker processes still alive*"]
    )
    # The survivors were killed: the subprocess (their parent) exited without waiting on them,
    # and nothing of its pids runs the worker script any more.
    result.stdout.no_fnmatch_line("*interpreter worker threads*")


def test_a_manager_left_running_in_a_loop_that_outlives_the_test(
    pytester: pytest.Pytester,
) -> None:
    ini(pytester, "strict")
    pytester.makepyfile(test_module_loop=MODULE_LOOP_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*was left running, and its event loop outlives the test*"])


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.offload(*"])


def test_the_marker_takes_keywords_only(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    pytester.makepyfile(
        test_marker="""
        import pytest

        @pytest.mark.offload(1)
        @pytest.mark.asyncio
        async def test_positional(worker_manager):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*offload takes keyword arguments only*"])
