"""Pure logic of the runtimes: default-export rewriting, the frame protocol, the whitelist."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import quickjs

from worker.runtimes.javascript import DEFAULT_EXPORT, expose_default_export
from worker.runtimes.protocol import encode_frame, read_frame
from worker.runtimes.python import ScriptNotAllowed, ScriptWhitelist, _Stdout


@pytest.mark.parametrize(
    "source",
    [
        "export default function analyze(data) { return 42; }",
        "export default async function analyze(p) { return 42; }",
        "export default function (p) { return 42; }",
        "export default (p) => 42;",
        "const f = () => 42;\nexport default f;",
        "function analyze(p) { return 42; }",
        "export default function analyze(n) { return n > 0 ? analyze(n - 1) : 42; }",
    ],
)
def test_every_default_export_form_is_reachable(source: str) -> None:
    context = quickjs.Context()
    context.module(expose_default_export(source))
    value = context.eval(f"globalThis.{DEFAULT_EXPORT}(3)")
    if not isinstance(value, int):  # an async function returns a promise
        context.eval(f"globalThis.r = null; globalThis.{DEFAULT_EXPORT}(3).then(v => {{ globalThis.r = v; }})")
        while context.execute_pending_job():
            pass
        value = context.eval("globalThis.r")
    assert value == 42


def test_frames_round_trip_unicode_and_end_cleanly() -> None:
    message = {"status": "completed", "stdout": "héllo \u2603\n", "result_json": '{"a": 1}'}
    stream = io.BytesIO(encode_frame(message) + encode_frame({"event": "ready"}))
    assert read_frame(stream) == message
    assert read_frame(stream) == {"event": "ready"}
    assert read_frame(stream) is None


def test_whitelist_accepts_bare_names_with_or_without_suffix(tmp_path: Path) -> None:
    (tmp_path / "recalibrate_weights.py").write_text("")
    whitelist = ScriptWhitelist(tmp_path)
    assert whitelist.resolve("recalibrate_weights") == whitelist.resolve("recalibrate_weights.py")
    assert whitelist.names() == ["recalibrate_weights"]


@pytest.mark.parametrize("name", ["../etc/passwd", "/usr/bin/python3", "sub/dir", "", None, "..", "a..b"])
def test_whitelist_refuses_anything_but_a_bare_name(tmp_path: Path, name: str | None) -> None:
    with pytest.raises(ScriptNotAllowed, match="not a bare name"):
        ScriptWhitelist(tmp_path).resolve(name)


def test_whitelist_ignores_private_files(tmp_path: Path) -> None:
    (tmp_path / "_helpers.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    whitelist = ScriptWhitelist(tmp_path)
    assert whitelist.names() == []
    with pytest.raises(ScriptNotAllowed, match="not in the whitelist"):
        whitelist.resolve("_helpers")


def test_only_connection_and_concurrency_failures_are_retried_as_is() -> None:
    from psycopg import errors

    from worker.recorder import is_transient

    assert is_transient(errors.AdminShutdown())
    assert is_transient(errors.DeadlockDetected())
    assert is_transient(errors.ConnectionFailure())
    assert not is_transient(errors.QueryCanceled())
    assert not is_transient(errors.ProgramLimitExceeded())
    assert not is_transient(errors.InvalidTextRepresentation())


def test_javascript_time_limit_covers_module_code_and_endless_microtasks() -> None:
    from worker.runtimes.javascript import run_javascript

    job = {
        "timeout_ms": 300, "memory_limit_mb": 64, "stack_limit_kb": 1024, "output_max_bytes": 1 << 20,
        "result_max_bytes": 1 << 20, "parameters_json": "{}", "context_json": "{}",
    }  # fmt: skip
    microtasks = run_javascript(
        {**job, "source": "export default async function analyze() { console.log('go'); for (;;) await 0; }"}
    )
    assert (microtasks["status"], microtasks["stdout"]) == ("timeout", "go\n")
    top_level = run_javascript({**job, "source": "while (true) {}\nexport default function analyze() { return 1; }"})
    assert top_level["status"] == "timeout"


DAEMON_SCRIPT = """
import os, sys, time
if os.fork() == 0:
    if os.fork() == 0:  # a daemon: its parent exits, so it is re-parented to the pool child
        os.setsid()  # and it leaves the script's process group
        print(os.getpid(), file=open(sys.argv[1], "w"), flush=True)
        time.sleep(300)
    os._exit(0)
time.sleep(0.3)
print("{}")
"""

# As a pool child runs it: a subreaper, running one script (in a process of its own,
# since becoming a subreaper would change this test process for the rest of the run).
RUN_AS_POOL_CHILD = """
import json, os, sys
from tests.messages import job_message
from worker.runtimes.python import become_subreaper, run_python_script
become_subreaper()
job = job_message("python", script_path=sys.argv[1], parameters_json=json.dumps({"args": [sys.argv[2]]}))
result = run_python_script(job, on_spawn=lambda pid: None)
daemon = int(open(sys.argv[2]).read())
print(result["status"], os.path.exists(f"/proc/{daemon}"))
"""


def test_a_daemon_left_behind_by_a_python_script_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON_SCRIPT)
    pid_file = tmp_path / "daemon.pid"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", RUN_AS_POOL_CHILD, str(script), str(pid_file)],
        cwd=root, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.split() == ["completed", "False"], done.stderr


@pytest.mark.parametrize("last", [b"NaN\n", b'{"x": Infinity}\n', b"[-Infinity]\n"])
def test_a_last_line_json_cannot_hold_is_no_result(last: bytes) -> None:
    """NaN and Infinity parse in Python but a jsonb column refuses them: such a line is output, not the result."""
    stdout = _Stdout(1024, 1024)
    stdout.feed(b"log line\n" + last)
    assert stdout.result_json() is None
    assert stdout.text(last_is_result=False) == "log line\n" + last.decode()
