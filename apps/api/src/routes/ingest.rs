//! `POST /v1/domains/{id}/metrics`: bulk ingest of keyword metrics and content performance
//! rows. Every row is validated first (errors name the row and field, e.g.
//! `keywords[3].ctr`); then all rows go in with one `UNNEST` upsert per table, in one
//! transaction: either every row is stored or none is.
//!
//! Rows are upserted on their natural keys, a keyword's figures at one time
//! `(domain_id, keyword, recorded_at)` and a content item's `(content_id, recorded_at)`: a
//! row repeating a stored key replaces its figures, so a retried request (after a timeout
//! that followed a commit) stores nothing twice. A request naming one key twice is refused.
//! An `Idempotency-Key` ([`crate::idempotency`]) also replays the first response.

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, check_len, check_year};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::idempotency::{self, Claim, IdempotencyKey};
use crate::state::AppState;

/// Most rows accepted in one request (both lists together).
pub const MAX_ROWS: usize = 5_000;

/// One keyword's metrics at one time.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeywordMetric {
    /// 1 to 500 characters, not only whitespace.
    #[schema(min_length = 1, max_length = 500)]
    pub keyword: String,
    /// Monthly search volume, >= 0.
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "super::integer")]
    pub search_volume: i32,
    /// Average ranking position, >= 0.
    #[schema(minimum = 0)]
    pub position: f64,
    /// Clicks, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub clicks: i64,
    /// Impressions, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub impressions: i64,
    /// Click-through rate, 0 to 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub ctr: f64,
    /// When the figures were recorded, in the years 0001 to 9999 (UTC).
    pub recorded_at: DateTime<Utc>,
}

/// One content item's performance at one time.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPerformance {
    /// A content item of this domain.
    pub content_id: Uuid,
    /// Page views, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub page_views: i64,
    /// Unique visitors, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub unique_visitors: i64,
    /// Bounce rate, 0 to 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub bounce_rate: f64,
    /// Conversions, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub conversions: i64,
    /// Revenue in cents, >= 0.
    #[serde(default, deserialize_with = "super::integer")]
    #[schema(minimum = 0)]
    pub revenue_cents: i64,
    /// When the figures were recorded, in the years 0001 to 9999 (UTC).
    pub recorded_at: DateTime<Utc>,
}

/// Body of `POST /v1/domains/{id}/metrics`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestMetrics {
    /// Keyword rows.
    #[serde(default)]
    #[schema(max_items = 5000)]
    pub keywords: Vec<KeywordMetric>,
    /// Content performance rows.
    #[serde(default)]
    #[schema(max_items = 5000)]
    pub content: Vec<ContentPerformance>,
}

/// What was stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestResult {
    /// Keyword rows inserted (their natural key was new).
    pub keywords_inserted: u64,
    /// Content performance rows inserted (their natural key was new).
    pub content_inserted: u64,
    /// Keyword rows that replaced the figures of a stored row with the same
    /// `(keyword, recorded_at)`.
    pub keywords_updated: u64,
    /// Content performance rows that replaced the figures of a stored row with the same
    /// `(content_id, recorded_at)`.
    pub content_updated: u64,
}

/// Validates and upserts the rows in one transaction. With an `Idempotency-Key`, a repeat
/// within 24 hours gets the first 201 again without running.
#[utoipa::path(post, path = "/v1/domains/{id}/metrics", tag = "analytics", request_body = IngestMetrics,
    params(("id" = Uuid, Path, description = "domain id"), IdempotencyKey),
    security(("api_key" = [])),
    responses((status = 201, body = IngestResult), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "`UNKNOWN_CONTENT_ITEM`: a `content_id` is not a content item of this domain", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "`INVALID_BODY`, or `IDEMPOTENCY_KEY_REUSED`: the `Idempotency-Key` was used with another body", body = ErrorBody)))]
