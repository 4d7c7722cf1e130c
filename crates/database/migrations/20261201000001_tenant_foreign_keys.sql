-- Tenancy enforced by the schema, not only by the queries: an export's domain belongs to
-- the export's org, and a performance row's content item belongs to the row's domain.
-- The composite keys need a unique target; (id, org_id) and (id, domain_id) are unique
-- because id is. The composite foreign keys replace the single-column ones they imply.
-- Adding them validates existing rows: data written by the api (which checks ownership
-- before every insert) passes.

ALTER TABLE domains ADD CONSTRAINT domains_id_org_id_key UNIQUE (id, org_id);
ALTER TABLE content_items ADD CONSTRAINT content_items_id_domain_id_key UNIQUE (id, domain_id);

ALTER TABLE domain_exports
    ADD CONSTRAINT domain_exports_domain_org_fkey
        FOREIGN KEY (domain_id, org_id) REFERENCES domains (id, org_id) ON DELETE CASCADE,
    DROP CONSTRAINT domain_exports_domain_id_fkey;

ALTER TABLE content_performance
    ADD CONSTRAINT content_performance_content_domain_fkey
        FOREIGN KEY (content_id, domain_id) REFERENCES content_items (id, domain_id) ON DELETE CASCADE,
    DROP CONSTRAINT content_performance_content_id_fkey;
