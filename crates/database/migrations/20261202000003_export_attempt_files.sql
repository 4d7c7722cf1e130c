-- One file name per attempt: `<id>.<fencing token>.<ext>` (apps/api/src/jobs/paths.rs
-- file_name), so a stale attempt (a worker cut off from the primary, still writing) can
-- never replace the file a newer attempt recorded. The legacy `<id>.<ext>` stays valid for
-- rows written before this migration. Still nothing user-supplied: the export's own id,
-- digits, a known extension.
ALTER TABLE domain_exports DROP CONSTRAINT domain_exports_storage_path_check;
ALTER TABLE domain_exports
    ADD CONSTRAINT domain_exports_storage_path_check CHECK (
        storage_path ~ ('^' || replace(id::text, '-', '') || '(\.[0-9]{1,19})?\.(csv|zip|json|md)$'));
