//! The OpenAPI 3.1 document, served at `/openapi.json` and built once per process.
//!
//! utoipa generates it from the handlers' `#[utoipa::path]` attributes and the types'
//! `#[schema]` attributes; [`document`] then adds what is the same for many operations,
//! from the constants the handlers check against: the statuses every route can answer
//! (401, 429, 503...) with the one error schema, the rate limit headers, the enums and
//! patterns, unique `operationId`s, and the links a stateful client follows from
//! `POST /v1/domains` (and `POST .../exports`) to the routes that take the new id. A test
//! compares its paths and methods with the router's ([`crate::http::routes`]).

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::analytics::{AnalyticsReport, ContentAggregate, KeywordAggregate};
use crate::error::ErrorBody;
use crate::jobs::queue::ExportRow;
use crate::routes::{self, Page, content, domains, exports, health, ingest, settings};

/// The api's OpenAPI document as utoipa generates it; [`document`] is what is served.
#[derive(OpenApi)]
#[openapi(
    info(title = "SmartBeak API", description = "Org-scoped domains, content, analytics and exports.\n\n\
        Rules that JSON Schema cannot state, enforced with 400 `VALIDATION_ERROR`: in analytics \
        queries and export bodies `from` must not be after `to` and an analytics range is at most \
        366 days; dates and timestamps fall in the years 0001 to 9999 in UTC; a content item has \
        `publish_at` exactly when its status is `scheduled`; a metrics body has at most 5,000 \
        rows in both lists together, and no two of its rows share a natural key (`keyword` and \
        `recorded_at`, or `content_id` and `recorded_at`, to the microsecond). An \
        `Idempotency-Key` sent again with another body is 422 `IDEMPOTENCY_KEY_REUSED` for 24 \
        hours. Request bodies are limited to `HTTP_BODY_LIMIT_BYTES` \
        (default 1,048,576 bytes) on every route: 413 `PAYLOAD_TOO_LARGE`."),
    paths(
        health::healthz, health::readyz, health::metrics, openapi_json,
        domains::create, domains::list, domains::get,
        content::create, content::list,
        settings::put, settings::get,
        ingest::ingest, routes::analytics::get,
        exports::create, exports::list, exports::get, exports::download, exports::cancel,
    ),
    components(schemas(
        ErrorBody, domains::Domain, domains::CreateDomain, content::ContentItem,
        content::CreateContent, settings::DomainSettings, ingest::IngestMetrics,
        ingest::KeywordMetric, ingest::ContentPerformance, ingest::IngestResult,
        AnalyticsReport, KeywordAggregate, ContentAggregate, exports::CreateExport,
        ExportRow, Page<domains::Domain>, Page<content::ContentItem>, Page<ExportRow>,
        health::Health, health::Readiness,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "domains"), (name = "content"), (name = "settings"),
        (name = "analytics"), (name = "exports"), (name = "operations"),
    ),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("An API key made with `smartbeak-api keys create`"))
                        .build(),
                ),
            );
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    static BYTES: OnceLock<Bytes> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| Bytes::from(document().to_string()));
    let mut response = bytes.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /openapi.json` (the same handler, under the name the router uses).
pub use openapi_json as serve;

/// The served document, built on first use.
pub fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// Every `(METHOD, path)` of the document, sorted.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if item.get(method).is_some() {
                    ops.push((method.to_uppercase(), path.clone()));
                }
            }
        }
    }
    ops.sort();
    ops
}

fn build() -> Value {
    match build_checked() {
        Ok((doc, missing)) => {
            for pointer in &missing {
                tracing::error!(pointer, "OpenAPI document: no schema at this pointer");
            }
            doc
        }
        Err(e) => {
            tracing::error!(error = %e, "could not serialise the OpenAPI document");
            json!({})
        }
    }
}

/// The document and the pointers [`add_constraints`] and [`add_links`] found nothing at
/// (a test asserts there are none: a renamed field must not drop a constraint silently).
fn build_checked() -> Result<(Value, Vec<String>), serde_json::Error> {
    let mut doc = serde_json::to_value(ApiDoc::openapi())?;
    let mut missing = Vec::new();
    add_constraints(&mut doc, &mut missing);
    add_common_responses(&mut doc);
    add_links(&mut doc, &mut missing);
    Ok((doc, missing))
}

/// `operationId` of an operation: `get_v1_domains_id_settings` (utoipa's default, the
/// function name, repeats across modules).
pub fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_lowercase();
    for part in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !part.is_empty() {
            id.push('_');
            id.push_str(part);
        }
    }
    id
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    })
}

fn header(description: &str, schema: Value) -> Value {
    json!({"description": description, "schema": schema})
}

fn add_common_responses(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let versioned = path.starts_with("/v1/");
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            op.insert("operationId".into(), json!(operation_id(method, path)));
            let has_body = op.contains_key("requestBody");
            let has_id = path.contains("{id}");
            let has_query = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            let Some(responses) = responses else { continue };
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| error_response(description));
            };
            // The probes are served outside every layer: only their own answers.
            if crate::http::PROBE_ROUTES.iter().any(|(_, p)| p == path) {
                continue;
            }
            add(
                "503",
                "`OVERLOADED` (load shed: the concurrency limit, or every database \
                 connection busy for `DB_ACQUIRE_TIMEOUT_MS` while the database answers), \
                 `DATABASE_UNAVAILABLE` (the database does not answer) or \
                 `RATE_LIMIT_SERVICE_ERROR` (Redis down, fail-closed)",
            );
            add(
                "504",
                "`REQUEST_TIMEOUT`: the request took longer than `HTTP_REQUEST_TIMEOUT_MS`",
            );
            if versioned {
                add(
                    "401",
                    "`UNAUTHORIZED`: missing, unknown or revoked API key \
                     (`WWW-Authenticate: Bearer`)",
                );
                add(
                    "429",
                    "`RATE_LIMITED`: over the key's or the client IP's quota",
                );
            }
            if has_id || has_query || has_body {
                add(
                    "400",
                    "`VALIDATION_ERROR` naming the field, or `INVALID_JSON`",
                );
            }
            if has_id {
                add("404", "`NOT_FOUND`: absent or owned by another org");
            }
            // The body limit is a layer over every route, bodiless ones included.
            add(
                "413",
                "`PAYLOAD_TOO_LARGE`: a body over `HTTP_BODY_LIMIT_BYTES` (default 1,048,576 \
                 bytes; checked on every route)",
            );
            if has_body {
                add(
                    "415",
                    "`UNSUPPORTED_MEDIA_TYPE`: the body is not `application/json`",
                );
                add(
                    "422",
                    "`INVALID_BODY`: JSON of the wrong shape (missing or unknown fields, wrong types)",
                );
            }
            if !versioned {
                continue;
            }
            for (status, response) in responses.iter_mut() {
                let Some(headers) = response
                    .as_object_mut()
                    .map(|r| r.entry("headers").or_insert_with(|| json!({})))
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                headers.insert(
                    "RateLimit-Policy".into(),
                    header(
                        "the quotas that apply, e.g. `\"key\";q=600;w=60, \"ip\";q=1200;w=60` \
                         (absent when rate limiting is off)",
                        json!({"type": "string"}),
                    ),
                );
                headers.insert(
                    "RateLimit".into(),
                    header(
                        "each consulted quota's remaining requests and seconds to reset, e.g. \
                         `\"key\";r=599;t=1` (absent when rate limiting is off)",
                        json!({"type": "string"}),
                    ),
                );
                if status == "429" || status == "503" {
                    headers.insert(
                        "Retry-After".into(),
                        header(
                            "seconds to wait (sent with 429, with the limiter's 503 and with 503 `OVERLOADED`)",
                            json!({"type": "integer", "minimum": 1}),
                        ),
                    );
                }
                if status == "401" {
                    headers.insert(
                        "WWW-Authenticate".into(),
                        header(
                            "always `Bearer`",
                            json!({"type": "string", "enum": ["Bearer"]}),
                        ),
                    );
                }
            }
        }
    }
}

