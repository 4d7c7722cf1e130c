//! The one error type of the api: every failure becomes `{"error": "...", "code": "..."}`.
//!
//! Each variant maps to a status and a stable, machine-readable code. Bodies carry no
//! internals (SQL, stack traces, secrets): the cause of a 5xx goes to the log only.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A human-readable message; for validation errors it starts with the field name.
    pub error: String,
    /// A stable code to match on, e.g. `VALIDATION_ERROR`, `NOT_FOUND`, `RATE_LIMITED`.
    pub code: String,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `VALIDATION_ERROR`: a field of the request is invalid.
    #[error("{field}: {message}")]
    Validation {
        /// The field, e.g. `name`, `keywords[3].ctr`, `id`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// 400 `INVALID_JSON`: the body is not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 422 `INVALID_BODY`: JSON of the wrong shape (missing fields, wrong types).
    #[error("{0}")]
    InvalidBody(String),
    /// 415 `UNSUPPORTED_MEDIA_TYPE`: a JSON body without `Content-Type: application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 401 `UNAUTHORIZED`: no key, an unknown key or a revoked key.
    #[error("missing, invalid or revoked API key")]
    Unauthorized,
    /// 404 `NOT_FOUND`: absent, or owned by another org (never 403: that would leak existence).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409 with a specific code: the request conflicts with the current state.
    #[error("{message}")]
    Conflict {
        /// Stable code, e.g. `DOMAIN_EXISTS`.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// 422 `IDEMPOTENCY_KEY_REUSED`: the `Idempotency-Key` was used within 24 hours for a
    /// request with another body.
    #[error("Idempotency-Key: already used for a request with a different body")]
    IdempotencyKeyReused,
    /// 413 `PAYLOAD_TOO_LARGE`.
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 429 `RATE_LIMITED` (the rate limit middleware adds the headers).
    #[error("rate limit exceeded")]
    RateLimited,
    /// 503 `RATE_LIMIT_SERVICE_ERROR`: Redis failed and the limiter is configured fail-closed.
    #[error("Rate limiting service unavailable")]
    RateLimitUnavailable,
    /// 503 `OVERLOADED` with `Retry-After`: the concurrency limit is reached, or every
    /// database connection stayed busy for the acquire timeout while the database answered
    /// (a saturated pool, [`smartbeak_database::DbError::PoolSaturated`]); retry later.
    #[error("server is overloaded, retry later")]
    Overloaded,
    /// 504 `REQUEST_TIMEOUT`: the request took longer than the per-request timeout
    /// (distinct from 503 `OVERLOADED`).
    #[error("request took too long")]
    Timeout,
    /// 503 `DATABASE_UNAVAILABLE`: the database did not answer in time (no connection came
    /// back to the pool and none could be opened, or a connection failed).
    #[error("database unavailable, retry later")]
    DatabaseUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// 500 `INTERNAL_ERROR`: a bug or an unexpected failure; the cause is logged, not returned.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// A validation error on `field`.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An internal error with its cause (logged, never returned).
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(cause.into())
    }

    /// A copy of an error shared by several callers (single-flight): causes become text.
    pub fn reshare(&self) -> Self {
        match self {
            Self::Validation { field, message } => Self::validation(field.clone(), message.clone()),
            Self::InvalidJson(m) => Self::InvalidJson(m.clone()),
            Self::InvalidBody(m) => Self::InvalidBody(m.clone()),
            Self::UnsupportedMediaType => Self::UnsupportedMediaType,
            Self::Unauthorized => Self::Unauthorized,
            Self::NotFound(what) => Self::NotFound(what),
            Self::Conflict { code, message } => Self::Conflict {
                code,
                message: message.clone(),
            },
            Self::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            Self::PayloadTooLarge => Self::PayloadTooLarge,
            Self::RateLimited => Self::RateLimited,
            Self::RateLimitUnavailable => Self::RateLimitUnavailable,
            Self::Overloaded => Self::Overloaded,
            Self::Timeout => Self::Timeout,
            Self::DatabaseUnavailable(cause) => Self::DatabaseUnavailable(cause.to_string().into()),
            Self::Internal(cause) => Self::Internal(cause.to_string().into()),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation { .. } | Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::InvalidBody(_) | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimitUnavailable | Self::Overloaded | Self::DatabaseUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "VALIDATION_ERROR",
            Self::InvalidJson(_) => "INVALID_JSON",
            Self::InvalidBody(_) => "INVALID_BODY",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::NotFound(_) => "NOT_FOUND",
            Self::Conflict { code, .. } => code,
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::RateLimited => "RATE_LIMITED",
            Self::RateLimitUnavailable => "RATE_LIMIT_SERVICE_ERROR",
            Self::Overloaded => "OVERLOADED",
            Self::Timeout => "REQUEST_TIMEOUT",
            Self::DatabaseUnavailable(_) => "DATABASE_UNAVAILABLE",
            Self::Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// The body this error is sent with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %cause, source = ?cause.source(), "internal error");
            }
            Self::DatabaseUnavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
            }
            _ => {}
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::Overloaded) {
            // A shed request did no work: retrying after a second is safe.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(OVERLOADED_RETRY_AFTER_SECS),
            );
        }
        if matches!(self, Self::Unauthorized) {
            // RFC 9110 section 11.6.1: a 401 names the scheme that would work.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The `Retry-After` of a 503 `OVERLOADED`, in seconds.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Self::DatabaseUnavailable(Box::new(err))
            }
            // The server ended the session (57P01 from `pg_terminate_backend` or a fast
            // shutdown, class 08 connection exceptions, ...): the database, not the request,
            // failed, so 503 like a dropped connection.
            sqlx::Error::Database(ref db)
                if db
                    .code()
                    .is_some_and(|code| smartbeak_database::is_connection_sqlstate(&code)) =>
            {
                Self::DatabaseUnavailable(Box::new(err))
            }
            // 57014 query_canceled: the server-side statement_timeout fired; inside a
            // request that is its deadline run out (504), see `out_of_time`.
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some("57014") => {
                out_of_time(Box::new(err))
            }
            // Class 22, data exception (22021 a NUL in text, 22P05 `\u0000` in jsonb, 22008
            // a timestamp out of range, ...): a value of the request the database cannot
            // take. The handlers reject the known ones first, naming the field; whatever
            // still gets here is the client's too, so 400, with the cause in the log only.
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|code| code.starts_with("22")) =>
            {
                tracing::warn!(
                    sqlstate = db.code().as_deref().unwrap_or_default(),
                    error = %db,
                    "the database rejected a value of the request"
                );
                Self::validation(
                    "request",
                    "contains a value the database cannot store (out of range or not valid text)",
                )
            }
            other => Self::internal(other),
        }
    }
}

