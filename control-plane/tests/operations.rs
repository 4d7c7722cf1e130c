//! The operations and the runner against a fresh PostgreSQL database (and, for
//! keyword-sync, a fake provider: an axum server on a free port). No mocks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use smartbeak_control_plane::operations::OperationName;
use smartbeak_control_plane::operations::content_scheduler::{ContentScheduler, Isolation};
use smartbeak_control_plane::operations::export_retention::ExportRetention;
use smartbeak_control_plane::operations::keyword_sync::{
    KeywordSync, ProviderConfig, Providers, Secret,
};
use smartbeak_control_plane::runner::{
    DEFAULT_PAGE_SIZE, LOCK_CLASS, Mode, RunContext, RunOptions, RunOutcome, RunReport, RunStatus,
    run_once,
};
use smartbeak_database::Database;
use smartbeak_database::testing::TestDatabase;
use smartbeak_resilience::{
    AdapterName, BreakerConfig, BreakerPolicy, BreakerState, Policy, Resilience, ResilienceConfig,
    RetryPolicy,
};
use smartbeak_utils::fetch::HttpClient;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Fixture {
    tdb: TestDatabase,
    db: Database,
    admin: PgPool,
    domain: Uuid,
}

impl Fixture {
    async fn new() -> Self {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "control-plane-test")
            .await
            .unwrap();
        let admin = PgPool::connect(tdb.url().expose()).await.unwrap();
        let org = Uuid::new_v4();
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'org')")
            .bind(org)
            .execute(&admin)
            .await
            .unwrap();
        let domain = new_domain(&admin, org, "example.com").await;
        Self {
            tdb,
            db,
            admin,
            domain,
        }
    }

    fn ctx(&self) -> RunContext {
        RunContext {
            db: self.db.clone(),
            runner: "test-runner".into(),
            heartbeat: Duration::from_millis(200),
            stale_after: Duration::from_secs(30),
            cancel: CancellationToken::new(),
            page_size: DEFAULT_PAGE_SIZE,
            drain: None,
        }
    }

    async fn org(&self) -> Uuid {
        sqlx::query_scalar("SELECT org_id FROM domains WHERE id = $1")
            .bind(self.domain)
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    async fn done(self) {
        self.db.close(Duration::from_secs(5)).await.unwrap();
        self.admin.close().await;
        self.tdb.drop_database().await.unwrap();
    }
}

async fn new_domain(admin: &PgPool, org: Uuid, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(org)
        .bind(name)
        .execute(admin)
        .await
        .unwrap();
    id
}

fn options(batch_size: usize, concurrency: usize, mode: Mode) -> RunOptions {
    RunOptions {
        batch_size,
        concurrency: NonZeroUsize::new(concurrency).unwrap(),
        mode,
        dry_run: false,
    }
}

fn ran(outcome: RunOutcome) -> RunReport {
    match outcome {
        RunOutcome::Ran(report) => report,
        other => panic!("expected a run, got {other:?}"),
    }
}

/// `n` due scheduled items, item `i` due `n - i` seconds ago (so the load order is `i`);
/// those with `bad(i)` get a title that the test's constraint refuses once published.
async fn seed_scheduled(fx: &Fixture, n: i64, bad: &str) {
    sqlx::query(&format!(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) \
         SELECT gen_random_uuid(), $1, CASE WHEN {bad} THEN 'bad ' || i ELSE 'good ' || i END, \
         'item-' || i, 'scheduled', now() - make_interval(secs => $2 - i) \
         FROM generate_series(0, $2 - 1) AS i"
    ))
    .bind(fx.domain)
    .bind(n)
    .execute(&fx.admin)
    .await
    .unwrap();
    // A row that violates a constraint at update time: published with a 'bad' title.
    sqlx::query(
        "ALTER TABLE content_items ADD CONSTRAINT test_no_bad_published \
         CHECK (status <> 'published' OR title NOT LIKE 'bad %') NOT VALID",
    )
    .execute(&fx.admin)
    .await
    .unwrap();
}

#[derive(Debug, sqlx::FromRow, PartialEq, Eq)]
struct RunRow {
    status: String,
    mode: String,
    items_total: i32,
    items_succeeded: i32,
    items_failed: i32,
    items_skipped: i32,
    finished: bool,
}

async fn run_row(admin: &PgPool, id: Uuid) -> RunRow {
    sqlx::query_as(
        "SELECT status, mode, items_total, items_succeeded, items_failed, items_skipped, \
         finished_at IS NOT NULL AS finished FROM batch_runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn content_scheduler_publishes_the_good_rows_and_records_every_failure() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 10_000, "i % 10 = 7").await;
    // Not due, and a draft: both untouched.
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) VALUES \
         (gen_random_uuid(), $1, 'later', 'later', 'scheduled', now() + interval '1 day'), \
         (gen_random_uuid(), $1, 'draft', 'draft', 'draft', NULL)",
    )
    .bind(fx.domain)
    .execute(&fx.admin)
    .await
    .unwrap();
    let expected_bad: Vec<(i64, String)> = sqlx::query_as(
        "SELECT (row_number() OVER (ORDER BY publish_at, id) - 1)::int8, id::text, title \
         FROM content_items WHERE status = 'scheduled' AND publish_at <= now()",
    )
    .fetch_all(&fx.admin)
    .await
    .map(|rows: Vec<(i64, String, String)>| {
        rows.into_iter()
            .filter(|(_, _, title)| title.starts_with("bad "))
            .map(|(i, id, _)| (i, id))
            .collect()
    })
    .unwrap();
    assert_eq!(expected_bad.len(), 1_000);

    let op = ContentScheduler::new(fx.db.clone());
    // Pages of 1,000: the failed rows stay due, yet the keyset never loads them again.
    let mut ctx = fx.ctx();
    ctx.page_size = 1_000;
    let report = ran(run_once(&op, &ctx, options(100, 4, Mode::SettleAll), None)
        .await
        .unwrap());
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (10_000, 9_000, 1_000, 0),
        "{}",
        report.summary()
    );
    assert_eq!(report.status, RunStatus::Partial);

    let published: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM content_items WHERE status = 'published' AND published_at IS NOT NULL",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!(published, 9_000);
    let bad_published: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM content_items WHERE status = 'published' AND title LIKE 'bad %'",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!(bad_published, 0);
    let untouched: Vec<String> =
        sqlx::query_scalar("SELECT slug FROM content_items WHERE status <> 'published' AND title NOT LIKE 'bad %' ORDER BY slug")
            .fetch_all(&fx.admin)
            .await
            .unwrap();
    assert_eq!(untouched, ["draft", "later"]);

    let run_id = report.run_id.unwrap();
    let recorded: Vec<(i64, String, String, i32)> = sqlx::query_as(
        "SELECT item_index, item_id, error, attempts FROM batch_run_items WHERE run_id = $1 \
         ORDER BY item_index",
    )
    .bind(run_id)
    .fetch_all(&fx.admin)
    .await
    .unwrap();
    let recorded_ids: Vec<(i64, String)> = recorded
        .iter()
        .map(|(i, id, _, _)| (*i, id.clone()))
        .collect();
    assert_eq!(recorded_ids, expected_bad);
    assert!(
        recorded[0].2.contains("test_no_bad_published"),
        "{}",
        recorded[0].2
    );
    assert!(
        recorded.iter().all(|r| r.3 > 1),
        "bisected items were tried more than once"
    );
    assert_eq!(
        run_row(&fx.admin, run_id).await,
        RunRow {
            status: "partial".into(),
            mode: "settle_all".into(),
            items_total: 10_000,
            items_succeeded: 9_000,
            items_failed: 1_000,
            items_skipped: 0,
            finished: true,
        }
    );
    fx.done().await;
}

