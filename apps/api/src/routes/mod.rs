//! The HTTP routes, one module per resource, plus the extractors and pagination helpers
//! they share. Every extractor rejects with [`ApiError`], so every error has one shape.

pub mod analytics;
pub mod content;
pub mod domains;
pub mod exports;
pub mod health;
pub mod ingest;
#[cfg(test)]
mod list_plans;
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

/// The `pattern` of a cursor in the OpenAPI document: lowercase hex of `<micros>:<uuid>`
/// (an optional `-`, 1 to 16 digits, `:`, a lowercase hyphenated UUID). Every string it
/// matches decodes to a position in the [`YEARS`], and [`Cursor::decode`] accepts nothing
/// else, so the document and the handler agree.
pub const CURSOR_PATTERN: &str = r"^(2d)?(3[0-9]){1,16}3a(3[0-9]|6[1-6]){8}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){12}$";

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

    /// Decodes a cursor made by [`Cursor::encode`]: exactly the strings of
    /// [`CURSOR_PATTERN`] (lowercase hex, at most 16 digits, a hyphenated lowercase UUID).
    pub fn decode(raw: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::validation("cursor", "is not a cursor returned by this api");
        if raw.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        let bytes = hex::decode(raw).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let (micros, id) = text.split_once(':').ok_or_else(invalid)?;
        let digits = micros.strip_prefix('-').unwrap_or(micros);
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let canonical_uuid = id.len() == 36
            && id
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !canonical_uuid {
            return Err(invalid());
        }
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

/// Deserializes an integer field as JSON Schema defines integers: `247` and also `247.0`
/// or `2.47e2` (a number with no fractional part), within the range of `T`.
pub fn integer<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    struct Integral;

    impl serde::de::Visitor<'_> for Integral {
        type Value = i64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("integer out of range"))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // 2^63 is exact in f64; every f64 in [-2^63, 2^63) with no fraction fits i64.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                #[allow(clippy::cast_possible_truncation)]
                Ok(v as i64)
            } else {
                Err(E::custom(format!("expected an integer, found {v}")))
            }
        }
    }

    let value = deserializer.deserialize_any(Integral)?;
    T::try_from(value).map_err(|_| serde::de::Error::custom("integer out of range"))
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

/// The `pattern` of a required text field in the OpenAPI document: no NUL character and at
/// least one character that is not Unicode `White_Space` (what [`check_len`] enforces with
/// `min > 0`, as [`char::is_whitespace`]). The 25 code points are spelled out as `\uXXXX`
/// rather than `\s`, whose meaning differs between regex engines.
pub const TEXT_PATTERN: &str = concat!(
    r"^[^\u0000]*[^\u0000",
    r"\u0009-\u000D\u0020\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000",
    r"][^\u0000]*$"
);

/// The `pattern` of an optional text field: no NUL character.
pub const NO_NUL_PATTERN: &str = r"^[^\u0000]*$";

/// Validates a text field's length in characters (and that it has no NUL character and,
/// with `min > 0`, is not blank: Unicode whitespace only).
pub fn check_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ApiError::validation(
            field,
            format!("must be between {min} and {max} characters"),
        ));
    }
    if min > 0 && value.chars().all(char::is_whitespace) {
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
            &hex::encode(format!("1:{}", Uuid::nil().simple())),
            &hex::encode(format!("12345678901234567:{}", Uuid::nil())),
            &cursor.encode().to_uppercase(),
        ] {
            let err = Cursor::decode(bad).unwrap_err();
            assert_eq!(err.code(), "VALIDATION_ERROR", "{bad}");
        }
    }

    #[test]
    fn the_documented_cursor_pattern_is_what_decode_accepts() {
        let pattern = regex::Regex::new(CURSOR_PATTERN).unwrap();
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(-1_234).unwrap(),
            id: Uuid::new_v4(),
        };
        assert!(pattern.is_match(&cursor.encode()));
        // The extremes of the pattern decode to positions in the years.
        for micros in ["9999999999999999", "-9999999999999999", "0"] {
            let raw = hex::encode(format!("{micros}:{}", Uuid::nil()));
            assert!(pattern.is_match(&raw), "{raw}");
            assert!(Cursor::decode(&raw).is_ok(), "{micros}");
        }
        for bad in [
            hex::encode(format!("12345678901234567:{}", Uuid::nil())),
            hex::encode("1:A0000000-0000-4000-8000-00000000000A"),
            cursor.encode().to_uppercase(),
        ] {
            assert!(!pattern.is_match(&bad), "{bad}");
            assert!(Cursor::decode(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn integers_with_a_zero_fraction_are_integers() {
        #[derive(Deserialize)]
        struct Row {
            #[serde(deserialize_with = "integer")]
            n: i32,
        }
        let n = |json: &str| serde_json::from_str::<Row>(json).map(|r| r.n);
        assert_eq!(n(r#"{"n": 247}"#).unwrap(), 247);
        assert_eq!(n(r#"{"n": 247.0}"#).unwrap(), 247);
        assert_eq!(n(r#"{"n": 2.47e2}"#).unwrap(), 247);
        assert_eq!(n(r#"{"n": -3.0}"#).unwrap(), -3);
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": 3e9}"#,
            r#"{"n": "1"}"#,
            r#"{"n": 1e300}"#,
        ] {
            assert!(n(bad).is_err(), "{bad}");
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
