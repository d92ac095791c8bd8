"""The schema: migrations build it from nothing, agree with the models, go down and up again,
keep data across upgrades, and `lookalike db upgrade` applies them. A new database is created
from the models at the newest revision, without Alembic: it must be exactly the migrated schema.

The tests marked `storage` take their databases from `new_database`, so the PostgreSQL pass
(`--database=postgres`) runs them against PostgreSQL."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from typer.testing import CliRunner

import cli
import databases
from indexer.database import SCHEMA_HEAD, alembic_config, current_revision, make_engine, upgrade
from indexer.library import Library
from indexer.models import Base

runner = CliRunner()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def new_database(tmp_path):
    """`new_database(name)`: the URL of a new, empty database of the selected kind (a SQLite file
    not yet created, or a fresh PostgreSQL database dropped after the test)."""

    def make(name: str) -> str:
        return databases.database_url(tmp_path / name) or sqlite_url(tmp_path / f"{name}.db")

    return make


def revisions() -> list[str]:
    """All revisions, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def head() -> str:
    (only,) = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()  # one head, no branches
    return only


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def model_tables() -> set[str]:
    return set(Base.metadata.tables)


def test_revision_history_is_a_single_line():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revs = revisions()
    assert revs[0] == "0001" and revs[-1] == head() and len(revs) == len(set(revs))
    assert script.get_revision(revs[0]).down_revision is None
    for older, newer in zip(revs, revs[1:]):
        assert script.get_revision(newer).down_revision == older


def test_schema_head_names_the_newest_migration():
    assert SCHEMA_HEAD == head()


def schema(engine) -> dict:
    """Everything the inspector reports about every table, in a comparable form. Columns by name:
    a migration appends the columns it adds, and no statement of lookalike depends on their order."""
    insp = inspect(engine)
    out = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": sorted(
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")), c.get("autoincrement"))
                for c in insp.get_columns(table)
            ),
            "pk": insp.get_pk_constraint(table),
            "fks": sorted(
                (f["name"], f["constrained_columns"], f["referred_table"], f["referred_columns"], f["options"])
                for f in insp.get_foreign_keys(table)
            ),
            "indexes": sorted((i["name"], i["column_names"], i["unique"]) for i in insp.get_indexes(table)),
            "unique": sorted((u["name"], u["column_names"]) for u in insp.get_unique_constraints(table)),
            "checks": sorted((c["name"], c["sqltext"]) for c in insp.get_check_constraints(table)),
        }
    return out


_UPGRADE_AND_SAY_IF_ALEMBIC = """
import sys
from indexer.database import current_revision, make_engine, upgrade
engine = make_engine(sys.argv[1])
upgrade(engine)
print(current_revision(engine), "alembic" in sys.modules)
"""