#[tokio::test]
async fn strict_mode_stops_after_the_failing_batch() {
    let fx = Fixture::new().await;
    // Batches of 100: failures in the third batch (250, 260, 299) and the seventh (650).
    seed_scheduled(&fx, 1_000, "i IN (250, 260, 299, 650)").await;
    let op = ContentScheduler::new(fx.db.clone());
    let report = ran(
        run_once(&op, &fx.ctx(), options(100, 4, Mode::Strict), None)
            .await
            .unwrap(),
    );
    let indexes: Vec<usize> = report.failures.iter().map(|f| f.index).collect();
    assert_eq!(indexes, [250, 260, 299], "{}", report.summary());
    assert_eq!(
        (report.succeeded, report.failed, report.skipped),
        (297, 3, 700)
    );
    let error = report.error.clone().unwrap();
    assert!(error.contains("[250, 260, 299]"), "{error}");
    let later_published: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM content_items WHERE status = 'published' \
         AND split_part(slug, '-', 2)::int >= 300",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!(later_published, 0, "later batches untouched");
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!((row.mode.as_str(), row.items_skipped), ("strict", 700));
    // One short page: nothing was left unloaded, so the message does not say so.
    assert!(!error.contains("later pages not loaded"), "{error}");

    // Pages of 100: the failing batch (the three rows again, first in the due order) fills
    // its page, so later pages may hold due items that were never loaded.
    let ctx = RunContext {
        page_size: 100,
        ..fx.ctx()
    };
    let report = ran(run_once(&op, &ctx, options(100, 4, Mode::Strict), None)
        .await
        .unwrap());
    assert_eq!(
        (report.total, report.succeeded, report.failed),
        (100, 97, 3),
        "{}",
        report.summary()
    );
    let error = report.error.clone().unwrap();
    assert!(error.contains("later pages not loaded"), "{error}");
    fx.done().await;
}

#[tokio::test]
async fn bisecting_isolates_the_same_rows() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 1_000, "i % 10 = 3").await;
    let op = ContentScheduler::with_isolation(fx.db.clone(), Isolation::Bisect);
    let report = ran(
        run_once(&op, &fx.ctx(), options(100, 2, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.succeeded, report.failed),
        (900, 100),
        "{}",
        report.summary()
    );
    assert!(report.failures.iter().all(|f| f.index % 10 == 3));
    assert!(report.failures.iter().all(|f| f.error.attempts > 1));
    fx.done().await;
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 20, "false").await;
    let op = ContentScheduler::new(fx.db.clone());
    let mut opts = options(10, 1, Mode::SettleAll);
    opts.dry_run = true;
    let report = ran(run_once(&op, &fx.ctx(), opts, None).await.unwrap());
    assert_eq!((report.status, report.total), (RunStatus::DryRun, 20));
    assert!(
        report.summary().contains("would process"),
        "{}",
        report.summary()
    );
    let (published, runs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM content_items WHERE status = 'published'), \
         (SELECT count(*) FROM batch_runs)",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!((published, runs), (0, 0));
    fx.done().await;
}

#[tokio::test]
async fn a_held_lock_skips_the_run_and_a_stale_run_is_abandoned() {
    let fx = Fixture::new().await;
    let op = ContentScheduler::new(fx.db.clone());
    let mut holder = fx.admin.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(1_i32)
        .execute(&mut *holder)
        .await
        .unwrap();
    let outcome = run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None)
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::LockHeld(_)), "{outcome:?}");
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    // A dead runner's row: fresh heartbeat blocks a new run, a stale one is abandoned.
    let dead = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO batch_runs (id, operation, runner, status, heartbeat_at) \
         VALUES ($1, 'content-scheduler', 'dead', 'running', now())",
    )
    .bind(dead)
    .execute(&fx.admin)
    .await
    .unwrap();
    let outcome = run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None)
        .await
        .unwrap();
    assert!(
        matches!(outcome, RunOutcome::StillRunning { run_id, .. } if run_id == dead),
        "{outcome:?}"
    );
    sqlx::query("UPDATE batch_runs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1")
        .bind(dead)
        .execute(&fx.admin)
        .await
        .unwrap();
    let report = ran(
        run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, RunStatus::Succeeded);
    let status: String = sqlx::query_scalar("SELECT status FROM batch_runs WHERE id = $1")
        .bind(dead)
        .fetch_one(&fx.admin)
        .await
        .unwrap();
    assert_eq!(status, "abandoned");
    // The lock was released: it can be taken again.
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, 1)")
        .bind(LOCK_CLASS)
        .fetch_one(&fx.admin)
        .await
        .unwrap();
    assert!(free);
    fx.done().await;
}

// ---------------------------------------------------------------------------------------
// export-retention

/// The stored name of an export's file (what the worker writes; a CHECK requires it).
fn stored_name(id: Uuid) -> String {
    format!("{}.json", id.simple())
}

async fn insert_export(fx: &Fixture, id: Uuid, path: &str, expires_in_secs: i64) -> Uuid {
    sqlx::query(
        "INSERT INTO domain_exports (id, org_id, domain_id, format, status, storage_path, \
         size_bytes, record_count, checksum_sha256, expires_at, finished_at) \
         VALUES ($1, $2, $3, 'json', 'succeeded', $4, 1, 1, repeat('a', 64), \
         now() + make_interval(secs => $5), now())",
    )
    .bind(id)
    .bind(fx.org().await)
    .bind(fx.domain)
    .bind(path)
    .bind(expires_in_secs as f64)
    .execute(&fx.admin)
    .await
    .unwrap();
    id
}

