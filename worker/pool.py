"""The supervised process pool: child processes that run one job at a time, killed one at a time.

Each slot is a long-lived ``python -m worker.runtimes.child`` process that
runs the jobs it is sent one after another. The pool keeps JavaScript jobs
queued in each child so a busy child seldom waits for a round trip between
jobs: about 20 ms of work at the recent average job length (between 1 and
``prefetch`` jobs), so small jobs queue deep, and jobs of 20 ms or more not at
all (a round trip is small beside them). A Python script only goes to an idle
child, and nothing is queued behind it.

Every job has a wall-clock deadline, counted from the moment it starts (when
the job ahead of it in its child finished). A child whose job overruns its
deadline is killed (with the script's process group, for Python jobs); a
child that dies mid-job yields a ``failed`` outcome naming the signal. Either
way the jobs queued behind it never started and are handed to another child,
only that slot is respawned, and no other job notices — unlike
``ProcessPoolExecutor``, where one crash breaks the whole pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.boundary import ScriptUser, child_environment
from worker.runtimes.protocol import HEADER, decode_payload, encode_frame, outcome

log = logging.getLogger(__name__)

# Margin over the job's own limit before the pool kills the child: the engine
# or the script supervisor normally reports a timeout first.
KILL_MARGIN_SECONDS = 0.25
_PYTHON_KILL_MARGIN_SECONDS = 5.0 + 2.0  # the script supervisor's TERM->KILL grace, plus slack
_START_TIMEOUT_SECONDS = 60.0
_STREAM_LIMIT = 1 << 31
_STDERR_LINE_MAX = 8192  # longer stderr lines are cut in the log
_ENGINE_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE})
# JavaScript work queued in a child, in seconds at the recent average job length.
# Deep enough that a busy child rarely runs dry and sleeps before the worker tops
# it up (waking it costs more than a small job: trivial jobs ran 5-10 % slower 8
# deep than ~48 deep), short enough that little waits behind a job that turns
# out slow.
QUEUE_TARGET_SECONDS = 0.02
MAX_PREFETCH = 64
_FIRST_DEPTH = 8  # the depth the running average starts from
_AVERAGE_WEIGHT = 1 / 16  # of the newest job in the running average: one slow job shrinks the queues at once


class PoolClosed(RuntimeError):
    """The pool is shutting down and takes no more jobs."""


class _Task:
    """One job on its way through the pool."""

    __slots__ = ("abandoned", "future", "job")

    def __init__(self, job: dict[str, Any], future: asyncio.Future[dict[str, Any]]) -> None:
        self.job = job
        self.future = future
        self.abandoned = False  # its caller stopped waiting; the outcome is dropped

    @property
    def is_python(self) -> bool:
        return self.job["runtime"] == "python"

    def deadline_seconds(self) -> float:
        margin = _PYTHON_KILL_MARGIN_SECONDS if self.is_python else KILL_MARGIN_SECONDS
        return float(self.job["timeout_ms"]) / 1000 + margin


class _Slot:
    """One child process and the jobs sent to it, in order; the first is running."""

    def __init__(self, index: int, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.index = index
        self.env = env
        self.args = args
        self.allocator = "system"
        self.proc: asyncio.subprocess.Process | None = None
        self.sent: collections.deque[_Task] = collections.deque()
        self.head_started = 0.0  # when the first job in ``sent`` started (loop time)
        self.job_pgid: int | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.reader: asyncio.Task[None] | None = None
        self.stderr_reader: asyncio.Task[None] | None = None
        self.lost = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.runtimes.child",
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,  # logged line by line: never raw text in the worker's log
            start_new_session=True,  # terminal Ctrl-C goes to the worker, which decides
            limit=_STREAM_LIMIT,
            env=self.env,
        )
        self.stderr_reader = asyncio.create_task(self._log_stderr(), name=f"pool-child-{self.index}-stderr")
        ready = await asyncio.wait_for(self.read(), _START_TIMEOUT_SECONDS)
        if ready.get("event") != "ready":
            raise RuntimeError(f"pool child sent {ready!r} instead of ready")
        self.allocator = str(ready.get("allocator", "system"))

    async def _log_stderr(self) -> None:
        """What the child writes to stderr (an engine's message, a traceback) as log records, one per line."""
        assert self.proc is not None and self.proc.stderr is not None
        pid, pending = self.proc.pid, b""
        while chunk := await self.proc.stderr.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > _STDERR_LINE_MAX:  # no newline in sight: log what we have
                lines, pending = [*lines, pending], b""
            for line in lines:
                self._log_stderr_line(pid, line)
        self._log_stderr_line(pid, pending)

    def _log_stderr_line(self, pid: int, line: bytes) -> None:
        text = line[:_STDERR_LINE_MAX].decode("utf-8", "replace").rstrip()
        if text:
            log.warning("pool child %d (pid %d): %s", self.index, pid, text, extra={"pool_child_pid": pid})

    async def read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        return decode_payload(await self.proc.stdout.readexactly(length))

    def send(self, tasks: list[_Task]) -> None:
        """Write the jobs' frames in one go and remember them, in order."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"".join(encode_frame(task.job) for task in tasks))
        self.sent.extend(tasks)

    @property
    def idle(self) -> bool:
        return not self.sent

    def kill(self) -> None:
        """SIGKILL the child and the running script's process group."""
        self.kill_job_group()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def kill_job_group(self) -> None:
        if self.job_pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.job_pgid, signal.SIGKILL)
            self.job_pgid = None

    async def close(self) -> None:
        """Ask the child to exit (end of input); kill it if it does not."""
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            self.kill()
            await self.proc.wait()


