SELECT schedule.id, analysis.title AS analysis, schedule.analysis_id, schedule.cron_expression, schedule.timezone,
       schedule.catch_up, schedule.is_active, schedule.next_run_at, schedule.last_run_at, schedule.last_job_id,
       schedule.last_error
FROM analysis_schedules AS schedule
JOIN analyses AS analysis ON analysis.id = schedule.analysis_id
ORDER BY schedule.created_at, schedule.id
