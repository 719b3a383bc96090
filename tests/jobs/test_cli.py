"""``offload jobs ...`` in this process (``offload.__main__.main``), on both stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload.__main__ import main
from offload.jobs import JobQueue


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["jobs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_work_once_then_look_after_the_failed_jobs(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def setup() -> dict[str, str]:
        async with JobQueue(store_url) as jobs:
            return {
                "ok": await jobs.enqueue("jobs-test:add", {"a": 1, "b": 2}, queue="emails"),
                "bad1": await jobs.enqueue("jobs-test:fail", {"message": "one"}, queue="emails"),
                "bad2": await jobs.enqueue("jobs-test:fail", {"message": "two"}),
                "later": await jobs.enqueue("jobs-test:add", {"a": 0, "b": 0}, delay=3600),
            }

    ids = anyio.run(setup)
    store = ("--store", store_url)
    code, _, err = cli(
        capsys, "work", *store, "--queue", "emails", "--queue", "default", "--once",
        "--import", "jobs.jobtasks", "--workers", "1",
    )  # fmt: skip
    assert code == 0, err

    code, out, _ = cli(capsys, "stats", *store, "--json")
    stats = json.loads(out)
    assert code == 0
    assert stats["queues"]["emails"]["done"] == 1
    assert stats["queues"]["emails"]["failed"] == 1
    assert (stats["queues"]["default"]["failed"], stats["queues"]["default"]["delayed"]) == (1, 1)
    code, out, _ = cli(capsys, "stats", *store)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["queue", "due", "delayed"]

    code, out, _ = cli(capsys, "failed", *store, "--json")
    records = {r["id"]: r for r in json.loads(out)}
    assert set(records) == {ids["bad1"], ids["bad2"]}
    assert records[ids["bad1"]]["error_type"] == "KeyError"
    assert "raise KeyError" in records[ids["bad1"]]["traceback"]
    code, out, _ = cli(capsys, "failed", *store, "--queue", "emails")
    assert ids["bad1"] in out
    assert ids["bad2"] not in out
    assert "KeyError: 'one'" in out

    assert cli(capsys, "retry", ids["bad1"], *store)[0] == 0
    code, _, err = cli(capsys, "retry", "no-such-job", *store)
    assert code == 1
    assert "no failed job" in err
    code, out, _ = cli(capsys, "retry-all", *store, "--queue", "default")
    assert (code, out.strip()) == (0, "queued 1 failed jobs again")

    assert cli(capsys, "forget", ids["later"], *store)[0] == 0
    assert cli(capsys, "forget", ids["later"], *store)[0] == 1
    code, out, _ = cli(capsys, "purge", *store, "--state", "done")
    assert (code, out.strip()) == (0, "purged 1 jobs")

    async def states() -> dict[str, Any]:
        async with JobQueue(store_url) as jobs:
            return {k: await jobs.get(v) for k, v in ids.items()}

    after = anyio.run(states)
    assert after["ok"] is None
    assert after["later"] is None
    assert (after["bad1"].state, after["bad1"].attempts) == ("queued", 0)
    assert after["bad2"].state == "queued"


def test_store_errors_exit_1_with_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "jobs.db"
    db.write_bytes(b"garbage" * 1000)
    code, _, err = cli(capsys, "stats", "--store", f"sqlite://{db}")
    assert code == 1
    assert "[STORE_CORRUPT]" in err


def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OFFLOAD_JOBS_STORE", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "stats"])
    assert exited.value.code == 2
    assert "--store" in capsys.readouterr().err
    code, _, err = cli(capsys, "stats", "--store", "mysql://db/jobs")
    assert code == 2
    assert "unknown job store 'mysql'" in err


def test_the_store_can_come_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_JOBS_STORE", f"sqlite://{tmp_path}/env.db")
    code, out, _ = cli(capsys, "failed")
    assert (code, out.strip()) == (0, "no failed jobs")
    assert (tmp_path / "env.db").exists()


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("work", "--concurrency", "0"),
        ("work", "--workers", "0"),
        ("work", "--lease", "-1"),
        ("work", "--lease", "0"),
        ("work", "--grace", "-2"),
        ("work", "--poll-interval", "nan"),
        ("work", "--health-interval", "inf"),
        ("failed", "--limit", "0"),
        ("purge", "--older-than", "-1"),
    ],
)
def test_an_option_out_of_range_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str, value: str
) -> None:
    # Once: --concurrency 0 and --lease -1 printed an ExceptionGroup traceback.
    with pytest.raises(SystemExit) as exited:
        main(["jobs", command, "--store", f"sqlite://{tmp_path / 'jobs.db'}", option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"argument {option}: must be" in err[0]
    assert repr(value) in err[0]
