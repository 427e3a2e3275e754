-- Record one scheduler pass: each claimed schedule's next tick, whether it
-- stays active (a schedule the worker cannot evaluate is paused), its last
-- enqueued job and why a due tick got no job (NULL when one did).
UPDATE analysis_schedules AS schedule
SET next_run_at = pass.next_run_at,
    is_active = pass.is_active,
    last_run_at = COALESCE(pass.last_run_at, schedule.last_run_at),
    last_job_id = COALESCE(pass.last_job_id, schedule.last_job_id),
    last_error = pass.last_error
FROM unnest(
    %(ids)s::uuid[],
    %(next_run_at)s::timestamptz[],
    %(is_active)s::boolean[],
    %(last_run_at)s::timestamptz[],
    %(last_job_id)s::uuid[],
    %(last_error)s::text[]
) AS pass (id, next_run_at, is_active, last_run_at, last_job_id, last_error)
WHERE schedule.id = pass.id
