//! `Idempotency-Key` on the api's non-idempotent writes (`POST .../metrics`,
//! `POST .../exports`): the first successful response to a key is stored in PostgreSQL
//! (`idempotency_keys`) for [`TTL`], and a request repeating the key with the same body gets
//! that response again without running; with another body, 422 `IDEMPOTENCY_KEY_REUSED`.
//!
//! The record is written in the transaction of the request's own work ([`claim`] first,
//! [`Claimed::store`] before the commit), so the work and its record commit together: a
//! request that fails leaves no record (a retry runs again), and a concurrent request with
//! the same key waits on the row's primary key until the first commits (then replays its
//! response) or rolls back (then runs itself). Two requests with one key never both run.

use std::time::Duration;

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use smartbeak_database::{DbError, Tx};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::ApiError;

/// How long a key's first response is kept and replayed.
pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The request header.
pub const HEADER: &str = "idempotency-key";

/// Set (`true`) on a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Longest key accepted.
pub const MAX_LEN: usize = 255;

/// The `pattern` of a key in the OpenAPI document: what [`IdempotencyKey`] accepts
/// (visible ASCII, no spaces).
pub const PATTERN: &str = "^[!-~]{1,255}$";

/// The optional `Idempotency-Key` header of a request: 1 to 255 visible ASCII characters
/// (`!` to `~`); anything else is 400 naming the header.
#[derive(Debug, Clone, Default, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// A client-chosen key (e.g. a UUID), 1 to 255 visible ASCII characters. A request
    /// repeating a key within 24 hours with the same body gets the first successful
    /// response again (with `Idempotent-Replayed: true`) without running; with another
    /// body, 422 `IDEMPOTENCY_KEY_REUSED`.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[!-~]{1,255}$"
    )]
    pub key: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(Self { key: None });
        };
        if values.next().is_some() {
            return Err(ApiError::validation("Idempotency-Key", "must be sent once"));
        }
        parse(value.as_bytes()).map(|key| Self { key: Some(key) })
    }
}

fn parse(raw: &[u8]) -> Result<String, ApiError> {
    if raw.is_empty() || raw.len() > MAX_LEN || !raw.iter().all(|b| (b'!'..=b'~').contains(b)) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters (no spaces)",
        ));
    }
    // Visible ASCII is UTF-8.
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// The SHA-256 of a request body as the handler parsed it (so whitespace and key order do
/// not make two equal bodies differ).
pub fn body_hash(body: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(ApiError::internal)?;
    Ok(Sha256::digest(&bytes).to_vec())
}

/// What [`claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// The key is new (or its record expired): run the request, then [`Claimed::store`].
    New(Claimed),
    /// The key's first response, to send again.
    Replay(Response),
}

/// A key this transaction holds: its row is inserted and locked until the commit.
#[derive(Debug)]
pub struct Claimed {
    org_id: Uuid,
    scope: String,
    key: String,
}