async fn export_status(fx: &Fixture, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM domain_exports WHERE id = $1")
        .bind(id)
        .fetch_one(&fx.admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn export_retention_deletes_expired_files_and_refuses_paths_outside() {
    let fx = Fixture::new().await;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("exports");
    std::fs::create_dir(&dir).unwrap();
    let [expired, missing, fresh, outside, link, resumed] = [(); 6].map(|()| Uuid::new_v4());
    for id in [expired, fresh, resumed] {
        std::fs::write(dir.join(stored_name(id)), b"x").unwrap();
    }
    std::fs::write(base.path().join("secret"), b"s").unwrap();
    std::os::unix::fs::symlink(base.path().join("secret"), dir.join(stored_name(link))).unwrap();

    insert_export(&fx, expired, &stored_name(expired), -60).await;
    insert_export(&fx, missing, &stored_name(missing), -60).await;
    insert_export(&fx, fresh, &stored_name(fresh), 3_600).await;
    insert_export(&fx, link, &stored_name(link), -60).await;
    // The schema refuses a stored path that is not the export's own file name; retention
    // must still refuse one written before that CHECK (or by hand), so this test drops it.
    sqlx::query("ALTER TABLE domain_exports DROP CONSTRAINT domain_exports_storage_path_check")
        .execute(&fx.admin)
        .await
        .unwrap();
    insert_export(&fx, outside, "../secret", -60).await;
    // A run that died after marking: the row is `expiring`, the file still there.
    insert_export(&fx, resumed, &stored_name(resumed), -60).await;
    sqlx::query("UPDATE domain_exports SET status = 'expiring' WHERE id = $1")
        .bind(resumed)
        .execute(&fx.admin)
        .await
        .unwrap();

    let op = ExportRetention::new(fx.db.clone(), dir.clone());
    let report = ran(
        run_once(&op, &fx.ctx(), options(10, 2, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.total, report.succeeded, report.failed),
        (5, 3, 2),
        "{}",
        report.summary()
    );
    for id in [expired, missing, resumed] {
        assert_eq!(export_status(&fx, id).await, "expired");
    }
    assert!(!dir.join(stored_name(expired)).exists());
    assert!(!dir.join(stored_name(resumed)).exists());
    assert_eq!(export_status(&fx, fresh).await, "succeeded");
    assert!(dir.join(stored_name(fresh)).exists());
    for id in [outside, link] {
        assert_eq!(
            export_status(&fx, id).await,
            "succeeded",
            "refused, untouched"
        );
    }
    assert!(
        base.path().join("secret").exists(),
        "nothing outside was deleted"
    );
    assert!(dir.join(stored_name(link)).symlink_metadata().is_ok());
    let errors: Vec<String> = report
        .failures
        .iter()
        .map(|f| f.error.error.clone())
        .collect();
    assert!(
        errors.iter().all(|e| e.contains("outside EXPORT_DIR")),
        "{errors:?}"
    );

    // A re-run finds only the refused rows again.
    let again = ran(
        run_once(&op, &fx.ctx(), options(10, 2, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!((again.total, again.failed), (2, 2));
    fx.done().await;
}

// ---------------------------------------------------------------------------------------
// keyword-sync against a fake provider

#[derive(Default)]
struct FakeProvider {
    gsc_down: AtomicBool,
    gsc_hits: AtomicUsize,
    ahrefs_hits: AtomicUsize,
}

#[derive(serde::Deserialize)]
struct SiteQuery {
    site: String,
}

fn keywords_body(site: &str) -> String {
    let rows: Vec<serde_json::Value> = ["alpha", "beta", "gamma"]
        .iter()
        .flat_map(|k| {
            ["2026-11-29", "2026-11-30"].map(|date| {
                serde_json::json!({"keyword": format!("{k} {site}"), "date": date,
                    "search_volume": 100, "position": 3.5, "clicks": 10,
                    "impressions": 200, "ctr": 0.05})
            })
        })
        .collect();
    serde_json::json!({ "keywords": rows }).to_string()
}

async fn gsc(State(p): State<Arc<FakeProvider>>, Query(q): Query<SiteQuery>) -> Response {
    p.gsc_hits.fetch_add(1, Ordering::SeqCst);
    if p.gsc_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    (
        [("content-type", "application/json")],
        keywords_body(&q.site),
    )
        .into_response()
}

async fn ahrefs(State(p): State<Arc<FakeProvider>>, Query(q): Query<SiteQuery>) -> Response {
    p.ahrefs_hits.fetch_add(1, Ordering::SeqCst);
    (
        [("content-type", "application/json")],
        keywords_body(&q.site),
    )
        .into_response()
}

/// Headers at once, then a first chunk, then nothing, forever.
async fn stall() -> Response {
    let stream = futures::stream::once(async {
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"keywords\": ["))
    })
    .chain(futures::stream::pending());
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

use futures::StreamExt as _;

/// Counts the request, then never answers (not even headers).
async fn hang(State(p): State<Arc<FakeProvider>>) -> Response {
    p.gsc_hits.fetch_add(1, Ordering::SeqCst);
    futures::future::pending::<()>().await;
    StatusCode::OK.into_response()
}

async fn start_provider(state: Arc<FakeProvider>) -> String {
    let app = Router::new()
        .route("/gsc/v1/keywords", get(gsc))
        .route("/ahrefs/v1/keywords", get(ahrefs))
        .route("/stall/v1/keywords", get(stall))
        .route("/hang/v1/keywords", get(hang))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn provider(base: &str, path: &str) -> ProviderConfig {
    ProviderConfig {
        base_url: format!("{base}/{path}/").parse().unwrap(),
        api_key: Secret::new("test-key"),
    }
}

fn client(open: Duration, attempt: Duration) -> HttpClient {
    let policy = Policy {
        breaker: BreakerPolicy::new(BreakerConfig {
            open_duration: open,
            ..BreakerConfig::default()
        })
        .unwrap(),
        retry: RetryPolicy {
            max_attempts: 1,
            max_elapsed: Duration::from_secs(5),
            ..RetryPolicy::default()
        },
        attempt_timeout: Some(attempt),
    };
    HttpClient::builder(Resilience::new(ResilienceConfig::default()))
        .adapter(AdapterName::Gsc, policy.clone())
        .adapter(AdapterName::Ahrefs, policy)
        .build()
        .unwrap()
}

async fn add_sources(fx: &Fixture, adapter: &str, n: usize) {
    let org = fx.org().await;
    for i in 0..n {
        let domain = new_domain(&fx.admin, org, &format!("{adapter}-{i}.example")).await;
        sqlx::query(
            "INSERT INTO domain_keyword_sources (domain_id, adapter, site) VALUES ($1, $2, $3)",
        )
        .bind(domain)
        .bind(adapter)
        .bind(format!("{adapter}-{i}"))
        .execute(&fx.admin)
        .await
        .unwrap();
    }
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample of `name` whose labels include every one of `labels` (the
/// Prometheus text format); `None` when there is none.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let matches = labels
            .iter()
            .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        matches.then(|| value.trim().parse().ok()).flatten()
    })
}

#[tokio::test]
async fn keyword_sync_isolates_a_failing_provider_and_upserts_without_duplicates() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let shutdown = smartbeak_shutdown::Shutdown::new(smartbeak_shutdown::ShutdownConfig::default());
    let admin = smartbeak_shutdown::admin::AdminServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin_addr = admin.local_addr();
    admin.serve(
        &shutdown,
        Some(recorder),
        Arc::new(|| Box::pin(async { Ok(()) })),
    );

    let fx = Fixture::new().await;
    add_sources(&fx, "gsc", 8).await;
    add_sources(&fx, "ahrefs", 8).await;
    let fake = Arc::new(FakeProvider::default());
    fake.gsc_down.store(true, Ordering::SeqCst);
    let base = start_provider(fake.clone()).await;
    let client = client(Duration::from_millis(300), Duration::from_secs(5));
    let op = KeywordSync::new(
        fx.db.clone(),
        client.clone(),
        Providers {
            gsc: Some(provider(&base, "gsc")),
            ahrefs: Some(provider(&base, "ahrefs")),
        },
    );
    let report = ran(
        run_once(&op, &fx.ctx(), options(4, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.total, report.succeeded, report.failed),
        (16, 8, 8),
        "{}",
        report.summary()
    );
    assert!(report.failures.iter().all(|f| f.item_id.ends_with("/gsc")));
    // Five failures in a row open the breaker; the other three fail without a request.
    assert_eq!(fake.gsc_hits.load(Ordering::SeqCst), 5);
    let fast = report
        .failures
        .iter()
        .filter(|f| f.error.error.contains("circuit breaker for gsc is open"))
        .count();
    assert_eq!(fast, 3, "{:?}", report.failures);
    assert_eq!(fake.ahrefs_hits.load(Ordering::SeqCst), 8);
    let text = metrics_text(admin_addr).await;
    assert!(
        text.lines().any(|l| l.starts_with("circuit_breaker_state{")
            && l.contains("adapter=\"gsc\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("circuit_breaker_state{")
            && l.contains("adapter=\"ahrefs\"")
            && l.ends_with(" 0")),
        "{text}"
    );
    // The run's own metrics, by value: one partial run, its items by outcome, one
    // duration sample, the lock given back.
    let kw = [("operation", "keyword-sync")];
    let partial = [("operation", "keyword-sync"), ("outcome", "partial")];
    let items = |outcome| [("operation", "keyword-sync"), ("outcome", outcome)];
    assert_eq!(
        metric(&text, "control_plane_runs_total", &partial),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "control_plane_items_total", &items("succeeded")),
        Some(8.0)
    );
    assert_eq!(
        metric(&text, "control_plane_items_total", &items("failed")),
        Some(8.0)
    );
    assert_eq!(
        metric(&text, "control_plane_items_total", &items("skipped")),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "control_plane_run_duration_seconds_count", &kw),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "control_plane_lock_held", &kw),
        Some(0.0),
        "{text}"
    );

    // Recovery: once the breaker lets probes through, the next run succeeds.
    fake.gsc_down.store(false, Ordering::SeqCst);
    let breaker = client.breaker(AdapterName::Gsc);
    assert_eq!(breaker.state(), BreakerState::Open);
    // Poll until the breaker admits a probe (the permit is dropped unused: its slot goes
    // back), i.e. the open period is over.
    tokio::time::timeout(Duration::from_secs(10), async {
        while breaker.try_acquire().is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let report = ran(
        run_once(&op, &fx.ctx(), options(4, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.succeeded, report.failed),
        (16, 0),
        "{}",
        report.summary()
    );
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM keyword_metrics")
            .fetch_one(&fx.admin)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 16 * 6);
    // A re-run stores no duplicates.
    let report = ran(
        run_once(&op, &fx.ctx(), options(4, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(report.succeeded, 16);
    assert_eq!(count().await, 16 * 6);
    let synced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM domain_keyword_sources WHERE last_synced_at IS NOT NULL",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!(synced, 16);
    // Three runs: one partial, two succeeded; 8 + 16 + 16 items succeeded, 8 failed; the
    // gsc breaker closed again.
    let text = metrics_text(admin_addr).await;
    let succeeded = [("operation", "keyword-sync"), ("outcome", "succeeded")];
    assert_eq!(
        metric(&text, "control_plane_runs_total", &partial),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "control_plane_runs_total", &succeeded),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "control_plane_items_total", &items("succeeded")),
        Some(40.0)
    );
    assert_eq!(
        metric(&text, "control_plane_items_total", &items("failed")),
        Some(8.0)
    );
    assert_eq!(
        metric(&text, "control_plane_run_duration_seconds_count", &kw),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "circuit_breaker_state", &[("adapter", "gsc")]),
        Some(0.0),
        "{text}"
    );
    fx.done().await;
}

#[tokio::test]
async fn keyword_sync_times_out_a_provider_that_stalls_its_body() {
    let fx = Fixture::new().await;
    add_sources(&fx, "gsc", 1).await;
    let base = start_provider(Arc::new(FakeProvider::default())).await;
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_millis(300)),
        Providers {
            gsc: Some(provider(&base, "stall")),
            ahrefs: None,
        },
    );
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None),
    )
    .await
    .expect("a stalled body ends in a timeout, not a hang")
    .unwrap();
    let report = ran(report);
    assert_eq!(report.failed, 1, "{}", report.summary());
    let error = &report.failures[0].error.error;
    assert!(error.contains("timed out"), "{error}");
    assert!(!error.contains("test-key"), "{error}");
    fx.done().await;
}

#[tokio::test]
async fn keyword_sync_names_an_unconfigured_provider() {
    let fx = Fixture::new().await;
    add_sources(&fx, "ahrefs", 1).await;
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_secs(1)),
        Providers::default(),
    );
    let report = ran(
        run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, RunStatus::Failed);
    assert!(
        report.failures[0].error.error.contains(
            "keyword source ahrefs is not configured (set CP_AHREFS_BASE_URL and CP_AHREFS_API_KEY)"
        ),
        "{:?}",
        report.failures
    );
    fx.done().await;
}

