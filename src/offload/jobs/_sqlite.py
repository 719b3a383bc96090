"""The SQLite store: stdlib ``sqlite3`` in a worker thread, WAL mode, one file per store.

Several processes on one host may share the file: writes are single statements (each its own
transaction, serialised by SQLite's lock, with a busy timeout), so a claim can never hand one
job to two workers. Workers sleep on a *doorbell*: a directory next to the database
(``jobs.db-wake/``) where each waiting worker binds a UNIX datagram socket. A write that makes
a job due sends one byte to each socket there (a few microseconds each), so an idle worker
wakes at once, in this process or another, without polling the database. A socket left by a
process that died refuses the datagram and is removed. Workers still look at the store every
``poll_interval`` seconds in case a ring was missed (a writer that is not offload).

URL: ``sqlite:///absolute/path/jobs.db`` or ``sqlite:relative/jobs.db`` (or a plain path), with
optional ``?timeout=SECONDS`` (busy timeout, default 5) and ``&synchronous=normal|full``
(default ``normal``: a commit survives a crash of the process, but the last commits before a
power loss may be lost; ``full`` syncs every commit to disk).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio

from ._errors import StoreCorrupt, StoreError, StoreFull, StoreLocked
from ._store import SCHEMA_VERSION, Store, Subscription

__all__ = ("SqliteStore", "parse_sqlite_url")

T = TypeVar("T")

_SUN_PATH_MAX: Final = 107

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS offload_jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
        priority INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        retries INTEGER NOT NULL DEFAULT 0,
        backoff TEXT NOT NULL,
        retry_until REAL,
        retry_on TEXT,
        timeout REAL,
        created_at REAL NOT NULL,
        run_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        lease_until REAL,
        worker TEXT,
        token TEXT,
        error_code TEXT,
        error_type TEXT,
        error TEXT,
        traceback TEXT,
        result TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS offload_jobs_due "
    "ON offload_jobs (queue, priority, run_at, seq) WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_next "
    "ON offload_jobs (queue, run_at) WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_lease "
    "ON offload_jobs (lease_until) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_token ON offload_jobs (token) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_finished "
    "ON offload_jobs (state, queue, finished_at) WHERE state IN ('done', 'failed')",
)


def parse_sqlite_url(url: str) -> tuple[Path, dict[str, str]]:
    """``sqlite:///abs/jobs.db?timeout=2`` -> (``/abs/jobs.db``, ``{"timeout": "2"}``)."""
    if not url.startswith("sqlite:"):
        return Path(url), {}
    parts = urlsplit(url)
    if parts.netloc and parts.netloc != "localhost":
        raise ValueError(f"a sqlite URL names a local file, not the host {parts.netloc!r}")
    path = unquote(parts.path)
    if path.startswith("//"):  # sqlite:////abs/path (SQLAlchemy's spelling) is the same file
        path = "/" + path.lstrip("/")
    if not path or path == "/" or ":memory:" in path:
        raise ValueError(
            "a sqlite job store needs a file (sqlite:///path/to/jobs.db): workers in other "
            "processes must see the same jobs"
        )
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(options) - {"timeout", "synchronous"}
    if unknown:
        raise ValueError(f"unknown sqlite URL options {sorted(unknown)}: use timeout, synchronous")
    return Path(path), options


