"""Engine creation and schema upgrades.

Existing databases are upgraded by the Alembic migrations. A new, empty one is created from the
models and stamped with the newest revision, as Alembic's cookbook describes ("building an up to
date database from scratch"); tests/test_migrations.py checks that this schema is the migrated
one on SQLite and PostgreSQL. Neither that nor a database already at the newest revision imports
Alembic, which with its dialect modules took 0.5 s of a cold `lookalike index`'s 1.1 s start.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration in migrations/versions (tests/test_migrations.py checks it is Alembic's head).
SCHEMA_HEAD = "0007"
WAL_SIZE_LIMIT = 64 * 2**20


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the server read while an index run writes; NORMAL sync is durable against
    # process crashes (kill -9), which is what we promise.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    # A checkpoint that empties the WAL also shrinks its file to this: a 1M-row import (one
    # transaction) grew it to 5.6 GB, which every later commit's checkpoint and every new
    # process's recovery then walked through.
    cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cur.close()


def checkpoint_sqlite(engine: Engine) -> None:
    """Fold the WAL into the database file and truncate it (SQLite only; best effort).

    A writer that exits leaves its WAL for the next process to recover (reading all of it: 5.8 s
    of a server's start after a 1M-row import) and for the next writer's commit to checkpoint
    (12 s of a 10k-row import beside a server). A reader that keeps the WAL busy for longer than
    the second waited for it only postpones this to a later checkpoint."""
    if engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=1000")
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception:  # noqa: BLE001 - a failed checkpoint loses nothing
        pass


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# Key of the PostgreSQL advisory lock held while migrating ("look" in ASCII).
_MIGRATION_LOCK = 0x6C6F6F6B


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; a no-op when it is already there.

    Processes that open a new home at the same moment (a server and an index run) migrate one
    at a time: the first creates the schema, the others wait for it, then find nothing to do.
    """
    if revision == "head" and current_revision(engine) == SCHEMA_HEAD:
        return  # the usual case: no write lock taken
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction: a kill in the middle of a migration would
            # leave half a schema that no later run can upgrade. Make the whole upgrade one transaction,
            # holding the write lock from its start (a deferred BEGIN read the old schema, then failed
            # with "database is locked" once another process had migrated).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            # Without it, concurrent upgrades both created the tables and all but one failed
            # (duplicate key in pg_type). The lock ends with the transaction.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        if revision == "head" and not inspect(conn).get_table_names():
            _create_at_head(conn)  # in this transaction, under the same lock
            return
        from alembic import command

        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _create_at_head(conn) -> None:
    from indexer.models import Base

    Base.metadata.create_all(conn)
    # Alembic's own version table, as its migrations would leave it.
    version = Table(
        "alembic_version",
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(conn)
    conn.execute(version.insert().values(version_num=SCHEMA_HEAD))


def current_revision(engine: Engine) -> str | None:
    """The revision the database is stamped with; None for a database without a schema."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