class ProcessPool:
    """``size`` supervised child processes; ``run(job)`` returns the job's outcome.

    ``prefetch`` caps the JavaScript jobs a child holds, the running one included.
    """

    def __init__(
        self,
        size: int,
        *,
        prefetch: int = MAX_PREFETCH,
        on_respawn: Callable[[str], None] | None = None,
        preload: Path | None = None,
        script_user: ScriptUser | None = None,
    ) -> None:
        self.size = size
        self.preload = preload
        self._child_env = child_environment(os.environ, preload)
        self._child_args = _child_args(script_user)
        self.allocator = "system"
        self.prefetch = max(1, prefetch)
        self._job_seconds = QUEUE_TARGET_SECONDS / _FIRST_DEPTH  # running average of JavaScript jobs
        self._waiting: collections.deque[_Task] = collections.deque()
        self._slots: list[_Slot] = []
        self._respawns: set[asyncio.Task[None]] = set()
        self._on_respawn = on_respawn
        self._closed = False
        self._dispatch_scheduled = False

    async def start(self) -> None:
        """Start every child; raises if one cannot start."""
        slots = [_Slot(i, self._child_env, self._child_args) for i in range(self.size)]
        await asyncio.gather(*(slot.start() for slot in slots))
        for slot in slots:
            self._adopt(slot)
        self.allocator = slots[0].allocator
        if self.preload is not None and self.allocator != "mimalloc":
            log.warning("pool children could not preload %s; they use the system allocator", self.preload)
        log.info("process pool started with %d children (allocator: %s)", self.size, self.allocator)

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job (waiting for a child if needed); never raises for job faults.

        Cancelling the caller stops the job: a waiting job is dropped, a running
        one is killed with its child.
        """
        if self._closed:
            raise PoolClosed("the pool is closed")
        loop = asyncio.get_running_loop()
        task = _Task(job, loop.create_future())
        self._waiting.append(task)
        if not self._dispatch_scheduled:
            # Jobs submitted in the same turn of the event loop go out together.
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch)
        try:
            return await task.future
        except asyncio.CancelledError:
            self._abandon(task)
            raise

    def send_waiting(self) -> None:
        """Send the jobs submitted so far now, instead of at the end of this turn of the event loop."""
        if self._dispatch_scheduled:
            self._dispatch()

    @property
    def depth(self) -> int:
        """How many JavaScript jobs a child may hold now (the running one included)."""
        return max(1, min(self.prefetch, int(QUEUE_TARGET_SECONDS / self._job_seconds)))

    def child_pids(self) -> list[int]:
        """Pids of the live children (for tests and diagnostics)."""
        return [slot.proc.pid for slot in self._slots if slot.proc is not None]

    def slot_pids(self) -> list[tuple[int, int]]:
        """(slot index, pid) of the live children, for their metrics."""
        return [(slot.index, slot.proc.pid) for slot in self._slots if slot.proc is not None]

    def _adopt(self, slot: _Slot) -> None:
        self._slots.append(slot)
        slot.reader = asyncio.create_task(self._read_outcomes(slot), name=f"pool-child-{slot.index}")
        self._dispatch()

    def _dispatch(self) -> None:
        """Send waiting jobs to children: Python ones to idle children only, JavaScript up to ``prefetch`` deep."""
        self._dispatch_scheduled = False
        if not self._waiting:
            return
        live = [slot for slot in self._slots if not slot.lost]
        planned: dict[_Slot, list[_Task]] = {slot: [] for slot in live}
        kept: collections.deque[_Task] = collections.deque()
        depth = self.depth
        # Once no child can take another job, the rest of the queue stays as it is
        # (with a backlog this loop would otherwise visit every waiting job per outcome).
        room = sum(1 for slot in live if _has_room(slot, [], depth))
        while self._waiting and room:
            task = self._waiting.popleft()
            if task.abandoned:
                continue
            slot = _choose_slot(task, planned, depth)
            if slot is None:
                kept.append(task)
            else:
                planned[slot].append(task)
                if not _has_room(slot, planned[slot], depth):
                    room -= 1
        kept.extend(self._waiting)
        self._waiting = kept
        for slot, tasks in planned.items():
            if tasks:
                was_idle = slot.idle
                slot.send(tasks)
                if was_idle:
                    self._arm_deadline(slot)

    def _arm_deadline(self, slot: _Slot) -> None:
        """The first job in ``sent`` has just started: time it, and kill it if it overruns."""
        if slot.deadline is not None:
            slot.deadline.cancel()
        slot.deadline = None
        if slot.sent:
            head = slot.sent[0]
            loop = asyncio.get_running_loop()
            slot.head_started = loop.time()
            slot.deadline = loop.call_later(head.deadline_seconds(), self._overrun, slot)

    def _measure(self, slot: _Slot, task: _Task) -> None:
        """Fold the length of a JavaScript job that just finished into the running average."""
        if not task.is_python:
            seconds = asyncio.get_running_loop().time() - slot.head_started
            self._job_seconds += _AVERAGE_WEIGHT * (max(seconds, 1e-6) - self._job_seconds)

    async def _read_outcomes(self, slot: _Slot) -> None:
        try:
            while not slot.lost:
                message = await slot.read()
                if slot.lost:
                    return  # killed meanwhile: what it says no longer counts
                if "status" in message:
                    task = slot.sent.popleft()
                    slot.job_pgid = None
                    self._measure(slot, task)
                    self._arm_deadline(slot)
                    if not task.future.done():
                        task.future.set_result(message)
                    # A busy child is topped up only once half its queue is done: fewer, larger writes.
                    if len(slot.sent) <= self.depth // 2:
                        self._dispatch()
                elif message.get("event") == "spawned":
                    slot.job_pgid = int(message["pgid"])
        except (asyncio.IncompleteReadError, ConnectionError):
            self._mark_lost(slot, "crash")
        except ValueError as exc:  # a garbled frame: the child cannot be trusted any more
            log.error("pool child %d sent an unreadable frame (%s); replacing it", slot.index, exc)
            self._mark_lost(slot, "crash")

    def _overrun(self, slot: _Slot) -> None:
        slot.deadline = None
        if slot.lost or not slot.sent:
            return
        head = slot.sent[0]
        if not head.future.done():
            head.future.set_result(
                outcome(
                    "timeout",
                    error_message=f"script exceeded the {head.job['timeout_ms']} ms time limit "
                    "(the engine did not stop by itself; its process was killed)",
                )
            )
        self._mark_lost(slot, "timeout")

    def _mark_lost(self, slot: _Slot, reason: str) -> None:
        """Kill the child now (nothing more is sent to it or read from it); clean up in the background."""
        if slot.lost:
            return
        slot.lost = True
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        slot.kill()
        task = asyncio.create_task(self._lose(slot, reason))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _lose(self, slot: _Slot, reason: str) -> None:
        """After the kill: settle the running job, hand the queued ones to other children, respawn."""
        try:
            assert slot.proc is not None
            returncode = await slot.proc.wait()
            slot.kill_job_group()
            if slot.reader is not None and slot.reader is not asyncio.current_task():
                slot.reader.cancel()
            if slot in self._slots:
                self._slots.remove(slot)
            if slot.sent:
                head = slot.sent.popleft()
                if not head.future.done():
                    head.future.set_result(_death_outcome(head.job, returncode))
                # Jobs queued behind it never started: they go to another child, first in line.
                self._waiting.extendleft(reversed(slot.sent))
                slot.sent.clear()
                self._dispatch()
        finally:
            if self._on_respawn is not None:
                self._on_respawn(reason)
        if not self._closed:
            await self._respawn(slot.index)

    def _abandon(self, task: _Task) -> None:
        task.abandoned = True
        for slot in self._slots:
            if slot.sent and slot.sent[0] is task and not slot.lost:
                self._mark_lost(slot, "cancelled")  # it is running: stop it by killing its child
                return
        # Waiting, or queued in a child behind another job: it is dropped when its turn comes
        # (queued ones still run, briefly, and their outcome is discarded).

    async def _respawn(self, index: int) -> None:
        delay = 0.1
        while not self._closed:
            slot = _Slot(index, self._child_env, self._child_args)
            try:
                await slot.start()
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.error("could not restart pool child %d: %s; retrying in %.1fs", index, exc, delay)
                slot.kill()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:
                await slot.close()
                return
            self._adopt(slot)
            return

    async def close(self) -> None:
        """Stop every child; running jobs are the caller's to cancel first."""
        self._closed = True
        for task in list(self._respawns):
            task.cancel()
        slots = list(self._slots)
        self._slots.clear()
        for slot in slots:
            slot.lost = True
            if slot.deadline is not None:
                slot.deadline.cancel()
            if slot.reader is not None:
                slot.reader.cancel()
        await asyncio.gather(*(slot.close() for slot in slots), return_exceptions=True)
        # Their last stderr lines, then end of file (a descendant may hold the pipe open: not for long).
        readers = [slot.stderr_reader for slot in slots if slot.stderr_reader is not None]
        if readers:
            _, late = await asyncio.wait(readers, timeout=1.0)
            for reader in late:
                reader.cancel()