pub async fn ingest(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    idempotency_key: IdempotencyKey,
    ApiJson(body): ApiJson<IngestMetrics>,
) -> Result<Response, ApiError> {
    validate(&body)?;
    let mut tx = state.db.begin().await?;
    let claimed = match idempotency_key.key {
        None => None,
        Some(key) => {
            let scope = format!("ingest_metrics:{domain_id}");
            let hash = idempotency::body_hash(&body)?;
            match idempotency::claim(&mut tx, auth.org_id, scope, key, hash).await? {
                Claim::Replay(response) => return Ok(response),
                Claim::New(claimed) => Some(claimed),
            }
        }
    };
    let owned: Option<i32> = tx
        .run(async |conn| {
            sqlx::query_scalar("SELECT 1 FROM domains WHERE id = $1 AND org_id = $2 FOR SHARE")
                .bind(domain_id)
                .bind(auth.org_id)
                .fetch_optional(conn)
                .await
        })
        .await?;
    if owned.is_none() {
        return Err(ApiError::NotFound("domain"));
    }

    let wanted: Vec<Uuid> = body
        .content
        .iter()
        .map(|c| c.content_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !wanted.is_empty() {
        let found: Vec<Uuid> = tx
            .run(async |conn| {
                sqlx::query_scalar(
                    "SELECT id FROM content_items WHERE domain_id = $1 AND id = ANY($2)",
                )
                .bind(domain_id)
                .bind(&wanted)
                .fetch_all(conn)
                .await
            })
            .await?;
        let found: HashSet<Uuid> = found.into_iter().collect();
        if let Some(i) = body
            .content
            .iter()
            .position(|c| !found.contains(&c.content_id))
        {
            // 409, not 400: the body is valid, the domain's state does not have the item
            // (and not 404, which would say the domain itself is missing).
            return Err(ApiError::Conflict {
                code: "UNKNOWN_CONTENT_ITEM",
                message: format!("content[{i}].content_id: not a content item of this domain"),
            });
        }
    }

    let (mut keywords_inserted, mut keywords_updated) = (0, 0);
    if !body.keywords.is_empty() {
        let k = &body.keywords;
        (keywords_inserted, keywords_updated) = tx.run(async |conn| sqlx::query_as::<_, (i64, i64)>(
                    "WITH stored AS ( \
                     INSERT INTO keyword_metrics \
                     (domain_id, keyword, search_volume, position, clicks, impressions, ctr, recorded_at) \
                     SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::float8[], $5::int8[], \
                     $6::int8[], $7::float8[], $8::timestamptz[]) \
                     ON CONFLICT (domain_id, keyword, recorded_at) WHERE source IS NULL DO UPDATE SET \
                     search_volume = EXCLUDED.search_volume, position = EXCLUDED.position, \
                     clicks = EXCLUDED.clicks, impressions = EXCLUDED.impressions, ctr = EXCLUDED.ctr \
                     RETURNING xmax = 0 AS inserted) \
                     SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) \
                     FROM stored",
                )
                .bind(domain_id)
                .bind(k.iter().map(|r| r.keyword.clone()).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.search_volume).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.position).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.clicks).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.impressions).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.ctr).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.recorded_at).collect::<Vec<_>>())
                .fetch_one(conn).await)
            .await?;
    }
    let (mut content_inserted, mut content_updated) = (0, 0);
    if !body.content.is_empty() {
        let c = &body.content;
        (content_inserted, content_updated) = tx.run(async |conn| sqlx::query_as::<_, (i64, i64)>(
                    "WITH stored AS ( \
                     INSERT INTO content_performance \
                     (domain_id, content_id, page_views, unique_visitors, bounce_rate, conversions, \
                     revenue_cents, recorded_at) \
                     SELECT $1, * FROM UNNEST($2::uuid[], $3::int8[], $4::int8[], $5::float8[], \
                     $6::int8[], $7::int8[], $8::timestamptz[]) \
                     ON CONFLICT (content_id, recorded_at) DO UPDATE SET \
                     page_views = EXCLUDED.page_views, unique_visitors = EXCLUDED.unique_visitors, \
                     bounce_rate = EXCLUDED.bounce_rate, conversions = EXCLUDED.conversions, \
                     revenue_cents = EXCLUDED.revenue_cents \
                     RETURNING xmax = 0 AS inserted) \
                     SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) \
                     FROM stored",
                )
                .bind(domain_id)
                .bind(c.iter().map(|r| r.content_id).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.page_views).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.unique_visitors).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.bounce_rate).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.conversions).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.revenue_cents).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.recorded_at).collect::<Vec<_>>())
                .fetch_one(conn).await)
            .await?;
    }
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let result = IngestResult {
        keywords_inserted: count(keywords_inserted),
        content_inserted: count(content_inserted),
        keywords_updated: count(keywords_updated),
        content_updated: count(content_updated),
    };
    if let Some(claimed) = claimed {
        claimed
            .store(&mut tx, StatusCode::CREATED, &result, None)
            .await?;
    }
    tx.commit().await?;
    state.analytics.invalidate_domain(domain_id);
    metrics::counter!("metrics_rows_ingested_total", "table" => "keyword_metrics")
        .increment(result.keywords_inserted + result.keywords_updated);
    metrics::counter!("metrics_rows_ingested_total", "table" => "content_performance")
        .increment(result.content_inserted + result.content_updated);
    Ok(idempotency::respond(StatusCode::CREATED, &result, None))
}

