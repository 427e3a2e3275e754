DROP TRIGGER analysis_jobs_record_attempt ON analysis_jobs;

CREATE TRIGGER analysis_jobs_record_attempt
    AFTER UPDATE OF status ON analysis_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION analysis_jobs_record_attempt();
