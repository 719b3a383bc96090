"""A FastAPI app that answers at once and sends its welcome e-mails as durable background jobs.

Run it (on 127.0.0.1 only)::

    pip install '.[fastapi]'      # from the offload checkout: the web extra and FastAPI
    python examples/jobs_app.py --port 8000 --store sqlite:///tmp/jobs.db

Then::

    curl -s localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"user": 42, "email": "ada@example.com"}'
    curl -s localhost:8000/jobs/welcome-42
    curl -s localhost:8000/health

``/signup`` stores a job (``email:welcome``, queue ``emails``, 3 retries with a 1/5/10 s
backoff, a 30 s deadline) and answers; the job id ``welcome-{user}`` makes a repeated signup
harmless. The app's lifespan opens the job store and a ``WorkerManager`` and works the
``emails`` and ``default`` queues while the app runs; at shutdown running jobs get 10 s to
finish and the rest are handed back to the store. A job survives a crash or a deploy: the
next start (or another process: ``offload jobs work --store ... --import jobs_app``) runs it.
``/health`` shows the counts per queue and state, and answers 503 when due jobs wait too long
or name a task type no worker knows.

The "e-mail" is a file written to ``$JOBS_APP_OUTBOX`` (default ``./outbox``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import offload
from offload import WorkerManager
from offload.jobs import JobQueue

MAX_DUE_AGE = 60.0  # seconds a due job may wait before /health says 503


@offload.task("email:welcome")
def send_welcome(data: dict[str, Any]) -> str:
    """Runs on a worker process: render and "send" the e-mail (here: write it to a file)."""
    outbox = Path(os.environ.get("JOBS_APP_OUTBOX", "outbox"))
    outbox.mkdir(parents=True, exist_ok=True)
    message = outbox / f"welcome-{data['user']}.eml"
    message.write_text(f"To: {data['email']}\nSubject: Welcome!\n\nHello, user {data['user']}.\n")
    return str(message)


class Signup(BaseModel):
    user: int
    email: str


def create_app(store: str, *, workers: int = 2) -> FastAPI:
    jobs = JobQueue(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = anyio.Event()
        async with jobs, WorkerManager(workers=workers) as wm, anyio.create_task_group() as tg:
            work = partial(jobs.work, wm, ["emails", "default"], concurrency=8, grace=10)
            tg.start_soon(partial(work, stop=stop))
            yield
            stop.set()  # finish running jobs (10 s), hand back the rest

    app = FastAPI(lifespan=lifespan)

    @app.post("/signup")
    async def signup(body: Signup) -> dict[str, Any]:
        job_id = await jobs.enqueue(
            "email:welcome",
            {"user": body.user, "email": body.email},
            queue="emails",
            retries=3,
            backoff=[1, 5, 10],
            timeout=30,
            job_id=f"welcome-{body.user}",  # signing up twice sends one e-mail
        )
        return {"user": body.user, "job": job_id}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        info = await jobs.get(job_id)
        if info is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return {
            "id": info.id,
            "queue": info.queue,
            "state": info.state,
            "attempts": info.attempts,
            "error": info.error,
            "result": info.result,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = await jobs.stats()
        late = stats.oldest_due_age is not None and stats.oldest_due_age > MAX_DUE_AGE
        ok = not late and not stats.unrunnable
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "jobs": stats.as_dict()},
            status_code=200 if ok else 503,
        )

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="offload.jobs example app")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--store", default="sqlite:jobs.db")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    uvicorn.run(create_app(args.store, workers=args.workers), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
