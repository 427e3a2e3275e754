-- When the earliest pending job that is not yet due becomes due (NULL: none).
SELECT min(run_at) AS next_run_at
FROM analysis_jobs
WHERE status = 'pending'
  AND run_at > now()