/// Claims `key` for the operation `scope` of `org_id` in `tx`, or finds its stored
/// response: [`Claim::Replay`] when the stored body hash is `hash`, 422
/// [`ApiError::IdempotencyKeyReused`] when it is not.
///
/// The `INSERT ... ON CONFLICT` waits for a transaction holding the same key to end; an
/// expired record is taken over (`DO UPDATE ... WHERE expires_at <= now()`).
pub async fn claim(
    tx: &mut Tx,
    org_id: Uuid,
    scope: String,
    key: String,
    hash: Vec<u8>,
) -> Result<Claim, ApiError> {
    let ttl_secs = TTL.as_secs_f64();
    let claimed: Option<i32> = tx
        .run(async |conn| {
            sqlx::query_scalar(
                "INSERT INTO idempotency_keys (org_id, scope, key, request_hash, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
                 ON CONFLICT (org_id, scope, key) DO UPDATE SET \
                     request_hash = EXCLUDED.request_hash, response_status = NULL, \
                     response_body = NULL, location = NULL, created_at = now(), \
                     expires_at = EXCLUDED.expires_at \
                 WHERE idempotency_keys.expires_at <= now() \
                 RETURNING 1",
            )
            .bind(org_id)
            .bind(&scope)
            .bind(&key)
            .bind(&hash)
            .bind(ttl_secs)
            .fetch_optional(conn)
            .await
        })
        .await?;
    if claimed.is_some() {
        return Ok(Claim::New(Claimed { org_id, scope, key }));
    }
    type Stored = (Vec<u8>, Option<i16>, Option<Vec<u8>>, Option<String>);
    let stored: Option<Stored> = tx
        .run(async |conn| {
            sqlx::query_as(
                "SELECT request_hash, response_status, response_body, location \
                 FROM idempotency_keys WHERE org_id = $1 AND scope = $2 AND key = $3",
            )
            .bind(org_id)
            .bind(&scope)
            .bind(&key)
            .fetch_optional(conn)
            .await
        })
        .await?;
    let Some((stored_hash, Some(status), Some(body), location)) = stored else {
        // The conflict's row is committed, unexpired, and complete (it is written whole by
        // one transaction); anything else is a bug.
        return Err(ApiError::internal(
            "idempotency record missing after a conflict",
        ));
    };
    if stored_hash != hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    metrics::counter!("idempotent_replays_total").increment(1);
    Ok(Claim::Replay(replay(status, body, location)?))
}

impl Claimed {
    /// Stores the response (status, JSON body, `Location`) in the claiming transaction.
    pub async fn store(
        self,
        tx: &mut Tx,
        status: StatusCode,
        body: &impl Serialize,
        location: Option<&str>,
    ) -> Result<(), ApiError> {
        let body = serde_json::to_vec(body).map_err(ApiError::internal)?;
        let status = i16::try_from(status.as_u16()).map_err(ApiError::internal)?;
        tx.run(async |conn| {
            sqlx::query(
                "UPDATE idempotency_keys SET response_status = $4, response_body = $5, \
                 location = $6 WHERE org_id = $1 AND scope = $2 AND key = $3",
            )
            .bind(self.org_id)
            .bind(&self.scope)
            .bind(&self.key)
            .bind(status)
            .bind(&body)
            .bind(location)
            .execute(conn)
            .await
        })
        .await?;
        Ok(())
    }
}

/// A response of `status` with the JSON `body` (and `Location`), as a handler sends it.
pub fn respond(status: StatusCode, body: &impl Serialize, location: Option<&str>) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn replay(status: i16, body: Vec<u8>, location: Option<String>) -> Result<Response, ApiError> {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| ApiError::internal(format!("stored status {status} is not a status")))?;
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Deletes up to `limit` expired records; how many went.
pub async fn purge_expired(db: &smartbeak_database::Database, limit: i64) -> Result<u64, DbError> {
    let done = db
        .run(async |conn| {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE (org_id, scope, key) IN ( \
                     SELECT org_id, scope, key FROM idempotency_keys \
                     WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
            )
            .bind(limit)
            .execute(conn)
            .await
        })
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(parse(b"abc-123_~!").unwrap(), "abc-123_~!");
        assert!(parse(&[b'a'; MAX_LEN]).is_ok());
        for bad in [
            &b""[..],
            b"a b",
            b"\x7f",
            "é".as_bytes(),
            &[b'a'; MAX_LEN + 1],
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().starts_with("Idempotency-Key:"), "{err}");
        }
    }

    #[test]
    fn equal_bodies_hash_equal() {
        let a = serde_json::json!({"a": 1, "b": [1, 2]});
        let b: serde_json::Value = serde_json::from_str("{ \"b\": [1,2], \"a\": 1 }").unwrap();
        assert_eq!(body_hash(&a).unwrap(), body_hash(&b).unwrap());
        assert_ne!(
            body_hash(&a).unwrap(),
            body_hash(&serde_json::json!({"a": 2})).unwrap()
        );
    }
}
