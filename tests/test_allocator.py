"""The pool children's allocator: mimalloc preloaded into them only, limits intact."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.messages import job_message
from worker.allocator import AllocatorUnavailable, allocator_in_use, child_preload, mimalloc_library
from worker.config import ConfigError, load_settings
from worker.pool import ProcessPool

URL = "postgresql://u@127.0.0.1/db"
needs_mimalloc = pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed")


async def run_jobs(preload: Path | None, jobs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    pool = ProcessPool(2, preload=preload)
    await pool.start()
    try:
        return pool.allocator, list(await asyncio.gather(*(pool.run(j) for j in jobs)))
    finally:
        await pool.close()


def test_the_setting_is_checked_and_system_means_no_preload() -> None:
    assert load_settings({"database_url": URL}, {}).pool_allocator == "auto"
    assert load_settings({"database_url": URL}, {"POOL_ALLOCATOR": "System"}).pool_allocator == "system"
    with pytest.raises(ConfigError, match=r"POOL_ALLOCATOR: unknown allocator 'tcmalloc' \(auto, mimalloc, system\)"):
        load_settings({"database_url": URL}, {"POOL_ALLOCATOR": "tcmalloc"})
    assert child_preload("system") is None


def test_mimalloc_is_required_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.allocator.mimalloc_library", lambda: None)
    assert child_preload("auto") is None
    with pytest.raises(AllocatorUnavailable, match="pip install cmeel-mimalloc"):
        child_preload("mimalloc")


@needs_mimalloc
def test_children_run_on_mimalloc_with_every_limit_intact(tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text("import json, os\nprint(json.dumps({'preload': os.environ.get('LD_PRELOAD')}))\n")
    jobs = [
        job_message(source="export default function analyze() { return {result: 'success'}; }"),
        job_message(
            source="export default function analyze() { const a = []; while (true) a.push(new Array(1e5).fill(1)); }"
        ),
        job_message(source="export default function analyze() { function f(n) { return f(n + 1) + 1; } return f(0); }"),
        job_message("python", script_path=str(script)),
    ]
    preload = child_preload("auto")
    assert preload is not None and preload.name.startswith("libmimalloc.so")
    allocator, (ok, hog, deep, python) = asyncio.run(run_jobs(preload, jobs))
    assert allocator == "mimalloc"
    assert (ok["status"], json.loads(ok["result_json"])) == ("completed", {"result": "success"})
    assert hog["status"] == "failed" and "32 MB memory limit" in hog["error_message"]
    assert deep["status"] == "failed" and deep["error_message"].startswith("stack overflow")
    # A Python analysis script gets an environment of its own: no preload.
    assert (python["status"], json.loads(python["result_json"])) == ("completed", {"preload": None})
    assert allocator_in_use() == "system"  # and the worker process itself is untouched


def test_system_allocator_children_do_not_preload() -> None:
    allocator, (ok,) = asyncio.run(run_jobs(None, [job_message(source="export default () => 1;")]))
    assert (allocator, ok["status"], ok["result_json"]) == ("system", "completed", "1")


def test_a_library_that_cannot_be_preloaded_leaves_the_children_on_the_system_allocator(tmp_path: Path) -> None:
    broken = tmp_path / "libmimalloc.so.3"
    broken.write_bytes(b"not a shared library")
    allocator, (ok,) = asyncio.run(run_jobs(broken, [job_message(source="export default () => 2;")]))
    # The pool reports what the children actually run on, so POOL_ALLOCATOR=mimalloc can refuse to start.
    assert (allocator, ok["status"], ok["result_json"]) == ("system", "completed", "2")


@needs_mimalloc
def test_mimalloc_is_found_without_the_startup_hook_its_package_installs() -> None:
    # cmeel's .pth file costs every interpreter start in the venv ~20 ms; the
    # container image deletes it, so the worker must not need it (-S: no .pth runs).
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; from worker.allocator import mimalloc_library; "
        "print(mimalloc_library(), 'cmeel_pth' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[1])
    found = subprocess.run(
        [sys.executable, "-S", "-c", code, root, sysconfig.get_paths()["purelib"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert found == [str(mimalloc_library()), "False"]
