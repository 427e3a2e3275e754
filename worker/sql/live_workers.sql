SELECT id, host, pid, version, concurrency, started_at, last_seen_at, jobs_processed, draining,
       (SELECT count(*) FROM analysis_jobs AS job WHERE job.status = 'running' AND job.worker_id = w.id) AS running_jobs
FROM analysis_workers AS w
ORDER BY started_at
