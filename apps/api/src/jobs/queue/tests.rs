//! The queue's statements against a real PostgreSQL (a fresh database per test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use smartbeak_database::Database;
use smartbeak_database::testing::TestDatabase;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use super::*;

const LEASE: Duration = Duration::from_secs(30);

/// A fresh database with one org and one of its domains.
pub(crate) struct Fixture {
    pub(crate) tdb: Option<TestDatabase>,
    pub(crate) db: Database,
    pub(crate) org: Uuid,
    pub(crate) domain: Uuid,
}

impl Fixture {
    pub(crate) async fn new() -> Self {
        let tdb = TestDatabase::create().await.unwrap();
        let db = Database::connect(tdb.config(), "smartbeak-queue-test")
            .await
            .unwrap();
        let org = crate::auth::create_org(&db, "queue tests").await.unwrap();
        let domain = add_domain(&db, org, "queue.example.com").await;
        Self {
            tdb: Some(tdb),
            db,
            org,
            domain,
        }
    }

    pub(crate) async fn enqueue(&self, format: ExportFormat) -> ExportRow {
        enqueue(&self.db, self.org, self.domain, &new_export(format))
            .await
            .unwrap()
            .expect("the fixture's domain is the org's")
    }

    /// Runs one statement for its rows-affected count (test set-up and inspection).
    pub(crate) async fn exec(&self, sql: &str, id: Uuid) -> u64 {
        self.db
            .run(async |conn| sqlx::query(sql).bind(id).execute(conn).await)
            .await
            .unwrap()
            .rows_affected()
    }

    pub(crate) async fn token(&self, id: Uuid) -> i64 {
        self.db
            .run(async |conn| {
                sqlx::query_scalar("SELECT fencing_token FROM domain_exports WHERE id = $1")
                    .bind(id)
                    .fetch_one(conn)
                    .await
            })
            .await
            .unwrap()
    }

    /// `(attempt, outcome, error)` of every attempt row of `id`, in order.
    pub(crate) async fn attempts(&self, id: Uuid) -> Vec<(i32, String, Option<String>)> {
        self.db
            .run(async |conn| {
                sqlx::query_as(
                    "SELECT attempt, outcome, error FROM domain_export_attempts \
                     WHERE export_id = $1 ORDER BY id",
                )
                .bind(id)
                .fetch_all(conn)
                .await
            })
            .await
            .unwrap()
    }

    pub(crate) async fn row(&self, id: Uuid) -> ExportRow {
        get_any(&self.db, id).await.unwrap().unwrap()
    }

    pub(crate) async fn finish(mut self) {
        self.db.close(Duration::from_secs(5)).await.unwrap();
        if let Some(tdb) = self.tdb.take() {
            tdb.drop_database().await.unwrap();
        }
    }
}

pub(crate) async fn add_domain(db: &Database, org: Uuid, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    db.run(async |conn| {
        sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(org)
            .bind(name)
            .execute(conn)
            .await
    })
    .await
    .unwrap();
    id
}

pub(crate) fn new_export(format: ExportFormat) -> NewExport {
    NewExport {
        format,
        include_content: true,
        include_keywords: false,
        include_analytics: true,
        date_from: None,
        date_to: None,
    }
}

/// A completion of the claim `fence` (its own file name).
pub(crate) fn completed(fence: Fence) -> Completed {
    Completed {
        storage_path: crate::jobs::paths::file_name(fence.id, fence.token, "json"),
        size_bytes: 2,
        record_count: 0,
        checksum_sha256: "0".repeat(64),
        expires_at: Utc::now() + chrono::Duration::hours(1),
    }
}

