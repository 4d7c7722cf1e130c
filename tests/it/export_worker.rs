//! Black-box tests of `smartbeak-domain-export`: real worker processes on a fresh database,
//! jobs queued through the binary's own `enqueue` (or the api), files in a temp directory.
//!
//! A "slow" export is a real one held up by the database: the test takes an `ACCESS
//! EXCLUSIVE` lock on the table a section reads (`content_items`, `keyword_metrics`) in a
//! transaction of its own, so the export's query waits, claimed and heartbeating, until the
//! test commits. No test knob in the binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use smartbeak_database::testing::TestDatabase;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::eventually;
use uuid::Uuid;

use crate::api::metric_value;

/// Path of the export binary: `SMARTBEAK_EXPORT_BIN`, else built if needed.
fn export_bin() -> Result<PathBuf> {
    match std::env::var_os("SMARTBEAK_EXPORT_BIN") {
        Some(bin) => Ok(PathBuf::from(bin)),
        None => crate::support::binary("smartbeak-api", "smartbeak-domain-export"),
    }
}

/// The fresh database, a pool on it (for seeding and checking), and its URL.
struct Db {
    db: Option<TestDatabase>,
    pool: PgPool,
    url: String,
}

impl Db {
    async fn create() -> Self {
        let db = TestDatabase::create().await.unwrap();
        let url = db.url().expose().to_owned();
        let pool = PgPool::connect(&url).await.unwrap();
        Self {
            db: Some(db),
            pool,
            url,
        }
    }

    async fn drop(mut self) {
        self.pool.close().await;
        if let Some(db) = self.db.take() {
            db.drop_database().await.ok();
        }
    }

