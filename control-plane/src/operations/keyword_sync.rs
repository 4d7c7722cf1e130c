//! `keyword-sync`: for each configured keyword source (`domain_keyword_sources`: a domain,
//! an adapter `gsc` or `ahrefs`, the provider's name for the site), fetches the keyword
//! metrics from the provider's HTTP API and upserts them into `keyword_metrics` on the
//! natural key `(domain_id, source, keyword, recorded_at)`, so a re-run updates rows
//! instead of adding them.
//!
//! Every request goes through `smartbeak_utils::fetch` (the adapter's bulkhead, breaker,
//! retries with jitter, per-attempt timeout and deadline; the body is read inside the
//! attempt, so a provider that stalls mid-body times out). One provider's outage opens its
//! own breaker: its sources fail fast with `circuit breaker for gsc is open`, the other
//! provider's are untouched.
//!
//! # The provider API
//!
//! `GET {base_url}/v1/keywords?site={site}` with `Authorization: Bearer {api_key}`,
//! answering `{"keywords": [{"keyword", "date" (YYYY-MM-DD), "search_volume",
//! "position", "clicks", "impressions", "ctr"}]}`. Both adapters speak this shape here (a
//! provider's own API sits behind a thin gateway that translates to it); a row is stored
//! at midnight UTC of its `date`.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use smartbeak_database::Database;
use smartbeak_resilience::AdapterName;
use smartbeak_utils::fetch::HttpClient;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::{
    ItemError, ItemOutcome, Operation, OperationName, Parallelism, Stop, each_item, error_chain,
};

/// The first page of enabled sources (`$1`: the page size), in primary-key order.
const FIRST_PAGE_SQL: &str = "SELECT domain_id, adapter, site FROM domain_keyword_sources \
     WHERE enabled ORDER BY domain_id, adapter LIMIT $1";

/// The page after the keyset `($1, $2)` = `(domain_id, adapter)` (`$3`: the page size).
const NEXT_PAGE_SQL: &str = "SELECT domain_id, adapter, site FROM domain_keyword_sources \
     WHERE enabled AND (domain_id, adapter) > ($1, $2) \
     ORDER BY domain_id, adapter LIMIT $3";

/// A credential: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where one provider is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Base URL (`CP_GSC_BASE_URL`, `CP_AHREFS_BASE_URL`).
    pub base_url: Url,
    /// Bearer credential (`CP_GSC_API_KEY`, `CP_AHREFS_API_KEY`).
    pub api_key: Secret,
}

/// The providers configured; a source whose adapter has none fails with a clear error.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    /// Google Search Console (adapter `gsc`).
    pub gsc: Option<ProviderConfig>,
    /// Ahrefs (adapter `ahrefs`).
    pub ahrefs: Option<ProviderConfig>,
}

/// One configured source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeywordSource {
    /// The domain.
    pub domain_id: Uuid,
    /// `gsc` or `ahrefs`.
    pub adapter: AdapterName,
    /// The provider's name for the site.
    pub site: String,
}

/// One keyword row as the provider sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderKeyword {
    /// The query.
    pub keyword: String,
    /// The day the figures are for.
    pub date: NaiveDate,
    /// Monthly search volume.
    pub search_volume: i32,
    /// Average position.
    pub position: f64,
    /// Clicks.
    #[serde(default)]
    pub clicks: i64,
    /// Impressions.
    #[serde(default)]
    pub impressions: i64,
    /// Click-through rate, 0 to 1.
    #[serde(default)]
    pub ctr: f64,
}

/// The provider's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderResponse {
    /// The rows.
    pub keywords: Vec<ProviderKeyword>,
}

/// The keyword-sync operation.
#[derive(Debug, Clone)]
pub struct KeywordSync {
    db: Database,
    client: HttpClient,
    providers: Providers,
}

impl KeywordSync {
    /// Over `db`, sending through `client` (whose `Resilience` holds the adapters'
    /// breakers).
    pub fn new(db: Database, client: HttpClient, providers: Providers) -> Self {
        Self {
            db,
            client,
            providers,
        }
    }

    fn provider(&self, adapter: AdapterName) -> Result<&ProviderConfig, ItemError> {
        let (config, var) = match adapter {
            AdapterName::Gsc => (self.providers.gsc.as_ref(), "GSC"),
            AdapterName::Ahrefs => (self.providers.ahrefs.as_ref(), "AHREFS"),
            other => {
                return Err(ItemError::once(format!(
                    "adapter {other} is not a keyword source (gsc or ahrefs)"
                )));
            }
        };
        config.ok_or_else(|| {
            ItemError::once(format!(
                "keyword source {adapter} is not configured (set CP_{var}_BASE_URL and CP_{var}_API_KEY)"
            ))
        })
    }

