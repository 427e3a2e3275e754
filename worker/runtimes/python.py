"""Whitelisted Python scripts: the whitelist (worker side) and the runner (pool child side).

A Python analysis names a script in ``ANALYTICS_SCRIPTS_DIR`` by bare name
(``recalibrate_weights`` or ``recalibrate_weights.py``). The script runs
under ``ANALYTICS_PYTHON`` in its own session with resource limits and a
scrubbed environment; it reads the job's parameters as JSON on stdin and
``parameters.args`` on argv. Its output is captured up to a cap; the last
stdout line, when it is JSON, becomes the job's result.

The pool child that runs scripts is a child subreaper, so descendants that
escape the process group (``setsid``) are re-parented to it and are found
and killed when the job ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.boundary import forbid_new_privileges
from worker.runtimes.protocol import outcome, result_too_large

TERM_GRACE_SECONDS = 5.0
_ORPHAN_GRACE_SECONDS = 0.2
_BARE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_FILE_SIZE_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RunAs:
    """The uid (and its group) scripts run as, and their process limit (RLIMIT_NPROC)."""

    uid: int
    gid: int
    max_processes: int | None = None


class ScriptNotAllowed(ValueError):
    """The analysis names a script that is not in the whitelist."""


class ScriptWhitelist:
    """The ``*.py`` files directly inside the scripts folder, re-read when it changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.expanduser().absolute()
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, Path] = {}

    def names(self) -> list[str]:
        """Sorted bare names of the scripts that may run."""
        self._refresh()
        return sorted(self._names)

    def resolve(self, name: str | None) -> Path:
        """Return the script's path, or raise ScriptNotAllowed with a reason."""
        if not name or not _BARE_NAME.match(name) or ".." in name:
            raise ScriptNotAllowed(
                f"script name {name!r} is not a bare name: only scripts directly inside "
                f"ANALYTICS_SCRIPTS_DIR ({self.folder}) may run"
            )
        self._refresh()
        path = self._names.get(name.removesuffix(".py"))
        if path is None:
            known = ", ".join(sorted(self._names)) or "none"
            raise ScriptNotAllowed(
                f"script {name!r} is not in the whitelist (ANALYTICS_SCRIPTS_DIR={self.folder}; known scripts: {known})"
            )
        return path

    def _refresh(self) -> None:
        try:
            stat = self.folder.stat()
        except FileNotFoundError:
            self._stamp, self._names = None, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp == self._stamp:
            return
        names = {}
        for entry in self.folder.iterdir():
            if entry.suffix == ".py" and entry.is_file() and not entry.name.startswith(("_", ".")):
                names[entry.stem] = entry.resolve()
        self._stamp, self._names = stamp, names