/// Claims exactly one job, the one expected.
async fn claim_one(f: &Fixture, worker: &str) -> ClaimedJob {
    let mut jobs = claim(&f.db, worker, 10, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs.remove(0)
}

#[tokio::test]
async fn enqueue_is_org_scoped_and_notifies_idle_workers() {
    let f = Fixture::new().await;
    let mut listener = PgListener::connect_with(f.db.primary()).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();

    let row = f.enqueue(ExportFormat::Csv).await;
    assert_eq!(row.status, "queued");
    assert_eq!(row.format, "csv");
    assert_eq!((row.attempts, row.max_attempts), (0, 3));
    assert!(!row.include_keywords && row.include_content);
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap();
    assert_eq!(note.channel(), CHANNEL);
    assert_eq!(note.payload(), row.id.to_string());

    // Another org's domain (and an unknown one) queues nothing.
    let other = crate::auth::create_org(&f.db, "other").await.unwrap();
    let theirs = add_domain(&f.db, other, "theirs.example.com").await;
    let new = new_export(ExportFormat::Json);
    assert!(enqueue(&f.db, f.org, theirs, &new).await.unwrap().is_none());
    assert!(
        enqueue(&f.db, f.org, Uuid::new_v4(), &new)
            .await
            .unwrap()
            .is_none()
    );
    assert!(get(&f.db, other, row.id).await.unwrap().is_none());
    assert_eq!(get(&f.db, f.org, row.id).await.unwrap().unwrap().id, row.id);
    drop(listener);
    f.finish().await;
}

#[tokio::test]
async fn two_concurrent_claimers_never_take_the_same_job() {
    let f = Fixture::new().await;
    let mut ids = HashSet::new();
    for _ in 0..40 {
        ids.insert(f.enqueue(ExportFormat::Json).await.id);
    }
    let claimer = |worker: &'static str| {
        let db = f.db.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let jobs = claim(&db, worker, 3, LEASE).await.unwrap();
                if jobs.is_empty() {
                    return mine;
                }
                mine.extend(jobs);
            }
        })
    };
    let (a, b) = tokio::join!(claimer("worker-a"), claimer("worker-b"));
    let all: Vec<ClaimedJob> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    assert_eq!(all.len(), 40, "every job claimed once");
    let claimed: HashSet<Uuid> = all.iter().map(|j| j.fence.id).collect();
    assert_eq!(claimed, ids, "no job claimed twice, none missed");
    for job in &all {
        assert_eq!(job.attempt, 1);
        assert_eq!(job.fence.token, 1);
        assert_eq!(job.spec.id, job.fence.id);
        assert_eq!(job.spec.org_id, f.org);
        assert_eq!(job.spec.format, ExportFormat::Json);
    }
    let counts: (i64, i64) =
        f.db.run(async |conn| {
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM domain_exports WHERE status = 'running'), \
                 (SELECT count(*) FROM domain_export_attempts WHERE outcome = 'running')",
            )
            .fetch_one(conn)
            .await
        })
        .await
        .unwrap();
    assert_eq!(counts, (40, 40), "one attempt row per claim");
    let stats = stats(&f.db).await.unwrap();
    assert_eq!((stats.queued, stats.running), (0, 40));
    f.finish().await;
}

#[tokio::test]
async fn a_claim_skips_jobs_not_yet_due_and_each_claim_has_its_own_token() {
    let f = Fixture::new().await;
    let later = f.enqueue(ExportFormat::Json).await;
    let now = f.enqueue(ExportFormat::Markdown).await;
    f.exec(
        "UPDATE domain_exports SET run_after = now() + interval '1 hour' WHERE id = $1",
        later.id,
    )
    .await;
    f.exec(
        "UPDATE domain_exports SET run_after = now() - interval '60 seconds' WHERE id = $1",
        now.id,
    )
    .await;
    let stats_before = stats(&f.db).await.unwrap();
    assert_eq!(stats_before.queued, 2);
    // The due job has waited 60 s.
    let age = stats_before.oldest_queued_age_secs;
    assert!((55.0..120.0).contains(&age), "oldest due job's age {age}");

    let first = claim_one(&f, "w1").await;
    assert_eq!(first.fence.id, now.id, "the job due later is skipped");
    assert_eq!((first.attempt, first.max_attempts), (1, 3));
    assert_eq!(first.spec.format, ExportFormat::Markdown);
    assert!(claim(&f.db, "w1", 10, LEASE).await.unwrap().is_empty());
    // Only the job due in an hour is queued: it is not waiting, so no age.
    let stats_after = stats(&f.db).await.unwrap();
    assert_eq!((stats_after.queued, stats_after.running), (1, 1));
    assert_eq!(stats_after.oldest_queued_age_secs, 0.0);

    // Retried at once: the next claim is attempt 2 with a new token, and only it writes.
    let outcome = fail(&f.db, first.fence, "database timeout", Some(Duration::ZERO))
        .await
        .unwrap();
    assert!(matches!(outcome, FailOutcome::Retried { .. }));
    let second = claim_one(&f, "w2").await;
    assert_eq!(second.fence.id, now.id);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.fence.token, first.fence.token);
    assert!(second.fence.token > first.fence.token);
    assert!(matches!(
        heartbeat(&f.db, first.fence, LEASE, None).await,
        Err(FenceError::Fenced(id)) if id == now.id
    ));
    heartbeat(&f.db, second.fence, LEASE, None).await.unwrap();
    f.finish().await;
}

#[tokio::test]
async fn the_claim_uses_the_partial_index_of_due_jobs() {
    let f = Fixture::new().await;
    // Many finished rows and a few queued: the partial index is the plan a real queue gets.
    let org = f.org;
    let domain = f.domain;
    f.db.run(async |conn| {
        sqlx::query(
            "INSERT INTO domain_exports (id, org_id, domain_id, format, status, finished_at) \
             SELECT gen_random_uuid(), $1, $2, 'json', 'cancelled', now() \
             FROM generate_series(1, 5000)",
        )
        .bind(org)
        .bind(domain)
        .execute(&mut *conn)
        .await?;
        sqlx::query("ANALYZE domain_exports")
            .execute(&mut *conn)
            .await
    })
    .await
    .unwrap();
    for _ in 0..3 {
        f.enqueue(ExportFormat::Csv).await;
    }
    let plan: Vec<String> =
        f.db.run(async |conn| {
            sqlx::query_scalar(&format!("EXPLAIN {CLAIM_SQL}"))
                .bind(5_i64)
                .bind("explain")
                .bind(30.0_f64)
                .fetch_all(conn)
                .await
        })
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("domain_exports_claim_idx"),
        "the claim must scan domain_exports_claim_idx:\n{plan}"
    );
    f.finish().await;
}

