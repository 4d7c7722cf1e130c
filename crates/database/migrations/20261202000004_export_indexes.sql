-- The domain export (issue 11): the analytics section streams the content performance
-- aggregate of one domain in `content_id` order, and its progress count counts the
-- distinct items with performance rows in the date range.
--
-- `(domain_id, content_id, recorded_at)`: the count is an index-only scan (no heap, no
-- aggregate), and the aggregate reads the domain's rows already grouped by item (a
-- GroupAggregate streaming in key order: no sort or hash of the whole domain first). The
-- existing `(domain_id, recorded_at)` index keeps serving the analytics endpoint's range
-- reads.
CREATE INDEX content_performance_domain_content_idx
    ON content_performance (domain_id, content_id, recorded_at);
