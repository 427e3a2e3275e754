"""The process pool's queues: how many JavaScript jobs wait inside each child."""

from __future__ import annotations

import asyncio
import json

from tests.messages import job_message
from worker.pool import ProcessPool

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
