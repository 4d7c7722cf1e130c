#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::job::{self, Decision, decide, retry_delay};
use super::*;

#[test]
fn retries_back_off_with_full_jitter_until_the_attempts_are_used() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(1);
    for _ in 0..100 {
        // After attempt 1 of 3: up to 100 ms; after 2: up to 200 ms; after 3: none.
        assert!(retry_delay(base, max, 1, 3).unwrap() <= base);
        assert!(retry_delay(base, max, 2, 3).unwrap() <= base * 2);
        assert_eq!(retry_delay(base, max, 3, 3), None);
        // The ceiling stops at the maximum.
        assert!(retry_delay(base, max, 9, 20).unwrap() <= max);
    }
    assert_eq!(
        retry_delay(base, max, 1, 1),
        None,
        "one attempt: never retried"
    );
}

#[test]
fn the_release_margin_is_a_bounded_share_of_the_drain_and_holds_the_release_window() {
    let fast = Duration::from_millis(250);
    assert_eq!(release_window(fast), Duration::from_secs(1));
    assert_eq!(
        release_margin(Duration::from_millis(16_666), fast),
        Duration::from_secs(3)
    );
    assert_eq!(
        release_margin(Duration::from_secs(8), fast),
        Duration::from_secs(2)
    );
    assert_eq!(
        release_margin(Duration::from_secs(2), fast),
        Duration::from_secs(1)
    );
    assert_eq!(
        release_margin(Duration::from_millis(600), fast),
        Duration::from_millis(600),
        "a drain below a second releases at once"
    );
    // The cancel waits at least the client bound (a claim sent just before the stop may
    // return that late): at a 100 ms bound (850 ms window) a 950 ms drain keeps 850 ms,
    // not the 950 ms a one-second floor alone would give (a cancel at once).
    let quick = Duration::from_millis(100);
    assert_eq!(
        release_margin(Duration::from_millis(950), quick),
        Duration::from_millis(850)
    );
    // The defaults: an 8.8 s client bound needs 9.55 s; the worker's default drain (20 s)
    // holds it and leaves more than the bound before it.
    let default = Duration::from_millis(8_800);
    assert_eq!(release_window(default), Duration::from_millis(9_550));
    assert_eq!(
        release_margin(Duration::from_secs(20), default),
        Duration::from_millis(9_550)
    );
}

#[test]
fn a_drain_that_cannot_hold_a_late_claim_and_its_release_is_refused() {
    let mut db = smartbeak_database::DatabaseConfig::new("postgres://u@h/d").unwrap();
    db.statement_timeout = Duration::from_millis(1_500);
    let shutdown = |drain_ms| {
        ShutdownConfig::default()
            .with_timeout(Duration::from_secs(5))
            .with_drain_timeout(Duration::from_millis(drain_ms))
    };
    // The release window (500 ms grace + 1,750 ms client bound + 250 ms) plus the client
    // bound of a claim in flight at the stop.
    assert_eq!(min_drain(db.query_timeout()), Duration::from_millis(4_250));
    assert!(check_drain(&shutdown(4_250), &db).is_ok());
    for short in [4_249, 2_500, 1_000] {
        let err = check_drain(&shutdown(short), &db).unwrap_err();
        assert!(
            err.contains("SHUTDOWN_DRAIN_TIMEOUT_MS")
                && err.contains("SHUTDOWN_TIMEOUT_MS")
                && err.contains("DB_STATEMENT_TIMEOUT_MS")
                && err.contains("4250 ms")
                && err.contains(&format!("({short} ms")),
            "{err}"
        );
    }
    // The defaults: the shared two thirds (16.7 s) is too short at the default 8 s
    // statement timeout (18.35 s needed); the worker's default (four fifths, at most the
    // timeout less the 5 s pool close and 1 s: 19 s) holds it.
    let default_db = smartbeak_database::DatabaseConfig::new("postgres://u@h/d").unwrap();
    let pool_close = Duration::from_millis(config::DEFAULT_POOL_CLOSE_MS);
    assert!(check_drain(&ShutdownConfig::default(), &default_db).is_err());
    let worker_default = shutdown_config(ShutdownConfig::default(), pool_close);
    assert_eq!(worker_default.drain_timeout, Some(Duration::from_secs(19)));
    assert!(min_drain(default_db.query_timeout()) <= Duration::from_secs(19));
    assert!(check_shutdown(&worker_default, &default_db, pool_close).is_ok());
    // A drain deadline set explicitly is kept.
    assert_eq!(
        shutdown_config(shutdown(1_000), pool_close).drain_timeout,
        Some(Duration::from_millis(1_000))
    );
}