#[tokio::test]
async fn a_cancelled_run_is_interrupted_with_its_counts() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 50, "false").await;
    let op = ContentScheduler::new(fx.db.clone());
    let ctx = fx.ctx();
    ctx.cancel.cancel();
    let report = ran(run_once(&op, &ctx, options(10, 1, Mode::SettleAll), None)
        .await
        .unwrap());
    assert_eq!(report.status, RunStatus::Interrupted);
    assert_eq!((report.total, report.skipped), (50, 50));
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!(
        (row.status.as_str(), row.items_skipped),
        ("interrupted", 50)
    );
    fx.done().await;
}

#[tokio::test]
async fn losing_the_lock_connection_stops_the_run() {
    let fx = Fixture::new().await;
    add_sources(&fx, "gsc", 6).await;
    // A provider slow enough for the heartbeat to notice the lock connection is gone.
    async fn slow(Query(q): Query<SiteQuery>) -> Response {
        tokio::time::sleep(Duration::from_millis(400)).await;
        (
            [("content-type", "application/json")],
            keywords_body(&q.site),
        )
            .into_response()
    }
    let app = Router::new().route("/slow/v1/keywords", get(slow));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_secs(5)),
        Providers {
            gsc: Some(provider(&format!("http://{addr}"), "slow")),
            ahrefs: None,
        },
    );
    let ctx = fx.ctx();
    let admin = fx.admin.clone();
    let killer = tokio::spawn(async move {
        // Wait until the lock is held, then end its session.
        for _ in 0..200 {
            // Only the lock holder of this test's database: `admin` is connected to it,
            // and the lock's row names the holder's pid.
            let killed: Option<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND classid = $1 AND objid = 2 AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND pid <> pg_backend_pid()",
            )
            .bind(LOCK_CLASS)
            .fetch_optional(&admin)
            .await
            .unwrap();
            if killed == Some(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    });
    // One batch larger than the run: the stop must reach the items of the batch in flight.
    let report = ran(run_once(&op, &ctx, options(100, 1, Mode::SettleAll), None)
        .await
        .unwrap());
    assert!(killer.await.unwrap(), "the lock was never seen");
    assert_eq!(report.status, RunStatus::Failed, "{}", report.summary());
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("lock connection was lost"),
        "{}",
        report.summary()
    );
    assert!(
        report.skipped > 0,
        "no further items were started: {}",
        report.summary()
    );
    assert_eq!(report.succeeded + report.failed + report.skipped, 6);
    fx.done().await;
}

/// A provider that answers only when released, counting the requests it got.
#[derive(Default)]
struct GatedProvider {
    hits: AtomicUsize,
    open: tokio::sync::Notify,
    released: AtomicBool,
}

