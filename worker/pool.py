"""The supervised process pool: one job at a time per child, killed one at a time.

Each slot is a long-lived ``python -m worker.runtimes.child`` process. The
pool hands a job to an idle slot and waits for its outcome with a wall-clock
deadline. A slot whose job overruns the deadline is killed (with the
script's process group, for Python jobs); a slot whose process dies
mid-job yields a ``failed`` outcome naming the signal. Either way the slot
is respawned in the background and no other job notices — unlike
``ProcessPoolExecutor``, where one crash breaks the whole pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from worker.runtimes.protocol import HEADER, decode_payload, encode_frame, outcome

log = logging.getLogger(__name__)

# Margin over the job's own limit before the pool kills the slot: the engine
# or the script supervisor normally reports a timeout first.
KILL_MARGIN_SECONDS = 0.25
_PYTHON_KILL_MARGIN_SECONDS = 5.0 + 2.0  # the script supervisor's TERM->KILL grace, plus slack
_START_TIMEOUT_SECONDS = 60.0
_STREAM_LIMIT = 1 << 31
_ENGINE_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE})


class PoolClosed(RuntimeError):
    """The pool is shutting down and takes no more jobs."""


class _Slot:
    """One child process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.job_pgid: int | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.runtimes.child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # terminal Ctrl-C goes to the worker, which decides
            limit=_STREAM_LIMIT,
        )
        ready = await asyncio.wait_for(self._read(), _START_TIMEOUT_SECONDS)
        if ready.get("event") != "ready":
            raise RuntimeError(f"pool child sent {ready!r} instead of ready")

    async def run(self, job: dict[str, Any], deadline_s: float) -> dict[str, Any]:
        """Send the job, return its outcome; raises _SlotLost when the child must be replaced."""
        assert self.proc is not None and self.proc.stdin is not None
        self.job_pgid = None
        try:
            self.proc.stdin.write(encode_frame(job))
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise _SlotLost(await self._death_outcome(job)) from None
        try:
            async with asyncio.timeout(deadline_s):
                while True:
                    message = await self._read()
                    if "status" in message:
                        return message
                    if message.get("event") == "spawned":
                        self.job_pgid = int(message["pgid"])
        except TimeoutError:
            await self.kill()
            raise _SlotLost(
                outcome(
                    "timeout",
                    error_message=f"script exceeded the {job['timeout_ms']} ms time limit "
                    "(the engine did not stop by itself; its process was killed)",
                )
            ) from None
        except asyncio.IncompleteReadError:
            raise _SlotLost(await self._death_outcome(job)) from None

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        return decode_payload(await self.proc.stdout.readexactly(length))

    async def _death_outcome(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None
        returncode = await self.proc.wait()
        self._kill_job_group()
        reason = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with code {returncode}"
        if job["runtime"] == "javascript" and -returncode in _ENGINE_CRASH_SIGNALS:
            # The script drove the engine into a crash: running it again would crash again.
            return outcome("failed", error_message=f"the JavaScript engine crashed ({reason}) while running the job")
        # Killed from outside (the kernel's OOM killer, an operator) or the
        # supervisor itself failed: not the script's fault, so worth a retry.
        failed = outcome("failed", error_message=f"the job's pool process died ({reason}); not caused by the script")
        return {**failed, "retryable": True}

    async def kill(self) -> None:
        """SIGKILL the child (and the running script's group) and wait for it."""
        self._kill_job_group()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def _kill_job_group(self) -> None:
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
            await self.kill()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class _SlotLost(Exception):
    """The slot's process was killed or died; carries the job's outcome."""

    def __init__(self, job_outcome: dict[str, Any]) -> None:
        super().__init__(job_outcome.get("error_message"))
        self.outcome = job_outcome


class ProcessPool:
    """``size`` supervised child processes; ``run(job)`` returns the job's outcome."""

    def __init__(self, size: int, *, on_respawn: Callable[[str], None] | None = None) -> None:
        self.size = size
        self._idle: asyncio.Queue[_Slot] = asyncio.Queue()
        self._slots: set[_Slot] = set()
        self._respawns: set[asyncio.Task[None]] = set()
        self._on_respawn = on_respawn
        self._closed = False

    async def start(self) -> None:
        """Start every slot; raises if a child cannot start."""
        slots = [_Slot(i) for i in range(self.size)]
        await asyncio.gather(*(slot.start() for slot in slots))
        for slot in slots:
            self._slots.add(slot)
            self._idle.put_nowait(slot)
        log.info("process pool started with %d children", self.size)

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job in an idle slot (waiting for one if needed); never raises for job faults."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        slot = await self._idle.get()
        margin = _PYTHON_KILL_MARGIN_SECONDS if job["runtime"] == "python" else KILL_MARGIN_SECONDS
        try:
            result = await slot.run(job, job["timeout_ms"] / 1000 + margin)
        except _SlotLost as lost:
            self._replace(slot, "timeout" if lost.outcome["status"] == "timeout" else "crash")
            return lost.outcome
        except asyncio.CancelledError:
            await slot.kill()
            self._replace(slot, "cancelled")
            raise
        self._idle.put_nowait(slot)
        return result

    def child_pids(self) -> list[int]:
        """Pids of the live children (for tests and diagnostics)."""
        return [slot.pid for slot in self._slots if slot.pid is not None]

    def _replace(self, slot: _Slot, reason: str) -> None:
        self._slots.discard(slot)
        if self._on_respawn is not None:
            self._on_respawn(reason)
        if self._closed:
            return
        task = asyncio.create_task(self._respawn(slot.index))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, index: int) -> None:
        delay = 0.1
        while not self._closed:
            slot = _Slot(index)
            try:
                await slot.start()
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.error("could not restart pool child %d: %s; retrying in %.1fs", index, exc, delay)
                await slot.kill()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:
                await slot.close()
                return
            self._slots.add(slot)
            self._idle.put_nowait(slot)
            return

    async def close(self) -> None:
        """Stop every child; running jobs are the caller's to cancel first."""
        self._closed = True
        for task in list(self._respawns):
            task.cancel()
        await asyncio.gather(*(slot.close() for slot in list(self._slots)), return_exceptions=True)
        self._slots.clear()
