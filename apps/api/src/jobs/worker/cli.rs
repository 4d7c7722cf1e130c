//! What the `smartbeak-domain-export` CLI needs besides the worker: the org of a domain
//! (`run` and `enqueue` have database access, not an api key) and the text of `status`.

use smartbeak_database::{Database, DbError};
use uuid::Uuid;

use crate::jobs::queue::ExportRow;

/// The org owning `domain_id`, or `None` when there is no such domain.
pub async fn domain_org(db: &Database, domain_id: Uuid) -> Result<Option<Uuid>, DbError> {
    db.run(async |conn| {
        sqlx::query_scalar::<_, Uuid>("SELECT org_id FROM domains WHERE id = $1")
            .bind(domain_id)
            .fetch_optional(conn)
            .await
    })
    .await
}

/// `status`'s text: one `field: value` line per column that is set.
pub fn status_text(row: &ExportRow) -> String {
    let mut out = String::new();
    let mut line = |name: &str, value: String| {
        out.push_str(&format!("{name:<16}{value}\n"));
    };
    line("id:", row.id.to_string());
    line("domain:", row.domain_id.to_string());
    line("format:", row.format.clone());
    line("status:", row.status.clone());
    line(
        "progress:",
        format!("{}% ({} rows)", row.progress, row.rows_written),
    );
    line(
        "attempts:",
        format!("{} of {}", row.attempts, row.max_attempts),
    );
    let sections: Vec<&str> = [
        (row.include_content, "content"),
        (row.include_keywords, "keywords"),
        (row.include_analytics, "analytics"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    line("sections:", sections.join(", "));
    if let Some(from) = row.date_from {
        line("from:", from.to_rfc3339());
    }
    if let Some(to) = row.date_to {
        line("to:", to.to_rfc3339());
    }
    if let Some(error) = &row.error {
        line("error:", error.clone());
    }
    if let Some(size) = row.size_bytes {
        line("size_bytes:", size.to_string());
    }
    if let Some(records) = row.record_count {
        line("records:", records.to_string());
    }
    if let Some(sha) = &row.checksum_sha256 {
        line("sha256:", sha.clone());
    }
    if let Some(expires) = row.expires_at {
        line("expires_at:", expires.to_rfc3339());
    }
    line("run_after:", row.run_after.to_rfc3339());
    line("created_at:", row.created_at.to_rfc3339());
    if let Some(started) = row.started_at {
        line("started_at:", started.to_rfc3339());
    }
    if let Some(finished) = row.finished_at {
        line("finished_at:", finished.to_rfc3339());
    }
    out
}
