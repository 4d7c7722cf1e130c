//! `/v1/domains/{id}/settings`: a domain's settings, one JSON object, replaced as a whole.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, require_domain};
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
    let row: Option<(Uuid, sqlx::types::Json<serde_json::Value>, DateTime<Utc>)> = state
        .db
        .bounded(
            sqlx::query_as(
                "INSERT INTO domain_settings (domain_id, settings, updated_at) \
                 SELECT d.id, $2, now() FROM domains d WHERE d.id = $1 AND d.org_id = $3 \
                 ON CONFLICT (domain_id) DO UPDATE SET settings = EXCLUDED.settings, updated_at = now() \
                 RETURNING domain_id, settings, updated_at",
            )
            .bind(domain_id)
            .bind(sqlx::types::Json(&settings))
            .bind(auth.org_id)
            .fetch_optional(state.db.primary()),
        )
        .await?;
    let (domain_id, settings, updated_at) = row.ok_or(ApiError::NotFound("domain"))?;
    Ok(Json(DomainSettings {
        domain_id,
        settings: settings.0,
        updated_at: Some(updated_at),
    }))
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
        .bounded(
            sqlx::query_as("SELECT settings, updated_at FROM domain_settings WHERE domain_id = $1")
                .bind(domain_id)
                .fetch_optional(state.db.primary()),
        )
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
