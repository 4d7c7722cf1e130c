//! The document against the router and the handlers' checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use super::*;
use crate::routes::check_len;

#[test]
fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let routed: BTreeSet<(String, String)> = crate::http::routes()
        .into_iter()
        .map(|(method, path)| (method.to_owned(), path.to_owned()))
        .collect();
    let documented: BTreeSet<(String, String)> = operations(document()).into_iter().collect();
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes without documentation: {missing:?}; documented but not routed: {extra:?}"
    );
    assert_eq!(routed.len(), 18);
}

/// The router itself, asked rather than its `routes!` list: every method on every path of the
/// document goes through the real [`crate::app`] (with a key, `{id}` filled in), and a
/// `(method, path)` counts as routed unless axum answered it as unrouted (405, or the
/// fallback's 404 `route not found`). The routed pairs must be the documented ones: an
/// operation documented but not routed, or a method routed on a documented path but not
/// documented, fails here whatever `crate::http::routes()` says. The paths come from the
/// document, so a routed path it lacks is not found here: the tidy test of `http.rs` (routes
/// only through `routes!`, nothing nested) and the test above exclude that structurally.
/// HEAD, which axum answers on every GET route, is not asked.
#[tokio::test]
async fn the_router_serves_exactly_the_documented_methods_on_every_documented_path() {
    let api = crate::routes::exports::tests::TestApi::new().await;
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(doc).into_iter().collect();
    let id = api.f.domain.to_string();
    let mut routed = BTreeSet::new();
    for path in doc["paths"].as_object().unwrap().keys() {
        let uri = path.replace("{id}", &id);
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
            let answer = api.call(method, &uri, None).await;
            let unrouted = answer.status == axum::http::StatusCode::METHOD_NOT_ALLOWED
                || (answer.status == axum::http::StatusCode::NOT_FOUND
                    && answer.json()["error"] == "route not found");
            if !unrouted {
                routed.insert((method.to_owned(), path.clone()));
            }
        }
    }
    let missing: Vec<_> = documented.difference(&routed).collect();
    let extra: Vec<_> = routed.difference(&documented).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "documented but not routed: {missing:?}; routed but not documented: {extra:?}"
    );
    // The probe tells an unrouted request apart: a path and a method no route has.
    let nowhere = api.call("GET", "/v1/nowhere", None).await;
    assert_eq!(nowhere.json()["error"], "route not found");
    let unserved = api.call("PATCH", "/v1/domains", None).await;
    assert_eq!(unserved.status, axum::http::StatusCode::METHOD_NOT_ALLOWED);
    api.finish().await;
}

