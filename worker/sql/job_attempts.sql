SELECT attempt, worker_id, started_at, finished_at, outcome, error_message
FROM analysis_job_attempts
WHERE job_id = %(id)s
ORDER BY attempt
