-- Store the large results of a batch outside their job rows, in the same
-- transaction as record_outcomes.sql and right after it. Fenced the same
-- way: a result is stored only for a job that this worker's attempt has just
-- completed, so a fenced-off attempt stores nothing. A later attempt's
-- result replaces an earlier one (the replaced file, if any, is queued for
-- deletion by a trigger, see migration 0005).
INSERT INTO analysis_result_storage AS storage
    (job_id, size_bytes, checksum, content_type, compression, backend, location, content)
SELECT r.job_id, r.size_bytes, r.checksum, r.content_type, 'gzip', r.backend, r.location, r.content
FROM unnest(
    %(job_ids)s::uuid[], %(attempts)s::int[], %(sizes)s::bigint[], %(checksums)s::text[],
    %(content_types)s::text[], %(backends)s::text[], %(locations)s::text[], %(contents)b::bytea[]
) AS r (job_id, attempt, size_bytes, checksum, content_type, backend, location, content)
JOIN analysis_jobs AS job ON job.id = r.job_id AND job.attempts = r.attempt
WHERE job.status = 'completed'
  AND job.worker_id = %(worker_id)s
ON CONFLICT (job_id) DO UPDATE
SET size_bytes = EXCLUDED.size_bytes,
    checksum = EXCLUDED.checksum,
    content_type = EXCLUDED.content_type,
    compression = EXCLUDED.compression,
    backend = EXCLUDED.backend,
    location = EXCLUDED.location,
    content = EXCLUDED.content,
    created_at = now()