    /// One source; its request is cancelled (retries, backoff and body read included)
    /// when `cancel` fires ([`super::Stop::in_flight`]).
    async fn sync(
        &self,
        source: KeywordSource,
        cancel: CancellationToken,
    ) -> Result<ItemOutcome, ItemError> {
        let provider = self.provider(source.adapter)?;
        let mut url = provider.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| {
                ItemError::once(format!(
                    "the {} base URL cannot have a path",
                    source.adapter
                ))
            })?
            .pop_if_empty()
            .extend(["v1", "keywords"]);
        url.query_pairs_mut().append_pair("site", &source.site);
        let response: ProviderResponse = self
            .client
            .get(source.adapter, url)
            .bearer_auth(provider.api_key.expose())
            .cancel(cancel)
            .fetch_json()
            .await
            .map_err(|e| ItemError {
                attempts: e.attempts().max(1),
                error: error_chain(&e),
            })?;
        let rows = validate(response.keywords)?;
        let keywords: Vec<&str> = rows.keys().map(|(k, _)| k.as_str()).collect();
        let recorded_at: Vec<DateTime<Utc>> = rows.keys().map(|(_, at)| *at).collect();
        let volume: Vec<i32> = rows.values().map(|r| r.search_volume).collect();
        let position: Vec<f64> = rows.values().map(|r| r.position).collect();
        let clicks: Vec<i64> = rows.values().map(|r| r.clicks).collect();
        let impressions: Vec<i64> = rows.values().map(|r| r.impressions).collect();
        let ctr: Vec<f64> = rows.values().map(|r| r.ctr).collect();
        let source_name = source.adapter.as_str();
        self.db
            .run(async |conn| {
                sqlx::query(
                    "INSERT INTO keyword_metrics (domain_id, source, keyword, recorded_at, \
                     search_volume, position, clicks, impressions, ctr) \
                     SELECT $1, $2, * FROM UNNEST($3::text[], $4::timestamptz[], $5::int4[], \
                     $6::float8[], $7::int8[], $8::int8[], $9::float8[]) \
                     ON CONFLICT (domain_id, source, keyword, recorded_at) WHERE source IS NOT NULL \
                     DO UPDATE SET search_volume = EXCLUDED.search_volume, position = EXCLUDED.position, \
                     clicks = EXCLUDED.clicks, impressions = EXCLUDED.impressions, ctr = EXCLUDED.ctr",
                )
                .bind(source.domain_id)
                .bind(source_name)
                .bind(&keywords)
                .bind(&recorded_at)
                .bind(&volume)
                .bind(&position)
                .bind(&clicks)
                .bind(&impressions)
                .bind(&ctr)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE domain_keyword_sources SET last_synced_at = now() \
                     WHERE domain_id = $1 AND adapter = $2",
                )
                .bind(source.domain_id)
                .bind(source_name)
                .execute(conn)
                .await
            })
            .await
            .map_err(|e| ItemError::once(format!("storing the keywords: {}", error_chain(&e))))?;
        Ok(ItemOutcome::Done)
    }
}

/// Checks every row (naming the first bad one) and keeps the last row per keyword and day.
fn validate(
    rows: Vec<ProviderKeyword>,
) -> Result<BTreeMap<(String, DateTime<Utc>), ProviderKeyword>, ItemError> {
    let mut out = BTreeMap::new();
    for (i, row) in rows.into_iter().enumerate() {
        let bad = |what: &str| ItemError::once(format!("provider row {i}: {what}"));
        let len = row.keyword.chars().count();
        if !(1..=500).contains(&len) || row.keyword.contains('\0') {
            return Err(bad("keyword must be 1 to 500 characters without NUL"));
        }
        if row.search_volume < 0 || row.clicks < 0 || row.impressions < 0 {
            return Err(bad("search_volume, clicks and impressions must be >= 0"));
        }
        if !(row.position.is_finite() && row.position >= 0.0) {
            return Err(bad("position must be a finite number >= 0"));
        }
        if !(0.0..=1.0).contains(&row.ctr) {
            return Err(bad("ctr must be between 0 and 1"));
        }
        let Some(midnight) = row.date.and_hms_opt(0, 0, 0) else {
            return Err(bad("date is not a valid day"));
        };
        out.insert((row.keyword.clone(), midnight.and_utc()), row);
    }
    Ok(out)
}

impl Operation for KeywordSync {
    type Item = KeywordSource;
    type Cursor = (Uuid, String);

