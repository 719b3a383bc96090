"""The pytest plugin under each way of running async tests, on generated test suites."""

from __future__ import annotations

import importlib.util

import pytest

pytest_plugins = ("pytester",)

HAS_TRIO = importlib.util.find_spec("trio") is not None
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None

HEADER = """
import asyncio
import os

import pytest

import offload.tasks  # registers crypto:hash
from offload import WorkerManager

pytestmark = [{mark}]
"""

# What every kind of suite must be able to do.
ESSENTIAL = """

async def test_used_directly(worker_manager):
    assert await worker_manager.run(pow, 2, 10) == 1024
    assert worker_manager.stats().workers == 2
    assert os.getpid() not in worker_manager.worker_pids()


async def test_factory_and_a_manager_left_running(worker_manager_factory):
    async with worker_manager_factory(workers=1) as a:
        b = await worker_manager_factory(workers=1).start()  # never shut down by the test
        assert set(a.worker_pids()).isdisjoint(b.worker_pids())
        assert await asyncio.gather(a.run(abs, -1), b.run(abs, -2)) == [1, 2]


async def test_plain_manager_in_a_test():
    async with WorkerManager(workers=1) as wm:
        assert await wm.run(divmod, 7, 2) == (3, 1)
"""

# The rest of the surface, checked once (strict mode).
MORE = """

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
"""

ANYIO_ASYNCIO = """

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

ANYIO_LOOPS = """
import asyncio

import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture(params={params})
def anyio_backend(request):
    return request.param


@pytest.mark.offload(workers=1)
async def test_loop_kind(worker_manager, anyio_backend):
    assert await worker_manager.run(abs, -3) == 3
    module = type(asyncio.get_running_loop()).__module__
    assert module.startswith("uvloop") == isinstance(anyio_backend, tuple)
"""

TRIO_TEST = """
import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio"


async def test_not_on_trio(worker_manager):
    raise AssertionError("not reached: the fixture skips the test")
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

from offload import _pool


async def test_broken_shutdown(worker_manager, monkeypatch):
    async def keep_workers(self, grace):  # a shutdown that leaves the workers alive
        return None

    monkeypatch.setattr(_pool.Pool, "aclose", keep_workers)
    async with worker_manager as wm:
        assert await wm.run(abs, -1) == 1
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


def anyio_params() -> str:
    params = ['"asyncio"']
    if HAS_UVLOOP:
        params.append('("asyncio", {"use_uvloop": True})')
    return "[" + ", ".join(params) + "]"


def test_pytest_asyncio_strict_mode_and_anyio_together(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    files = {
        "test_strict": HEADER.format(mark="pytest.mark.asyncio") + ESSENTIAL + MORE,
        "test_anyio": HEADER.format(mark="pytest.mark.anyio") + ESSENTIAL + ANYIO_ASYNCIO,
        "test_anyio_loops": ANYIO_LOOPS.format(params=anyio_params()),
    }
    if HAS_TRIO:
        files["test_trio"] = TRIO_TEST
    pytester.makepyfile(**files)
    result = pytester.runpytest("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(passed=5 + 3 + 1 + HAS_UVLOOP, skipped=HAS_TRIO)
    if HAS_TRIO:
        result.stdout.fnmatch_lines(["*offload runs on asyncio only*'trio' is not supported*"])


def test_pytest_asyncio_auto_mode_and_leak_detection(pytester: pytest.Pytester) -> None:
    """Auto mode, in a subprocess: the leak test abandons live workers on purpose."""
    ini(pytester, "auto")
    pytester.makepyfile(test_auto=HEADER.format(mark="") + ESSENTIAL, test_leak=LEAK_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_broken_shutdown*", "*offload: worker processes still alive*"]
    )


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
def test_pytest_asyncio_with_uvloop(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    pytester.makeconftest(UVLOOP_CONFTEST)
    pytester.makepyfile(test_uv=UVLOOP_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_on_each_loop?uvloop? PASSED*"])


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    ini(pytester, "strict")
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.offload(*"])
