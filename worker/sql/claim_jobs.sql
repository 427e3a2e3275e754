-- Claim up to %(limit)s due pending jobs for one worker, in claim order.
-- The CTE with LIMIT ... SKIP LOCKED (not "id IN (subquery)") guarantees no
-- more than %(limit)s rows are taken (PostgreSQL bug #15715), and it is served
-- by the partial index analysis_jobs_claim_idx. Each job comes back with its
-- analysis and the analysis's declared dependencies (NULL when it has none).
WITH due AS (
    SELECT id
    FROM analysis_jobs
    WHERE status = 'pending'
      AND run_at <= now()
    ORDER BY priority DESC, run_at, created_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE analysis_jobs AS job
SET status = 'running',
    started_at = now(),
    heartbeat_at = now(),
    worker_id = %(worker_id)s,
    attempts = job.attempts + 1,
    analysis_version = analysis.version
FROM due, analyses AS analysis
WHERE job.id = due.id
  AND analysis.id = job.analysis_id
RETURNING
    job.id,
    job.analysis_id,
    job.parameters::text AS parameters_json,
    job.attempts AS attempt,
    job.max_attempts,
    job.created_at,
    job.run_at,
    job.started_at,
    analysis.version AS analysis_version,
    analysis.is_active,
    analysis.runtime,
    analysis.script_content,
    analysis.script_name,
    analysis.timeout_ms,
    analysis.memory_limit_mb,
    analysis.retry_script_errors,
    (SELECT json_agg(json_build_object('name', dep.name, 'datasource', dep.datasource, 'query', dep.query)
                     ORDER BY dep.name)
     FROM analysis_dependencies AS dep
     WHERE dep.analysis_id = job.analysis_id)::text AS dependencies_json