@pytest.mark.storage
def test_a_new_database_is_the_migrated_schema(new_database):
    """Created from the models and stamped (no Alembic import), or built by every migration in turn:
    the same tables, columns, types, defaults, keys, indexes and constraints."""
    migrated_url, created_url = new_database("migrated"), new_database("created")
    command.upgrade(alembic_config(migrated_url), "head")
    for _ in range(2):  # create, then find it at head: neither imports Alembic
        proc = subprocess.run(
            [sys.executable, "-c", _UPGRADE_AND_SAY_IF_ALEMBIC, created_url], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [head(), "False"]
    migrated, created = make_engine(migrated_url), make_engine(created_url)
    assert schema(created) == schema(migrated)
    assert current_revision(created) == current_revision(migrated) == head()
    with created.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []
    # The comparison is not vacuous: a missing index is seen.
    with created.begin() as conn:
        conn.execute(text("DROP INDEX ix_images_status"))
    assert schema(created) != schema(migrated)
    migrated.dispose()
    created.dispose()


@pytest.mark.storage
def test_upgrade_from_an_empty_database_creates_every_table(new_database):
    engine = make_engine(new_database("empty"))
    assert tables(engine) == set() and current_revision(engine) is None
    upgrade(engine)
    assert {"backbones", "roots", "images", "embeddings"} <= model_tables()
    assert tables(engine) == model_tables() | {"alembic_version"}
    assert current_revision(engine) == head()

    insp = inspect(engine)
    image_columns = {c["name"] for c in insp.get_columns("images")}
    assert {"id", "path", "size", "mtime_ns", "content_hash", "status", "error", "width", "height"} <= image_columns
    assert {i["name"] for i in insp.get_indexes("images")} >= {"ix_images_content_hash", "ix_images_status"}
    assert any(u["column_names"] == ["path"] for u in insp.get_unique_constraints("images"))
    (fk,) = [f for f in insp.get_foreign_keys("embeddings") if f["referred_table"] == "images"]
    assert fk["options"].get("ondelete") == "CASCADE"

    upgrade(engine)  # a second upgrade is a no-op
    assert current_revision(engine) == head()
    engine.dispose()


@pytest.mark.storage
def test_models_and_migrations_agree(new_database):
    engine = make_engine(new_database("compare"))
    upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []

    # The comparison is not vacuous: a column the migrations do not create is reported.
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE images DROP COLUMN error"))
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [(d[0], d[3].name) for d in differences if d[0] == "add_column"] == [("add_column", "error")]
    engine.dispose()


@pytest.mark.storage
def test_every_revision_goes_down_and_up_again(new_database):
    url = new_database("updown")
    cfg = alembic_config(url)  # no connection handed in: env.py builds its own engine from the URL
    command.upgrade(cfg, "head")
    engine = make_engine(url)
    assert current_revision(engine) == head()
    command.downgrade(cfg, "base")
    assert tables(engine) == {"alembic_version"} and current_revision(engine) is None
    for rev in revisions():  # one step at a time
        command.upgrade(cfg, rev)
        assert current_revision(engine) == rev
    assert tables(engine) == model_tables() | {"alembic_version"}
    engine.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_offline_sql_script(tmp_path, dialect):
    buffer = io.StringIO()
    url = {
        "sqlite": sqlite_url(tmp_path / "never-created.db"),
        "postgresql": "postgresql+psycopg://nobody@127.0.0.1:1/x",
    }
    cfg = alembic_config(url[dialect])  # never connected to
    cfg.output_buffer = buffer
    command.upgrade(cfg, "head", sql=True)
    script = buffer.getvalue()
    for table in ("backbones", "roots", "images", "embeddings"):
        assert f"CREATE TABLE {table}" in script
    assert f"'{head()}'" in script
    assert not (tmp_path / "never-created.db").exists()


@pytest.mark.storage
def test_upgrading_an_older_database_keeps_its_data(tmp_path, settings):
    url = settings.resolved_database_url
    (tmp_path / "home").mkdir()
    engine = make_engine(url)
    upgrade(engine, revisions()[0])
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO backbones (id, name, dim, created_at) VALUES (1, 'efficientnet-lite0', 4, '2024-01-01')")
        )
        conn.execute(
            text(
                "INSERT INTO images (id, path, size, mtime_ns, content_hash, status, indexed_at) "
                "VALUES (7, '/photos/a.jpg', 10, 20, 'abc', 'indexed', '2024-01-01')"
            )
        )
        conn.execute(
            text("INSERT INTO embeddings (image_id, backbone_id, vector) VALUES (7, 1, :v)"),
            {"v": b"\x00\x00\x80\x3f" + b"\x00" * 12},
        )
    engine.dispose()

    # Opening the home folder applies the pending migrations itself.
    library = Library(settings)
    assert current_revision(library.engine) == head()
    with library.engine.connect() as conn:
        assert conn.execute(text("SELECT path, content_hash, signature FROM images WHERE id = 7")).one() == (
            "/photos/a.jpg",
            "abc",
            None,  # 0003's pixel signature: unknown until the file is indexed again
        )
        assert conn.execute(text("SELECT count(*) FROM embeddings WHERE image_id = 7")).scalar() == 1
    assert library.index().ids().tolist() == [7]  # the stored vector is usable after the upgrade
    library.close()


