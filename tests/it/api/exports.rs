//! Export lifecycle through the real binary: a queued export cannot be downloaded (409
//! `EXPORT_NOT_READY`), `DELETE` cancels it, and a second `DELETE` is 409
//! `EXPORT_NOT_CANCELLABLE`. No worker runs here, so the export stays queued until cancelled.

use serde_json::{Value, json};

use super::{Api, Tenant, create_domain, database};

#[tokio::test]
async fn a_queued_export_is_not_ready_then_cancelled_once() {
    let (db, url) = database().await.unwrap();
    let api = Api::start(&url, &[]).await.unwrap();
    let t = Tenant::create(&url, "exports").await.unwrap();
    let d = create_domain(&api, &t, "export.example.com").await.unwrap();
    let send = |method: &str, path: String| {
        api.http
            .request(method.parse().unwrap(), api.url(&path))
            .header("authorization", t.bearer())
    };

    let response = send("POST", format!("/v1/domains/{d}/exports"))
        .json(&json!({"format": "markdown", "include_analytics": false, "from": "2026-01-01", "to": "2026-01-31"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let export: Value = response.json().await.unwrap();
    let id = export["id"].as_str().unwrap().to_owned();
    assert_eq!(export["status"], "queued");
    assert_eq!(export["format"], "markdown");
    assert_eq!(export["include_analytics"], false);
    assert_eq!(export["date_from"], "2026-01-01T00:00:00Z");
    assert_eq!(
        export["date_to"], "2026-02-01T00:00:00Z",
        "a bare end date includes its day"
    );

    let response = send("GET", format!("/v1/exports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let status: Value = response.json().await.unwrap();
    assert_eq!(status["status"], "queued");
    assert_eq!(status["progress"], 0);

    // Not ready while queued.
    let response = send("GET", format!("/v1/exports/{id}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "export is queued, not succeeded", "code": "EXPORT_NOT_READY"})
    );

    // Cancelled once.
    let response = send("DELETE", format!("/v1/exports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["id"], id.as_str());
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string(), "{cancelled}");

    // A second cancel conflicts; the export stays cancelled and still cannot be downloaded.
    let response = send("DELETE", format!("/v1/exports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "export is already cancelled", "code": "EXPORT_NOT_CANCELLABLE"})
    );
    let status: Value = send("GET", format!("/v1/exports/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "cancelled");
    let response = send("GET", format!("/v1/exports/{id}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "EXPORT_NOT_READY");

    drop(api);
    db.drop_database().await.unwrap();
}