@dataclass
class _Stream:
    """One captured pipe: the first `limit` bytes kept, the rest counted."""

    limit: int
    data: bytearray
    total: int = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def overflowed(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        if self.overflowed:
            text += f"\n[output truncated: {self.total} bytes written, the first {self.limit} kept]\n"
        return text


class _Stdout:
    """The script's stdout: log lines up to ``limit`` bytes, and its last line (the result) up to ``result_limit``.

    The last non-blank line may be the job's result, which can be far larger
    than the log limit, so it is held apart until another line follows it;
    only then does it count as log output. A last line that is too large to
    be either stops the script as soon as it grows past both limits.
    """

    def __init__(self, limit: int, result_limit: int) -> None:
        self.limit = limit
        self.result_limit = result_limit
        self.log = _Stream(limit, bytearray())
        self.last = bytearray()
        self._last_has_text = False
        self._last_ended = False  # the last line has text and a newline after it

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline + 1
            piece = chunk[start:end]
            has_text = not piece.isspace()
            if has_text and self._last_ended:  # a new line begins: the one before was a log line
                self.log.feed(bytes(self.last))
                self.last.clear()
                self._last_has_text = self._last_ended = False
            if len(self.last) <= max(self.limit, self.result_limit):
                self.last += piece
            self._last_has_text = self._last_has_text or has_text
            if newline >= 0:
                self._last_ended = self._last_has_text
            elif has_text:
                self._last_ended = False
            start = end

    @property
    def result_overflowed(self) -> bool:
        """The last line is too long to be a log line or a result."""
        return len(self.last) > max(self.limit, self.result_limit)

    @property
    def overflowed(self) -> bool:
        """The log lines alone are over the limit, or the last line is too long for anything."""
        return self.log.overflowed or self.result_overflowed

    def result_json(self) -> str | None:
        """The last non-blank line when it is JSON, else None."""
        line = self.last.decode("utf-8", "replace").strip()
        if not line:
            return None
        try:
            json.loads(line, parse_constant=_refuse_constant)
        except ValueError:  # not JSON, or NaN/Infinity, which JSON (and a jsonb column) cannot hold
            return None
        return line

    def fits(self) -> bool:
        """Log lines and last line together are within the log limit."""
        return self.log.total + len(self.last) <= self.limit

    def text(self, *, last_is_result: bool) -> str:
        """What the job row's ``stdout`` keeps: the whole output when it fits, or its first ``limit`` bytes.

        A result line too large to fit is left out with a note (it is in ``result``).
        """
        if self.fits():
            return (bytes(self.log.data) + bytes(self.last)).decode("utf-8", "replace")
        if last_is_result and not self.log.overflowed:
            note = f"[the last line ({len(self.last)} bytes) is the job's result; see result]\n"
            return self.log.data.decode("utf-8", "replace") + note
        combined = _Stream(self.limit, bytearray())
        combined.feed(bytes(self.log.data))
        combined.feed(bytes(self.last[: self.limit]))
        combined.total = self.log.total + len(self.last)
        return combined.text()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def become_subreaper() -> None:
    """Adopt orphaned descendants (Linux); a no-op where prctl is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_python_script(job: dict[str, Any], on_spawn: Any = None, run_as: RunAs | None = None) -> dict[str, Any]:
    """Run the job's script to completion, timeout or kill; return an outcome.

    ``on_spawn(pid)`` is called once the script started, so the pool can
    reach its process group even if this process is killed.
    """
    try:
        args = _script_args(job["parameters_json"])
    except ValueError as exc:
        return outcome("failed", error_message=str(exc))
    timeout_s = job["timeout_ms"] / 1000
    memory_limit = job["memory_limit_mb"] * 1024 * 1024
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "ANALYSIS_JOB_ID": job["job_id"],
        "ANALYSIS_ID": job["analysis_id"],
    }

    def limit_resources() -> None:  # runs in the forked child, before exec
        die_with_parent()
        cpu_seconds = int(timeout_s) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if run_as is not None and run_as.max_processes:
            resource.setrlimit(resource.RLIMIT_NPROC, (run_as.max_processes, run_as.max_processes))
        forbid_new_privileges()

    identity: dict[str, Any] = {}
    if run_as is not None:  # subprocess switches uid and groups before calling limit_resources
        identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    with tempfile.TemporaryDirectory(prefix="analysis-job-") as workdir:
        if run_as is not None:
            os.chown(workdir, run_as.uid, run_as.gid)
        try:
            proc = subprocess.Popen(
                [job["python"], job["script_path"], *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                start_new_session=True,
                preexec_fn=limit_resources,
                **identity,
            )
        except OSError as exc:
            return outcome("failed", error_message=f"could not start {job['python']!r}: {exc.strerror or exc}")
        if on_spawn is not None:
            on_spawn(proc.pid)
        return _supervise(proc, job, timeout_s)


def _script_args(parameters_json: str) -> list[str]:
    parameters = json.loads(parameters_json)
    args = parameters.get("args", []) if isinstance(parameters, dict) else []
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) and a is not True for a in args):
        raise ValueError("parameters.args must be a list of strings (or numbers)")
    return [str(a) for a in args]


def _supervise(proc: subprocess.Popen[bytes], job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    limit = job["output_max_bytes"]
    stdout, stderr = _Stdout(limit, job["result_max_bytes"]), _Stream(limit, bytearray())
    streams: dict[int, _Stdout | _Stream] = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
    # The parameters, plus "datasets" when the analysis declares dependencies.
    pending_input = memoryview(job.get("stdin_json", job["parameters_json"]).encode("utf-8"))
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    os.set_blocking(proc.stdin.fileno(), False)
    selector.register(proc.stdin, selectors.EVENT_WRITE)
    stdin_open = True

    started = time.monotonic()
    deadline = started + timeout_s
    kill_at: float | None = None
    exited_at: float | None = None
    verdict: str | None = None  # "timeout" | "output"
    while selector.get_map():
        now = time.monotonic()
        if verdict is None and now >= deadline:
            verdict, kill_at = "timeout", now + TERM_GRACE_SECONDS
            _signal_everything(proc.pid, signal.SIGTERM)
        if verdict is None and (stdout.overflowed or stderr.overflowed):
            verdict, kill_at = "output", now
        if kill_at is not None and now >= kill_at:
            _kill_everything(proc.pid)
            kill_at = None
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > _ORPHAN_GRACE_SECONDS:
            break  # a descendant still holds the pipes open: stop waiting for EOF
        waits = [w for w in (deadline - now if verdict is None else None, kill_at and kill_at - now) if w is not None]
        for key, _ in selector.select(timeout=max(0.0, min([0.05, *waits]))):
            if key.fileobj is proc.stdin:
                try:
                    written = os.write(proc.stdin.fileno(), pending_input[:65536])
                    pending_input = pending_input[written:]
                except (BrokenPipeError, BlockingIOError):
                    pending_input = pending_input[:0]
                if not pending_input:
                    selector.unregister(proc.stdin)
                    proc.stdin.close()
                    stdin_open = False
                continue
            chunk = os.read(key.fd, 65536)
            if chunk:
                streams[key.fd].feed(chunk)
            else:
                selector.unregister(key.fileobj)
    selector.close()
    if stdin_open:
        proc.stdin.close()
    _kill_everything(proc.pid)
    returncode = proc.wait()
    _reap_orphans()
    proc.stdout.close()
    proc.stderr.close()
    return _verdict(job, verdict, returncode, stdout, stderr)


def _verdict(
    job: dict[str, Any], verdict: str | None, returncode: int, stdout: _Stdout, stderr: _Stream
) -> dict[str, Any]:
    result_json = stdout.result_json() if verdict is None and returncode == 0 else None
    if result_json is None and not stdout.fits() and verdict is None:
        verdict = "output"  # the last line is no result, so it counts as log output: over the limit
    out, err = stdout.text(last_is_result=result_json is not None), stderr.text()
    if verdict == "timeout":
        return outcome(
            "timeout",
            error_message=f"script exceeded the {job['timeout_ms']} ms time limit and was stopped",
            stdout=out,
            stderr=err,
            exit_code=returncode,
        )
    if verdict == "output" and stdout.result_overflowed:
        return outcome(
            "failed",
            error_message=result_too_large(None, job["result_max_bytes"]) + " and the script was stopped",
            stdout=out,
            stderr=err,
            exit_code=returncode,
        )
    if verdict == "output":
        which = "stderr" if stderr.overflowed else "stdout"
        return outcome(
            "failed",
            error_message=f"script output exceeded the {job['output_max_bytes']} byte limit on {which} "
            "(JOB_OUTPUT_MAX_BYTES) and the script was stopped",
            stdout=out,
            stderr=err,
            exit_code=returncode,
        )
    if returncode == 0:
        if result_json is not None and len(result_json) * 4 > job["result_max_bytes"]:
            size = len(result_json.encode("utf-8"))
            if size > job["result_max_bytes"]:
                message = result_too_large(size, job["result_max_bytes"])
                return outcome("failed", error_message=message, stdout=out, stderr=err, exit_code=0)
        return outcome("completed", result_json=result_json, stdout=out, stderr=err, exit_code=0)
    if returncode < 0:
        name = signal.Signals(-returncode).name
        if -returncode == signal.SIGXCPU:
            return outcome(
                "timeout",
                error_message="script used up its CPU time limit",
                stdout=out,
                stderr=err,
                exit_code=returncode,
            )
        return outcome(
            "failed", error_message=f"script was killed by {name}", stdout=out, stderr=err, exit_code=returncode
        )
    last_error = next((line for line in reversed(err.splitlines()) if line.strip()), "")
    if last_error.startswith("MemoryError"):
        message = f"script exceeded the {job['memory_limit_mb']} MB memory limit (MemoryError)"
    else:
        message = f"script exited with code {returncode}" + (f": {last_error.strip()}" if last_error else "")
    return outcome("failed", error_message=message, stdout=out, stderr=err, exit_code=returncode)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_everything(pgid: int) -> None:
    _signal_everything(pgid, signal.SIGKILL)


def _signal_everything(pgid: int, signum: int) -> None:
    """Signal the script's process group and every descendant of this process.

    Descendants that left the group (setsid) are still our descendants: the
    pool child is a subreaper, so even orphans are re-parented to it.
    """
    _signal_group(pgid, signum)
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _reap_orphans(timeout: float = 2.0) -> None:
    """Collect the exit statuses of killed descendants so none stays a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            time.sleep(0.005)


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root``.

    Read from the kernel's per-thread children lists, which visits only the
    descendants (usually none: ~0.1 ms here); where the kernel keeps no such lists
    (CONFIG_PROC_CHILDREN), from every process's parent in /proc (~5 ms here).
    """
    if not Path(f"/proc/{root}/task/{root}/children").exists():
        return _descendants_by_scan(root)
    found, frontier = [], [root]
    while frontier:
        for child in _children(frontier.pop()):
            found.append(child)
            frontier.append(child)
    return found


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (of all its threads); none once it is gone."""
    children: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                children += [int(child) for child in Path(task.path, "children").read_text().split()]
    except OSError:  # the process ended meanwhile
        pass
    return children


def _descendants_by_scan(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found