#[test]
fn every_operation_documents_the_statuses_it_can_answer() {
    let doc = document();
    for (method, path) in operations(doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let responses = op["responses"].as_object().unwrap();
        let has = |status: &str| responses.contains_key(status);
        let name = format!("{method} {path}");
        let probe = crate::http::PROBE_ROUTES.contains(&(method.as_str(), path.as_str()));
        if probe {
            // Outside every layer: never shed, never timed out.
            assert!(!has("504") && !has("413"), "{name}");
        } else {
            assert!(has("503") && has("504"), "{name}");
            let timeout = &responses["504"];
            assert!(
                timeout["description"]
                    .as_str()
                    .unwrap()
                    .contains("REQUEST_TIMEOUT"),
                "{name}"
            );
        }
        assert_eq!(op["operationId"], operation_id(&method, &path));
        if path.starts_with("/v1/") {
            assert!(has("401") && has("429"), "{name}");
            assert!(op["security"].is_array(), "{name}");
            let limited = &responses["429"];
            assert_eq!(
                limited["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody"
            );
            for header in ["Retry-After", "RateLimit", "RateLimit-Policy"] {
                assert!(limited["headers"].get(header).is_some(), "{name} {header}");
            }
            assert!(
                responses["401"]["headers"]
                    .get("WWW-Authenticate")
                    .is_some()
            );
        }
        if path.contains("{id}") {
            assert!(has("400") && has("404"), "{name}");
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413", "415", "422"] {
                assert!(has(status), "{name} {status}");
            }
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
}

#[test]
fn creating_a_domain_links_to_every_operation_on_it() {
    let doc = document();
    let links = doc["paths"]["/v1/domains"]["post"]["responses"]["201"]["links"]
        .as_object()
        .unwrap();
    for id in [
        "get_v1_domains_id",
        "get_v1_domains_id_settings",
        "put_v1_domains_id_settings",
        "post_v1_domains_id_metrics",
        "post_v1_domains_id_exports",
    ] {
        assert_eq!(links[id]["operationId"], id);
        assert_eq!(links[id]["parameters"]["path.id"], "$response.body#/id");
    }
    let links = &doc["paths"]["/v1/domains/{id}/exports"]["post"]["responses"]["202"]["links"];
    assert!(links.get("delete_v1_exports_id").is_some());
    assert!(links.get("get_v1_exports_id_download").is_some());
    // A cancelled export is read again (the stateful phase's `use_after_free` sees it).
    let links = &doc["paths"]["/v1/exports/{id}"]["delete"]["responses"]["200"]["links"];
    assert_eq!(
        links["get_v1_exports_id"]["parameters"]["path.id"],
        "$response.body#/id"
    );
}

fn pattern_at(pointer: &str) -> regex::Regex {
    let pattern = document()
        .pointer(pointer)
        .and_then(|p| p["pattern"].as_str())
        .unwrap_or_else(|| panic!("no pattern at {pointer}"));
    regex::Regex::new(pattern).unwrap()
}

#[test]
fn documented_patterns_accept_what_the_handlers_accept() {
    let host = pattern_at("/components/schemas/CreateDomain/properties/name");
    for name in [
        "example.com",
        "a.b-c.io",
        "localhost",
        "x1.y2",
        "",
        "Example.com",
        "a..b",
        "-a.com",
        "a-.com",
        "a b.com",
        "a.com.",
        "é.com",
        &"a".repeat(63),
        &"a".repeat(64),
    ] {
        assert_eq!(
            host.is_match(name),
            domains::validate_host(name).is_ok(),
            "{name:?}"
        );
    }
    let title = pattern_at("/components/schemas/CreateContent/properties/title");
    // Blank means Unicode White_Space only, in the pattern as in the handler.
    for blank in ["\u{3000}", "\u{a0}", "\u{2003}"] {
        assert!(!title.is_match(blank), "{blank:?}");
        assert!(check_len("title", blank, 1, 500).is_err(), "{blank:?}");
    }
    for text in [
        "hello",
        " x ",
        "",
        " ",
        "\t\n",
        "a\0b",
        "\u{a0}",
        "\u{1c}",
        "\u{b}",
        "\u{c}",
        "ok\u{b}",
        "\u{3000}",
        "\u{2003}",
        "\u{85}",
        "\u{1680}",
        "\u{200a}",
        "\u{200b}",
        "\u{feff}",
        "\u{3000}x",
        "\u{2028}\u{2029}\u{202f}\u{205f}",
    ] {
        let valid = !text.is_empty() && text.chars().count() <= 500;
        assert_eq!(
            valid && title.is_match(text),
            check_len("title", text, 1, 500).is_ok(),
            "{text:?}"
        );
    }
    let body = pattern_at("/components/schemas/CreateContent/properties/body");
    assert!(body.is_match("") && body.is_match("any text") && !body.is_match("a\0"));
    let cursor = pattern_at("/paths/~1v1~1domains/get/parameters/1/schema");
    assert_eq!(cursor.as_str(), routes::CURSOR_PATTERN);
}

#[test]
fn enums_come_from_the_handlers_constants() {
    let doc = document();
    assert_eq!(
        doc["components"]["schemas"]["CreateExport"]["properties"]["format"]["enum"],
        json!(exports::FORMATS)
    );
    let status = doc["paths"]["/v1/domains/{id}/exports"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "status")
        .unwrap();
    assert_eq!(status["schema"]["enum"], json!(exports::STATUSES));
}

#[test]
fn the_fuzz_hooks_copy_the_handlers_limits() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/hooks.py");
    let hooks = std::fs::read_to_string(&path).unwrap();
    let constant = |name: &str| {
        hooks
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("{name} is not set in {}", path.display()))
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(
        constant("MAX_RANGE_DAYS"),
        crate::routes::analytics::MAX_RANGE_DAYS
    );
    assert_eq!(
        constant("MAX_ROWS"),
        i64::try_from(ingest::MAX_ROWS).unwrap()
    );
    // The document's description states both too.
    let info = document()["info"]["description"].as_str().unwrap();
    let rows = ingest::MAX_ROWS;
    let rows = format!("{},{:03} rows", rows / 1000, rows % 1000);
    assert!(info.contains(&rows), "{rows}");
    let days = format!("{} days", crate::routes::analytics::MAX_RANGE_DAYS);
    assert!(info.contains(&days), "{days}");
}

#[test]
fn every_operation_behind_the_body_limit_documents_413() {
    for (method, path) in operations(document()) {
        if crate::http::PROBE_ROUTES.contains(&(method.as_str(), path.as_str())) {
            continue;
        }
        let op = &document()["paths"][&path][method.to_lowercase()];
        assert!(op["responses"]["413"].is_object(), "{method} {path}");
    }
}

#[test]
fn every_constraint_and_link_finds_its_place_in_the_document() {
    let (_, missing) = build_checked().unwrap();
    assert!(missing.is_empty(), "no schema at {missing:?}");
}
