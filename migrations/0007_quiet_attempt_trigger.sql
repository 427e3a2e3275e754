-- depends: 0006_wake_idle_workers
-- The attempt-history trigger fires only for the rows it records.
--
-- analysis_jobs_record_attempt ran its function for every attempt that left
-- 'running', and the function returned at once for the most common one: a
-- first attempt that completed (the job row tells that whole story), or a
-- graceful hand-back that did not spend the attempt. Its WHEN clause now
-- says the same, so those rows cost no function call and no queued trigger
-- event. What gets recorded is unchanged.
DROP TRIGGER analysis_jobs_record_attempt ON analysis_jobs;

CREATE TRIGGER analysis_jobs_record_attempt
    AFTER UPDATE OF status ON analysis_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running'
          AND NEW.attempts >= OLD.attempts
          AND NOT (NEW.status = 'completed' AND OLD.attempts = 1))
    EXECUTE FUNCTION analysis_jobs_record_attempt();
