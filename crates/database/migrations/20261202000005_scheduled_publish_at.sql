-- Content items already `scheduled` before `publish_at` existed (20261202000002) have no
-- `publish_at`, so the content-scheduler's due query (`publish_at <= now()`) never
-- matches them: they would stay scheduled forever.
--
-- Backfill: such a row is due from when it was last changed (`updated_at`, which is
-- NOT NULL and never earlier than `created_at`): it was scheduled then, with no later
-- time asked for, so the next content-scheduler run publishes it. Then a CHECK makes a
-- `scheduled` row without `publish_at` impossible from now on (the api already refuses
-- `status: "scheduled"` without `publish_at`, routes/content.rs).

UPDATE content_items SET publish_at = updated_at
WHERE status = 'scheduled' AND publish_at IS NULL;

ALTER TABLE content_items ADD CONSTRAINT content_items_scheduled_publish_at_check
    CHECK (status <> 'scheduled' OR publish_at IS NOT NULL);
