SELECT id, analysis_id, status, parameters, triggered_by, priority, run_at, attempts, max_attempts,
       result, error_message, stdout, stderr, exit_code, worker_id, heartbeat_at, analysis_version,
       created_at, started_at, completed_at, duration_ms
FROM analysis_jobs
WHERE id = %(id)s