def _child_args(user: ScriptUser | None) -> tuple[str, ...]:
    """The pool child's arguments: who its Python scripts run as, when not as the worker's uid."""
    if user is None or user.uid is None:
        return ()
    return ("--run-as", f"{user.uid}:{user.gid}:{user.max_processes or 0}")


def _has_room(slot: _Slot, planned: list[_Task], depth: int) -> bool:
    """True while the child can still be sent a job (an idle one can take a Python script)."""
    load = len(slot.sent) + len(planned)
    if load == 0:
        return True
    last = planned[-1] if planned else slot.sent[-1]
    return load < depth and not last.is_python


def _choose_slot(task: _Task, planned: dict[_Slot, list[_Task]], depth: int) -> _Slot | None:
    """The least loaded child that can take the task, or None."""
    best, best_load = None, depth
    for slot, tasks in planned.items():
        load = len(slot.sent) + len(tasks)
        if task.is_python:
            if load == 0:
                return slot
            continue
        # Nothing is queued behind a Python script: it may run for minutes.
        if load < best_load and not (slot.sent and slot.sent[-1].is_python) and not (tasks and tasks[-1].is_python):
            best, best_load = slot, load
    return best


def _death_outcome(job: dict[str, Any], returncode: int) -> dict[str, Any]:
    if returncode < 0:
        try:
            reason = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            reason = f"killed by signal {-returncode}"
    else:
        reason = f"exited with code {returncode}"
    if job["runtime"] == "javascript" and -returncode in _ENGINE_CRASH_SIGNALS:
        # The script drove the engine into a crash: running it again would crash again.
        return outcome("failed", error_message=f"the JavaScript engine crashed ({reason}) while running the job")
    # Killed from outside (the kernel's OOM killer, an operator) or the supervisor
    # itself failed: not the script's fault, so worth a retry.
    failed = outcome("failed", error_message=f"the job's pool process died ({reason}); not caused by the script")
    return {**failed, "retryable": True}
