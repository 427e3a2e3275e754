-- depends: 0001_initial_schema
-- The worker's timer asks when the next future job becomes due, and /metrics
-- asks for the oldest due job: both answered from pending rows only.
CREATE INDEX analysis_jobs_pending_run_at_idx
    ON analysis_jobs (run_at)
    WHERE status = 'pending';
