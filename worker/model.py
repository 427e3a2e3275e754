"""The values that cross the worker's modules: a job's statuses and the outcome of one attempt.

Dicts live only at the pipe to the pool children (``worker.runtimes.protocol``);
everything past it is an ``Outcome``, built by ``Outcome.from_message``, which
trusts nothing the child (or the script inside it) sent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

_INT32 = range(-(2**31), 2**31)
# Room above the output cap for the notes the runtimes append when they truncate.
_NOTE_ROOM = 1024
_TRUNCATED = "\n[output truncated by the worker: over the {limit} character limit (JOB_OUTPUT_MAX_BYTES)]\n"


class JobStatus(StrEnum):
    """The ``status`` column of ``analysis_jobs``."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class Interruption(StrEnum):
    """Why a running job's execution was stopped from outside (its process is killed)."""

    CANCELLED = "cancelled"  # a user cancelled it: the row already says 'cancelled'
    LEASE_LOST = "lease lost"  # the row is no longer ours: rescued, another attempt owns it now
    ROW_DELETED = "job row deleted"  # nothing left to record into
    SHUTDOWN = "shutdown"  # the grace period ran out: hand it back to 'pending'
    CLAIM_FAILED = "claim not committed"  # the claim's COMMIT failed: the row may not be ours


FINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELLED})
# What one attempt can end as (cancelled is decided by the database, never by a run).
_ATTEMPT_STATUSES = {status.value: status for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.TIMEOUT)}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt of a job ended, ready to be recorded.

    ``retryable`` marks a failure that was not the script's doing (a worker
    fault, an unreachable datasource): it is retried while attempts remain.
    """

    status: JobStatus
    result_json: str | None = None
    error_message: str | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    retryable: bool = False

    @classmethod
    def failure(cls, message: str, *, retryable: bool = False) -> Outcome:
        """A failed attempt with no output."""
        return cls(JobStatus.FAILED, error_message=message, retryable=retryable)

    def failed(self, message: str, *, retryable: bool = False) -> Outcome:
        """This outcome turned into a failure: no result, the output kept."""
        return dataclasses.replace(
            self, status=JobStatus.FAILED, result_json=None, error_message=message, retryable=retryable
        )

    def with_result(self, result_json: str) -> Outcome:
        """This outcome with another result (the stub of a result stored outside the row)."""
        return dataclasses.replace(self, result_json=result_json)

    @classmethod
    def from_message(cls, message: dict[str, Any], *, output_max_chars: int) -> Outcome:
        """Validate an outcome message from a pool child (or the pool itself).

        Every field is checked for its type and bounded in size: a script can
        reach the wrapper that writes these, so a malformed message fails its
        own job (saying so) and nothing else.
        """
        raw_status = message.get("status")
        status = _ATTEMPT_STATUSES.get(raw_status) if isinstance(raw_status, str) else None
        if status is None:
            return cls.failure(f"the pool child sent an unreadable outcome (status {message.get('status')!r:.40})")
        result_json = message.get("result_json")
        error_message = message.get("error_message")
        exit_code = message.get("exit_code")
        problems = []
        if result_json is not None and not isinstance(result_json, str):
            problems.append("result")
            result_json = None
        if error_message is not None and not isinstance(error_message, str):
            problems.append("error message")
            error_message = None
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            problems.append("exit code")
            exit_code = None
        elif exit_code is not None and exit_code not in _INT32:
            exit_code = None
        stdout = _bounded_text(message.get("stdout"), output_max_chars, problems, "stdout")
        stderr = _bounded_text(message.get("stderr"), output_max_chars, problems, "stderr")
        outcome = cls(
            status,
            result_json=result_json if status is JobStatus.COMPLETED else None,
            error_message=error_message,
            stdout=stdout,
            stderr=stderr,
            exit_code=exit_code,
            retryable=message.get("retryable") is True,
        )
        if problems:
            return outcome.failed(f"the job's runtime returned a malformed {', '.join(problems)}; the job was failed")
        return outcome


def _bounded_text(value: object, limit: int, problems: list[str], name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(name)
        return ""
    if len(value) <= limit + _NOTE_ROOM:
        return value
    return value[:limit] + _TRUNCATED.format(limit=limit)