#[tokio::test]
async fn after_a_cancel_every_write_with_the_old_token_is_fenced_and_changes_nothing() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Json).await;
    let job = claim_one(&f, "w").await;
    heartbeat(
        &f.db,
        job.fence,
        LEASE,
        Some(Progress {
            rows_written: 7,
            percent: 40,
        }),
    )
    .await
    .unwrap();
    let running = f.row(row.id).await;
    assert_eq!((running.progress, running.rows_written), (40, 7));

    let mut listener = PgListener::connect_with(f.db.primary()).await.unwrap();
    listener.listen(CANCEL_CHANNEL).await.unwrap();
    let CancelOutcome::Cancelled(cancelled) = cancel(&f.db, f.org, row.id).await.unwrap() else {
        panic!("a running job is cancellable");
    };
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the worker running it is told at once")
        .unwrap();
    assert_eq!(note.payload(), row.id.to_string());
    drop(listener);
    assert_eq!(cancelled.status, "cancelled");
    assert!(cancelled.finished_at.is_some());
    let token = f.token(row.id).await;
    assert_eq!(token, job.fence.token + 1, "cancel bumps the token");

    let fenced =
        |r: Result<(), FenceError>| matches!(r, Err(FenceError::Fenced(id)) if id == row.id);
    assert!(fenced(heartbeat(&f.db, job.fence, LEASE, None).await));
    assert!(fenced(
        heartbeat(&f.db, job.fence, LEASE, Some(Progress::default())).await
    ));
    assert!(fenced(
        complete(&f.db, job.fence, &completed(job.fence)).await
    ));
    assert!(fenced(
        fail(&f.db, job.fence, "boom", Some(Duration::ZERO))
            .await
            .map(|_| ())
    ));
    assert!(fenced(release(&f.db, job.fence).await));

    let after = f.row(row.id).await;
    assert_eq!(after.status, "cancelled");
    assert_eq!(after.finished_at, cancelled.finished_at);
    assert_eq!((after.progress, after.rows_written), (40, 7));
    assert_eq!(after.error, None);
    assert_eq!(after.attempts, 1);
    assert_eq!(f.token(row.id).await, token, "nothing moved the token");
    assert_eq!(
        f.attempts(row.id).await,
        vec![(1, "cancelled".into(), None)]
    );

    // Cancelling again, or another org's job, or no job.
    assert!(matches!(
        cancel(&f.db, f.org, row.id).await.unwrap(),
        CancelOutcome::NotCancellable(status) if status == "cancelled"
    ));
    let other = crate::auth::create_org(&f.db, "other").await.unwrap();
    assert!(matches!(
        cancel(&f.db, other, row.id).await.unwrap(),
        CancelOutcome::NotFound
    ));
    assert!(matches!(
        cancel(&f.db, f.org, Uuid::new_v4()).await.unwrap(),
        CancelOutcome::NotFound
    ));
    f.finish().await;
}

#[tokio::test]
async fn a_reclaimed_job_fences_the_old_worker_and_the_new_claim_completes_it() {
    let f = Fixture::new().await;
    let mut listener = PgListener::connect_with(f.db.primary()).await.unwrap();
    let row = f.enqueue(ExportFormat::Json).await;
    let old = claim_one(&f, "dead-worker").await;
    assert!(
        reclaim_expired(&f.db, 10).await.unwrap().is_empty(),
        "a live lease is not reclaimed"
    );
    f.exec(
        "UPDATE domain_exports SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        row.id,
    )
    .await;
    listener.listen(CHANNEL).await.unwrap();
    let reclaimed = reclaim_expired(&f.db, 10).await.unwrap();
    assert_eq!(
        reclaimed,
        vec![Reclaimed {
            id: row.id,
            dead_lettered: false
        }]
    );
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a re-queued job wakes the workers")
        .unwrap();
    assert_eq!(note.payload(), row.id.to_string());
    let queued = f.row(row.id).await;
    assert_eq!(queued.status, "queued");
    assert_eq!(queued.finished_at, None);
    assert_eq!(
        queued.error.as_deref(),
        Some("lease expired: the worker stopped heartbeating"),
        "the tenant-visible error names no worker"
    );
    assert_eq!(f.token(row.id).await, old.fence.token + 1);

    assert!(matches!(
        heartbeat(&f.db, old.fence, LEASE, None).await,
        Err(FenceError::Fenced(_))
    ));
    assert!(matches!(
        complete(&f.db, old.fence, &completed(old.fence)).await,
        Err(FenceError::Fenced(_))
    ));
    let new = claim_one(&f, "live-worker").await;
    assert_eq!(new.attempt, 2);
    assert_eq!(new.fence.token, old.fence.token + 2);
    heartbeat(&f.db, new.fence, LEASE, None).await.unwrap();
    let done = completed(new.fence);
    complete(&f.db, new.fence, &done).await.unwrap();
    let succeeded = f.row(row.id).await;
    assert_eq!(succeeded.status, "succeeded");
    assert_eq!(succeeded.progress, 100);
    assert_eq!(succeeded.error, None);
    assert_eq!(succeeded.checksum_sha256.as_deref(), Some(&*"0".repeat(64)));
    assert_eq!(succeeded.record_count, Some(0));
    assert!(succeeded.finished_at.is_some());
    let info = download_info(&f.db, f.org, row.id).await.unwrap().unwrap();
    assert_eq!(info.storage_path.as_deref(), Some(&*done.storage_path));
    assert!(matches!(
        complete(&f.db, new.fence, &done).await,
        Err(FenceError::Fenced(_))
    ));
    assert_eq!(
        f.attempts(row.id).await,
        vec![
            (
                1,
                "reclaimed".into(),
                Some("lease expired: worker dead-worker stopped heartbeating".into())
            ),
            (2, "succeeded".into(), None),
        ]
    );
    drop(listener);
    f.finish().await;
}

