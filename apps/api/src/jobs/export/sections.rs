//! The export's queries: the domain, the row counts, and each section read in
//! keyset-paginated chunks through the analytics pool.
//!
//! Every chunk is one bounded [`Database::run_analytics`] call (`... AND (key) > ($cursor)
//! ORDER BY key LIMIT n`), so each statement is short whatever the domain's size and no
//! section is ever collected. Ranges: `date_from` inclusive, `date_to` exclusive (as the
//! analytics endpoint), on `created_at` for content items and on `recorded_at` for keyword
//! metrics and the performance rows aggregated; settings have no date.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use smartbeak_database::{Database, DbError};
use sqlx::types::Json;
use uuid::Uuid;

use crate::analytics::{
    CONTENT_AGGREGATE_COLUMNS, CONTENT_AGGREGATE_FROM, CONTENT_AGGREGATE_GROUP_BY, ContentAggregate,
};
use crate::jobs::queue::ExportSpec;

/// Rows per chunk (one statement each).
pub(crate) const CHUNK_ROWS: i64 = 10_000;

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

/// A chunk of one section's rows.
#[derive(Debug)]
pub(crate) enum Batch {
    Content(Vec<ContentRow>),
    /// Content rows as PostgreSQL's CSV writer wrote them (`COPY ... TO STDOUT`, LF line
    /// ends, the formula guard applied in the SELECT): the CSV format's content section.
    ContentCsv {
        csv: Vec<u8>,
        rows: usize,
    },
    Keywords(Vec<KeywordRow>),
    Analytics(Vec<ContentAggregate>),
    Settings(Vec<SettingRow>),
}

impl Batch {
    /// Whether the chunk has no rows.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows in the chunk.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Content(rows) => rows.len(),
            Self::ContentCsv { rows, .. } => *rows,
            Self::Keywords(rows) => rows.len(),
            Self::Analytics(rows) => rows.len(),
            Self::Settings(rows) => rows.len(),
        }
    }
}

/// Where the next chunk of a section starts (the key of the last row read).
#[derive(Debug, Clone)]
pub(crate) enum Cursor {
    Content(DateTime<Utc>, Uuid),
    Keywords(DateTime<Utc>, i64),
    Analytics(Uuid),
    Settings(String),
}

/// The domain, if it exists and belongs to `spec.org_id`.
pub(crate) async fn domain(db: &Database, spec: &ExportSpec) -> Result<Option<DomainRow>, DbError> {
    let (row, _) = db
        .run_analytics(async |conn| {
            sqlx::query_as(
                "SELECT id, name, status, created_at FROM domains WHERE id = $1 AND org_id = $2",
            )
            .bind(spec.domain_id)
            .bind(spec.org_id)
            .fetch_optional(conn)
            .await
        })
        .await?;
    Ok(row)
}

const RANGE: &str =
    "coalesce($2::timestamptz, '-infinity') AND {col} < coalesce($3::timestamptz, 'infinity')";

fn range(col: &str) -> String {
    format!("{col} >= {}", RANGE.replace("{col}", col))
}

const SETTINGS_FROM: &str = "domain_settings s, jsonb_each(CASE WHEN jsonb_typeof(s.settings) = 'object' \
     THEN s.settings ELSE jsonb_build_object('value', s.settings) END) e";

/// Rows each section will export (for the percentage), one statement.
pub(crate) async fn count(db: &Database, spec: &ExportSpec) -> Result<u64, DbError> {
    let sql = format!(
        "SELECT \
           CASE WHEN $4 THEN (SELECT count(*) FROM content_items \
                WHERE domain_id = $1 AND {content}) ELSE 0 END \
         + CASE WHEN $5 THEN (SELECT count(*) FROM keyword_metrics \
                WHERE domain_id = $1 AND {keywords}) ELSE 0 END \
         + CASE WHEN $6 THEN (SELECT count(*) FROM (SELECT 1 FROM {CONTENT_AGGREGATE_FROM} \
                WHERE p.domain_id = $1 AND {perf} GROUP BY {CONTENT_AGGREGATE_GROUP_BY}) a) \
                ELSE 0 END \
         + (SELECT count(*) FROM {SETTINGS_FROM} WHERE s.domain_id = $1)",
        content = range("created_at"),
        keywords = range("recorded_at"),
        perf = range("p.recorded_at"),
    );
    let (total, _): (i64, _) = db
        .run_analytics(async |conn| {
            sqlx::query_scalar(&sql)
                .bind(spec.domain_id)
                .bind(spec.date_from)
                .bind(spec.date_to)
                .bind(spec.include_content)
                .bind(spec.include_keywords)
                .bind(spec.include_analytics)
                .fetch_one(conn)
                .await
        })
        .await?;
    Ok(u64::try_from(total).unwrap_or(0))
}

