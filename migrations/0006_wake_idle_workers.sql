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
-- worker that went idle meanwhile. (SET CONSTRAINTS ALL IMMEDIATE moves the
-- check to the end of the statement; the handshake below still holds, but
-- an idle worker then waits for that transaction to end before it settles.) One gap remains: a transaction that
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

-- The check itself, once per transaction. SECURITY DEFINER: a submitter
-- that may only INSERT into analysis_jobs needs no rights on
-- analysis_workers, and the search_path is the one the migration ran with.
CREATE FUNCTION analysis_executor_wake_idle_workers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- An older snapshot could miss a flag set since: always notify.
        PERFORM pg_notify('analysis_jobs_pending', '');
        RETURN;
    END IF;
    -- Held until this transaction commits; see worker/sql/submitters_settled.sql.
    PERFORM pg_advisory_xact_lock_shared(7310598114230005006);
    IF EXISTS (SELECT 1 FROM analysis_workers WHERE waiting) THEN
        -- SKIP LOCKED: a submitter never waits for a worker's row (its
        -- heartbeat may hold it); a flag left set only means one more NOTIFY.
        UPDATE analysis_workers SET waiting = false
        WHERE id IN (SELECT id FROM analysis_workers WHERE waiting FOR UPDATE SKIP LOCKED);
        PERFORM pg_notify('analysis_jobs_pending', '');
    END IF;
END
$$;

-- Runs for every pending row, so it only makes sure the check above runs
-- once per transaction: the first row calls it, the rest return at once.
CREATE FUNCTION analysis_jobs_wake_idle_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('analysis_executor.idle_workers_checked', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('analysis_executor.idle_workers_checked', 'on', true);
    -- Qualified with the table's schema: the submitter's search_path may not include it.
    EXECUTE format('SELECT %I.analysis_executor_wake_idle_workers()', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

-- New pending jobs, at commit.
CREATE CONSTRAINT TRIGGER analysis_jobs_notify_pending
    AFTER INSERT ON analysis_jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION analysis_jobs_wake_idle_workers();

-- Jobs back in the queue (a retry after its backoff, a rescued or released
-- job, a user re-queueing one): an idle worker claims it or sets its timer.
CREATE CONSTRAINT TRIGGER analysis_jobs_notify_requeued
    AFTER UPDATE OF status ON analysis_jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.status <> 'pending' AND NEW.status = 'pending')
    EXECUTE FUNCTION analysis_jobs_wake_idle_workers();
