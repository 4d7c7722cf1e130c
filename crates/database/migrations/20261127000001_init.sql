-- SmartBeak Core schema. Every table is reached through an org: an org owns api keys and
-- domains; everything else hangs off a domain. Every timestamp is timestamptz.

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored as SHA-256 of a high-entropy secret; `prefix` is the first characters of
-- the key, shown to humans to tell keys apart, never enough to authenticate.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name          text NOT NULL DEFAULT '',
    prefix        text NOT NULL,
    key_hash      bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE INDEX api_keys_org_idx ON api_keys (org_id);

CREATE TABLE domains (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 253),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'archived')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);
-- Cursor pagination: WHERE org_id = $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id.
CREATE INDEX domains_org_cursor_idx ON domains (org_id, created_at, id);

CREATE TABLE content_items (
    id            uuid PRIMARY KEY,
    domain_id     uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    title         text NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
    slug          text NOT NULL CHECK (length(slug) BETWEEN 1 AND 500),
    body          text NOT NULL DEFAULT '',
    status        text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'scheduled', 'published', 'archived')),
    published_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, slug)
);
CREATE INDEX content_items_domain_cursor_idx ON content_items (domain_id, created_at, id);
CREATE INDEX content_items_domain_status_cursor_idx ON content_items (domain_id, status, created_at, id);

CREATE TABLE keyword_metrics (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id      uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    keyword        text NOT NULL CHECK (length(keyword) BETWEEN 1 AND 500),
    search_volume  integer NOT NULL CHECK (search_volume >= 0),
    position       double precision NOT NULL CHECK (position >= 0),
    clicks         bigint NOT NULL DEFAULT 0 CHECK (clicks >= 0),
    impressions    bigint NOT NULL DEFAULT 0 CHECK (impressions >= 0),
    ctr            double precision NOT NULL DEFAULT 0 CHECK (ctr >= 0 AND ctr <= 1),
    recorded_at    timestamptz NOT NULL
);
CREATE INDEX keyword_metrics_domain_time_idx ON keyword_metrics (domain_id, recorded_at);

CREATE TABLE content_performance (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id        uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    content_id       uuid NOT NULL REFERENCES content_items (id) ON DELETE CASCADE,
    page_views       bigint NOT NULL DEFAULT 0 CHECK (page_views >= 0),
    unique_visitors  bigint NOT NULL DEFAULT 0 CHECK (unique_visitors >= 0),
    bounce_rate      double precision NOT NULL DEFAULT 0 CHECK (bounce_rate >= 0 AND bounce_rate <= 1),
    conversions      bigint NOT NULL DEFAULT 0 CHECK (conversions >= 0),
    revenue_cents    bigint NOT NULL DEFAULT 0 CHECK (revenue_cents >= 0),
    recorded_at      timestamptz NOT NULL
);
CREATE INDEX content_performance_domain_time_idx ON content_performance (domain_id, recorded_at);
CREATE INDEX content_performance_content_idx ON content_performance (content_id);

CREATE TABLE domain_settings (
    domain_id   uuid PRIMARY KEY REFERENCES domains (id) ON DELETE CASCADE,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The export queue. The api inserts `queued` rows; the export worker claims them with
-- FOR UPDATE SKIP LOCKED, holds a lease it renews by heartbeat, and completes only if its
-- fencing token still matches (a worker whose lease expired cannot overwrite a newer claim).
CREATE TABLE domain_exports (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    domain_id          uuid NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    format             text NOT NULL CHECK (format IN ('json', 'csv', 'markdown')),
    include_content    boolean NOT NULL DEFAULT true,
    include_keywords   boolean NOT NULL DEFAULT true,
    include_analytics  boolean NOT NULL DEFAULT true,
    date_from          timestamptz,
    date_to            timestamptz,
    status             text NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress           integer NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error              text,
    size_bytes         bigint CHECK (size_bytes >= 0),
    storage_path       text,
    attempts           integer NOT NULL DEFAULT 0,
    max_attempts       integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    lease_owner        text,
    lease_expires_at   timestamptz,
    heartbeat_at       timestamptz,
    fencing_token      bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    CHECK (date_from IS NULL OR date_to IS NULL OR date_from <= date_to)
);
CREATE INDEX domain_exports_org_idx ON domain_exports (org_id, created_at);
CREATE INDEX domain_exports_domain_idx ON domain_exports (domain_id);
-- Claiming: the oldest queued job first, and running jobs whose lease has expired.
CREATE INDEX domain_exports_queued_idx ON domain_exports (created_at) WHERE status = 'queued';
CREATE INDEX domain_exports_lease_idx ON domain_exports (lease_expires_at) WHERE status = 'running';

-- Every run of a control-plane bulk operation, one row each; the runner holds a
-- PostgreSQL advisory lock keyed by the operation so only one runs at a time.
CREATE TABLE batch_runs (
    id               uuid PRIMARY KEY,
    operation        text NOT NULL CHECK (length(operation) BETWEEN 1 AND 100),
    runner           text NOT NULL,
    status           text NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'succeeded', 'partial', 'failed', 'cancelled')),
    items_total      integer NOT NULL DEFAULT 0 CHECK (items_total >= 0),
    items_succeeded  integer NOT NULL DEFAULT 0 CHECK (items_succeeded >= 0),
    items_failed     integer NOT NULL DEFAULT 0 CHECK (items_failed >= 0),
    error            text,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX batch_runs_operation_idx ON batch_runs (operation, started_at DESC);
