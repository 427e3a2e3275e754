"""The embedded PostgreSQL server: start, attach, stop, restart — as root too."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from worker.embedded import EmbeddedPostgres


def _accepts_connections(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def _server_owner(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return pwd.getpwuid(os.stat(f"/proc/{row[0]}").st_uid).pw_name


def test_start_stop_and_restart_on_the_same_port(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata", settings={"fsync": "off"})
    url = server.start()
    try:
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert _accepts_connections(url)
        if os.geteuid() == 0:
            assert _server_owner(url) == "pgserver"
        db_url = server.create_database("app")
        assert server.create_database("app") == db_url
        assert _accepts_connections(db_url)
    finally:
        server.stop()
    assert not _accepts_connections(url)

    again = EmbeddedPostgres(tmp_path / "pgdata")
    try:
        assert again.start() == url
    finally:
        again.stop()


def test_a_second_handle_attaches_without_owning_the_server(tmp_path: Path) -> None:
    owner = EmbeddedPostgres(tmp_path / "pgdata", settings={"fsync": "off"})
    url = owner.start()
    try:
        guest = EmbeddedPostgres(tmp_path / "pgdata")
        assert guest.start() == url
        guest.stop()
        assert _accepts_connections(url)
    finally:
        owner.stop()


@pytest.mark.slow
def test_dev_command_prints_a_working_url_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "dev", "--data-dir", str(tmp_path / "pgdata")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip().startswith("psql "):
                url = line.split()[1]
                break
        assert url.endswith("/analysis_executor"), url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM analysis_jobs").fetchone() == (0,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _accepts_connections(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
