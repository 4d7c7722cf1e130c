//! The export's queries: the domain, the row counts, and one statement per section, all in
//! one read [`Snapshot`] of the analytics pool (so the sections and the counts agree).
//!
//! The CSV format reads each section with one `COPY (SELECT ...) TO STDOUT (FORMAT csv,
//! HEADER)` ([`copy_sql`]: the formula guard and the non-finite rule in the SELECT); JSON
//! and Markdown read each section with one streamed row query ([`RowReader`]). Nothing is
//! collected: rows and frames are handed on as they arrive. Ranges: `date_from` inclusive,
//! `date_to` exclusive (as the analytics endpoint), on `created_at` for content items and
//! on `recorded_at` for keyword metrics and the performance rows aggregated; settings have
//! no date.
//!
//! Non-finite numbers (`NaN`, `Infinity`: `keyword_metrics.position` admits them) have one
//! rule in every format: JSON `null`, an empty CSV field, an empty Markdown cell.

use chrono::{DateTime, Utc};
use serde::Serialize;
use smartbeak_database::{Database, DbError, Rows, Snapshot};
use sqlx::types::Json;
use uuid::Uuid;

use crate::analytics::{
    CONTENT_AGGREGATE_COLUMNS, CONTENT_AGGREGATE_FROM, CONTENT_AGGREGATE_GROUP_BY, ContentAggregate,
};
use crate::jobs::queue::ExportSpec;

/// Rows handed to the writer at a time (JSON, Markdown): a batch closes at this many rows
/// or at [`BATCH_BYTES`] of text, whichever comes first.
pub(crate) const BATCH_ROWS: usize = 256;
/// Text bytes (approximate) after which a batch of rows, or of COPY frames, is handed on.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;

/// One part of an export, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    /// `content_items` of the domain (created in the range).
    Content,
    /// `keyword_metrics` rows (recorded in the range).
    Keywords,
    /// The content performance aggregates (one row per item, over the range).
    Analytics,
    /// `domain_settings.settings`, one row per top-level key.
    Settings,
}

impl Section {
    /// Name of the section (JSON key, CSV file stem, Markdown heading).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Content => "content",
            Self::Keywords => "keywords",
            Self::Analytics => "analytics",
            Self::Settings => "settings",
        }
    }

    /// The sections `spec` includes, in file order. Settings are always included (the
    /// spec has no flag for them).
    pub(crate) fn included(spec: &ExportSpec) -> Vec<Section> {
        let mut sections = Vec::with_capacity(4);
        if spec.include_content {
            sections.push(Self::Content);
        }
        if spec.include_keywords {
            sections.push(Self::Keywords);
        }
        if spec.include_analytics {
            sections.push(Self::Analytics);
        }
        sections.push(Self::Settings);
        sections
    }
}

/// The exported domain.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub(crate) struct DomainRow {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// One content item.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub(crate) struct ContentRow {
    pub(crate) id: Uuid,
    pub(crate) title: String,
    pub(crate) slug: String,
    pub(crate) body: String,
    pub(crate) status: String,
    pub(crate) published_at: Option<DateTime<Utc>>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

/// One keyword metrics row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub(crate) struct KeywordRow {
    pub(crate) id: i64,
    pub(crate) keyword: String,
    pub(crate) search_volume: i32,
    pub(crate) position: f64,
    pub(crate) clicks: i64,
    pub(crate) impressions: i64,
    pub(crate) ctr: f64,
    pub(crate) recorded_at: DateTime<Utc>,
}

/// One top-level settings key and its JSON value.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct SettingRow {
    pub(crate) key: String,
    pub(crate) value: Json<serde_json::Value>,
}

/// Rows of one section, handed to the writer (at most [`BATCH_ROWS`], about
/// [`BATCH_BYTES`] of text).
#[derive(Debug)]
pub(crate) enum Batch {
    Content(Vec<ContentRow>),
    Keywords(Vec<KeywordRow>),
    Analytics(Vec<ContentAggregate>),
    Settings(Vec<SettingRow>),
}

impl Batch {
    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Content(rows) => rows.len(),
            Self::Keywords(rows) => rows.len(),
            Self::Analytics(rows) => rows.len(),
            Self::Settings(rows) => rows.len(),
        }
    }
}

