-- Submit a job, as the CLI and HTTP API do (the same INSERT a user would write).
INSERT INTO analysis_jobs (analysis_id, parameters, priority, run_at, triggered_by, max_attempts)
VALUES (%(analysis_id)s, %(parameters)s, %(priority)s, COALESCE(%(run_at)s, now()), %(triggered_by)s,
        COALESCE(%(max_attempts)s, 3))
RETURNING id
