//! Black-box tests of `smartbeak-control-plane` and the `smartbeak-domain-export`
//! placeholder: the real binaries against a fresh database (and, for keyword-sync, a fake
//! provider served by the test).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use smartbeak_database::testing::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::binary;

fn control_plane(database_url: &str) -> Command {
    let mut cmd =
        Command::new(binary("smartbeak-control-plane", "smartbeak-control-plane").unwrap());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("CP_ADMIN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn control_plane_migrates_and_exits_zero_on_sigterm() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let mut child = control_plane(&url).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("control-plane ready");
            log.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "never ready:\n{}", log.join("\n"));

    // Its sessions carry its application_name and the schema is there.
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'smartbeak-control-plane' \
         AND datname = current_database()",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(sessions >= 1, "no session named smartbeak-control-plane");
    let batch_runs: Option<String> = sqlx::query_scalar("SELECT to_regclass('batch_runs')::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(batch_runs.as_deref(), Some("batch_runs"));

    let pid = child.id().unwrap();
    smartbeak_test_support::signal(pid, "TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(line);
    }
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    // The report says the pools were closed by their handler, in the release phase. (The
    // server may list the session for a moment after the process is gone, so this is read
    // from the report rather than from pg_stat_activity.)
    assert!(
        log.contains("handler=db-pools phase=release outcome=\"ok\""),
        "{log}"
    );
    assert!(
        log.contains("database pools closed") && log.contains("shutdown complete"),
        "{log}"
    );
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn control_plane_refuses_bad_configuration_with_the_variable_named() {
    let output = control_plane("postgres://postgres@127.0.0.1:5432/postgres")
        .env("DB_POOL_MIN", "30")
        .env("DB_POOL_MAX", "20")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // A configuration error exits 2 (README, "Exit codes"), before any connection.
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("DB_POOL_MIN (30) is greater than DB_POOL_MAX (20)"),
        "{stdout}"
    );
    assert!(!stdout.contains("panicked"), "{stdout}");

    let output = control_plane("postgres://user:password@127.0.0.1:5432/postgres")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("DATABASE_URL is invalid") && stdout.contains("placeholder"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(":password@"),
        "the password reached the log: {stdout}"
    );

    // Settings that do not fit together, and credentials in a base URL.
    for (vars, expected) in [
        (
            &[("CP_HEARTBEAT_MS", "5000"), ("CP_STALE_AFTER_MS", "6000")][..],
            "CP_STALE_AFTER_MS (6000 ms) must be at least 3 times CP_HEARTBEAT_MS (5000 ms)",
        ),
        (
            &[("CP_CONCURRENCY", "20")][..],
            "CP_CONCURRENCY (20) does not fit DB_POOL_MAX (20): 1 run(s) at once",
        ),
        // A malformed URL carrying credentials: clap's own error would echo it.
        (
            &[
                ("CP_GSC_BASE_URL", "https://bob:hunter2@gsc.example:99999/"),
                ("CP_GSC_API_KEY", "key"),
            ][..],
            "--gsc-base-url (CP_GSC_BASE_URL) is not a valid URL: invalid port number",
        ),
        (
            &[
                ("CP_GSC_BASE_URL", "https://bob:hunter2@gsc.example/"),
                ("CP_GSC_API_KEY", "key"),
            ][..],
            "CP_GSC_BASE_URL must not carry credentials",
        ),
    ] {
        // A database that does not exist: were the check to pass, the connect fails (exit
        // 1) and nothing touches a real database.
        let mut cmd = control_plane("postgres://postgres@127.0.0.1:5432/sb_cp_no_such_database");
        cmd.args(["batch", "keyword-sync"]);
        for (name, value) in vars {
            cmd.env(name, value);
        }
        let output = cmd.output().await.unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(2), "{vars:?}: {out}");
        assert!(out.contains(expected), "{vars:?}: {out}");
        assert!(
            !out.contains("hunter2"),
            "the password reached the output: {out}"
        );
    }
    // `run` runs the enabled operations at once: 3 x (16 + 1) connections > 20.
    let output = control_plane("postgres://postgres@127.0.0.1:5432/sb_cp_no_such_database")
        .arg("run")
        .env("CP_CONCURRENCY", "16")
        .output()
        .await
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(2), "{out}");
    assert!(
        out.contains("CP_CONCURRENCY (16) does not fit DB_POOL_MAX (20): 3 run(s) at once"),
        "{out}"
    );
    // `--help` shows no value of a base URL from the environment.
    let help = control_plane("postgres://postgres@127.0.0.1:5432/postgres")
        .env("CP_GSC_BASE_URL", "https://bob:hunter2@gsc.example/")
        .args(["batch", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("CP_GSC_BASE_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[tokio::test]
async fn domain_export_without_a_command_prints_its_usage() {
    // No longer a placeholder (its tests are in export_worker.rs): without a subcommand it
    // names them and exits 2, like any usage error.
    let output = Command::new(binary("smartbeak-api", "smartbeak-domain-export").unwrap())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for command in ["worker", "run", "enqueue", "status"] {
        assert!(stderr.contains(command), "{stderr}");
    }
}

// ---------------------------------------------------------------------------------------
// `run` processes: one runner per operation, SIGKILL takeover, SIGTERM mid-run

/// A keyword provider that answers every request after `delay`, counting them.
#[derive(Default)]
struct SlowProvider {
    hits: AtomicUsize,
    done: AtomicUsize,
    delay_ms: u64,
}

async fn start_slow_provider(delay_ms: u64) -> (String, Arc<SlowProvider>) {
    use axum::extract::State;
    use axum::routing::get;
    let state = Arc::new(SlowProvider {
        delay_ms,
        ..SlowProvider::default()
    });
    async fn keywords(State(p): State<Arc<SlowProvider>>) -> axum::response::Response {
        use axum::response::IntoResponse;
        p.hits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(p.delay_ms)).await;
        p.done.fetch_add(1, Ordering::SeqCst);
        let body = serde_json::json!({"keywords": [
            {"keyword": "alpha", "date": "2026-11-30", "search_volume": 10, "position": 1.0,
             "clicks": 1, "impressions": 10, "ctr": 0.1},
            {"keyword": "beta", "date": "2026-11-30", "search_volume": 20, "position": 2.0,
             "clicks": 2, "impressions": 20, "ctr": 0.1}
        ]});
        ([("content-type", "application/json")], body.to_string()).into_response()
    }
    let app = axum::Router::new()
        .route("/v1/keywords", get(keywords))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/"), state)
}

async fn seed_sources(admin: &sqlx::PgPool, n: usize) {
    let org = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'cp')")
        .bind(org)
        .execute(admin)
        .await
        .unwrap();
    for i in 0..n {
        let domain = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
            .bind(domain)
            .bind(org)
            .bind(format!("d{i}.example"))
            .execute(admin)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO domain_keyword_sources (domain_id, adapter, site) VALUES ($1, 'gsc', $2)",
        )
        .bind(domain)
        .bind(format!("site-{i}"))
        .execute(admin)
        .await
        .unwrap();
    }
}

