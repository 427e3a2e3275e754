"""Every Prometheus metric the worker exports, defined once.

Metrics live in the worker's own memory (a registry per worker, so tests can
run several); the queue gauges are refreshed from the database on an
interval by ``refresh_queue_stats`` with index-only queries.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from .process_metrics import PoolChildrenCollector

PREFIX = "analysis_executor"

# The *_created series double every counter for no use on a dashboard.
disable_created_metrics()

# Edges just past the default JOB_TIMEOUT_MS (300 s): a job timed out at 300.2 s
# reads as <= 330 s, not anywhere up to 600 s.
_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240, 300, 330, 450, 600, 900
)  # fmt: skip
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
_RESULT_SIZE_BUCKETS = tuple(float(1 << shift) for shift in range(18, 31))  # 256 KiB .. 1 GiB
_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    """The worker's metrics, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_*: the worker's own CPU, memory, start time, open fds
        self.build_info = Info(f"{PREFIX}_build", "Version of the running worker.", registry=r)
        self.jobs_claimed = Counter(f"{PREFIX}_jobs_claimed", "Jobs claimed by this worker.", ["runtime"], registry=r)
        self.jobs_finished = Counter(
            f"{PREFIX}_jobs_finished",
            "Jobs this worker finished and recorded, by final status.",
            ["status", "runtime"],
            registry=r,
        )
        self.job_duration = Histogram(
            f"{PREFIX}_job_duration_seconds",
            "Wall-clock time from claim to recorded outcome, by runtime and the status recorded.",
            ["runtime", "status"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_job_queue_wait_seconds",
            "Time a job waited to start: started_at - max(created_at, run_at).",
            ["runtime"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.jobs_in_flight = Gauge(f"{PREFIX}_jobs_in_flight", "Jobs running on this worker now.", registry=r)
        self.pool_size = Gauge(
            f"{PREFIX}_pool_size", "Jobs this worker may run at once (MAX_CONCURRENT_JOBS).", registry=r
        )
        self.pool_processes = Gauge(f"{PREFIX}_pool_processes", "Pool child processes (POOL_PROCESSES).", registry=r)
        self.pool_restarts = Counter(
            f"{PREFIX}_pool_child_restarts",
            "Pool child processes replaced, by reason (timeout, crash, cancelled).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Jobs in the queue by state: pending (due), scheduled (future run_at), running.",
            ["status"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            f"{PREFIX}_oldest_pending_job_age_seconds",
            "Age of the oldest due pending job (0 when none).",
            registry=r,
        )
        self.queue_stats_refreshed = Gauge(
            f"{PREFIX}_queue_stats_last_refresh_timestamp_seconds",
            "When the queue gauges were last read from the database (Unix time): they keep their"
            " last value while it cannot be read.",
            registry=r,
        )
        self.jobs_rescued = Counter(
            f"{PREFIX}_jobs_rescued",
            "Jobs of lost workers this worker's rescuer took back, by the status they got"
            " (pending: retried; failed: no attempts left).",
            ["status"],
            registry=r,
        )
        self.wakeups = Counter(
            f"{PREFIX}_wakeups",
            "Claim wake-ups by source (notify, poll, timer, startup, slot).",
            ["source"],
            registry=r,
        )
        self.database_errors = Counter(
            f"{PREFIX}_database_errors", "Failed database operations, by operation.", ["operation"], registry=r
        )
        self.listener_connected = Gauge(
            f"{PREFIX}_listener_connected", "1 while the LISTEN connection is up.", registry=r
        )
        self.dependency_duration = Histogram(
            f"{PREFIX}_dependency_query_duration_seconds",
            "Time to run one datasource dependency query and read its rows, by datasource.",
            ["datasource"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.dependency_errors = Counter(
            f"{PREFIX}_dependency_errors",
            "Dependency queries that failed (error, timeout, row cap, unreachable), by datasource.",
            ["datasource"],
            registry=r,
        )
        self.schedule_lag = Histogram(
            f"{PREFIX}_schedule_lag_seconds",
            "How late scheduled jobs were enqueued: the pass's now - the tick (scheduled_for).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.scheduled_jobs = Counter(
            f"{PREFIX}_scheduled_jobs_enqueued", "Jobs this worker enqueued for schedule ticks.", registry=r
        )
        self.schedule_skips = Counter(
            f"{PREFIX}_schedule_skips",
            "Due schedules advanced with fewer jobs than ticks, by reason "
            "(missed_window: one job for a missed window; analysis_inactive; invalid_schedule: paused).",
            ["reason"],
            registry=r,
        )
        self.stored_result_size = Histogram(
            f"{PREFIX}_stored_result_size_bytes",
            "Uncompressed size of each result stored outside its job row (over RESULT_INLINE_MAX_BYTES).",
            buckets=_RESULT_SIZE_BUCKETS,
            registry=r,
        )
        self.stored_result_written_bytes = Counter(
            f"{PREFIX}_stored_result_written_bytes",
            "Compressed bytes of large results written to the result storage, by backend (postgres, filesystem).",
            ["backend"],
            registry=r,
        )
        self.up = Gauge(f"{PREFIX}_up", "1 while the worker runs and its database is reachable.", registry=r)
        # Every label value exists from the start, so rate() and alerts see 0, not "no data".
        for status in ("pending", "scheduled", "running"):
            self.queue_depth.labels(status)
        for status in ("pending", "failed"):
            self.jobs_rescued.labels(status)
        for runtime in ("javascript", "python"):
            self.jobs_claimed.labels(runtime)
            # pending: an attempt that failed and was retried
            for status in ("completed", "failed", "timeout", "cancelled", "pending"):
                self.jobs_finished.labels(status, runtime)
        for source in ("notify", "poll", "timer", "startup", "slot"):
            self.wakeups.labels(source)
        for operation in ("claim", "record", "listen", "queue_stats", "heartbeat", "rescuer", "pruner", "scheduler"):
            self.database_errors.labels(operation)
        for reason in ("timeout", "crash", "cancelled"):
            self.pool_restarts.labels(reason)
        for reason in ("missed_window", "analysis_inactive", "invalid_schedule"):
            self.schedule_skips.labels(reason)
        for backend in ("postgres", "filesystem"):
            self.stored_result_written_bytes.labels(backend)

    def watch_pool(self, slot_pids: Callable[[], list[tuple[int, int]]]) -> None:
        """Export the CPU and memory of the pool children that ``slot_pids`` lists."""
        self.registry.register(PoolChildrenCollector(PREFIX, slot_pids))
