-- depends: 0003_reliability
-- Schedules: cron expressions are validated when a schedule is written, and
-- every job a schedule enqueues names its schedule and tick, unique together,
-- so no tick can ever produce two jobs, whichever replicas enqueue it.
--
-- The database cannot evaluate cron: next_run_at IS NULL means "not computed
-- yet", and a worker sets it to the first tick after the moment the schedule
-- was armed (created, given a new cron expression or time zone, or resumed).

ALTER TABLE analysis_schedules
    ADD COLUMN catch_up text NOT NULL DEFAULT 'once'
        CONSTRAINT analysis_schedules_catch_up_check CHECK (catch_up IN ('once', 'all')),
    ADD COLUMN last_error text;

COMMENT ON COLUMN analysis_schedules.catch_up IS
    'After downtime: once = one job stands for every missed tick; all = one job per missed tick (a bounded batch per scheduler pass).';
COMMENT ON COLUMN analysis_schedules.next_run_at IS
    'The next tick to enqueue; NULL = a worker computes it (the first tick after the schedule was armed).';
COMMENT ON COLUMN analysis_schedules.last_run_at IS
    'When the scheduler last enqueued a job for this schedule (database clock).';
COMMENT ON COLUMN analysis_schedules.last_error IS
    'Why the last due tick got no job (inactive analysis, a schedule the worker cannot evaluate); NULL after a job.';

ALTER TABLE analysis_jobs
    ADD COLUMN schedule_id uuid REFERENCES analysis_schedules (id) ON DELETE SET NULL,
    ADD COLUMN scheduled_for timestamptz;

COMMENT ON COLUMN analysis_jobs.scheduled_for IS 'The schedule tick this job was enqueued for.';

