"""Job messages as the executor sends them to a pool child, for tests that drive the pool directly."""

from __future__ import annotations

import sys
from typing import Any


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