class SqliteStore(Store):
    width = 1  # one connection: SQLite has one writer at a time anyway

    def __init__(self, url: str) -> None:
        path, options = parse_sqlite_url(url)
        super().__init__(f"sqlite://{path}" if path.is_absolute() else f"sqlite:{path}")
        self.path = path
        try:
            self.busy_timeout = float(options.get("timeout", "5"))
        except ValueError:
            raise ValueError(
                f"timeout must be a number of seconds, not {options['timeout']!r}"
            ) from None
        self.synchronous = options.get("synchronous", "normal").lower()
        if self.synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._ring_after_commit = False
        self.doorbell = Doorbell(self.path)

    def _connect_all(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=0,  # SQLITE_BUSY is retried here, in finer steps than SQLite's own
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._error(exc, "open") from None
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"the job store {self.display_url} could not switch to WAL mode "
                    f"(it is in {mode!r} mode; is the file on a network filesystem?)"
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "open") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_all(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.doorbell.close()

    def _with_connection(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)``; while another connection holds the write lock, try again (every
        0.1-2 ms) for up to the busy timeout. Each write is one statement or one transaction,
        so a retry never repeats a part that was committed."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"the job store {self.display_url} is closed")
            deadline = time.monotonic() + self.busy_timeout
            pause = 0.0001
            while True:
                try:
                    return fn(conn)
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    busy = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY") or (
                        "database is locked" in str(exc)
                    )
                    if busy and time.monotonic() + pause < deadline:
                        time.sleep(pause)
                        pause = min(pause * 2, 0.002)
                        continue
                    raise self._error(exc) from None

    def _error(self, exc: BaseException, doing: str = "use") -> StoreError:
        where = f"the job store {self.display_url}"
        name = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and (
            name.startswith("SQLITE_BUSY") or "locked" in text
        ):
            return StoreLocked(
                f"{where} stayed locked by another connection for longer than the busy timeout "
                f"({self.busy_timeout:g} s; set ?timeout=SECONDS); nothing was changed"
            )
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or (
            "not a database" in text or "malformed" in text
        ):
            return StoreCorrupt(
                f"{where} is not a SQLite database, or it is damaged ({text}); offload did not "
                "write to it. Restore it from a backup, or point the store at another file."
            )
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")) or "disk is full" in text:
            return StoreFull(
                f"could not write to {where}: the disk is full or a file-size limit was reached "
                f"({name or text}); the operation was rolled back, nothing was lost"
            )
        if isinstance(exc, OSError):
            return StoreError(f"cannot {doing} {where}: {exc.strerror or exc}")
        return StoreError(f"{where} failed: {type(exc).__name__}: {text}")

    def _migrate(self, conn: Any) -> None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'offload_jobs_meta'"
        ).fetchone()
        if has_meta:
            self.check_version(_version(conn))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS offload_jobs_meta "
                "(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            found = _version(conn)
            self.check_version(found)
            if found is None:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO offload_jobs_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            # Later versions: apply the steps from `found` up to SCHEMA_VERSION here.
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def now(self) -> float:
        return time.time()

    def in_list(self, column: str, param: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(:{param}))"

    def list_param(self, values: Sequence[str]) -> Any:
        import json

        return json.dumps(list(values))

    def _insert(self, conn: Any, sql: str, params: dict[str, Any]) -> set[str]:
        inserted = {row[0] for row in conn.execute(sql, params).fetchall()}
        if inserted:
            self._wake(conn, [])
        return inserted

    def _wake(self, conn: Any, queues: Sequence[str]) -> None:
        if conn.in_transaction:
            self._ring_after_commit = True  # a worker woken now would not see the rows yet
        else:
            self.doorbell.ring()

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")  # SQLITE_BUSY here is retried by _with_connection
        self._ring_after_commit = False
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if self._ring_after_commit:
            self.doorbell.ring()

    async def subscribe(self) -> Subscription:
        return self.doorbell.subscribe()


def _version(conn: Any) -> int | None:
    row = conn.execute(
        "SELECT value FROM offload_jobs_meta WHERE key = 'schema_version'"
    ).fetchone()
    return None if row is None else int(row[0])


class Doorbell:
    """Datagram sockets in a directory next to the database: ``ring`` wakes every waiter."""

    def __init__(self, db_path: Path) -> None:
        base = db_path.resolve().parent / f"{db_path.name}-wake"
        if len(str(base)) + 40 > _SUN_PATH_MAX:
            # Too long for a socket address: a short directory every process derives the same.
            digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
            base = Path("/tmp") / f"offload-jobs-{digest}"
        self.directory = base
        self._sender: socket.socket | None = None
        self._lock = threading.Lock()

    def ring(self) -> None:
        """Wake every worker waiting on this store (called after the write committed)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return  # no worker ever waited here
        with self._lock:
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            for name in names:
                path = os.path.join(self.directory, name)
                try:
                    self._sender.sendto(b"!", path)
                except BlockingIOError:
                    pass  # its buffer is full of rings: it is awake already
                except ConnectionRefusedError:
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # left by a process that died
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTSOCK, errno.EPROTOTYPE):
                        raise

    def subscribe(self) -> SocketSubscription:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            for attempt in range(3):
                self.directory.mkdir(parents=True, exist_ok=True)
                try:
                    sock.bind(str(path))
                    break
                except FileNotFoundError:  # the last waiter removed the directory just now
                    if attempt == 2:
                        raise
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return SocketSubscription(sock, path)

    def close(self) -> None:
        with self._lock:
            if self._sender is not None:
                self._sender.close()
                self._sender = None


class SocketSubscription(Subscription):
    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path

    async def wait(self) -> None:
        await anyio.wait_readable(self.sock)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(64):
                pass

    async def aclose(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.path.parent)  # the last one out removes the directory
        anyio.notify_closing(self.sock)
        self.sock.close()
