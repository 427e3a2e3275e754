"""Hostile and broken jobs end with a clear error; the worker and every other job carry on.

Each test runs every case of one runtime at once on one real worker, then a
good job on the same worker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psycopg

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.processes import alive

GOOD_SCRIPT = 'export default function analyze(data) { return {result: "success"}; }'


class Case(NamedTuple):
    script: str
    status: str
    error: str  # regular expression the error_message must match ("" = no error)
    result: object = None


JS_CASES = {
    "infinite loop": Case("export default function analyze() { while (true) {} }", "timeout", r"1000 ms time limit"),
    "catastrophic regex": Case(
        "export default function analyze() { return /(a+)+$/.test('a'.repeat(40) + 'b'); }",
        "timeout",
        r"1000 ms time limit .*killed",
    ),
    "out of memory": Case(
        "export default function analyze() { const a = []; while (true) a.push(new Array(100000).fill(1)); }",
        "failed",
        r"32 MB memory limit",
    ),
    "deep recursion": Case(
        "export default function analyze() { function f(n) { return f(n + 1) + 1; } return f(0); }",
        "failed",
        r"^stack overflow",
    ),
    "engine crash": Case(
        "export default function analyze() { let a = []; for (let i = 0; i < 50000; i++) a = [a];"
        " return JSON.stringify(a).length; }",
        "failed",
        r"JavaScript engine crashed \(killed by SIGSEGV\)",
    ),
    "syntax error": Case(
        "export default function analyze( { return 1 }", "failed", r"^syntax error in script: SyntaxError"
    ),
    "thrown error": Case(
        "function check(p) { throw new RangeError('value out of range: ' + p.x); }\n"
        "export default function analyze(p) { check(p); }",
        "failed",
        r"^RangeError: value out of range: 7\n\s+at check",
    ),
    "no default export": Case("const x = 1;", "failed", r"no default export function"),
    "unserialisable result": Case(
        "export default function analyze() { const a = {}; a.self = a; return a; }", "failed", r"not JSON-serialisable"
    ),
    "host objects": Case(
        "export default function analyze() { return [typeof require, typeof process, typeof std, typeof os,"
        " typeof fetch, typeof XMLHttpRequest, typeof setTimeout]; }",
        "completed",
        "",
        ["undefined"] * 7,
    ),
    "two-argument form": Case(
        "export default function analyze(params, ctx) { console.log('x is', params.x); console.error('warn');"
        " return {x: params.x, job: ctx.jobId.length, attempt: ctx.attempt}; }",
        "completed",
        "",
        {"x": 7, "job": 36, "attempt": 1},
    ),
    "async analysis": Case(
        "export default async function analyze(p) { const v = await Promise.resolve(p.x); return v * 2; }",
        "completed",
        "",
        14,
    ),
}


def test_hostile_javascript_jobs_fail_cleanly_and_the_worker_carries_on(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--concurrency", "4")
    jobs = {}
    for name, case in JS_CASES.items():
        timeout = 5000 if name == "engine crash" else 1000
        analysis = create_analysis(db, script=case.script, timeout_ms=timeout, memory_limit_mb=32)
        jobs[name] = submit(db, analysis, {"x": 7})
    rows = wait_for_jobs(db, list(jobs.values()), timeout=90)
    for name, case in JS_CASES.items():
        row = rows[jobs[name]]
        assert row["status"] == case.status, (name, row["error_message"])
        if case.error:
            assert re.search(case.error, row["error_message"] or ""), (name, row["error_message"])
        else:
            assert row["error_message"] is None, (name, row["error_message"])
            assert row["result"] == case.result, name
    two_arg = rows[jobs["two-argument form"]]
    assert (two_arg["stdout"], two_arg["stderr"]) == ("x is 7\n", "warn\n")

    good = submit(db, create_analysis(db, script=GOOD_SCRIPT))
    assert wait_for_jobs(db, [good])[good]["result"] == {"result": "success"}
    health = json.loads(worker.get("/health")[1])
    assert health["status"] == "healthy"
    assert health["jobs_processed"] == len(JS_CASES) + 1
    metrics = worker.get("/metrics")[1]
    assert 'analysis_executor_pool_child_restarts_total{reason="crash"} 1.0' in metrics
    # The regex always needs the kill; the plain loop too when the machine is
    # so busy that its CPU-time limit trails the wall clock.
    restarts = re.search(r'pool_child_restarts_total\{reason="timeout"\} (\d+)', metrics)
    assert restarts is not None and 1 <= int(restarts.group(1)) <= 2


PY_SCRIPTS = {
    "echo": """
import json, os, sys
params = json.load(sys.stdin)
print("argv", sys.argv[1:], file=sys.stderr)
print("some log line")
print(json.dumps({"params": params, "argv": sys.argv[1:], "database_url": os.environ.get("DATABASE_URL"),
                  "secret": os.environ.get("ANALYSIS_EXECUTOR_API_TOKEN"), "env": sorted(os.environ)}))
""",
    "exit3": "import sys\nprint('partial result')\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n",
    "sleeper": """
