"""Bad stores: each gives a clear error with its code, and loses nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from offload.jobs import (
    SCHEMA_VERSION,
    JobQueue,
    SchemaTooNew,
    StoreCorrupt,
    StoreLocked,
    StoreUnavailable,
)

from .support import Inbox

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).parent.parent


async def test_a_locked_database_is_store_locked_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    async with JobQueue(f"sqlite://{db}?timeout=0.2") as jobs:
        kept = await jobs.enqueue("jobs-test:echo", {"n": 1})
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreLocked) as caught:
                await jobs.enqueue("jobs-test:echo", {"n": 2}, job_id="refused")
            assert caught.value.code == "STORE_LOCKED"
            assert "busy timeout" in str(caught.value)
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert await jobs.get("refused") is None
        assert (await jobs.get(kept)) is not None
        assert await jobs.enqueue("jobs-test:echo", {"n": 2}, job_id="later") == "later"


@pytest.mark.parametrize("damage", ["not-a-database", "damaged-pages"])
async def test_a_corrupt_file_is_store_corrupt_and_is_not_written(
    tmp_path: Path, damage: str
) -> None:
    db = tmp_path / "jobs.db"
    if damage == "not-a-database":
        db.write_bytes(b"this is a text file, not a database\n" * 200)
    else:
        async with JobQueue(f"sqlite://{db}") as jobs:
            for n in range(300):
                await jobs.enqueue("jobs-test:echo", {"n": n, "pad": "x" * 500})
        raw = bytearray(db.read_bytes())
        assert len(raw) > 8 * 4096
        raw[4096 * 2 : 4096 * 6] = os.urandom(4096 * 4)  # pages of the table and its indexes
        db.write_bytes(bytes(raw))
    before = db.read_bytes()

    async def use() -> None:
        async with JobQueue(f"sqlite://{db}") as jobs:
            await jobs.stats()
            await jobs.enqueue("jobs-test:echo", {"n": "new"})

    with pytest.raises(StoreCorrupt) as caught:
        await use()
    assert caught.value.code == "STORE_CORRUPT"
    assert str(db) in str(caught.value)
    assert db.read_bytes() == before


async def test_a_schema_from_a_newer_offload_is_refused_and_left_in_place(store_url: str) -> None:
    async with JobQueue(store_url) as jobs:
        kept = await jobs.enqueue("jobs-test:echo", {"keep": True})
        store = jobs._store

        def set_version(version: int) -> Any:
            def run(conn: Any) -> None:
                store.execute(
                    conn,
                    "UPDATE offload_jobs_meta SET value = :v WHERE key = 'schema_version'",
                    {"v": str(version)},
                )

            return run

        await store._run(set_version(SCHEMA_VERSION + 1))
        with pytest.raises(SchemaTooNew) as caught:
            async with JobQueue(store_url):
                pass
        assert caught.value.code == "SCHEMA_TOO_NEW"
        assert f"version {SCHEMA_VERSION + 1}" in str(caught.value)
        assert "upgrade offload" in str(caught.value)
        await store._run(set_version(SCHEMA_VERSION))
        info = await jobs.get(kept)
        assert info is not None
        assert info.data == {"keep": True}


async def test_an_unreachable_server_is_store_unavailable_without_the_password(
    tmp_path: Path,
) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql://app:s3cret-pw@/jobs?host={tmp_path}&connect_timeout=2"
    with pytest.raises(StoreUnavailable) as caught:
        async with JobQueue(url):
            pass
    assert caught.value.code == "STORE_UNAVAILABLE"
    assert "s3cret-pw" not in str(caught.value)
    assert "app:***@" in str(caught.value)
    assert "s3cret-pw" not in repr(JobQueue(url))


FILL = textwrap.dedent(
    """
    import json, resource, signal, sys
    import anyio
    from offload.jobs import JobQueue, StoreFull
    import jobs.jobtasks

    async def main(url, limit):
        ok = []
        async with JobQueue(url) as q:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                for i in range(100_000):
                    ok.append(await q.enqueue("jobs-test:echo", {"pad": "x" * 2000},
                                              job_id=f"job-{i}"))
            except StoreFull as exc:
                print(json.dumps({"ok": ok, "code": exc.code, "message": str(exc)}))
                sys.stdout.flush()

    anyio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


def test_a_full_disk_is_store_full_and_keeps_every_job_it_accepted(tmp_path: Path) -> None:
    """The file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes fail alike."""
    db = tmp_path / "jobs.db"
    run = subprocess.run(
        [sys.executable, "-c", FILL, f"sqlite://{db}", str(512 * 1024)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        check=False,
    )
    assert run.stdout, run.stderr
    report = json.loads(run.stdout.splitlines()[0])
    assert report["code"] == "STORE_FULL"
    assert "nothing was lost" in report["message"]
    assert len(report["ok"]) > 10

    async def check() -> None:
        async with JobQueue(f"sqlite://{db}") as jobs:
            for job_id in report["ok"]:
                info = await jobs.get(job_id)
                assert info is not None
                assert info.state == "queued"
            assert (await jobs.stats()).total("queued") == len(report["ok"])

    anyio.run(check)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


async def test_without_a_doorbell_a_worker_falls_back_to_looking_every_poll_interval(
    tmp_path: Path, manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "jobs.db"
    inbox = Inbox(tmp_path / "inbox")
    async with JobQueue(f"sqlite://{db}") as jobs:
        wake = jobs._store.doorbell.directory  # type: ignore[attr-defined]
        wake.write_text("not a directory")  # so the doorbell cannot be made
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: jobs.work(manager, poll_interval=0.2))
                await jobs.enqueue("jobs-test:ping", {"fifo": str(inbox.path), "name": "polled"})
                assert (await inbox.line()).startswith("polled ")
                tg.cancel_scope.cancel()
        finally:
            wake.unlink()
            inbox.close()
    assert "cannot listen for new jobs" in caplog.text
