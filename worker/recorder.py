"""Recording: write finished jobs back to their rows, in batches, never dropping one.

Outcomes queue up while a write is in flight and go out together in one
statement (``sql/record_outcomes.sql``). Every write is fenced by the attempt this worker
claimed (see ``sql/record_outcomes.sql``). When the database is away the batch
is retried with backoff until it is back; a row the database refuses (bad
data) is written alone, as a failure that says why, and an outcome that
cannot even be turned into parameters fails its own job, never the batch.

A batch with large results (see ``worker.result_storage``) also stores them,
in the same transaction (``sql/store_results.sql``); a batch without any
costs nothing more than the one statement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import psycopg

from worker.db import DedicatedConnection
from worker.errors import one_line
from worker.lifecycle import ClaimedJob
from worker.metrics import Metrics
from worker.model import JobStatus, Outcome
from worker.queries import QUERIES
from worker.result_storage import CONTENT_TYPE, ResultStore, StoredResult

log = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 5.0
# PostgreSQL text cannot hold NUL, and jsonb refuses the \u0000 escape.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the job's row says now: its status (``pending`` when retried) and the outcome written."""

    status: JobStatus
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class _Pending:
    job: ClaimedJob
    outcome: Outcome
    retry: bool
    done: asyncio.Future[Recorded | None]
    stored: StoredResult | None = None  # the large result, prepared outside the row

    @property
    def key(self) -> tuple[str, int]:
        return (self.job.id, self.job.attempt)