/// Links from the responses that create a resource to the operations that take its id, and
/// from a cancelled export to what reads it (a stateful client then reads a job after its
/// cancel: it stays readable, status `cancelled`).
fn add_links(doc: &mut Value, missing: &mut Vec<String>) {
    let ops = operations(doc);
    // (method, path, status of the source; whether an operation `(METHOD, path)` is a target)
    type Targets = fn(&str, &str) -> bool;
    let link_sources: [(&str, &str, &str, Targets); 3] = [
        ("post", "/v1/domains", "201", |_, path| {
            path.starts_with("/v1/domains/{id}")
        }),
        ("post", "/v1/domains/{id}/exports", "202", |_, path| {
            path.starts_with("/v1/exports/{id}")
        }),
        // The one read that answers 200 after a cancel: a client following it is the
        // stateful phase's `use_after_free` finding the job still there.
        ("delete", "/v1/exports/{id}", "200", |method, path| {
            method == "GET" && path == "/v1/exports/{id}"
        }),
    ];
    for (source_method, source, status, targets) in link_sources {
        let mut links = Map::new();
        for (method, path) in &ops {
            if targets(method, path) {
                let id = operation_id(method, path);
                links.insert(
                    id.clone(),
                    json!({
                        "operationId": id,
                        "parameters": {"path.id": "$response.body#/id"},
                    }),
                );
            }
        }
        let pointer = format!(
            "/paths/{}/{source_method}/responses/{status}",
            source.replace('~', "~0").replace('/', "~1")
        );
        if let Some(response) = object_at(doc, missing, &pointer) {
            response.insert("links".into(), Value::Object(links));
        }
    }
}