/// The statements of one section: the first chunk and the ones after a cursor.
struct Statements {
    first: String,
    after: String,
}

fn statements(section: Section) -> Statements {
    let (select, filter, key, after) = match section {
        Section::Content => (
            "SELECT id, title, slug, body, status, published_at, created_at, updated_at \
             FROM content_items"
                .to_owned(),
            format!("domain_id = $1 AND {}", range("created_at")),
            "created_at, id",
            "(created_at, id) > ($5, $6)",
        ),
        Section::Keywords => (
            "SELECT id, keyword, search_volume, position, clicks, impressions, ctr, recorded_at \
             FROM keyword_metrics"
                .to_owned(),
            format!("domain_id = $1 AND {}", range("recorded_at")),
            "recorded_at, id",
            "(recorded_at, id) > ($5, $6)",
        ),
        Section::Analytics => (
            format!("SELECT {CONTENT_AGGREGATE_COLUMNS} FROM {CONTENT_AGGREGATE_FROM}"),
            format!("p.domain_id = $1 AND {}", range("p.recorded_at")),
            "p.content_id",
            "p.content_id > $5",
        ),
        Section::Settings => (
            format!("SELECT e.key, e.value FROM {SETTINGS_FROM}"),
            // $2 and $3 are bound for every section; settings have no date.
            "s.domain_id = $1 AND ($2::timestamptz IS NULL OR true) \
             AND ($3::timestamptz IS NULL OR true)"
                .to_owned(),
            "e.key",
            "e.key > $5",
        ),
    };
    let group = if section == Section::Analytics {
        format!(" GROUP BY {CONTENT_AGGREGATE_GROUP_BY}")
    } else {
        String::new()
    };
    Statements {
        first: format!("{select} WHERE {filter}{group} ORDER BY {key} LIMIT $4"),
        after: format!("{select} WHERE {filter} AND {after}{group} ORDER BY {key} LIMIT $4"),
    }
}

/// Reads one section in chunks of [`CHUNK_ROWS`].
pub(crate) struct ChunkReader {
    section: Section,
    /// Content as `COPY ... CSV` bytes instead of rows.
    copy_csv: bool,
    statements: Statements,
    cursor: Option<Cursor>,
    chunk_rows: i64,
    done: bool,
}

impl ChunkReader {
    /// A reader of `section`, `chunk_rows` rows a statement.
    pub(crate) fn new(section: Section, chunk_rows: i64, copy_csv: bool) -> Self {
        Self {
            section,
            copy_csv: copy_csv && section == Section::Content,
            statements: statements(section),
            cursor: None,
            chunk_rows: chunk_rows.max(1),
            done: false,
        }
    }

    /// The next chunk, or `None` when the section is exhausted.
    pub(crate) async fn next(
        &mut self,
        db: &Database,
        spec: &ExportSpec,
    ) -> Result<Option<Batch>, DbError> {
        if self.done {
            return Ok(None);
        }
        if self.copy_csv {
            return self.next_copy(db, spec).await;
        }
        let sql = match self.cursor {
            None => self.statements.first.as_str(),
            Some(_) => self.statements.after.as_str(),
        };
        let cursor = self.cursor.clone();
        let chunk_rows = self.chunk_rows;
        let (batch, _) = db
            .run_analytics(async |conn| {
                macro_rules! query {
                    ($row:ty) => {
                        sqlx::query_as::<_, $row>(sql)
                            .bind(spec.domain_id)
                            .bind(spec.date_from)
                            .bind(spec.date_to)
                            .bind(chunk_rows)
                    };
                }
                Ok(match self.section {
                    Section::Content => {
                        let mut q = query!(ContentRow);
                        if let Some(Cursor::Content(at, id)) = &cursor {
                            q = q.bind(*at).bind(*id);
                        }
                        Batch::Content(q.fetch_all(&mut *conn).await?)
                    }
                    Section::Keywords => {
                        let mut q = query!(KeywordRow);
                        if let Some(Cursor::Keywords(at, id)) = &cursor {
                            q = q.bind(*at).bind(*id);
                        }
                        Batch::Keywords(q.fetch_all(&mut *conn).await?)
                    }
                    Section::Analytics => {
                        let mut q = query!(ContentAggregate);
                        if let Some(Cursor::Analytics(id)) = &cursor {
                            q = q.bind(*id);
                        }
                        Batch::Analytics(q.fetch_all(&mut *conn).await?)
                    }
                    Section::Settings => {
                        let mut q = query!(SettingRow);
                        if let Some(Cursor::Settings(key)) = &cursor {
                            q = q.bind(key.clone());
                        }
                        Batch::Settings(q.fetch_all(&mut *conn).await?)
                    }
                })
            })
            .await?;
        self.cursor = match &batch {
            Batch::Content(rows) => rows.last().map(|r| Cursor::Content(r.created_at, r.id)),
            Batch::ContentCsv { .. } => None,
            Batch::Keywords(rows) => rows.last().map(|r| Cursor::Keywords(r.recorded_at, r.id)),
            Batch::Analytics(rows) => rows.last().map(|r| Cursor::Analytics(r.content_id)),
            Batch::Settings(rows) => rows.last().map(|r| Cursor::Settings(r.key.clone())),
        };
        if i64::try_from(batch.len()).unwrap_or(i64::MAX) < self.chunk_rows {
            self.done = true;
        }
        if batch.is_empty() {
            return Ok(None);
        }
        Ok(Some(batch))
    }
}

