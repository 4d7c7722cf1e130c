//! Analytics aggregates read from the analytics pool, behind single-flight and a short
//! in-process TTL cache: a burst of identical requests runs one SQL query, and repeats
//! within the TTL run none. The key includes the org, so orgs never share results.
//! An ingest invalidates its domain: flights that started before it are forgotten (they
//! take no new callers and cache nothing), then the domain's cached results are dropped.
//!
//! A report lists the top `ANALYTICS_REPORT_TOP_N` keywords (by clicks) and content items
//! (by page views), with `totals` over every row. It is serialised once, when computed,
//! and shared (`Arc`) by every caller and the cache; the cache is bounded by the bytes of
//! those serialisations (`ANALYTICS_CACHE_MAX_BYTES`), not by a count of entries.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use smartbeak_database::Database;
use smartbeak_utils::singleflight::{
    BoxError, CacheMeta, CachedValue, FlightCache, FlightOptions, SingleFlight, SingleFlightError,
};
use tokio::time::Instant;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

/// What one analytics request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnalyticsKey {
    /// The caller's org (part of the key: no sharing across orgs).
    pub org_id: Uuid,
    /// The domain.
    pub domain_id: Uuid,
    /// Inclusive start.
    pub from: DateTime<Utc>,
    /// Exclusive end.
    pub to: DateTime<Utc>,
}

/// Aggregates of one keyword over the range.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeywordAggregate {
    /// The keyword.
    pub keyword: String,
    /// Average search volume.
    pub avg_search_volume: f64,
    /// Average position.
    pub avg_position: f64,
    /// Sum of clicks.
    pub total_clicks: i64,
    /// Sum of impressions.
    pub total_impressions: i64,
    /// Average click-through rate.
    pub avg_ctr: f64,
    /// Rows aggregated.
    pub samples: i64,
}

/// Aggregates of one content item over the range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ContentAggregate {
    /// The content item.
    pub content_id: Uuid,
    /// Its title.
    pub title: String,
    /// Sum of page views.
    pub page_views: i64,
    /// Sum of unique visitors.
    pub unique_visitors: i64,
    /// Average bounce rate.
    pub avg_bounce_rate: f64,
    /// Sum of conversions.
    pub conversions: i64,
    /// Sum of revenue, in cents.
    pub revenue_cents: i64,
}

/// The answer of `GET /v1/domains/{id}/analytics`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AnalyticsReport {
    /// The domain.
    pub domain_id: Uuid,
    /// Inclusive start of the range.
    pub from: DateTime<Utc>,
    /// Exclusive end of the range.
    pub to: DateTime<Utc>,
    /// `replica` or `primary`: which database served the aggregate.
    pub read_source: String,
    /// The top keywords by clicks (ties by keyword), at most `ANALYTICS_REPORT_TOP_N`.
    pub keywords: Vec<KeywordAggregate>,
    /// The top content items by page views (ties by title, then id), at most
    /// `ANALYTICS_REPORT_TOP_N`.
    pub content: Vec<ContentAggregate>,
    /// Totals over every row in the range, listed or not.
    pub totals: ReportTotals,
}

/// Totals of a report over every row in its range (the lists are capped, these are not).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ReportTotals {
    /// Distinct keywords with rows in the range (`keywords` lists at most the top N).
    pub keywords: i64,
    /// Distinct content items with rows in the range (`content` lists at most the top N).
    pub content_items: i64,
    /// Sum of clicks over every keyword.
    pub clicks: i64,
    /// Sum of impressions over every keyword.
    pub impressions: i64,
    /// Sum of page views over every content item.
    pub page_views: i64,
    /// Sum of revenue in cents over every content item.
    pub revenue_cents: i64,
}

/// A report with its JSON, serialised once when computed and shared by every caller.
#[derive(Debug)]
pub struct SharedReport {
    /// The report.
    pub report: AnalyticsReport,
    /// `report` as JSON: the response body.
    pub json: Bytes,
}

