//! The export routes through the real router (`Router::oneshot`) on a fresh database, with
//! the worker's side played by `jobs::queue` and files in a temporary `EXPORT_DIR`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use uuid::Uuid;

use crate::config::ApiConfig;
use crate::jobs::paths;
use crate::jobs::queue::tests::{Fixture, add_domain};
use crate::jobs::queue::{self, Completed, FenceError};
use crate::ratelimit::RateLimiter;
use crate::state::AppState;

const LEASE: Duration = Duration::from_secs(30);

pub(crate) struct TestApi {
    pub(crate) f: Fixture,
    app: Router,
    key: String,
    export_dir: PathBuf,
    _temp: tempfile::TempDir,
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl TestApi {
    pub(crate) async fn new() -> Self {
        Self::with_env(&[]).await
    }

    /// [`TestApi::new`] with these api variables set too.
    pub(crate) async fn with_env(vars: &[(&str, &str)]) -> Self {
        let f = Fixture::new().await;
        let key = crate::auth::create_key(&f.db, f.org, "test")
            .await
            .unwrap()
            .key;
        let temp = tempfile::tempdir().unwrap();
        let export_dir = temp.path().join("exports");
        std::fs::create_dir(&export_dir).unwrap();
        let dir = export_dir.to_str().unwrap().to_owned();
        let config = ApiConfig::from_lookup(|name| match name {
            "EXPORT_DIR" => Some(dir.clone()),
            _ => vars
                .iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| (*value).to_owned()),
        })
        .unwrap();
        let limiter = RateLimiter::new(config.rate_limit.clone(), None).unwrap();
        let app = crate::app(AppState::new(f.db.clone(), config, limiter, None));
        Self {
            f,
            app,
            key,
            export_dir,
            _temp: temp,
        }
    }

    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call_with(method, path, body, &[]).await
    }

    pub(crate) async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn create(&self, format: &str) -> Uuid {
        let answer = self
            .call(
                "POST",
                &format!("/v1/domains/{}/exports", self.f.domain),
                Some(json!({"format": format})),
            )
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
        let body = answer.json();
        let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            answer.headers["location"].to_str().unwrap(),
            format!("/v1/exports/{id}")
        );
        assert_eq!(body["status"], "queued");
        id
    }

    /// Plays the worker: claims the job `id`, writes `contents` as `file` in the export
    /// directory and completes the job with that file's size and checksum.
    async fn finish_with_file(&self, id: Uuid, file: &str, contents: &[u8]) -> String {
        let jobs = queue::claim(&self.f.db, "test-worker", 100, LEASE)
            .await
            .unwrap();
        let (mut mine, others): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.fence.id == id);
        for other in others {
            queue::release(&self.f.db, other.fence).await.unwrap();
        }
        let job = mine.pop().unwrap();
        let path = self.export_dir.join(file);
        if !path.is_symlink() {
            std::fs::write(&path, contents).unwrap();
        }
        let checksum = hex::encode(Sha256::digest(contents));
        queue::complete(
            &self.f.db,
            job.fence,
            &Completed {
                storage_path: file.to_owned(),
                size_bytes: i64::try_from(contents.len()).unwrap(),
                record_count: 2,
                checksum_sha256: checksum.clone(),
                expires_at: chrono::Utc::now() + chrono::Duration::hours(168),
            },
        )
        .await
        .unwrap();
        checksum
    }

    pub(crate) async fn finish(self) {
        drop(self.app);
        self.f.finish().await;
    }
}