    /// An org with `domains` domains of `rows` content items and keyword rows each.
    async fn seed(&self, domains: usize, rows: usize) -> (Uuid, Vec<Uuid>) {
        let org = Uuid::new_v4();
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'export tests')")
            .bind(org)
            .execute(&self.pool)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for n in 0..domains {
            let domain = Uuid::new_v4();
            sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
                .bind(domain)
                .bind(org)
                .bind(format!("d{n}.example.com"))
                .execute(&self.pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO content_items (id, domain_id, title, slug, body, status) \
                 SELECT gen_random_uuid(), $1, 'Title ' || i, 'slug-' || i, \
                        'Body, \"quoted\"\nline ' || i, 'published' \
                 FROM generate_series(1, $2) AS i",
            )
            .bind(domain)
            .bind(rows as i32)
            .execute(&self.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO keyword_metrics (domain_id, keyword, search_volume, position, recorded_at) \
                 SELECT $1, 'keyword ' || i, i, 1.5, now() - interval '1 day' \
                 FROM generate_series(1, $2) AS i",
            )
            .bind(domain)
            .bind(rows as i32)
            .execute(&self.pool)
            .await
            .unwrap();
            ids.push(domain);
        }
        (org, ids)
    }

    /// Holds an `ACCESS EXCLUSIVE` lock on `table` until the transaction ends.
    async fn lock(&self, table: &str) -> Transaction<'static, Postgres> {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    /// Waits until `n` sessions wait for a lock on `table` (of this database).
    async fn wait_for_waiters(&self, table: &str, n: i64) {
        eventually(
            &format!("{n} sessions waiting on {table}"),
            Duration::from_secs(10),
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                     WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND c.relname = $1 AND NOT l.granted",
                )
                .bind(table)
                .fetch_one(&self.pool)
                .await
                .unwrap();
                (waiting == n).then_some(())
            },
        )
        .await;
    }

    async fn status(&self, id: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM domain_exports WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn lease_owner(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT lease_owner FROM domain_exports WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `(attempt, worker, outcome)` of every attempt of `id`, in order.
    async fn attempts(&self, id: Uuid) -> Vec<(i32, String, String)> {
        sqlx::query_as(
            "SELECT attempt, worker, outcome FROM domain_export_attempts \
             WHERE export_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }
}

/// Runs the binary once with `args` (DATABASE_URL and `env` only); returns (code, stdout,
/// stderr).
async fn cli(url: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = Command::new(export_bin().unwrap())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Queues an export with `enqueue`; returns the job id.
async fn enqueue(url: &str, domain: Uuid, format: &str, extra: &[&str]) -> Uuid {
    let domain = domain.to_string();
    let mut args = vec!["enqueue", "--domain", &domain, "--format", format];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = cli(url, &args, &[]).await;
    assert_eq!(code, Some(0), "enqueue failed: {stderr}");
    stdout.trim().parse().unwrap()
}

/// A running worker process; killed on drop.
struct WorkerProc {
    child: Child,
    admin: String,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

/// What every test worker gets: fast polls and reaper, a free admin port.
fn base_env(export_dir: &Path) -> Vec<(String, String)> {
    [
        ("EXPORT_DIR", export_dir.display().to_string()),
        ("EXPORT_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("EXPORT_POLL_MAX_MS", "200".to_owned()),
        ("EXPORT_REAPER_INTERVAL_SECS", "1".to_owned()),
        ("DB_RUN_MIGRATIONS", "false".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

impl WorkerProc {
    async fn start(url: &str, export_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut vars: HashMap<String, String> = base_env(export_dir).into_iter().collect();
        for (k, v) in env {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let mut child = Command::new(export_bin()?)
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .envs(&vars)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning smartbeak-domain-export worker")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(at) = line.find("admin listening on http://") {
                        let rest = &line[at + "admin listening on http://".len()..];
                        let addr: String = rest
                            .chars()
                            .take_while(|c| *c != '"' && !c.is_whitespace())
                            .collect();
                        let _ = tx.send(addr);
                    }
                    output.lock().unwrap().push(line);
                }
            }));
        }
        drop(tx);
        let admin = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(addr)) => addr,
            _ => bail!(
                "the worker did not start; output:\n{}",
                output.lock().unwrap().join("\n")
            ),
        };
        Ok(Self {
            child,
            admin,
            output,
            readers,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// A metric from `/metrics` (summed over the series whose labels contain `label`).
    async fn metric(&self, name: &str, label: Option<&str>) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, name, label)
    }

    fn signal(&self, signal: &str) {
        smartbeak_test_support::signal(self.pid(), signal).unwrap();
    }

    /// Waits for the exit and the end of the output, at most `bound`; returns the code.
    async fn wait(&mut self, bound: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + bound;
        let status = tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the worker did not exit:\n{}", self.output()))
            .unwrap();
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout_at(deadline, reader).await;
        }
        status.code()
    }
}

/// Waits until `id` has `status`.
async fn wait_status(db: &Db, id: Uuid, status: &str, bound: Duration) {
    eventually(&format!("export {id} to be {status}"), bound, || async {
        (db.status(id).await == status).then_some(())
    })
    .await;
}

/// The names of the files in `dir`.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The finished files in `dir` (`<id>.<ext>`; temp files of killed workers aside).
fn finished_files(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|n| !n.starts_with('.') && !n.contains(".tmp") && !n.ends_with(".part"))
        .collect()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Checks a succeeded job's file against its row.
async fn check_file(db: &Db, dir: &Path, id: Uuid) {
    let (path, size, sha): (String, i64, String) = sqlx::query_as(
        "SELECT storage_path, size_bytes, checksum_sha256 FROM domain_exports WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let file = dir.join(&path);
    assert_eq!(
        std::fs::metadata(&file).unwrap().len() as i64,
        size,
        "{path}"
    );
    assert_eq!(sha256_hex(&file), sha, "{path}");
}

#[tokio::test]
async fn two_workers_share_fifty_jobs_and_do_each_exactly_once() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(5, 5).await;
    let a = WorkerProc::start(&db.url, dir.path(), &[("EXPORT_WORKER_ID", "worker-a")])
        .await
        .unwrap();
    let b = WorkerProc::start(&db.url, dir.path(), &[("EXPORT_WORKER_ID", "worker-b")])
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for chunk in (0..50).collect::<Vec<_>>().chunks(10) {
        let queued = futures::future::join_all(chunk.iter().map(|n| {
            let format = ["csv", "json", "markdown"][n % 3];
            enqueue(&db.url, domains[n % domains.len()], format, &[])
        }))
        .await;
        jobs.extend(queued);
    }
    eventually("50 succeeded exports", Duration::from_secs(25), || async {
        let done = db
            .count("SELECT count(*) FROM domain_exports WHERE status = 'succeeded'")
            .await;
        (done == 50).then_some(())
    })
    .await;

    assert_eq!(
        db.count("SELECT count(*) FROM domain_exports").await,
        50,
        "nothing else queued"
    );
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM domain_export_attempts GROUP BY outcome ORDER BY outcome",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        vec![("succeeded".to_owned(), 50)],
        "one attempt per job, each succeeded"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM (SELECT export_id FROM domain_export_attempts \
             WHERE outcome = 'succeeded' GROUP BY export_id HAVING count(*) = 1) s"
        )
        .await,
        50
    );
    assert_eq!(
        finished_files(dir.path()).len(),
        50,
        "{:?}",
        files(dir.path())
    );
    for id in &jobs {
        check_file(&db, dir.path(), *id).await;
    }
    // Both workers took part (SKIP LOCKED shares the queue) and the counts add up.
    let claimed_a = a.metric("export_jobs_claimed_total", None).await;
    let claimed_b = b.metric("export_jobs_claimed_total", None).await;
    assert_eq!(claimed_a + claimed_b, 50.0);
    let succeeded = a
        .metric("export_jobs_total", Some(r#"outcome="succeeded""#))
        .await
        + b.metric("export_jobs_total", Some(r#"outcome="succeeded""#))
            .await;
    assert_eq!(succeeded, 50.0);
    drop((a, b));
    db.drop().await;
}

/// A forwarder to the database's server that delays every chunk by `latency_ms`, and
/// `url` rewritten to go through it.
fn slow_path(url: &str, latency_ms: u64) -> (smartbeak_test_support::TcpForwarder, String) {
    use std::net::ToSocketAddrs as _;
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.rsplit_once('@').unwrap();
    let (host_port, path) = rest.split_once('/').unwrap();
    let target = host_port
        .to_socket_addrs()
        .unwrap()
        .find(|a| a.ip().is_loopback())
        .unwrap();
    let forwarder = smartbeak_test_support::TcpForwarder::start(target).unwrap();
    forwarder.set_fault(smartbeak_test_support::Fault::Latency(latency_ms));
    let via = format!("{scheme}://{user}@127.0.0.1:{}/{path}", forwarder.port());
    (forwarder, via)
}

/// The temp files of export `id` in `dir`, with their sizes.
fn temp_files(dir: &Path, id: Uuid) -> Vec<(String, u64)> {
    let prefix = format!(".{}.", id.simple());
    files(dir)
        .into_iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".tmp"))
        .map(|n| {
            let len = std::fs::metadata(dir.join(&n)).map_or(0, |m| m.len());
            (n, len)
        })
        .collect()
}

/// A worker SIGKILLed in the middle of writing a large export (its database path slowed by
/// a latency proxy, killed once its temp file holds data): the other worker reclaims the
/// job after the lease and finishes it. One complete file, one success, both attempts
/// recorded, and the dead worker's partial temp file swept.
#[tokio::test]
async fn a_killed_worker_s_export_is_finished_by_another_after_its_lease() {
    const ROWS: usize = 20_000;
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(1, ROWS).await;
    // A short lease: the heartbeat plus the statement timeout's client bound must nest
    // under it.
    let short = [
        ("EXPORT_LEASE_SECS", "4"),
        ("EXPORT_HEARTBEAT_SECS", "1"),
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ("EXPORT_MAX_BYTES", "67108864"),
    ];
    // About 2.5 MB of COPY output at 16 KiB per 30 ms: seconds of writing.
    let (slow, slow_url) = slow_path(&db.url, 30);
    let mut a = WorkerProc::start(
        &slow_url,
        dir.path(),
        &[short.as_slice(), &[("EXPORT_WORKER_ID", "doomed")]].concat(),
    )
    .await
    .unwrap();
    let id = enqueue(
        &db.url,
        domains[0],
        "csv",
        &["--no-keywords", "--no-analytics"],
    )
    .await;
    wait_status(&db, id, "running", Duration::from_secs(10)).await;
    assert_eq!(db.lease_owner(id).await.as_deref(), Some("doomed"));
    // Mid-write: the temp file is on disk and holds part of the export.
    let partial = eventually(
        "the doomed worker's temp file to hold data",
        Duration::from_secs(20),
        || async {
            temp_files(dir.path(), id)
                .into_iter()
                .find(|(_, len)| *len > 0)
        },
    )
    .await;
    a.signal("KILL");
    a.wait(Duration::from_secs(10)).await;
    assert_eq!(db.status(id).await, "running", "killed before it finished");
    assert!(
        temp_files(dir.path(), id)
            .iter()
            .any(|(n, _)| *n == partial.0),
        "the killed worker's partial file stays behind: {:?}",
        files(dir.path())
    );
    assert!(
        finished_files(dir.path()).is_empty(),
        "{:?}",
        files(dir.path())
    );
    drop(slow);

    let b = WorkerProc::start(
        &db.url,
        dir.path(),
        &[short.as_slice(), &[("EXPORT_WORKER_ID", "survivor")]].concat(),
    )
    .await
    .unwrap();
    wait_status(&db, id, "succeeded", Duration::from_secs(30)).await;
    let attempts = db.attempts(id).await;
    assert_eq!(
        attempts,
        vec![
            (1, "doomed".to_owned(), "reclaimed".to_owned()),
            (2, "survivor".to_owned(), "succeeded".to_owned()),
        ]
    );
    let records: i64 = sqlx::query_scalar("SELECT record_count FROM domain_exports WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(records, ROWS as i64);
    // The sweep (every reaper tick) removes the dead worker's temp file once it is older
    // than two leases, and keeps the recorded file.
    eventually(
        "the sweep to remove the killed worker's temp file",
        Duration::from_secs(30),
        || async { (files(dir.path()).len() == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        finished_files(dir.path()).len(),
        1,
        "{:?}",
        files(dir.path())
    );
    check_file(&db, dir.path(), id).await;
    assert_eq!(b.metric("export_jobs_reclaimed_total", None).await, 1.0);
    drop(b);
    db.drop().await;
}

#[tokio::test]
async fn a_cancel_through_the_api_stops_a_running_export_with_no_file_left() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let api = crate::api::Api::start(
        &db.url,
        &[
            ("RATE_LIMIT_ENABLED", "false".to_owned()),
            ("EXPORT_DIR", dir.path().display().to_string()),
        ],
    )
    .await
    .unwrap();
    let tenant = crate::api::Tenant::create(&db.url, "cancel").await.unwrap();
    let domain = crate::api::create_domain(&api, &tenant, "cancel.example.com")
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO content_items (id, domain_id, title, slug) \
         SELECT gen_random_uuid(), $1, 'T' || i, 's-' || i FROM generate_series(1, 50) i",
    )
    .bind(Uuid::parse_str(&domain).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    let worker = WorkerProc::start(&db.url, dir.path(), &[]).await.unwrap();
    let lock = db.lock("content_items").await;
    let created: serde_json::Value = api
        .http
        .post(api.url(&format!("/v1/domains/{domain}/exports")))
        .header("authorization", tenant.bearer())
        .json(&serde_json::json!({"format": "json"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    wait_status(&db, id, "running", Duration::from_secs(10)).await;
    let deleted = std::time::Instant::now();
    let response = api
        .http
        .delete(api.url(&format!("/v1/exports/{id}")))
        .header("authorization", tenant.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The cancel NOTIFY (or the once-a-second fence check) stops the export, still waiting
    // on the lock: the job ends `cancelled`, counted by the worker, with no file. A bound,
    // not a timing: the measured time is printed.
    eventually(
        "the export to end cancelled with no file",
        Duration::from_secs(10),
        || async {
            let n = worker
                .metric("export_jobs_total", Some(r#"outcome="cancelled""#))
                .await;
            (n == 1.0 && db.status(id).await == "cancelled" && files(dir.path()).is_empty())
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "from DELETE to cancelled with no file: {} ms",
        deleted.elapsed().as_millis()
    );
    assert_eq!(worker.metric("export_jobs_running", None).await, 0.0);
    lock.commit().await.unwrap();
    assert_eq!(db.status(id).await, "cancelled");
    assert_eq!(
        files(dir.path()),
        Vec::<String>::new(),
        "no file, no temp file"
    );
    let attempts = db.attempts(id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].2, "cancelled");
    assert!(
        worker.output().contains("export cancelled"),
        "{}",
        worker.output()
    );
    drop((worker, api));
    db.drop().await;
}

/// A worker whose completion is fenced by a newer attempt that finished first: the
/// newer attempt records its file (named as the worker names it,
/// `smartbeak_api::jobs::paths::file_name`) while the fenced worker's completion waits on
/// the row, after its rename; the fenced worker then removes only its own file.
#[tokio::test]
async fn a_fenced_worker_cannot_complete_and_removes_its_file() {
    use sha2::Digest as _;
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(1, 10).await;
    let worker = WorkerProc::start(&db.url, dir.path(), &[]).await.unwrap();
    let content = db.lock("content_items").await;
    let id = enqueue(
        &db.url,
        domains[0],
        "csv",
        &["--no-keywords", "--no-analytics"],
    )
    .await;
    wait_status(&db, id, "running", Duration::from_secs(10)).await;
    // The row is held: the worker's completion (and any heartbeat) waits on it.
    let mut row = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM domain_exports WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *row)
        .await
        .unwrap();
    content.commit().await.unwrap();
    // The export finishes, renames its file and sends its completion, which waits.
    eventually(
        "the worker's completion to wait on the row",
        Duration::from_secs(20),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%status = ''succeeded''%'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;
    let worker_file = finished_files(dir.path());
    assert_eq!(worker_file.len(), 1, "{:?}", files(dir.path()));
    // Meanwhile the lease is reclaimed and a newer attempt (this test) completes the job
    // with a file of its own, as the worker names it.
    let newer: i64 = sqlx::query_scalar(
        "UPDATE domain_exports SET fencing_token = fencing_token + 2, lease_owner = 'newer', \
         lease_expires_at = now() + interval '1 hour' WHERE id = $1 RETURNING fencing_token",
    )
    .bind(id)
    .fetch_one(&mut *row)
    .await
    .unwrap();
    let recorded = smartbeak_api::jobs::paths::file_name(id, newer, "csv");
    let contents = b"id,title\r\nthe newer attempt's file\r\n".to_vec();
    std::fs::write(dir.path().join(&recorded), &contents).unwrap();
    let checksum = hex::encode(sha2::Sha256::digest(&contents));
    sqlx::query(
        "UPDATE domain_exports SET status = 'succeeded', storage_path = $2, size_bytes = $3, \
         record_count = 1, checksum_sha256 = $4, expires_at = now() + interval '1 hour', \
         finished_at = now(), fencing_token = fencing_token + 1, lease_owner = NULL, \
         lease_expires_at = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(&recorded)
    .bind(contents.len() as i64)
    .bind(&checksum)
    .execute(&mut *row)
    .await
    .unwrap();
    row.commit().await.unwrap();
    // The worker's completion now finds the token moved: fenced.
    eventually(
        "the worker to count the fence",
        Duration::from_secs(20),
        || async {
            let n = worker
                .metric("export_jobs_total", Some(r#"outcome="fenced""#))
                .await;
            (n == 1.0).then_some(())
        },
    )
    .await;
    let (status, path, size, sum): (String, Option<String>, Option<i64>, Option<String>) =
        sqlx::query_as(
            "SELECT status, storage_path, size_bytes, checksum_sha256 FROM domain_exports \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (status.as_str(), path.as_deref()),
        ("succeeded", Some(recorded.as_str())),
        "the row shows the newer attempt's file"
    );
    assert_eq!(
        files(dir.path()),
        vec![recorded.clone()],
        "exactly one file, the recorded one (the worker's own {worker_file:?} removed)"
    );
    let bytes = std::fs::read(dir.path().join(&recorded)).unwrap();
    assert_eq!(Some(bytes.len() as i64), size);
    assert_eq!(Some(hex::encode(sha2::Sha256::digest(&bytes))), sum);
    assert_eq!(
        worker
            .metric("export_jobs_total", Some(r#"outcome="succeeded""#))
            .await,
        0.0
    );
    drop(worker);
    db.drop().await;
}

#[tokio::test]
async fn retryable_failures_are_retried_then_dead_lettered_with_every_attempt() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(1, 5).await;
    // Every attempt's read waits on the lock until the server's statement timeout cancels
    // it: a database timeout, which a later attempt could survive.
    let lock = db.lock("content_items").await;
    let worker = WorkerProc::start(
        &db.url,
        dir.path(),
        &[
            ("DB_STATEMENT_TIMEOUT_MS", "300"),
            // The server's bound of a statement inside the export's read snapshot.
            ("DB_LONG_READ_TIMEOUT_MS", "300"),
            ("EXPORT_RETRY_BASE_MS", "50"),
            ("EXPORT_RETRY_MAX_MS", "100"),
            ("EXPORT_POLL_MAX_MS", "100"),
        ],
    )
    .await
    .unwrap();
    let id = enqueue(
        &db.url,
        domains[0],
        "json",
        &["--no-keywords", "--no-analytics"],
    )
    .await;
    wait_status(&db, id, "failed", Duration::from_secs(20)).await;
    lock.commit().await.unwrap();
    let (attempts, max, error): (i32, i32, Option<String>) =
        sqlx::query_as("SELECT attempts, max_attempts, error FROM domain_exports WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, max, "every attempt was used");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("timeout") || error.contains("cancel"),
        "{error}"
    );
    let rows = db.attempts(id).await;
    let outcomes: Vec<&str> = rows.iter().map(|(_, _, o)| o.as_str()).collect();
    let mut expected = vec!["retried"; (max - 1) as usize];
    expected.push("failed");
    assert_eq!(outcomes, expected);
    assert_eq!(
        rows.iter().map(|(n, _, _)| *n).collect::<Vec<_>>(),
        (1..=max).collect::<Vec<_>>()
    );
    assert_eq!(
        worker
            .metric("export_jobs_total", Some(r#"outcome="retried""#))
            .await,
        f64::from(max - 1)
    );
    assert_eq!(files(dir.path()), Vec::<String>::new());
    drop(worker);
    db.drop().await;
}

#[tokio::test]
async fn the_running_gauge_never_exceeds_export_concurrency_and_reaches_it() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(2, 5).await;
    let worker = WorkerProc::start(&db.url, dir.path(), &[("EXPORT_CONCURRENCY", "2")])
        .await
        .unwrap();
    let lock = db.lock("content_items").await;
    let mut jobs = Vec::new();
    for n in 0..6 {
        jobs.push(
            enqueue(
                &db.url,
                domains[n % 2],
                "csv",
                &["--no-keywords", "--no-analytics"],
            )
            .await,
        );
    }
    // The highest value of the gauge seen by any scrape.
    let peak = std::cell::Cell::new(0.0_f64);
    let scrape = || async {
        let running = worker.metric("export_jobs_running", None).await;
        peak.set(peak.get().max(running));
        running
    };
    eventually("two exports running", Duration::from_secs(10), || async {
        (scrape().await == 2.0).then_some(())
    })
    .await;
    // Held: a few more scrapes and the database agree that only two are claimed.
    for _ in 0..10 {
        scrape().await;
        assert_eq!(
            db.count("SELECT count(*) FROM domain_exports WHERE status = 'running'")
                .await,
            2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock.commit().await.unwrap();
    eventually("all six succeeded", Duration::from_secs(20), || async {
        scrape().await;
        let done = db
            .count("SELECT count(*) FROM domain_exports WHERE status = 'succeeded'")
            .await;
        (done == 6).then_some(())
    })
    .await;
    assert_eq!(
        peak.get(),
        2.0,
        "never more than EXPORT_CONCURRENCY running"
    );
    drop(worker);
    db.drop().await;
}

/// A drain deadline that cannot hold a release (cancel grace plus the database client
/// bound), or that leaves the pools' close no room in the overall deadline, is refused at
/// start-up with exit 2, naming the variables.
#[tokio::test]
async fn a_drain_too_short_for_a_release_is_refused_at_start_up() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    // The worker with `env` on top of the base: its exit code and stderr.
    let start = async |env: &[(&str, &str)]| {
        let output = Command::new(export_bin().unwrap())
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .envs(base_env(dir.path()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stderr)
    };
    let (code, stderr) = start(&[
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ("SHUTDOWN_DRAIN_TIMEOUT_MS", "1000"),
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        // The least drain at a 1,750 ms client bound: the 2,500 ms release window plus the
        // bound of a claim in flight at the stop.
        stderr.contains("SHUTDOWN_DRAIN_TIMEOUT_MS") && stderr.contains("4250 ms"),
        "{stderr}"
    );
    // A drain that holds the release but leaves the pools less than SHUTDOWN_POOL_CLOSE_MS
    // of the overall deadline is refused too.
    let (code, stderr) = start(&[
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ("SHUTDOWN_TIMEOUT_MS", "8000"),
        ("SHUTDOWN_DRAIN_TIMEOUT_MS", "5000"),
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("SHUTDOWN_POOL_CLOSE_MS")
            && stderr.contains("SHUTDOWN_TIMEOUT_MS (8000 ms)")
            && stderr.contains("10000 ms"),
        "{stderr}"
    );
    db.drop().await;
}

#[tokio::test]
async fn sigterm_completes_what_finishes_and_releases_the_rest_for_another_worker() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, domains) = db.seed(2, 10).await;
    let env = [
        ("SHUTDOWN_TIMEOUT_MS", "8000"),
        // The drain keeps 2.5 s (500 ms cancel grace, the 1,750 ms client bound, 250 ms)
        // for the release; the 2.5 s before it are for finishing.
        ("SHUTDOWN_DRAIN_TIMEOUT_MS", "5000"),
        // The drain and the pools' close must fit in the 8 s (refused at start-up else).
        ("SHUTDOWN_POOL_CLOSE_MS", "2000"),
        ("DB_STATEMENT_TIMEOUT_MS", "1500"),
        ("EXPORT_MAX_BYTES", "1000000000"),
    ];
    // Every export first counts its rows in one statement over its sections' tables (the
    // settings always): this lock holds both exports there until the worker has its
    // SIGTERM. The export to abandon reads content (the other does not): the lock on
    // content_items holds it in that statement (it waits there first) past the drain
    // deadline. One statement streams a section, so a lock taken once it runs could not
    // stop it.
    let content = db.lock("content_items").await;
    let settings = db.lock("domain_settings").await;
    let mut first = WorkerProc::start(
        &db.url,
        dir.path(),
        &[env.as_slice(), &[("EXPORT_WORKER_ID", "first")]].concat(),
    )
    .await
    .unwrap();
    let abandoned = enqueue(
        &db.url,
        domains[0],
        "csv",
        &["--no-keywords", "--no-analytics"],
    )
    .await;
    let finishing = enqueue(
        &db.url,
        domains[1],
        "json",
        &["--no-content", "--no-analytics"],
    )
    .await;
    wait_status(&db, abandoned, "running", Duration::from_secs(10)).await;
    wait_status(&db, finishing, "running", Duration::from_secs(10)).await;
    db.wait_for_waiters("content_items", 1).await;
    db.wait_for_waiters("domain_settings", 1).await;

    first.signal("TERM");
    settings.commit().await.unwrap();
    // The small export finishes within the drain and completes...
    wait_status(&db, finishing, "succeeded", Duration::from_secs(2)).await;
    // ...while the other is held on content_items to the drain deadline.
    let code = first.wait(Duration::from_secs(15)).await;
    let output = first.output();
    assert_eq!(code, Some(0), "{output}");
    check_file(&db, dir.path(), finishing).await;
    assert_eq!(db.status(abandoned).await, "queued", "{output}");
    assert_eq!(
        db.attempts(abandoned).await,
        vec![(1, "first".to_owned(), "released".to_owned())]
    );
    for name in [
        "stop-claiming",
        "drain-exports",
        "in-flight-tasks",
        "db-pools",
    ] {
        let line = output
            .lines()
            .find(|l| {
                l.contains("shutdown handler finished") && l.contains(&format!("handler={name} "))
            })
            .unwrap_or_else(|| panic!("no {name} in the report:\n{output}"));
        assert!(line.contains(r#"outcome="ok""#), "{line}");
    }
    assert_eq!(
        finished_files(dir.path()).len(),
        1,
        "{:?}",
        files(dir.path())
    );
    assert_eq!(
        files(dir.path()).len(),
        1,
        "no temp file left: {:?}",
        files(dir.path())
    );

    content.commit().await.unwrap();
    let second = WorkerProc::start(
        &db.url,
        dir.path(),
        &[env.as_slice(), &[("EXPORT_WORKER_ID", "second")]].concat(),
    )
    .await
    .unwrap();
    wait_status(&db, abandoned, "succeeded", Duration::from_secs(20)).await;
    check_file(&db, dir.path(), abandoned).await;
    assert_eq!(
        db.attempts(abandoned).await,
        vec![
            (1, "first".to_owned(), "released".to_owned()),
            (1, "second".to_owned(), "succeeded".to_owned()),
        ],
        "a released attempt is given back: the next one is number 1 again"
    );
    assert_eq!(
        finished_files(dir.path()).len(),
        2,
        "{:?}",
        files(dir.path())
    );
    drop(second);
    db.drop().await;
}

#[tokio::test]
async fn help_lists_every_variable_and_bad_input_gets_a_clear_error() {
    let db = Db::create().await;
    let (code, help, _) = cli(&db.url, &["worker", "--help"], &[]).await;
    assert_eq!(code, Some(0));
    for (var, default) in [
        ("EXPORT_DIR", "./exports"),
        ("EXPORT_CONCURRENCY", "5"),
        ("EXPORT_MAX_BYTES", "10485760"),
        ("EXPORT_TTL_HOURS", "168"),
        ("EXPORT_LEASE_SECS", "30"),
        ("EXPORT_HEARTBEAT_SECS", "10"),
        ("EXPORT_POLL_MAX_MS", "5000"),
        ("EXPORT_REAPER_INTERVAL_SECS", "10"),
        ("EXPORT_RETRY_BASE_MS", "1000"),
        ("EXPORT_RETRY_MAX_MS", "300000"),
        ("EXPORT_ADMIN_ADDR", "127.0.0.1:9465"),
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(&format!("[env: {var}=")))
            .unwrap_or_else(|| panic!("no {var} in:\n{help}"));
        assert!(
            line.contains(&format!("[default: {default}]")),
            "{var}: {line}"
        );
    }
    assert!(help.contains("EXPORT_WORKER_ID") && help.contains("<hostname>-<pid>"));
    for var in [
        "DATABASE_URL",
        "DB_STATEMENT_TIMEOUT_MS",
        "DB_LONG_READ_TIMEOUT_MS",
        "DB_STREAM_GAP_TIMEOUT_MS",
        "DB_POOL_MAX",
        "SHUTDOWN_TIMEOUT_MS",
        "SHUTDOWN_DRAIN_TIMEOUT_MS",
        "SHUTDOWN_POOL_CLOSE_MS",
        "LOG_FORMAT",
    ] {
        assert!(help.contains(var), "no {var} in:\n{help}");
    }
    // One default for the worker's drain deadline: its own, not the shared two thirds.
    let drain = help
        .lines()
        .find(|l| l.trim_start().starts_with("SHUTDOWN_DRAIN_TIMEOUT_MS"))
        .unwrap_or_else(|| panic!("no SHUTDOWN_DRAIN_TIMEOUT_MS line in:\n{help}"));
    assert!(drain.contains("[4/5 of SHUTDOWN_TIMEOUT_MS"), "{drain}");
    assert!(!help.contains("2/3"), "{help}");

    // A bad UUID names the argument.
    let (code, _, stderr) = cli(
        &db.url,
        &[
            "run",
            "--domain",
            "not-a-uuid",
            "--format",
            "csv",
            "--out",
            "/tmp",
        ],
        &[],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("--domain") && stderr.contains("not-a-uuid"),
        "{stderr}"
    );
    let (code, _, stderr) = cli(&db.url, &["status", "nope"], &[]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("JOB_ID"), "{stderr}");

    // An unknown domain.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let missing = Uuid::new_v4().to_string();
    let (code, _, stderr) = cli(
        &db.url,
        &[
            "run", "--domain", &missing, "--format", "csv", "--out", &out,
        ],
        &[],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&format!("domain {missing} not found")),
        "{stderr}"
    );
    let (code, _, stderr) = cli(
        &db.url,
        &["enqueue", "--domain", &missing, "--format", "json"],
        &[],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&format!("domain {missing} not found")),
        "{stderr}"
    );

    // A directory that cannot be written: its parent is a regular file.
    let (_, domains) = db.seed(1, 3).await;
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let bad = blocker.join("exports").display().to_string();
    let domain = domains[0].to_string();
    let (code, _, stderr) = cli(
        &db.url,
        &["run", "--domain", &domain, "--format", "csv", "--out", &bad],
        &[],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("output directory") && stderr.contains(&bad),
        "{stderr}"
    );

    // And the happy path: path, size, records and checksum, matching the file.
    let (code, stdout, stderr) = cli(
        &db.url,
        &["run", "--domain", &domain, "--format", "csv", "--out", &out],
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .trim()
            .to_owned()
    };
    let path = PathBuf::from(field("path"));
    assert_eq!(sha256_hex(&path), field("sha256"));
    assert_eq!(
        format!("{} bytes", std::fs::metadata(&path).unwrap().len()),
        field("size")
    );
    assert!(
        stderr.contains("progress:"),
        "plain progress lines off a terminal: {stderr}"
    );

    // A worker with an invalid variable refuses to start and names it.
    let (code, _, stderr) = cli(
        &db.url,
        &["worker"],
        &[
            ("EXPORT_CONCURRENCY", "0"),
            ("EXPORT_ADMIN_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("EXPORT_CONCURRENCY"), "{stderr}");
    // Timeouts that do not nest: the worker logs why (on stdout, its log stream) and exits.
    let (code, stdout, stderr) = cli(
        &db.url,
        &["worker"],
        &[
            ("EXPORT_LEASE_SECS", "2"),
            ("EXPORT_HEARTBEAT_SECS", "1"),
            ("EXPORT_ADMIN_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stdout.contains("EXPORT_LEASE_SECS") && stdout.contains("DB_STATEMENT_TIMEOUT_MS"),
        "{stdout}{stderr}"
    );
    db.drop().await;
}
