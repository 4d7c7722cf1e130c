//! API keys: generation, SHA-256 storage, constant-time verification, and the [`Auth`]
//! extractor that turns `Authorization: Bearer <key>` into the caller's org.
//!
//! A key is `sbk_` followed by 64 hex digits (256 random bits). Only its SHA-256 is stored,
//! with the first 12 characters as a `prefix` for humans to tell keys apart.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use smartbeak_database::{Database, DbError};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

const KEY_PREFIX: &str = "sbk_";
const DISPLAY_PREFIX_LEN: usize = 12;
const MAX_KEY_LEN: usize = 256;

/// The key a request presented, hashed; put in the request extensions by the rate limit
/// middleware so the key is hashed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey {
    hash: [u8; 32],
}

impl PresentedKey {
    /// Reads `Authorization: Bearer <key>`; `None` if absent or malformed.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > MAX_KEY_LEN {
            return None;
        }
        Some(Self {
            hash: hash_key(token),
        })
    }

    /// The SHA-256 of the key.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// A short id for the rate limiter: hex of the first 16 bytes of the hash.
    pub fn limiter_id(&self) -> String {
        hex::encode(&self.hash[..16])
    }
}

/// SHA-256 of a key, as stored in `api_keys.key_hash`.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key: `sbk_` + 64 hex digits.
pub fn generate_key() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// The authenticated caller: every data query is scoped by `org_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// The org the key belongs to.
    pub org_id: Uuid,
    /// The key's id.
    pub key_id: Uuid,
}

/// The outcome of the key lookup the rate limit middleware ran beside the limiter's call
/// (so the handler does not look it up again): the caller, or `None` for a bad key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedKey(pub Option<Auth>);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(ResolvedKey(resolved)) = parts.extensions.get::<ResolvedKey>() {
            return resolved.ok_or(ApiError::Unauthorized);
        }
        let presented = match parts.extensions.get::<PresentedKey>() {
            Some(presented) => presented.clone(),
            None => PresentedKey::from_headers(&parts.headers).ok_or(ApiError::Unauthorized)?,
        };
        state
            .keys
            .resolve(&state.db, &presented)
            .await?
            .ok_or(ApiError::Unauthorized)
    }
}

/// A key as the `keys create` command prints it (the secret is shown this once).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreatedKey {
    /// The key's id (for `keys revoke`).
    pub id: Uuid,
    /// The owning org.
    pub org_id: Uuid,
    /// The first characters, stored to tell keys apart.
    pub prefix: String,
    /// The secret key itself.
    pub key: String,
}

/// Creates an org, returning its id.
pub async fn create_org(db: &Database, name: &str) -> Result<Uuid, DbError> {
    let id = Uuid::new_v4();
    db.run(async |conn| {
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(conn)
            .await
    })
    .await?;
    Ok(id)
}

/// Creates a key for `org_id`; the secret is returned once and stored only hashed.
pub async fn create_key(db: &Database, org_id: Uuid, name: &str) -> Result<CreatedKey, DbError> {
    let key = generate_key();
    let id = Uuid::new_v4();
    let prefix = key[..DISPLAY_PREFIX_LEN].to_owned();
    let hash = hash_key(&key);
    db.run(async |conn| {
        sqlx::query(
            "INSERT INTO api_keys (id, org_id, name, prefix, key_hash) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(org_id)
        .bind(name)
        .bind(&prefix)
        .bind(&hash[..])
        .execute(conn)
        .await
    })
    .await?;
    Ok(CreatedKey {
        id,
        org_id,
        prefix,
        key,
    })
}

/// Revokes a key by id; returns false if no active key has that id.
pub async fn revoke_key(db: &Database, key_id: Uuid) -> Result<bool, DbError> {
    let result = db
        .run(async |conn| {
            sqlx::query(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(key_id)
            .execute(conn)
            .await
        })
        .await?;
    Ok(result.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_hash_to_32_bytes() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with("sbk_"));
        assert_eq!(a.len(), 4 + 64);
        assert_eq!(hash_key(&a).len(), 32);
        assert_ne!(hash_key(&a), hash_key(&b));
    }

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert!(PresentedKey::from_headers(&headers).is_none());
        headers.insert("authorization", HeaderValue::from_static("Bearer sbk_abc"));
        let key = PresentedKey::from_headers(&headers).unwrap();
        assert_eq!(key.hash(), &hash_key("sbk_abc"));
        assert_eq!(key.limiter_id().len(), 32);
        headers.insert("authorization", HeaderValue::from_static("Basic sbk_abc"));
        assert!(PresentedKey::from_headers(&headers).is_none());
        headers.insert("authorization", HeaderValue::from_static("Bearer "));
        assert!(PresentedKey::from_headers(&headers).is_none());
    }
}
