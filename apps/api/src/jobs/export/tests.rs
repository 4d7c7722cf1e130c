//! The export writers against a real PostgreSQL: every format read back and compared with
//! the database rows, the checksum, the cap, ENOSPC (an injected writer error), cancel,
//! the include flags and the date range, tenancy, and the directory's safety.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use smartbeak_database::testing::TestDatabase;

use super::*;

/// Values that break naive writers: separators, quotes, line breaks, tabs, unicode,
/// binary-looking text, and every formula prefix.
const NASTY: &[&str] = &[
    "plain title",
    "with, comma",
    "with \"quotes\" and 'single'",
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nend",
    "tab\tinside",
    "unicode — héllo 日本語 🦀",
    "binary-looking \u{1}\u{2}\u{7f}\u{fffd}\u{1b}[0m",
    "=SUM(A1:A2)",
    "+1+2",
    "-1",
    "@cmd",
    "\tleading tab",
    "\rleading cr",
    "|pipe first",
    "back\\slash | pipe",
];

fn expected_guard(value: &str) -> String {
    match value.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r' | '|') => format!("'{value}"),
        _ => value.to_owned(),
    }
}

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

struct Fixture {
    tdb: TestDatabase,
    db: Database,
    org: Uuid,
    domain: Uuid,
    dir: tempfile::TempDir,
    export_dir: ExportDir,
}

