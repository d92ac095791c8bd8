"""The database behind each test home: a SQLite file (the default) or a PostgreSQL database.

`pytest --database=postgres` (see conftest.py) runs the tests marked `storage` against a
PostgreSQL server: a throwaway cluster, or the one LOOKALIKE_TEST_DATABASE_URL names. There,
every home folder a test or a fixture uses gets its own fresh, empty database the first time
it is named, just as a SQLite home gets its own `lookalike.db`; a test's databases are dropped
when it ends, a module fixture's when the session ends.

Tests never build a home's settings, environment or database URL themselves; they ask here:

- `home_settings(home, **overrides)`: the Settings of that home (with its database_url);
- `home_env(home)`: what a `lookalike` subprocess or in-process CLI run needs in its
  environment for that home (LOOKALIKE_DATABASE_URL, or nothing on SQLite); `cli_env(args)`:
  the same for the home named by `--home` in a command line;
- `copy_home(src, dst)`: a copy of a home folder and of its database (CREATE DATABASE ...
  TEMPLATE on PostgreSQL);
- `reader(home)` / `has_schema(home)`: a read-only engine on the home's database for checks.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, inspect, make_url, pool, text
from sqlalchemy.exc import DBAPIError

SQLITE, POSTGRES = "sqlite", "postgres"
BACKENDS = (SQLITE, POSTGRES)
TEST_SERVER_VAR = "LOOKALIKE_TEST_DATABASE_URL"
COPY_WAIT = 60  # seconds a template copy waits for the template's terminated sessions to end
_RUN_TOKEN = secrets.token_hex(3)  # this test run's, in the name of every database it creates


class Server:
    """A PostgreSQL server on which tests create and drop databases (needs CREATEDB)."""

    def __init__(self, url: str):
        self.url = make_url(url)
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
        self._names = itertools.count(1)
        self._lock = threading.Lock()  # CREATE ... TEMPLATE refuses a template in use by another CREATE

    def database_url(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    def create(self, hint: str = "db", template: str | None = None, name: str | None = None) -> str:
        """A new, empty database (or a copy of `template`); returns its name."""
        if name is None:
            # PostgreSQL keeps 63 bytes of a name: 15 + pid + token + counter + 20 fit. The random
            # token keeps two runs apart whose pids agree (two containers on one shared server).
            slug = "".join(c if c.isalnum() else "_" for c in hint.lower())[:20]
            name = f"lookalike_test_{os.getpid()}_{_RUN_TOKEN}_{next(self._names)}_{slug}"
        with self._lock, self.admin.connect() as conn:
            if template is None:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                self._copy(conn, template, name)
        return name

    def _copy(self, conn, template: str, name: str) -> None:
        deadline = time.monotonic() + COPY_WAIT
        while True:
            # A template must have no other sessions; a Library still open on it is cut off
            # (its engine's pre-ping reconnects it later).
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": template},
            )
            try:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
                return
            except DBAPIError as exc:  # "source database ... is being accessed by other users"
                # A terminated backend goes away in its own time (slowly on a loaded machine).
                if "being accessed by other users" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def drop(self, name: str) -> None:
        with self._lock, self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.admin.dispose()


class _State:
    backend = SQLITE
    server: Server | None = None
    homes: dict[Path, str] = {}  # resolved home -> database name (PostgreSQL)
    created: list[str] = []  # database names, oldest first, not dropped yet
    readers: dict[str, Engine] = {}
    lock = threading.RLock()


def configure(backend: str) -> None:
    """Select the backend (pytest_configure, before test modules are imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown database backend {backend!r}; use one of {', '.join(BACKENDS)}")
    _State.backend = backend


def attach(server: Server | None) -> None:
    """The PostgreSQL server the postgres backend creates its databases on (a session fixture)."""
    _State.server = server


def backend() -> str:
    return _State.backend


def is_postgres() -> bool:
    return _State.backend == POSTGRES


def _key(home: Path) -> Path:
    return Path(home).expanduser().resolve()


def _server() -> Server:
    assert _State.server is not None, "no PostgreSQL server attached (the database_backend fixture does that)"
    return _State.server


def database_url(home: Path) -> str | None:
    """The home's database URL, or None where the home keeps its default SQLite file."""
    if not is_postgres():
        return None
    key = _key(home)
    with _State.lock:
        name = _State.homes.get(key)
        if name is None:
            name = _server().create(key.name)
            _State.homes[key] = name
            _State.created.append(name)
        return _server().database_url(name)


def resolved_url(home: Path) -> str:
    """The URL lookalike opens for this home (the SQLite file's own URL on SQLite)."""
    return database_url(home) or f"sqlite:///{_key(home) / 'lookalike.db'}"


def home_settings(home: Path, **overrides):
    from indexer.settings import Settings

    return Settings(home=home, database_url=database_url(home), **overrides)


def home_env(home: Path) -> dict[str, str]:
    """Environment entries a `lookalike` process needs to open `home` with the test's database."""
    url = database_url(home)
    return {"LOOKALIKE_DATABASE_URL": url} if url else {}


def process_env(home: Path | None, model_cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for a `lookalike` subprocess: this process's without any LOOKALIKE_ setting,
    then the home and its test database, the model cache, and `extra` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    if home is not None:
        env.update(LOOKALIKE_HOME=str(home), **home_env(home))
    if model_cache is not None:
        env["LOOKALIKE_MODEL_CACHE"] = str(model_cache)
    env.update(extra)
    return env


def clear_settings(monkeypatch) -> None:
    """Remove every LOOKALIKE_ setting from this process's environment (restored by `monkeypatch`)."""
    for key in list(os.environ):
        if key.startswith("LOOKALIKE_"):
            monkeypatch.delenv(key)


def cli_env(args) -> dict[str, str]:
    """home_env() of the home a command line names with `--home DIR` (none named: the test's own,
    which LOOKALIKE_DATABASE_URL already points at)."""
    args = [str(a) for a in args]
    if "--home" not in args:
        return {}
    return home_env(Path(args[args.index("--home") + 1]))


def copy_home(src: Path, dst: Path) -> Path:
    """Copy a (closed) home folder, and on PostgreSQL its database, to `dst`."""
    shutil.copytree(src, dst)
    if is_postgres():
        source = _State.homes.get(_key(src))
        assert source is not None, f"{src} has no database to copy"
        with _State.lock:
            name = _State.homes.get(_key(dst))
            if name is not None:  # named before (LOOKALIKE_DATABASE_URL of the test's own home): same name
                _server().drop(name)
                _server().create(_key(dst).name, template=source, name=name)
            else:
                name = _server().create(_key(dst).name, template=source)
                _State.homes[_key(dst)] = name
                _State.created.append(name)
    return dst


def reader(home: Path) -> Engine:
    """A read-only engine for checks on the home's database (never creates a SQLite file)."""
    url = database_url(home)
    if url is None:
        url = f"sqlite:///file:{_key(home) / 'lookalike.db'}?mode=ro&uri=true"
    with _State.lock:
        engine = _State.readers.get(url)
        if engine is None:
            connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
            engine = _State.readers[url] = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
        return engine


def has_database(home: Path) -> bool:
    """Whether the home's database exists (a SQLite file is made on first use; PostgreSQL's by the test)."""
    return is_postgres() or (_key(home) / "lookalike.db").exists()


def has_schema(home: Path) -> bool:
    """Whether the home's database exists and holds the images table (migrations committed)."""
    if not has_database(home):
        return False
    return inspect(reader(home)).has_table("images")


# -- lifetimes --------------------------------------------------------------------------------------


def mark() -> int:
    return len(_State.created)


def drop_since(position: int) -> None:
    """Drop the databases created after `mark()` returned `position` (a test's own)."""
    with _State.lock:
        for name in _State.created[position:]:
            _forget(name)


def drop_all() -> None:
    drop_since(0)


def _forget(name: str) -> None:
    with _State.lock:
        url = _server().database_url(name)
        engine = _State.readers.pop(url, None)
        if engine is not None:
            engine.dispose()
        _State.homes = {home: db for home, db in _State.homes.items() if db != name}
        _State.created.remove(name)
        _server().drop(name)


@contextmanager
def scratch_database(hint: str = "scratch") -> Iterator[str]:
    """An empty PostgreSQL database on the configured server, dropped afterwards."""
    name = _server().create(hint)
    try:
        yield _server().database_url(name)
    finally:
        _server().drop(name)


def committed_embeddings(home: Path) -> int:
    """Embeddings committed so far in a home's database, read the way another process would see them."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    if not has_database(home):
        return 0
    try:
        with reader(home).connect() as conn:
            return conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one()
    except DBAPIError:
        return 0  # schema not created yet
