-- The export queue proper (issue 11). Owned, statement by statement, by
-- apps/api/src/jobs/queue.rs: nothing else writes these tables.
--
-- * `run_after`: a job is claimable once it is due; retries set it to now() + backoff.
-- * Every claim, and every transition out of `running` (complete, fail, release, reclaim,
--   cancel), bumps `fencing_token`; every write by a worker is
--   `WHERE id = $1 AND fencing_token = $2`, so a worker whose lease was taken (or whose
--   job was cancelled) can change nothing.
-- * `attempts` counts claims; a lease the worker released at shutdown gives its attempt back.
-- * A finished file has its size, record count and SHA-256; `expires_at` is when the
--   control-plane's retention operation may delete it (`expiring` while it does, then
--   `expired`).

ALTER TABLE domain_exports
    ADD COLUMN run_after        timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN rows_written     bigint NOT NULL DEFAULT 0 CHECK (rows_written >= 0),
    ADD COLUMN record_count     bigint CHECK (record_count >= 0),
    ADD COLUMN checksum_sha256  text CHECK (checksum_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN expires_at       timestamptz,
    ADD COLUMN progress_at      timestamptz;

ALTER TABLE domain_exports DROP CONSTRAINT domain_exports_status_check;
ALTER TABLE domain_exports
    ADD CONSTRAINT domain_exports_status_check CHECK (status IN
        ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expiring', 'expired')),
    ADD CONSTRAINT domain_exports_attempts_check CHECK (attempts >= 0),
    ADD CONSTRAINT domain_exports_running_lease_check CHECK (
        status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    ADD CONSTRAINT domain_exports_succeeded_file_check CHECK (
        status NOT IN ('succeeded', 'expiring') OR (storage_path IS NOT NULL
            AND size_bytes IS NOT NULL AND record_count IS NOT NULL
            AND checksum_sha256 IS NOT NULL AND expires_at IS NOT NULL)),
    -- A stored file name is the export's own id and a known extension, nothing else: no
    -- directory, no `..`, no other export's file (apps/api/src/jobs/paths.rs file_name).
    ADD CONSTRAINT domain_exports_storage_path_check CHECK (
        storage_path ~ ('^' || replace(id::text, '-', '') || '\.(csv|zip|json|md)$')),
    ADD CONSTRAINT domain_exports_finished_check CHECK (
        (finished_at IS NOT NULL) =
            (status IN ('succeeded', 'failed', 'cancelled', 'expiring', 'expired')));

-- The claim: due queued jobs in order, on one partial index.
DROP INDEX domain_exports_queued_idx;
CREATE INDEX domain_exports_claim_idx ON domain_exports (run_after) WHERE status = 'queued';
-- A domain's exports, newest first, for cursor pagination.
CREATE INDEX domain_exports_domain_cursor_idx ON domain_exports (domain_id, created_at DESC, id DESC);
DROP INDEX domain_exports_domain_idx;
-- Retention: succeeded files by expiry.
CREATE INDEX domain_exports_expiry_idx ON domain_exports (expires_at)
    WHERE status IN ('succeeded', 'expiring');

-- Every attempt, one row each: written at claim (`running`), ended exactly once by the
-- fenced statement that ends the attempt (or by the reaper).
CREATE TABLE domain_export_attempts (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    export_id      uuid NOT NULL REFERENCES domain_exports (id) ON DELETE CASCADE,
    attempt        integer NOT NULL CHECK (attempt >= 1),
    fencing_token  bigint NOT NULL,
    worker         text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    outcome        text NOT NULL DEFAULT 'running' CHECK (outcome IN
        ('running', 'succeeded', 'retried', 'failed', 'cancelled', 'reclaimed', 'released')),
    error          text,
    UNIQUE (export_id, fencing_token),
    CHECK ((finished_at IS NULL) = (outcome = 'running'))
);
CREATE INDEX domain_export_attempts_running_idx ON domain_export_attempts (export_id)
    WHERE outcome = 'running';
