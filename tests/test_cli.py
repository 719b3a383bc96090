"""The ``offload`` command line as a newcomer meets it: version, help texts, one-line errors for
bad values, install hints that work from a checkout, and ``offload calibrate``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import offload
from offload.demo import _calibrate

ROOT = Path(__file__).resolve().parent.parent


def offload_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


# -- 16: the version ------------------------------------------------------------------------


def test_version_of_the_installed_package_matches_the_project() -> None:
    assert metadata.version("offload") == project_version()
    assert offload.__version__ == project_version()


def test_version_option() -> None:
    result = offload_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"offload {project_version()}"


# -- 17, 18: help texts ---------------------------------------------------------------------


def test_main_help_is_plain_text_and_names_every_command() -> None:
    result = offload_cli("--help")
    assert result.returncode == 0
    assert "``" not in result.stdout  # no raw reStructuredText
    assert "--version" in result.stdout
    for command in ("demo", "calibrate", "jobs"):
        assert command in result.stdout


def test_demo_help_says_what_the_demo_does() -> None:
    result = offload_cli("demo", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for words in (
        "web app",
        "127.0.0.1",
        "inline",
        "offloaded",
        "password",
        "503",
        "--local",
        "--seconds",
        "--workers",
    ):
        assert words in text, words
    assert "``" not in result.stdout


@pytest.mark.parametrize("command", ["demo", "calibrate", "jobs"])
def test_command_help_is_plain_text(command: str) -> None:
    result = offload_cli(command, "--help")
    assert result.returncode == 0
    assert "``" not in result.stdout


def test_calibrate_help_says_what_it_does() -> None:
    text = " ".join(offload_cli("calibrate", "--help").stdout.split())
    assert "crypto:hash_password" in text
    assert "--target" in text


# -- 23: one line for a bad value -----------------------------------------------------------

BAD = [
    ("demo", "--workers", "0"),
    ("demo", "--workers", "two"),
    ("demo", "--workers", "-3"),
    ("demo", "--local", "--workers", "0"),
    ("demo", "--seconds", "0"),
    ("demo", "--seconds", "nan"),
    ("demo", "--seconds", "-1"),
    ("demo", "--rate", "0"),
    ("demo", "--rate", "inf"),
    ("demo", "--load", "0"),
    ("demo", "--max-queue", "-1"),
    ("demo", "--max-wait", "0"),
    ("demo", "--deadline", "x"),
    ("demo", "--worker-nice", "20"),
    ("calibrate", "--target", "0"),
    ("calibrate", "--runs", "0"),
    ("calibrate", "--rate", "-5"),
    ("nosuchcommand",),
]


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_a_bad_value_is_one_clear_line(argv: tuple[str, ...]) -> None:
    result = offload_cli(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    assert "Traceback" not in result.stderr
    option = next((arg for arg in argv if arg.startswith("--") and arg != "--local"), None)
    if option is not None:
        assert option in lines[0]
        assert repr(argv[-1]) in lines[0]  # the value given, quoted


# -- 22: install commands -------------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_install_commands_work_from_the_checkout(path: Path) -> None:
    """No release is published: ``pip install 'offload[...]'`` would fail (or install someone
    else's package). Install commands name the checkout instead."""
    text = path.read_text()
    assert not re.search(r"pip install\s+['\"]?offload\b", text)


def test_the_auth_example_names_its_extra() -> None:
    text = (ROOT / "examples" / "auth.py").read_text()
    assert "pip install '.[jwt]'" in text


def test_fastapi_is_in_an_extra_and_the_readme_says_so() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    holding = [
        name for name, deps in extras.items() if any(dep.startswith("fastapi") for dep in deps)
    ]
    assert holding == ["fastapi"]
    assert "offload[web]" in extras["fastapi"]
    assert "pip install '.[fastapi]'" in (ROOT / "README.md").read_text()
    assert "pip install '.[fastapi]'" in (ROOT / "examples" / "jobs_app.py").read_text()


# -- offload calibrate ----------------------------------------------------------------------


def test_calibrate_times_costs_and_suggests_one_within_the_target(tmp_path: Path) -> None:
    out = tmp_path / "calibrate.json"
    result = offload_cli("calibrate", "--target", "0.03", "--runs", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    costs = data["costs"]
    assert costs
    assert all(cost["seconds"] > 0 for cost in costs)
    assert all(cost["runs"] == 1 for cost in costs)
    # Weakest first, and it stops once a cost takes over twice the target.
    assert [(c["n"], c["p"]) for c in costs] == list(_calibrate.COSTS[: len(costs)])
    assert all(c["seconds"] <= 2 * 0.03 for c in costs[:-1])
    suggested = data["suggested"]
    if suggested is None:
        assert all(c["seconds"] > 0.03 for c in costs)
        assert "No cost runs within" in result.stdout
    else:
        assert suggested["seconds"] <= 0.03
        assert f"n={suggested['n']}, r=8, p={suggested['p']}" in result.stdout
        assert "below OWASP's minimum" in result.stdout  # nothing that fast meets it


costs_strategy = st.lists(
    st.builds(
        _calibrate.Cost,
        n=st.sampled_from([2**k for k in range(10, 19)]),
        r=st.just(8),
        p=st.integers(1, 4),
        seconds=st.floats(0.001, 5.0),
        runs=st.just(1),
    ),
    min_size=1,
    max_size=12,
)


@given(costs=costs_strategy, target=st.floats(0.001, 5.0))
def test_suggest_picks_the_strongest_cost_within_the_target(
    costs: list[_calibrate.Cost], target: float
) -> None:
    best = _calibrate.suggest(costs, target)
    fitting = [c for c in costs if c.seconds <= target]
    if not fitting:
        assert best is None
        return
    assert best is not None
    assert best.seconds <= target
    assert all(c.n * c.p <= best.n * best.p for c in fitting)
    text = _calibrate.report(costs, target, rate=10)
    assert best.label() in text
    assert "worker(s)" in text


def test_cost_meets_owasp_at_n_times_p_2_to_the_17() -> None:
    assert _calibrate.Cost(2**17, 8, 1, 0.5, 1).meets_owasp
    assert _calibrate.Cost(2**16, 8, 2, 0.5, 1).meets_owasp
    assert not _calibrate.Cost(2**16, 8, 1, 0.3, 1).meets_owasp
    assert _calibrate.Cost(2**16, 8, 1, 0.3, 1).memory_mib == 64
