//! Validation: a table of bad inputs, each answered with its status, its stable code and
//! (for field errors) the field's name, in the one JSON error shape with no internals;
//! and SQL / CSV-formula text stored and returned verbatim, not executed.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Api, Tenant, create_domain, database};

/// Method, path, body, expected status, expected code, field named in the message.
type Case = (
    &'static str,
    String,
    Body,
    u16,
    &'static str,
    Option<&'static str>,
);

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Option<&'static str>),
    Big(usize),
}

#[tokio::test]
async fn bad_inputs_get_their_status_and_code() {
    let (db, url) = database().await.unwrap();
    let api = Api::start(&url, &[("HTTP_BODY_LIMIT_BYTES", "65536".into())])
        .await
        .unwrap();
    let t = Tenant::create(&url, "validation").await.unwrap();
    let d = create_domain(&api, &t, "valid.example.com").await.unwrap();
    let content = format!("/v1/domains/{d}/content");
    let metrics = format!("/v1/domains/{d}/metrics");
    let exports = format!("/v1/domains/{d}/exports");
    let analytics = format!("/v1/domains/{d}/analytics");
    let settings = format!("/v1/domains/{d}/settings");
    let unknown = uuid::Uuid::new_v4();
    // A well-formed cursor whose time is in the year ~190,000.
    let far_cursor: String = format!("6000000000000000000:{unknown}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    let kw = |extra: Value| {
        let mut row = json!({"keyword": "rust", "search_volume": 10, "position": 3.5, "recorded_at": "2026-01-05T00:00:00Z"});
        row.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({ "keywords": [row] })
    };

    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("GET", "/v1/domains/not-a-uuid".into(), Body::None, 400, "VALIDATION_ERROR", Some("id:")),
        ("GET", "/v1/exports/1234".into(), Body::None, 400, "VALIDATION_ERROR", Some("id:")),
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": ""})), 400, "VALIDATION_ERROR", Some("name:")),
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": "Not A Host"})), 400, "VALIDATION_ERROR", Some("name:")),
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": 5})), 422, "INVALID_BODY", Some("name")),
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": "x.com", "owner": "me"})), 422, "INVALID_BODY", Some("owner")),
        ("POST", "/v1/domains".into(), Body::Raw("{\"name\": ", Some("application/json")), 400, "INVALID_JSON", None),
        ("POST", "/v1/domains".into(), Body::Raw("{\"name\": \"x.com\"}", None), 415, "UNSUPPORTED_MEDIA_TYPE", None),
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": "valid.example.com"})), 409, "DOMAIN_EXISTS", None),
        ("POST", "/v1/domains".into(), Body::Big(100 * 1024), 413, "PAYLOAD_TOO_LARGE", None),
        ("GET", "/v1/domains?limit=0".into(), Body::None, 400, "VALIDATION_ERROR", Some("limit:")),
        ("GET", "/v1/domains?limit=many".into(), Body::None, 400, "VALIDATION_ERROR", Some("query:")),
        ("GET", "/v1/domains?cursor=zzz".into(), Body::None, 400, "VALIDATION_ERROR", Some("cursor:")),
        ("GET", format!("{content}?status=lost"), Body::None, 400, "VALIDATION_ERROR", Some("status:")),
        ("POST", content.clone(), Body::Json(json!({"title": "", "slug": "a"})), 400, "VALIDATION_ERROR", Some("title:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "Not Slug"})), 400, "VALIDATION_ERROR", Some("slug:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "status": "gone"})), 400, "VALIDATION_ERROR", Some("status:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "published_at": "tomorrow"})), 422, "INVALID_BODY", Some("published_at")),
        ("POST", exports.clone(), Body::Json(json!({"format": "xml"})), 400, "VALIDATION_ERROR", Some("format:")),
        ("POST", exports.clone(), Body::Json(json!({"format": "csv", "from": "2026-02-01", "to": "2026-01-01"})), 400, "VALIDATION_ERROR", Some("from:")),
        ("POST", exports.clone(), Body::Json(json!({"format": "csv", "from": "soon"})), 400, "VALIDATION_ERROR", Some("from:")),
        ("POST", exports.clone(), Body::Json(json!({"format": "csv", "include_content": "yes"})), 422, "INVALID_BODY", Some("include_content")),
        ("GET", format!("{analytics}?from=2026-02-01&to=2026-01-01"), Body::None, 400, "VALIDATION_ERROR", Some("from:")),
        ("GET", format!("{analytics}?from=2020-01-01&to=2026-01-01"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("GET", format!("{analytics}?to=next-week"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("POST", metrics.clone(), Body::Json(json!({})), 400, "VALIDATION_ERROR", Some("keywords:")),
        ("POST", metrics.clone(), Body::Json(kw(json!({"ctr": 1.5}))), 400, "VALIDATION_ERROR", Some("keywords[0].ctr:")),
        ("POST", metrics.clone(), Body::Json(kw(json!({"clicks": -1}))), 400, "VALIDATION_ERROR", Some("keywords[0].clicks:")),
        ("POST", metrics.clone(), Body::Json(kw(json!({"search_volume": "lots"}))), 422, "INVALID_BODY", Some("search_volume")),
        ("POST", metrics.clone(), Body::Json(json!({"content": [{"content_id": unknown, "recorded_at": "2026-01-05T00:00:00Z"}]})), 409, "UNKNOWN_CONTENT_ITEM", Some("content[0].content_id:")),
        ("PUT", settings.clone(), Body::Json(json!([1, 2])), 400, "VALIDATION_ERROR", Some("settings:")),
        ("GET", "/v1/nowhere".into(), Body::None, 404, "NOT_FOUND", None),
        ("DELETE", "/v1/domains".into(), Body::None, 405, "METHOD_NOT_ALLOWED", None),
        ("GET", format!("/v1/exports/{unknown}"), Body::None, 404, "NOT_FOUND", None),
        ("DELETE", format!("/v1/exports/{unknown}"), Body::None, 404, "NOT_FOUND", None),
        // Dates outside the years 0001 to 9999: `to - 30 days` used to panic (a dropped
        // connection), and PostgreSQL refused the far ones (22008, a 500).
        ("GET", format!("{analytics}?to=-262143-01-01"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("GET", format!("{analytics}?to=%2B262142-12-31"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("GET", format!("{analytics}?from=0000-12-31&to=0001-01-05"), Body::None, 400, "VALIDATION_ERROR", Some("from:")),
        ("GET", format!("{analytics}?to=9999-12-31T23:00:00-05:00"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("GET", format!("{analytics}?to=0001-01-10"), Body::None, 400, "VALIDATION_ERROR", Some("to:")),
        ("POST", exports.clone(), Body::Json(json!({"format": "csv", "from": "-0001-01-01"})), 400, "VALIDATION_ERROR", Some("from:")),
        ("POST", exports.clone(), Body::Json(json!({"format": "csv", "to": "+10000-01-01"})), 400, "VALIDATION_ERROR", Some("to:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "published_at": "-262143-01-01T00:00:00Z"})), 400, "VALIDATION_ERROR", Some("published_at:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "published_at": "0000-12-31T23:59:59Z"})), 400, "VALIDATION_ERROR", Some("published_at:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "status": "scheduled"})), 400, "VALIDATION_ERROR", Some("publish_at: is required when status is scheduled")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "status": "scheduled", "publish_at": "tomorrow"})), 422, "INVALID_BODY", Some("publish_at")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "publish_at": "2030-01-01T00:00:00Z"})), 400, "VALIDATION_ERROR", Some("publish_at: is allowed only when status is scheduled")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "s", "status": "scheduled", "publish_at": "0000-12-31T23:59:59Z"})), 400, "VALIDATION_ERROR", Some("publish_at:")),
        ("POST", metrics.clone(), Body::Json(kw(json!({"recorded_at": "+262142-01-01T00:00:00Z"}))), 400, "VALIDATION_ERROR", Some("keywords[0].recorded_at:")),
        ("POST", metrics.clone(), Body::Json(json!({"content": [{"content_id": unknown, "recorded_at": "-0001-01-01T00:00:00Z"}]})), 400, "VALIDATION_ERROR", Some("content[0].recorded_at:")),
        ("GET", format!("/v1/domains?cursor={far_cursor}"), Body::None, 400, "VALIDATION_ERROR", Some("cursor:")),
        // NUL characters: PostgreSQL refuses them in text (22021) and jsonb (22P05).
        ("POST", "/v1/domains".into(), Body::Json(json!({"name": "a\u{0}.com"})), 400, "VALIDATION_ERROR", Some("name:")),
        ("POST", content.clone(), Body::Json(json!({"title": "a\u{0}b", "slug": "nul"})), 400, "VALIDATION_ERROR", Some("title:")),
        ("POST", content.clone(), Body::Json(json!({"title": "t", "slug": "nul", "body": "x\u{0}"})), 400, "VALIDATION_ERROR", Some("body:")),
        ("POST", metrics.clone(), Body::Json(kw(json!({"keyword": "ru\u{0}st"}))), 400, "VALIDATION_ERROR", Some("keywords[0].keyword:")),
        ("PUT", settings.clone(), Body::Json(json!({"theme": "da\u{0}rk"})), 400, "VALIDATION_ERROR", Some("settings.theme:")),
        ("PUT", settings.clone(), Body::Json(json!({"seo": {"titles": ["ok", "n\u{0}"]}})), 400, "VALIDATION_ERROR", Some("settings.seo.titles[1]:")),
        ("PUT", settings.clone(), Body::Raw("{\"a\": [{\"k\\u0000\": 1}]}", Some("application/json")), 400, "VALIDATION_ERROR", Some("settings.a[0].k")),
    ];

    // A 413 is answered before the body is read, and the server then closes that connection;
    // a fresh connection per case keeps the next case from landing on the closing one.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (method, path, body, status, code, field) in cases {
        let mut request = http
            .request(method.parse().unwrap(), api.url(&path))
            .header("authorization", t.bearer());
        request = match body {
            Body::None => request,
            Body::Json(v) => request.json(&v),
            Body::Raw(raw, content_type) => {
                let r = request.body(raw);
                match content_type {
                    Some(ct) => r.header("content-type", ct),
                    None => r,
                }
            }
            Body::Big(n) => request
                .header("content-type", "application/json")
                .body(format!("{{\"name\": \"{}\"}}", "a".repeat(n))),
        };
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(got, status, "{method} {path}: {text}");
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        let object = json.as_object().unwrap();
        assert_eq!(
            object.len(),
            2,
            "{method} {path}: exactly error and code: {text}"
        );
        assert_eq!(json["code"], code, "{method} {path}: {text}");
        let error = json["error"].as_str().unwrap();
        if let Some(field) = field {
            assert!(
                error.contains(field),
                "{method} {path}: {error:?} should name {field}"
            );
        }
        for internal in ["sqlx", "postgres", "SELECT", "INSERT", "panicked", "src/"] {
            assert!(
                !error.contains(internal),
                "{method} {path}: leaks {internal}: {error}"
            );
        }
    }

    // SQL and CSV-formula text is data: stored and returned verbatim.
    let nasty_title = "'; DROP TABLE domains; --";
    let nasty_body = "=HYPERLINK(\"http://evil.example\",\"click\")\n+1+1\n-2\n@SUM(A1)";
    let response = api
        .http
        .post(api.url(&content))
        .header("authorization", t.bearer())
        .json(&json!({"title": nasty_title, "slug": "nasty", "body": nasty_body}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let list: Value = api
        .http
        .get(api.url(&format!("{content}?status=draft")))
        .header("authorization", t.bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["title"], nasty_title);
    assert_eq!(list["items"][0]["body"], nasty_body);
    let response = api
        .http
        .get(api.url(&format!("/v1/domains/{d}")))
        .header("authorization", t.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the domains table is still there");

    drop(api);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn cursor_pagination_walks_every_domain_once() {
    let (db, url) = database().await.unwrap();
    let api = Api::start(&url, &[]).await.unwrap();
    let t = Tenant::create(&url, "pages").await.unwrap();
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(
            create_domain(&api, &t, &format!("d{i}.example.com"))
                .await
                .unwrap(),
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut path = "/v1/domains?limit=3".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = api
            .http
            .get(api.url(&path))
            .header("authorization", t.bearer())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    drop(api);
    db.drop_database().await.unwrap();
}
