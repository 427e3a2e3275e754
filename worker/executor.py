"""The executor loop: claim as many jobs as there are free slots, run them, record them.

Woken by ``Wakeups`` (notification, poll, timer, start-up, a slot freeing up
while more work is waiting), it claims in one transaction
(``sql/claim_jobs.sql``, ``sql/mark_jobs_running.sql``), hands each job to
the process pool and passes the outcome to the recorder. A job holds its
slot until its outcome is written, so a worker never has more than
``MAX_CONCURRENT_JOBS`` rows ``running``.

A running job can be stopped from outside: cancelled by a user, taken away
when its lease was lost, or killed at the end of a shutdown's grace period.
Only its execution is interrupted (the pool kills its process); what happens
to the row then depends on why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from worker.config import Settings
from worker.datasources import (
    Datasources,
    DependencyError,
    parse_dependencies,
    rows_to_json_value,
    unrepresentable_value,
)
from worker.db import DedicatedConnection
from worker.errors import one_line
from worker.jobs import MAX_PARAMETER_DEPTH, NESTED_TOO_DEEPLY, PARAMETERS_TOO_DEEP, json_depth
from worker.lifecycle import ClaimedJob, JobLifecycle, in_claim_order, mark_running_params
from worker.listener import Wakeups
from worker.metrics import Metrics
from worker.model import Interruption, JobStatus, Outcome
from worker.pool import PoolClosed, ProcessPool
from worker.queries import JOBS_PENDING_CHANNEL, QUERIES
from worker.recorder import Recorded, Recorder
from worker.result_storage import ResultStore
from worker.runtimes.python import ScriptNotAllowed, ScriptWhitelist

log = logging.getLogger(__name__)

_CLAIM_RETRY_SECONDS = 1.0
# A claim's COMMIT normally takes milliseconds; its jobs wait for it, holding their slots.
_CLAIM_COMMIT_TIMEOUT_SECONDS = 30.0
# Handing jobs back never waits long for row locks (an uncommitted claim may hold them).
_RELEASE_LOCK_TIMEOUT = "5s"
_RECORD_AT_SHUTDOWN_SECONDS = 10.0
# psycopg spends up to 5 s sending a cancel request and 5 s more waiting for it to land.
_GIVE_UP_CLAIM_SECONDS = 10.0
# Retry delays while submitters finish committing (see _announce_waiting).
_SETTLE_FIRST_DELAY_SECONDS = 0.0005
_SETTLE_MAX_DELAY_SECONDS = 0.02
# A worker that claimed a full batch looks again this soon when few slots free up.
_BACKLOG_RECHECK_SECONDS = 0.05

# Pipeline mode (libpq 14 or later) lets a claim's jobs start before its commit is flushed.
_PIPELINES = psycopg.AsyncPipeline.is_supported()


class _Claim:
    """The commit of one claim, which its jobs wait for before anything of theirs leaves the worker."""

    def __init__(self) -> None:
        self._done = asyncio.Event()
        self.committed = False

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    def settle(self, *, committed: bool) -> None:
        self.committed = committed
        self._done.set()

    async def wait(self) -> bool:
        """True once the claim committed; False if it did not."""
        await self._done.wait()
        return self.committed


class Executor:
    """Claims and runs jobs until ``stop_claiming`` is called."""

    def __init__(
        self,
        settings: Settings,
        db_pool: AsyncConnectionPool,
        process_pool: ProcessPool,
        recorder: Recorder,
        results: ResultStore,
        whitelist: ScriptWhitelist,
        datasources: Datasources,
        wakeups: Wakeups,
        lifecycle: JobLifecycle,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._db_pool = db_pool
        self._pool = process_pool
        self._recorder = recorder
        self._results = results
        self._whitelist = whitelist
        self._datasources = datasources
        self._wakeups = wakeups
        self._lifecycle = lifecycle
        self._metrics = metrics
        # The claim's statements are written to have one good generic plan (see
        # sql/claim_jobs.sql): planning them at every claim cost more than running them.
        self._claim_conn = DedicatedConnection(
            settings.database_url, "analysis-executor claims", {"plan_cache_mode": "force_generic_plan"}
        )
        # Keyed by (job id, attempt): this worker may hold a rescued job's new
        # attempt while its old one is still being stopped.
        self._running: dict[tuple[str, int], tuple[ClaimedJob, asyncio.Task[None]]] = {}
        self._executing: dict[tuple[str, int], tuple[ClaimedJob, asyncio.Task[None]]] = {}
        self._interrupted: dict[tuple[str, int], Interruption] = {}
        self._released: list[ClaimedJob] = []
        # Started while their claim's COMMIT is still on its way (see _claim_and_start).
        self._unconfirmed: set[tuple[str, int]] = set()
        self._releasing: set[asyncio.Task[None]] = set()  # hand-backs of claims that may not have committed
        self._claiming = True
        self._claim_finished = asyncio.Event()  # clear while run() is in a claim
        self._claim_finished.set()
        self._run_task: asyncio.Task[None] | None = None
        self._backlog = False
        # With a backlog, refill in batches rather than one claim per finished job:
        # a claim costs a commit, whatever its size.
        self._refill_at = max(1, settings.concurrency // 4)
        self.database_ok = True

    @property
    def in_flight(self) -> int:
        """Jobs claimed by this worker and not yet recorded."""
        return len(self._running)

    def executing(self) -> list[ClaimedJob]:
        """The jobs whose scripts are running right now."""
        return [job for job, _ in self._executing.values()]

    def held(self) -> list[ClaimedJob]:
        """Every job this worker claimed (and committed the claim of) and has not recorded yet."""
        return [job for key, (job, _) in self._running.items() if key not in self._unconfirmed]

    async def run(self) -> None:
        """Claim on every wake-up until claiming stops."""
        self._run_task = asyncio.current_task()
        while self._claiming:
            await self._wakeups.wait()
            if self._claiming:
                self._claim_finished.clear()
                try:
                    await self.claim_and_dispatch()
                finally:
                    self._claim_finished.set()

    def stop_claiming(self) -> None:
        """Claim nothing more; running jobs carry on."""
        self._claiming = False
        self._wakeups.wake("startup")  # unblock run() so it can return

    async def claim_and_dispatch(self) -> int:
        """Claim up to the free slots and start them; return how many were claimed."""
        free = self._settings.concurrency - len(self._running)
        if free <= 0:
            self._backlog = True
            return 0
        try:
            jobs = await self._claim_and_start(free)
            self._backlog = len(jobs) == free
            if not self._backlog and self._wakeups.announce_idle and self._settings.listen and self._claiming:
                # Out of work: ask submitters to notify us, then look once more
                # for jobs committed by those that checked before they could see it.
                self._wakeups.announce_idle = False
                await self._announce_waiting()
                jobs += await self._claim_and_start(free - len(jobs))
                self._backlog = len(jobs) == free
            if not self._backlog:
                await self._set_timer_for_next_due_job()
        except psycopg.Error as exc:
            await self._claim_conn.discard()
            self._wakeups.announce_idle = True  # the announcement may not have happened
            # Only a lost connection means the database is away; any other error is ours to report.
            self.database_ok = not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            self._metrics.database_errors.labels("claim").inc()
            log.warning("claim failed (%s); retrying in %.0fs", one_line(exc), _CLAIM_RETRY_SECONDS)
            self._wakeups.wake_at(_CLAIM_RETRY_SECONDS)
            return 0
        self.database_ok = True
        return len(jobs)

    async def _claim_and_start(self, limit: int) -> list[ClaimedJob]:
        """Claim up to ``limit`` due jobs and start them; return them.

        A claim is two statements in one transaction: claim_jobs.sql locks
        the jobs and reads them, mark_jobs_running.sql marks them running.
        Both are sent in a pipeline, the second (and the Sync that commits)
        only after the first's rows are read, so JavaScript jobs are already
        in their children (and jobs' read-only dependency queries under way)
        while the UPDATE runs and its COMMIT's WAL flush completes: most of a
        claim's time. A JavaScript script has no effect but its result, which
        is recorded only after the commit; a Python script, which can act on
        the world, starts only then. If the claim does not commit (or we
        cannot tell: an error, a timeout, a cancellation), its jobs are
        stopped and dropped, the connection is closed before psycopg's
        pipeline exit could send a committing Sync, and the rows are handed
        back in case they were committed after all.
        """
        conn = await self._claim_conn.get()
        claim = _Claim()
        jobs: list[ClaimedJob] = []
        try:
            if not _PIPELINES:
                async with conn.transaction(), conn.cursor(row_factory=class_row(ClaimedJob)) as cur:
                    await cur.execute(QUERIES["claim_jobs"], {"limit": limit}, prepare=True)
                    jobs = in_claim_order(await cur.fetchall())
                    if jobs:
                        mark = mark_running_params(jobs, self._settings.worker_id)
                        await cur.execute(QUERIES["mark_jobs_running"], mark, prepare=True)
                        _check_marked(jobs, cur.rowcount)
                claim.settle(committed=True)
                self._start(jobs, claim)
                self._lifecycle.claimed(jobs)
                return jobs
            async with conn.pipeline() as pipeline:
                try:
                    async with conn.cursor(row_factory=class_row(ClaimedJob)) as cur:
                        await cur.execute(QUERIES["claim_jobs"], {"limit": limit}, prepare=True)
                        jobs = in_claim_order(await cur.fetchall())
                        if jobs:
                            self._start(jobs, claim)
                            await asyncio.sleep(0)  # let the job tasks hand their scripts to the pool,
                            self._pool.send_waiting()  # which sends them before the UPDATE and the commit
                            mark = mark_running_params(jobs, self._settings.worker_id)
                            await cur.execute(QUERIES["mark_jobs_running"], mark, prepare=True)
                        # Commits (raising the server's error if it cannot).
                        async with asyncio.timeout(_CLAIM_COMMIT_TIMEOUT_SECONDS):  # no extra task, unlike wait_for
                            await pipeline.sync()
                        if jobs:
                            _check_marked(jobs, cur.rowcount)
                except BaseException:
                    # Leaving the pipeline would send a Sync, which commits: close first.
                    self._claim_conn.abandon()
                    raise
            claim.settle(committed=True)
            self._lifecycle.claimed(jobs)
            return jobs
        except TimeoutError:
            raise psycopg.OperationalError(
                f"the claim did not commit within {_CLAIM_COMMIT_TIMEOUT_SECONDS:.0f}s; connection closed"
            ) from None
        finally:
            if not claim.settled:
                claim.settle(committed=False)
                for job in jobs:
                    self.interrupt(job.id, Interruption.CLAIM_FAILED, job.attempt)
                if jobs:
                    # Harmless if the claim rolled back (fenced by worker, attempt and claim).
                    task = asyncio.create_task(self._release(jobs), name="release-uncommitted-claim")
                    task.add_done_callback(_log_unexpected_error)
                    task.add_done_callback(self._releasing.discard)
                    self._releasing.add(task)
            for job in jobs:
                self._unconfirmed.discard((job.id, job.attempt))

    async def _announce_waiting(self) -> None:
        """Set this worker's waiting flag; return once no submitter can have missed it.

        Submitters hold an advisory lock shared from their idle-worker check
        to their commit (migrations 0006, 0008); once it can be taken exclusively,
        every submitter that checked before the flag was visible has
        committed, so the claim that follows sees its jobs. The lock is only
        tried, never waited for, so a worker never stalls submitters; if it
        stays busy, another wake-up (or the poll) announces again.
        """
        conn = await self._claim_conn.get()
        cur = await conn.execute(QUERIES["announce_waiting"], {"worker_id": self._settings.worker_id}, prepare=True)
        if cur.rowcount == 0:  # our registry row is gone (re-created by the next heartbeat): try again later
            self._wakeups.announce_idle = True
            return
        delay = _SETTLE_FIRST_DELAY_SECONDS
        give_up = time.monotonic() + self._settings.poll_interval_ms / 1000
        while True:
            cur = await conn.execute(QUERIES["submitters_settled"], prepare=True)
            row = await cur.fetchone()
            if row is not None and row[0]:
                return
            if self._wakeups.pending or time.monotonic() + delay > give_up:
                self._wakeups.announce_idle = True  # not settled yet: the next short claim tries again
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _SETTLE_MAX_DELAY_SECONDS)

    def _start(self, jobs: list[ClaimedJob], claim: _Claim) -> None:
        self._lifecycle.started(jobs)
        for job in jobs:
            task = asyncio.create_task(self._run_job(job, claim), name=f"job-{job.id}")
            task.add_done_callback(_log_unexpected_error)
            self._running[(job.id, job.attempt)] = (job, task)
            if not claim.settled:
                self._unconfirmed.add((job.id, job.attempt))

    async def _set_timer_for_next_due_job(self) -> None:
        conn = await self._claim_conn.get()
        cur = await conn.execute(QUERIES["next_run_at"], prepare=True)
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            self._wakeups.wake_at(row[0])

    def is_executing(self, job_id: str) -> bool:
        """True while some attempt of the job runs its script here."""
        return any(key[0] == job_id for key in self._executing)

    def interrupt(self, job_id: str, reason: Interruption, attempt: int | None = None) -> bool:
        """Stop a job's execution (kills its process); False if it is not executing here.

        Without ``attempt``, every attempt of the job executing here is stopped.
        """
        stopped = False
        for key, (_, task) in list(self._executing.items()):
            if key[0] == job_id and attempt in (None, key[1]):
                self._interrupted[key] = reason
                task.cancel()
                stopped = True
        return stopped

    async def _run_job(self, job: ClaimedJob, claim: _Claim) -> None:
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        # While the job executes, cancelling this task stops it; once it has an
        # outcome the task leaves _executing and nothing can interrupt the write.
        key = (job.id, job.attempt)
        self._executing[key] = (job, task)
        try:
            try:
                outcome = await self._execute(job, claim)
            except asyncio.CancelledError:
                reason = self._interrupted.pop(key, None)
                if reason is None:
                    raise  # cancelled for another reason (the worker is stopping): let it go
                task.uncancel()
                self._executing.pop(key, None)
                self._after_interruption(job, reason, time.monotonic() - started)
                return
            except PoolClosed:
                raise  # the worker is stopping without a drain: the lease returns the job
            except Exception as exc:
                # A fault of ours, not the script's: record it now (retried like any
                # infrastructure failure) rather than leave the row 'running' until
                # its lease runs out.
                log.exception("Job %s: internal error in the worker", job.id, extra={"job_id": job.id})
                outcome = Outcome.failure(f"internal error in the worker: {type(exc).__name__}: {exc}", retryable=True)
            self._executing.pop(key, None)
            if not await claim.wait():
                self._lifecycle.interrupted(job, Interruption.CLAIM_FAILED)
                return
            # Past this point nothing interrupts the job: a large result's file,
            # once written, is either recorded or removed by the recorder.
            outcome, large = await self._results.prepare(job.id, job.attempt, outcome)
            recorded = await self._recorder.record(job, outcome, retry=self._should_retry(job, outcome), stored=large)
            self._lifecycle.finished(job, recorded, seconds=time.monotonic() - started)
        finally:
            self._executing.pop(key, None)
            self._running.pop(key, None)
            free = self._settings.concurrency - len(self._running)
            if self._backlog and self._claiming:
                if free >= self._refill_at:
                    self._wakeups.wake("slot")
                else:
                    # The last full claim may have emptied the queue exactly: look
                    # again soon rather than only when a quarter of the slots are free.
                    self._wakeups.wake_at(_BACKLOG_RECHECK_SECONDS)

    def _after_interruption(self, job: ClaimedJob, reason: Interruption, seconds: float) -> None:
        if reason is Interruption.SHUTDOWN:
            self._released.append(job)
            self._lifecycle.interrupted(job, "released at shutdown")
        elif reason is Interruption.CANCELLED:
            self._lifecycle.finished(job, Recorded(JobStatus.CANCELLED, _CANCELLED), seconds=seconds)
        else:
            self._lifecycle.interrupted(job, reason)

    def _should_retry(self, job: ClaimedJob, outcome: Outcome) -> bool:
        if outcome.retryable:
            return True
        return job.retry_script_errors and outcome.status in (JobStatus.FAILED, JobStatus.TIMEOUT)

    async def _execute(self, job: ClaimedJob, claim: _Claim) -> Outcome:
        if job.no_attempts_left:
            return Outcome.failure(
                f"no attempts left: this would have been attempt {job.attempt} of {job.max_attempts} (max_attempts)"
            )
        if not job.is_active:
            return Outcome.failure(f"analysis {job.analysis_id} is inactive (is_active = false)")
        script_path = None
        if job.runtime == "python":
            try:
                script_path = str(self._whitelist.resolve(job.script_name))
            except ScriptNotAllowed as exc:
                return Outcome.failure(str(exc))
        elif job.runtime != "javascript":
            return Outcome.failure(f"unknown runtime {job.runtime!r}")
        try:
            datasets = await self._fetch_datasets(job)
            message = self._job_message(job, datasets)
        except DependencyError as exc:
            return Outcome.failure(str(exc), retryable=exc.retryable)
        if script_path is not None:
            message["script_path"] = script_path
            if not await claim.wait():  # dropped by _run_job: the job is not ours
                return Outcome.failure(Interruption.CLAIM_FAILED)
        reply = await self._pool.run(message)
        return Outcome.from_message(reply, output_max_chars=self._settings.output_max_bytes)

    async def _fetch_datasets(self, job: ClaimedJob) -> dict[str, Any] | None:
        """Rows of the analysis's declared dependencies, or None when it declares none."""
        dependencies = parse_dependencies(job.dependencies_json)
        if not dependencies:
            return None
        try:
            parameters = json.loads(job.parameters_json)
            too_deep = json_depth(parameters) > MAX_PARAMETER_DEPTH
        except RecursionError:
            too_deep = True
        if too_deep:  # binding them (as jsonb) would recurse deeper still
            raise DependencyError(f"the job's {PARAMETERS_TOO_DEEP}: too deep to bind into its dependencies' queries")
        if job.runtime == "python" and "datasets" in parameters:
            raise DependencyError(
                "the job has a parameter named 'datasets', which a Python script with dependencies "
                "receives its datasets under: rename the parameter"
            )
        timeout_ms = job.timeout_ms or self._settings.default_timeout_ms
        return await self._datasources.fetch(dependencies, parameters, timeout_ms)

    def _job_message(self, job: ClaimedJob, datasets: dict[str, Any] | None) -> dict[str, Any]:
        settings = self._settings
        context = {
            "jobId": job.id,
            "analysisId": job.analysis_id,
            "attempt": job.attempt,
            "analysisVersion": job.analysis_version,
            # A Python script reads its datasets from stdin only: do not send them twice.
            "datasets": datasets if datasets is not None and job.runtime == "javascript" else {},
        }
        message = {
            "job_id": job.id,
            "analysis_id": job.analysis_id,
            "runtime": job.runtime,
            "source": job.script_content or "",
            "parameters_json": job.parameters_json,
            "context_json": _datasets_json(context, datasets or {}),
            "timeout_ms": job.timeout_ms or settings.default_timeout_ms,
            "memory_limit_mb": job.memory_limit_mb or settings.default_memory_limit_mb,
            "stack_limit_kb": settings.js_stack_limit_kb,
            "output_max_bytes": settings.output_max_bytes,
            "result_max_bytes": settings.result_max_bytes,
            "python": settings.python_executable,
        }
        if datasets is not None and job.runtime == "python":
            message["stdin_json"] = _datasets_json({**json.loads(job.parameters_json), "datasets": datasets}, datasets)
        return message

    async def drain(self, grace_seconds: float) -> None:
        """Let running jobs finish within the grace period, then kill the rest and hand them back.

        Called after ``stop_claiming``: a claim already on its way still
        brings its jobs, which get the same grace as the others.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        try:
            await asyncio.wait_for(self._claim_finished.wait(), grace_seconds)
        except TimeoutError:
            await self._give_up_claim()
        if self._running:
            remaining = max(0.0, deadline - loop.time())
            log.info("waiting up to %.0fs for %d running job(s) to finish", remaining, len(self._running))
            await asyncio.wait([task for _, task in self._running.values()], timeout=remaining)
        for job_id, attempt in list(self._executing):
            self.interrupt(job_id, Interruption.SHUTDOWN, attempt)
        if self._running:
            # Outcomes already produced still get written, briefly; anything
            # left unwritten is rescued by the lease once we are gone.
            await asyncio.wait([task for _, task in self._running.values()], timeout=_RECORD_AT_SHUTDOWN_SECONDS)
        for job, _ in self._running.values():
            log.warning("Job %s: outcome not recorded before shutdown; the lease will return it to the queue", job.id)
        await self._release(self._released)

    async def _give_up_claim(self) -> None:
        """Stop the claim still on its way at the end of the grace period.

        Its jobs could not be recorded before it commits anyway: it is
        cancelled (rolled back, the connection closed), its jobs are stopped
        and handed back in case it committed after all.
        """
        if self._run_task is None or self._run_task.done():
            return
        log.warning("claiming did not finish within the grace period; stopping it (an uncommitted claim rolls back)")
        self._run_task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._claim_finished.wait(), _GIVE_UP_CLAIM_SECONDS)

    async def _release(self, jobs: list[ClaimedJob]) -> None:
        """Hand unfinished jobs back to ``pending`` without spending an attempt."""
        if not jobs:
            return
        params = {
            "ids": [job.id for job in jobs],
            "attempts": [job.attempt for job in jobs],
            "started_ats": [job.started_at for job in jobs],
            "worker_id": self._settings.worker_id,
        }
        try:
            async with self._db_pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT set_config('lock_timeout', %s, true)", (_RELEASE_LOCK_TIMEOUT,))
                cur = await conn.execute(QUERIES["release_jobs"], params)
                released = cur.rowcount
                if released:
                    await conn.execute(f"NOTIFY {JOBS_PENDING_CHANNEL}")
        except psycopg.Error as exc:
            log.error("could not hand %d job(s) back to the queue (their leases will expire): %s", len(jobs), exc)
            return
        if released:
            log.info("handed %d unfinished job(s) back to the queue", released)

    async def close(self) -> None:
        """Finish handing back jobs of failed claims (briefly), then close the claim connection."""
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=_RECORD_AT_SHUTDOWN_SECONDS)
        await self._claim_conn.close()


def _datasets_json(value: dict[str, Any], datasets: dict[str, list[dict[str, Any]]]) -> str:
    """JSON for the script, with database types (numeric, timestamps, bytea, ...) converted."""
    try:
        return json.dumps(value, default=rows_to_json_value, allow_nan=False)
    except ValueError:  # NaN or Infinity in a float column: JSON has no such numbers
        raise DependencyError(unrepresentable_value(datasets)) from None
    except RecursionError:
        raise DependencyError(f"a dependency returned a JSON value {NESTED_TOO_DEEPLY}") from None


_CANCELLED = Outcome(JobStatus.CANCELLED, error_message="cancelled")


def _log_unexpected_error(task: asyncio.Task[None]) -> None:
    """A job task must never fail silently: its row would wait for the rescuer unexplained."""
    if not task.cancelled() and task.exception() is not None:
        log.error("unexpected error in %s", task.get_name(), exc_info=task.exception())


def _check_marked(jobs: list[ClaimedJob], marked: int) -> None:
    """Every locked job was marked running (they are locked: nothing else can have changed them)."""
    if marked != len(jobs):
        raise psycopg.OperationalError(f"the claim marked {marked} of {len(jobs)} locked jobs running")
