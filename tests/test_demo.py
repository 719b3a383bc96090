"""``offload demo``: the web demo end to end, its output, and its hint without the web extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from offload import _demo

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

QUICK = ["--seconds", "1", "--concurrency", "8", "--no-progress"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def check_result(data: dict[str, object]) -> None:
    phases = data["phases"]
    assert isinstance(phases, dict)
    assert list(phases) == ["inline", "offloaded"]
    for phase in phases.values():
        assert set(phase) == {f.name for f in _demo.PhaseResult.__dataclass_fields__.values()}
        assert phase["requests"] > 0
        assert phase["requests_per_s"] > 0
        assert phase["errors"] == 0
        assert phase["heavy_done"] > 0
        assert 0 < phase["cheap_p50_ms"] <= phase["cheap_p99_ms"]
    assert phases["inline"]["rejected_503"] == 0  # no queue in front of inline work
    # The point of the demo: inline hashing stalls the event loop, offloaded hashing does not.
    assert phases["inline"]["loop_lag_p99_ms"] > phases["offloaded"]["loop_lag_p99_ms"]


def test_demo_runs_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    others = {p.pid for p in psutil.Process().children(recursive=True)}
    out = tmp_path / "demo.json"
    # One worker and no waiting room, so the offloaded phase also shows 503s.
    small = ["--workers", "1", "--max-queue", "0", "--heavy-share", "0.25"]
    result = run("-m", "offload._demo", *QUICK, *small, "--json", str(out))
    assert result.returncode == 0, result.stderr
    for label in ("requests/s", "cheap requests p99 (ms)", "event-loop lag p99 (ms)", "(503)"):
        assert label in result.stdout
    assert "inline" in result.stdout
    assert "offloaded" in result.stdout
    data = json.loads(out.read_text())
    assert (data["seconds"], data["concurrency"], data["workers"], data["max_queue"]) == (
        1,
        8,
        1,
        0,
    )
    assert data["heavy_share"] == 0.25
    check_result(data)
    assert data["phases"]["offloaded"]["rejected_503"] > 0
    # The server and its workers are gone (the autouse fixture checks grandchildren too).
    assert not [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.pid not in others
    ]


@pytest.mark.parametrize("module", ["starlette", "uvicorn", "httpx"])
def test_without_the_web_extra_the_demo_says_what_to_install(module: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # as if not installed\n"
        "from offload._demo import main\n"
        "sys.exit(main(['--seconds', '1']))\n"
    )
    result = run("-c", code)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pip install 'offload[web]'" in lines[0]


def test_bad_options_are_refused() -> None:
    assert _demo.main(["--seconds", "0"]) == 2


def test_plain_rendering() -> None:
    phase = {
        "seconds": 1.0,
        "requests": 100,
        "requests_per_s": 100.0,
        "cheap_p50_ms": 1.5,
        "cheap_p99_ms": 1234.5,
        "heavy_done": 10,
        "heavy_p50_ms": 50.0,
        "loop_lag_p99_ms": 40.0,
        "rejected_503": 3,
        "errors": 0,
    }
    result = _demo.DemoResult(
        seconds=1,
        concurrency=8,
        heavy_share=0.1,
        workers=1,
        max_queue=8,
        cpu_count=2,
        python="3.x",
        phases=(
            _demo.PhaseResult(mode="inline", **phase),  # type: ignore[arg-type]
            _demo.PhaseResult(mode="offloaded", **phase),  # type: ignore[arg-type]
        ),
    )
    text = _demo.render_plain(result)
    lines = text.splitlines()
    assert lines[0].split() == ["inline", "offloaded"]
    assert set(lines[1]) <= {"-", " "}
    assert "cheap requests p99 (ms)  1,234.5    1,234.5" in text
    assert len({len(line) for line in lines[:2]}) == 1
    assert result.to_json()["phases"]["offloaded"]["rejected_503"] == 3
    assert "3 logins turned away" in _demo.summary(result)


def test_percentile() -> None:
    assert _demo.percentile([], 0.99) == 0.0
    assert _demo.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _demo.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_offload_demo_command(tmp_path: Path) -> None:
    if "--seconds" not in run("-m", "offload", "demo", "--help").stdout:
        pytest.skip("`offload demo` is not wired to offload._demo yet")
    out = tmp_path / "demo.json"
    quick = ["--seconds", "0.5", "--concurrency", "8", "--no-progress"]
    result = run("-m", "offload", "demo", *quick, "--json", str(out))
    assert result.returncode == 0, result.stderr
    check_result(json.loads(out.read_text()))


def test_ctrl_c_stops_the_server_and_its_workers() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "offload._demo", "--seconds", "60", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as in a terminal
    )
    try:
        deadline = time.monotonic() + 60  # bounded wait: the server and its workers are up
        tree: list[psutil.Process] = []
        while time.monotonic() < deadline and len(tree) < 2:
            tree = psutil.Process(demo.pid).children(recursive=True)
            time.sleep(0.05)
        assert len(tree) >= 2, "the demo server and its workers did not start"
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err + out
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_demo_leaves_no_server_or_workers() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "offload._demo", "--seconds", "60", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60  # bounded wait: the server and its workers are up
        tree: list[psutil.Process] = []
        while time.monotonic() < deadline and len(tree) < 2:
            tree = psutil.Process(demo.pid).children(recursive=True)
            time.sleep(0.05)
        assert len(tree) >= 2, "the demo server and its workers did not start"
    finally:
        demo.kill()  # no chance to clean up: the server notices its stdin closing
        demo.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive
