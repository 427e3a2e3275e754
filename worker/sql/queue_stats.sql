-- Queue depth for /metrics, from the partial indexes only: never a scan of
-- the finished history. The age is computed from epochs, so a run_at at
-- -infinity reads as an infinite age rather than an error.
SELECT
    (SELECT count(*) FROM analysis_jobs WHERE status = 'pending' AND run_at <= now()) AS pending_due,
    (SELECT count(*) FROM analysis_jobs WHERE status = 'pending' AND run_at > now()) AS pending_scheduled,
    (SELECT count(*) FROM analysis_jobs WHERE status = 'running') AS running,
    (SELECT (EXTRACT(EPOCH FROM now()) - EXTRACT(EPOCH FROM min(run_at)))::float8
       FROM analysis_jobs WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age_seconds