/// Checks every row; the first problem is reported with its row index and field.
pub fn validate(body: &IngestMetrics) -> Result<(), ApiError> {
    let rows = body.keywords.len() + body.content.len();
    if rows == 0 {
        return Err(ApiError::validation(
            "keywords",
            "at least one row is required",
        ));
    }
    if rows > MAX_ROWS {
        return Err(ApiError::validation(
            "keywords",
            format!("at most {MAX_ROWS} rows per request"),
        ));
    }
    for (i, row) in body.keywords.iter().enumerate() {
        let field = |name: &str| format!("keywords[{i}].{name}");
        check_len(&field("keyword"), &row.keyword, 1, 500)?;
        non_negative(&field("search_volume"), i64::from(row.search_volume))?;
        if !row.position.is_finite() || row.position < 0.0 {
            return Err(ApiError::validation(
                field("position"),
                "must be a number >= 0",
            ));
        }
        non_negative(&field("clicks"), row.clicks)?;
        non_negative(&field("impressions"), row.impressions)?;
        unit_interval(&field("ctr"), row.ctr)?;
        check_year(&field("recorded_at"), row.recorded_at)?;
    }
    let mut keys = HashMap::new();
    for (i, row) in body.keywords.iter().enumerate() {
        if let Some(first) = keys.insert((row.keyword.as_str(), stored_micros(row.recorded_at)), i)
        {
            return Err(ApiError::validation(
                format!("keywords[{i}]"),
                format!("repeats the keyword and recorded_at of keywords[{first}]"),
            ));
        }
    }
    let mut keys = HashMap::new();
    for (i, row) in body.content.iter().enumerate() {
        if let Some(first) = keys.insert((row.content_id, stored_micros(row.recorded_at)), i) {
            return Err(ApiError::validation(
                format!("content[{i}]"),
                format!("repeats the content_id and recorded_at of content[{first}]"),
            ));
        }
    }
    for (i, row) in body.content.iter().enumerate() {
        let field = |name: &str| format!("content[{i}].{name}");
        non_negative(&field("page_views"), row.page_views)?;
        non_negative(&field("unique_visitors"), row.unique_visitors)?;
        unit_interval(&field("bounce_rate"), row.bounce_rate)?;
        non_negative(&field("conversions"), row.conversions)?;
        non_negative(&field("revenue_cents"), row.revenue_cents)?;
        check_year(&field("recorded_at"), row.recorded_at)?;
    }
    Ok(())
}

/// The instant as PostgreSQL stores it (whole microseconds, as sqlx encodes a
/// `timestamptz`): two rows equal here are one natural key to the table.
fn stored_micros(at: DateTime<Utc>) -> Option<i64> {
    let postgres_epoch = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
    (at - postgres_epoch).num_microseconds()
}

fn non_negative(field: &str, value: i64) -> Result<(), ApiError> {
    if value < 0 {
        return Err(ApiError::validation(field, "must be >= 0"));
    }
    Ok(())
}

fn unit_interval(field: &str, value: f64) -> Result<(), ApiError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(ApiError::validation(field, "must be between 0 and 1"));
    }
    Ok(())
}
