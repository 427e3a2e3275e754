"""Rescuer: give the jobs of vanished workers back to the queue.

Every worker runs it, with no leader: a job whose lease expired goes back to
``pending`` (after a backoff) while attempts remain, else ends ``failed``
with "worker lost". Registry rows of workers silent for several leases are
removed at the same time.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from worker.config import Settings
from worker.listener import Wakeups
from worker.queries import QUERIES

log = logging.getLogger(__name__)

_DEAD_WORKER_LEASES = 3


class Rescuer:
    """Returns orphaned jobs to the queue."""

    def __init__(self, settings: Settings, db_pool: AsyncConnectionPool, wakeups: Wakeups, rescued: Counter) -> None:
        self._settings = settings
        self._db_pool = db_pool
        self._wakeups = wakeups
        self._rescued = rescued

    @property
    def interval_seconds(self) -> float:
        """Half a lease: a dead worker's jobs are back within 1.5 leases of its last heartbeat."""
        return self._settings.job_lease_seconds / 2

    async def rescue_orphaned_jobs(self) -> None:
        """One pass: rescue expired leases, forget long-dead workers."""
        lease = self._settings.job_lease_seconds
        async with self._db_pool.connection() as conn:
            cur = await conn.execute(QUERIES["rescue_orphaned_jobs"], {"lease_seconds": lease})
            rescued = await cur.fetchall()
            await conn.execute(QUERIES["prune_dead_workers"], {"max_silence_seconds": lease * _DEAD_WORKER_LEASES})
        for job_id, status, attempts in rescued:
            self._rescued.labels(status).inc()
            log.warning(
                "Job %s rescued from a lost worker after attempt %d: now %s",
                job_id,
                attempts,
                status,
                extra={"job_id": str(job_id), "status": status},
            )
        if any(status == "pending" for _, status, _ in rescued):
            self._wakeups.wake("poll")
