-- Claim up to %(limit)s due pending jobs for one worker. The subquery with
-- LIMIT ... SKIP LOCKED picks them in claim order from the partial index
-- analysis_jobs_claim_idx; as an ARRAY(...) it runs once (an "id IN (subquery)"
-- may be re-run and take more than %(limit)s rows, PostgreSQL bug #15715) and
-- the rows are then fetched by primary key. Written so, the statement has one
-- good generic plan (the claim connection runs with plan_cache_mode =
-- force_generic_plan, so it is not planned again at every claim). Rows come back
-- in no particular order, with their priority for the worker to restore claim
-- order. Each job comes with its analysis and the analysis's declared
-- dependencies (NULL when it has none).
UPDATE analysis_jobs AS job
SET status = 'running',
    started_at = now(),
    heartbeat_at = now(),
    worker_id = %(worker_id)s,
    attempts = job.attempts + 1,
    analysis_version = analysis.version
FROM analyses AS analysis
WHERE job.id = ANY (ARRAY(
        SELECT id
        FROM analysis_jobs
        WHERE status = 'pending'
          AND run_at <= now()
        ORDER BY priority DESC, run_at, created_at
        LIMIT %(limit)s
        FOR NO KEY UPDATE SKIP LOCKED
    ))
  AND analysis.id = job.analysis_id
RETURNING
    job.id,
    job.priority,
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