import subprocess, sys, time
escaped = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(escaped.pid, child.pid, flush=True)
time.sleep(300)
""",
    "flood": "import sys\nline = 'y' * 1023 + '\\n'\nfor _ in range(100 * 1024):\n    sys.stdout.write(line)\n",
    "hog": "blob = bytearray(2 * 1024 * 1024 * 1024)\n",
    "not_json": "print('hello')\n",
}


def test_hostile_python_jobs_fail_cleanly_and_the_worker_carries_on(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path, tmp_path: Path
) -> None:
    for name, body in PY_SCRIPTS.items():
        (scripts_dir / f"{name}.py").write_text(body)
    outside = tmp_path / "outside.py"
    outside.write_text("print('escaped the whitelist')\n")
    worker = start_worker(
        "--concurrency", "4", env={"ANALYSIS_EXECUTOR_API_TOKEN": "t0ken", "JOB_MEMORY_LIMIT_MB": "128"}
    )

    def job(script_name: str, params: dict[str, object] | None = None, timeout_ms: int = 10_000) -> str:
        return submit(db, create_analysis(db, script_name=script_name, timeout_ms=timeout_ms), params or {})

    jobs = {
        "echo": job("echo", {"x": 1, "args": ["--mode", "fast", 3]}),
        "echo.py": job("echo.py"),
        "exit3": job("exit3"),
        "sleeper": job("sleeper", timeout_ms=1000),
        "flood": job("flood"),
        "hog": job("hog"),
        "not_json": job("not_json"),
        "unknown": job("no_such_script"),
        "traversal": job("../outside"),
        "absolute": job(str(outside)),
        "bad args": job("echo", {"args": {"not": "a list"}}),
    }
    rows = wait_for_jobs(db, list(jobs.values()), timeout=90)

    echo = rows[jobs["echo"]]
    assert echo["status"] == "completed", echo["error_message"]
    assert echo["exit_code"] == 0
    assert echo["result"]["params"] == {"x": 1, "args": ["--mode", "fast", 3]}
    assert echo["result"]["argv"] == ["--mode", "fast", "3"]
    assert echo["result"]["database_url"] is None
    assert echo["result"]["secret"] is None
    assert not {"DATABASE_URL", "ANALYSIS_EXECUTOR_API_TOKEN", "JOB_MEMORY_LIMIT_MB"} & set(echo["result"]["env"])
    assert "some log line" in echo["stdout"]
    assert "argv ['--mode', 'fast', '3']" in echo["stderr"]
    assert rows[jobs["echo.py"]]["status"] == "completed"

    exit3 = rows[jobs["exit3"]]
    assert (exit3["status"], exit3["exit_code"]) == ("failed", 3)
    assert exit3["error_message"] == "script exited with code 3: bad input"
    assert exit3["stdout"] == "partial result\n"

    sleeper = rows[jobs["sleeper"]]
    assert sleeper["status"] == "timeout"
    assert "1000 ms time limit" in sleeper["error_message"]
    for pid in map(int, sleeper["stdout"].split()):
        assert not alive(pid), f"descendant {pid} of a timed-out script survived"

    flood = rows[jobs["flood"]]
    assert flood["status"] == "failed"
    assert "output exceeded" in flood["error_message"]
    assert len(flood["stdout"]) < 2 * 1024 * 1024
    assert "[output truncated" in flood["stdout"]

    hog = rows[jobs["hog"]]
    assert hog["status"] == "failed"
    assert "128 MB memory limit" in hog["error_message"]

    not_json = rows[jobs["not_json"]]
    assert (not_json["status"], not_json["result"], not_json["stdout"]) == ("completed", None, "hello\n")

    for name in ("unknown", "traversal", "absolute"):
        assert rows[jobs[name]]["status"] == "failed", name
    assert "not in the whitelist" in rows[jobs["unknown"]]["error_message"]
    assert "not a bare name" in rows[jobs["traversal"]]["error_message"]
    assert "not a bare name" in rows[jobs["absolute"]]["error_message"]
    assert "escaped the whitelist" not in (rows[jobs["absolute"]]["stdout"] or "")
    assert "parameters.args must be a list" in rows[jobs["bad args"]]["error_message"]

    good = submit(db, create_analysis(db, script=GOOD_SCRIPT))
    assert wait_for_jobs(db, [good])[good]["status"] == "completed"
    assert json.loads(worker.get("/health")[1])["status"] == "healthy"


def test_whitelist_is_reread_when_the_folder_changes(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    start_worker()
    analysis = create_analysis(db, script_name="late_arrival")
    first = submit(db, analysis)
    assert wait_for_jobs(db, [first])[first]["status"] == "failed"
    (scripts_dir / "late_arrival.py").write_text("print('[1, 2]')\n")
    second = submit(db, analysis)
    assert wait_for_jobs(db, [second])[second]["result"] == [1, 2]


def test_jobs_queued_behind_a_hung_job_in_a_shared_child_still_complete(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    (scripts_dir / "ok.py").write_text("print('[\"py\"]')\n")
    worker = start_worker("--concurrency", "8", "--pool-processes", "1")
    hung = submit(db, create_analysis(db, script=JS_CASES["catastrophic regex"].script, timeout_ms=1000))
    behind = [submit(db, create_analysis(db, script=GOOD_SCRIPT)) for _ in range(5)]
    python = submit(db, create_analysis(db, script_name="ok"))
    rows = wait_for_jobs(db, [hung, *behind, python], timeout=60)
    assert rows[hung]["status"] == "timeout"
    assert {rows[j]["status"] for j in behind} == {"completed"}
    assert rows[python]["result"] == ["py"]
    assert "analysis_executor_pool_processes 1.0" in worker.get("/metrics")[1]
