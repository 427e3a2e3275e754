-- Seconds until the earliest pending job that is not yet due becomes due
-- (NULL: none). A number, not a timestamp, whatever a row holds.
SELECT EXTRACT(EPOCH FROM min(run_at) - now())::float8 AS seconds_until_due
FROM analysis_jobs
WHERE status = 'pending'
  AND run_at > now()
  AND isfinite(run_at)
