"""A pool child: runs one job at a time for the worker that started it.

Started as ``python -m worker.runtimes.child``. It reads job frames on stdin
and writes outcome frames to the pipe that was its stdout; anything else
printed (by the engine or a library) goes to stderr so it can never corrupt
the protocol. It exits when stdin closes, and the kernel kills it if the
worker dies.
"""

from __future__ import annotations

import os
import resource
import sys
import traceback
from typing import BinaryIO

from worker.allocator import allocator_in_use
from worker.boundary import make_undumpable
from worker.runtimes.protocol import outcome, read_frame, write_frame
from worker.runtimes.python import RunAs, become_subreaper, die_with_parent, run_python_script


def serve(requests: BinaryIO, replies: BinaryIO, run_as: RunAs | None = None) -> None:
    """Answer job frames until end of input; Python scripts run as ``run_as`` when given."""
    from worker.runtimes.javascript import prepare_context, run_javascript

    write_frame(replies, {"event": "ready", "pid": os.getpid(), "allocator": allocator_in_use()})
    while True:
        try:
            prepare_context()  # if no job is queued yet, this costs the next one nothing
        except Exception:  # the job then builds its own context and reports what fails
            traceback.print_exc(file=sys.stderr)
        job = read_frame(requests)
        if job is None:
            break
        try:
            if job["runtime"] == "javascript":
                result = run_javascript(job)
            elif job["runtime"] == "python":
                result = run_python_script(
                    job, on_spawn=lambda pid: write_frame(replies, {"event": "spawned", "pgid": pid}), run_as=run_as
                )
            else:
                result = outcome("failed", error_message=f"unknown runtime {job['runtime']!r}")
        except Exception as exc:  # a bug of ours must not take the slot down with the job
            traceback.print_exc(file=sys.stderr)
            result = outcome("failed", error_message=f"internal error running the job: {type(exc).__name__}: {exc}")
        write_frame(replies, result)


def main() -> None:
    """Entry point of the child process."""
    die_with_parent()
    become_subreaper()
    make_undumpable()  # a script of the same uid cannot read this process's memory or environ
    # An engine crash must be reported at once, not after writing a core dump.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply pipe
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, replies, _run_as(sys.argv[1:]))


def _run_as(args: list[str]) -> RunAs | None:
    """``--run-as UID:GID:NPROC`` from the pool (see worker.boundary)."""
    if len(args) != 2 or args[0] != "--run-as":
        return None
    uid, gid, nproc = (int(part) for part in args[1].split(":"))
    return RunAs(uid, gid, nproc or None)


if __name__ == "__main__":
    main()