#[test]
fn the_default_drain_leaves_the_pools_their_close_and_a_second() {
    let timeout = |ms| ShutdownConfig::default().with_timeout(Duration::from_millis(ms));
    let drain = |config: ShutdownConfig, pool_close_ms| {
        shutdown_config(config, Duration::from_millis(pool_close_ms))
            .drain_timeout
            .unwrap()
    };
    // Four fifths where that leaves the pool close and the slack: 40 s of 50 s.
    assert_eq!(drain(timeout(50_000), 5_000), Duration::from_secs(40));
    // Otherwise what is left once they are kept: 25 s - 5 s - 1 s, 8 s - 2 s - 1 s.
    assert_eq!(drain(timeout(25_000), 5_000), Duration::from_secs(19));
    assert_eq!(drain(timeout(8_000), 2_000), Duration::from_secs(5));
    // The readiness delay comes before the drain, so it is kept too.
    let delayed = timeout(25_000).with_readiness_delay(Duration::from_secs(2));
    assert_eq!(drain(delayed, 5_000), Duration::from_secs(17));
    // Every default fits the budget check, unless the pool close alone does not.
    for (ms, close) in [(50_000, 5_000), (25_000, 5_000), (8_000, 2_000)] {
        let close = Duration::from_millis(close);
        let config = shutdown_config(timeout(ms), close);
        assert!(check_shutdown_budget(&config, close).is_ok(), "{config:?}");
    }
    let close = Duration::from_secs(5);
    let squeezed = shutdown_config(timeout(3_000), close);
    assert_eq!(squeezed.drain_timeout, Some(Duration::ZERO));
    assert!(check_shutdown_budget(&squeezed, close).is_err());
}

