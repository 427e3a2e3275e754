"""Pruner: retention of finished jobs.

Finished jobs created more than ``JOB_RETENTION_DAYS`` ago (0 = keep
forever) are deleted in small batches, so no long lock or vacuum storm
hits the queue. One replica at a time: the pass holds a PostgreSQL
advisory lock, and replicas that cannot take it skip their turn.
"""

from __future__ import annotations

import asyncio
import logging

from psycopg_pool import AsyncConnectionPool

from worker.config import Settings
from worker.queries import QUERIES

log = logging.getLogger(__name__)

PRUNE_LOCK_KEY = 0x616E_616C_7072_756E  # "analprun": shared by every replica
_BATCH = 1000
_MAX_BATCHES_PER_PASS = 100


class Pruner:
    """Deletes old finished jobs."""

    interval_seconds = 300.0

    def __init__(self, settings: Settings, db_pool: AsyncConnectionPool) -> None:
        self._settings = settings
        self._db_pool = db_pool

    async def prune_finished_jobs(self) -> int:
        """One pass; returns how many jobs were deleted (0 when another replica holds the lock)."""
        days = self._settings.job_retention_days
        if days <= 0:
            return 0
        deleted = 0
        async with self._db_pool.connection() as conn:
            got = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK_KEY,))).fetchone()
            if not got or not got[0]:
                return 0
            try:
                for _ in range(_MAX_BATCHES_PER_PASS):
                    cur = await conn.execute(QUERIES["prune_finished_jobs"], {"days": days, "batch": _BATCH})
                    deleted += cur.rowcount
                    if cur.rowcount < _BATCH:
                        break
                    await asyncio.sleep(0.05)  # let the queue breathe between batches
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK_KEY,))
        if deleted:
            log.info("retention: deleted %d finished job(s) older than %d days", deleted, days)
        return deleted