async fn gated(State(p): State<Arc<GatedProvider>>, Query(q): Query<SiteQuery>) -> Response {
    p.hits.fetch_add(1, Ordering::SeqCst);
    loop {
        // Created before the check, so a release in between still wakes it.
        let notified = p.open.notified();
        if p.released.load(Ordering::SeqCst) {
            break;
        }
        notified.await;
    }
    (
        [("content-type", "application/json")],
        keywords_body(&q.site),
    )
        .into_response()
}

#[tokio::test]
async fn shutdown_mid_batch_starts_no_new_item_and_counts_the_rest_skipped() {
    let fx = Fixture::new().await;
    add_sources(&fx, "gsc", 6).await;
    let state = Arc::new(GatedProvider::default());
    let app = Router::new()
        .route("/gated/v1/keywords", get(gated))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_secs(10)),
        Providers {
            gsc: Some(provider(&format!("http://{addr}"), "gated")),
            ahrefs: None,
        },
    );
    let ctx = fx.ctx();
    let cancel = ctx.cancel.clone();
    let trigger = {
        let state = state.clone();
        tokio::spawn(async move {
            // Two items in flight (concurrency 2), then shutdown, then they may finish.
            for _ in 0..1_000 {
                if state.hits.load(Ordering::SeqCst) >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
            state.released.store(true, Ordering::SeqCst);
            state.open.notify_waiters();
        })
    };
    // One batch of 100 for 6 items: without the stop reaching process_batch, all 6 ran.
    let report = ran(run_once(&op, &ctx, options(100, 2, Mode::SettleAll), None)
        .await
        .unwrap());
    trigger.await.unwrap();
    assert_eq!(state.hits.load(Ordering::SeqCst), 2, "{}", report.summary());
    assert_eq!(
        report.status,
        RunStatus::Interrupted,
        "{}",
        report.summary()
    );
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (6, 2, 0, 4),
        "{}",
        report.summary()
    );
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.items_total,
            row.items_succeeded,
            row.items_failed,
            row.items_skipped
        ),
        ("interrupted", 6, 2, 0, 4)
    );
    fx.done().await;
}

#[tokio::test]
async fn shutdown_after_a_full_page_started_is_interrupted_not_succeeded() {
    let fx = Fixture::new().await;
    add_sources(&fx, "gsc", 6).await;
    let state = Arc::new(GatedProvider::default());
    let app = Router::new()
        .route("/gated/v1/keywords", get(gated))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_secs(10)),
        Providers {
            gsc: Some(provider(&format!("http://{addr}"), "gated")),
            ahrefs: None,
        },
    );
    // Pages of 2 (one batch of 2, both items in flight): the stop comes when every item of
    // the first page has started, so nothing of that page is `not started`.
    let ctx = RunContext {
        page_size: 2,
        ..fx.ctx()
    };
    let cancel = ctx.cancel.clone();
    let trigger = {
        let state = state.clone();
        tokio::spawn(async move {
            for _ in 0..1_000 {
                if state.hits.load(Ordering::SeqCst) >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
            state.released.store(true, Ordering::SeqCst);
            state.open.notify_waiters();
        })
    };
    let report = ran(run_once(&op, &ctx, options(2, 2, Mode::SettleAll), None)
        .await
        .unwrap());
    trigger.await.unwrap();
    assert_eq!(state.hits.load(Ordering::SeqCst), 2, "{}", report.summary());
    assert_eq!(
        report.status,
        RunStatus::Interrupted,
        "{}",
        report.summary()
    );
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("later pages were not loaded"),
        "{}",
        report.summary()
    );
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (2, 2, 0, 0),
        "{}",
        report.summary()
    );
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!(row.status.as_str(), "interrupted");
    fx.done().await;
}

#[tokio::test]
async fn failures_past_the_cap_are_counted_but_not_recorded() {
    let fx = Fixture::new().await;
    // 2,000 items, 1,500 failing; batches of 1,000 (so the savepoint fallback runs in
    // chunks of at most 64 subtransactions) one at a time, so the first failures recorded
    // are the lowest indexes.
    seed_scheduled(&fx, 2_000, "i % 4 <> 0").await;
    // Each published row logs its top-level transaction: the chunks keep each to 64.
    sqlx::raw_sql(
        "CREATE TABLE test_publish_tx (txid int8 NOT NULL, id uuid NOT NULL); \
         CREATE FUNCTION test_log_tx() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO test_publish_tx VALUES (txid_current(), NEW.id); RETURN NEW; END $$; \
         CREATE TRIGGER test_log_tx AFTER UPDATE ON content_items FOR EACH ROW \
         WHEN (NEW.status = 'published') EXECUTE FUNCTION test_log_tx();",
    )
    .execute(&fx.admin)
    .await
    .unwrap();
    let op = ContentScheduler::new(fx.db.clone());
    let report = ran(
        run_once(&op, &fx.ctx(), options(1_000, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (2_000, 500, 1_500, 0),
        "{}",
        report.summary()
    );
    assert_eq!(report.status, RunStatus::Partial);
    assert_eq!(report.failures.len(), 1_000);
    let (rows, most): (i64, Option<i64>) = sqlx::query_as(
        "SELECT sum(n)::int8, max(n) FROM \
         (SELECT count(*) AS n FROM test_publish_tx GROUP BY txid) AS per_tx",
    )
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert_eq!(rows, 500, "every published row logged once");
    assert!(
        // PostgreSQL caches 64 subtransactions per backend (PGPROC_MAX_CACHED_SUBXIDS).
        most.unwrap_or(0) <= 64,
        "a transaction published {most:?} rows"
    );
    let run_id = report.run_id.unwrap();
    let recorded: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT item_index, item_id, error FROM batch_run_items WHERE run_id = $1 \
         ORDER BY item_index",
    )
    .bind(run_id)
    .fetch_all(&fx.admin)
    .await
    .unwrap();
    assert_eq!(recorded.len(), 1_000);
    let expected: Vec<i64> = (0..2_000_i64).filter(|i| i % 4 != 0).take(1_000).collect();
    let indexes: Vec<i64> = recorded.iter().map(|r| r.0).collect();
    assert_eq!(indexes, expected);
    assert!(
        recorded
            .iter()
            .all(|r| !r.1.is_empty() && r.2.contains("test_no_bad_published")),
        "every recorded failure is in full"
    );
    let row = run_row(&fx.admin, run_id).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.items_total,
            row.items_succeeded,
            row.items_failed,
            row.items_skipped
        ),
        ("partial", 2_000, 500, 1_500, 0)
    );
    fx.done().await;
}

#[tokio::test]
async fn a_scheduled_row_needs_its_publish_at() {
    let fx = Fixture::new().await;
    // Migration 20261202000005: a scheduled row without publish_at would never be due.
    let refused = sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status) \
         VALUES (gen_random_uuid(), $1, 't', 's', 'scheduled')",
    )
    .bind(fx.domain)
    .execute(&fx.admin)
    .await
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("content_items_scheduled_publish_at_check"),
        "{refused}"
    );
    fx.done().await;
}