#[tokio::test]
async fn a_reclaim_at_max_attempts_dead_letters_the_job() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Csv).await;
    f.exec(
        "UPDATE domain_exports SET max_attempts = 1 WHERE id = $1",
        row.id,
    )
    .await;
    let job = claim_one(&f, "w").await;
    f.exec(
        "UPDATE domain_exports SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        row.id,
    )
    .await;
    let reclaimed = reclaim_expired(&f.db, 10).await.unwrap();
    assert_eq!(
        reclaimed,
        vec![Reclaimed {
            id: row.id,
            dead_lettered: true
        }]
    );
    let failed = f.row(row.id).await;
    assert_eq!(failed.status, "failed");
    assert!(failed.finished_at.is_some());
    assert_eq!(failed.error.as_deref(), Some(LEASE_EXPIRED));
    assert_eq!(f.token(row.id).await, job.fence.token + 1);
    assert!(claim(&f.db, "w", 10, LEASE).await.unwrap().is_empty());
    assert_eq!(
        f.attempts(row.id).await,
        vec![(
            1,
            "reclaimed".into(),
            Some("lease expired: worker w stopped heartbeating".into())
        )]
    );
    f.finish().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_dead_letter_with_every_attempt_recorded() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Json).await;
    let due_now = "UPDATE domain_exports SET run_after = now() WHERE id = $1";
    for attempt in 1..=2 {
        let job = claim_one(&f, "w").await;
        assert_eq!(job.attempt, attempt);
        let outcome = fail(
            &f.db,
            job.fence,
            &format!("timeout {attempt}"),
            Some(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
        let FailOutcome::Retried { run_after } = outcome else {
            panic!("attempt {attempt} of 3 is retried: {outcome:?}");
        };
        assert!(run_after > Utc::now() + chrono::Duration::minutes(59));
        let queued = f.row(row.id).await;
        assert_eq!(queued.status, "queued");
        assert_eq!(queued.run_after, run_after);
        assert_eq!(queued.error, Some(format!("timeout {attempt}")));
        assert_eq!(queued.finished_at, None);
        assert!(
            claim(&f.db, "w", 10, LEASE).await.unwrap().is_empty(),
            "not claimable before its backoff"
        );
        assert_eq!(f.exec(due_now, row.id).await, 1);
    }
    let job = claim_one(&f, "w").await;
    assert_eq!(job.attempt, 3);
    let outcome = fail(&f.db, job.fence, "timeout 3", Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::DeadLettered, "no attempts left");
    let failed = f.row(row.id).await;
    assert_eq!(failed.status, "failed");
    assert_eq!(failed.attempts, 3);
    assert_eq!(failed.error.as_deref(), Some("timeout 3"));
    assert!(failed.finished_at.is_some());
    assert_eq!(
        f.attempts(row.id).await,
        vec![
            (1, "retried".into(), Some("timeout 1".into())),
            (2, "retried".into(), Some("timeout 2".into())),
            (3, "failed".into(), Some("timeout 3".into())),
        ]
    );
    assert!(matches!(
        cancel(&f.db, f.org, row.id).await.unwrap(),
        CancelOutcome::NotCancellable(status) if status == "failed"
    ));

    // Not retryable: failed at the first attempt; the stored error is cleaned.
    let other = f.enqueue(ExportFormat::Csv).await;
    let job = claim_one(&f, "w").await;
    let long = format!("size cap\0{}", "x".repeat(5000));
    assert_eq!(
        fail(&f.db, job.fence, &long, None).await.unwrap(),
        FailOutcome::DeadLettered
    );
    let failed = f.row(other.id).await;
    assert_eq!(failed.status, "failed");
    let error = failed.error.unwrap();
    assert!(error.starts_with("size cap\u{fffd}x"), "{error}");
    assert_eq!(error.chars().count(), MAX_ERROR_CHARS + 1);
    f.finish().await;
}

#[tokio::test]
async fn a_release_gives_the_attempt_back_and_the_job_is_due_at_once() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Markdown).await;
    let job = claim_one(&f, "stopping").await;
    release(&f.db, job.fence).await.unwrap();
    let queued = f.row(row.id).await;
    assert_eq!(queued.status, "queued");
    assert_eq!(queued.attempts, 0, "a release is not a failed attempt");
    assert_eq!(f.token(row.id).await, job.fence.token + 1);
    assert!(matches!(
        release(&f.db, job.fence).await,
        Err(FenceError::Fenced(_))
    ));
    let again = claim_one(&f, "other").await;
    assert_eq!(again.attempt, 1);
    assert_eq!(
        f.attempts(row.id).await,
        vec![(1, "released".into(), None), (1, "running".into(), None)]
    );
    f.finish().await;
}

