"""Test harness: one PostgreSQL server per session, a migrated database per test.

The server is the embedded one (pgserver binaries, works as root) unless
``TEST_DATABASE_URL`` names an existing server to use instead. The
migrations are applied once, to a template database; each test gets a fresh
copy of it from pytest-postgresql's ``postgresql`` fixture factory, which is
a file copy and takes milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from worker.embedded import EmbeddedPostgres
from worker.migrate import apply_migrations

# A test server trades durability for speed; it is thrown away afterwards.
TEST_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}
TEST_DBNAME = "analysis_executor_test"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NoopExecutor]:
    """The session's PostgreSQL server, as pytest-postgresql connection details."""
    existing = os.environ.get("TEST_DATABASE_URL")
    if existing:
        yield _executor_for(conninfo_to_dict(existing))
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", settings=TEST_SERVER_SETTINGS)
    server.start()
    try:
        yield _executor_for(conninfo_to_dict(server.url))
    finally:
        server.stop()


def _executor_for(params: dict[str, Any]) -> NoopExecutor:
    return NoopExecutor(
        host=params.get("host", "127.0.0.1"),
        port=params.get("port", 5432),
        user=params.get("user", "postgres"),
        password=params.get("password"),
        options="",
        dbname=TEST_DBNAME,
        maintenance_dbname=params.get("dbname", "postgres"),
    )


def _load_migrations(host: str, port: int, user: str, dbname: str, password: str | None, **_: Any) -> None:
    apply_migrations(make_conninfo(host=host, port=port, user=user, dbname=dbname, password=password))


@pytest.fixture(scope="session")
def migrated_server(pg_server: NoopExecutor) -> Iterator[NoopExecutor]:
    """The server with a migrated template database that per-test databases copy."""
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=pg_server.template_dbname,
        password=pg_server.password,
        maintenance_dbname=pg_server.maintenance_dbname,
        as_template=True,
    )
    janitor.drop()
    with janitor:
        janitor.load(_load_migrations)
        yield pg_server


# A fresh migrated database per test, and an open autocommit-off connection to it.
postgresql = factories.postgresql("migrated_server")


@pytest.fixture
def db(postgresql: psycopg.Connection) -> psycopg.Connection:
    """An autocommit connection to this test's freshly migrated database."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def database_url(postgresql: psycopg.Connection) -> str:
    """URL of this test's freshly migrated database, for worker processes and CLIs."""
    return _url_of(postgresql)


@pytest.fixture
def empty_database_url(pg_server: NoopExecutor, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh database with no schema at all."""
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        dbname=f"{TEST_DBNAME}_empty",
        password=pg_server.password,
        maintenance_dbname=pg_server.maintenance_dbname,
    )
    janitor.drop()
    with janitor:
        yield make_conninfo(
            host=pg_server.host,
            port=pg_server.port,
            user=pg_server.user,
            password=pg_server.password,
            dbname=janitor.dbname,
        )


def _url_of(conn: psycopg.Connection) -> str:
    info = conn.info
    return make_conninfo(host=info.host, port=info.port, user=info.user, password=info.password, dbname=info.dbname)


@pytest.fixture
def analysis_id(db: psycopg.Connection) -> str:
    """A JavaScript analysis exactly as the seed document creates it."""
    row = db.execute(
        """
        INSERT INTO analyses (id, title, script_content, project_id, is_active, version)
        VALUES (gen_random_uuid(), 'Test Analysis',
                'export default function analyze(data) { return {result: "success"}; }',
                'your-project-id', true, 1)
        RETURNING id
        """
    ).fetchone()
    assert row is not None
    return str(row[0])


REPO_ROOT = Path(__file__).resolve().parent.parent
