-- The same INSERT a user would write; the trigger validates expression and zone.
INSERT INTO analysis_schedules (analysis_id, cron_expression, timezone, parameters, catch_up)
VALUES (%(analysis_id)s, %(cron_expression)s, %(timezone)s, %(parameters)s, %(catch_up)s)
RETURNING id, updated_at