#[test]
fn a_drain_and_pool_close_past_the_overall_deadline_are_refused() {
    let db = smartbeak_database::DatabaseConfig::new("postgres://u@h/d").unwrap();
    let config = |timeout_ms, drain_ms| {
        ShutdownConfig::default()
            .with_timeout(Duration::from_millis(timeout_ms))
            .with_drain_timeout(Duration::from_millis(drain_ms))
    };
    let close = Duration::from_secs(5);
    // 20 s + 5 s fit in 25 s exactly; one millisecond more does not.
    assert!(check_shutdown_budget(&config(25_000, 20_000), close).is_ok());
    let err = check_shutdown_budget(&config(25_000, 20_001), close).unwrap_err();
    for part in [
        "SHUTDOWN_DRAIN_TIMEOUT_MS",
        "SHUTDOWN_POOL_CLOSE_MS",
        "SHUTDOWN_TIMEOUT_MS",
        "(20001 ms",
        "(5000 ms",
        "25001 ms",
        "(25000 ms)",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    // The readiness delay counts against the overall deadline too.
    let delayed = config(25_000, 19_000).with_readiness_delay(Duration::from_millis(1_001));
    let err = check_shutdown_budget(&delayed, close).unwrap_err();
    assert!(err.contains("SHUTDOWN_READINESS_DELAY_MS"), "{err}");
    // `check_shutdown` runs both checks: a drain that holds the release but not the pools'
    // close is refused, and so is one that fits but is too short.
    assert!(check_shutdown(&config(25_000, 20_001), &db, close).is_err());
    assert!(check_shutdown(&config(25_000, 19_000), &db, close).is_ok());
    let err = check_shutdown(&config(25_000, 18_000), &db, close).unwrap_err();
    assert!(err.contains("18350 ms"), "{err}");
}

#[test]
fn an_unanswered_completion_is_decided_by_the_row() {
    let fence = queue::Fence {
        id: uuid::Uuid::new_v4(),
        token: 4,
    };
    let ours = crate::jobs::paths::file_name(fence.id, 4, "csv");
    let state = |status: &str, token: i64, path: Option<&str>| queue::CompletionState {
        status: status.to_owned(),
        fencing_token: token,
        storage_path: path.map(str::to_owned),
    };
    for status in ["succeeded", "expiring", "expired"] {
        assert_eq!(
            decide(Some(&state(status, 5, Some(&ours))), fence, &ours),
            Decision::Recorded
        );
    }
    let theirs = crate::jobs::paths::file_name(fence.id, 6, "csv");
    assert_eq!(
        decide(Some(&state("succeeded", 7, Some(&theirs))), fence, &ours),
        Decision::Fenced,
        "another attempt's success"
    );
    assert_eq!(
        decide(Some(&state("running", 4, None)), fence, &ours),
        Decision::Retry
    );
    assert_eq!(
        decide(Some(&state("running", 5, None)), fence, &ours),
        Decision::Fenced,
        "reclaimed and claimed again"
    );
    for status in ["queued", "cancelled", "failed"] {
        assert_eq!(
            decide(Some(&state(status, 5, None)), fence, &ours),
            Decision::Fenced
        );
    }
    assert_eq!(decide(None, fence, &ours), Decision::Fenced, "row gone");
}

#[test]
fn the_local_lease_runs_out_lease_minus_margin_after_the_last_renewal() {
    let start = std::time::Instant::now();
    let lease = job::LocalLease::new(start, Duration::from_secs(30), Duration::from_secs(9));
    assert_eq!(lease.deadline(), start + Duration::from_secs(21));
    lease.renewed(start + Duration::from_secs(10));
    assert_eq!(lease.deadline(), start + Duration::from_secs(31));
    // An older renewal (a slow reply) never moves it back.
    lease.renewed(start + Duration::from_secs(5));
    assert_eq!(lease.deadline(), start + Duration::from_secs(31));
    let gone = job::LocalLease::new(start, Duration::from_secs(1), Duration::from_secs(2));
    assert!(gone.expired());
}

mod with_a_database {
    use std::collections::HashMap;

    use smartbeak_database::testing::TestDatabase;
    use smartbeak_shutdown::{ShutdownConfig, ShutdownReason};
    use uuid::Uuid;

    use super::*;
    use crate::jobs::queue::{ExportFormat, NewExport};

    struct Setup {
        tdb: TestDatabase,
        db: Database,
        dir: tempfile::TempDir,
        org: Uuid,
        domain: Uuid,
    }

    async fn setup() -> Setup {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "worker-tests")
            .await
            .unwrap();
        let (org, domain) = (Uuid::new_v4(), Uuid::new_v4());
        db.run(async |conn| {
            sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'o')")
                .bind(org)
                .execute(&mut *conn)
                .await?;
            sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'w.example.com')")
                .bind(domain)
                .bind(org)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "INSERT INTO content_items (id, domain_id, title, slug) \
                 SELECT gen_random_uuid(), $1, 'T' || i, 's-' || i FROM generate_series(1, 20) i",
            )
            .bind(domain)
            .execute(&mut *conn)
            .await
            .map(|_| ())
        })
        .await
        .unwrap();
        Setup {
            tdb,
            db,
            dir: tempfile::tempdir().unwrap(),
            org,
            domain,
        }
    }

    fn worker(s: &Setup, vars: &[(&str, &str)]) -> Worker {
        worker_on(s, s.db.clone(), vars)
    }

    fn worker_on(s: &Setup, db: Database, vars: &[(&str, &str)]) -> Worker {
        let mut map: HashMap<String, String> = [
            ("EXPORT_POLL_MAX_MS", "100"),
            ("EXPORT_REAPER_INTERVAL_SECS", "1"),
            ("EXPORT_WORKER_ID", "in-process"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        for (k, v) in vars {
            map.insert((*k).to_owned(), (*v).to_owned());
        }
        let config = WorkerConfig::from_lookup(|name| map.get(name).cloned()).unwrap();
        let dir = ExportDir::open(s.dir.path()).unwrap();
        Worker::new(db, config, dir)
    }

    fn content_only(format: ExportFormat) -> NewExport {
        NewExport {
            format,
            include_content: true,
            include_keywords: false,
            include_analytics: false,
            date_from: None,
            date_to: None,
        }
    }

    async fn status(db: &Database, id: Uuid) -> String {
        queue::get_any(db, id).await.unwrap().unwrap().status
    }

    async fn wait_for_status(db: &Database, id: Uuid, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = status(db, id).await;
            if now == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "export {id} is {now}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_queued_job_is_claimed_at_once_run_and_completed() {
        let s = setup().await;
        let w = worker(&s, &[]);
        let running = tokio::spawn({
            let w = w.clone();
            async move { w.run().await }
        });
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Csv))
            .await
            .unwrap()
            .unwrap();
        wait_for_status(&s.db, row.id, "succeeded").await;
        let done = queue::get_any(&s.db, row.id).await.unwrap().unwrap();
        assert_eq!(done.record_count, Some(20));
        assert!(done.expires_at.unwrap() > chrono::Utc::now() + chrono::Duration::hours(167));
        w.stop_claiming();
        assert_eq!(running.await.unwrap(), 1);
        assert_eq!(*w.running().borrow(), 0);
        s.tdb.drop_database().await.unwrap();
    }

    #[tokio::test]
    async fn the_drain_releases_what_cannot_finish_and_the_report_is_clean() {
        let s = setup().await;
        let w = worker(&s, &[]);
        let shutdown = Shutdown::new(
            ShutdownConfig::default()
                .with_timeout(Duration::from_secs(5))
                .with_drain_timeout(Duration::from_secs(2)),
        );
        let _installed = install(&shutdown, &w).unwrap();
        // The export waits on this lock for as long as the test holds it.
        let mut lock = s.db.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *lock).await.unwrap();
        sqlx::query("LOCK TABLE content_items IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .unwrap();
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        wait_for_status(&s.db, row.id, "running").await;
        shutdown.trigger(ShutdownReason::Requested("test".into()));
        let report = shutdown.run().await;
        assert!(report.is_success(), "{report}");
        let names: Vec<&str> = report.handlers.iter().map(|h| h.name.as_str()).collect();
        assert!(
            names.contains(&STOP_CLAIMING) && names.contains(&DRAIN_EXPORTS),
            "{names:?}"
        );
        sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
        drop(lock);
        let released = queue::get_any(&s.db, row.id).await.unwrap().unwrap();
        assert_eq!(released.status, "queued");
        assert_eq!(released.attempts, 0, "a released attempt is given back");
        assert!(released.run_after <= chrono::Utc::now());
        assert_eq!(
            std::fs::read_dir(s.dir.path()).unwrap().count(),
            0,
            "no temp file"
        );
        s.tdb.drop_database().await.unwrap();
    }

    /// A forwarder to the test database's server, and a configuration whose primary goes
    /// through it (the analytics reads go straight to the server, as to a replica).
    fn through_forwarder(
        s: &Setup,
        statement_timeout: Duration,
    ) -> (
        smartbeak_test_support::TcpForwarder,
        smartbeak_database::DatabaseConfig,
    ) {
        use std::net::ToSocketAddrs as _;
        let direct = s.tdb.url().expose().to_owned();
        let (scheme, rest) = direct.split_once("://").unwrap();
        let (user, rest) = rest.rsplit_once('@').unwrap();
        let (host_port, path) = rest.split_once('/').unwrap();
        let target = host_port
            .to_socket_addrs()
            .unwrap()
            .find(|a| a.ip().is_loopback())
            .unwrap();
        let forwarder = smartbeak_test_support::TcpForwarder::start(target).unwrap();
        let via = format!("{scheme}://{user}@127.0.0.1:{}/{path}", forwarder.port());
        let mut config = s.tdb.config();
        config.url = smartbeak_database::SecretUrl::parse("DATABASE_URL", &via).unwrap();
        config.analytics_url = Some(s.tdb.url().clone());
        config.statement_timeout = statement_timeout;
        (forwarder, config)
    }

    /// Locks `content_items` until the returned connection rolls back: an export waits.
    /// Runs `body` (PL/pgSQL) in a trigger named `name` before every release (`running` to
    /// `queued`) of an export.
    async fn on_release(db: &Database, name: &str, body: &str) {
        let sql = format!(
            "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN {body}; END $$; \
             CREATE TRIGGER {name} BEFORE UPDATE ON domain_exports FOR EACH ROW \
             WHEN (OLD.status = 'running' AND NEW.status = 'queued') \
             EXECUTE FUNCTION {name}();"
        );
        db.run(async |conn| sqlx::raw_sql(&sql).execute(conn).await)
            .await
            .unwrap();
    }

    async fn lock_content(db: &Database) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
        let mut lock = db.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *lock).await.unwrap();
        sqlx::query("LOCK TABLE content_items IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .unwrap();
        lock
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Waits until a session of `application` in the test database waits on a lock.
    async fn wait_for_lock_wait(s: &Setup, application: &str) {
        let db_name = s.tdb.name().to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 =
                s.db.run(async |conn| {
                    sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                         AND application_name = $2 AND wait_event_type = 'Lock'",
                    )
                    .bind(&db_name)
                    .bind(application)
                    .fetch_one(conn)
                    .await
                })
                .await
                .unwrap();
            if waiting > 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no session of {application} waits on a lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reviewer's hazard: a worker cut off from the primary (its analytics read still
    /// blocked, with a statement timeout longer than the whole scenario) while its job is
    /// reclaimed and another attempt completes it and records its file; only then does the
    /// stale read get its rows. The stale attempt stops by itself at its local lease
    /// deadline (outcome `expired`): no file carries its token, and the recorded file is
    /// intact.
    #[tokio::test]
    async fn a_worker_cut_off_from_the_primary_stops_at_its_local_lease_deadline() {
        use sha2::Digest as _;
        let s = setup().await;
        // Statement timeout 60 s (client bound 66 s): the blocked read outlives the
        // scenario. Lease 68 s, heartbeat 1 s: the local deadline is 2 s after a renewal.
        let (forwarder, config) = through_forwarder(&s, Duration::from_secs(60));
        let stale_db = Database::connect(config, "worker-tests-stale")
            .await
            .unwrap();
        let stale = worker_on(
            &s,
            stale_db.clone(),
            &[
                ("EXPORT_LEASE_SECS", "68"),
                ("EXPORT_HEARTBEAT_SECS", "1"),
                ("EXPORT_WORKER_ID", "stale"),
            ],
        );
        let mut lock = lock_content(&s.db).await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        // The stale attempt, run as the worker runs it (so its outcome can be read).
        let sent = std::time::Instant::now();
        let claimed = queue::claim(&stale_db, "stale", 1, stale.config().lease)
            .await
            .unwrap()
            .remove(0);
        let stale_token = claimed.fence.token;
        let attempt = tokio::spawn(job::run(stale.ctx.clone(), claimed, sent));
        // Its export waits on the lock, on the analytics connection (not cut).
        wait_for_lock_wait(&s, "worker-tests-stale-analytics").await;
        forwarder.black_hole();
        let cut = std::time::Instant::now();

        // Its lease is reclaimed (expired now), and a newer attempt completes the job and
        // records its own file while the stale read still waits.
        s.db.run(async |conn| {
            sqlx::query(
                "UPDATE domain_exports SET lease_expires_at = now() - interval '1 second' \
                 WHERE id = $1",
            )
            .bind(row.id)
            .execute(conn)
            .await
        })
        .await
        .unwrap();
        assert_eq!(queue::reclaim_expired(&s.db, 10).await.unwrap().len(), 1);
        let newer = queue::claim(&s.db, "newer", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        let contents = br#"{"content": "the newer attempt's"}"#.to_vec();
        let recorded = crate::jobs::paths::file_name(row.id, newer.fence.token, "json");
        std::fs::write(s.dir.path().join(&recorded), &contents).unwrap();
        let checksum = hex::encode(sha2::Sha256::digest(&contents));
        queue::complete(
            &s.db,
            newer.fence,
            &queue::Completed {
                storage_path: recorded.clone(),
                size_bytes: contents.len() as i64,
                record_count: 1,
                checksum_sha256: checksum.clone(),
                expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
            },
        )
        .await
        .unwrap();

        // The stale read still waits. Its attempt must end by itself (the local deadline,
        // 2 s after its last renewal); the lock is held until then, or at most 30 s (a
        // bound on the wait, not a timed assertion: an attempt that does not stop by
        // itself then gets its rows, renames its file and tries to record it, and the
        // assertions below fail).
        let mut attempt = attempt;
        let early = tokio::time::timeout(Duration::from_secs(30), &mut attempt).await;
        eprintln!(
            "the stale attempt ended by itself: {}, {} ms after the cut",
            early.is_ok(),
            cut.elapsed().as_millis()
        );
        sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
        drop(lock);
        let outcome = match early {
            Ok(outcome) => outcome.unwrap(),
            Err(_) => tokio::time::timeout(Duration::from_secs(240), attempt)
                .await
                .expect("the stale attempt must end")
                .unwrap(),
        };
        forwarder.restore();
        eprintln!(
            "the stale attempt ended {} ms after the cut",
            cut.elapsed().as_millis()
        );
        assert_eq!(outcome, job::Outcome::Expired);
        let info = queue::download_info(&s.db, s.org, row.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.storage_path.as_deref(), Some(recorded.as_str()));
        assert_eq!(
            names(s.dir.path()),
            vec![recorded.clone()],
            "one file: the newer attempt's"
        );
        assert!(
            names(s.dir.path())
                .iter()
                .all(|n| !n.contains(&format!(".{stale_token}."))),
            "no file of the stale attempt"
        );
        let bytes = std::fs::read(s.dir.path().join(&recorded)).unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), checksum);
        assert_eq!(info.checksum_sha256.as_deref(), Some(checksum.as_str()));
        assert_eq!(bytes.len() as i64, info.size_bytes.unwrap());
        let attempts: Vec<(String, String)> =
            s.db.run(async |conn| {
                sqlx::query_as(
                    "SELECT worker, outcome FROM domain_export_attempts \
                     WHERE export_id = $1 ORDER BY fencing_token",
                )
                .bind(row.id)
                .fetch_all(conn)
                .await
            })
            .await
            .unwrap();
        assert_eq!(
            attempts,
            vec![
                ("stale".to_owned(), "reclaimed".to_owned()),
                ("newer".to_owned(), "succeeded".to_owned())
            ]
        );
        drop(forwarder);
        stale_db.close(Duration::from_secs(1)).await.ok();
        s.tdb.drop_database().await.unwrap();
    }

    fn done_for(fence: queue::Fence) -> queue::Completed {
        queue::Completed {
            storage_path: crate::jobs::paths::file_name(fence.id, fence.token, "json"),
            size_bytes: 2,
            record_count: 0,
            checksum_sha256: "0".repeat(64),
            expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
        }
    }

    fn long_lease() -> job::LocalLease {
        job::LocalLease::new(
            std::time::Instant::now(),
            Duration::from_secs(3600),
            Duration::ZERO,
        )
    }

    /// A completion that commits while its reply is lost (the connection black-holed
    /// between the two) is re-read and counted a success; a stale claim's is fenced.
    #[tokio::test]
    async fn a_completion_whose_reply_is_lost_is_recovered_by_re_reading_the_row() {
        let s = setup().await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        let job = queue::claim(&s.db, "w", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        let done = done_for(job.fence);
        let (forwarder, config) = through_forwarder(&s, Duration::from_secs(4));
        let cut_db = Database::connect(config, "worker-tests-complete")
            .await
            .unwrap();
        // The completion waits on this row lock until the connection is cut.
        let mut lock = s.db.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *lock).await.unwrap();
        sqlx::query("SELECT 1 FROM domain_exports WHERE id = $1 FOR UPDATE")
            .bind(row.id)
            .execute(&mut *lock)
            .await
            .unwrap();
        let completing = tokio::spawn({
            let (db, done) = (cut_db.clone(), done.clone());
            async move {
                let lease = long_lease();
                job::complete_recovering(&db, job.fence, &done, &lease).await
            }
        });
        let db_name = s.tdb.name().to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 =
                s.db.run(async |conn| {
                    sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                         AND application_name = 'worker-tests-complete' \
                         AND wait_event_type = 'Lock'",
                    )
                    .bind(&db_name)
                    .fetch_one(conn)
                    .await
                })
                .await
                .unwrap();
            if waiting == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the completion never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        forwarder.black_hole();
        sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
        drop(lock);
        // The server commits the completion; its reply is swallowed.
        wait_for_status(&s.db, row.id, "succeeded").await;
        forwarder.restore();
        let completion = tokio::time::timeout(Duration::from_secs(30), completing)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(completion, job::Completion::Recorded),
            "{completion:?}"
        );
        // A claim whose token moved on: fenced at once.
        let stale = queue::Fence {
            id: row.id,
            token: job.fence.token - 1,
        };
        let completion =
            job::complete_recovering(&s.db, stale, &done_for(stale), &long_lease()).await;
        assert!(
            matches!(completion, job::Completion::Fenced),
            "{completion:?}"
        );
        cut_db.close(Duration::from_secs(1)).await.ok();
        drop(forwarder);
        s.tdb.drop_database().await.unwrap();
    }

    /// A completion the server refuses for good (here a trigger; in life a constraint) is
    /// not an unknown outcome: it is refused after one call, and so is a file name that is
    /// not the claim's.
    #[tokio::test]
    async fn a_completion_refused_for_good_is_not_retried_as_unknown() {
        let s = setup().await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        let job = queue::claim(&s.db, "w", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        let foreign = queue::Completed {
            storage_path: format!("{}.json", row.id.simple()),
            ..done_for(job.fence)
        };
        let completion = job::complete_recovering(&s.db, job.fence, &foreign, &long_lease()).await;
        assert!(
            matches!(
                completion,
                job::Completion::Refused(queue::FenceError::ForeignFile { .. })
            ),
            "{completion:?}"
        );
        s.db.run(async |conn| {
            sqlx::raw_sql(
                "CREATE FUNCTION refuse_success() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'completion refused by the test'; END $$; \
                 CREATE TRIGGER refuse_success BEFORE UPDATE ON domain_exports FOR EACH ROW \
                 WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION refuse_success();",
            )
            .execute(conn)
            .await
        })
        .await
        .unwrap();
        let completion =
            job::complete_recovering(&s.db, job.fence, &done_for(job.fence), &long_lease()).await;
        assert!(
            matches!(
                completion,
                job::Completion::Refused(queue::FenceError::Db(_))
            ),
            "{completion:?}"
        );
        assert_eq!(status(&s.db, row.id).await, "running");
        s.tdb.drop_database().await.unwrap();
    }

    /// The sweep removes old temp files and old unreferenced final files, and keeps young
    /// files, referenced files and names that are not an export's.
    #[tokio::test]
    async fn the_sweep_removes_old_leftovers_and_keeps_young_and_referenced_files() {
        let s = setup().await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        let job = queue::claim(&s.db, "w", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        let done = done_for(job.fence);
        queue::complete(&s.db, job.fence, &done).await.unwrap();
        let id = row.id.simple();
        let old = std::time::SystemTime::now() - Duration::from_secs(600);
        let plant = |name: &str, at: Option<std::time::SystemTime>| {
            let file = std::fs::File::create(s.dir.path().join(name)).unwrap();
            if let Some(at) = at {
                file.set_modified(at).unwrap();
            }
        };
        let old_temp = format!(".{id}.{}.tmp", Uuid::new_v4().simple());
        let young_temp = format!(".{id}.{}.tmp", Uuid::new_v4().simple());
        let old_orphan = crate::jobs::paths::file_name(row.id, job.fence.token - 1, "json");
        let young_orphan = crate::jobs::paths::file_name(row.id, job.fence.token + 5, "json");
        plant(&old_temp, Some(old));
        plant(&young_temp, None);
        plant(&old_orphan, Some(old));
        plant(&young_orphan, None);
        plant(&done.storage_path, Some(old));
        plant("notes.txt", Some(old));
        // A running job's files are kept, however old they look: its attempt may still
        // write the temp file, or have renamed the final one (a rename keeps the temp
        // file's mtime) with its completion in flight.
        let busy = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        let busy_job = queue::claim(&s.db, "w", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(busy_job.fence.id, busy.id);
        let busy_temp = format!(".{}.{}.tmp", busy.id.simple(), Uuid::new_v4().simple());
        let busy_final = crate::jobs::paths::file_name(busy.id, busy_job.fence.token, "json");
        plant(&busy_temp, Some(old));
        plant(&busy_final, Some(old));
        let dir = ExportDir::open(s.dir.path()).unwrap();
        let swept = sweep_dir(&s.db, &dir, Duration::from_secs(120)).await;
        assert_eq!(
            swept,
            Swept {
                temp_files: 1,
                orphans: 1
            }
        );
        let mut kept = vec![
            young_temp,
            young_orphan,
            done.storage_path.clone(),
            "notes.txt".to_owned(),
            busy_temp,
            busy_final,
        ];
        kept.sort();
        assert_eq!(names(s.dir.path()), kept);
        s.tdb.drop_database().await.unwrap();
    }

    /// The listener's session terminated: jobs are still claimed (polling, then the
    /// reopened listener), and the listener comes back on a session of its own.
    #[tokio::test]
    async fn a_terminated_listener_reconnects_and_jobs_are_still_claimed() {
        let s = setup().await;
        let w = worker(&s, &[]);
        let running = tokio::spawn({
            let w = w.clone();
            async move { w.run().await }
        });
        let db_name = s.tdb.name().to_owned();
        let listener_pid = |not: i32| {
            let (db, name) = (s.db.clone(), db_name.clone());
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let pid: Option<i32> = db
                        .run(async |conn| {
                            sqlx::query_scalar(
                                "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                                 AND application_name = 'worker-tests-listener' AND pid <> $2",
                            )
                            .bind(&name)
                            .bind(not)
                            .fetch_optional(conn)
                            .await
                        })
                        .await
                        .unwrap();
                    if let Some(pid) = pid {
                        return pid;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no listener session (other than {not})"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let first = listener_pid(0).await;
        let terminated: bool =
            s.db.run(async |conn| {
                sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'worker-tests-listener' \
                     AND pid = $2",
                )
                .bind(&db_name)
                .bind(first)
                .fetch_one(conn)
                .await
            })
            .await
            .unwrap();
        assert!(terminated);
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Csv))
            .await
            .unwrap()
            .unwrap();
        wait_for_status(&s.db, row.id, "succeeded").await;
        let second = listener_pid(first).await;
        assert_ne!(first, second);
        w.stop_claiming();
        assert_eq!(running.await.unwrap(), 1);
        s.tdb.drop_database().await.unwrap();
    }

    /// A release that fails at shutdown fails the drain handler: the report is not a
    /// success and the exit code is not 0.
    #[tokio::test]
    async fn a_failed_release_at_shutdown_fails_the_report() {
        let s = setup().await;
        let w = worker(&s, &[]);
        let shutdown = Shutdown::new(
            ShutdownConfig::default()
                .with_timeout(Duration::from_secs(5))
                .with_drain_timeout(Duration::from_secs(2)),
        );
        let _installed = install(&shutdown, &w).unwrap();
        let mut lock = lock_content(&s.db).await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        wait_for_status(&s.db, row.id, "running").await;
        // Every release now fails on the server.
        on_release(
            &s.db,
            "refuse_release",
            "RAISE EXCEPTION 'release refused by the test'",
        )
        .await;
        shutdown.trigger(ShutdownReason::Requested("test".into()));
        let report = shutdown.run().await;
        assert!(!report.is_success(), "{report}");
        assert_ne!(
            format!("{:?}", report.exit_code()),
            format!("{:?}", std::process::ExitCode::SUCCESS),
            "{report}"
        );
        let drain = report
            .handlers
            .iter()
            .find(|h| h.name == DRAIN_EXPORTS)
            .unwrap();
        assert!(
            format!("{:?}", drain.outcome).contains("could not be released"),
            "{report}"
        );
        sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
        drop(lock);
        s.tdb.drop_database().await.unwrap();
    }

    /// A release against a slow database (here a trigger that makes the release statement
    /// take 2.5 s, within its statement timeout) still lands: the drain keeps the cancel
    /// grace plus the database client bound for it. (The margin of old, a quarter of the
    /// drain, gives the releases until about 1.6 s after the cancel at this drain: it
    /// reported this export "still running" and failed the report.)
    #[tokio::test]
    async fn a_slow_release_at_shutdown_still_lands_within_the_drain() {
        let s = setup().await;
        let mut config = s.tdb.config();
        // A client bound of 3,300 ms for a release that takes 2.5 s: 800 ms of room for a
        // loaded machine, and well past the margin of old (7,350 / 4 = 1,837 ms, so the
        // releases were due 1,587 ms after the cancel).
        config.statement_timeout = Duration::from_millis(3_000);
        let db = Database::connect(config.clone(), "worker-slow-release")
            .await
            .unwrap();
        let w = worker_on(&s, db, &[]);
        // The least drain the worker accepts at this bound: the 4,050 ms release window
        // (500 ms grace, the 3,300 ms client bound, 250 ms) plus the client bound.
        let shutdown = Shutdown::new(
            ShutdownConfig::default()
                .with_timeout(Duration::from_secs(9))
                .with_drain_timeout(Duration::from_millis(7_350)),
        );
        check_drain(shutdown.config(), &config).unwrap();
        let _installed = install(&shutdown, &w).unwrap();
        let mut lock = lock_content(&s.db).await;
        let row = queue::enqueue(&s.db, s.org, s.domain, &content_only(ExportFormat::Json))
            .await
            .unwrap()
            .unwrap();
        wait_for_status(&s.db, row.id, "running").await;
        on_release(&s.db, "slow_release", "PERFORM pg_sleep(2.5); RETURN NEW").await;
        shutdown.trigger(ShutdownReason::Requested("test".into()));
        let report = shutdown.run().await;
        assert!(report.is_success(), "{report}");
        sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
        drop(lock);
        let released = queue::get_any(&s.db, row.id).await.unwrap().unwrap();
        assert_eq!(released.status, "queued");
        assert_eq!(released.attempts, 0, "a released attempt is given back");
        s.tdb.drop_database().await.unwrap();
    }
}
