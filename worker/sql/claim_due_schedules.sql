-- Lock up to %(limit)s active schedules that are due, or whose next tick is not
-- computed yet (next_run_at IS NULL), for one scheduler pass. Replicas skip
-- each other's rows; a row another replica just advanced is re-checked and
-- dropped. %(now)s is NULL in production (the database clock); tests pass a
-- clock of their own.
SELECT schedule.id,
       schedule.cron_expression,
       schedule.timezone,
       schedule.catch_up,
       schedule.next_run_at,
       schedule.updated_at AS armed_at,
       schedule.last_error,
       analysis.is_active AS analysis_is_active,
       COALESCE(%(now)s::timestamptz, now()) AS now
FROM analysis_schedules AS schedule
JOIN analyses AS analysis ON analysis.id = schedule.analysis_id
WHERE schedule.is_active
  AND (schedule.next_run_at IS NULL OR schedule.next_run_at <= COALESCE(%(now)s::timestamptz, now()))
ORDER BY schedule.next_run_at NULLS FIRST
LIMIT %(limit)s
FOR NO KEY UPDATE OF schedule SKIP LOCKED