/// `run` with only keyword-sync, every second, against `provider`.
fn keyword_runner(url: &str, provider: &str, runner: &str) -> Command {
    let mut cmd = control_plane(url);
    cmd.arg("run")
        .env("CP_RUNNER", runner)
        .env("CP_CONTENT_SCHEDULER_INTERVAL_SECS", "0")
        .env("CP_EXPORT_RETENTION_INTERVAL_SECS", "0")
        .env("CP_KEYWORD_SYNC_INTERVAL_SECS", "1")
        .env("CP_GSC_BASE_URL", provider)
        .env("CP_GSC_API_KEY", "cp-test-secret")
        .env("CP_BATCH_SIZE", "1")
        .env("CP_CONCURRENCY", "1")
        .env("CP_HEARTBEAT_MS", "200")
        .env("CP_STALE_AFTER_MS", "1000")
        // The stale threshold must exceed a heartbeat plus its bound (500 + 250 ms).
        .env("DB_STATEMENT_TIMEOUT_MS", "500");
    cmd
}

/// The child's stdout lines, collected on a task.
fn collect_lines(child: &mut tokio::process::Child) -> Arc<std::sync::Mutex<Vec<String>>> {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(out).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

async fn wait_for<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Run {
    id: uuid::Uuid,
    runner: String,
    status: String,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    items_succeeded: i32,
    items_failed: i32,
    items_skipped: i32,
    items_total: i32,
}

async fn runs(admin: &sqlx::PgPool) -> Vec<Run> {
    sqlx::query_as(
        "SELECT id, runner, status, started_at, finished_at, items_succeeded, items_failed, \
         items_skipped, items_total FROM batch_runs WHERE operation = 'keyword-sync' \
         ORDER BY started_at",
    )
    .fetch_all(admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_run_processes_share_each_operation_and_a_killed_holder_is_taken_over() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    seed_sources(&admin, 4).await;
    let (provider, _state) = start_slow_provider(300).await;

    let mut a = keyword_runner(&url, &provider, "runner-a").spawn().unwrap();
    let a_log = collect_lines(&mut a);
    let mut b = keyword_runner(&url, &provider, "runner-b").spawn().unwrap();
    let b_log = collect_lines(&mut b);

    // Several runs, and at least one attempt that found the lock held.
    let contended = |log: &Arc<std::sync::Mutex<Vec<String>>>| {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("lock is held by another runner"))
    };
    wait_for(
        "three finished runs and a contended lock",
        Duration::from_secs(40),
        || async {
            let finished = runs(&admin)
                .await
                .iter()
                .filter(|r| r.status == "succeeded")
                .count();
            finished >= 3 && (contended(&a_log) || contended(&b_log))
        },
    )
    .await;
    let all = runs(&admin).await;
    for pair in all.windows(2) {
        let end = pair[0]
            .finished_at
            .expect("only the last run may be unfinished");
        assert!(
            end <= pair[1].started_at,
            "runs overlap: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }

    // Kill whichever holds the running run, mid-run.
    let in_progress = || async {
        runs(&admin)
            .await
            .into_iter()
            .find(|r| r.status == "running" && r.items_succeeded >= 1)
    };
    wait_for("a run in progress", Duration::from_secs(20), || async {
        in_progress().await.is_some()
    })
    .await;
    let victim_run = in_progress()
        .await
        .expect("the run was in progress a moment ago");
    let (victim, survivor) = if victim_run.runner == "runner-a" {
        (&mut a, "runner-b")
    } else {
        (&mut b, "runner-a")
    };
    smartbeak_test_support::signal(victim.id().unwrap(), "KILL").unwrap();
    victim.wait().await.unwrap();

    wait_for(
        "the dead run abandoned and a run by the survivor",
        Duration::from_secs(30),
        || async {
            let all = runs(&admin).await;
            let abandoned = all
                .iter()
                .any(|r| r.id == victim_run.id && r.status == "abandoned");
            let taken_over = all.iter().any(|r| {
                r.runner == survivor
                    && r.status == "succeeded"
                    && r.started_at > victim_run.started_at
            });
            abandoned && taken_over
        },
    )
    .await;

    for child in [&mut a, &mut b] {
        if let Some(pid) = child.id() {
            let _ = smartbeak_test_support::signal(pid, "TERM");
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn sigterm_mid_run_finishes_in_flight_items_and_records_the_run_interrupted() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    seed_sources(&admin, 8).await;
    let (provider, state) = start_slow_provider(700).await;

    // One batch larger than the run: SIGTERM must stop the items of the batch in flight.
    let mut child = keyword_runner(&url, &provider, "runner-term")
        .env("CP_KEYWORD_SYNC_INTERVAL_SECS", "3600")
        .env("CP_BATCH_SIZE", "100")
        .spawn()
        .unwrap();
    let log = collect_lines(&mut child);
    // SIGTERM while the second item's request is in flight.
    wait_for("the second request", Duration::from_secs(30), || async {
        state.hits.load(Ordering::SeqCst) >= 2
    })
    .await;
    // The admin port (its address is logged) shows the lock held and the breaker closed.
    let admin_addr = log
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| {
            l.split("admin listening on ")
                .nth(1)
                .map(|a| a.trim().to_owned())
        })
        .expect("the admin address is logged");
    let metrics = reqwest::get(format!("{admin_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("control_plane_lock_held{operation=\"keyword-sync\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("circuit_breaker_state{") && l.contains("adapter=\"gsc\"")),
        "{metrics}"
    );
    let ready = reqwest::get(format!("{admin_addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    smartbeak_test_support::signal(child.id().unwrap(), "TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    let text = log.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        !text.contains("cp-test-secret"),
        "the credential reached the log"
    );

    let all = runs(&admin).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let run = &all[0];
    let hits = state.hits.load(Ordering::SeqCst) as i32;
    assert_eq!(run.status, "interrupted", "{run:?}\n{text}");
    // The in-flight item finished (its request was answered and stored); none started after.
    assert_eq!(state.done.load(Ordering::SeqCst) as i32, hits);
    assert_eq!(run.items_succeeded, hits, "{run:?}");
    assert_eq!(run.items_failed, 0);
    assert_eq!(run.items_total, 8);
    assert_eq!(run.items_skipped, 8 - hits, "{run:?}");
    assert_eq!(
        run.items_succeeded + run.items_failed + run.items_skipped,
        run.items_total
    );
    assert!(run.finished_at.is_some());
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM keyword_metrics")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(stored, i64::from(hits) * 2);
    // The lock was released.
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(1396851536, 2)")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(free);
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

/// A keyword provider that counts each request and never answers it (not even headers).
async fn start_hanging_provider() -> (String, Arc<AtomicUsize>) {
    use axum::extract::State;
    use axum::routing::get;
    async fn keywords(State(hits): State<Arc<AtomicUsize>>) -> axum::response::Response {
        use axum::response::IntoResponse;
        hits.fetch_add(1, Ordering::SeqCst);
        futures::future::pending::<()>().await;
        axum::http::StatusCode::OK.into_response()
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/v1/keywords", get(keywords))
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/"), hits)
}

/// SIGTERM to `run` while keyword-sync is stuck on a provider that never answers: the
/// process ends within the drain deadline with its report's exit code (0), the run is
/// recorded `interrupted` (the stuck item failed, the others never started, skipped), the
/// lock released. The two operations disabled by config (interval 0) never ran, and the
/// log says so once each.
#[tokio::test]
async fn sigterm_while_keyword_sync_is_stuck_on_a_hanging_provider_ends_within_the_drain() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    seed_sources(&admin, 4).await;
    let (provider, hits) = start_hanging_provider().await;
    // A drain of 4 s (its margin 1 s): the provider deadline derived from it is 3 s, and
    // the runner cancels what is still in flight 3 s after the stop.
    let drain = Duration::from_secs(4);
    let mut child = keyword_runner(&url, &provider, "runner-stuck")
        .env("CP_KEYWORD_SYNC_INTERVAL_SECS", "3600")
        .env("CP_BATCH_SIZE", "100")
        .env("SHUTDOWN_TIMEOUT_MS", "8000")
        .env("SHUTDOWN_DRAIN_TIMEOUT_MS", drain.as_millis().to_string())
        .spawn()
        .unwrap();
    let log = collect_lines(&mut child);
    wait_for("the first request", Duration::from_secs(30), || async {
        hits.load(Ordering::SeqCst) >= 1
    })
    .await;
    let stopped_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&admin)
        .await
        .unwrap();
    smartbeak_test_support::signal(child.id().unwrap(), "TERM").unwrap();
    let stopped = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    let took = stopped.elapsed();
    // The stdout reader ends at EOF, after the exit: wait for the last line.
    wait_for("the end of the log", Duration::from_secs(10), || async {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("shutdown complete"))
    })
    .await;
    let text = log.lock().unwrap().join("\n");
    assert!(
        took <= drain,
        "exited {took:?} after SIGTERM, drain {drain:?}:\n{text}"
    );
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        !text.contains("cp-test-secret"),
        "the credential reached the log"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no item started after SIGTERM"
    );

    let all = runs(&admin).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let run = &all[0];
    assert_eq!(run.status, "interrupted", "{run:?}\n{text}");
    assert_eq!(
        (
            run.items_total,
            run.items_succeeded,
            run.items_failed,
            run.items_skipped
        ),
        (4, 0, 1, 3),
        "{run:?}"
    );
    let finished_at = run.finished_at.expect("the run row was finished");
    assert!(
        finished_at <= stopped_at + drain,
        "finished at {finished_at}, stopped at {stopped_at}, drain {drain:?}"
    );
    let failed: Vec<String> =
        sqlx::query_scalar("SELECT error FROM batch_run_items WHERE run_id = $1")
            .bind(run.id)
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(!failed[0].contains("cp-test-secret"), "{failed:?}");
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(1396851536, 2)")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(free);

    // Disabled by config: never run, said once each.
    let others: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batch_runs WHERE operation <> 'keyword-sync'")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(others, 0, "a disabled operation ran");
    for operation in ["content-scheduler", "export-retention"] {
        let said = text
            .lines()
            .filter(|l| l.contains("operation disabled") && l.contains(operation))
            .count();
        assert_eq!(
            said, 1,
            "{operation}: {said} lines say it is disabled:\n{text}"
        );
    }
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

#[tokio::test]
async fn batch_exits_non_zero_naming_the_run_and_serves_help() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let org = uuid::Uuid::new_v4();
    let domain = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'cp')")
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'd.example')")
        .bind(domain)
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    // Migrated by the first run of the binary; then one item that fails.
    let output = control_plane(&url)
        .args(["batch", "content-scheduler", "--dry-run"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("dry_run"));
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) VALUES \
         (gen_random_uuid(), $1, 'bad one', 'bad', 'scheduled', now() - interval '1 minute'), \
         (gen_random_uuid(), $1, 'good one', 'good', 'scheduled', now() - interval '1 minute')",
    )
    .bind(domain)
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(
        "ALTER TABLE content_items ADD CONSTRAINT test_no_bad CHECK (status <> 'published' OR title NOT LIKE 'bad%') NOT VALID",
    )
    .execute(&admin)
    .await
    .unwrap();
    let output = control_plane(&url)
        .args(["batch", "content-scheduler", "--batch-size", "10"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let run_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM batch_runs WHERE operation = 'content-scheduler'")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(
        stdout.contains("2 items, 1 succeeded, 1 failed") && stdout.contains(&run_id.to_string()),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "one summary line off a terminal: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains(" items ("),
        "a progress bar off a terminal: {stderr}"
    );

    let help = control_plane(&url)
        .args(["batch", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "CP_BATCH_SIZE",
        "default: 1000",
        "DB_POOL_MAX",
        "SHUTDOWN_DRAIN_TIMEOUT_MS",
        "SHUTDOWN_POOL_CLOSE_MS",
        "CP_CONCURRENCY",
        "EXPORT_DIR",
        "CP_GSC_API_KEY",
    ] {
        assert!(help.contains(var), "--help lacks {var}: {help}");
    }
    admin.close().await;
    tdb.drop_database().await.unwrap();
}

/// `batch` on a terminal draws indicatif's progress bar (stderr), then the summary line.
/// The terminal is a pty from util-linux `script` (in every Debian-based image: bsdutils).
#[tokio::test]
async fn batch_draws_a_progress_bar_on_a_terminal() {
    let tdb = TestDatabase::create().await.unwrap();
    let url = tdb.url().expose().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let org = uuid::Uuid::new_v4();
    let domain = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'cp')")
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'd.example')")
        .bind(domain)
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) \
         SELECT gen_random_uuid(), $1, 'item ' || i, 'item-' || i, 'scheduled', \
         now() - interval '1 minute' FROM generate_series(1, 200) AS i",
    )
    .bind(domain)
    .execute(&admin)
    .await
    .unwrap();
    let bin = binary("smartbeak-control-plane", "smartbeak-control-plane").unwrap();
    let inner = format!(
        "stty cols 160 rows 40; exec '{}' batch content-scheduler --batch-size 1 --concurrency 1",
        bin.display()
    );
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("script")
            .args(["--quiet", "--return", "--command", &inner, "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            // A terminal has a TERM; without one `console` (under indicatif) draws nothing.
            .env("TERM", "xterm")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("batch under a pty ends")
    .expect("util-linux `script` runs");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    // The bar's template: "{prefix} [{bar:40}] {pos}/{len} items ({per_sec}, eta {eta})".
    assert!(
        out.contains("content-scheduler [") && out.contains("/200 items ("),
        "no progress bar on the terminal: {out:?}"
    );
    assert!(
        out.contains("content-scheduler: succeeded") && out.contains("200 items, 200 succeeded"),
        "{out:?}"
    );
    admin.close().await;
    tdb.drop_database().await.unwrap();
}