#[tokio::test]
async fn the_schema_refuses_a_running_row_without_lease_and_a_success_without_checksum() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Json).await;
    let violation = |sql: &'static str| {
        let db = f.db.clone();
        let id = row.id;
        async move {
            let err = db
                .run(async |conn| sqlx::query(sql).bind(id).execute(conn).await)
                .await
                .unwrap_err();
            match err {
                smartbeak_database::DbError::Query(sqlx::Error::Database(e)) => {
                    e.constraint().map(str::to_owned)
                }
                other => panic!("expected a constraint violation, got {other:?}"),
            }
        }
    };
    assert_eq!(
        violation("UPDATE domain_exports SET status = 'running' WHERE id = $1").await,
        Some("domain_exports_running_lease_check".into())
    );
    assert_eq!(
        violation(
            "UPDATE domain_exports SET status = 'succeeded', finished_at = now(), \
             storage_path = replace(id::text, '-', '') || '.json', size_bytes = 1, \
             record_count = 1, \
             expires_at = now() WHERE id = $1"
        )
        .await,
        Some("domain_exports_succeeded_file_check".into())
    );
    assert_eq!(
        violation("UPDATE domain_exports SET status = 'cancelled' WHERE id = $1").await,
        Some("domain_exports_finished_check".into())
    );
    assert_eq!(
        violation("UPDATE domain_exports SET attempts = -1 WHERE id = $1").await,
        Some("domain_exports_attempts_check".into())
    );
    for bad in [
        "UPDATE domain_exports SET storage_path = '../secret' WHERE id = $1",
        "UPDATE domain_exports SET storage_path = replace(id::text, '-', '') || '.txt' \
         WHERE id = $1",
        "UPDATE domain_exports SET storage_path = 'sub/' || replace(id::text, '-', '') \
         || '.csv' WHERE id = $1",
        "UPDATE domain_exports SET storage_path = id::text || '.csv' WHERE id = $1",
        "UPDATE domain_exports SET storage_path = replace(gen_random_uuid()::text, '-', '') \
         || '.csv' WHERE id = $1",
        "UPDATE domain_exports SET storage_path = replace(id::text, '-', '') || '.x.csv' \
         WHERE id = $1",
        "UPDATE domain_exports SET storage_path = replace(id::text, '-', '') || '..csv' \
         WHERE id = $1",
        "UPDATE domain_exports SET storage_path = replace(id::text, '-', '') || '.1/2.csv' \
         WHERE id = $1",
    ] {
        assert_eq!(
            violation(bad).await,
            Some("domain_exports_storage_path_check".into()),
            "{bad}"
        );
    }
    // Both the per-attempt name and the legacy `<id>.<ext>` of rows written before it.
    for name in ["csv", "zip", "json", "md"]
        .into_iter()
        .flat_map(|extension| {
            [
                crate::jobs::paths::file_name(row.id, 3, extension),
                format!("{}.{extension}", row.id.simple()),
            ]
        })
    {
        let set =
            f.db.run(async |conn| {
                sqlx::query("UPDATE domain_exports SET storage_path = $2 WHERE id = $1")
                    .bind(row.id)
                    .bind(&name)
                    .execute(conn)
                    .await
            })
            .await
            .unwrap();
        assert_eq!(set.rows_affected(), 1, "{name}");
    }
    f.finish().await;
}