impl ChunkReader {
    /// The next content chunk through `COPY (SELECT ...) TO STDOUT (FORMAT csv)`: first the
    /// key of the chunk's last row (an index-only `OFFSET`), then the rows up to it, both on
    /// one connection in one bounded call. `COPY` takes no parameters: the values inlined
    /// are ids and timestamps formatted here, never text from a row or a caller.
    async fn next_copy(
        &mut self,
        db: &Database,
        spec: &ExportSpec,
    ) -> Result<Option<Batch>, DbError> {
        let after = match &self.cursor {
            // The scalar bound lets the planner estimate the range (a row comparison it
            // cannot), so it keeps to the index.
            Some(Cursor::Content(at, id)) => {
                format!(
                    " AND created_at >= {at} AND (created_at, id) > ({at}, '{id}')",
                    at = literal(Some(*at), "")
                )
            }
            _ => String::new(),
        };
        let filter = format!(
            "domain_id = '{}' AND created_at >= {} AND created_at < {}{after}",
            spec.domain_id,
            literal(spec.date_from, "-infinity"),
            literal(spec.date_to, "infinity"),
        );
        let boundary_sql = format!(
            "SELECT created_at, id FROM content_items WHERE {filter} \
             ORDER BY created_at, id OFFSET $1 LIMIT 1"
        );
        let chunk_rows = self.chunk_rows;
        let ((csv, boundary), _) = db
            .run_analytics(async |conn| {
                let boundary: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(&boundary_sql)
                    .bind(chunk_rows - 1)
                    .fetch_optional(&mut *conn)
                    .await?;
                let upto = match boundary {
                    Some((at, id)) => {
                        format!(
                            " AND created_at <= {at} AND (created_at, id) <= ({at}, '{id}')",
                            at = literal(Some(at), "")
                        )
                    }
                    None => String::new(),
                };
                let copy = format!(
                    "COPY (SELECT id, {title}, {slug}, {body}, {status}, {published}, \
                     {created}, {updated} FROM content_items WHERE {filter}{upto} \
                     ORDER BY created_at, id LIMIT {chunk_rows}) TO STDOUT WITH (FORMAT csv)",
                    title = guard_sql("title"),
                    slug = guard_sql("slug"),
                    body = guard_sql("body"),
                    status = guard_sql("status"),
                    published = time_sql("published_at"),
                    created = time_sql("created_at"),
                    updated = time_sql("updated_at"),
                );
                let mut stream = conn.copy_out_raw(&copy).await?;
                let mut csv = Vec::with_capacity(256 * usize::try_from(chunk_rows).unwrap_or(0));
                while let Some(bytes) = stream.try_next().await? {
                    csv.extend_from_slice(&bytes);
                }
                Ok((csv, boundary))
            })
            .await?;
        match boundary {
            Some((at, id)) => self.cursor = Some(Cursor::Content(at, id)),
            None => self.done = true,
        }
        let rows = count_records(&csv);
        if rows == 0 {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(Batch::ContentCsv { csv, rows }))
    }
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

/// The CSV formula guard in SQL: `'` before a value starting with `=`, `+`, `-`, `@`, tab,
/// CR or `|` (the same rule as `csv::guard`).
fn guard_sql(column: &str) -> String {
    format!(
        "CASE WHEN left({column}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r', '|') \
         THEN '''' || {column} ELSE {column} END"
    )
}

/// A timestamp as the writers print it: RFC 3339, UTC, microseconds (`...T...Z`).
fn time_sql(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// Records in PostgreSQL CSV output: line feeds outside quotes (a doubled quote inside a
/// quoted field toggles twice).
fn count_records(csv: &[u8]) -> usize {
    let mut quoted = false;
    let mut records = 0;
    for &byte in csv {
        match byte {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => records += 1,
            _ => {}
        }
    }
    records
}
