"""Job lifecycle events, published by the executor and the recorder.

Logs and metrics subscribe here, so the claim -> run -> record path only
says what happened, once, and neither concern clutters it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.metrics import Metrics
from worker.model import JobStatus

if TYPE_CHECKING:
    from worker.recorder import Recorded

log = logging.getLogger("worker.jobs")


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker claimed: the row as the claim statement returned it."""

    id: str
    analysis_id: str
    priority: int
    parameters_json: str
    attempt: int
    max_attempts: int
    no_attempts_left: bool
    created_at_epoch: float  # seconds since 1970, +-inf for a timestamp at infinity
    run_at_epoch: float
    started_at: datetime
    analysis_version: int
    is_active: bool
    runtime: str
    script_content: str | None
    script_name: str | None
    timeout_ms: int | None
    memory_limit_mb: int | None
    retry_script_errors: bool
    dependencies_json: str | None

    @property
    def queue_wait_seconds(self) -> float:
        """started_at - max(created_at, run_at): never negative, 0 when a timestamp is at infinity."""
        wait = self.started_at.timestamp() - max(self.created_at_epoch, self.run_at_epoch)
        return wait if 0.0 < wait < math.inf else 0.0


def mark_running_params(jobs: list[ClaimedJob], worker_id: str) -> dict[str, Any]:
    """Parameters of mark_jobs_running.sql, the claim's second statement, for these locked jobs."""
    return {
        "worker_id": worker_id,
        "ids": [job.id for job in jobs],
        "analysis_versions": [job.analysis_version for job in jobs],
    }


def in_claim_order(jobs: list[ClaimedJob]) -> list[ClaimedJob]:
    """The claimed jobs in the order the claim picked them (claim_jobs.sql returns them unordered).

    Its rows are read straight into ``ClaimedJob`` (``class_row``): the columns are named after the fields.
    """
    jobs.sort(key=lambda job: (-job.priority, job.run_at_epoch, job.created_at_epoch))
    return jobs


class JobLifecycle:
    """Turns lifecycle events into log lines and metric updates."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.jobs_processed = 0
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled child of a metric, looked up once (labels() is slow in the hot path)."""
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, jobs: list[ClaimedJob]) -> None:
        """Jobs were claimed and are about to run (their claim may still be committing)."""
        if jobs:
            log.debug("Found %d pending jobs", len(jobs))
        self._metrics.jobs_in_flight.inc(len(jobs))

    def claimed(self, jobs: list[ClaimedJob]) -> None:
        """The claim of these jobs committed: they are this worker's."""
        for job in jobs:
            self._child(self._metrics.jobs_claimed, job.runtime).inc()
            self._child(self._metrics.queue_wait, job.runtime).observe(job.queue_wait_seconds)

    def finished(self, job: ClaimedJob, recorded: Recorded | None, *, seconds: float) -> None:
        """A job's attempt ended: ``recorded`` is what its row now says (None: fenced off, nothing written)."""
        self._metrics.jobs_in_flight.dec()
        context: dict[str, Any] = {"job_id": job.id, "analysis_id": job.analysis_id, "attempt": job.attempt}
        if recorded is None:
            log.warning(
                "Job %s: outcome discarded: the job is no longer held by this worker (attempt %d)",
                job.id,
                job.attempt,
                extra=context,
            )
            return
        self.jobs_processed += 1
        status = recorded.status
        self._child(self._metrics.jobs_finished, status, job.runtime).inc()
        self._child(self._metrics.job_duration, job.runtime, status).observe(seconds)
        context.update(status=status.value, runtime=job.runtime, duration_ms=round(seconds * 1000, 3))
        error = (recorded.outcome.error_message or recorded.outcome.status).splitlines()[0]
        if status is JobStatus.COMPLETED:
            log.info("Job %s completed successfully", job.id, extra=context)
        elif status is JobStatus.CANCELLED:
            log.info("Job %s cancelled", job.id, extra=context)
        elif status is JobStatus.PENDING:
            log.info(
                "Job %s failed: %s (will retry: attempt %d of %d)",
                job.id,
                error,
                job.attempt,
                job.max_attempts,
                extra=context,
            )
        else:
            ended = "timed out" if status is JobStatus.TIMEOUT else "failed"
            log.info("Job %s %s: %s", job.id, ended, error, extra=context)

    def interrupted(self, job: ClaimedJob, reason: str) -> None:
        """A job's execution was stopped and nothing was recorded for it by us."""
        self._metrics.jobs_in_flight.dec()
        log.warning("Job %s stopped: %s", job.id, reason, extra={"job_id": job.id, "analysis_id": job.analysis_id})
