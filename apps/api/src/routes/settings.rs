//! `/v1/domains/{id}/settings`: a domain's settings, one JSON object, replaced as a whole.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, check_no_nul, require_domain};
use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// A domain's settings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DomainSettings {
    /// The domain.
    pub domain_id: Uuid,
    /// Any JSON object.
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// Last change (`null` if never set).
    pub updated_at: Option<DateTime<Utc>>,
}

/// Replaces a domain's settings with the JSON object in the body.
#[utoipa::path(put, path = "/v1/domains/{id}/settings", tag = "settings",
    params(("id" = Uuid, Path, description = "domain id")),
    request_body(content = Object, description = "any JSON object"),
    security(("api_key" = [])),
    responses((status = 200, body = DomainSettings), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn put(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
    ApiJson(settings): ApiJson<serde_json::Value>,
) -> Result<Json<DomainSettings>, ApiError> {
    if !settings.is_object() {
        return Err(ApiError::validation("settings", "must be a JSON object"));
    }
    check_strings("settings", &settings)?;
    let row: Option<(Uuid, sqlx::types::Json<serde_json::Value>, DateTime<Utc>)> = state
        .db
        .run(async |conn| sqlx::query_as(
                "INSERT INTO domain_settings (domain_id, settings, updated_at) \
                 SELECT d.id, $2, now() FROM domains d WHERE d.id = $1 AND d.org_id = $3 \
                 ON CONFLICT (domain_id) DO UPDATE SET settings = EXCLUDED.settings, updated_at = now() \
                 RETURNING domain_id, settings, updated_at",
            )
            .bind(domain_id)
            .bind(sqlx::types::Json(&settings))
            .bind(auth.org_id)
            .fetch_optional(conn).await)
        .await?;
    let (domain_id, settings, updated_at) = row.ok_or(ApiError::NotFound("domain"))?;
    Ok(Json(DomainSettings {
        domain_id,
        settings: settings.0,
        updated_at: Some(updated_at),
    }))
}

/// Rejects a NUL character in any key or string of `value` (PostgreSQL's `jsonb` cannot
/// store `\u0000`: SQLSTATE 22P05), naming its path, e.g. `settings.seo.titles[2]`.
/// The depth is bounded by serde_json's recursion limit (128).
fn check_strings(path: &str, value: &serde_json::Value) -> Result<(), ApiError> {
    match value {
        serde_json::Value::String(s) => check_no_nul(path, s),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_strings(&format!("{path}[{i}]"), item)),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            let path = format!("{path}.{}", key.replace('\0', "\\u0000"));
            check_no_nul(&path, key)?;
            check_strings(&path, item)
        }),
        _ => Ok(()),
    }
}

/// Reads a domain's settings (`{}` if never set).
#[utoipa::path(get, path = "/v1/domains/{id}/settings", tag = "settings",
    params(("id" = Uuid, Path, description = "domain id")),
    security(("api_key" = [])),
    responses((status = 200, body = DomainSettings), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath(domain_id): ApiPath<Uuid>,
) -> Result<Json<DomainSettings>, ApiError> {
    require_domain(&state, auth.org_id, domain_id).await?;
    let row: Option<(sqlx::types::Json<serde_json::Value>, DateTime<Utc>)> = state
        .db
        .run(async |conn| {
            sqlx::query_as("SELECT settings, updated_at FROM domain_settings WHERE domain_id = $1")
                .bind(domain_id)
                .fetch_optional(conn)
                .await
        })
        .await?;
    Ok(Json(match row {
        Some((settings, updated_at)) => DomainSettings {
            domain_id,
            settings: settings.0,
            updated_at: Some(updated_at),
        },
        None => DomainSettings {
            domain_id,
            settings: serde_json::json!({}),
            updated_at: None,
        },
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn every_number_jsonb_stores_reads_back() {
        use smartbeak_database::testing::TestDatabase;

        let tdb = TestDatabase::create().await.unwrap();
        let pool = sqlx::PgPool::connect(tdb.url().expose()).await.unwrap();
        // jsonb prints numbers in plain notation (f64::MAX as 309 digits); without
        // serde_json's float_roundtrip some of those parsed to infinity: a 500 on GET.
        let value = json!({"max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "big": 1.0e300, "n": [-0.0, 0.1, 1e22]});
        let (back,): (sqlx::types::Json<serde_json::Value>,) = sqlx::query_as("SELECT $1::jsonb")
            .bind(sqlx::types::Json(&value))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            back.0,
            json!({"max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "big": 1.0e300, "n": [0.0, 0.1, 1e22]})
        );
        pool.close().await;
        tdb.drop_database().await.unwrap();
    }

    #[test]
    fn nul_characters_are_found_anywhere_and_named_by_path() {
        assert!(check_strings("settings", &json!({"a": ["x", {"b": "ok"}], "n": 1})).is_ok());
        for (value, field) in [
            (json!({"theme": "da\u{0}rk"}), "settings.theme"),
            (json!({"a": {"b": ["x", "y\u{0}"]}}), "settings.a.b[1]"),
            (json!({"k\u{0}ey": 1}), "settings.k\\u0000ey"),
        ] {
            let err = check_strings("settings", &value).unwrap_err();
            assert_eq!(err.code(), "VALIDATION_ERROR");
            assert!(
                err.to_string().starts_with(&format!("{field}: ")),
                "{field}: {err}"
            );
        }
    }
}
