-- Issue 13, gap 5: a retried `POST .../metrics` must not duplicate data.
--
-- * Natural keys on the api's metric rows: a keyword's figures at one time
--   `(domain_id, keyword, recorded_at)` (rows the api writes, `source` NULL; synced rows
--   keep their own key with `source`, `keyword_metrics_natural_key_idx`), and a content
--   item's figures at one time `(content_id, recorded_at)`. The ingest upserts on them.
--   Rows stored before this migration may repeat a key: the last one written (highest
--   `id`) is kept, the earlier ones are deleted, so the unique indexes can be built.
-- * `idempotency_keys`: the first successful response to a request carrying an
--   `Idempotency-Key`, per org and operation, for 24 hours. A row is written in the
--   transaction of the request's own work, so the work and its record commit together,
--   and a concurrent request with the same key waits on the row's unique index until the
--   first commits (then replays it) or rolls back (then runs itself).

DELETE FROM keyword_metrics WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY domain_id, keyword, recorded_at ORDER BY id DESC) AS newer
        FROM keyword_metrics WHERE source IS NULL) ranked
    WHERE newer > 1);
CREATE UNIQUE INDEX keyword_metrics_api_natural_key_idx
    ON keyword_metrics (domain_id, keyword, recorded_at) WHERE source IS NULL;

DELETE FROM content_performance WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY content_id, recorded_at ORDER BY id DESC) AS newer
        FROM content_performance) ranked
    WHERE newer > 1);
CREATE UNIQUE INDEX content_performance_natural_key_idx
    ON content_performance (content_id, recorded_at);
-- A prefix of the natural key's index.
DROP INDEX content_performance_content_idx;

CREATE TABLE idempotency_keys (
    org_id           uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    -- The operation: `ingest_metrics:<domain id>`, `create_export:<domain id>`.
    scope            text NOT NULL CHECK (length(scope) BETWEEN 1 AND 200),
    key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of the request body as the handler parsed it.
    request_hash     bytea NOT NULL,
    -- Written by the same transaction that inserted the row, before it commits: another
    -- transaction never sees them NULL.
    response_status  smallint,
    response_body    bytea,
    location         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (org_id, scope, key)
);
CREATE INDEX idempotency_keys_expiry_idx ON idempotency_keys (expires_at);