impl SharedReport {
    /// Serialises `report`.
    pub fn new(report: AnalyticsReport) -> Result<Self, ApiError> {
        let json = serde_json::to_vec(&report).map_err(ApiError::internal)?;
        Ok(Self {
            report,
            json: Bytes::from(json),
        })
    }
}

/// Single-flight + TTL cache over the aggregate query.
pub struct AnalyticsReads {
    flights: SingleFlight<AnalyticsKey, Arc<SharedReport>, ApiError>,
    cache: Arc<TtlCache>,
    options: FlightOptions,
    queries: Arc<AtomicU64>,
    top_n: i64,
}

impl AnalyticsReads {
    /// Caches results for `ttl` (a zero TTL still coalesces concurrent requests), at most
    /// `max_bytes` of serialised reports, each listing at most `top_n` keywords and items.
    pub fn new(ttl: Duration, max_bytes: u64, top_n: i64) -> Self {
        let cache = Arc::new(TtlCache::new(max_bytes));
        Self {
            top_n,
            flights: SingleFlight::with_cache(cache.clone()),
            cache,
            options: FlightOptions::default()
                .ttl(ttl)
                .timeout(Duration::from_secs(30)),
            queries: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Aggregate queries actually run against the database since start.
    pub fn queries_run(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Invalidates every result of `domain_id` (after an ingest committed): first the
    /// flights in progress for the domain are forgotten, so callers arriving now start a
    /// fresh query instead of joining one that read the old rows, and those flights store
    /// nothing; then the cached results are dropped. In that order, under the cache's lock
    /// on both sides (the setter checks `CacheMeta::is_current` under it), an earlier
    /// flight can never put a stale report back after this returns.
    pub fn invalidate_domain(&self, domain_id: Uuid) {
        self.flights.forget_if(|key| key.domain_id == domain_id);
        let _sets = self.cache.lock();
        self.cache
            .entries
            .retain(|key, _| key.domain_id != domain_id);
    }

    /// Bytes of serialised reports in the cache now.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.entries.weight()
    }

    /// The report for `key`, computed at most once per burst and TTL.
    pub async fn get(
        &self,
        db: &Database,
        key: AnalyticsKey,
    ) -> Result<Arc<SharedReport>, ApiError> {
        let db = db.clone();
        let queries = self.queries.clone();
        let factory_key = key.clone();
        let top_n = self.top_n;
        self.get_with(key, move || async move {
            queries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("analytics_queries_total").increment(1);
            query(&db, &factory_key, top_n).await
        })
        .await
    }

    /// The report for `key` from the cache, the flight in progress or `compute`.
    async fn get_with<F, Fut>(
        &self,
        key: AnalyticsKey,
        compute: F,
    ) -> Result<Arc<SharedReport>, ApiError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<AnalyticsReport, ApiError>> + Send + 'static,
    {
        let result = self
            .flights
            .get_or_compute(
                key,
                move || async move { SharedReport::new(compute().await?).map(Arc::new) },
                &self.options,
            )
            .await;
        result.map_err(|err| match err {
            SingleFlightError::Failed(shared) => shared.reshare(),
            SingleFlightError::TimedOut { .. } => {
                ApiError::DatabaseUnavailable("analytics computation timed out".into())
            }
            SingleFlightError::Abandoned => ApiError::internal("analytics computation abandoned"),
        })
    }
}

/// The content performance aggregate, one definition for the analytics endpoint and the
/// domain export: the select list of one [`ContentAggregate`] row, over
/// [`CONTENT_AGGREGATE_FROM`], grouped by [`CONTENT_AGGREGATE_GROUP_BY`] (the caller adds
/// the domain and range filter on `p.domain_id` and `p.recorded_at`).
pub(crate) const CONTENT_AGGREGATE_COLUMNS: &str = "p.content_id, ci.title, \
    sum(p.page_views)::int8 AS page_views, sum(p.unique_visitors)::int8 AS unique_visitors, \
    avg(p.bounce_rate)::float8 AS avg_bounce_rate, sum(p.conversions)::int8 AS conversions, \
    sum(p.revenue_cents)::int8 AS revenue_cents";
/// The tables [`CONTENT_AGGREGATE_COLUMNS`] reads: `p` the performance rows, `ci` the items
/// of the same domain. The `ci.domain_id` condition lets the planner carry the caller's
/// `p.domain_id = ...` over to the items (an index scan of the domain's items): without it,
/// the join read and sorted every tenant's items before the first row.
pub(crate) const CONTENT_AGGREGATE_FROM: &str = "content_performance p \
    JOIN content_items ci ON ci.id = p.content_id AND ci.domain_id = p.domain_id";
/// The grouping of [`CONTENT_AGGREGATE_COLUMNS`]: one row per content item.
pub(crate) const CONTENT_AGGREGATE_GROUP_BY: &str = "p.content_id, ci.title";

/// The report's statement: $1 domain, $2 org, $3 inclusive start, $4 exclusive end, $5 the
/// most keywords and content items listed.
static REPORT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT \
         (SELECT coalesce(json_agg(k ORDER BY k.total_clicks DESC, k.keyword), '[]'::json) FROM ( \
            SELECT keyword, avg(search_volume)::float8 AS avg_search_volume, \
                   avg(position)::float8 AS avg_position, sum(clicks)::int8 AS total_clicks, \
                   sum(impressions)::int8 AS total_impressions, avg(ctr)::float8 AS avg_ctr, \
                   count(*)::int8 AS samples \
            FROM keyword_metrics \
            WHERE domain_id = d.id AND recorded_at >= $3 AND recorded_at < $4 \
            GROUP BY keyword ORDER BY total_clicks DESC, keyword LIMIT $5) k) AS keywords, \
         (SELECT coalesce(json_agg(c ORDER BY c.page_views DESC, c.title, c.content_id), '[]'::json) FROM ( \
            SELECT {CONTENT_AGGREGATE_COLUMNS} FROM {CONTENT_AGGREGATE_FROM} \
            WHERE p.domain_id = d.id AND p.recorded_at >= $3 AND p.recorded_at < $4 \
            GROUP BY {CONTENT_AGGREGATE_GROUP_BY} \
            ORDER BY page_views DESC, ci.title, p.content_id LIMIT $5) c) AS content, \
         (SELECT json_build_object('keywords', count(DISTINCT keyword), \
                 'clicks', coalesce(sum(clicks), 0)::int8, \
                 'impressions', coalesce(sum(impressions), 0)::int8) \
            FROM keyword_metrics \
            WHERE domain_id = d.id AND recorded_at >= $3 AND recorded_at < $4) AS keyword_totals, \
         (SELECT json_build_object('content_items', count(DISTINCT content_id), \
                 'page_views', coalesce(sum(page_views), 0)::int8, \
                 'revenue_cents', coalesce(sum(revenue_cents), 0)::int8) \
            FROM content_performance \
            WHERE domain_id = d.id AND recorded_at >= $3 AND recorded_at < $4) AS content_totals \
         FROM domains d WHERE d.id = $1 AND d.org_id = $2"
    )
});

