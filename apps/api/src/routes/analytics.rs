//! `GET /v1/domains/{id}/analytics?from&to`: keyword and content aggregates over a range.
//!
//! `from` and `to` are RFC 3339 timestamps or dates (`YYYY-MM-DD`, midnight UTC); `from` is
//! inclusive, `to` exclusive, except that a bare date as `to` includes that whole day.
//! Default: the 30 days up to the end of today (UTC), so that default requests made during a
//! day share one cache entry.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::{ApiPath, ApiQuery, YEARS, check_year, year_out_of_range};
use crate::analytics::{AnalyticsKey, AnalyticsReport};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Longest range one request may aggregate.
pub const MAX_RANGE_DAYS: i64 = 366;

/// Query of the analytics endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// Start, RFC 3339 or `YYYY-MM-DD` (inclusive).
    pub from: Option<String>,
    /// End, RFC 3339 (exclusive) or `YYYY-MM-DD` (that day included).
    pub to: Option<String>,
}

/// Aggregates for a domain over a range, from the analytics pool.
#[utoipa::path(get, path = "/v1/domains/{id}/analytics", tag = "analytics",
    params(("id" = Uuid, Path, description = "domain id"), RangeQuery),
    security(("api_key" = [])),
    responses((status = 200, body = AnalyticsReport), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<RangeQuery>,
) -> Result<Response, ApiError> {
    let (from, to) = resolve_range(&query, Utc::now())?;
    let report = state
        .analytics
        .get(
            &state.db,
            AnalyticsKey {
                org_id: auth.org_id,
                domain_id,
                from,
                to,
            },
        )
        .await?;
    // The JSON serialised once when the report was computed; a clone of `Bytes` is a
    // reference count.
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        report.json.clone(),
    )
        .into_response())
}

/// Parses and checks `from`/`to` (reversed ranges, ranges over a year and dates outside
/// the years 0001 to 9999 are 400). No arithmetic here can overflow: it is checked.
pub fn resolve_range(
    query: &RangeQuery,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = match &query.to {
        Some(raw) => parse_instant("to", raw, true)?,
        None => start_of_day(now.date_naive().checked_add_days(Days::new(1)))
            .ok_or_else(|| ApiError::validation("to", "out of range"))?,
    };
    let from = match &query.from {
        Some(raw) => parse_instant("from", raw, false)?,
        None => to
            .checked_sub_signed(chrono::Duration::days(30))
            .filter(|from| YEARS.contains(&from.year()))
            .ok_or_else(|| {
                ApiError::validation(
                    "to",
                    "is too early for the default 30-day range; give from as well",
                )
            })?,
    };
    if from > to {
        return Err(ApiError::validation("from", "must not be after to"));
    }
    if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::validation(
            "to",
            format!("the range must be at most {MAX_RANGE_DAYS} days"),
        ));
    }
    Ok((from, to))
}

/// RFC 3339, or a date (its midnight; the next midnight when `end_of_day`), in the years
/// 0001 to 9999 (a timestamp in UTC; a date as written, so `9999-12-31` as an end is valid).
pub fn parse_instant(field: &str, raw: &str, end_of_day: bool) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return check_year(field, t.with_timezone(&Utc));
    }
    let invalid =
        || ApiError::validation(field, "must be an RFC 3339 timestamp or a YYYY-MM-DD date");
    let date = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| invalid())?;
    if !YEARS.contains(&date.year()) {
        return Err(year_out_of_range(field));
    }
    let date = if end_of_day {
        date.checked_add_days(Days::new(1))
    } else {
        Some(date)
    };
    start_of_day(date).ok_or_else(invalid)
}

fn start_of_day(date: Option<NaiveDate>) -> Option<DateTime<Utc>> {
    Some(date?.and_hms_opt(0, 0, 0)?.and_utc())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn q(from: Option<&str>, to: Option<&str>) -> RangeQuery {
        RangeQuery {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
        }
    }

    #[test]
    fn ranges() {
        let now = DateTime::parse_from_rfc3339("2026-03-10T15:00:00Z")
            .unwrap()
            .to_utc();
        let (from, to) = resolve_range(&q(None, None), now).unwrap();
        assert_eq!(to.to_rfc3339(), "2026-03-11T00:00:00+00:00");
        assert_eq!(from.to_rfc3339(), "2026-02-09T00:00:00+00:00");

        let (from, to) = resolve_range(&q(Some("2026-01-01"), Some("2026-01-31")), now).unwrap();
        assert_eq!(from.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(to.to_rfc3339(), "2026-02-01T00:00:00+00:00");

        let err = resolve_range(&q(Some("2026-02-01"), Some("2026-01-01")), now).unwrap_err();
        assert_eq!(err.to_string(), "from: must not be after to");
        assert!(resolve_range(&q(Some("2020-01-01"), Some("2026-01-01")), now).is_err());
        let err = resolve_range(&q(Some("yesterday"), None), now).unwrap_err();
        assert!(err.to_string().starts_with("from:"));
    }

    #[test]
    fn extreme_dates_are_400_naming_the_field_never_a_panic() {
        let now = Utc::now();
        for (from, to, field) in [
            // Used to panic in `to - 30 days` (chrono's range ends at year -262143).
            (None, Some("-262143-01-01"), "to:"),
            (None, Some("+262142-12-31"), "to:"),
            (Some("-262143-01-01"), Some("2026-01-01"), "from:"),
            (Some("0000-12-31"), Some("0001-01-05"), "from:"),
            (None, Some("+10000-01-01"), "to:"),
            (None, Some("9999-12-31T23:00:00-05:00"), "to:"),
            (Some("0000-12-31T23:00:00Z"), None, "from:"),
            // The default `from` would fall before the year 1.
            (None, Some("0001-01-10"), "to:"),
        ] {
            let err = resolve_range(&q(from, to), now).unwrap_err();
            assert_eq!(err.code(), "VALIDATION_ERROR");
            assert!(err.to_string().starts_with(field), "{from:?} {to:?}: {err}");
        }
        // The edges themselves are valid.
        let (from, to) = resolve_range(&q(Some("0001-01-01"), Some("0001-12-31")), now).unwrap();
        assert_eq!(from.year(), 1);
        assert_eq!(to.to_rfc3339(), "0002-01-01T00:00:00+00:00");
        let (_, to) = resolve_range(&q(Some("9999-12-01"), Some("9999-12-31")), now).unwrap();
        assert_eq!(to.year(), 10_000, "a bare end date includes its whole day");
    }
}