impl Fixture {
    async fn new() -> Self {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "export-tests")
            .await
            .unwrap();
        let org = Uuid::new_v4();
        let domain = Uuid::new_v4();
        let pool = db.primary().clone();
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'org')")
            .bind(org)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'exported | domain')")
            .bind(domain)
            .bind(org)
            .execute(&pool)
            .await
            .unwrap();
        // Content: one item per nasty value, every second pair sharing a created_at (the
        // keyset's tie-break on id is exercised with small chunks).
        for (i, value) in NASTY.iter().enumerate() {
            let created = base_time() + Duration::days(i as i64 / 2);
            let published = (i % 3 == 0).then_some(created + Duration::hours(1));
            let id = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO content_items (id, domain_id, title, slug, body, status, \
                 published_at, created_at, updated_at, publish_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                 CASE WHEN $6 = 'scheduled' THEN $8 END)",
            )
            .bind(id)
            .bind(domain)
            .bind(*value)
            .bind(format!("{value}{i}"))
            .bind(format!("{value} body, \"{i}\"\n{value}"))
            .bind(["draft", "published", "scheduled", "archived"][i % 4])
            .bind(published)
            .bind(created)
            // Fractions of 0 to 6 digits (the CSV writer pads PostgreSQL's to 6).
            .bind(
                created
                    + Duration::microseconds(
                        [0, 500_000, 120_000, 123_000, 123_400, 123_450, 123_456, 1][i % 8],
                    ),
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, \
                 clicks, impressions, ctr, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(domain)
            .bind(*value)
            .bind(100 + i as i32)
            .bind(1.5 + i as f64 / 3.0)
            .bind(i as i64)
            .bind(10 * i as i64)
            .bind(0.1 + i as f64 / 100.0)
            .bind(created)
            .execute(&pool)
            .await
            .unwrap();
            for day in 0..2 {
                sqlx::query(
                    "INSERT INTO content_performance (domain_id, content_id, page_views, \
                     unique_visitors, bounce_rate, conversions, revenue_cents, recorded_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(domain)
                .bind(id)
                .bind(10 + i as i64 + day)
                .bind(5 + day)
                .bind(0.25 + day as f64 / 10.0)
                .bind(day)
                .bind(100 * i as i64)
                .bind(created + Duration::days(day))
                .execute(&pool)
                .await
                .unwrap();
            }
        }
        sqlx::query("INSERT INTO domain_settings (domain_id, settings) VALUES ($1, $2)")
            .bind(domain)
            .bind(serde_json::json!({
                "theme": "=dark",
                "threshold": -5,
                "nested": {"a": [1, 2, "x,y"]},
                "|key": "v,\"x\"\nz",
            }))
            .execute(&pool)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let export_dir = ExportDir::open(&dir.path().join("exports")).unwrap();
        Self {
            tdb,
            db,
            org,
            domain,
            dir,
            export_dir,
        }
    }

    fn spec(&self, format: ExportFormat) -> ExportSpec {
        ExportSpec {
            id: Uuid::new_v4(),
            token: 1,
            org_id: self.org,
            domain_id: self.domain,
            format,
            include_content: true,
            include_keywords: true,
            include_analytics: true,
            date_from: None,
            date_to: None,
        }
    }

    async fn run(&self, spec: &ExportSpec, hooks: Hooks) -> Result<ExportOutput, ExportError> {
        self.run_limited(spec, DEFAULT_MAX_BYTES, hooks).await
    }

    async fn run_limited(
        &self,
        spec: &ExportSpec,
        max_bytes: u64,
        hooks: Hooks,
    ) -> Result<ExportOutput, ExportError> {
        let (progress, _) = watch::channel(Progress::default());
        run_export_with(
            &self.db,
            spec,
            &self.export_dir,
            ExportLimits::new(max_bytes),
            &progress,
            &CancellationToken::new(),
            hooks,
        )
        .await
    }

    /// The names in the export directory.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.export_dir.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Checks size and checksum against the file and returns its bytes.
    fn read_output(&self, output: &ExportOutput) -> Vec<u8> {
        let path = self.export_dir.resolve(&output.storage_path).unwrap();
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.len() as u64, output.size_bytes);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), output.checksum_sha256);
        bytes
    }

    /// The expected CSV records of a section, from the database (guard applied).
    async fn expected_csv(&self, section: Section, spec: &ExportSpec) -> Vec<Vec<String>> {
        let pool = self.db.primary();
        let from = spec
            .date_from
            .unwrap_or(Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap());
        let to = spec
            .date_to
            .unwrap_or(Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap());
        match section {
            Section::Content => {
                type Row = (
                    Uuid,
                    String,
                    String,
                    String,
                    String,
                    Option<DateTime<Utc>>,
                    DateTime<Utc>,
                    DateTime<Utc>,
                );
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT id, title, slug, body, status, published_at, created_at, updated_at \
                     FROM content_items WHERE domain_id = $1 AND created_at >= $2 \
                     AND created_at < $3 ORDER BY created_at, id",
                )
                .bind(self.domain)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
                .unwrap();
                rows.into_iter()
                    .map(|r| {
                        vec![
                            r.0.to_string(),
                            expected_guard(&r.1),
                            expected_guard(&r.2),
                            expected_guard(&r.3),
                            expected_guard(&r.4),
                            r.5.map(ts).unwrap_or_default(),
                            ts(r.6),
                            ts(r.7),
                        ]
                    })
                    .collect()
            }
            Section::Keywords => {
                type Row = (i64, String, i32, f64, i64, i64, f64, DateTime<Utc>);
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT id, keyword, search_volume, position, clicks, impressions, ctr, \
                     recorded_at FROM keyword_metrics WHERE domain_id = $1 AND recorded_at >= $2 \
                     AND recorded_at < $3 ORDER BY recorded_at, id",
                )
                .bind(self.domain)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
                .unwrap();
                rows.into_iter()
                    .map(|r| {
                        vec![
                            r.0.to_string(),
                            expected_guard(&r.1),
                            r.2.to_string(),
                            r.3.to_string(),
                            r.4.to_string(),
                            r.5.to_string(),
                            r.6.to_string(),
                            ts(r.7),
                        ]
                    })
                    .collect()
            }
            Section::Analytics => {
                // Written out here on purpose (not the shared constant): the export must
                // match the analytics endpoint's definition.
                type Row = (Uuid, String, i64, i64, f64, i64, i64);
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT p.content_id, ci.title, sum(p.page_views)::int8, \
                     sum(p.unique_visitors)::int8, avg(p.bounce_rate)::float8, \
                     sum(p.conversions)::int8, sum(p.revenue_cents)::int8 \
                     FROM content_performance p JOIN content_items ci ON ci.id = p.content_id \
                     WHERE p.domain_id = $1 AND p.recorded_at >= $2 AND p.recorded_at < $3 \
                     GROUP BY p.content_id, ci.title ORDER BY p.content_id",
                )
                .bind(self.domain)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
                .unwrap();
                rows.into_iter()
                    .map(|r| {
                        vec![
                            r.0.to_string(),
                            expected_guard(&r.1),
                            r.2.to_string(),
                            r.3.to_string(),
                            r.4.to_string(),
                            r.5.to_string(),
                            r.6.to_string(),
                        ]
                    })
                    .collect()
            }
            Section::Settings => {
                // Values as PostgreSQL's jsonb text (the CSV's), each parsed back below.
                let settings: Vec<(String, String)> = sqlx::query_as(
                    "SELECT e.key, e.value::text FROM domain_settings s, jsonb_each(s.settings) e \
                     WHERE s.domain_id = $1 ORDER BY e.key",
                )
                .bind(self.domain)
                .fetch_all(pool)
                .await
                .unwrap();
                let json: sqlx::types::Json<BTreeMap<String, Value>> =
                    sqlx::query_scalar("SELECT settings FROM domain_settings WHERE domain_id = $1")
                        .bind(self.domain)
                        .fetch_one(pool)
                        .await
                        .unwrap();
                for (key, text) in &settings {
                    let parsed: Value = serde_json::from_str(text).unwrap();
                    assert_eq!(json.0.get(key), Some(&parsed), "{key}");
                }
                settings
                    .into_iter()
                    .map(|(k, v)| vec![expected_guard(&k), expected_guard(&v)])
                    .collect()
            }
        }
    }
}

fn parse_csv(bytes: &[u8]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = ::csv::ReaderBuilder::new().from_reader(bytes);
    let headers = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    let records = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    (headers, records)
}

