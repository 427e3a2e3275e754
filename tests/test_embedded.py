"""The embedded PostgreSQL server: start, attach, stop, restart — as root too."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port
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
def test_dev_command_runs_the_demo_end_to_end_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "dev", "--data-dir", str(tmp_path / "pgdata"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if "analysis-executor submit" in line:
                break
        text = "".join(printed)
        url = next(line.split()[1] for line in printed if line.strip().startswith("psql postgresql"))
        assert url.endswith("/analysis_executor"), text
        assert "INSERT INTO analysis_jobs" in text
        demo_id = text.split("analysis-executor submit ", 1)[1].split()[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2).status == 200:
                    break
            time.sleep(0.1)
        submitted = subprocess.run(
            [sys.executable, "-m", "worker", "submit", demo_id, "--params", '{"values": [3, 5, 8]}', "--wait",
             "--wait-timeout", "60", "--database-url", url],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["result"] == {"count": 3, "sum": 16, "mean": 16 / 3}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _accepts_connections(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
