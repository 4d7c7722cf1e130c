-- The control-plane's operations (issue 12).
--
-- * content-scheduler: `publish_at` on content items, and a partial index for the due
--   query (`status = 'scheduled' AND publish_at <= now()`).
-- * every run is a `batch_runs` row (mode, params, heartbeat, skipped count, the statuses
--   `interrupted` and `abandoned`); at most one `running` row per operation (the advisory
--   lock's backstop); the failed items of a run in `batch_run_items` (the first 1,000).
-- * keyword-sync: where a domain's keywords come from (`domain_keyword_sources`), and a
--   natural key on synced `keyword_metrics` rows so a re-run updates instead of
--   duplicating. Rows written by the api's ingest endpoint keep `source` NULL and are not
--   constrained (the ingest never promised uniqueness).

ALTER TABLE content_items ADD COLUMN publish_at timestamptz;
CREATE INDEX content_items_due_idx ON content_items (publish_at) WHERE status = 'scheduled';

ALTER TABLE batch_runs
    ADD COLUMN mode           text NOT NULL DEFAULT 'settle_all' CHECK (mode IN ('settle_all', 'strict')),
    ADD COLUMN params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN items_skipped  integer NOT NULL DEFAULT 0 CHECK (items_skipped >= 0);
ALTER TABLE batch_runs DROP CONSTRAINT batch_runs_status_check;
ALTER TABLE batch_runs ADD CONSTRAINT batch_runs_status_check CHECK (status IN
    ('running', 'succeeded', 'partial', 'failed', 'cancelled', 'interrupted', 'abandoned'));
-- Existing data: of several `running` rows of one operation (runners that died before
-- this schema), all but the newest are abandoned so the unique index can be built.
UPDATE batch_runs SET status = 'abandoned', finished_at = coalesce(finished_at, now())
WHERE status = 'running' AND id NOT IN (
    SELECT DISTINCT ON (operation) id FROM batch_runs WHERE status = 'running'
    ORDER BY operation, started_at DESC);
CREATE UNIQUE INDEX batch_runs_one_running_idx ON batch_runs (operation) WHERE status = 'running';

CREATE TABLE batch_run_items (
    run_id       uuid NOT NULL REFERENCES batch_runs (id) ON DELETE CASCADE,
    item_index   bigint NOT NULL CHECK (item_index >= 0),
    item_id      text NOT NULL,
    error        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, item_index)
);

CREATE TABLE domain_keyword_sources (
    domain_id    uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    adapter      text NOT NULL CHECK (adapter IN ('gsc', 'ahrefs')),
    -- The provider's name for the site (a GSC property, an Ahrefs target).
    site         text NOT NULL CHECK (length(site) BETWEEN 1 AND 500),
    enabled      boolean NOT NULL DEFAULT true,
    last_synced_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain_id, adapter)
);

ALTER TABLE keyword_metrics ADD COLUMN source text CHECK (source IN ('gsc', 'ahrefs'));
CREATE UNIQUE INDEX keyword_metrics_natural_key_idx
    ON keyword_metrics (domain_id, source, keyword, recorded_at) WHERE source IS NOT NULL;

-- content-scheduler's isolation path: a batch whose one-statement UPDATE failed is
-- published again item by item, each in its own subtransaction (a savepoint per item),
-- in one round trip. `WHEN OTHERS` does not catch query_canceled, so statement_timeout
-- still ends the call. Returns one row per id: published, or not (no longer due), or the
-- error that item raised.
CREATE FUNCTION content_publish_each(ids uuid[])
RETURNS TABLE (item_id uuid, published boolean, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    item uuid;
    constraint_name text;
BEGIN
    FOREACH item IN ARRAY ids LOOP
        item_id := item;
        error_message := NULL;
        BEGIN
            UPDATE content_items c
               SET status = 'published', published_at = now(), updated_at = now()
             WHERE c.id = item AND c.status = 'scheduled' AND c.publish_at <= now();
            published := FOUND;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS constraint_name = CONSTRAINT_NAME;
            published := false;
            error_message := SQLERRM || coalesce(' (constraint ' || nullif(constraint_name, '') || ')', '');
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