/// The domain, if it exists and belongs to `spec.org_id`, as the snapshot sees it.
pub(crate) async fn domain(
    snapshot: &mut Snapshot,
    spec: &ExportSpec,
) -> Result<Option<DomainRow>, DbError> {
    let mut rows = snapshot.fetch(
        sqlx::query_as(
            "SELECT id, name, status, created_at FROM domains WHERE id = $1 AND org_id = $2",
        )
        .bind(spec.domain_id)
        .bind(spec.org_id),
    )?;
    let row = rows.next().await?;
    // Read to the end, so the session is ready for the next statement.
    while rows.next().await?.is_some() {}
    Ok(row)
}

/// Whether the domain exists (and is the org's) on the primary: asked when the replica
/// does not have it, to tell a replica that lags from a domain that is not there.
pub(crate) async fn domain_on_primary(db: &Database, spec: &ExportSpec) -> Result<bool, DbError> {
    db.run(async |conn| {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM domains WHERE id = $1 AND org_id = $2)")
            .bind(spec.domain_id)
            .bind(spec.org_id)
            .fetch_one(conn)
            .await
    })
    .await
}

const RANGE: &str =
    "coalesce($2::timestamptz, '-infinity') AND {col} < coalesce($3::timestamptz, 'infinity')";

fn range(col: &str) -> String {
    format!("{col} >= {}", RANGE.replace("{col}", col))
}

const SETTINGS_FROM: &str = "domain_settings s, jsonb_each(CASE WHEN jsonb_typeof(s.settings) = 'object' \
     THEN s.settings ELSE jsonb_build_object('value', s.settings) END) e";

/// Rows the included sections will export (for the percentage): the same rows the
/// sections write. Content items and keyword metrics are index-only counts
/// (`content_items_domain_cursor_idx`, `keyword_metrics_domain_time_idx`) in the range; the
/// analytics count is the number of groups of the section's own aggregate (the same FROM,
/// range and GROUP BY), so a date range counts only the items with performance rows in it
/// (before i11-finish it was every content item of the domain, an upper bound that ignored
/// the range; the aggregate costs more than that index count, docs/bench/HISTORY.md). One
/// statement, in the export's snapshot, naming only the tables of the included sections
/// (PostgreSQL locks every table a statement names, even in a branch it never takes).
pub(crate) async fn count(snapshot: &mut Snapshot, spec: &ExportSpec) -> Result<u64, DbError> {
    let sql = count_sql(spec);
    let mut rows = snapshot.fetch(
        sqlx::query_as::<_, (i64,)>(&sql)
            .bind(spec.domain_id)
            .bind(spec.date_from)
            .bind(spec.date_to),
    )?;
    let total = rows.next().await?.map_or(0, |(n,)| n);
    while rows.next().await?.is_some() {}
    Ok(u64::try_from(total).unwrap_or(0))
}

/// The statement of [`count`]: `$1` the domain, `$2`/`$3` the range (typed even when no
/// included section uses them).
fn count_sql(spec: &ExportSpec) -> String {
    let mut parts = Vec::new();
    if spec.include_content {
        parts.push(format!(
            "(SELECT count(*) FROM content_items WHERE domain_id = $1 AND {})",
            range("created_at")
        ));
    }
    if spec.include_keywords {
        parts.push(format!(
            "(SELECT count(*) FROM keyword_metrics WHERE domain_id = $1 AND {})",
            range("recorded_at")
        ));
    }
    if spec.include_analytics {
        // The groups the section writes: the same FROM, range and GROUP BY.
        parts.push(format!(
            "(SELECT count(*) FROM (SELECT 1 FROM {CONTENT_AGGREGATE_FROM} \
             WHERE p.domain_id = $1 AND {} GROUP BY {CONTENT_AGGREGATE_GROUP_BY}) g)",
            range("p.recorded_at")
        ));
    }
    parts.push(format!(
        "(SELECT count(*) FROM {SETTINGS_FROM} WHERE s.domain_id = $1)"
    ));
    format!(
        "SELECT {} WHERE ($2::timestamptz IS NULL OR true) AND ($3::timestamptz IS NULL OR true)",
        parts.join(" + ")
    )
}

