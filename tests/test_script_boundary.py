"""The boundary between whitelisted Python scripts and the worker that runs them.

A script must not find the worker's secrets (DATABASE_URL, the API token) in any
process's environment, nor signal the worker, nor fork without bound. As root the
worker runs scripts as ``nobody`` (ANALYTICS_RUN_AS_USER); these tests give it an
interpreter and a scripts folder that user can read (/root/.pyenv and pytest's
tmp_path are closed to it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import WorkerProcess, create_analysis, free_port, submit, wait_for_jobs
from worker.boundary import child_environment, is_dumpable

SYSTEM_PYTHON = "/usr/bin/python3"
SECRET = "s3cret-api-token-for-the-boundary-test"

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="switching the scripts' uid needs a worker running as root and a system python3",
)

SNOOP = r"""
import json, os, signal
found, denied = [], 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        denied += 1
        continue
    if b"SECRET_MARK" in environ or b"DATABASE_URL=" in environ:
        found.append(int(pid))
try:
    os.kill(os.getppid(), signal.SIGKILL)
    killed = "killed its pool child"
except PermissionError:
    killed = "EPERM"
print(json.dumps({"found": found, "denied": denied, "kill": killed, "uid": os.getuid()}))
""".replace("SECRET_MARK", SECRET)

FORK_BOMB = r"""
import json, subprocess
started, refused = [], 0
for _ in range(150):
    try:
        started.append(subprocess.Popen(["sleep", "30"]))
    except (BlockingIOError, OSError):
        refused += 1
print(json.dumps({"started": len(started), "refused": refused}))
"""


@pytest.fixture
def open_scripts_dir() -> Iterator[Path]:
    """A scripts folder another uid can read."""
    folder = Path(tempfile.mkdtemp(prefix="analysis-scripts-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def start_with_secrets(
    start_worker: Callable[..., WorkerProcess], database_url: str, scripts: Path, **env: str
) -> WorkerProcess:
    """A worker configured the way a pod is: its secrets in the environment, not on the command line."""
    port = free_port()
    return start_worker(
        "--port",
        str(port),
        "--scripts-dir",
        str(scripts),
        env={
            "DATABASE_URL": database_url,
            "ANALYSIS_EXECUTOR_API_TOKEN": SECRET,
            "ANALYTICS_PYTHON": SYSTEM_PYTHON,
            **env,
        },
        test_defaults=False,
    )


@as_root
def test_a_script_finds_no_secret_and_cannot_kill_its_supervisor(
    db: psycopg.Connection,
    database_url: str,
    start_worker: Callable[..., WorkerProcess],
    open_scripts_dir: Path,
) -> None:
    (open_scripts_dir / "snoop.py").write_text(SNOOP)
    (open_scripts_dir / "snoop.py").chmod(0o644)
    worker = start_with_secrets(start_worker, database_url, open_scripts_dir)
    assert json.loads(worker.get("/health")[1])["script_user"] == "nobody"
    job = wait_for_jobs(db, [submit(db, create_analysis(db, script_name="snoop"))])
    (row,) = job.values()
    assert row["status"] == "completed", row["error_message"]
    report = row["result"]
    assert report["uid"] != 0
    assert report["found"] == [], "a process environment with a secret was readable"
    assert report["kill"] == "EPERM"
    assert worker.proc.poll() is None and json.loads(worker.get("/health")[1])["status"] == "healthy"


@as_root
def test_a_fork_bomb_stops_at_the_process_limit(
    db: psycopg.Connection,
    database_url: str,
    start_worker: Callable[..., WorkerProcess],
    open_scripts_dir: Path,
) -> None:
    (open_scripts_dir / "bomb.py").write_text(FORK_BOMB)
    start_with_secrets(start_worker, database_url, open_scripts_dir)
    job = wait_for_jobs(db, [submit(db, create_analysis(db, script_name="bomb"))])
    (row,) = job.values()
    assert row["status"] == "completed", row["error_message"]
    assert row["result"]["started"] < 64 and row["result"]["refused"] > 0
    leftovers = subprocess.run(["pgrep", "-u", "nobody", "-f", "sleep 30"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "the script's processes outlived its job"


@as_root
def test_a_script_user_named_explicitly_must_work_or_the_worker_does_not_start(
    database_url: str, open_scripts_dir: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--port", str(free_port()), "--scripts-dir", str(open_scripts_dir)],
        env={**os.environ, "DATABASE_URL": database_url, "ANALYTICS_RUN_AS_USER": "no-such-user"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr  # a start-up error, like an unreachable database
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "ANALYTICS_RUN_AS_USER=no-such-user: no such user 'no-such-user'" in line
    assert "Traceback" not in result.stderr


def test_pool_children_inherit_no_secret() -> None:
    environ = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "DATABASE_URL": "postgresql://u:pw@db/x",
        "ANALYSIS_EXECUTOR_API_TOKEN": SECRET,
        "DATASOURCE_WAREHOUSE_URL": "postgresql://u:pw@wh/x",
        "AWS_SECRET_ACCESS_KEY": "k",
    }
    env = child_environment(environ, Path("/lib/libmimalloc.so"))
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "LD_PRELOAD": "/lib/libmimalloc.so"}


def test_a_pool_child_is_not_dumpable() -> None:
    code = "from worker.boundary import make_undumpable, is_dumpable; make_undumpable(); print(is_dumpable())"
    assert is_dumpable()  # this test process is
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "False"