#[derive(Deserialize)]
struct KeywordTotals {
    keywords: i64,
    clicks: i64,
    impressions: i64,
}

#[derive(Deserialize)]
struct ContentTotals {
    content_items: i64,
    page_views: i64,
    revenue_cents: i64,
}

async fn query(db: &Database, key: &AnalyticsKey, top_n: i64) -> Result<AnalyticsReport, ApiError> {
    type Row = (
        sqlx::types::Json<Vec<KeywordAggregate>>,
        sqlx::types::Json<Vec<ContentAggregate>>,
        sqlx::types::Json<KeywordTotals>,
        sqlx::types::Json<ContentTotals>,
    );
    let (row, read_source): (Option<Row>, _) = db
        .run_analytics(async |conn| {
            sqlx::query_as(REPORT_SQL.as_str())
                .bind(key.domain_id)
                .bind(key.org_id)
                .bind(key.from)
                .bind(key.to)
                .bind(top_n)
                .fetch_optional(conn)
                .await
        })
        .await?;
    let (keywords, content, kt, ct) = row.ok_or(ApiError::NotFound("domain"))?;
    Ok(AnalyticsReport {
        domain_id: key.domain_id,
        from: key.from,
        to: key.to,
        read_source: read_source.as_str().to_owned(),
        keywords: keywords.0,
        content: content.0,
        totals: ReportTotals {
            keywords: kt.keywords,
            content_items: ct.content_items,
            clicks: kt.clicks,
            impressions: kt.impressions,
            page_views: ct.page_views,
            revenue_cents: ct.revenue_cents,
        },
    })
}

