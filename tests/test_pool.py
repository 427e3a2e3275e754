"""The process pool's queues: how many JavaScript jobs wait inside each child."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from tests.messages import job_message
from worker.pool import ProcessPool, _Slot

# Busy for params.ms milliseconds of wall-clock time.
BUSY_JS = (
    "export default function analyze(params) {"
    " const end = Date.now() + params.ms; while (Date.now() < end) {} return {ms: params.ms}; }"
)


def busy_job(ms: int) -> dict[str, object]:
    return job_message(source=BUSY_JS, parameters_json=json.dumps({"ms": ms}))


def test_quick_jobs_do_not_queue_behind_a_slow_one_once_jobs_are_slow() -> None:
    async def scenario() -> tuple[int, dict[str, float]]:
        pool = ProcessPool(2)
        await pool.start()
        try:
            await pool.run(busy_job(300))  # the pool learns that jobs take a while
            depth = pool.depth
            loop = asyncio.get_running_loop()
            finished: dict[str, float] = {}

            async def run(name: str, ms: int) -> None:
                outcome = await pool.run(busy_job(ms))
                assert outcome["status"] == "completed", outcome
                finished[name] = loop.time()

            # Submitted together: with a fixed queue depth, quick-1 would share the
            # slow job's child (both children hold one job) and wait 3 s behind it.
            await asyncio.gather(run("slow", 3000), *(run(f"quick-{i}", 1) for i in range(4)))
            return depth, finished
        finally:
            await pool.close()

    depth, finished = asyncio.run(scenario())
    assert depth == 1
    assert all(finished[f"quick-{i}"] < finished["slow"] for i in range(4)), finished


def test_small_jobs_queue_deep_in_each_child() -> None:
    async def scenario() -> int:
        pool = ProcessPool(2)
        await pool.start()
        try:
            outcomes = await asyncio.gather(*(pool.run(busy_job(0)) for _ in range(300)))
            assert {outcome["status"] for outcome in outcomes} == {"completed"}
            return pool.depth
        finally:
            await pool.close()

    # Each trivial job takes well under a millisecond in its child, so a child may
    # hold more of them than the 8 the average starts from (at most 64).
    assert 8 < asyncio.run(scenario()) <= 64


def test_what_a_pool_child_writes_to_stderr_becomes_log_records_one_per_line(caplog: pytest.LogCaptureFixture) -> None:
    """A traceback or an engine's message is logged (JSON-safe in --log-format json), never raw text."""
    noise = 'Traceback (most recent call last):\n  File "x", line 1\nValueError: \x1b[31mboom\n' + "y" * 20000

    async def forward() -> None:
        slot = _Slot(3)
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"import sys; sys.stderr.write({noise!r})", stderr=asyncio.subprocess.PIPE
        )
        await slot._log_stderr()
        await slot.proc.wait()

    with caplog.at_level(logging.WARNING, logger="worker.pool"):
        asyncio.run(forward())
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4, messages
    assert messages[0].startswith("pool child 3 (pid ") and messages[0].endswith("Traceback (most recent call last):")
    assert messages[2].endswith("ValueError: \x1b[31mboom")
    assert messages[3].endswith("y" * 8192) and all("\n" not in m for m in messages)
