"""A throwaway PostgreSQL 15 cluster for tests: initdb in a temp folder, started on a free port.

The cluster is UTF-8 with ICU's en-US collation, like a typical server (and unlike SQLite's
byte-wise order): text sorts case-insensitively at first, so an ORDER BY on names or paths
gives another order than Python's sorted() does. Its sessions' time zone is not UTC either
(a server's local zone, UTC+05:45), so times come back with an offset unless stored and read as UTC.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

PG_BIN = Path(os.environ.get("LOOKALIKE_PG_BIN", "/usr/lib/postgresql/15/bin"))
TIMEZONE = "Asia/Kathmandu"
START_TIMEOUT = 180  # seconds pg_ctl waits for the server to accept connections (its default: 60)
START_ATTEMPTS = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and developers run as root here.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def throwaway_cluster():
    """Yield a SQLAlchemy URL of a fresh, empty database; stop and delete the cluster afterwards."""
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="lookalike-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    run = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
    initdb += ["--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"]
    subprocess.run(_as_postgres(initdb), **run)
    log = root / "log"
    for attempt in range(1, START_ATTEMPTS + 1):
        # The port was free a moment ago; another process (a concurrent test run) may bind it
        # first, and then the server refuses to start: try again on another one.
        port = _free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c timezone={TIMEZONE}"
        start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-t", str(START_TIMEOUT)]
        try:
            subprocess.run(_as_postgres([*start, "-l", str(log), "start"]), **run)
            break
        except subprocess.CalledProcessError:
            in_use = log.exists() and "already in use" in log.read_text(errors="replace")
            if not in_use or attempt == START_ATTEMPTS:
                raise
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), **run)
        shutil.rmtree(root, ignore_errors=True)