#[tokio::test]
async fn a_domains_exports_are_listed_newest_first_by_page_and_status() {
    let api = TestApi::new().await;
    let mut created = Vec::new();
    for format in ["json", "csv", "markdown", "json", "csv"] {
        created.push(api.create(format).await);
    }
    let answer = api
        .call(
            "POST",
            &format!("/v1/domains/{}/exports", api.f.domain),
            Some(json!({"format": "xml"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json(),
        json!({"error": "format: must be one of json, csv, markdown", "code": "VALIDATION_ERROR"})
    );
    for id in [created[0], created[3]] {
        let answer = api.call("DELETE", &format!("/v1/exports/{id}"), None).await;
        assert_eq!(answer.status, StatusCode::OK);
    }

    let base = format!("/v1/domains/{}/exports", api.f.domain);
    let mut seen = Vec::new();
    let mut path = format!("{base}?limit=2");
    let mut pages = 0;
    loop {
        let answer = api.call("GET", &path, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json());
        let page = answer.json();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|item| item["id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("{base}?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let newest_first: Vec<Uuid> = created.iter().rev().copied().collect();
    assert_eq!(seen, newest_first, "every export once, newest first");

    let answer = api
        .call("GET", &format!("{base}?status=cancelled"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let cancelled: Vec<Value> = answer.json()["items"].as_array().unwrap().clone();
    assert_eq!(
        cancelled
            .iter()
            .map(|i| i["id"].as_str().unwrap().parse::<Uuid>().unwrap())
            .collect::<Vec<_>>(),
        vec![created[3], created[0]]
    );
    assert!(cancelled.iter().all(|i| i["status"] == "cancelled"));
    let answer = api
        .call("GET", &format!("{base}?status=succeeded"), None)
        .await;
    assert_eq!(answer.json(), json!({"items": [], "next_cursor": null}));

    for (query, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=zz", "cursor"),
    ] {
        let answer = api.call("GET", &format!("{base}?{query}"), None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        let body = answer.json();
        assert_eq!(body["code"], "VALIDATION_ERROR", "{query}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{query}: {body}"
        );
    }

    // Another org's domain and an unknown one are 404, as everywhere.
    let other = crate::auth::create_org(&api.f.db, "other").await.unwrap();
    let theirs = add_domain(&api.f.db, other, "theirs.example.com").await;
    for domain in [theirs, Uuid::new_v4()] {
        let answer = api
            .call("GET", &format!("/v1/domains/{domain}/exports"), None)
            .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(
            answer.json(),
            json!({"error": "domain not found", "code": "NOT_FOUND"})
        );
    }

    // In the OpenAPI document, with its status filter.
    let doc = api.call("GET", "/openapi.json", None).await.json();
    let params = doc["paths"]["/v1/domains/{id}/exports"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(params, ["id", "limit", "cursor", "status"]);
    assert!(doc["components"]["schemas"]["ExportRow"].is_object());
    api.finish().await;
}

#[tokio::test]
async fn cancel_bumps_the_token_so_the_worker_is_fenced() {
    let api = TestApi::new().await;
    let id = api.create("csv").await;
    let job = queue::claim(&api.f.db, "w", 10, LEASE)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(job.fence.id, id);
    let running = api.call("GET", &format!("/v1/exports/{id}"), None).await;
    assert_eq!(running.json()["status"], "running");
    assert_eq!(running.json()["attempts"], 1);

    let answer = api.call("DELETE", &format!("/v1/exports/{id}"), None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["status"], "cancelled");
    assert_eq!(api.f.token(id).await, job.fence.token + 1);
    assert!(matches!(
        queue::heartbeat(&api.f.db, job.fence, LEASE, None).await,
        Err(FenceError::Fenced(fenced)) if fenced == id
    ));
    assert!(matches!(
        queue::complete(
            &api.f.db,
            job.fence,
            &crate::jobs::queue::tests::completed(job.fence)
        )
        .await,
        Err(FenceError::Fenced(_))
    ));
    let after = api.call("GET", &format!("/v1/exports/{id}"), None).await;
    assert_eq!(after.json()["status"], "cancelled");

    let again = api.call("DELETE", &format!("/v1/exports/{id}"), None).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(
        again.json(),
        json!({"error": "export is already cancelled", "code": "EXPORT_NOT_CANCELLABLE"})
    );
    let unknown = api
        .call("DELETE", &format!("/v1/exports/{}", Uuid::new_v4()), None)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    api.finish().await;
}

#[tokio::test]
async fn a_download_streams_the_file_with_its_name_length_etag_and_digest() {
    let api = TestApi::new().await;
    // A CSV export of several sections is a ZIP; a JSON export a .json.
    // Each job is finished before the next is created: its first claim has token 1.
    let zip_id = api.create("csv").await;
    let zip_bytes = b"PK\x03\x04 not really a zip, but bytes all the same\r\n\0\xff".to_vec();
    let zip_file = paths::file_name(zip_id, 1, "zip");
    let zip_sum = api.finish_with_file(zip_id, &zip_file, &zip_bytes).await;
    let json_id = api.create("json").await;
    let json_bytes = br#"{"content": [], "keywords": []}"#.to_vec();
    let json_sum = api
        .finish_with_file(json_id, &paths::file_name(json_id, 1, "json"), &json_bytes)
        .await;

    for (id, bytes, sum, content_type, extension) in [
        (zip_id, &zip_bytes, &zip_sum, "application/zip", "zip"),
        (json_id, &json_bytes, &json_sum, "application/json", "json"),
    ] {
        let answer = api
            .call("GET", &format!("/v1/exports/{id}/download"), None)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body, bytes);
        let header = |name: &str| answer.headers[name].to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), content_type);
        assert_eq!(header("content-length"), bytes.len().to_string());
        assert_eq!(
            header("content-disposition"),
            format!("attachment; filename=\"export-{id}.{extension}\"")
        );
        assert_eq!(header("etag"), format!("\"{sum}\""));
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes));
        assert_eq!(header("repr-digest"), format!("sha-256=:{digest}:"));
        assert_eq!(header("x-content-type-options"), "nosniff");

        let etag = format!("\"{sum}\"");
        let cached = api
            .call_with(
                "GET",
                &format!("/v1/exports/{id}/download"),
                None,
                &[("if-none-match", &format!("\"other\", {etag}"))],
            )
            .await;
        assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
        assert!(cached.body.is_empty());
        assert_eq!(cached.headers["etag"].to_str().unwrap(), etag);
    }
    let status = api
        .call("GET", &format!("/v1/exports/{zip_id}"), None)
        .await
        .json();
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["checksum_sha256"], zip_sum.as_str());
    assert_eq!(status["size_bytes"], zip_bytes.len());
    assert_eq!(status["record_count"], 2);
    assert_eq!(status["progress"], 100);
    assert!(status["expires_at"].is_string());

    // Gone from the directory: 404, not a 500, and not a 304 for a cached ETag.
    std::fs::remove_file(api.export_dir.join(&zip_file)).unwrap();
    let answer = api
        .call("GET", &format!("/v1/exports/{zip_id}/download"), None)
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.json(),
        json!({"error": "export file not found", "code": "NOT_FOUND"})
    );
    let cached = api
        .call_with(
            "GET",
            &format!("/v1/exports/{zip_id}/download"),
            None,
            &[("if-none-match", &format!("\"{zip_sum}\""))],
        )
        .await;
    assert_eq!(cached.status, StatusCode::NOT_FOUND);
    api.finish().await;
}

/// A row recorded before per-attempt names (`<id>.<ext>`, which `complete` no longer
/// writes) still downloads.
#[tokio::test]
async fn a_legacy_file_name_still_downloads() {
    let api = TestApi::new().await;
    let id = api.create("json").await;
    let bytes = br#"{"legacy": true}"#.to_vec();
    let current = paths::file_name(id, 1, "json");
    let sum = api.finish_with_file(id, &current, &bytes).await;
    let legacy = format!("{}.json", id.simple());
    std::fs::rename(api.export_dir.join(&current), api.export_dir.join(&legacy)).unwrap();
    api.f
        .db
        .run(async |conn| {
            sqlx::query("UPDATE domain_exports SET storage_path = $2 WHERE id = $1")
                .bind(id)
                .bind(&legacy)
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    let answer = api
        .call("GET", &format!("/v1/exports/{id}/download"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, bytes);
    assert_eq!(
        answer.headers["etag"].to_str().unwrap(),
        format!("\"{sum}\"")
    );
    api.finish().await;
}

#[tokio::test]
async fn a_symlink_or_a_path_leading_out_of_export_dir_is_refused() {
    let api = TestApi::new().await;
    let secret = b"secret outside the export dir".to_vec();
    let outside: &Path = api.export_dir.parent().unwrap();
    std::fs::write(outside.join("secret"), &secret).unwrap();

    // A symlink planted in the directory under the name the worker would use.
    let linked = api.create("csv").await;
    let link = paths::file_name(linked, 1, "csv");
    std::os::unix::fs::symlink(outside.join("secret"), api.export_dir.join(&link)).unwrap();
    api.finish_with_file(linked, &link, &secret).await;
    // A symlink to another export's file, inside the directory.
    let theirs = api.create("json").await;
    let their_bytes = br#"{"theirs": true}"#.to_vec();
    let their_file = paths::file_name(theirs, 1, "json");
    api.finish_with_file(theirs, &their_file, &their_bytes)
        .await;
    let inner = api.create("json").await;
    let inner_link = paths::file_name(inner, 1, "json");
    std::os::unix::fs::symlink(
        api.export_dir.join(&their_file),
        api.export_dir.join(&inner_link),
    )
    .unwrap();
    api.finish_with_file(inner, &inner_link, &their_bytes).await;
    // Rows pointing at another export's file, or out of the directory: the schema refuses
    // both (domain_exports_storage_path_check); a tampered or older database may not.
    let borrowed = api.create("json").await;
    api.finish_with_file(
        borrowed,
        &paths::file_name(borrowed, 1, "json"),
        &their_bytes,
    )
    .await;
    let dotted = api.create("json").await;
    api.finish_with_file(dotted, &paths::file_name(dotted, 1, "json"), &secret)
        .await;
    let tamper = |id: Uuid, path: String| {
        let db = api.f.db.clone();
        async move {
            db.run(async |conn| {
                sqlx::query("UPDATE domain_exports SET storage_path = $2 WHERE id = $1")
                    .bind(id)
                    .bind(&path)
                    .execute(conn)
                    .await
            })
            .await
        }
    };
    assert!(
        tamper(borrowed, their_file.clone()).await.is_err(),
        "the CHECK refuses it"
    );
    api.f
        .db
        .run(async |conn| {
            sqlx::query(
                "ALTER TABLE domain_exports DROP CONSTRAINT domain_exports_storage_path_check",
            )
            .execute(conn)
            .await
        })
        .await
        .unwrap();
    tamper(borrowed, their_file.clone()).await.unwrap();
    tamper(dotted, "../secret".into()).await.unwrap();

    for id in [linked, inner, borrowed, dotted] {
        let answer = api
            .call("GET", &format!("/v1/exports/{id}/download"), None)
            .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{id}");
        assert_eq!(
            answer.json(),
            json!({"error": "export file not found", "code": "NOT_FOUND"})
        );
        // Not a 304 either: the ETag matches only a file that was opened and checked.
        let etag = format!("\"{}\"", api.f.row(id).await.checksum_sha256.unwrap());
        let cached = api
            .call_with(
                "GET",
                &format!("/v1/exports/{id}/download"),
                None,
                &[("if-none-match", &etag)],
            )
            .await;
        assert_eq!(cached.status, StatusCode::NOT_FOUND, "{id}");
    }
    // The export whose file it is still downloads.
    let answer = api
        .call("GET", &format!("/v1/exports/{theirs}/download"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, their_bytes);
    api.finish().await;
}