/// The row query of one section: `$1` the domain, `$2`/`$3` the range.
pub(crate) fn select_sql(section: Section) -> String {
    match section {
        Section::Content => format!(
            "SELECT id, title, slug, body, status, published_at, created_at, updated_at \
             FROM content_items WHERE domain_id = $1 AND {} ORDER BY created_at, id",
            range("created_at")
        ),
        Section::Keywords => format!(
            "SELECT id, keyword, search_volume, position, clicks, impressions, ctr, recorded_at \
             FROM keyword_metrics WHERE domain_id = $1 AND {} ORDER BY recorded_at, id",
            range("recorded_at")
        ),
        Section::Analytics => format!(
            "SELECT {CONTENT_AGGREGATE_COLUMNS} FROM {CONTENT_AGGREGATE_FROM} \
             WHERE p.domain_id = $1 AND {} GROUP BY {CONTENT_AGGREGATE_GROUP_BY} \
             ORDER BY p.content_id",
            range("p.recorded_at")
        ),
        // $2 and $3 are bound for every section; settings have no date.
        Section::Settings => format!(
            "SELECT e.key, e.value FROM {SETTINGS_FROM} WHERE s.domain_id = $1 \
             AND ($2::timestamptz IS NULL OR true) AND ($3::timestamptz IS NULL OR true) \
             ORDER BY e.key"
        ),
    }
}

