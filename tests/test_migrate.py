"""`analysis-executor migrate` against real databases and real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psycopg
import pytest
from yoyo import get_backend, read_migrations

from tests.test_schema import SEED_TABLES
from worker.db import yoyo_database_uri
from worker.migrate import apply_migrations, migrations_dir, pending_migrations


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


ALL_MIGRATIONS = sorted(path.stem for path in migrations_dir().glob("*.sql") if not path.stem.endswith(".rollback"))


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'analys%'").fetchall()
    return {row[0] for row in rows}


def test_migrate_applies_then_is_a_no_op(empty_database_url: str) -> None:
    first = _cli("migrate", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "0001_initial_schema" in first.stdout
    second = _cli("migrate", env={"DATABASE_URL": empty_database_url})
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert _tables(empty_database_url) >= SEED_TABLES


def test_three_concurrent_migrates_all_succeed(empty_database_url: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "migrate", "--database-url", empty_database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    applied = [out for out, _ in outputs if "applied" in out]
    assert len(applied) == 1, outputs
    assert pending_migrations(empty_database_url) == []


def test_stale_yoyo_lock_of_a_dead_migrator_does_not_block(empty_database_url: str) -> None:
    backend = get_backend(yoyo_database_uri(empty_database_url))
    with backend.transaction():
        backend.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 999999)")
    backend.connection.close()
    assert apply_migrations(empty_database_url) == ALL_MIGRATIONS


def test_rollback_removes_every_table(empty_database_url: str) -> None:
    apply_migrations(empty_database_url)
    backend = get_backend(yoyo_database_uri(empty_database_url))
    migrations = read_migrations(str(migrations_dir()))
    with backend.lock():
        backend.rollback_migrations(backend.to_rollback(migrations))
    backend.connection.close()
    assert _tables(empty_database_url) == set()
    assert apply_migrations(empty_database_url) == ALL_MIGRATIONS


def test_missing_database_url_exits_2_with_one_line() -> None:
    result = _cli("migrate")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "DATABASE_URL" in result.stderr


@pytest.mark.parametrize("url", ["http://example.invalid/db", "not a url", "postgresql://host:notaport/db"])
def test_invalid_database_url_exits_2(url: str) -> None:
    result = _cli("migrate", "--database-url", url)
    assert result.returncode == 2, result.stderr
    assert "invalid database URL" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_unreachable_database_exits_1_without_leaking_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _cli("migrate", "--database-url", f"postgresql://app:s3cret@127.0.0.1:{port}/app")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "s3cret" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
