-- depends: 0004_schedules
-- Large-result storage: results over RESULT_INLINE_MAX_BYTES live in
-- analysis_result_storage (created by 0001), gzip-compressed, either in the
-- row's content column or in a file under RESULT_STORAGE_DIR.

-- The content is gzip already: storing it EXTERNAL (out of line, uncompressed
-- by PostgreSQL) spares a useless second compression and lets
-- substring(content FROM x FOR n) fetch only the TOAST chunks it needs, so a
-- reader can stream a large result in slices. Applies to rows written from now on.
ALTER TABLE analysis_result_storage ALTER COLUMN content SET STORAGE EXTERNAL;

-- Files of the filesystem backend whose rows are gone (the job was pruned or
-- deleted, by retention, a user or the deletion of its analysis) or were
-- replaced by a later attempt's result. The pruner deletes the files and then
-- these rows; a trigger fills it, so no deletion path can forget a file.
CREATE TABLE analysis_result_file_deletions (
    location   text PRIMARY KEY,
    queued_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE analysis_result_file_deletions IS
    'Result files (paths relative to RESULT_STORAGE_DIR) no row refers to any more; the pruner deletes them.';

CREATE FUNCTION analysis_result_storage_queue_file_deletion() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO analysis_result_file_deletions (location)
    VALUES (OLD.location)
    ON CONFLICT (location) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER analysis_result_storage_file_deleted
    AFTER DELETE ON analysis_result_storage
    FOR EACH ROW
    WHEN (OLD.backend = 'filesystem')
    EXECUTE FUNCTION analysis_result_storage_queue_file_deletion();

CREATE TRIGGER analysis_result_storage_file_replaced
    AFTER UPDATE OF location, backend ON analysis_result_storage
    FOR EACH ROW
    WHEN (OLD.backend = 'filesystem' AND OLD.location IS DISTINCT FROM NEW.location)
    EXECUTE FUNCTION analysis_result_storage_queue_file_deletion();