@pytest.mark.storage
def test_cli_db_upgrade(tmp_path, monkeypatch, new_database):
    home = tmp_path / "home"  # LOOKALIKE_HOME, with its database
    result = runner.invoke(cli.app, ["db", "upgrade", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert f"database at revision {head()}" in result.stderr
    engine = make_engine(databases.resolved_url(home))
    assert tables(engine) == model_tables() | {"alembic_version"}
    engine.dispose()
    again = runner.invoke(cli.app, ["db", "upgrade", "--home", str(home)])
    assert again.exit_code == 0 and f"database at revision {head()}" in again.stderr

    # LOOKALIKE_DATABASE_URL puts the database elsewhere.
    elsewhere = new_database("elsewhere")
    monkeypatch.setenv("LOOKALIKE_DATABASE_URL", elsewhere)
    result = runner.invoke(cli.app, ["db", "upgrade", "--home", str(tmp_path / "home2")])
    assert result.exit_code == 0, result.output
    engine = make_engine(elsewhere)
    assert current_revision(engine) == head()
    engine.dispose()
    assert not (tmp_path / "home2" / "lookalike.db").exists()


_KILLED_MIGRATION = """
import os, sys
from sqlalchemy import Engine, event

calls = [0]

@event.listens_for(Engine, "before_cursor_execute")
def die_before_the_nth_write(conn, cursor, statement, parameters, context, executemany):
    if statement.lstrip().split(None, 1)[0].upper() in ("CREATE", "ALTER", "INSERT", "DROP", "UPDATE"):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            os._exit(9)  # as abrupt as SIGKILL: no cleanup, no rollback by Python

from indexer.database import make_engine, upgrade
upgrade(make_engine(sys.argv[1]))
"""


@pytest.mark.storage
def test_a_migration_killed_half_way_leaves_nothing_half_done(new_database):
    """The first run on a new home may be killed while it creates the schema; the next must work."""
    for statement in (2, 5, 9):  # die just before the n-th DDL/DML statement of the upgrade
        url = new_database(f"killed-{statement}")
        proc = subprocess.run([sys.executable, "-c", _KILLED_MIGRATION, url, str(statement)], capture_output=True)
        assert proc.returncode == 9, proc.stderr
        engine = make_engine(url)
        assert tables(engine) == set() and current_revision(engine) is None  # all or nothing
        upgrade(engine)
        assert current_revision(engine) == head() and tables(engine) == model_tables() | {"alembic_version"}
        engine.dispose()

    # The same for Alembic's upgrade of an older database (from the first revision to the newest).
    for statement in (1, 3):
        url = new_database(f"killed-upgrade-{statement}")
        engine = make_engine(url)
        upgrade(engine, revisions()[0])
        before = schema(engine)
        proc = subprocess.run([sys.executable, "-c", _KILLED_MIGRATION, url, str(statement)], capture_output=True)
        assert proc.returncode == 9, proc.stderr
        assert current_revision(engine) == revisions()[0] and schema(engine) == before
        upgrade(engine)
        assert current_revision(engine) == head() and tables(engine) == model_tables() | {"alembic_version"}
        engine.dispose()


@pytest.mark.storage
def test_first_opens_at_once_all_succeed(tmp_path, new_database):
    """Several processes open a new home at the same moment (a server and an index run, say): one
    creates the schema, the others wait for it and find it done; none fails half way."""
    url = new_database("at-once")
    env = databases.process_env(tmp_path / "home", LOOKALIKE_DATABASE_URL=url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import cli; cli.main()", "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(proc.wait(timeout=120), proc.stderr.read()) for proc in procs]
    assert all(code == 0 for code, _ in results), [err[-600:] for code, err in results if code]
    assert all(f"database at revision {head()}" in err for _, err in results)
    engine = make_engine(url)
    assert current_revision(engine) == head() and tables(engine) == model_tables() | {"alembic_version"}
    engine.dispose()