impl From<smartbeak_database::DbError> for ApiError {
    fn from(err: smartbeak_database::DbError) -> Self {
        match err {
            smartbeak_database::DbError::QueryTimeout(_)
            | smartbeak_database::DbError::StatementTimeout(_) => out_of_time(Box::new(err)),
            // Load, not an outage: every connection was busy serving other requests.
            smartbeak_database::DbError::PoolSaturated(_) => {
                tracing::debug!(error = %err, "shed: the database pool is saturated");
                Self::Overloaded
            }
            // First, so a driver-level connection failure (I/O, TLS, protocol, a closed
            // pool) is 503 like the timeouts, whatever the sqlx mapping below says. A
            // transaction whose connection was discarded after a timeout: as unavailable as
            // the timeout itself.
            other
                if other.is_timeout()
                    || other.is_connection_failure()
                    || matches!(other, smartbeak_database::DbError::Discarded) =>
            {
                Self::DatabaseUnavailable(Box::new(other))
            }
            smartbeak_database::DbError::Query(inner) => inner.into(),
            other => Self::internal(other),
        }
    }
}

/// A statement cut short by its time bound (the client-side bound or the server's
/// `statement_timeout`): inside a request (a [`smartbeak_database::deadline`] scope, whose
/// deadline both bounds follow) the request ran out of time, 504 `REQUEST_TIMEOUT` like the
/// request timeout itself, with the cause in the log; outside one, 503.
fn out_of_time(cause: Box<dyn std::error::Error + Send + Sync>) -> ApiError {
    if smartbeak_database::deadline::current().is_some() {
        tracing::warn!(error = %cause, "a statement ran out of the request's time");
        ApiError::Timeout
    } else {
        ApiError::DatabaseUnavailable(cause)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::InvalidBody(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::InvalidJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge
            }
            other => Self::InvalidJson(other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        match rejection {
            PathRejection::FailedToDeserializePathParams(_) => {
                Self::validation("id", "must be a UUID")
            }
            other => Self::internal(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::validation("query", rejection.body_text())
    }
}

/// True if `err` is a unique-constraint violation (SQLSTATE 23505).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn body_of(err: ApiError) -> (StatusCode, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn internal_errors_do_not_leak_their_cause() {
        let (status, body) = body_of(ApiError::internal(
            "relation \"secret_table\" does not exist",
        ))
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body,
            serde_json::json!({"error": "internal error", "code": "INTERNAL_ERROR"})
        );
    }

    #[tokio::test]
    async fn fail_closed_body_is_exact() {
        let (status, body) = body_of(ApiError::RateLimitUnavailable).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            serde_json::json!({"error": "Rate limiting service unavailable", "code": "RATE_LIMIT_SERVICE_ERROR"})
        );
    }

    #[tokio::test]
    async fn data_exceptions_are_400_without_the_database_message() {
        use smartbeak_database::testing::TestDatabase;

        let tdb = TestDatabase::create().await.unwrap();
        let pool = sqlx::PgPool::connect(tdb.url().expose()).await.unwrap();
        let year_out_of_range = chrono::NaiveDate::from_ymd_opt(-262_000, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        let cases = [
            ("22021", sqlx::query("SELECT $1::text").bind("a\0b")),
            (
                "22P05",
                sqlx::query("SELECT $1::text::jsonb").bind(r#"{"a": "\u0000"}"#),
            ),
            (
                "22008",
                sqlx::query("SELECT $1::timestamptz").bind(year_out_of_range),
            ),
            ("22012", sqlx::query("SELECT 1 / $1").bind(0_i32)),
        ];
        for (sqlstate, query) in cases {
            let err = query.execute(&pool).await.unwrap_err();
            let code = match &err {
                sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                _ => None,
            };
            assert_eq!(code.as_deref(), Some(sqlstate), "{err}");
            let (status, body) = body_of(ApiError::from(err)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{sqlstate}");
            assert_eq!(body["code"], "VALIDATION_ERROR", "{sqlstate}");
            assert_eq!(
                body["error"],
                "request: contains a value the database cannot store (out of range or not valid text)"
            );
        }
        // Other database errors stay 500 (e.g. 42P01 undefined_table).
        let err = sqlx::query("SELECT * FROM no_such_table")
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(
            ApiError::from(err).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        pool.close().await;
        tdb.drop_database().await.unwrap();
    }

    #[test]
    fn connection_failures_of_the_driver_are_503() {
        use smartbeak_database::DbError;
        for err in [
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::Tls("handshake".into()),
            sqlx::Error::WorkerCrashed,
            sqlx::Error::PoolClosed,
        ] {
            let shown = format!("{err:?}");
            assert_eq!(
                ApiError::from(DbError::Query(err)).status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{shown}"
            );
        }
    }

    /// An acquire timeout (sqlx's `PoolTimedOut`) classified on a real PostgreSQL through
    /// a fault proxy: a pool saturated while the database answers is 503 `OVERLOADED` with
    /// `Retry-After`; a pool whose one connection is stuck on a black-holed database, or
    /// that cannot open one, is 503 `DATABASE_UNAVAILABLE`.
    #[tokio::test]
    async fn an_acquire_timeout_is_overloaded_when_saturated_and_unavailable_when_silent() {
        use std::net::ToSocketAddrs;
        use std::time::Duration;

        use smartbeak_database::testing::TestDatabase;
        use smartbeak_database::{Database, SecretUrl};
        use smartbeak_test_support::{Fault, TcpForwarder};

        let tdb = TestDatabase::create().await.unwrap();
        let direct = tdb.url().expose().to_owned();
        let (scheme, rest) = direct.split_once("://").unwrap();
        let (user, rest) = rest.rsplit_once('@').unwrap();
        let (host_port, path) = rest.split_once('/').unwrap();
        let target = host_port
            .to_socket_addrs()
            .unwrap()
            .find(|a| a.ip().is_loopback())
            .unwrap();
        let forwarder = TcpForwarder::start(target).unwrap();
        let via = format!("{scheme}://{user}@127.0.0.1:{}/{path}", forwarder.port());
        let mut config = tdb.config();
        config.url = SecretUrl::parse("DATABASE_URL", &via).unwrap();
        config.pool_max = 1;
        config.pool_min = 0;
        config.acquire_timeout = Duration::from_millis(1000);
        let db = Database::connect(config, "api-error-classification")
            .await
            .unwrap();
        let sleep = |db: Database| async move {
            db.run(async |conn| {
                sqlx::query("SELECT pg_sleep(0.05)")
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
            .await
        };

        // Saturated: forty 50 ms queries (2 s of work) through one connection cannot all
        // start within the 1 s acquire timeout, while the connection comes back every 50 ms
        // (a wide margin, so a loaded machine still sees releases during every wait).
        let results = futures::future::join_all((0..40).map(|_| sleep(db.clone()))).await;
        let errors: Vec<ApiError> = results
            .into_iter()
            .filter_map(Result::err)
            .map(ApiError::from)
            .collect();
        assert!(!errors.is_empty(), "40 x 50 ms cannot fit in 1 s");
        for error in &errors {
            assert_eq!(error.code(), "OVERLOADED", "{error:?}");
        }
        let response = errors.into_iter().next().unwrap().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        // Silent: the one connection is stuck in a query on a black-holed database; the
        // next caller waits out the acquire timeout with nothing coming back.
        forwarder.black_hole();
        let stuck = tokio::spawn(sleep(db.clone()));
        let bound = std::time::Instant::now() + Duration::from_secs(5);
        while db.metrics().primary.in_use == 0 {
            assert!(std::time::Instant::now() < bound, "the query never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let error = ApiError::from(sleep(db.clone()).await.unwrap_err());
        assert_eq!(error.code(), "DATABASE_UNAVAILABLE", "{error:?}");
        assert!(
            error
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
        // Dropping the stuck query discards its connection.
        stuck.abort();
        let _ = stuck.await;
        while db.metrics().primary.size > 0 {
            assert!(
                std::time::Instant::now() < bound,
                "the stuck connection stayed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Unreachable: a new connection is swallowed (black hole) or reset.
        for fault in [Fault::Stall, Fault::Reset] {
            forwarder.set_fault(fault);
            let error = ApiError::from(sleep(db.clone()).await.unwrap_err());
            assert_eq!(error.code(), "DATABASE_UNAVAILABLE", "{fault:?}: {error:?}");
        }

        forwarder.restore();
        db.close(Duration::from_secs(5)).await.unwrap();
        tdb.drop_database().await.unwrap();
    }

    #[test]
    fn a_401_names_the_bearer_scheme_and_no_other_error_does() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::NotFound("domain").into_response();
        assert!(response.headers().get(header::WWW_AUTHENTICATE).is_none());
    }

    #[tokio::test]
    async fn validation_names_the_field() {
        let (status, body) = body_of(ApiError::validation("name", "must not be empty")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "name: must not be empty");
        assert_eq!(body["code"], "VALIDATION_ERROR");
    }
}
