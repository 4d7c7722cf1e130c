//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes and
//! served at `/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::analytics::{AnalyticsReport, ContentAggregate, KeywordAggregate};
use crate::error::ErrorBody;
use crate::jobs::queue::ExportRow;
use crate::routes::{self, Page, content, domains, exports, health, ingest, settings};

/// The api's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "SmartBeak API", description = "Org-scoped domains, content, analytics and exports."),
    paths(
        health::healthz, health::readyz, health::metrics,
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

/// `GET /openapi.json`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
