//! `POST /v1/domains/{id}/metrics`: bulk ingest of keyword metrics and content performance
//! rows. Every row is validated first (errors name the row and field, e.g.
//! `keywords[3].ctr`); then all rows go in with one `UNNEST` insert per table, in one
//! transaction: either every row is stored or none is.

use std::collections::HashSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, check_len, check_year};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
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
#[derive(Debug, Deserialize, ToSchema)]
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
    /// Keyword rows inserted.
    pub keywords_inserted: u64,
    /// Content performance rows inserted.
    pub content_inserted: u64,
}

/// Validates and stores the rows in one transaction.
#[utoipa::path(post, path = "/v1/domains/{id}/metrics", tag = "analytics", request_body = IngestMetrics,
    params(("id" = Uuid, Path, description = "domain id")),
    security(("api_key" = [])),
    responses((status = 201, body = IngestResult), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "`UNKNOWN_CONTENT_ITEM`: a `content_id` is not a content item of this domain", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn ingest(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<IngestMetrics>,
) -> Result<(StatusCode, Json<IngestResult>), ApiError> {
    validate(&body)?;
    let mut tx = state.db.begin().await?;
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

    let mut keywords_inserted = 0;
    if !body.keywords.is_empty() {
        let k = &body.keywords;
        keywords_inserted = tx.run(async |conn| sqlx::query(
                    "INSERT INTO keyword_metrics \
                     (domain_id, keyword, search_volume, position, clicks, impressions, ctr, recorded_at) \
                     SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::float8[], $5::int8[], \
                     $6::int8[], $7::float8[], $8::timestamptz[])",
                )
                .bind(domain_id)
                .bind(k.iter().map(|r| r.keyword.clone()).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.search_volume).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.position).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.clicks).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.impressions).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.ctr).collect::<Vec<_>>())
                .bind(k.iter().map(|r| r.recorded_at).collect::<Vec<_>>())
                .execute(conn).await)
            .await?
            .rows_affected();
    }
    let mut content_inserted = 0;
    if !body.content.is_empty() {
        let c = &body.content;
        content_inserted = tx.run(async |conn| sqlx::query(
                    "INSERT INTO content_performance \
                     (domain_id, content_id, page_views, unique_visitors, bounce_rate, conversions, \
                     revenue_cents, recorded_at) \
                     SELECT $1, * FROM UNNEST($2::uuid[], $3::int8[], $4::int8[], $5::float8[], \
                     $6::int8[], $7::int8[], $8::timestamptz[])",
                )
                .bind(domain_id)
                .bind(c.iter().map(|r| r.content_id).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.page_views).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.unique_visitors).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.bounce_rate).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.conversions).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.revenue_cents).collect::<Vec<_>>())
                .bind(c.iter().map(|r| r.recorded_at).collect::<Vec<_>>())
                .execute(conn).await)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    state.analytics.invalidate_domain(domain_id);
    metrics::counter!("metrics_rows_ingested_total", "table" => "keyword_metrics")
        .increment(keywords_inserted);
    metrics::counter!("metrics_rows_ingested_total", "table" => "content_performance")
        .increment(content_inserted);
    Ok((
        StatusCode::CREATED,
        Json(IngestResult {
            keywords_inserted,
            content_inserted,
        }),
    ))
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
