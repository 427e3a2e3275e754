-- Of result files found on disk (location, job id, attempt), those nothing will
-- ever refer to: no stored result names them, and the attempt that wrote them
-- is not running any more (so cannot still be recording it). A worker that died
-- between writing a file and committing its row leaves such a file behind.
SELECT found.location
FROM unnest(%(locations)s::text[], %(job_ids)s::uuid[], %(attempts)s::int[]) AS found (location, job_id, attempt)
WHERE NOT EXISTS (
        SELECT 1 FROM analysis_result_storage AS stored
        WHERE stored.job_id = found.job_id AND stored.location = found.location
    )
  AND NOT EXISTS (
        SELECT 1 FROM analysis_jobs AS job
        WHERE job.id = found.job_id AND job.status = 'running' AND job.attempts = found.attempt
    )