/// In-process TTL cache implementing the single-flight cache, bounded by the bytes of the
/// serialised reports (quick_cache's weighter; least recently used go first).
struct TtlCache {
    entries: quick_cache::sync::Cache<AnalyticsKey, CacheEntry, ReportWeigher>,
    /// Taken by `set` and by `invalidate_domain`, so an invalidation and a flight's check
    /// of `CacheMeta::is_current` are ordered (reads take no lock).
    sets: Mutex<()>,
}

type CacheEntry = (Instant, Arc<SharedReport>);

/// What an entry costs beyond its JSON (key, instant, pointers, the report's own fields:
/// about as many bytes again as the JSON, counted here once more).
const ENTRY_OVERHEAD: u64 = 256;

#[derive(Clone)]
struct ReportWeigher;

impl quick_cache::Weighter<AnalyticsKey, CacheEntry> for ReportWeigher {
    fn weight(&self, _key: &AnalyticsKey, (_, report): &CacheEntry) -> u64 {
        // The parsed report takes about the JSON's size again.
        2 * report.json.len() as u64 + ENTRY_OVERHEAD
    }
}

impl TtlCache {
    fn new(max_bytes: u64) -> Self {
        // quick_cache sizes its tables from an estimate of the item count: reports of
        // about 16 KiB.
        let estimated = usize::try_from(max_bytes / (16 << 10))
            .unwrap_or(usize::MAX)
            .max(16);
        Self {
            entries: quick_cache::sync::Cache::with_weighter(estimated, max_bytes, ReportWeigher),
            sets: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FlightCache<AnalyticsKey, Arc<SharedReport>> for TtlCache {
    fn get<'a>(
        &'a self,
        key: &'a AnalyticsKey,
    ) -> BoxFuture<'a, Result<Option<CachedValue<Arc<SharedReport>>>, BoxError>> {
        let now = Instant::now();
        let hit = self.entries.get(key).and_then(|(expires, value)| {
            (expires > now).then(|| CachedValue {
                value,
                remaining_ttl: Some(expires - now),
                delta: None,
            })
        });
        Box::pin(async move { Ok(hit) })
    }

    fn set<'a>(
        &'a self,
        key: &'a AnalyticsKey,
        value: &'a Arc<SharedReport>,
        meta: CacheMeta,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        if let Some(ttl) = meta.ttl.filter(|ttl| !ttl.is_zero()) {
            let now = Instant::now();
            let _sets = self.lock();
            if !meta.is_current() {
                // Forgotten by `invalidate_domain` (checked under the lock it takes).
                return Box::pin(async { Ok(()) });
            }
            self.entries.insert(key.clone(), (now + ttl, value.clone()));
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::sync::Notify;

    use super::*;

    fn report(key: &AnalyticsKey, source: &str) -> AnalyticsReport {
        AnalyticsReport {
            domain_id: key.domain_id,
            from: key.from,
            to: key.to,
            read_source: source.to_owned(),
            keywords: Vec::new(),
            content: Vec::new(),
            totals: ReportTotals::default(),
        }
    }

    /// Issue 9 item 12: a query that started before an ingest must neither put its stale
    /// report back into the cache after the ingest invalidated it, nor be joined by a
    /// request arriving after the ingest.
    #[tokio::test(start_paused = true)]
    async fn an_earlier_flight_cannot_overwrite_the_invalidation() {
        let reads = Arc::new(AnalyticsReads::new(Duration::from_secs(60), 1 << 20, 100));
        let key = AnalyticsKey {
            org_id: Uuid::new_v4(),
            domain_id: Uuid::new_v4(),
            from: DateTime::<Utc>::UNIX_EPOCH,
            to: Utc::now(),
        };
        let gate = Arc::new(Notify::new());
        let before = tokio::spawn({
            let (reads, key, gate) = (Arc::clone(&reads), key.clone(), Arc::clone(&gate));
            async move {
                let stale = report(&key, "before the ingest");
                reads
                    .get_with(key, move || async move {
                        gate.notified().await;
                        Ok(stale)
                    })
                    .await
            }
        });
        for _ in 0..100 {
            if reads.flights.stats().in_flight == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(reads.flights.stats().in_flight, 1);

        reads.invalidate_domain(key.domain_id);
        // A request after the ingest runs its own query (it would wait for the stale
        // flight, and time out, if it joined it).
        let fresh = report(&key, "after the ingest");
        let after = reads
            .get_with(key.clone(), move || async move { Ok(fresh) })
            .await
            .unwrap();
        assert_eq!(after.report.read_source, "after the ingest");

        // The earlier query ends: its own caller gets its answer, the cache keeps the
        // fresh one.
        gate.notify_one();
        assert_eq!(
            before.await.unwrap().unwrap().report.read_source,
            "before the ingest"
        );
        for _ in 0..100 {
            if reads.flights.stats().in_flight == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let later = reads
            .get_with(key.clone(), || async {
                Err(ApiError::internal("the cache should have answered"))
            })
            .await
            .unwrap();
        assert_eq!(later.report.read_source, "after the ingest");
    }

    /// Gap 6 of issue 13: the cache holds at most its byte budget of reports, whatever
    /// their count; a report is serialised once and every hit shares it.
    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded_by_bytes_and_shares_one_serialisation() {
        const BUDGET: u64 = 256 << 10;
        let reads = AnalyticsReads::new(Duration::from_secs(60), BUDGET, 100);
        let big = |key: &AnalyticsKey| {
            let mut r = report(key, "primary");
            r.keywords = (0..100)
                .map(|i| KeywordAggregate {
                    keyword: format!("keyword number {i:04} {}", "x".repeat(60)),
                    avg_search_volume: 1.0,
                    avg_position: 1.0,
                    total_clicks: i,
                    total_impressions: i,
                    avg_ctr: 0.5,
                    samples: 1,
                })
                .collect();
            r
        };
        let key = |n: u128| AnalyticsKey {
            org_id: Uuid::from_u128(n),
            domain_id: Uuid::from_u128(n),
            from: DateTime::<Utc>::UNIX_EPOCH,
            to: DateTime::<Utc>::UNIX_EPOCH,
        };
        let first = reads
            .get_with(key(0), {
                let r = big(&key(0));
                move || async move { Ok(r) }
            })
            .await
            .unwrap();
        let size = first.json.len() as u64;
        assert!(size > 10_000, "a sizeable report: {size} bytes");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&first.json).unwrap()["keywords"][99]["total_clicks"],
            99
        );
        let hit = reads
            .get_with(key(0), || async { panic!("a hit runs nothing") })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &hit), "one shared report and JSON");
        // Far more reports than the budget holds: the bytes stay within it.
        for n in 1..200 {
            let r = big(&key(n));
            reads
                .get_with(key(n), move || async move { Ok(r) })
                .await
                .unwrap();
            assert!(
                reads.cached_bytes() <= BUDGET,
                "{} > {BUDGET}",
                reads.cached_bytes()
            );
        }
        assert!(
            reads.cached_bytes() > BUDGET / 2,
            "the budget is used: {}",
            reads.cached_bytes()
        );
    }
}