-- One job per schedule and tick. Also serves the foreign key when a schedule is deleted.
CREATE UNIQUE INDEX analysis_jobs_schedule_tick_key
    ON analysis_jobs (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;

-- Raise check_violation for a cron expression the scheduler could not evaluate.
CREATE FUNCTION analysis_schedules_cron_error(expression text, reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'invalid cron expression "%": %', expression, reason
        USING ERRCODE = 'check_violation',
              HINT = 'Use 5 fields (minute hour day-of-month month day-of-week), 6 with a leading seconds field, '
                     'or @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly.';
END
$$;

-- One number (or month/day name) of a cron field, checked against the field's range.
CREATE FUNCTION analysis_schedules_cron_number(
    expression text, field text, token text, low integer, high integer, names text[]
) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    name_index integer := array_position(names, token);
BEGIN
    IF name_index IS NOT NULL THEN
        RETURN name_index - 1 + CASE WHEN field = 'month' THEN 1 ELSE 0 END;
    END IF;
    -- Separate IFs: a cast in the same expression as its guard may be evaluated first.
    IF token !~ '^[0-9]+$' THEN
        PERFORM analysis_schedules_cron_error(expression, format('%s "%s" is not a number%s', field, token,
            CASE field WHEN 'month' THEN ' or a month name (JAN-DEC)'
                       WHEN 'day-of-week' THEN ' or a day name (SUN-SAT)' ELSE '' END));
    END IF;
    IF token::numeric NOT BETWEEN low AND high THEN
        PERFORM analysis_schedules_cron_error(expression,
            format('%s %s is out of range %s-%s', field, token::numeric, low, high));
    END IF;
    RETURN token::integer;
END
$$;

-- The values one cron field allows, read the way the scheduler's cron library
-- (cronsim) reads it: *, N, N-M, lists, steps (*/S, N/S, N-M/S), month and day
-- names, L and LW in day-of-month, NL and N#K in day-of-week. The special
-- days (L, LW, NL, N#K) count as -1: they never make a day impossible.
CREATE FUNCTION analysis_schedules_cron_field(
    expression text, field text, spec text, low integer, high integer, names text[] DEFAULT '{}'
) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    items integer[];
    term text;
    first_value integer;
    last_value integer;
    suffix text;  -- what follows "#" or "/"
    step integer;
BEGIN
    IF spec = '*' THEN
        RETURN ARRAY(SELECT generate_series(low, high));
    END IF;
    IF strpos(spec, ',') > 0 THEN
        items := '{}';
        FOREACH term IN ARRAY string_to_array(spec, ',') LOOP
            items := items || analysis_schedules_cron_field(expression, field, term, low, high, names);
        END LOOP;
        RETURN items;
    END IF;
    IF field = 'day-of-week' AND strpos(spec, 'L') > 0 THEN
        IF left(spec, -1) !~ '^[0-9]+$' OR right(spec, 1) <> 'L' THEN
            PERFORM analysis_schedules_cron_error(expression,
                format('day-of-week "%s" is not valid: NL (a weekday number, then L) means the last such day of the month', spec));
        END IF;
        PERFORM analysis_schedules_cron_number(expression, field, left(spec, -1), low, high, names);
        RETURN ARRAY[-1];
    END IF;
    IF field = 'day-of-week' AND strpos(spec, '#') > 0 THEN
        suffix := substr(spec, strpos(spec, '#') + 1);
        IF suffix !~ '^0*[1-5]$' THEN
            PERFORM analysis_schedules_cron_error(expression,
                format('day-of-week "%s" is not valid: in N#K, K is the week of the month, 1 to 5', spec));
        END IF;
        PERFORM analysis_schedules_cron_number(expression, field, split_part(spec, '#', 1), low, high, names);
        RETURN ARRAY[-1];
    END IF;
    IF strpos(spec, '/') > 0 THEN
        suffix := substr(spec, strpos(spec, '/') + 1);
        IF suffix !~ '^[0-9]*[1-9][0-9]*$' THEN
            PERFORM analysis_schedules_cron_error(expression,
                format('%s step "%s" in "%s" must be a positive number', field, suffix, spec));
        END IF;
        step := least(suffix::numeric, 100)::integer;  -- any step over a field's size acts alike
        items := analysis_schedules_cron_field(expression, field, split_part(spec, '/', 1), low, high, names);
        IF items = ARRAY[-1] THEN
            RETURN items;
        END IF;
        IF cardinality(items) = 1 THEN
            RETURN ARRAY(SELECT generate_series(items[1], high, step));
        END IF;
        RETURN ARRAY(
            SELECT value FROM unnest(items) WITH ORDINALITY AS item (value, position)
            WHERE (position - 1) % step = 0
        );
    END IF;
    IF strpos(spec, '-') > 0 THEN
        first_value := analysis_schedules_cron_number(expression, field, split_part(spec, '-', 1), low, high, names);
        last_value := analysis_schedules_cron_number(expression, field, substr(spec, strpos(spec, '-') + 1), low, high, names);
        IF last_value < first_value THEN
            PERFORM analysis_schedules_cron_error(expression, format('%s range %s is backwards', field, spec));
        END IF;
        RETURN ARRAY(SELECT generate_series(first_value, last_value));
    END IF;
    IF field = 'day-of-month' AND spec IN ('L', 'LW') THEN
        RETURN ARRAY[-1];
    END IF;
    IF spec = '' THEN
        PERFORM analysis_schedules_cron_error(expression, format('%s has an empty value', field));
    END IF;
    RETURN ARRAY[analysis_schedules_cron_number(expression, field, spec, low, high, names)];
END
$$;

-- Accept exactly what the scheduler can evaluate; raise check_violation with
-- the reason otherwise.
CREATE FUNCTION analysis_schedules_validate_cron(expression text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    normalized text := upper(btrim(expression));
    fields text[];
    days integer[];
    months integer[];
    longest_month integer;
BEGIN
    IF left(normalized, 1) = '@' THEN
        IF lower(normalized) NOT IN ('@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly') THEN
            PERFORM analysis_schedules_cron_error(expression, format('unknown alias %s', lower(normalized)));
        END IF;
        RETURN;
    END IF;
    fields := regexp_split_to_array(normalized, '\s+');
    IF normalized = '' OR cardinality(fields) NOT IN (5, 6) THEN
        PERFORM analysis_schedules_cron_error(expression,
            format('expected 5 or 6 fields, found %s', CASE WHEN normalized = '' THEN 0 ELSE cardinality(fields) END));
    END IF;
    IF cardinality(fields) = 5 THEN
        fields := array_prepend('0', fields);
    END IF;
    PERFORM analysis_schedules_cron_field(expression, 'second', fields[1], 0, 59);
    PERFORM analysis_schedules_cron_field(expression, 'minute', fields[2], 0, 59);
    PERFORM analysis_schedules_cron_field(expression, 'hour', fields[3], 0, 23);
    days := analysis_schedules_cron_field(expression, 'day-of-month', fields[4], 1, 31);
    months := analysis_schedules_cron_field(expression, 'month', fields[5], 1, 12,
        '{JAN,FEB,MAR,APR,MAY,JUN,JUL,AUG,SEP,OCT,NOV,DEC}');
    PERFORM analysis_schedules_cron_field(expression, 'day-of-week', fields[6], 0, 7,
        '{SUN,MON,TUE,WED,THU,FRI,SAT}');
    -- Day-of-month and day-of-week both restrict when either starts with "*"
    -- (as in Debian cron); then a day no chosen month has can never happen.
    IF left(fields[4], 1) = '*' OR left(fields[6], 1) = '*' THEN
        SELECT max((ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[month]) INTO longest_month
        FROM unnest(months) AS month;
        IF (SELECT min(day) FROM unnest(days) AS day) > longest_month THEN
            PERFORM analysis_schedules_cron_error(expression,
                format('day-of-month %s never occurs in month %s', fields[4], fields[5]));
        END IF;
    END IF;
END
$$;

-- Validate cron expression and time zone on every write that changes them;
-- re-arm the schedule (next_run_at := NULL) when its timing changes or it is
-- resumed, unless the same statement sets next_run_at itself.
CREATE FUNCTION analysis_schedules_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.cron_expression IS NOT NULL
       AND (TG_OP = 'INSERT' OR NEW.cron_expression IS DISTINCT FROM OLD.cron_expression) THEN
        PERFORM analysis_schedules_validate_cron(NEW.cron_expression);
    END IF;
    IF NEW.timezone IS NOT NULL
       AND (TG_OP = 'INSERT' OR NEW.timezone IS DISTINCT FROM OLD.timezone)
       AND NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.timezone) THEN
        RAISE EXCEPTION 'unknown time zone "%": use an IANA name such as Europe/Berlin', NEW.timezone
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT name FROM pg_timezone_names lists the names this server knows.';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
        IF ((NEW.cron_expression, NEW.timezone) IS DISTINCT FROM (OLD.cron_expression, OLD.timezone)
            OR (NEW.is_active AND NOT OLD.is_active))
           AND NEW.next_run_at IS NOT DISTINCT FROM OLD.next_run_at THEN
            NEW.next_run_at := NULL;
            NEW.last_error := NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER analysis_schedules_check
    BEFORE INSERT OR UPDATE ON analysis_schedules
    FOR EACH ROW EXECUTE FUNCTION analysis_schedules_check();
