"""Cancelling a running job: where the decision to stop one is made.

How a cancel travels:

1. Someone sets the job's row to ``cancelled`` (``analysis-executor cancel``,
   ``POST /jobs/{id}/cancel`` and plain SQL all run the same UPDATE,
   ``sql/cancel_job.sql``). The trigger ``analysis_jobs_on_cancel``
   (migration 0003) stamps the row and, if the job was running, sends
   ``NOTIFY analysis_jobs_cancel`` with its id.
2. The listener hands each such notification to ``Cancellations.hint``. It
   is only a hint — any session that can connect can send one — so it is
   acted on only for a job executing on this worker, and only once that
   job's row says ``cancelled`` (``sql/cancelled_jobs.sql``).
3. The heartbeat looks at the row of every job whose lease it could not
   renew, so a cancel whose notification was lost is found within one beat.
4. Either way the executor stops the job's execution (``Executor.interrupt``
   kills its process) and writes nothing: the row already says ``cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker.errors import one_line
from worker.model import Interruption
from worker.queries import QUERIES

log = logging.getLogger(__name__)


class Interruptible(Protocol):
    """What cancelling needs from the executor."""

    def is_executing(self, job_id: str) -> bool:
        """True while some attempt of the job runs here."""
        ...

    def interrupt(self, job_id: str, reason: Interruption, attempt: int | None = None) -> bool:
        """Stop the job's execution; False if it is not executing here."""
        ...


class Cancellations:
    """Turns cancel notifications into stopped jobs, for rows that really say ``cancelled``."""

    def __init__(self, db_pool: AsyncConnectionPool, executor: Interruptible) -> None:
        self._db_pool = db_pool
        self._executor = executor
        self._suspects: set[str] = set()
        self._checking: asyncio.Task[None] | None = None

    def hint(self, payload: str) -> None:
        """A cancel notification arrived; check the job's row if the job runs here.

        Payloads that are not a job id, and ids of jobs not executing on this
        worker, cost nothing. Hints that arrive while a check is under way are
        checked together right after it, so a flood of them costs one query
        at a time.
        """
        job_id = _job_id(payload)
        if job_id is None or not self._executor.is_executing(job_id):
            return
        self._suspects.add(job_id)
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check_suspects(), name="cancellation-check")

    async def _check_suspects(self) -> None:
        while self._suspects:
            ids = sorted(self._suspects)
            self._suspects.clear()
            try:
                async with self._db_pool.connection() as conn:
                    cur = await conn.execute(QUERIES["cancelled_jobs"], {"ids": ids})
                    cancelled = [job_id for (job_id,) in await cur.fetchall()]
            except (psycopg.Error, PoolTimeout) as exc:
                # The heartbeat looks at these rows again within one beat.
                log.warning("could not check %d cancel notification(s): %s", len(ids), one_line(exc))
                return
            for job_id in cancelled:
                if self._executor.interrupt(job_id, Interruption.CANCELLED):
                    log.info("Job %s was cancelled; its process was stopped", job_id, extra={"job_id": job_id})

    async def close(self) -> None:
        """Stop a check under way."""
        if self._checking is not None:
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)


def _job_id(payload: str) -> str | None:
    """The payload as a canonical job id, or None when it is not one."""
    try:
        return str(uuid.UUID(payload.strip()))
    except (ValueError, AttributeError):
        return None