/// Reads one section's rows in batches (JSON, Markdown): the section's one statement,
/// streamed.
pub(crate) enum RowReader<'s> {
    Content(Rows<'s, ContentRow>),
    Keywords(Rows<'s, KeywordRow>),
    Analytics(Rows<'s, ContentAggregate>),
    Settings(Rows<'s, SettingRow>),
}

impl<'s> RowReader<'s> {
    /// Starts `section`'s statement (`sql`, from [`select_sql`]) in `snapshot`.
    pub(crate) fn start(
        snapshot: &'s mut Snapshot,
        section: Section,
        sql: &'s str,
        spec: &ExportSpec,
    ) -> Result<Self, DbError> {
        macro_rules! query {
            ($row:ty) => {
                sqlx::query_as::<_, $row>(sql)
                    .bind(spec.domain_id)
                    .bind(spec.date_from)
                    .bind(spec.date_to)
            };
        }
        Ok(match section {
            Section::Content => Self::Content(snapshot.fetch(query!(ContentRow))?),
            Section::Keywords => Self::Keywords(snapshot.fetch(query!(KeywordRow))?),
            Section::Analytics => Self::Analytics(snapshot.fetch(query!(ContentAggregate))?),
            Section::Settings => Self::Settings(snapshot.fetch(query!(SettingRow))?),
        })
    }

    /// The next batch of rows and the bytes of text it holds (roughly), `None` at the
    /// section's end.
    pub(crate) async fn next(&mut self) -> Result<Option<(Batch, usize)>, DbError> {
        let (batch, bytes) = match self {
            Self::Content(rows) => fill(rows).await.map(|(r, n)| (Batch::Content(r), n))?,
            Self::Keywords(rows) => fill(rows).await.map(|(r, n)| (Batch::Keywords(r), n))?,
            Self::Analytics(rows) => fill(rows).await.map(|(r, n)| (Batch::Analytics(r), n))?,
            Self::Settings(rows) => fill(rows).await.map(|(r, n)| (Batch::Settings(r), n))?,
        };
        Ok((batch.len() > 0).then_some((batch, bytes)))
    }
}

/// The text a row holds, roughly (for [`BATCH_BYTES`]).
trait TextLen {
    fn text_len(&self) -> usize;
}

impl TextLen for ContentRow {
    fn text_len(&self) -> usize {
        self.title.len() + self.slug.len() + self.body.len()
    }
}

impl TextLen for KeywordRow {
    fn text_len(&self) -> usize {
        self.keyword.len()
    }
}

impl TextLen for ContentAggregate {
    fn text_len(&self) -> usize {
        self.title.len()
    }
}

impl TextLen for SettingRow {
    fn text_len(&self) -> usize {
        // The value counts too: its JSON text (settings are few; encoding one is cheap).
        self.key.len() + serde_json::to_string(&self.value.0).map_or(0, |text| text.len())
    }
}

/// Up to [`BATCH_ROWS`] rows or about [`BATCH_BYTES`] of text, and their bytes.
async fn fill<T: TextLen>(rows: &mut Rows<'_, T>) -> Result<(Vec<T>, usize), DbError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < BATCH_ROWS && bytes < BATCH_BYTES {
        let Some(row) = rows.next().await? else {
            break;
        };
        bytes += row.text_len() + 64;
        out.push(row);
    }
    Ok((out, bytes))
}

/// The `COPY (SELECT ...) TO STDOUT (FORMAT csv, HEADER)` of one section; its header is
/// [`super::csv::columns`]. `COPY` takes no parameters: the values inlined are the domain
/// id and timestamps formatted here, never text from a row or a caller.
///
/// In the SELECT: the formula guard on the user-text columns only ([`guard_sql`]; not on
/// ids, numbers, timestamps or the `status` enum) and non-finite floats as NULL, an empty
/// field ([`finite_sql`]). Timestamps are selected as they are: PostgreSQL prints them in
/// UTC ISO form (the snapshot sets `TimeZone` and `DateStyle`) and the CSV writer turns that
/// into RFC 3339 as it copies (`super::csv`); `to_char` in the SELECT doubled the server's
/// time per row (docs/bench/HISTORY.md "Domain export").
pub(crate) fn copy_sql(section: Section, spec: &ExportSpec) -> String {
    let domain = spec.domain_id.hyphenated();
    let from = literal(spec.date_from, "-infinity");
    let to = literal(spec.date_to, "infinity");
    let select = match section {
        Section::Content => format!(
            "SELECT id, {title} AS title, {slug} AS slug, {body} AS body, status, \
             published_at, created_at, updated_at FROM content_items WHERE domain_id = '{domain}' \
             AND created_at >= {from} AND created_at < {to} ORDER BY created_at, id",
            title = guard_sql("title"),
            slug = guard_sql("slug"),
            body = guard_sql("body"),
        ),
        Section::Keywords => format!(
            "SELECT id, {keyword} AS keyword, search_volume, {position} AS position, clicks, \
             impressions, {ctr} AS ctr, recorded_at FROM keyword_metrics \
             WHERE domain_id = '{domain}' AND recorded_at >= {from} AND recorded_at < {to} \
             ORDER BY recorded_at, id",
            keyword = guard_sql("keyword"),
            position = finite_sql("position"),
            ctr = finite_sql("ctr"),
        ),
        // The api's aggregate (shared SQL), the guard and the finite rule applied outside.
        Section::Analytics => format!(
            "SELECT content_id, {title} AS title, page_views, unique_visitors, \
             {bounce} AS avg_bounce_rate, conversions, revenue_cents FROM ( \
             SELECT {CONTENT_AGGREGATE_COLUMNS} FROM {CONTENT_AGGREGATE_FROM} \
             WHERE p.domain_id = '{domain}' AND p.recorded_at >= {from} \
             AND p.recorded_at < {to} GROUP BY {CONTENT_AGGREGATE_GROUP_BY}) a \
             ORDER BY content_id",
            title = guard_sql("title"),
            bounce = finite_sql("avg_bounce_rate"),
        ),
        Section::Settings => format!(
            "SELECT {key} AS key, {value} AS value FROM {SETTINGS_FROM} \
             WHERE s.domain_id = '{domain}' ORDER BY e.key",
            key = guard_sql("e.key"),
            value = guard_sql("e.value::text"),
        ),
    };
    format!("COPY ({select}) TO STDOUT (FORMAT csv, HEADER)")
}

/// A timestamp literal for an inlined statement (`fallback` for `None`).
fn literal(at: Option<DateTime<Utc>>, fallback: &str) -> String {
    match at {
        Some(at) => format!(
            "'{}'::timestamptz",
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ),
        None => format!("'{fallback}'::timestamptz"),
    }
}

/// The CSV formula guard in SQL: `'` before a value whose first character is `=`, `+`,
/// `-`, `@`, tab, CR or `|` (the original's rule). `ascii()` looks at the first
/// character only (all of these are ASCII; `ascii('')` is 0): no substring is built.
fn guard_sql(expr: &str) -> String {
    format!(
        "CASE WHEN ascii({expr}) IN (61, 43, 45, 64, 9, 13, 124) \
         THEN '''' || {expr} ELSE {expr} END"
    )
}

/// A float, NULL (an empty CSV field) when not finite (`NaN`, `Infinity`, `-Infinity`).
fn finite_sql(expr: &str) -> String {
    format!("CASE WHEN {expr} IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE {expr} END")
}
