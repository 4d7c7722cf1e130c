-- The content-scheduler loads due items a page at a time, `ORDER BY publish_at, id` after
-- the previous page's last `(publish_at, id)`. `content_items_due_idx` (20261202000002) is
-- on `(publish_at)` only, so every page sorted its ties on `id`; this index gives the keyset
-- its bound and its order, and replaces the old one (a prefix of it).

CREATE INDEX content_items_due_keyset_idx ON content_items (publish_at, id)
    WHERE status = 'scheduled';

DROP INDEX content_items_due_idx;
