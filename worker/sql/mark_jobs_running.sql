-- Claim, part 2 of 2: mark the jobs claim_jobs.sql locked as running on this
-- worker, in the same transaction (its now() is part 1's). Nobody else can
-- have changed them: they are locked, so the worker only checks the row count.
-- The arrays go in binary format (no per-element quoting on the client).
UPDATE analysis_jobs AS job
SET status = 'running',
    started_at = now(),
    heartbeat_at = now(),
    worker_id = %(worker_id)s,
    attempts = LEAST(job.attempts, 2147483646) + 1,  -- as claim_jobs.sql counts it
    analysis_version = claimed.analysis_version
FROM unnest(%(ids)b::uuid[], %(analysis_versions)b::int[]) AS claimed (id, analysis_version)
WHERE job.id = claimed.id
