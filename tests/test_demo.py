"""``offload demo``: the web demo end to end, its parts, its output, and its hint without the
web extra; ``offload demo --local``."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.demo import _http, _server, _web

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

QUICK = ["--seconds", "1", "--rate", "40", "--no-progress"]
PHASE_FIELDS = {f.name for f in _web.PhaseResult.__dataclass_fields__.values()}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def check_result(data: dict[str, object]) -> None:
    phases = data["phases"]
    assert isinstance(phases, dict)
    assert list(phases) == ["inline", "fifo", "admission"]
    for phase in phases.values():
        assert set(phase) == PHASE_FIELDS
        assert phase["cheap_sent"] > 0
        assert phase["logins_sent"] > 0
        assert phase["failed"] == 0
        assert phase["logins_ok"] > 0
        assert (
            phase["logins_ok"] + phase["logins_refused"] + phase["logins_dropped"]
            == (phase["logins_sent"])
        )
        assert 0 < phase["cheap_p50_ms"] <= phase["cheap_p99_ms"]
        assert phase["logins_in_time"] <= phase["logins_ok"]
    # No queue in front of inline work: nothing is refused, nothing dropped.
    assert phases["inline"]["logins_refused"] == phases["inline"]["logins_dropped"] == 0
    # The point of the demo: inline hashing stalls the event loop, offloaded hashing does not.
    for mode in ("fifo", "admission"):
        assert phases["inline"]["loop_lag_p99_ms"] > phases[mode]["loop_lag_p99_ms"]


def test_demo_runs_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    # 4x overload and a short max_wait: the admission mode must refuse some logins.
    small = ["--workers", "1", "--load", "4", "--max-wait", "0.1"]
    result = run("-m", "offload", "demo", *QUICK, *small, "--json", str(out))
    assert result.returncode == 0, result.stderr
    for label, *_ in _web.ROWS:
        assert label.format(deadline=1) in result.stdout  # every row, and its legend line
        assert result.stdout.count(label.format(deadline=1)) >= 2
    for title in _web.TITLES.values():
        assert title in result.stdout
    data = json.loads(out.read_text())
    assert (data["seconds"], data["cheap_rate"], data["workers"], data["load"]) == (1, 40, 1, 4)
    assert data["login_rate"] > 0
    assert data["hash_ms"] > 0
    check_result(data)
    assert data["phases"]["admission"]["logins_refused"] > 0
    assert data["phases"]["admission"]["retry_after"] not in ("", "-")


@pytest.mark.parametrize("module", ["starlette", "uvicorn", "httpx"])
def test_without_the_web_extra_the_demo_says_what_to_install(module: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # as if not installed\n"
        "from offload.demo._web import main\n"
        "sys.exit(main(['--seconds', '1']))\n"
    )
    result = run("-c", code)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pip install '.[web]'" in lines[0]
    assert module in lines[0]


def phase(mode: str, **changes: object) -> _web.PhaseResult:
    values: dict[str, object] = {
        "cheap_sent": 100,
        "cheap_p50_ms": 1.5,
        "cheap_p99_ms": 1234.5,
        "cheap_refused": 0,
        "loop_lag_p99_ms": 40.0,
        "logins_sent": 20,
        "logins_ok": 15,
        "hashes_per_s": 12.5,
        "logins_in_time": 10,
        "login_p50_ms": 300.0,
        "login_p99_ms": 900.0,
        "logins_refused": 3,
        "logins_dropped": 2,
        "refusal_p99_ms": 2.5,
        "retry_after": "1",
        "failed": 0,
    }
    values.update(changes)
    return _web.PhaseResult(mode=mode, **values)  # type: ignore[arg-type]


def test_plain_rendering_has_a_legend_line_per_row() -> None:
    result = _web.DemoResult(
        seconds=1,
        cheap_rate=100,
        login_rate=20,
        load=1.5,
        hash_ms=70,
        workers=1,
        max_queue=64,
        max_wait=0.5,
        deadline=1.0,
        worker_nice=0,
        cpu_count=2,
        python="3.x",
        phases=(phase("inline"), phase("fifo"), phase("admission", logins_refused=7)),
    )
    text = _web.render_plain(result)
    lines = text.splitlines()
    assert [cell.strip() for cell in re.split(r"\s{2,}", lines[0].strip())] == [
        "inline",
        "offloaded (FIFO)",
        "offloaded (admission)",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(_web.ROWS)
    assert "cheap requests p99 (ms)  1,234.5" in text
    legend = _web.legend(result)
    assert len(legend) == len(_web.ROWS)
    assert all(": " in line and len(line.split(": ", 1)[1]) > 10 for line in legend)
    assert "of 20 sent" in "\n".join(legend)
    assert result.to_json()["phases"]["admission"]["logins_refused"] == 7
    assert "7 refused" in _web.summary(result)
    assert all(len(line) <= 79 for line in legend)  # one terminal line each


def test_summarise_counts_each_outcome_once() -> None:
    outcomes = [
        _http.Outcome("cheap", 0.0, 200, 0.002),
        _http.Outcome("cheap", 0.1, 200, 0.004),
        _http.Outcome("cheap", 0.2, 503, 0.001, "1"),
        _http.Outcome("login", 0.0, 200, 0.5),
        _http.Outcome("login", 0.1, 200, 1.5),  # late
        _http.Outcome("login", 0.2, 503, 0.003, "2"),
        _http.Outcome("login", 0.3, 504, 0.6),
        _http.Outcome("login", 0.4, 0, 15.0),  # no answer
    ]
    result = _web.summarise("admission", outcomes, 3.0, deadline=1.0)
    assert (result.cheap_sent, result.cheap_refused, result.logins_sent) == (3, 1, 5)
    assert (result.logins_ok, result.logins_in_time) == (2, 1)
    assert (result.logins_refused, result.logins_dropped, result.failed) == (1, 1, 1)
    assert result.retry_after == "2"
    assert result.refusal_p99_ms == 3.0
    assert result.hashes_per_s == round(2 / 1.6, 1)  # until the last answer, at 0.1 + 1.5 s


@given(
    rate=st.floats(min_value=0.1, max_value=5000, allow_nan=False),
    seconds=st.floats(min_value=0.0, max_value=30, allow_nan=False),
    offset=st.floats(min_value=0.0, max_value=0.99),
)
def test_evenly_spaces_the_schedule(rate: float, seconds: float, offset: float) -> None:
    times = _http.evenly(rate, seconds, offset)
    assert len(times) == int(seconds * rate + 1e-9)
    assert times == sorted(times)
    assert all(0 <= at < seconds + 1 / rate for at in times)
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
    assert all(abs(gap - 1 / rate) < 1e-6 for gap in gaps)


def test_percentile() -> None:
    assert _http.percentile([], 0.99) == 0.0
    assert _http.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _http.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


@given(key=st.binary(min_size=1, max_size=64), subject=st.text(max_size=40))
def test_hmac_tokens_check_and_reject_tampering(key: bytes, subject: str) -> None:
    token = _server.hmac_token(key, subject)
    assert _server.hmac_check(key, token)
    assert not _server.hmac_check(key + b"x", token)
    payload, _, mac = token.partition(".")
    assert not _server.hmac_check(key, payload + "A." + mac)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_the_load_generator_against_the_demo_server() -> None:
    """The client side (server start, open-loop drive, stop) works on both anyio backends."""
    from offload.demo._child import demo_server

    spec = {
        "token": "hmac",
        "scrypt": {"n": 2**10, "r": 8, "p": 1},
        "modes": {"inline": None, "pool": {"manager": {"workers": 1}, "cheap": "inline"}},
    }
    async with demo_server(spec) as server:
        auth = (("authorization", f"Bearer {server.token}"),)
        schedule = [
            _http.Request(0.0, "cheap", "GET", "/cheap/pool", None, auth),
            _http.Request(0.0, "cheap", "GET", "/cheap/pool", None, (("authorization", "x"),)),
            _http.Request(0.01, "login", "POST", "/heavy/pool", _web.PASSWORD_BODY),
            _http.Request(0.02, "login", "POST", "/heavy/inline", _web.PASSWORD_BODY),
            _http.Request(0.03, "other", "GET", "/cheap/nosuchmode", None, auth),
        ]
        outcomes = await _http.drive(server.url, schedule, timeout=30)
        stats = await _http.HttpClient.get_json(server.url, "/_demo/stats")
        pid = server.pid
    assert [o.status for o in outcomes] == [200, 401, 200, 200, 404]
    assert all(o.latency >= 0 for o in outcomes)
    assert stats["managers"]["pool"]["completed"] >= 2  # the warm-up task, then the login
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def start_demo(*extra: str) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    demo = subprocess.Popen(
        [sys.executable, "-m", "offload", "demo", "--seconds", "60", "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as in a terminal
    )
    deadline = time.monotonic() + 60  # bounded wait: the server and its workers are up
    tree: list[psutil.Process] = []
    while time.monotonic() < deadline and len(tree) < 3:
        tree = psutil.Process(demo.pid).children(recursive=True)
        time.sleep(0.05)
    return demo, tree


def test_ctrl_c_stops_the_server_and_its_workers() -> None:
    demo, tree = start_demo()
    try:
        assert len(tree) >= 3, "the demo server and its workers did not start"
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err + out
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_demo_leaves_no_server_or_workers() -> None:
    demo, tree = start_demo()
    try:
        assert len(tree) >= 3, "the demo server and its workers did not start"
    finally:
        demo.kill()  # no chance to clean up: the server notices its stdin closing
        demo.communicate()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive


def test_local_demo_announces_what_it_prints_and_explains_the_number_column() -> None:
    result = run("-m", "offload", "demo", "--local", "--workers", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    announced = re.search(r"\((\d+) rows below\)", lines[0])
    assert announced is not None, lines[0]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "task"])
    rows = []
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        rows.append(line)
    assert len(rows) == int(announced[1]) == 11
    assert sorted(int(row.split()[0]) for row in rows) == list(range(1, 12))
    assert "# is the order they were submitted in" in result.stdout
