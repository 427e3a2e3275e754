"""Jobs as the worker holds them: claimed rows, and the messages the executor sends to a pool child."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from worker.lifecycle import ClaimedJob


def job_message(runtime: str = "javascript", source: str = "", **extra: Any) -> dict[str, Any]:
    """A job message with the worker's default limits; ``extra`` overrides or adds keys."""
    return {
        "job_id": "00000000-0000-0000-0000-000000000001",
        "analysis_id": "00000000-0000-0000-0000-000000000002",
        "runtime": runtime,
        "source": source,
        "parameters_json": "{}",
        "context_json": "{}",
        "timeout_ms": 5000,
        "memory_limit_mb": 32,
        "stack_limit_kb": 1024,
        "output_max_bytes": 1 << 20,
        "result_max_bytes": 1 << 24,
        "python": sys.executable,
        **extra,
    }


def claimed_job(job_id: str, analysis_id: str, attempt: int) -> ClaimedJob:
    """A job as the claim returns it, for tests that drive the recorder or heartbeat directly."""
    now = datetime.now(UTC)
    return ClaimedJob(
        id=job_id, analysis_id=analysis_id, priority=0, parameters_json="{}", attempt=attempt, max_attempts=3,
        no_attempts_left=False,
        created_at_epoch=now.timestamp(), run_at_epoch=now.timestamp(), started_at=now, analysis_version=1,
        is_active=True, runtime="javascript",
        script_content="", script_name=None, timeout_ms=None, memory_limit_mb=None, retry_script_errors=False,
        dependencies_json=None,
    )  # fmt: skip