class Recorder:
    """Queue of outcomes to write; ``record`` returns once its row was written (or fenced off)."""

    def __init__(self, database_url: str, worker_id: str, metrics: Metrics, results: ResultStore) -> None:
        self._conn = DedicatedConnection(database_url, "analysis-executor recorder")
        self._worker_id = worker_id
        self._metrics = metrics
        self._results = results
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.database_ok = True

    async def record(
        self, job: ClaimedJob, outcome: Outcome, *, retry: bool = False, stored: StoredResult | None = None
    ) -> Recorded | None:
        """Write the outcome; return what the row now says, or None if the job is no longer ours.

        The outcome written may differ from the one given: a row the
        database refuses is written as a failure that says why.

        With ``retry``, a job with attempts left goes back to 'pending' after a backoff.
        ``stored`` is the large result whose stub is the outcome's result
        (``ResultStore.prepare``); it is stored with the row, or its file is
        removed if the row is not written.
        """
        done: asyncio.Future[Recorded | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(job, outcome, retry, done, stored))
        return await done

    async def close(self) -> None:
        """Close the recorder's connection."""
        await self._conn.close()

    async def run(self) -> None:
        """Write batches until cancelled; a batch that cannot be written never stops the next one."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                written = await self._write_with_retry(batch)
            except Exception:
                # Unwritten rows stay 'running' and their leases expire: they are
                # rescued and run again, never lost.
                log.exception("could not record %d job outcome(s); their jobs will be rescued", len(batch))
                written = {}
            for item in batch:
                recorded = written.get(item.key)
                if item.stored is not None:
                    await self._settle_stored_result(item.stored, recorded.status if recorded else None)
                if not item.done.done():
                    item.done.set_result(recorded)

    async def _settle_stored_result(self, result: StoredResult, status: JobStatus | None) -> None:
        """Count a large result that was stored with its row; remove the file of one that was not.

        A write retried after a lost acknowledgement reports nothing for rows its
        first try did commit, so a file is removed only once the database says
        no row refers to it; when it cannot say, the file stays (an orphan file
        is better than a job whose result is gone).
        """
        if status == "completed":
            self._metrics.stored_result_size.observe(result.size_bytes)
            self._metrics.stored_result_written_bytes.labels(result.backend).inc(result.compressed_bytes)
            return
        if result.location is not None:
            try:
                conn = await self._conn.get()
                cur = await conn.execute(
                    QUERIES["stored_result_exists"], {"job_id": result.job_id, "location": result.location}
                )
                if await cur.fetchone() is not None:
                    return
            except psycopg.Error as exc:
                log.warning("Job %s: keeping result file %s (%s)", result.job_id, result.location, one_line(exc))
                return
        self._results.discard(result)

    async def _write_with_retry(self, batch: list[_Pending]) -> dict[tuple[str, int], Recorded]:
        batch = [_storable(item) for item in batch]
        backoff = 0.1
        while True:
            try:
                written = await self._write(batch)
            except psycopg.Error as exc:
                if not is_transient(exc):
                    self._metrics.database_errors.labels("record").inc()
                    log.warning(
                        "database refused a batch of %d outcome(s) (%s); writing them one by one", len(batch), exc
                    )
                    return await self._write_one_by_one(batch)
                await self._conn.discard()
                self.database_ok = False
                self._metrics.database_errors.labels("record").inc()
                delay = backoff * (1 + random.random())
                log.warning("could not record %d job(s) (%s); retrying in %.1fs", len(batch), one_line(exc), delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            self.database_ok = True
            return written

    async def _write(self, batch: list[_Pending]) -> dict[tuple[str, int], Recorded]:
        conn = await self._conn.get()
        large = [item.stored for item in batch if item.stored is not None]
        if not large:
            cur = await conn.execute(QUERIES["record_outcomes"], self._params(batch), prepare=True)
            return _recorded(batch, await cur.fetchall())
        # One transaction: a job row never points at a result that is not there.
        # store_results.sql stores exactly the results of the rows this update
        # completed, so a row's status says whether its result was stored.
        async with conn.transaction():
            cur = await conn.execute(QUERIES["record_outcomes"], self._params(batch), prepare=True)
            written = _recorded(batch, await cur.fetchall())
            await conn.execute(QUERIES["store_results"], self._storage_params(large))
        return written

    async def _write_one_by_one(self, batch: list[_Pending]) -> dict[tuple[str, int], Recorded]:
        stored: dict[tuple[str, int], Recorded] = {}
        for item in batch:
            try:
                stored |= await self._write_with_retry_single(item)
            except psycopg.Error as exc:
                replacement = _refused(item, f"the database refused the job's outcome: {one_line(exc)}")
                try:
                    stored |= await self._write_with_retry_single(replacement)
                except psycopg.Error as again:
                    log.error("Job %s: could not record its outcome (%s); it will be rescued", item.job.id, again)
        return stored

    async def _write_with_retry_single(self, item: _Pending) -> dict[tuple[str, int], Recorded]:
        """Write one outcome, retrying transient errors; raises the others."""
        backoff = 0.1
        while True:
            try:
                return await self._write([item])
            except psycopg.Error as exc:
                if not is_transient(exc):
                    raise
                await self._conn.discard()
                self._metrics.database_errors.labels("record").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    def _params(self, batch: list[_Pending]) -> dict[str, Any]:
        """The batch as one array per column, for record_outcomes.sql."""
        columns: dict[str, list[Any]] = {
            name: []
            for name in (
                "ids",
                "attempts",
                "statuses",
                "retry",
                "results",
                "errors",
                "stdouts",
                "stderrs",
                "exit_codes",
            )
        }
        for item in batch:
            outcome = item.outcome
            columns["ids"].append(item.job.id)
            columns["attempts"].append(item.job.attempt)
            columns["statuses"].append(outcome.status.value)
            columns["retry"].append(item.retry)
            columns["results"].append(outcome.result_json)
            columns["errors"].append(outcome.error_message)
            columns["stdouts"].append(outcome.stdout)
            columns["stderrs"].append(outcome.stderr)
            columns["exit_codes"].append(outcome.exit_code)
        return {**columns, "worker_id": self._worker_id}

    def _storage_params(self, results: list[StoredResult]) -> dict[str, Any]:
        """Large results as one array per column, for store_results.sql."""
        return {
            "job_ids": [r.job_id for r in results],
            "attempts": [r.attempt for r in results],
            "sizes": [r.size_bytes for r in results],
            "checksums": [r.checksum for r in results],
            "content_types": [CONTENT_TYPE] * len(results),
            "backends": [r.backend for r in results],
            "locations": [r.location for r in results],
            "contents": [r.content for r in results],
            "worker_id": self._worker_id,
        }


def is_transient(exc: psycopg.Error) -> bool:
    """Worth retrying as is: the connection broke, the server is restarting, or a deadlock/serialization abort."""
    state = exc.sqlstate or ""
    if not state:
        return isinstance(exc, psycopg.OperationalError)  # no SQLSTATE: lost before the server answered
    return state.startswith(("08", "40", "53", "57P")) or state == "55P03"


def _recorded(batch: list[_Pending], rows: list[tuple[Any, int, str]]) -> dict[tuple[str, int], Recorded]:
    """The written rows (id, attempts, status) as Recorded, keyed by (job id, attempt)."""
    outcomes = {item.key: item.outcome for item in batch}
    written = {}
    for job_id, attempt, status in rows:
        key = (str(job_id), attempt)
        written[key] = Recorded(JobStatus(status), outcomes[key])
    return written


def _storable(item: _Pending) -> _Pending:
    """The item with text PostgreSQL can store (no NUL, no lone surrogate), or a failure if even that fails."""
    outcome = item.outcome
    try:
        storable = dataclasses.replace(
            outcome,
            result_json=_storable_json(outcome.result_json),
            error_message=_text(outcome.error_message),
            stdout=_text(outcome.stdout) or "",
            stderr=_text(outcome.stderr) or "",
        )
    except Exception as exc:  # nothing about one outcome may cost the rest of the batch
        return _refused(item, f"the job's outcome could not be recorded: {type(exc).__name__}: {exc}")
    return dataclasses.replace(item, outcome=storable)


def _refused(item: _Pending, message: str) -> _Pending:
    """The item as a plain failure saying why its outcome was not written (output kept, shortened)."""
    outcome = item.outcome
    replacement = Outcome(
        JobStatus.FAILED,
        error_message=message,
        stdout=_text(outcome.stdout[:4096] if isinstance(outcome.stdout, str) else "") or "",
        stderr=_text(outcome.stderr[:4096] if isinstance(outcome.stderr, str) else "") or "",
        exit_code=outcome.exit_code if isinstance(outcome.exit_code, int) else None,
    )
    return _Pending(item.job, replacement, False, item.done)


def _text(value: str | None) -> str | None:
    """Make a string storable: no NUL, no lone surrogates (both become U+FFFD)."""
    if value is None:
        return None
    if value.isascii():
        return value.replace("\x00", "\ufffd")
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace").replace("\x00", "\ufffd")


def _storable_json(text: str | None) -> str | None:
    """JSON text jsonb accepts: an escaped NUL (``\\u0000``) becomes U+FFFD."""
    if text is None:
        return None
    text = _text(text) or ""
    return _JSON_NUL.sub(r"\1\\ufffd", text) if "\\u0000" in text else text
