"""A throwaway PostgreSQL server from Debian's ``postgresql`` package (stdlib only).

Used by the job-store tests and the jobs benchmark::

    with TemporaryPostgres() as pg:
        url = pg.url  # postgresql://postgres@/postgres?host=/tmp/offload-pg-XXXX

It runs ``initdb`` and ``postgres`` from the newest ``/usr/lib/postgresql/*/bin`` in a fresh
directory under /tmp, listening only on a UNIX socket in that directory (no TCP). PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user (or ``nobody``),
and the directory belongs to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType


class PostgresMissing(RuntimeError):
    """No PostgreSQL binaries here (``apt-get install postgresql``)."""


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` that has ``pg_ctl``, or ``None``."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


class TemporaryPostgres:
    """Start a server in ``__enter__``, stop it and delete its files in ``__exit__``.

    ``durable=False`` (tests) turns fsync off; the benchmark keeps the defaults.
    """

    def __init__(self, *, durable: bool = False, max_connections: int = 200) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresMissing(
                "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                "(Debian: apt-get install postgresql)"
            )
        self.bin_dir = bin_dir
        self.durable = durable
        self.max_connections = max_connections
        self.directory = Path(tempfile.mkdtemp(prefix="offload-pg-"))
        self.data = self.directory / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(name)
                    self.user = name
                    os.chown(self.directory, entry.pw_uid, entry.pw_gid)
                    break
        self.url = f"postgresql://postgres@/postgres?host={self.directory}"

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            argv,
            user=self.user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.directory,
            check=False,
        )
        if result.returncode != 0:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n{tail}"
            )

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
            *([] if self.durable else ["--no-sync"]),
        )
        options = [
            f"-k {self.directory}",
            "-c listen_addresses=''",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off"]
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            " ".join(options),
            "start",
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TemporaryPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
