"""The worker's two-statement claim, on a plain (synchronous) connection, for tests and benchmarks."""

from __future__ import annotations

import contextlib

import psycopg
from psycopg.rows import class_row

from worker.lifecycle import ClaimedJob, in_claim_order, mark_running_params
from worker.queries import QUERIES


def claim_jobs(
    conn: psycopg.Connection, limit: int, worker_id: str, *, own_transaction: bool = True
) -> list[ClaimedJob]:
    """Lock and read up to ``limit`` due jobs, then mark them running, in one transaction.

    Without ``own_transaction`` the caller's transaction is used (no savepoint).
    """
    transaction = conn.transaction() if own_transaction else contextlib.nullcontext()
    with transaction, conn.cursor(row_factory=class_row(ClaimedJob)) as cur:
        jobs = in_claim_order(cur.execute(QUERIES["claim_jobs"], {"limit": limit}).fetchall())
        cur.execute(QUERIES["mark_jobs_running"], mark_running_params(jobs, worker_id))
        assert cur.rowcount == len(jobs)
    return jobs
