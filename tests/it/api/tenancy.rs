//! Tenancy: org A's key can neither read, list, export nor download anything of org B's
//! (always 404, never 403), and a revoked key is 401; cached analytics are per org; domain
//! names are unique per org, not across orgs.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Api, Tenant, create_domain, database};

#[tokio::test]
async fn orgs_are_isolated_and_revoked_keys_are_rejected() {
    let (db, url) = database().await.unwrap();
    let export_dir = tempfile_dir();
    let api = Api::start(
        &url,
        &[("EXPORT_DIR", export_dir.to_string_lossy().into_owned())],
    )
    .await
    .unwrap();
    let a = Tenant::create(&url, "org a").await.unwrap();
    let b = Tenant::create(&url, "org b").await.unwrap();

    // B's data: a domain, a content item, settings, an export finished by "the worker".
    let b_domain = create_domain(&api, &b, "b.example.com").await.unwrap();
    let a_domain = create_domain(&api, &a, "a.example.com").await.unwrap();
    let response = api
        .http
        .post(api.url(&format!("/v1/domains/{b_domain}/content")))
        .header("authorization", b.bearer())
        .json(&json!({"title": "B secret", "slug": "b-secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = api
        .http
        .post(api.url(&format!("/v1/domains/{b_domain}/exports")))
        .header("authorization", b.bearer())
        .json(&json!({"format": "csv"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(
        response.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/v1/exports/")
    );
    let b_export: Value = response.json().await.unwrap();
    let b_export = b_export["id"].as_str().unwrap().to_owned();
    finish_export(&url, &b_export, &export_dir, "id,title\n1,B secret\n").await;

    // B can download its own export.
    let response = api
        .http
        .get(api.url(&format!("/v1/exports/{b_export}/download")))
        .header("authorization", b.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "id,title\n1,B secret\n");

    // A sees none of it: every path is a 404 with the same shape.
    let not_found = [
        ("GET", format!("/v1/domains/{b_domain}"), None),
        ("GET", format!("/v1/domains/{b_domain}/content"), None),
        (
            "POST",
            format!("/v1/domains/{b_domain}/content"),
            Some(json!({"title": "x", "slug": "x"})),
        ),
        ("GET", format!("/v1/domains/{b_domain}/settings"), None),
        (
            "PUT",
            format!("/v1/domains/{b_domain}/settings"),
            Some(json!({"theme": "dark"})),
        ),
        ("GET", format!("/v1/domains/{b_domain}/analytics"), None),
        (
            "POST",
            format!("/v1/domains/{b_domain}/metrics"),
            Some(
                json!({"keywords": [{"keyword": "k", "search_volume": 1, "position": 1.0, "recorded_at": "2026-01-01T00:00:00Z"}]}),
            ),
        ),
        (
            "POST",
            format!("/v1/domains/{b_domain}/exports"),
            Some(json!({"format": "json"})),
        ),
        ("GET", format!("/v1/domains/{b_domain}/exports"), None),
        ("GET", format!("/v1/exports/{b_export}"), None),
        ("GET", format!("/v1/exports/{b_export}/download"), None),
        ("DELETE", format!("/v1/exports/{b_export}"), None),
    ];
    for (method, path, body) in &not_found {
        let mut request = api
            .http
            .request(method.parse().unwrap(), api.url(path))
            .header("authorization", a.bearer());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "NOT_FOUND", "{method} {path}: {body}");
    }

    // A's list holds only A's domain.
    let list: Value = api
        .http
        .get(api.url("/v1/domains"))
        .header("authorization", a.bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a_domain.as_str()]);

    // No key, a made-up key, then A's key once revoked: 401.
    let response = api.http.get(api.url("/v1/domains")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = api
        .http
        .get(api.url("/v1/domains"))
        .header("authorization", "Bearer sbk_0000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    super::cli(&url, &["keys", "revoke", &a.key_id])
        .await
        .unwrap();
    // The api hears of the revoke through LISTEN/NOTIFY a moment after the CLI's commit, so
    // the first request may still meet the cached key: polled, within a bound (the
    // notification path itself is proven by the auth cache's own test,
    // `a_revoke_evicts_the_key_in_another_process_cache_and_a_lost_listener_flushes`).
    let response = crate::support::eventually(
        "the revoked key to be refused",
        Duration::from_secs(3),
        || async {
            let response = api
                .http
                .get(api.url("/v1/domains"))
                .header("authorization", a.bearer())
                .send()
                .await
                .unwrap();
            (response.status() == 401).then_some(response)
        },
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "UNAUTHORIZED");
    // B is unaffected.
    let response = api
        .http
        .get(api.url(&format!("/v1/domains/{b_domain}")))
        .header("authorization", b.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    drop(api);
    let _ = std::fs::remove_dir_all(&export_dir);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn cached_analytics_are_per_org_and_names_are_unique_per_org() {
    let (db, url) = database().await.unwrap();
    // A long cache TTL: a cache keyed without the org would hand B's report to A.
    let api = Api::start(&url, &[("ANALYTICS_CACHE_TTL_MS", "600000".into())])
        .await
        .unwrap();
    let a = Tenant::create(&url, "org a").await.unwrap();
    let b = Tenant::create(&url, "org b").await.unwrap();

    // The same name in two orgs: 201 for both (409 only within one org).
    let b_domain = create_domain(&api, &b, "shared.example.com").await.unwrap();
    let a_domain = create_domain(&api, &a, "shared.example.com").await.unwrap();
    assert_ne!(a_domain, b_domain);
    let response = api
        .http
        .post(api.url("/v1/domains"))
        .header("authorization", a.bearer())
        .json(&json!({"name": "shared.example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);

    let response = api
        .http
        .post(api.url(&format!("/v1/domains/{b_domain}/metrics")))
        .header("authorization", b.bearer())
        .json(&json!({"keywords": [{"keyword": "b-secret", "search_volume": 7, "position": 1.0, "recorded_at": "2026-01-02T00:00:00Z"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // B loads its analytics first, so the report is cached; then A asks for the same
    // domain and range.
    let path = format!("/v1/domains/{b_domain}/analytics?from=2026-01-01&to=2026-01-31");
    let get = |tenant: &Tenant| {
        api.http
            .get(api.url(&path))
            .header("authorization", tenant.bearer())
            .send()
    };
    let response = get(&b).await.unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["keywords"][0]["keyword"], "b-secret");
    let before = api.metric("analytics_queries_total").await.unwrap();
    let response = get(&a).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "NOT_FOUND", "{body}");
    // B's second request is served from the cache (no query), A's went to the database.
    let response = get(&b).await.unwrap();
    assert_eq!(response.status(), 200);
    let after = api.metric("analytics_queries_total").await.unwrap();
    assert_eq!(after - before, 1.0, "A's request ran its own query");

    drop(api);
    db.drop_database().await.unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sb-api-exports-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Does what the export worker does when it finishes a job: writes the file under
/// EXPORT_DIR and marks the row succeeded with its relative path, size, record count,
/// SHA-256 and expiry (the schema's CHECK on a succeeded row).
async fn finish_export(url: &str, id: &str, dir: &std::path::Path, contents: &str) {
    // The stored name is the id's simple form (the schema's storage path CHECK).
    let name = format!("{}.csv", id.replace('-', ""));
    std::fs::write(dir.join(&name), contents).unwrap();
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "UPDATE domain_exports SET status = 'succeeded', progress = 100, storage_path = $2, \
         size_bytes = $3, record_count = 1, \
         checksum_sha256 = encode(sha256(convert_to($4, 'UTF8')), 'hex'), \
         expires_at = now() + interval '1 day', finished_at = now() WHERE id = $1::uuid",
    )
    .bind(id)
    .bind(&name)
    .bind(i64::try_from(contents.len()).unwrap())
    .bind(contents)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}
