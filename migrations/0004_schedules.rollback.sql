DROP TRIGGER analysis_schedules_check ON analysis_schedules;
DROP FUNCTION analysis_schedules_check();
DROP FUNCTION analysis_schedules_validate_cron(text);
DROP FUNCTION analysis_schedules_cron_field(text, text, text, integer, integer, text[]);
DROP FUNCTION analysis_schedules_cron_number(text, text, text, integer, integer, text[]);
DROP FUNCTION analysis_schedules_cron_error(text, text);
DROP INDEX analysis_jobs_schedule_tick_key;
ALTER TABLE analysis_jobs DROP COLUMN scheduled_for, DROP COLUMN schedule_id;
ALTER TABLE analysis_schedules DROP COLUMN last_error, DROP COLUMN catch_up;