/// Sets `key` of the schema at `pointer` (a JSON pointer into the document); a pointer
/// that finds no object goes into `missing`.
fn set(doc: &mut Value, missing: &mut Vec<String>, pointer: &str, key: &str, value: Value) {
    if let Some(schema) = object_at(doc, missing, pointer) {
        schema.insert(key.into(), value);
    }
}

/// The object at `pointer`; `None` (and the pointer in `missing`) when there is none.
fn object_at<'d>(
    doc: &'d mut Value,
    missing: &mut Vec<String>,
    pointer: &str,
) -> Option<&'d mut Map<String, Value>> {
    let found = doc.pointer_mut(pointer).and_then(Value::as_object_mut);
    if found.is_none() {
        missing.push(pointer.to_owned());
    }
    found
}

/// The schema of query parameter `name` of `method path`, as a JSON pointer.
fn query_param(doc: &Value, method: &str, path: &str, name: &str) -> String {
    let escaped = path.replace('~', "~0").replace('/', "~1");
    let index = doc["paths"][path][method]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().position(|p| p["name"] == name))
        .unwrap_or(usize::MAX);
    format!("/paths/{escaped}/{method}/parameters/{index}/schema")
}

fn schema_prop(schema: &str, property: &str) -> String {
    format!("/components/schemas/{schema}/properties/{property}")
}

