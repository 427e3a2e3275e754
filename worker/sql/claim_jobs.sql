-- Claim up to %(limit)s due pending jobs, part 1 of 2: lock them and read
-- what running them takes. The rows are locked in claim order from the partial
-- index analysis_jobs_claim_idx (LIMIT ... SKIP LOCKED) and read as locked: a
-- job changed meanwhile is read as it is now. Each comes with its analysis and
-- the analysis's declared dependencies (NULL when it has none). The locking
-- subquery is planned on its own, so the statement has one good generic plan
-- (the claim connection runs with plan_cache_mode = force_generic_plan); rows
-- come back in no particular order, with what the worker needs to restore
-- claim order. Timestamps the worker only compares come as epoch seconds
-- (float8, which holds +-Infinity): no value in a row can make the claim fail
-- to load it. Part 2, mark_jobs_running.sql, marks them running in
-- the same transaction: the worker can start a JavaScript job as soon as these
-- rows arrive, without waiting for that UPDATE (nor for the commit).
SELECT
    job.id::text AS id,
    job.priority,
    job.analysis_id::text AS analysis_id,
    job.parameters::text AS parameters_json,
    LEAST(job.attempts, 2147483646) + 1 AS attempt,  -- a row at the integer limit still claims (and fails)
    job.max_attempts,
    job.attempts >= job.max_attempts AS no_attempts_left,  -- a hand-written row may say so: it must not run
    EXTRACT(EPOCH FROM job.created_at)::float8 AS created_at_epoch,
    EXTRACT(EPOCH FROM job.run_at)::float8 AS run_at_epoch,
    now() AS started_at,
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
FROM (
    SELECT id, priority, analysis_id, parameters, attempts, max_attempts, created_at, run_at
    FROM analysis_jobs
    WHERE status = 'pending'
      AND run_at <= now()
    ORDER BY priority DESC, run_at, created_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
) AS job
-- LATERAL with OFFSET 0: each job's analysis by primary key, never a scan of
-- every analysis (which a generic plan's guess at the LIMIT would pick).
CROSS JOIN LATERAL (
    SELECT version, is_active, runtime, script_content, script_name, timeout_ms, memory_limit_mb,
           retry_script_errors
    FROM analyses
    WHERE analyses.id = job.analysis_id
    OFFSET 0
) AS analysis
