"""Every SQL statement the worker runs, one named ``.sql`` file each.

The files live in ``worker/sql/``; ``QUERIES["claim_jobs"]`` is the text of
``claim_jobs.sql``. Keeping SQL out of the Python code lets a DBA review it
in one place and lets tests EXPLAIN exactly what production runs.
"""

from __future__ import annotations

from importlib.resources import files
from types import MappingProxyType

# NOTIFY channels, shared with the migrations' triggers.
JOBS_PENDING_CHANNEL = "analysis_jobs_pending"  # payload '': new pending jobs
JOBS_CANCEL_CHANNEL = "analysis_jobs_cancel"  # payload: id of a running job that was cancelled
JOBS_FINISHED_CHANNEL = "analysis_jobs_finished"  # payload: {"id": ..., "status": ...}


def _load_queries() -> MappingProxyType[str, str]:
    folder = files("worker") / "sql"
    return MappingProxyType(
        {
            entry.name.removesuffix(".sql"): entry.read_text()
            for entry in folder.iterdir()
            if entry.name.endswith(".sql")
        }
    )


QUERIES = _load_queries()