/// A stop while a batch's one statement is in flight: when that statement fails on a row,
/// no isolation statement (savepoint chunk, bisection step) starts after the stop.
#[tokio::test]
async fn no_isolation_statement_starts_after_a_stop() {
    for strategy in [Isolation::Savepoints, Isolation::Bisect] {
        let fx = Fixture::new().await;
        // 200 items, one refused once published: the batch statement fails.
        seed_scheduled(&fx, 200, "i = 150").await;
        // Every row update waits for advisory lock 4242, held by the test.
        sqlx::raw_sql(
            "CREATE FUNCTION test_gate() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$; \
             CREATE TRIGGER test_gate BEFORE UPDATE ON content_items \
             FOR EACH ROW EXECUTE FUNCTION test_gate();",
        )
        .execute(&fx.admin)
        .await
        .unwrap();
        let mut gate = fx.admin.acquire().await.unwrap();
        sqlx::query("SELECT pg_advisory_lock(4242)")
            .execute(&mut *gate)
            .await
            .unwrap();
        let op = ContentScheduler::with_isolation(fx.db.clone(), strategy);
        let ctx = fx.ctx();
        let cancel = ctx.cancel.clone();
        let admin = fx.admin.clone();
        let trigger = tokio::spawn(async move {
            // The batch statement waits on the gate: stop, then open the gate.
            let mut waiting = false;
            for _ in 0..1_000 {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                     WHERE l.locktype = 'advisory' AND NOT l.granted \
                     AND d.datname = current_database()",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                if n > 0 {
                    waiting = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
            sqlx::query("SELECT pg_advisory_unlock(4242)")
                .execute(&mut *gate)
                .await
                .unwrap();
            waiting
        });
        let report = ran(
            run_once(&op, &ctx, options(1_000, 1, Mode::SettleAll), None)
                .await
                .unwrap(),
        );
        assert!(trigger.await.unwrap(), "the batch never waited on the gate");
        assert_eq!(
            (
                report.status,
                report.total,
                report.succeeded,
                report.failed,
                report.skipped
            ),
            (RunStatus::Interrupted, 200, 0, 0, 200),
            "{strategy:?}: {}",
            report.summary()
        );
        let published: i64 =
            sqlx::query_scalar("SELECT count(*) FROM content_items WHERE status = 'published'")
                .fetch_one(&fx.admin)
                .await
                .unwrap();
        assert_eq!(published, 0, "{strategy:?}");
        fx.done().await;
    }
}

// ---------------------------------------------------------------------------------------
// Keyset paging across ties on the first key

#[tokio::test]
async fn content_scheduler_pages_through_ties_on_publish_at() {
    let fx = Fixture::new().await;
    // 2,500 items due at the same instant; 5 refused once published.
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) \
         SELECT gen_random_uuid(), $1, CASE WHEN i % 500 = 7 THEN 'bad ' || i ELSE 'good ' || i END, \
         'item-' || i, 'scheduled', now() - interval '1 hour' FROM generate_series(0, 2499) AS i",
    )
    .bind(fx.domain)
    .execute(&fx.admin)
    .await
    .unwrap();
    sqlx::query(
        "ALTER TABLE content_items ADD CONSTRAINT test_no_bad_published \
         CHECK (status <> 'published' OR title NOT LIKE 'bad %') NOT VALID",
    )
    .execute(&fx.admin)
    .await
    .unwrap();
    let op = ContentScheduler::new(fx.db.clone());
    // Pages of 1,000 rounded up to whole batches of 300: 1,200, 1,200, 100.
    let ctx = RunContext {
        page_size: 1_000,
        ..fx.ctx()
    };
    let report = ran(run_once(&op, &ctx, options(300, 2, Mode::SettleAll), None)
        .await
        .unwrap());
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (2_500, 2_495, 5, 0),
        "{}",
        report.summary()
    );
    let indexes: std::collections::BTreeSet<usize> =
        report.failures.iter().map(|f| f.index).collect();
    let ids: std::collections::BTreeSet<&str> =
        report.failures.iter().map(|f| f.item_id.as_str()).collect();
    assert_eq!((indexes.len(), ids.len()), (5, 5), "{:?}", report.failures);
    assert!(indexes.iter().all(|i| *i < 2_500));
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM content_items WHERE status = 'published'")
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(published, 2_495);
    fx.done().await;
}

#[tokio::test]
async fn keyword_sync_pages_through_ties_on_the_domain() {
    let fx = Fixture::new().await;
    // Three domains with both adapters each: pages of one cross (domain, adapter) ties.
    let org = fx.org().await;
    for i in 0..3 {
        let domain = new_domain(&fx.admin, org, &format!("both-{i}.example")).await;
        for adapter in ["gsc", "ahrefs"] {
            sqlx::query(
                "INSERT INTO domain_keyword_sources (domain_id, adapter, site) VALUES ($1, $2, $3)",
            )
            .bind(domain)
            .bind(adapter)
            .bind(format!("{adapter}-{i}"))
            .execute(&fx.admin)
            .await
            .unwrap();
        }
    }
    let base = start_provider(Arc::new(FakeProvider::default())).await;
    let op = KeywordSync::new(
        fx.db.clone(),
        client(Duration::from_secs(30), Duration::from_secs(5)),
        Providers {
            gsc: Some(provider(&base, "gsc")),
            ahrefs: Some(provider(&base, "ahrefs")),
        },
    );
    let ctx = RunContext {
        page_size: 1,
        ..fx.ctx()
    };
    let report = ran(run_once(&op, &ctx, options(1, 1, Mode::SettleAll), None)
        .await
        .unwrap());
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (6, 6, 0, 0),
        "{}",
        report.summary()
    );
    fx.done().await;
}

#[tokio::test]
async fn export_retention_pages_through_ties_on_expires_at() {
    let fx = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    // Five expired exports with the same expires_at (one statement, one now()); their
    // files are missing, which is not an error.
    sqlx::query(
        "WITH ids AS (SELECT gen_random_uuid() AS id FROM generate_series(1, 5)) \
         INSERT INTO domain_exports (id, org_id, domain_id, format, status, storage_path, \
         size_bytes, record_count, checksum_sha256, expires_at, finished_at) \
         SELECT id, $1, $2, 'json', 'succeeded', replace(id::text, '-', '') || '.json', 1, 1, \
         repeat('a', 64), now() - interval '1 minute', now() FROM ids",
    )
    .bind(fx.org().await)
    .bind(fx.domain)
    .execute(&fx.admin)
    .await
    .unwrap();
    let op = ExportRetention::new(fx.db.clone(), dir.path().to_path_buf());
    let ctx = RunContext {
        page_size: 1,
        ..fx.ctx()
    };
    let report = ran(run_once(&op, &ctx, options(1, 1, Mode::SettleAll), None)
        .await
        .unwrap());
    assert_eq!(
        (report.total, report.succeeded, report.failed),
        (5, 5, 0),
        "{}",
        report.summary()
    );
    let expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM domain_exports WHERE status = 'expired'")
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(expired, 5);
    fx.done().await;
}

