"""examples/jobs_app.py on a real uvicorn server on 127.0.0.1, driven with httpx."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

pytest.importorskip("fastapi")

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``app`` with uvicorn in this loop on a free port (lifespan on); a client for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning", ws="none")
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            yield client
    finally:
        server.should_exit = True
        async with asyncio.timeout(30):
            await serve
        sock.close()


@pytest.mark.asyncio
async def test_the_example_enqueues_in_a_handler_and_works_in_the_lifespan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # workers import the task from here too
    monkeypatch.setenv("JOBS_APP_OUTBOX", str(tmp_path / "outbox"))
    import jobs_app

    app = jobs_app.create_app(f"sqlite://{tmp_path}/jobs.db", workers=1)
    async with serving(app) as client:
        first = await client.post("/signup", json={"user": 42, "email": "ada@example.com"})
        assert first.status_code == 200
        assert first.json() == {"user": 42, "job": "welcome-42"}
        again = await client.post("/signup", json={"user": 42, "email": "ada@example.com"})
        assert again.json()["job"] == "welcome-42"
        async with asyncio.timeout(30):
            while (job := (await client.get("/jobs/welcome-42")).json())["state"] != "done":
                assert job["state"] in ("queued", "running"), job
                await asyncio.sleep(0.05)  # a client polling the status route, as users do
        assert job["attempts"] == 1
        mail = await anyio.Path(job["result"]).read_text()
        assert mail.startswith("To: ada@example.com\n")
        assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["welcome-42.eml"]
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["jobs"]["queues"]["emails"]["done"] == 1
        assert (await client.get("/jobs/nope")).status_code == 404
    sys.modules.pop("jobs_app", None)