/// Enums and patterns, from the constants the handlers check against.
fn add_constraints(doc: &mut Value, missing: &mut Vec<String>) {
    let text = json!(routes::TEXT_PATTERN);
    set(
        doc,
        missing,
        &schema_prop("CreateDomain", "name"),
        "pattern",
        json!(domains::HOST_PATTERN),
    );
    set(
        doc,
        missing,
        &schema_prop("Domain", "status"),
        "enum",
        json!(domains::STATUSES),
    );
    for property in ["title", "slug", "body", "status"] {
        let pointer = schema_prop("CreateContent", property);
        match property {
            "title" => set(doc, missing, &pointer, "pattern", text.clone()),
            "slug" => set(
                doc,
                missing,
                &pointer,
                "pattern",
                json!(content::SLUG_PATTERN),
            ),
            "body" => set(
                doc,
                missing,
                &pointer,
                "pattern",
                json!(routes::NO_NUL_PATTERN),
            ),
            _ => {
                set(doc, missing, &pointer, "type", json!(["string", "null"]));
                set(
                    doc,
                    missing,
                    &pointer,
                    "enum",
                    json!(with_null(&content::STATUSES)),
                );
            }
        }
    }
    set(
        doc,
        missing,
        &schema_prop("ContentItem", "status"),
        "enum",
        json!(content::STATUSES),
    );
    set(
        doc,
        missing,
        &schema_prop("KeywordMetric", "keyword"),
        "pattern",
        text,
    );
    // At least one row in either list.
    set(
        doc,
        missing,
        "/components/schemas/IngestMetrics",
        "anyOf",
        json!([
            {"required": ["keywords"], "properties": {"keywords": {"minItems": 1}}},
            {"required": ["content"], "properties": {"content": {"minItems": 1}}},
        ]),
    );
    let instant = json!([
        {"type": "string", "format": "date"},
        {"type": "string", "format": "date-time"},
    ]);
    for property in ["from", "to"] {
        let pointer = schema_prop("CreateExport", property);
        if let Some(schema) = object_at(doc, missing, &pointer) {
            schema.remove("type");
            schema.insert(
                "anyOf".into(),
                json!([instant[0], instant[1], {"type": "null"}]),
            );
        }
        let pointer = query_param(doc, "get", "/v1/domains/{id}/analytics", property);
        if let Some(schema) = object_at(doc, missing, &pointer) {
            schema.remove("type");
            schema.insert("anyOf".into(), instant.clone());
        }
    }
    set(
        doc,
        missing,
        &schema_prop("CreateExport", "format"),
        "enum",
        json!(exports::FORMATS),
    );
    for (path, statuses) in [
        ("/v1/domains/{id}/content", &content::STATUSES[..]),
        ("/v1/domains/{id}/exports", &exports::STATUSES[..]),
    ] {
        let pointer = query_param(doc, "get", path, "status");
        set(doc, missing, &pointer, "type", json!("string"));
        set(doc, missing, &pointer, "enum", json!(statuses));
    }
    for path in [
        "/v1/domains",
        "/v1/domains/{id}/content",
        "/v1/domains/{id}/exports",
    ] {
        let pointer = query_param(doc, "get", path, "cursor");
        set(doc, missing, &pointer, "type", json!("string"));
        set(
            doc,
            missing,
            &pointer,
            "pattern",
            json!(routes::CURSOR_PATTERN),
        );
        let pointer = query_param(doc, "get", path, "limit");
        set(doc, missing, &pointer, "type", json!("integer"));
        set(doc, missing, &pointer, "minimum", json!(1));
        set(doc, missing, &pointer, "maximum", json!(100));
    }
    // Settings: any JSON object whose keys and strings, at any depth, have no NUL.
    let no_nul = json!(routes::NO_NUL_PATTERN);
    if let Some(schemas) = object_at(doc, missing, "/components/schemas") {
        schemas.insert(
            "SettingsValue".into(),
            json!({
                "description": "any JSON value whose strings and keys contain no NUL character",
                "anyOf": [
                    {"type": "string", "pattern": no_nul},
                    {"type": ["number", "boolean", "null"]},
                    {"type": "array", "items": {"$ref": "#/components/schemas/SettingsValue"}},
                    {"$ref": "#/components/schemas/Settings"},
                ],
            }),
        );
        schemas.insert(
            "Settings".into(),
            json!({
                "description": "a JSON object whose strings and keys, at any depth, contain no NUL character",
                "type": "object",
                "propertyNames": {"pattern": no_nul},
                "additionalProperties": {"$ref": "#/components/schemas/SettingsValue"},
            }),
        );
    }
    set(
        doc,
        missing,
        "/paths/~1v1~1domains~1{id}~1settings/put/requestBody/content/application~1json",
        "schema",
        json!({"$ref": "#/components/schemas/Settings"}),
    );
}

fn with_null(values: &[&str]) -> Vec<Value> {
    values
        .iter()
        .map(|v| json!(v))
        .chain([Value::Null])
        .collect()
}

#[cfg(test)]
mod tests;
