-- Every change that can end a key's use (revoked, deleted, its hash or org changed) tells
-- the api processes at once: `pg_notify('smartbeak_api_keys', <hex of the key hash>)`,
-- delivered when the changing transaction commits (so a rolled-back revoke notifies
-- nobody). Each api process LISTENs on that channel and evicts the key from its in-process
-- cache (apps/api/src/auth_cache.rs, `KEYS_CHANNEL`). A trigger, not the callers, so that
-- `keys revoke`, an org's cascading delete and a manual UPDATE all notify.
CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('smartbeak_api_keys', encode(OLD.key_hash, 'hex'));
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_notify_update
    AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.org_id IS DISTINCT FROM NEW.org_id)
    EXECUTE FUNCTION api_keys_notify();

CREATE TRIGGER api_keys_notify_delete
    AFTER DELETE ON api_keys
    FOR EACH ROW
    EXECUTE FUNCTION api_keys_notify();