#[tokio::test]
async fn list_pages_newest_first_with_a_status_filter() {
    let f = Fixture::new().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(f.enqueue(ExportFormat::Json).await.id);
    }
    cancel(&f.db, f.org, ids[1]).await.unwrap();
    let page = list(&f.db, f.org, f.domain, None, None, 3).await.unwrap();
    let page_ids: Vec<Uuid> = page.iter().map(|r| r.id).collect();
    let last = page.last().unwrap();
    let rest = list(
        &f.db,
        f.org,
        f.domain,
        None,
        Some((last.created_at, last.id)),
        3,
    )
    .await
    .unwrap();
    let mut seen: Vec<Uuid> = page_ids
        .into_iter()
        .chain(rest.iter().map(|r| r.id))
        .collect();
    assert_eq!(seen.len(), 5);
    let all = list(&f.db, f.org, f.domain, None, None, 10).await.unwrap();
    assert!(
        all.windows(2)
            .all(|w| (w[0].created_at, w[0].id) > (w[1].created_at, w[1].id)),
        "newest first"
    );
    assert_eq!(seen, all.iter().map(|r| r.id).collect::<Vec<_>>());
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let cancelled = list(&f.db, f.org, f.domain, Some("cancelled"), None, 10)
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    let other = crate::auth::create_org(&f.db, "other").await.unwrap();
    assert!(
        list(&f.db, other, f.domain, None, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    f.finish().await;
}

/// Waits (bounded) until some session of this test's database waits for a lock: the
/// competing statement is blocked on the row the held transaction locked.
async fn wait_for_lock_waiter(db: &Database) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = db
            .run(async |conn| {
                sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE NOT l.granted AND a.datname = current_database()",
                )
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
            "no statement started waiting on the held lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_cancel_overlapping_a_claim_ends_its_attempt_and_tells_the_worker() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Csv).await;
    let mut listener = PgListener::connect_with(f.db.primary()).await.unwrap();
    listener.listen(CANCEL_CHANNEL).await.unwrap();

    // The claim's statement has run (row locked, attempt row inserted) but not committed.
    let mut claim_tx = f.db.begin().await.unwrap();
    let claimed: Vec<Uuid> = claim_tx
        .run(async |conn| {
            sqlx::query_scalar::<_, Uuid>(CLAIM_SQL)
                .bind(1_i64)
                .bind("racing-worker")
                .bind(LEASE.as_secs_f64())
                .fetch_all(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(claimed, vec![row.id]);
    let db = f.db.clone();
    let org = f.org;
    let cancelling = tokio::spawn(async move { cancel(&db, org, row.id).await });
    wait_for_lock_waiter(&f.db).await;
    claim_tx.commit().await.unwrap();

    let outcome = cancelling.await.unwrap().unwrap();
    let CancelOutcome::Cancelled(cancelled) = outcome else {
        panic!("the job was running when the cancel got its lock: {outcome:?}");
    };
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(cancelled.attempts, 1);
    assert_eq!(
        f.attempts(row.id).await,
        vec![(1, "cancelled".into(), None)],
        "the attempt the claim inserted is ended, not left running"
    );
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the worker that claimed it is told on CANCEL_CHANNEL")
        .unwrap();
    assert_eq!(note.channel(), CANCEL_CHANNEL);
    assert_eq!(note.payload(), row.id.to_string());
    // The worker's claim (token 1) is fenced.
    assert!(matches!(
        heartbeat(
            &f.db,
            Fence {
                id: row.id,
                token: 1
            },
            LEASE,
            None
        )
        .await,
        Err(FenceError::Fenced(_))
    ));
    drop(listener);
    f.finish().await;
}

#[tokio::test]
async fn a_cancel_waiting_on_a_completion_finds_the_job_succeeded() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Json).await;
    let job = claim_one(&f, "w").await;
    let done = completed(job.fence);
    let mut complete_tx = f.db.begin().await.unwrap();
    let completed_id: Option<Uuid> = complete_tx
        .run(async |conn| {
            sqlx::query_scalar(COMPLETE_SQL)
                .bind(job.fence.id)
                .bind(job.fence.token)
                .bind(&done.storage_path)
                .bind(done.size_bytes)
                .bind(done.record_count)
                .bind(&done.checksum_sha256)
                .bind(done.expires_at)
                .fetch_optional(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(completed_id, Some(row.id));
    let db = f.db.clone();
    let org = f.org;
    let cancelling = tokio::spawn(async move { cancel(&db, org, row.id).await });
    wait_for_lock_waiter(&f.db).await;
    complete_tx.commit().await.unwrap();

    let outcome = cancelling.await.unwrap().unwrap();
    assert!(
        matches!(&outcome, CancelOutcome::NotCancellable(status) if status == "succeeded"),
        "{outcome:?}"
    );
    let after = f.row(row.id).await;
    assert_eq!(after.status, "succeeded");
    assert_eq!(
        f.token(row.id).await,
        job.fence.token + 1,
        "only the completion bumped it"
    );
    assert_eq!(
        f.attempts(row.id).await,
        vec![(1, "succeeded".into(), None)]
    );
    f.finish().await;
}

#[tokio::test]
async fn a_heartbeat_waiting_on_a_reclaim_is_fenced_and_a_reclaim_skips_a_heartbeating_row() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Markdown).await;
    let job = claim_one(&f, "slow-worker").await;
    let expire =
        "UPDATE domain_exports SET lease_expires_at = now() - interval '1 second' WHERE id = $1";

    // A heartbeat holds the row (lease renewed, not yet committed): the reaper skips it
    // rather than wait, and after the commit the lease is live, so it is not reclaimed.
    f.exec(expire, row.id).await;
    let mut heartbeat_tx = f.db.begin().await.unwrap();
    let renewed = heartbeat_tx
        .run(async |conn| {
            sqlx::query(HEARTBEAT_SQL)
                .bind(job.fence.id)
                .bind(job.fence.token)
                .bind(LEASE.as_secs_f64())
                .bind(None::<i32>)
                .bind(None::<i64>)
                .execute(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(renewed.rows_affected(), 1);
    assert!(reclaim_expired(&f.db, 10).await.unwrap().is_empty());
    heartbeat_tx.commit().await.unwrap();
    assert!(reclaim_expired(&f.db, 10).await.unwrap().is_empty());
    assert_eq!(f.row(row.id).await.status, "running");

    // The reaper holds the row (reclaimed, not yet committed): the heartbeat waits on the
    // row lock, then finds the token moved.
    f.exec(expire, row.id).await;
    let mut reclaim_tx = f.db.begin().await.unwrap();
    let reclaimed: Vec<Uuid> = reclaim_tx
        .run(async |conn| {
            sqlx::query_scalar(RECLAIM_SQL)
                .bind(10_i64)
                .bind(CHANNEL)
                .bind(LEASE_EXPIRED)
                .fetch_all(conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(reclaimed, vec![row.id]);
    let db = f.db.clone();
    let fence = job.fence;
    let beating = tokio::spawn(async move { heartbeat(&db, fence, LEASE, None).await });
    wait_for_lock_waiter(&f.db).await;
    reclaim_tx.commit().await.unwrap();
    assert!(matches!(
        beating.await.unwrap(),
        Err(FenceError::Fenced(id)) if id == row.id
    ));
    let queued = f.row(row.id).await;
    assert_eq!(queued.status, "queued");
    assert_eq!(f.token(row.id).await, job.fence.token + 1);
    assert_eq!(
        f.attempts(row.id).await,
        vec![(
            1,
            "reclaimed".into(),
            Some("lease expired: worker slow-worker stopped heartbeating".into())
        )]
    );
    f.finish().await;
}

#[tokio::test]
async fn a_retry_due_at_once_wakes_idle_workers() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Json).await;
    let job = claim_one(&f, "w").await;
    let mut listener = PgListener::connect_with(f.db.primary()).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    let outcome = fail(&f.db, job.fence, "database timeout", Some(Duration::ZERO))
        .await
        .unwrap();
    assert!(matches!(outcome, FailOutcome::Retried { .. }));
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a re-queued job is notified")
        .unwrap();
    assert_eq!(note.channel(), CHANNEL);
    assert_eq!(note.payload(), row.id.to_string());
    drop(listener);
    f.finish().await;
}

#[tokio::test]
async fn complete_refuses_a_storage_path_that_is_not_the_jobs_own_file() {
    let f = Fixture::new().await;
    let row = f.enqueue(ExportFormat::Csv).await;
    let job = claim_one(&f, "w").await;
    let token = job.fence.token;
    for bad in [
        "../secret".to_owned(),
        "/etc/passwd".to_owned(),
        crate::jobs::paths::file_name(row.id, token, "exe"),
        crate::jobs::paths::file_name(Uuid::new_v4(), token, "csv"),
        format!(
            "sub/{}",
            crate::jobs::paths::file_name(row.id, token, "csv")
        ),
        // Another attempt's file, and the legacy name: well-formed, not this claim's.
        crate::jobs::paths::file_name(row.id, token + 1, "csv"),
        format!("{}.csv", row.id.simple()),
    ] {
        let done = Completed {
            storage_path: bad.clone(),
            ..completed(job.fence)
        };
        match complete(&f.db, job.fence, &done).await {
            Err(FenceError::ForeignFile { id, path }) => {
                assert_eq!((id, path.as_str()), (row.id, bad.as_str()));
            }
            other => panic!("{bad}: expected ForeignFile, got {other:?}"),
        }
    }
    assert_eq!(f.row(row.id).await.status, "running", "nothing recorded");
    // The schema refuses a malformed name even from a statement of its own.
    let refused =
        f.db.run(async |conn| {
            sqlx::query("UPDATE domain_exports SET storage_path = '../secret' WHERE id = $1")
                .bind(row.id)
                .execute(conn)
                .await
        })
        .await;
    match refused {
        Err(smartbeak_database::DbError::Query(sqlx::Error::Database(e))) => {
            assert_eq!(e.constraint(), Some("domain_exports_storage_path_check"));
        }
        other => panic!("expected the storage path CHECK, got {other:?}"),
    }
    let done = Completed {
        storage_path: crate::jobs::paths::file_name(row.id, token, "zip"),
        ..completed(job.fence)
    };
    complete(&f.db, job.fence, &done).await.unwrap();
    f.finish().await;
}

#[tokio::test]
async fn every_list_shape_scans_the_cursor_index_from_the_cursor_even_in_a_generic_plan() {
    let f = Fixture::new().await;
    let org = f.org;
    let domain = f.domain;
    let other = add_domain(&f.db, org, "other.example.com").await;
    f.db.run(async |conn| {
        sqlx::query(
            "INSERT INTO domain_exports (id, org_id, domain_id, format, status, finished_at, \
                 created_at) \
             SELECT gen_random_uuid(), $1, CASE WHEN i % 10 = 0 THEN $2 ELSE $3 END, 'json', \
                 'cancelled', now(), now() - i * interval '1 second' \
             FROM generate_series(1, 20000) i",
        )
        .bind(org)
        .bind(domain)
        .bind(other)
        .execute(&mut *conn)
        .await?;
        sqlx::query("ANALYZE domain_exports")
            .execute(&mut *conn)
            .await
    })
    .await
    .unwrap();
    for (with_status, with_cursor) in [(false, false), (true, false), (false, true), (true, true)] {
        let sql = list_sql(with_status, with_cursor);
        let mut types = vec!["uuid", "uuid", "bigint"];
        if with_status {
            types.push("text");
        }
        if with_cursor {
            types.extend(["timestamptz", "uuid"]);
        }
        let mut args = vec![format!("'{domain}'"), format!("'{org}'"), "51".to_owned()];
        if with_status {
            args.push("'cancelled'".into());
        }
        if with_cursor {
            args.extend([
                "now() - interval '1 hour'".to_owned(),
                format!("'{}'", Uuid::max()),
            ]);
        }
        let mut conn = f.db.acquire().await.unwrap();
        let plan = smartbeak_database::testing::explain_generic(&mut conn, &sql, &types, &args)
            .await
            .unwrap();
        assert!(
            plan.contains("domain_exports_domain_cursor_idx"),
            "({with_status}, {with_cursor}) must scan the cursor index:\n{plan}"
        );
        if with_cursor {
            let index_cond = plan
                .lines()
                .find(|l| l.contains("Index Cond"))
                .unwrap_or_default();
            assert!(
                index_cond.contains("created_at"),
                "the cursor must be in the index condition:\n{plan}"
            );
        }
    }
    f.finish().await;
}

#[tokio::test]
async fn the_retention_pages_scan_the_expiry_index_from_the_keyset_even_in_a_generic_plan() {
    let f = Fixture::new().await;
    let (org, domain) = (f.org, f.domain);
    // 20,000 exports, one in ten a stored file (so in the partial expiry index), expiring
    // over the last and the next few hours; fresh statistics.
    f.db.run(async |conn| {
        sqlx::query(
            "INSERT INTO domain_exports (id, org_id, domain_id, format, status, finished_at, \
                 storage_path, size_bytes, record_count, checksum_sha256, expires_at) \
             SELECT u, $1, $2, 'json', s, now(), \
                 CASE WHEN s = 'succeeded' THEN replace(u::text, '-', '') || '.json' END, \
                 CASE WHEN s = 'succeeded' THEN 1 END, CASE WHEN s = 'succeeded' THEN 1 END, \
                 CASE WHEN s = 'succeeded' THEN repeat('a', 64) END, \
                 now() + (i - 10000) * interval '1 second' \
             FROM (SELECT gen_random_uuid() AS u, i, \
                       CASE WHEN i % 10 = 0 THEN 'succeeded' ELSE 'cancelled' END AS s \
                   FROM generate_series(1, 20000) i) g",
        )
        .bind(org)
        .bind(domain)
        .execute(&mut *conn)
        .await?;
        sqlx::query("ANALYZE domain_exports")
            .execute(&mut *conn)
            .await
    })
    .await
    .unwrap();
    for with_after in [false, true] {
        let sql = retention::due_sql(with_after);
        let mut types = vec!["timestamptz", "bigint"];
        let mut args = vec!["now()".to_owned(), "100".to_owned()];
        if with_after {
            types.extend(["timestamptz", "uuid"]);
            args.extend([
                "now() - interval '10 minutes'".to_owned(),
                format!("'{}'", Uuid::nil()),
            ]);
        }
        let mut conn = f.db.acquire().await.unwrap();
        let plan = smartbeak_database::testing::explain_generic(&mut conn, &sql, &types, &args)
            .await
            .unwrap();
        drop(conn);
        assert!(
            plan.contains("domain_exports_expiry_idx"),
            "(keyset: {with_after}) must scan the expiry index:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{plan}");
        let index_cond = plan
            .lines()
            .filter(|l| l.contains("Index Cond"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            index_cond.contains("expires_at <= $1"),
            "the due bound in the index condition:\n{plan}"
        );
        assert_eq!(
            index_cond.contains("expires_at >= $3"),
            with_after,
            "the keyset starts the scan (and only on a next page):\n{plan}"
        );
    }
    f.finish().await;
}