#[tokio::test]
async fn csv_zip_round_trips_every_section() {
    let f = Fixture::new().await;
    let spec = f.spec(ExportFormat::Csv);
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    assert_eq!(
        output.storage_path,
        paths::file_name(spec.id, spec.token, "zip")
    );
    assert_eq!(
        f.files(),
        vec![output.storage_path.clone()],
        "no temp file left"
    );
    let bytes = f.read_output(&output);

    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().unwrap().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "content.csv",
            "keywords.csv",
            "analytics.csv",
            "settings.csv"
        ]
    );
    let mut records = 0;
    for section in [
        Section::Content,
        Section::Keywords,
        Section::Analytics,
        Section::Settings,
    ] {
        let mut text = Vec::new();
        archive
            .by_name(&format!("{}.csv", section.name()))
            .unwrap()
            .read_to_end(&mut text)
            .unwrap();
        let (headers, rows) = parse_csv(&text);
        assert_eq!(headers, csv::columns(section));
        let expected = f.expected_csv(section, &spec).await;
        assert!(!expected.is_empty());
        assert_eq!(rows, expected, "{}", section.name());
        records += rows.len() as u64;
    }
    assert_eq!(output.record_count, records);
    assert_eq!(records, 3 * NASTY.len() as u64 + 4);

    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn csv_guard_prefixes_exactly_the_formula_values() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Csv);
    spec.include_keywords = false;
    spec.include_analytics = false;
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let bytes = f.read_output(&output);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut text = Vec::new();
    archive
        .by_name("content.csv")
        .unwrap()
        .read_to_end(&mut text)
        .unwrap();
    let (_, rows) = parse_csv(&text);
    let titles: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    for value in NASTY {
        let guarded = value.starts_with(['=', '+', '-', '@', '\t', '\r', '|']);
        let want = if guarded {
            format!("'{value}")
        } else {
            (*value).to_owned()
        };
        assert!(titles.contains(&want.as_str()), "{value:?} -> {want:?}");
    }
    assert!(titles.contains(&"'=SUM(A1:A2)"));
    assert!(titles.contains(&"plain title"));
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn csv_of_one_section_is_a_bare_csv() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Csv);
    spec.include_content = false;
    spec.include_keywords = false;
    spec.include_analytics = false;
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    assert_eq!(
        output.storage_path,
        paths::file_name(spec.id, spec.token, "csv")
    );
    let bytes = f.read_output(&output);
    let (headers, rows) = parse_csv(&bytes);
    assert_eq!(headers, ["key", "value"]);
    assert_eq!(rows, f.expected_csv(Section::Settings, &spec).await);
    // A JSON string value starts with `"`: not a formula, written as is.
    assert!(rows.contains(&vec!["theme".to_owned(), "\"=dark\"".to_owned()]));
    assert!(rows.contains(&vec!["threshold".to_owned(), "'-5".to_owned()]));
    assert!(rows.contains(&vec!["'|key".to_owned(), "\"v,\\\"x\\\"\\nz\"".to_owned()]));
    assert_eq!(output.record_count, 4);
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn json_round_trips() {
    let f = Fixture::new().await;
    let spec = f.spec(ExportFormat::Json);
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    assert_eq!(
        output.storage_path,
        paths::file_name(spec.id, spec.token, "json")
    );
    let bytes = f.read_output(&output);
    let doc: Value = serde_json::from_slice(&bytes).unwrap();

    assert_eq!(doc["export_id"], spec.id.to_string());
    assert_eq!(doc["domain"]["id"], f.domain.to_string());
    assert_eq!(doc["domain"]["name"], "exported | domain");
    assert_eq!(doc["date_from"], Value::Null);

    let content = doc["content"].as_array().unwrap();
    let expected = f.expected_csv(Section::Content, &spec).await;
    assert_eq!(content.len(), expected.len());
    let pool = f.db.primary();
    for item in content {
        let id: Uuid = item["id"].as_str().unwrap().parse().unwrap();
        let (title, slug, body, created): (String, String, String, DateTime<Utc>) =
            sqlx::query_as("SELECT title, slug, body, created_at FROM content_items WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(item["title"], title, "no guard in JSON");
        assert_eq!(item["slug"], slug);
        assert_eq!(item["body"], body);
        let at: DateTime<Utc> = item["created_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(at, created);
    }
    let titles: Vec<&str> = content
        .iter()
        .map(|c| c["title"].as_str().unwrap())
        .collect();
    for value in NASTY {
        assert!(titles.contains(value), "{value:?}");
    }

    let keywords = doc["keywords"].as_array().unwrap();
    let expected = f.expected_csv(Section::Keywords, &spec).await;
    assert_eq!(keywords.len(), expected.len());
    for (k, row) in keywords.iter().zip(&expected) {
        assert_eq!(k["id"].as_i64().unwrap().to_string(), row[0]);
        assert_eq!(expected_guard(k["keyword"].as_str().unwrap()), row[1]);
        assert_eq!(k["position"].as_f64().unwrap().to_string(), row[3]);
    }

    let analytics = doc["analytics"].as_array().unwrap();
    let expected = f.expected_csv(Section::Analytics, &spec).await;
    assert_eq!(analytics.len(), expected.len());
    for (a, row) in analytics.iter().zip(&expected) {
        assert_eq!(a["content_id"], row[0]);
        assert_eq!(a["page_views"].as_i64().unwrap().to_string(), row[2]);
        assert_eq!(a["avg_bounce_rate"].as_f64().unwrap().to_string(), row[4]);
        assert_eq!(a["revenue_cents"].as_i64().unwrap().to_string(), row[6]);
    }

    assert_eq!(
        doc["settings"],
        serde_json::json!({
            "theme": "=dark",
            "threshold": -5,
            "nested": {"a": [1, 2, "x,y"]},
            "|key": "v,\"x\"\nz",
        })
    );
    assert_eq!(
        output.record_count,
        (content.len() + keywords.len() + analytics.len() + 4) as u64
    );
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn markdown_has_the_summary_and_every_title_escaped() {
    let f = Fixture::new().await;
    let spec = f.spec(ExportFormat::Markdown);
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    assert_eq!(
        output.storage_path,
        paths::file_name(spec.id, spec.token, "md")
    );
    let text = String::from_utf8(f.read_output(&output)).unwrap();
    let n = NASTY.len();
    for line in [
        "| content | 17 |".replace("17", &n.to_string()),
        format!("| keywords | {n} |"),
        format!("| analytics | {n} |"),
        "| settings | 4 |".to_owned(),
    ] {
        assert!(text.contains(&line), "summary line {line:?} missing");
    }
    assert!(text.contains("# Export of exported \\| domain"));
    assert!(text.contains("the beginning to now"));
    for value in NASTY {
        let escaped = markdown::cell(value);
        assert!(
            text.contains(&format!("| {escaped} |")),
            "title {value:?} as {escaped:?}"
        );
    }
    assert!(text.contains("| back\\\\slash \\| pipe |"));
    assert!(text.contains("| line<br>break |"));
    assert!(text.contains("| crlf<br>end |"));
    // Every table row is one line: no raw line break inside a cell.
    for line in text.lines().filter(|l| l.starts_with('|')) {
        assert!(line.ends_with('|'), "{line:?}");
    }
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn include_flags_and_date_range_are_honoured() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Json);
    spec.include_keywords = false;
    // Items are created two a day from base_time: days 2 and 3 hold items 4 to 7.
    spec.date_from = Some(base_time() + Duration::days(2));
    spec.date_to = Some(base_time() + Duration::days(4));
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let doc: Value = serde_json::from_slice(&f.read_output(&output)).unwrap();
    assert!(doc.get("keywords").is_none());
    let titles: Vec<&str> = doc["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["title"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = NASTY[4..8].to_vec();
    let mut got = titles.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    // Performance rows on days 2 and 3: items 2..8 have at least one (day +0 or +1).
    let analytics = doc["analytics"].as_array().unwrap();
    assert_eq!(
        analytics.len(),
        f.expected_csv(Section::Analytics, &spec).await.len()
    );
    assert_eq!(analytics.len(), 6);
    assert_eq!(output.record_count, 4 + 6 + 4);

    let mut spec = f.spec(ExportFormat::Json);
    spec.include_content = false;
    spec.include_analytics = false;
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let doc: Value = serde_json::from_slice(&f.read_output(&output)).unwrap();
    assert!(doc.get("content").is_none() && doc.get("analytics").is_none());
    assert_eq!(doc["keywords"].as_array().unwrap().len(), NASTY.len());
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn the_progress_total_counts_the_rows_written_in_the_date_range() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Json);
    spec.date_from = Some(base_time() + Duration::days(2));
    spec.date_to = Some(base_time() + Duration::days(4));
    for (content, keywords) in [(false, false), (true, true)] {
        spec.include_content = content;
        spec.include_keywords = keywords;
        let mut snapshot = f.db.read_snapshot().await.unwrap();
        let total = sections::count(&mut snapshot, &spec).await.unwrap();
        snapshot.finish().await.unwrap();
        let output = f.run(&spec, Hooks::default()).await.unwrap();
        assert_eq!(
            total, output.record_count,
            "content {content}, keywords {keywords}"
        );
    }
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_domain_of_another_org_is_not_found() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Csv);
    spec.org_id = Uuid::new_v4();
    let err = f.run(&spec, Hooks::default()).await.unwrap_err();
    assert!(
        matches!(err, ExportError::DomainNotFound(id) if id == f.domain),
        "{err}"
    );
    assert!(!err.retryable());
    let mut spec = f.spec(ExportFormat::Csv);
    spec.domain_id = Uuid::new_v4();
    assert!(matches!(
        f.run(&spec, Hooks::default()).await,
        Err(ExportError::DomainNotFound(_))
    ));
    assert!(f.files().is_empty());
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn the_size_cap_leaves_no_file() {
    let f = Fixture::new().await;
    for format in [
        ExportFormat::Csv,
        ExportFormat::Json,
        ExportFormat::Markdown,
    ] {
        let spec = f.spec(format);
        let err = f
            .run_limited(&spec, 1024, Hooks::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExportError::TooLarge { limit: 1024 }),
            "{format:?}: {err}"
        );
        assert!(!err.retryable());
        assert!(err.to_string().contains("EXPORT_MAX_BYTES"));
        assert!(f.files().is_empty(), "{format:?}: {:?}", f.files());
    }
    // The same export fits a cap of its own size exactly.
    let spec = f.spec(ExportFormat::Json);
    let size = f.run(&spec, Hooks::default()).await.unwrap().size_bytes;
    std::fs::remove_file(
        f.export_dir
            .root()
            .join(paths::file_name(spec.id, spec.token, "json")),
    )
    .unwrap();
    let fits = f.run_limited(&spec, size, Hooks::default()).await.unwrap();
    assert_eq!(fits.size_bytes, size);
    assert!(matches!(
        f.run_limited(&spec, size - 1, Hooks::default()).await,
        Err(ExportError::TooLarge { .. })
    ));
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn enospc_ends_the_export_with_io_and_no_file() {
    let f = Fixture::new().await;
    for format in [
        ExportFormat::Csv,
        ExportFormat::Json,
        ExportFormat::Markdown,
    ] {
        let spec = f.spec(format);
        let hooks = Hooks {
            fail_after_bytes: Some(700),
            ..Hooks::default()
        };
        let err = f.run(&spec, hooks).await.unwrap_err();
        match &err {
            ExportError::Io(io) => assert_eq!(io.raw_os_error(), Some(libc::ENOSPC), "{io}"),
            other => panic!("{format:?}: {other}"),
        }
        assert!(err.retryable());
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(f.files().is_empty(), "{format:?}: {:?}", f.files());
    }
    f.tdb.drop_database().await.unwrap();
}

/// Adds `n` content items of about 2 KB each (a section far larger than the channel).
async fn add_large_content(f: &Fixture, n: i32) {
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, body, status, created_at) \
         SELECT gen_random_uuid(), $1, 'bulk ' || g, 'bulk-' || g, repeat('x', 2000), 'draft', \
                '2020-01-01'::timestamptz + g * interval '1 second' \
         FROM generate_series(1, $2) g",
    )
    .bind(f.domain)
    .bind(n)
    .execute(f.db.primary())
    .await
    .unwrap();
}

