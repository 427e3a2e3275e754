-- Initial schema: analyses, their version history, jobs, schedules,
-- datasource dependencies and large-result storage.
--
-- The job channel: every INSERT statement that adds pending jobs sends one
-- NOTIFY on channel 'analysis_jobs_pending' (constant payload, so PostgreSQL
-- folds repeats within a transaction). Workers LISTEN on it.

CREATE TABLE analyses (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id      text NOT NULL DEFAULT 'default',
    title           text NOT NULL,
    description     text,
    runtime         text NOT NULL DEFAULT 'javascript'
                    CONSTRAINT analyses_runtime_check CHECK (runtime IN ('javascript', 'python')),
    script_content  text,
    script_name     text,
    is_active       boolean NOT NULL DEFAULT true,
    version         integer NOT NULL DEFAULT 1 CONSTRAINT analyses_version_check CHECK (version >= 1),
    timeout_ms      integer CONSTRAINT analyses_timeout_ms_check CHECK (timeout_ms > 0),
    memory_limit_mb integer CONSTRAINT analyses_memory_limit_mb_check CHECK (memory_limit_mb > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT analyses_script_for_runtime CHECK (
        (runtime = 'javascript' AND script_content IS NOT NULL)
        OR (runtime = 'python' AND script_name IS NOT NULL AND script_name <> '')
    )
);

CREATE INDEX analyses_project_idx ON analyses (project_id);

CREATE TABLE analysis_versions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    analysis_id     uuid NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    version         integer NOT NULL,
    runtime         text NOT NULL,
    script_content  text,
    script_name     text,
    created_at      timestamptz NOT NULL,
    superseded_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT analysis_versions_unique UNIQUE (analysis_id, version)
);

-- Changing what an analysis runs (runtime, script) keeps the old script in
-- analysis_versions and bumps version; any update refreshes updated_at.
-- version is owned by this trigger: a hand-written value is ignored.
CREATE FUNCTION analyses_record_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    NEW.version := OLD.version;
    IF (NEW.runtime, NEW.script_content, NEW.script_name)
       IS DISTINCT FROM (OLD.runtime, OLD.script_content, OLD.script_name) THEN
        INSERT INTO analysis_versions (analysis_id, version, runtime, script_content, script_name, created_at)
        VALUES (OLD.id, OLD.version, OLD.runtime, OLD.script_content, OLD.script_name, OLD.updated_at);
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER analyses_record_version
    BEFORE UPDATE ON analyses
    FOR EACH ROW EXECUTE FUNCTION analyses_record_version();

-- fillfactor leaves room on each page so status and heartbeat updates can
-- stay HOT; heartbeat_at is deliberately in no index for the same reason.
CREATE TABLE analysis_jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    analysis_id      uuid NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending'
                     CONSTRAINT analysis_jobs_status_check CHECK (
                         status IN ('pending', 'running', 'completed', 'failed', 'timeout', 'cancelled')),
    parameters       jsonb NOT NULL DEFAULT '{}'
                     CONSTRAINT analysis_jobs_parameters_is_object CHECK (jsonb_typeof(parameters) = 'object'),
    triggered_by     text NOT NULL DEFAULT 'sql',
    priority         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0 CONSTRAINT analysis_jobs_attempts_check CHECK (attempts >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CONSTRAINT analysis_jobs_max_attempts_check CHECK (max_attempts >= 1),
    result           jsonb,
    error_message    text,
    stdout           text,
    stderr           text,
    exit_code        integer,
    worker_id        text,
    heartbeat_at     timestamptz,
    analysis_version integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    duration_ms      bigint CONSTRAINT analysis_jobs_duration_check CHECK (duration_ms >= 0)
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05
);

-- The claim index: only pending rows, in claim order. Finished jobs leave it,
-- so a million completed rows cost a claim nothing.
CREATE INDEX analysis_jobs_claim_idx
    ON analysis_jobs (priority DESC, run_at, created_at)
    WHERE status = 'pending';

CREATE INDEX analysis_jobs_running_idx
    ON analysis_jobs (started_at)
    WHERE status = 'running';

CREATE INDEX analysis_jobs_created_at_idx ON analysis_jobs (created_at);

CREATE INDEX analysis_jobs_analysis_idx ON analysis_jobs (analysis_id);

CREATE FUNCTION analysis_jobs_notify_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted_jobs WHERE status = 'pending') THEN
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER analysis_jobs_notify_pending
    AFTER INSERT ON analysis_jobs
    REFERENCING NEW TABLE AS inserted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION analysis_jobs_notify_pending();

CREATE TABLE analysis_schedules (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    analysis_id      uuid NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    cron_expression  text NOT NULL,
    timezone         text NOT NULL DEFAULT 'UTC',
    parameters       jsonb NOT NULL DEFAULT '{}'
                     CONSTRAINT analysis_schedules_parameters_is_object CHECK (jsonb_typeof(parameters) = 'object'),
    is_active        boolean NOT NULL DEFAULT true,
    next_run_at      timestamptz,
    last_run_at      timestamptz,
    last_job_id      uuid REFERENCES analysis_jobs (id) ON DELETE SET NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX analysis_schedules_due_idx
    ON analysis_schedules (next_run_at)
    WHERE is_active;

CREATE INDEX analysis_schedules_analysis_idx ON analysis_schedules (analysis_id);

CREATE TABLE analysis_dependencies (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    analysis_id  uuid NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    name         text NOT NULL
                 CONSTRAINT analysis_dependencies_name_check CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    datasource   text NOT NULL DEFAULT 'main',
    query        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT analysis_dependencies_unique_name UNIQUE (analysis_id, name)
);

CREATE TABLE analysis_result_storage (
    job_id        uuid PRIMARY KEY REFERENCES analysis_jobs (id) ON DELETE CASCADE,
    size_bytes    bigint NOT NULL CONSTRAINT analysis_result_storage_size_check CHECK (size_bytes >= 0),
    checksum      text NOT NULL,
    content_type  text NOT NULL DEFAULT 'application/json',
    compression   text NOT NULL DEFAULT 'gzip'
                  CONSTRAINT analysis_result_storage_compression_check CHECK (compression IN ('none', 'gzip')),
    backend       text NOT NULL DEFAULT 'postgres'
                  CONSTRAINT analysis_result_storage_backend_check CHECK (backend IN ('postgres', 'filesystem')),
    location      text,
    content       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT analysis_result_storage_content_for_backend CHECK (
        (backend = 'postgres' AND content IS NOT NULL)
        OR (backend = 'filesystem' AND location IS NOT NULL)
    )
);
