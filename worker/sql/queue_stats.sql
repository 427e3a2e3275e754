-- Queue depth for /metrics, from the partial indexes only: never a scan of
-- the finished history.
SELECT
    (SELECT count(*) FROM analysis_jobs WHERE status = 'pending' AND run_at <= now()) AS pending_due,
    (SELECT count(*) FROM analysis_jobs WHERE status = 'pending' AND run_at > now()) AS pending_scheduled,
    (SELECT count(*) FROM analysis_jobs WHERE status = 'running') AS running,
    (SELECT EXTRACT(EPOCH FROM now() - min(run_at))
       FROM analysis_jobs WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age_seconds
