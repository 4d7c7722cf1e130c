//! The HTTP routes, one module per resource, plus the extractors and pagination helpers
//! they share. Every extractor rejects with [`ApiError`], so every error has one shape.

pub mod analytics;
pub mod content;
pub mod domains;
pub mod exports;
pub mod health;
pub mod ingest;
pub mod settings;

use std::ops::RangeInclusive;

use axum::extract::{FromRequest, FromRequestParts};
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// `axum::Json` whose rejections are [`ApiError`]s (400 syntax, 422 shape, 413 size, 415).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s (400 naming `id`).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query` whose rejections are [`ApiError`]s (400).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Query parameters of the paginated lists.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 50).
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of items and the cursor of the next page (absent on the last page).
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items, oldest first (a domain's exports: newest first).
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Position after an item in `(created_at, id)` order. Opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last item seen.
    pub created_at: DateTime<Utc>,
    /// `id` of the last item seen.
    pub id: Uuid,
}

impl Cursor {
    /// Encodes as hex of `<unix micros>:<uuid>` (microseconds: PostgreSQL's precision).
    pub fn encode(&self) -> String {
        hex::encode(format!(
            "{}:{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    /// Decodes a cursor made by [`Cursor::encode`].
    pub fn decode(raw: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::validation("cursor", "is not a cursor returned by this api");
        let bytes = hex::decode(raw).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (micros, id) = text.split_once(':').ok_or_else(invalid)?;
        let micros: i64 = micros.parse().map_err(|_| invalid())?;
        let created_at = DateTime::from_timestamp_micros(micros)
            .filter(|at| YEARS.contains(&at.year()))
            .ok_or_else(invalid)?;
        Ok(Self {
            created_at,
            id: id.parse().map_err(|_| invalid())?,
        })
    }
}

impl PageQuery {
    /// The validated page size and decoded cursor.
    pub fn resolve(&self) -> Result<(i64, Option<Cursor>), ApiError> {
        let limit = self.limit.unwrap_or(50);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::validation("limit", "must be between 1 and 100"));
        }
        let cursor = self.cursor.as_deref().map(Cursor::decode).transpose()?;
        Ok((limit, cursor))
    }
}

/// Cuts `rows` (fetched with `limit + 1`) to a page, with the cursor after its last item.
pub fn paginate<T>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> Cursor) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| key(last).encode())
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

/// 404 unless domain `id` exists and belongs to `org_id`.
pub async fn require_domain(state: &AppState, org_id: Uuid, id: Uuid) -> Result<(), ApiError> {
    let found: Option<i32> = state
        .db
        .run(async |conn| {
            sqlx::query_scalar("SELECT 1 FROM domains WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(org_id)
                .fetch_optional(conn)
                .await
        })
        .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound("domain"))
}

/// The years a date or timestamp of a request may fall in (UTC). PostgreSQL would store
/// more (4713 BC to 294276 AD) and chrono parses more (±262143), but outside these years
/// the arithmetic and the database's range checks are where requests used to fail.
pub const YEARS: RangeInclusive<i32> = 1..=9999;

/// `at` itself, or 400 naming `field` unless it falls in the [`YEARS`] (UTC).
pub fn check_year(field: &str, at: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    if YEARS.contains(&at.year()) {
        Ok(at)
    } else {
        Err(year_out_of_range(field))
    }
}

/// The 400 of a date or timestamp outside the [`YEARS`].
pub fn year_out_of_range(field: &str) -> ApiError {
    ApiError::validation(field, "must be in the years 0001 to 9999 (UTC)")
}

/// 400 naming `field` if `value` contains a NUL character, which PostgreSQL cannot store in
/// text (SQLSTATE 22021) or JSON (22P05).
pub fn check_no_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::validation(
            field,
            "must not contain a NUL character (\\u0000)",
        ));
    }
    Ok(())
}

/// Validates a text field's length in characters (and that it has no NUL character).
pub fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ApiError::validation(
            field,
            format!("must be between {min} and {max} characters"),
        ));
    }
    if value.trim().is_empty() && min > 0 {
        return Err(ApiError::validation(field, "must not be blank"));
    }
    check_no_nul(field, value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in [
            "",
            "zz",
            "00",
            &hex::encode("1:not-a-uuid"),
            &hex::encode("x:y"),
        ] {
            let err = Cursor::decode(bad).unwrap_err();
            assert_eq!(err.code(), "VALIDATION_ERROR", "{bad}");
        }
    }

    #[test]
    fn page_limits() {
        let q = |limit| PageQuery {
            limit: Some(limit),
            cursor: None,
        };
        assert!(q(0).resolve().is_err());
        assert!(q(101).resolve().is_err());
        assert_eq!(q(100).resolve().unwrap().0, 100);
    }
}
