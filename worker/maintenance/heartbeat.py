"""Heartbeat: renew this worker's leases and registry row; notice jobs that are no longer ours.

One statement renews ``heartbeat_at`` of every job this worker is running;
it skips rows another transaction holds locked rather than wait for them.
A job missing from its answer that is no longer this attempt's was
cancelled, rescued after a lost lease, or deleted: its process is killed at
once (the poll-side fallback to the cancel notification). One that is still
this attempt's was only locked: its lease is renewed at the first beat after
the lock is released, and a warning says so once half of it is spent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from psycopg_pool import AsyncConnectionPool

from worker import __version__
from worker.config import Settings
from worker.executor import Executor
from worker.lifecycle import JobLifecycle
from worker.model import Interruption
from worker.queries import QUERIES

log = logging.getLogger(__name__)


class Heartbeat:
    """Lease renewal plus the workers-registry row of this worker."""

    def __init__(
        self,
        settings: Settings,
        db_pool: AsyncConnectionPool,
        executor: Executor,
        lifecycle: JobLifecycle,
        is_draining: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._db_pool = db_pool
        self._executor = executor
        self._lifecycle = lifecycle
        self._is_draining = is_draining

    @property
    def interval_seconds(self) -> float:
        """Well inside the lease, and no slower than the fallback poll (it doubles as the cancel check)."""
        return min(self._settings.job_lease_seconds / 3, self._settings.poll_interval_ms / 1000)

    def _registry_row(self) -> dict[str, object]:
        return {
            "id": self._settings.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "concurrency": self._settings.concurrency,
            "jobs_processed": self._lifecycle.jobs_processed,
            "draining": self._is_draining(),
        }

    async def register(self) -> None:
        """Add this worker to the registry."""
        async with self._db_pool.connection() as conn:
            await conn.execute(QUERIES["register_worker"], self._registry_row())

    async def deregister(self) -> None:
        """Remove this worker from the registry (clean shutdown)."""
        async with self._db_pool.connection() as conn:
            await conn.execute(QUERIES["deregister_worker"], {"id": self._settings.worker_id})

    async def beat(self) -> None:
        """Renew leases, refresh the registry row, stop jobs that are no longer ours."""
        # Jobs still being recorded keep their lease too (unless the write holds
        # their rows locked right now), or a slow write after a database outage
        # would race the rescuer.
        jobs = self._executor.held()
        ids = [job.id for job in jobs]
        async with self._db_pool.connection() as conn:
            async with conn.transaction():
                await conn.execute(QUERIES["touch_worker"], self._registry_row())
                renewed: set[tuple[str, int]] = set()
                if ids:
                    cur = await conn.execute(
                        QUERIES["renew_leases"],
                        {"ids": ids, "attempts": [job.attempt for job in jobs], "worker_id": self._settings.worker_id},
                    )
                    renewed = {(str(row[0]), row[1]) for row in await cur.fetchall()}
            lost = [job for job in jobs if (job.id, job.attempt) not in renewed]
            if not lost:
                return
            cur = await conn.execute(QUERIES["job_owners"], {"ids": [job.id for job in lost]})
            rows = {row[0]: row[1:] for row in await cur.fetchall()}
        lease = self._settings.job_lease_seconds
        for job in lost:
            job_id = job.id
            status, worker_id, attempts, lease_age = rows.get(job_id, (None, None, None, None))
            if (status, worker_id, attempts) == ("running", self._settings.worker_id, job.attempt):
                # Still ours, only locked by another transaction: renewed once it lets go.
                if lease_age is not None and lease_age > lease / 2:
                    log.warning(
                        "Job %s: its row has been locked by another transaction for a while; its lease was "
                        "last renewed %.0fs ago and runs out after %.0fs, when the job may be rescued",
                        job_id,
                        lease_age,
                        lease,
                        extra={"job_id": job_id},
                    )
                continue
            if status == "cancelled":
                reason = Interruption.CANCELLED
            else:
                reason = Interruption.LEASE_LOST if status else Interruption.ROW_DELETED
            # Only the attempt that lost its lease: a newer one of the same job may run here too.
            if self._executor.interrupt(job_id, reason, job.attempt):
                log.warning("Job %s is no longer held by this worker (%s); its process was stopped", job_id, reason)
