"""Background duties, one module each: heartbeat, rescuer, pruner, scheduler.

Every duty is a coroutine run on an interval by ``run_periodically``; an
exception in one pass is logged and counted, and the next pass runs as
usual, so one duty's trouble never stops another.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import psycopg
from psycopg_pool import PoolTimeout

from worker.metrics import Metrics

log = logging.getLogger(__name__)


async def run_periodically(
    name: str, interval_seconds: float, duty: Callable[[], Awaitable[None]], metrics: Metrics
) -> None:
    """Run ``duty`` every interval (with ±10 % jitter so replicas spread out), forever."""
    while True:
        await asyncio.sleep(interval_seconds * random.uniform(0.9, 1.1))
        try:
            await duty()
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            metrics.database_errors.labels(name).inc()
            log.warning("%s: %s", name, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        except Exception:
            log.exception("%s failed; it will run again in %.0fs", name, interval_seconds)