    fn name(&self) -> OperationName {
        OperationName::KeywordSync
    }

    fn parallelism(&self) -> Parallelism {
        Parallelism::ItemsInBatch
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "gsc": self.providers.gsc.is_some(),
            "ahrefs": self.providers.ahrefs.is_some(),
        })
    }

    async fn load_page(
        &self,
        after: Option<(Uuid, String)>,
        limit: usize,
    ) -> anyhow::Result<Vec<KeywordSource>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Two statements rather than `$1 IS NULL OR (domain_id, adapter) > ($1, $2)`: under
        // a generic plan that OR keeps the keyset out of the primary key's index condition,
        // so every page would scan the table from its start.
        let rows: Vec<(Uuid, String, String)> = self
            .db
            .run(async |conn| match &after {
                None => {
                    sqlx::query_as(FIRST_PAGE_SQL)
                        .bind(limit)
                        .fetch_all(conn)
                        .await
                }
                Some((domain, adapter)) => {
                    sqlx::query_as(NEXT_PAGE_SQL)
                        .bind(domain)
                        .bind(adapter.as_str())
                        .bind(limit)
                        .fetch_all(conn)
                        .await
                }
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(domain_id, adapter, site)| KeywordSource {
                domain_id,
                adapter: AdapterName::parse(&adapter),
                site,
            })
            .collect())
    }

    fn cursor(&self, item: &KeywordSource) -> (Uuid, String) {
        (item.domain_id, item.adapter.as_str().to_owned())
    }

    fn item_id(&self, item: &KeywordSource) -> String {
        format!("{}/{}", item.domain_id, item.adapter)
    }

    async fn process_batch(
        &self,
        batch: Vec<KeywordSource>,
        concurrency: NonZeroUsize,
        stop: &Stop,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        each_item(batch, concurrency, stop, |s| {
            self.sync(s, stop.in_flight.clone())
        })
        .await
    }
}

#[cfg(test)]
mod plan_tests {
    //! The source pages scan the primary key from the keyset (an index condition, no sort),
    //! also as the generic plan a prepared statement switches to after five executions
    //! (`plan_cache_mode = force_generic_plan`).

    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use smartbeak_database::testing::{TestDatabase, explain_generic};
    use sqlx::Connection as _;
    use uuid::Uuid;

    use super::{FIRST_PAGE_SQL, NEXT_PAGE_SQL};

    #[tokio::test]
    async fn the_source_pages_start_at_the_keyset_also_in_a_generic_plan() {
        let tdb = TestDatabase::create().await.unwrap();
        let mut conn = sqlx::PgConnection::connect(tdb.url().expose())
            .await
            .unwrap();
        let org = Uuid::new_v4();
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'plans')")
            .bind(org)
            .execute(&mut conn)
            .await
            .unwrap();
        // 10,000 domains with both sources, fresh statistics.
        sqlx::query(
            "INSERT INTO domains (id, org_id, name) \
             SELECT gen_random_uuid(), $1, 'd' || i || '.example' FROM generate_series(1, 10000) i",
        )
        .bind(org)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO domain_keyword_sources (domain_id, adapter, site) \
             SELECT d.id, a, d.name FROM domains d, unnest(ARRAY['gsc', 'ahrefs']) a",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql("ANALYZE domains; ANALYZE domain_keyword_sources")
            .execute(&mut conn)
            .await
            .unwrap();

        let first = explain_generic(&mut conn, FIRST_PAGE_SQL, &["bigint"], &["100".to_owned()])
            .await
            .unwrap();
        assert!(first.contains("domain_keyword_sources_pkey"), "{first}");
        assert!(
            !first.contains("Sort"),
            "the order comes from the index:\n{first}"
        );

        let next = explain_generic(
            &mut conn,
            NEXT_PAGE_SQL,
            &["uuid", "text", "bigint"],
            &[
                format!("'{}'", Uuid::max()),
                "'gsc'".to_owned(),
                "100".to_owned(),
            ],
        )
        .await
        .unwrap();
        assert!(next.contains("domain_keyword_sources_pkey"), "{next}");
        assert!(
            !next.contains("Sort"),
            "the order comes from the index:\n{next}"
        );
        let cond: Vec<&str> = next.lines().filter(|l| l.contains("Index Cond")).collect();
        assert!(
            cond.iter().any(|l| l.contains("ROW(domain_id, adapter) >")),
            "the keyset must bound the index scan:\n{next}"
        );
        conn.close().await.unwrap();
        tdb.drop_database().await.unwrap();
    }
}
