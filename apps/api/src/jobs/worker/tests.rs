#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::job::retry_delay;
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
fn the_release_margin_is_a_bounded_share_of_the_drain() {
    assert_eq!(
        release_margin(Duration::from_millis(16_666)),
        Duration::from_secs(3)
    );
    assert_eq!(
        release_margin(Duration::from_secs(8)),
        Duration::from_secs(2)
    );
    assert_eq!(
        release_margin(Duration::from_secs(2)),
        Duration::from_secs(1)
    );
    assert_eq!(
        release_margin(Duration::from_millis(600)),
        Duration::from_millis(600),
        "a drain below a second releases at once"
    );
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
        Worker::new(s.db.clone(), config, dir)
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
}
