SELECT job.id, analysis.title, job.status, job.triggered_by, job.attempts, job.created_at, job.duration_ms,
       left(job.error_message, 80) AS error
FROM analysis_jobs AS job
JOIN analyses AS analysis ON analysis.id = job.analysis_id
WHERE %(status)s::text IS NULL OR job.status = %(status)s
ORDER BY job.created_at DESC
LIMIT %(limit)s