/// Migration 20261202000005 on a database that had a `scheduled` row without
/// `publish_at` (possible up to 20261202000002): the row gets `publish_at = updated_at`,
/// and a content-scheduler run publishes it.
#[tokio::test]
async fn the_publish_at_backfill_makes_old_scheduled_rows_due() {
    let fx = Fixture::new().await;
    // Back to the schema of 20261202000002: the migrated schema is dropped and the
    // migrations up to that one applied again.
    sqlx::raw_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        .execute(&fx.admin)
        .await
        .unwrap();
    let upto = |last: i64| sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            smartbeak_database::MIGRATOR
                .iter()
                .filter(|m| m.version <= last)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    upto(20_261_202_000_002).run(&fx.admin).await.unwrap();
    let org = Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'org')")
        .bind(org)
        .execute(&fx.admin)
        .await
        .unwrap();
    let domain = new_domain(&fx.admin, org, "old.example").await;
    let old = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status, updated_at) \
         VALUES ($1, $2, 'old', 'old', 'scheduled', now() - interval '1 day')",
    )
    .bind(old)
    .bind(domain)
    .execute(&fx.admin)
    .await
    .unwrap();
    // The rest, as a deployment would apply them.
    smartbeak_database::migrate(&fx.admin).await.unwrap();
    let (publish_at, updated_at): (
        Option<chrono::DateTime<chrono::Utc>>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as("SELECT publish_at, updated_at FROM content_items WHERE id = $1")
        .bind(old)
        .fetch_one(&fx.admin)
        .await
        .unwrap();
    assert_eq!(publish_at, Some(updated_at));
    let op = ContentScheduler::new(fx.db.clone());
    let report = ran(
        run_once(&op, &fx.ctx(), options(10, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.total, report.succeeded),
        (1, 1),
        "{}",
        report.summary()
    );
    let status: String = sqlx::query_scalar("SELECT status FROM content_items WHERE id = $1")
        .bind(old)
        .fetch_one(&fx.admin)
        .await
        .unwrap();
    assert_eq!(status, "published");
    fx.done().await;
}

/// A keyword-sync item stuck on a provider that never answers, with a provider policy far
/// longer than the drain (60 s per attempt, three attempts): at shutdown the run still ends
/// within the drain deadline, the stuck items cancelled `finish_margin` before it and
/// failed, the never-started ones skipped, the run recorded `interrupted`.
#[tokio::test]
async fn a_stuck_keyword_item_is_cancelled_within_the_drain_and_the_run_recorded() {
    let fx = Fixture::new().await;
    let state = Arc::new(FakeProvider::default());
    let base = start_provider(state.clone()).await;
    add_sources(&fx, "gsc", 4).await;
    let policy = Policy {
        breaker: BreakerPolicy::new(BreakerConfig::default()).unwrap(),
        retry: RetryPolicy {
            max_attempts: 3,
            max_elapsed: Duration::from_secs(180),
            ..RetryPolicy::default()
        },
        attempt_timeout: Some(Duration::from_secs(60)),
    };
    let client = HttpClient::builder(Resilience::new(ResilienceConfig::default()))
        .adapter(AdapterName::Gsc, policy)
        .build()
        .unwrap();
    let op = KeywordSync::new(
        fx.db.clone(),
        client,
        Providers {
            gsc: Some(provider(&base, "hang")),
            ahrefs: None,
        },
    );
    // 6 s (a margin of 1.5 s: the cancel at 4.5 s), so the run's own statements fit on a
    // loaded machine; without the cancel the run would take up to 3 x 60 s.
    let drain = Duration::from_secs(6);
    let ctx = RunContext {
        drain: Some(drain),
        ..fx.ctx()
    };
    let cancel = ctx.cancel.clone();
    let hits = state.clone();
    let trigger = async move {
        while hits.gsc_hits.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        std::time::Instant::now()
    };
    // One batch of 4, two in flight: both hang; the other two never start.
    let run = async {
        let report = ran(run_once(&op, &ctx, options(10, 2, Mode::SettleAll), None)
            .await
            .unwrap());
        (report, std::time::Instant::now())
    };
    let guarded = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(trigger, run)
    });
    let (stopped, (report, ended)) = guarded.await.expect("the run ignored its drain deadline");
    let took = ended.duration_since(stopped);
    assert!(
        took <= drain,
        "the run took {took:?} after the stop, drain {drain:?}"
    );
    assert_eq!(
        report.status,
        RunStatus::Interrupted,
        "{}",
        report.summary()
    );
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (4, 0, 2, 2),
        "{}",
        report.summary()
    );
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.error.error.contains("cancelled")),
        "{:?}",
        report.failures
    );
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.items_total,
            row.items_succeeded,
            row.items_failed,
            row.items_skipped,
            row.finished
        ),
        ("interrupted", 4, 0, 2, 2, true)
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch_run_items WHERE run_id = $1")
            .bind(report.run_id.unwrap())
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(recorded, 2, "the cancelled items are recorded failures");
    // The lock was released.
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, 2)")
        .bind(LOCK_CLASS)
        .fetch_one(&fx.admin)
        .await
        .unwrap();
    assert!(free);
    fx.done().await;
}

/// One failing row per batch of 1,000: the savepoint fallback really splits each failed
/// batch into ceil(1000 / 64) = 16 statements (top-level transactions) of 64 items, the
/// last of 40, the one holding the bad row publishing 63.
#[tokio::test]
async fn the_savepoint_fallback_runs_in_chunks_of_64() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 2_000, "i IN (500, 1500)").await;
    sqlx::raw_sql(
        "CREATE TABLE test_publish_tx (txid int8 NOT NULL, id uuid NOT NULL); \
         CREATE FUNCTION test_log_tx() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO test_publish_tx VALUES (txid_current(), NEW.id); RETURN NEW; END $$; \
         CREATE TRIGGER test_log_tx AFTER UPDATE ON content_items FOR EACH ROW \
         WHEN (NEW.status = 'published') EXECUTE FUNCTION test_log_tx();",
    )
    .execute(&fx.admin)
    .await
    .unwrap();
    let op = ContentScheduler::new(fx.db.clone());
    let report = ran(
        run_once(&op, &fx.ctx(), options(1_000, 1, Mode::SettleAll), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (report.succeeded, report.failed),
        (1_998, 2),
        "{}",
        report.summary()
    );
    let sizes: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM test_publish_tx GROUP BY txid ORDER BY count(*) DESC",
    )
    .fetch_all(&fx.admin)
    .await
    .unwrap();
    let mut expected = vec![64_i64; 28];
    expected.extend([63, 63, 40, 40]);
    assert_eq!(sizes, expected, "transactions per failed batch");
    fx.done().await;
}

// ---------------------------------------------------------------------------------------
// Shutdown: row locks, start-up, heartbeats

/// Logs every heartbeat of a `running` row of `batch_runs` (an update that moves
/// `heartbeat_at` and leaves the row running) with the server's clock.
async fn log_heartbeats(admin: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE test_beats (at timestamptz NOT NULL); \
         CREATE FUNCTION test_log_beat() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO test_beats VALUES (clock_timestamp()); RETURN NEW; END $$; \
         CREATE TRIGGER test_log_beat BEFORE UPDATE ON batch_runs FOR EACH ROW \
         WHEN (NEW.status = 'running' AND NEW.heartbeat_at IS DISTINCT FROM OLD.heartbeat_at) \
         EXECUTE FUNCTION test_log_beat();",
    )
    .execute(admin)
    .await
    .unwrap();
}

