-- depends: 0005_result_storage
-- Submissions notify only when a worker is idle and waiting for work.
--
-- PostgreSQL serialises the commits of all transactions that sent a NOTIFY
-- (one cluster-wide lock), which capped concurrent single-row submitters at
-- about 40 % of their plain insert rate. A busy worker does not need to be
-- told about new jobs: it claims again whenever slots free up and the queue
-- had more. So a worker that runs out of work sets analysis_workers.waiting;
-- the first transaction that adds pending jobs clears every flag and sends
-- one NOTIFY; later submitters find no flag and send nothing.
--
-- The check runs at commit (a deferred constraint trigger, once per
-- transaction), so a transaction that stays open for long cannot miss a
-- worker that went idle meanwhile. One gap remains: a transaction that
-- checked just before a worker's flag became visible, and commits just
-- after that worker looked at the queue again. A shared advisory lock, held
-- from the check to the commit, closes it: a worker going idle sets its flag,
-- then waits until it can take the same lock exclusively (by then every
-- transaction that checked without seeing the flag has committed) and claims
-- once more. Transactions above READ COMMITTED read an older snapshot and
-- always notify.

ALTER TABLE analysis_workers
    ADD COLUMN waiting boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN analysis_workers.waiting IS
    'The worker is idle and wants a NOTIFY for the next pending job; cleared by the first transaction that adds one.';

DROP TRIGGER analysis_jobs_notify_pending ON analysis_jobs;
DROP FUNCTION analysis_jobs_notify_pending();

CREATE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Once per transaction, however many pending rows it inserted.
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN NULL;
    END IF;
    -- Held until this transaction commits; see worker/sql/wait_for_submitters.sql.
    PERFORM pg_advisory_xact_lock_shared(7310598114230005006);
    -- Reading first keeps the common case (nobody waiting) free of row locks.
    IF EXISTS (SELECT 1 FROM analysis_workers WHERE waiting) THEN
        UPDATE analysis_workers SET waiting = false WHERE waiting;
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER analysis_jobs_notify_pending
    AFTER INSERT ON analysis_jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION analysis_jobs_wake_idle_workers();