/// Starts an export whose writer stalls after its first data (the reader is then held
/// mid-statement), and waits until rows were handed on.
async fn start_stalled(
    f: &Fixture,
    spec: &ExportSpec,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<Result<ExportOutput, ExportError>> {
    let (progress, mut seen) = watch::channel(Progress::default());
    let task = tokio::spawn({
        let (db, dir, cancel, spec) = (
            f.db.clone(),
            f.export_dir.clone(),
            cancel.clone(),
            spec.clone(),
        );
        async move {
            let hooks = Hooks {
                stall_writer: true,
                ..Hooks::default()
            };
            let limits = ExportLimits::new(u64::MAX);
            run_export_with(&db, &spec, &dir, limits, &progress, &cancel, hooks).await
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while seen.borrow_and_update().rows_written == 0 {
            seen.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    task
}

/// Polls (bounded) until the export directory is empty.
async fn wait_empty(f: &Fixture) {
    for _ in 0..500 {
        if f.files().is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("files left: {:?}", f.files());
}

#[tokio::test]
async fn cancel_mid_copy_returns_cancelled_with_no_file_and_no_temp_file() {
    let f = Fixture::new().await;
    add_large_content(&f, 5_000).await;
    for format in [ExportFormat::Csv, ExportFormat::Json] {
        let spec = f.spec(format);
        let cancel = CancellationToken::new();
        let task = start_stalled(&f, &spec, &cancel).await;
        // The section's one statement is under way (10 MB, the channel holds a few
        // messages): cancel it.
        cancel.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(ExportError::Cancelled)),
            "{format:?}: {result:?}"
        );
        // `run_export` returned after its writer ended: nothing is left, at once.
        assert!(f.files().is_empty(), "{format:?}: {:?}", f.files());
    }
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_cancel_after_the_writer_read_end_and_before_persist_leaves_no_file() {
    let f = Fixture::new().await;
    add_large_content(&f, 50).await;
    for format in [
        ExportFormat::Csv,
        ExportFormat::Json,
        ExportFormat::Markdown,
    ] {
        let spec = f.spec(format);
        let cancel = CancellationToken::new();
        let reached = std::sync::Arc::new(tokio::sync::Notify::new());
        let (progress, _seen) = watch::channel(Progress::default());
        let task = tokio::spawn({
            let (db, dir, cancel, spec) = (
                f.db.clone(),
                f.export_dir.clone(),
                cancel.clone(),
                spec.clone(),
            );
            let hooks = Hooks {
                before_persist: Some(reached.clone()),
                ..Hooks::default()
            };
            async move {
                let limits = ExportLimits::new(u64::MAX);
                run_export_with(&db, &spec, &dir, limits, &progress, &cancel, hooks).await
            }
        });
        // The whole file is encoded (the writer got `End`), the temp file is there, not
        // yet renamed.
        tokio::time::timeout(std::time::Duration::from_secs(30), reached.notified())
            .await
            .unwrap();
        let files = f.files();
        assert!(
            files.len() == 1 && files.iter().all(|name| is_temp_name(name)),
            "{format:?}: {files:?}"
        );
        cancel.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(ExportError::Cancelled)),
            "{format:?}: {result:?}"
        );
        assert!(f.files().is_empty(), "{format:?}: {:?}", f.files());
    }
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_dropped_export_never_persists_and_leaves_no_temp_file() {
    let f = Fixture::new().await;
    add_large_content(&f, 5_000).await;
    let spec = f.spec(ExportFormat::Csv);
    let cancel = CancellationToken::new();
    let task = start_stalled(&f, &spec, &cancel).await;
    // The caller gives up on the future (a worker's cancel grace ran out) without
    // cancelling the token: the writer thread must still not persist.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    wait_empty(&f).await;
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn progress_reaches_100_with_the_record_count() {
    let f = Fixture::new().await;
    let spec = f.spec(ExportFormat::Csv);
    let (progress, seen) = watch::channel(Progress::default());
    let output = run_export_with(
        &f.db,
        &spec,
        &f.export_dir,
        ExportLimits::new(DEFAULT_MAX_BYTES),
        &progress,
        &CancellationToken::new(),
        Hooks::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        *seen.borrow(),
        Progress {
            rows_written: output.record_count as i64,
            percent: 100
        }
    );
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_symlink_planted_at_the_file_name_is_replaced_not_followed() {
    let f = Fixture::new().await;
    let spec = f.spec(ExportFormat::Json);
    let outside = f.dir.path().join("outside.json");
    std::fs::write(&outside, b"untouched").unwrap();
    let planted = f
        .export_dir
        .root()
        .join(paths::file_name(spec.id, spec.token, "json"));
    std::os::unix::fs::symlink(&outside, &planted).unwrap();
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    assert_eq!(std::fs::read(&outside).unwrap(), b"untouched");
    let meta = std::fs::symlink_metadata(&planted).unwrap();
    assert!(meta.is_file(), "the export is a regular file now");
    f.read_output(&output);
    f.tdb.drop_database().await.unwrap();
}

#[test]
fn export_dir_refuses_what_it_cannot_use() {
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // Works as root too: nothing can be created under a regular file.
    for bad in [file.clone(), file.join("sub")] {
        let err = ExportDir::open(&bad).unwrap_err();
        assert!(
            matches!(err, ExportError::Dir { ref path, .. } if path == &bad),
            "{err}"
        );
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
    let dir = ExportDir::open(&base.path().join("new/exports")).unwrap();
    assert!(dir.root().is_dir() && dir.root().is_absolute());
    assert_eq!(
        std::fs::read_dir(dir.root()).unwrap().count(),
        0,
        "probe removed"
    );
    for outside in ["../a-file", "/etc/passwd", "x/../../a-file"] {
        assert!(
            matches!(dir.resolve(outside), Err(ExportError::OutsideDir(_))),
            "{outside}"
        );
    }
    assert!(matches!(
        dir.resolve("missing.csv"),
        Err(ExportError::Dir { .. })
    ));
}

#[test]
fn temp_names_are_recognisable() {
    let name = super::file::TempFile::create(Path::new("/nonexistent"), Uuid::nil());
    assert!(name.is_err());
    assert!(is_temp_name(".0000.abcd.tmp"));
    assert!(!is_temp_name("0000.csv"));
}

#[tokio::test]
async fn csv_honours_the_date_range_in_every_section() {
    let f = Fixture::new().await;
    let mut spec = f.spec(ExportFormat::Csv);
    // Items are created two a day from base_time: days 2 and 3 hold items 4 to 7.
    spec.date_from = Some(base_time() + Duration::days(2));
    spec.date_to = Some(base_time() + Duration::days(4));
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let bytes = f.read_output(&output);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut records = 0;
    for (section, want) in [
        (Section::Content, 4),
        (Section::Keywords, 4),
        (Section::Analytics, 6),
        (Section::Settings, 4),
    ] {
        let mut text = Vec::new();
        archive
            .by_name(&format!("{}.csv", section.name()))
            .unwrap()
            .read_to_end(&mut text)
            .unwrap();
        let (headers, rows) = parse_csv(&text);
        assert_eq!(headers, csv::columns(section));
        assert_eq!(
            rows,
            f.expected_csv(section, &spec).await,
            "{}",
            section.name()
        );
        assert_eq!(rows.len(), want, "{}", section.name());
        records += rows.len() as u64;
    }
    let titles: Vec<String> = {
        let mut text = Vec::new();
        archive
            .by_name("content.csv")
            .unwrap()
            .read_to_end(&mut text)
            .unwrap();
        parse_csv(&text)
            .1
            .into_iter()
            .map(|r| r[1].clone())
            .collect()
    };
    let mut want: Vec<String> = NASTY[4..8].iter().map(|v| expected_guard(v)).collect();
    let mut got = titles;
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(output.record_count, records);
    f.tdb.drop_database().await.unwrap();
}

#[test]
fn markdown_renders_hostile_text_literally() {
    for (value, want) in [
        (
            "<script>alert(1)</script>",
            r"\<script\>alert\(1\)\</script\>",
        ),
        ("&amp; &lt;", r"\&amp; \&lt;"),
        (
            "[x](https://evil.example)",
            r"\[x\]\(https\://evil.example\)",
        ),
        ("![img](y.png)", r"\!\[img\]\(y.png\)"),
        ("**bold** _em_ *em*", r"\*\*bold\*\* \_em\_ \*em\*"),
        ("# heading", r"\# heading"),
        ("`code` ~~strike~~", r"\`code\` \~\~strike\~\~"),
        (
            "<https://autolink.example>",
            r"\<https\://autolink.example\>",
        ),
        ("a | b \\ c", r"a \| b \\ c"),
        ("two\nlines\r\nthree\rfour", "two<br>lines<br>three<br>four"),
        ("plain, text; 1.5 - ok", "plain, text; 1.5 - ok"),
        (
            "see https://x.y or www.x.y",
            r"see https\://x.y or www\.x.y",
        ),
        ("mail a@b.c, WWW.X.Y", r"mail a\@b.c, WWW\.X.Y"),
    ] {
        assert_eq!(markdown::cell(value), want, "{value:?}");
    }
}

#[tokio::test]
async fn non_finite_numbers_are_null_in_json_and_empty_in_csv_and_markdown() {
    let f = Fixture::new().await;
    sqlx::query(
        "INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, clicks, \
         impressions, ctr, recorded_at) VALUES \
         ($1, 'nan-kw', 1, 'NaN', 0, 0, 0, '2030-01-01'), \
         ($1, 'inf-kw', 1, 'Infinity', 0, 0, 0, '2030-01-02')",
    )
    .bind(f.domain)
    .execute(f.db.primary())
    .await
    .unwrap();
    let mut spec = f.spec(ExportFormat::Csv);
    spec.include_content = false;
    spec.include_analytics = false;
    spec.date_from = Some(Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap());

    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(f.read_output(&output))).unwrap();
    let mut text = Vec::new();
    archive
        .by_name("keywords.csv")
        .unwrap()
        .read_to_end(&mut text)
        .unwrap();
    let (_, rows) = parse_csv(&text);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row[3], "", "{row:?}");
    }

    spec.id = Uuid::new_v4();
    spec.format = ExportFormat::Json;
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let doc: Value = serde_json::from_slice(&f.read_output(&output)).unwrap();
    let keywords = doc["keywords"].as_array().unwrap();
    assert_eq!(keywords.len(), 2);
    for k in keywords {
        assert_eq!(k["position"], Value::Null, "{k}");
    }

    spec.id = Uuid::new_v4();
    spec.format = ExportFormat::Markdown;
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let text = String::from_utf8(f.read_output(&output)).unwrap();
    for keyword in ["nan-kw", "inf-kw"] {
        let line = text
            .lines()
            .find(|l| l.contains(keyword))
            .unwrap_or_else(|| panic!("{keyword} missing"));
        let cells: Vec<&str> = line.split(" | ").collect();
        assert_eq!(cells[3], "", "{line}");
        assert!(
            !line.contains("NaN") && !line.contains("Infinity"),
            "{line}"
        );
    }
    f.tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn the_zip_level_picks_stored_or_deflated_entries_with_the_same_csv() {
    let f = Fixture::new().await;
    add_large_content(&f, 200).await;
    let mut texts = Vec::new();
    for (level, method) in [
        (0, zip::CompressionMethod::Stored),
        (1, zip::CompressionMethod::Deflated),
        (9, zip::CompressionMethod::Deflated),
    ] {
        let spec = f.spec(ExportFormat::Csv);
        let (progress, _) = watch::channel(Progress::default());
        let limits = ExportLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            zip_level: level,
        };
        let output = run_export_with(
            &f.db,
            &spec,
            &f.export_dir,
            limits,
            &progress,
            &CancellationToken::new(),
            Hooks::default(),
        )
        .await
        .unwrap();
        let mut archive =
            zip::ZipArchive::new(std::io::Cursor::new(f.read_output(&output))).unwrap();
        let mut entry = archive.by_name("content.csv").unwrap();
        assert_eq!(entry.compression(), method, "level {level}");
        let mut text = Vec::new();
        entry.read_to_end(&mut text).unwrap();
        texts.push((output.size_bytes, text));
    }
    assert_eq!(texts[0].1, texts[1].1);
    assert_eq!(texts[0].1, texts[2].1);
    assert!(texts[1].0 < texts[0].0, "deflate 1 smaller than stored");
    f.tdb.drop_database().await.unwrap();
}

/// Adds `n` content items whose body is `body_bytes` of text (`tag` names them).
async fn add_content_of(f: &Fixture, tag: &str, n: i32, body_bytes: i32) {
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, body, status, created_at) \
         SELECT gen_random_uuid(), $1, $2 || g, $2 || '-' || g, repeat('y', $3), 'draft', \
                '2021-01-01'::timestamptz + g * interval '1 second' \
         FROM generate_series(1, $4) g",
    )
    .bind(f.domain)
    .bind(tag)
    .bind(body_bytes)
    .bind(n)
    .execute(f.db.primary())
    .await
    .unwrap();
}

/// One 20 MB body among the rows: every format exports it (the cap raised), and the data
/// in flight between the reader and the writer never exceed the byte budget, or the one
/// oversized message alone.
#[tokio::test]
async fn a_20_mb_body_exports_in_every_format_within_the_byte_budget() {
    const BODY: usize = 20 * 1024 * 1024;
    let f = Fixture::new().await;
    add_content_of(&f, "huge", 1, BODY as i32).await;
    add_large_content(&f, 500).await;
    for format in [
        ExportFormat::Csv,
        ExportFormat::Json,
        ExportFormat::Markdown,
    ] {
        let budget = Budget::new(budget::IN_FLIGHT_BYTES);
        let spec = f.spec(format);
        let hooks = Hooks {
            budget: Some(budget.clone()),
            ..Hooks::default()
        };
        let output = f
            .run_limited(&spec, 64 * 1024 * 1024, hooks)
            .await
            .unwrap_or_else(|err| panic!("{format:?}: {err}"));
        let bytes = f.read_output(&output);
        if format == ExportFormat::Csv {
            // Deflated in the ZIP: the body is in content.csv.
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
            let (_, rows) = parse_csv(&{
                let mut csv = Vec::new();
                archive
                    .by_name("content.csv")
                    .unwrap()
                    .read_to_end(&mut csv)
                    .unwrap();
                csv
            });
            let longest = rows.iter().map(|row| row[3].len()).max();
            assert_eq!(longest, Some(BODY));
        } else {
            assert!(output.size_bytes > BODY as u64, "{format:?}: {output:?}");
        }
        if format == ExportFormat::Json {
            let doc: Value = serde_json::from_slice(&bytes).unwrap();
            let longest = doc["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["body"].as_str().unwrap().len())
                .max();
            assert_eq!(longest, Some(BODY));
        }
        // The huge row's message (its text and a little overhead) travels alone.
        let bound = budget.capacity().max(BODY + 64 * 1024);
        assert!(
            budget.max_in_flight() <= bound,
            "{format:?}: {} bytes in flight, bound {bound}",
            budget.max_in_flight()
        );
        std::fs::remove_file(f.export_dir.resolve(&output.storage_path).unwrap()).unwrap();
    }
    f.tdb.drop_database().await.unwrap();
}

/// A writer that stops reading: the reader sends until the byte budget is used up and then
/// waits for it; the data in flight stay within the budget (or one oversized message),
/// however many messages the channel could queue.
#[tokio::test]
async fn the_reader_waits_for_the_byte_budget_while_the_writer_stalls() {
    const BODY: usize = 200 * 1024;
    const CAPACITY: usize = 64 * 1024;
    let f = Fixture::new().await;
    add_content_of(&f, "big", 40, BODY as i32).await;
    for format in [ExportFormat::Csv, ExportFormat::Json] {
        let budget = Budget::new(CAPACITY);
        let spec = f.spec(format);
        let cancel = CancellationToken::new();
        let (progress, _seen) = watch::channel(Progress::default());
        let task = tokio::spawn({
            let (db, dir, cancel, spec) = (
                f.db.clone(),
                f.export_dir.clone(),
                cancel.clone(),
                spec.clone(),
            );
            let hooks = Hooks {
                stall_writer: true,
                budget: Some(budget.clone()),
                ..Hooks::default()
            };
            async move {
                let limits = ExportLimits::new(u64::MAX);
                run_export_with(&db, &spec, &dir, limits, &progress, &cancel, hooks).await
            }
        });
        // One message is a row of 200 KiB, more than the whole budget: each travels alone.
        let bound = CAPACITY.max(BODY + 64 * 1024);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while budget.waits() == 0 && budget.max_in_flight() <= bound {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{format:?}: the reader never waited for the budget"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            budget.max_in_flight() <= bound,
            "{format:?}: {} bytes in flight, bound {bound}",
            budget.max_in_flight()
        );
        assert!(
            budget.max_in_flight() >= BODY,
            "{format:?}: nothing was sent"
        );
        cancel.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(ExportError::Cancelled)),
            "{format:?}: {result:?}"
        );
        assert!(f.files().is_empty(), "{format:?}: {:?}", f.files());
    }
    f.tdb.drop_database().await.unwrap();
}

/// GFM as GitHub renders it: tables, strikethrough and extended autolinks.
fn gfm_html(markdown: &str) -> String {
    let mut options = comrak::Options::default();
    options.extension.table = true;
    options.extension.strikethrough = true;
    options.extension.autolink = true;
    comrak::markdown_to_html(markdown, &options)
}

/// Text as an HTML renderer escapes it.
fn html_text(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A real GFM renderer (comrak, extended autolinks on) turns no cell into a link, and each
/// cell's text comes out as the value.
#[test]
fn markdown_cells_render_as_text_under_gfm_autolinks() {
    for value in [
        "https://x.y",
        "http://x.y/path?q=1#f",
        "ftp://x.y",
        "see https://x.y.",
        "www.x.y",
        "WWW.X.Y/path",
        "(www.x.y)",
        "_www.x.y_",
        "a@b.c",
        "first.last+tag@sub.example.org",
        "mailto:a@b.c",
        "xmpp:a@b.c/res",
        "<https://x.y>",
        "<a@b.c>",
        "[x](https://evil.example)",
        "~~https://x.y~~",
        "*www.x.y*",
    ] {
        let html = gfm_html(&format!("| v |\n|---|\n| {} |\n", markdown::cell(value)));
        assert!(!html.contains("<a"), "{value:?} became a link: {html}");
        assert!(
            html.contains(&format!("<td>{}</td>", html_text(value))),
            "{value:?} is not the cell's text: {html}"
        );
    }
}

/// The Markdown export of rows holding URLs, www names and e-mail addresses renders with
/// no link at all.
#[tokio::test]
async fn the_markdown_export_has_no_autolink_for_user_text() {
    let f = Fixture::new().await;
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, body, status, created_at) \
         VALUES (gen_random_uuid(), $1, 'go to https://x.y now', 'www.x.y', \
                 'write to a@b.c or see http://x.y/z', 'draft', '2021-01-01')",
    )
    .bind(f.domain)
    .execute(f.db.primary())
    .await
    .unwrap();
    let spec = f.spec(ExportFormat::Markdown);
    let output = f.run(&spec, Hooks::default()).await.unwrap();
    let bytes = f.read_output(&output);
    let html = gfm_html(std::str::from_utf8(&bytes).unwrap());
    assert!(html.contains("go to https://x.y now"), "{html}");
    assert!(
        html.contains("write to a@b.c or see http://x.y/z"),
        "{html}"
    );
    assert!(!html.contains("<a"), "{html}");
    f.tdb.drop_database().await.unwrap();
}
