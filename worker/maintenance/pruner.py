"""Pruner: retention of finished jobs, and deletion of result files nothing refers to.

Finished jobs created more than ``JOB_RETENTION_DAYS`` ago (0 = keep
forever) are deleted in small batches, so no long lock or vacuum storm
hits the queue; their attempts and stored results go with them by foreign
key. One replica at a time: the pass holds a PostgreSQL advisory lock, and
replicas that cannot take it skip their turn.

Result files (``RESULT_STORAGE=filesystem``) whose rows were deleted — by
retention, by a user deleting jobs or analyses, or replaced by a later
attempt — are queued by a trigger in ``analysis_result_file_deletions``;
the same pass deletes those files, then forgets them. Every few hours it
also looks in the folder for files no row will ever name: written by a
worker that died before recording them (or a write it did not finish).
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from psycopg_pool import AsyncConnectionPool

from worker.config import Settings
from worker.queries import QUERIES
from worker.result_storage import ResultStore, old_files

log = logging.getLogger(__name__)

PRUNE_LOCK_KEY = 0x616E_616C_7072_756E  # "analprun": shared by every replica
_BATCH = 1000
_MAX_BATCHES_PER_PASS = 100
# Looking through the storage folder for files no row will ever name: this often
# per replica, among files untouched for a day (a result is recorded seconds after
# its file is written; a file whose attempt is still running is kept regardless).
_UNRECORDED_SWEEP_SECONDS = 6 * 3600
_UNRECORDED_MIN_AGE_SECONDS = 24 * 3600


class Pruner:
    """Deletes old finished jobs and orphaned result files."""

    interval_seconds = 300.0

    def __init__(self, settings: Settings, db_pool: AsyncConnectionPool, results: ResultStore) -> None:
        self._settings = settings
        self._db_pool = db_pool
        self._results = results
        self._next_unrecorded_sweep = 0.0  # time.monotonic(); the first pass looks

    async def prune_finished_jobs(self) -> int:
        """One pass; returns how many jobs were deleted (0 when another replica holds the lock).

        A result file that exists but cannot be deleted stays queued, for a later
        attempt (with a growing delay); the other files are deleted meanwhile.
        """
        days = self._settings.job_retention_days
        deleted = 0
        async with self._db_pool.connection() as conn:
            got = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK_KEY,))).fetchone()
            if not got or not got[0]:
                return 0
            try:
                if days > 0:
                    deleted = await self._delete_old_jobs(conn, days)
                folder_there = self._results.storage_dir is not None and await self._delete_orphaned_result_files(conn)
                if folder_there and time.monotonic() >= self._next_unrecorded_sweep:
                    await self._delete_unrecorded_result_files(conn)
                    self._next_unrecorded_sweep = time.monotonic() + _UNRECORDED_SWEEP_SECONDS
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK_KEY,))
        if deleted:
            log.info("retention: deleted %d finished job(s) older than %d days", deleted, days)
        return deleted

    async def _delete_old_jobs(self, conn: psycopg.AsyncConnection, days: int) -> int:
        deleted = 0
        for _ in range(_MAX_BATCHES_PER_PASS):
            cur = await conn.execute(QUERIES["prune_finished_jobs"], {"days": days, "batch": _BATCH})
            deleted += cur.rowcount
            if cur.rowcount < _BATCH:
                break
            await asyncio.sleep(0.05)  # let the queue breathe between batches
        return deleted

    async def _delete_orphaned_result_files(self, conn: psycopg.AsyncConnection) -> bool:
        """Work through the deletion queue; False (and nothing done) when the storage folder is missing."""
        folder = self._results.storage_dir
        assert folder is not None
        if not await asyncio.to_thread(folder.is_dir):
            # Unmounted or gone: every file would look already deleted and be
            # forgotten, then left behind once the volume is back.
            log.warning("retention: result storage folder %s is not there; deleting no result files", folder)
            return False
        removed = 0
        for _ in range(_MAX_BATCHES_PER_PASS):
            cur = await conn.execute(QUERIES["result_files_to_delete"], {"batch": _BATCH})
            locations = [location for (location,) in await cur.fetchall()]
            if not locations:
                break
            # Files first, then the queue rows: a crash in between only repeats a deletion.
            failed = await asyncio.to_thread(self._results.delete_files, locations)
            done = [location for location in locations if location not in failed]
            await conn.execute(QUERIES["forget_result_file_deletions"], {"locations": done})
            if failed:
                # Retried later; the rest of the queue does not wait for them.
                await conn.execute(
                    QUERIES["postpone_result_file_deletions"],
                    {"locations": list(failed), "errors": list(failed.values())},
                )
                location, reason = next(iter(failed.items()))
                log.warning(
                    "retention: could not delete %d result file(s), e.g. %s (%s); will try again later",
                    len(failed),
                    location,
                    reason,
                )
            removed += len(done)
            if len(locations) < _BATCH:
                break
        if removed:
            log.info("retention: deleted %d result file(s) no job refers to any more", removed)
        return True

    async def _delete_unrecorded_result_files(self, conn: psycopg.AsyncConnection) -> None:
        """Delete old files that no stored result names and no running attempt can still record."""
        folder = self._results.storage_dir
        assert folder is not None
        limit = _BATCH * _MAX_BATCHES_PER_PASS  # the rest waits for the next sweep
        cutoff = time.time() - _UNRECORDED_MIN_AGE_SECONDS
        found, temporary = await asyncio.to_thread(old_files, folder, cutoff, limit)
        unrecorded: list[str] = []
        for start in range(0, len(found), _BATCH):
            batch = found[start : start + _BATCH]
            params = {
                "locations": [file.location for file in batch],
                "job_ids": [file.job_id for file in batch],
                "attempts": [file.attempt for file in batch],
            }
            cur = await conn.execute(QUERIES["unrecorded_result_files"], params)
            unrecorded += [location for (location,) in await cur.fetchall()]
        # A handed-back job's next claim reuses its attempt's file name: a file
        # rewritten since the scan is that attempt's, and stays.
        failed = await asyncio.to_thread(
            self._results.delete_files, unrecorded + temporary, unless_modified_since=cutoff
        )
        deleted = len(unrecorded) + len(temporary) - len(failed)
        if deleted:
            log.info("retention: deleted %d result file(s) that no job ever recorded", deleted)
        if failed:
            location, reason = next(iter(failed.items()))
            log.warning(
                "retention: could not delete %d unrecorded result file(s), e.g. %s (%s)", len(failed), location, reason
            )