/// Waits (bounded) until a session of this database waits on a lock in a statement
/// starting with `statement`.
async fn wait_for_lock_wait(admin: &PgPool, statement: &str) {
    let pattern = format!("{statement}%");
    for _ in 0..1_000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(&pattern)
        .fetch_one(admin)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no session ever waited on a lock in {statement:?}");
}

/// The operation's advisory lock is held by no session and can be taken (then released).
async fn assert_lock_free(admin: &PgPool, operation: OperationName) {
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid = $1 AND objid = $2 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(LOCK_CLASS)
    .bind(operation.lock_key())
    .fetch_one(admin)
    .await
    .unwrap();
    assert_eq!(holders, 0, "the advisory lock of {operation} is still held");
    let mut conn = admin.acquire().await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(operation.lock_key())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(free, "the advisory lock of {operation} could not be taken");
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(operation.lock_key())
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// A content-scheduler batch blocked on a row lock (another transaction holds
/// `FOR UPDATE` on a due row): at shutdown the statement is cancelled `finish_margin`
/// before the drain deadline, its items failed as cancelled, the rest skipped, the run
/// recorded `interrupted` within the drain and its advisory lock released. And no
/// heartbeat is written after the stop (the final row carries the counts).
#[tokio::test]
async fn a_batch_blocked_on_a_row_lock_is_cancelled_at_the_drain_deadline_without_heartbeats() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 30, "false").await;
    log_heartbeats(&fx.admin).await;
    // Item 0 (the first due, so in the first batch) locked by another transaction.
    let mut holder = fx.admin.begin().await.unwrap();
    sqlx::query("SELECT id FROM content_items WHERE slug = 'item-0' FOR UPDATE")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let op = ContentScheduler::new(fx.db.clone());
    // 4 s: a margin of 1 s, so the cancel comes at 3 s; without it the statement waits
    // for the lock until the statement timeout (8 s), past the drain.
    let drain = Duration::from_secs(4);
    let ctx = RunContext {
        drain: Some(drain),
        heartbeat: Duration::from_millis(100),
        ..fx.ctx()
    };
    let cancel = ctx.cancel.clone();
    let admin = fx.admin.clone();
    let trigger = async move {
        wait_for_lock_wait(&admin, "UPDATE content_items").await;
        // A few heartbeats while the batch waits: the run is alive and beating.
        for _ in 0..1_000 {
            let beats: i64 = sqlx::query_scalar("SELECT count(*) FROM test_beats")
                .fetch_one(&admin)
                .await
                .unwrap();
            if beats >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&admin)
            .await
            .unwrap();
        cancel.cancel();
        (std::time::Instant::now(), at)
    };
    // Batches of 10, one at a time: the first blocks, the other two never start.
    let run = async {
        let report = ran(run_once(&op, &ctx, options(10, 1, Mode::SettleAll), None)
            .await
            .unwrap());
        (report, std::time::Instant::now())
    };
    let guarded = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(trigger, run)
    });
    let ((stopped, stopped_at), (report, ended)) =
        guarded.await.expect("the run ignored its drain deadline");
    let took = ended.duration_since(stopped);
    assert!(
        took <= drain,
        "the run took {took:?} after the stop, drain {drain:?}: {}",
        report.summary()
    );
    assert_eq!(
        report.status,
        RunStatus::Interrupted,
        "{}",
        report.summary()
    );
    assert_eq!(
        (
            report.total,
            report.succeeded,
            report.failed,
            report.skipped
        ),
        (30, 0, 10, 20),
        "{}",
        report.summary()
    );
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.error.error.contains("cancelled")),
        "{:?}",
        report.failures
    );
    let run_id = report.run_id.unwrap();
    let row = run_row(&fx.admin, run_id).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.items_total,
            row.items_succeeded,
            row.items_failed,
            row.items_skipped,
            row.finished
        ),
        ("interrupted", 30, 0, 10, 20, true)
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch_run_items WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(recorded, 10, "the cancelled items are recorded failures");
    assert_lock_free(&fx.admin, OperationName::ContentScheduler).await;
    // Heartbeats before the stop, none after it (a beat already on its way at the stop
    // may land a moment later: 500 ms of grace, against one beat every 100 ms).
    let (before, after): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE at <= $1), \
         count(*) FILTER (WHERE at > $1 + interval '500 milliseconds') FROM test_beats",
    )
    .bind(stopped_at)
    .fetch_one(&fx.admin)
    .await
    .unwrap();
    assert!(before >= 2, "{before} heartbeats before the stop");
    assert_eq!(after, 0, "heartbeats written after the stop");
    holder.rollback().await.unwrap();
    fx.done().await;
}

/// A stop that arrives during start-up (the run waits for `batch_runs`, locked by another
/// transaction, to mark abandoned runs): the drain deadline is counted from the stop, not
/// from when the run row exists. The run then blocks loading its first page
/// (`content_items` locked too); that load is dropped `finish_margin` before the drain
/// deadline counted from the stop, and the run ends `interrupted` within the drain.
#[tokio::test]
async fn the_drain_is_counted_from_a_stop_during_start_up() {
    let fx = Fixture::new().await;
    seed_scheduled(&fx, 5, "false").await;
    let mut runs_lock = fx.admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE batch_runs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *runs_lock)
        .await
        .unwrap();
    let mut items_lock = fx.admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE content_items IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *items_lock)
        .await
        .unwrap();
    let op = ContentScheduler::new(fx.db.clone());
    // 4 s: the page load is dropped 3 s after the stop. `batch_runs` is held 1.5 s past
    // the stop: a drain counted from the run row would end 5.5 s after the stop.
    let drain = Duration::from_secs(4);
    let ctx = RunContext {
        drain: Some(drain),
        ..fx.ctx()
    };
    let cancel = ctx.cancel.clone();
    let admin = fx.admin.clone();
    let trigger = async move {
        wait_for_lock_wait(&admin, "UPDATE batch_runs").await;
        cancel.cancel();
        let stopped = std::time::Instant::now();
        // The start-up statement still waits: the stop came before the run row existed.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        runs_lock.commit().await.unwrap();
        stopped
    };
    let run = async {
        let report = ran(run_once(&op, &ctx, options(10, 1, Mode::SettleAll), None)
            .await
            .unwrap());
        (report, std::time::Instant::now())
    };
    let guarded = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(trigger, run)
    });
    let (stopped, (report, ended)) = guarded.await.expect("the run ignored its drain deadline");
    let took = ended.duration_since(stopped);
    assert!(
        took <= drain,
        "the run took {took:?} after the stop, drain {drain:?}: {}",
        report.summary()
    );
    assert_eq!(
        report.status,
        RunStatus::Interrupted,
        "{}",
        report.summary()
    );
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("later pages were not loaded"),
        "{}",
        report.summary()
    );
    let row = run_row(&fx.admin, report.run_id.unwrap()).await;
    assert_eq!(
        (row.status.as_str(), row.items_total, row.finished),
        ("interrupted", 0, true)
    );
    assert_lock_free(&fx.admin, OperationName::ContentScheduler).await;
    items_lock.rollback().await.unwrap();
    // Nothing was published: the load never returned.
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM content_items WHERE status = 'published'")
            .fetch_one(&fx.admin)
            .await
            .unwrap();
    assert_eq!(published, 0);
    fx.done().await;
}
