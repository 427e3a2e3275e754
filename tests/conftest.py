"""Test harness: one PostgreSQL server per session, a migrated database per test.

The server is the embedded one (pgserver binaries, works as root) unless
``TEST_DATABASE_URL`` names an existing server to use instead. The
migrations are applied once, to a template database; each test gets a fresh
copy of it from pytest-postgresql's ``postgresql`` fixture factory, which is
a file copy and takes milliseconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
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


class WorkerProcess:
    """A real ``analysis-executor run`` process on this test's database."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        """HTTP GET on the worker; (status, body)."""
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def scripts_dir(tmp_path: Path) -> Path:
    """An empty whitelisted-scripts folder for this test."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    return folder


@pytest.fixture
def start_worker(database_url: str, tmp_path: Path, scripts_dir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes on this test's database; all are stopped afterwards."""
    workers: list[WorkerProcess] = []

    def start(
        *extra: str, env: dict[str, str] | None = None, wait: bool = True, test_defaults: bool = True
    ) -> WorkerProcess:
        """Run ``analysis-executor run *extra``; test_defaults adds database, port, scripts and debug logs."""
        port = free_port()
        args = [sys.executable, "-m", "worker", "run"]
        if test_defaults:
            args += ["--database-url", database_url, "--port", str(port), "--scripts-dir", str(scripts_dir)]
            args += ["--log-level", "debug"]
        else:
            port = int(extra[extra.index("--port") + 1])
        args += extra
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        worker = WorkerProcess(args, full_env, tmp_path / f"worker-{len(workers)}.log", port)
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()


FINAL_STATUSES = ("completed", "failed", "timeout", "cancelled")


def wait_for_jobs(
    db: psycopg.Connection, job_ids: list[str], timeout: float = 60.0, columns: str = "*"
) -> dict[str, dict[str, Any]]:
    """Wait until every job is final; return rows (``columns``, with id and status) by id.

    Fails the test on timeout.
    """
    deadline = time.monotonic() + timeout
    if columns != "*":
        columns = f"id, status, {columns}"
    while True:
        with db.cursor(row_factory=dict_row) as cur:
            cur.execute(f"SELECT {columns} FROM analysis_jobs WHERE id = ANY(%s::uuid[])", (job_ids,))
            rows = {str(row["id"]): row for row in cur.fetchall()}
        if all(rows.get(j, {}).get("status") in FINAL_STATUSES for j in job_ids):
            return rows
        if time.monotonic() > deadline:
            states = {j: rows.get(j, {}).get("status") for j in job_ids}
            raise AssertionError(f"jobs not finished after {timeout}s: {states}")
        time.sleep(0.02)


def create_analysis(
    db: psycopg.Connection,
    *,
    script: str | None = None,
    script_name: str | None = None,
    timeout_ms: int | None = None,
    memory_limit_mb: int | None = None,
    is_active: bool = True,
) -> str:
    """Insert an analysis (JavaScript when ``script``, Python when ``script_name``); return its id."""
    runtime = "python" if script_name is not None else "javascript"
    row = db.execute(
        "INSERT INTO analyses (title, runtime, script_content, script_name, timeout_ms, memory_limit_mb, is_active)"
        " VALUES ('test', %s, %s, %s, %s, %s, %s) RETURNING id",
        (runtime, script, script_name, timeout_ms, memory_limit_mb, is_active),
    ).fetchone()
    assert row is not None
    return str(row[0])


def submit(db: psycopg.Connection, analysis_id: str, parameters: dict[str, Any] | None = None, **columns: Any) -> str:
    """Insert a pending job the way a user would; return its id."""
    names = ["analysis_id", "parameters", *columns]
    values = [analysis_id, Jsonb(parameters or {}), *columns.values()]
    placeholders = ", ".join(["%s"] * len(values))
    row = db.execute(
        f"INSERT INTO analysis_jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id", values
    ).fetchone()
    assert row is not None
    return str(row[0])
