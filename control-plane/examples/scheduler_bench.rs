//! The content-scheduler benchmark (docs/bench/HISTORY.md, "Control-plane"): throughput over
//! 100,000 due items at batch sizes 10, 100 and 1,000 and concurrency 1, 4 and 16, with 0 %
//! and 1 % failing items, beside a single `UPDATE ... WHERE status = 'scheduled' AND
//! publish_at <= now()` on the same rows (the physical anchor, no isolation).
//!
//! A fresh database (`TestDatabase`, `DATABASE_URL`); the rows are rebuilt before every
//! measurement (TRUNCATE, insert, VACUUM ANALYZE) so no run pays for another's dead tuples.
//! Run once, in release:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release -p smartbeak-control-plane --example scheduler_bench [ITEMS] [--bisect] \
//!     [--cells PCT:BATCH:CONCURRENCY,...] [--json FILE]
//! ```
//!
//! `--cells 0:1000:4,1:1000:4` runs only those cells (failing percent, batch size,
//! concurrency; savepoint isolation) instead of the matrix, beside the same anchors;
//! `--json FILE` writes the anchors and every cell for `cargo xtask bench`.
//!
//! The issue's matrix is 0 % and 1 % failing with the default isolation (savepoints);
//! `--bisect` adds the 1 % group again with `Isolation::Bisect` for comparison. Each row is
//! printed as soon as it is measured (its ratio against the first anchor), and the table
//! against the median of all anchors at the end.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use smartbeak_control_plane::operations::content_scheduler::{ContentScheduler, Isolation};
use smartbeak_control_plane::runner::{
    DEFAULT_PAGE_SIZE, Mode, RunContext, RunOptions, RunOutcome, run_once,
};
use smartbeak_database::Database;
use smartbeak_database::testing::TestDatabase;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn seed(admin: &PgPool, domain: Uuid, n: i64, failing_every: Option<i64>) {
    sqlx::query("TRUNCATE batch_run_items, batch_runs, content_items CASCADE")
        .execute(admin)
        .await
        .unwrap();
    let bad = failing_every.map_or("false".to_owned(), |k| format!("i % {k} = {}", k / 2));
    sqlx::query(&format!(
        "INSERT INTO content_items (id, domain_id, title, slug, status, publish_at) \
         SELECT gen_random_uuid(), $1, CASE WHEN {bad} THEN 'bad ' || i ELSE 'good ' || i END, \
         'item-' || i, 'scheduled', now() - make_interval(secs => $2 - i) \
         FROM generate_series(0, $2 - 1) AS i"
    ))
    .bind(domain)
    .bind(n)
    .execute(admin)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE content_items")
        .execute(admin)
        .await
        .unwrap();
}

async fn anchor(admin: &PgPool, domain: Uuid, n: i64) -> f64 {
    seed(admin, domain, n, None).await;
    let started = Instant::now();
    let done = sqlx::query(
        "UPDATE content_items SET status = 'published', published_at = now(), updated_at = now() \
         WHERE status = 'scheduled' AND publish_at <= now()",
    )
    .execute(admin)
    .await
    .unwrap();
    assert_eq!(done.rows_affected() as i64, n);
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bisect = args.iter().any(|a| a == "--bisect");
    let value_of = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        })
    };
    let json = value_of("--json");
    let cells = value_of("--cells");
    let n: i64 = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            let is_value = *i > 0 && matches!(args[i - 1].as_str(), "--json" | "--cells");
            !(a.starts_with("--") || is_value)
        })
        .map_or(100_000, |(_, a)| a.parse().expect("ITEMS is a number"));
    // Groups of cells with the same failing share and isolation, each followed by an anchor.
    type Group = (Option<i64>, Isolation, Vec<(usize, usize)>);
    let matrix: Vec<(usize, usize)> = [10, 100, 1_000]
        .into_iter()
        .flat_map(|b| [1, 4, 16].into_iter().map(move |c| (b, c)))
        .collect();
    let mut cases: Vec<Group> = Vec::new();
    if let Some(cells) = &cells {
        for cell in cells.split(',').filter(|c| !c.is_empty()) {
            let parts: Vec<usize> = cell
                .split(':')
                .map(|p| p.parse().expect("--cells: PCT:BATCH:CONCURRENCY, numbers"))
                .collect();
            let [pct, batch, concurrency] = parts[..] else {
                panic!("--cells {cell:?}: PCT:BATCH:CONCURRENCY");
            };
            assert!(
                pct == 0 || 100 % pct == 0,
                "--cells {cell:?}: the failing percent divides 100"
            );
            let failing = (pct > 0).then(|| 100 / pct as i64);
            match cases.last_mut() {
                Some((f, _, cells)) if *f == failing => cells.push((batch, concurrency)),
                _ => cases.push((failing, Isolation::Savepoints, vec![(batch, concurrency)])),
            }
        }
    } else {
        cases.push((None, Isolation::Savepoints, matrix.clone()));
        cases.push((Some(100), Isolation::Savepoints, matrix.clone()));
        if bisect {
            cases.push((Some(100), Isolation::Bisect, matrix));
        }
    }
    let tdb = TestDatabase::create().await.unwrap();
    let mut config = tdb.config();
    config.pool_max = 20;
    let db = Database::connect(config, "scheduler-bench").await.unwrap();
    let admin = PgPool::connect(tdb.url().expose()).await.unwrap();
    let org = Uuid::new_v4();
    let domain = Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'bench')")
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("INSERT INTO domains (id, org_id, name) VALUES ($1, $2, 'bench.example')")
        .bind(domain)
        .bind(org)
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(
        "ALTER TABLE content_items ADD CONSTRAINT bench_no_bad_published \
         CHECK (status <> 'published' OR title NOT LIKE 'bad %') NOT VALID",
    )
    .execute(&admin)
    .await
    .unwrap();
    let ctx = RunContext {
        db: db.clone(),
        runner: "bench".into(),
        heartbeat: Duration::from_secs(5),
        stale_after: Duration::from_secs(60),
        cancel: CancellationToken::new(),
        page_size: DEFAULT_PAGE_SIZE,
        drain: None,
    };

    let mut anchors = vec![anchor(&admin, domain, n).await];
    println!("items: {n}");
    println!("single UPDATE (anchor): {:.0} items/s", anchors[0]);
    println!("| failing | isolation | batch | concurrency | items/s | vs anchor |");
    let mut results = Vec::new();
    for (failing, isolation, cells) in cases {
        let op = ContentScheduler::with_isolation(db.clone(), isolation);
        for (batch_size, concurrency) in cells {
            seed(&admin, domain, n, failing).await;
            let options = RunOptions {
                batch_size,
                concurrency: NonZeroUsize::new(concurrency).unwrap(),
                mode: Mode::SettleAll,
                dry_run: false,
            };
            let started = Instant::now();
            let RunOutcome::Ran(report) = run_once(&op, &ctx, options, None).await.unwrap() else {
                panic!("not run");
            };
            let rate = n as f64 / started.elapsed().as_secs_f64();
            let expected_failed = failing.map_or(0, |k| n / k) as u64;
            // An unexpected failure (a statement timeout on a loaded machine) is printed
            // with its first error and the row marked, not a panic that loses the run.
            let unexpected =
                report.failed != expected_failed || report.succeeded != n as u64 - expected_failed;
            if unexpected {
                let first = report
                    .failures
                    .iter()
                    .find(|f| !f.error.error.contains("bench_no_bad_published"))
                    .map_or("-", |f| f.error.error.as_str());
                println!(
                    "UNEXPECTED: {} (first unexpected error: {first})",
                    report.summary()
                );
            }
            println!(
                "measured: failing {} {isolation:?} batch {batch_size} concurrency \
                     {concurrency}: {rate:.0} items/s ({:.2}x the first anchor){}",
                if failing.is_some() { "1 %" } else { "0 %" },
                rate / anchors[0],
                if unexpected {
                    " UNEXPECTED FAILURES"
                } else {
                    ""
                }
            );
            results.push((
                failing,
                isolation,
                batch_size,
                concurrency,
                rate,
                unexpected,
            ));
        }
        anchors.push(anchor(&admin, domain, n).await);
        println!("anchor: {:.0} items/s", anchors[anchors.len() - 1]);
    }
    let measured = anchors.clone();
    anchors.sort_by(f64::total_cmp);
    let anchor_rate = anchors[anchors.len() / 2];
    println!("anchors measured: {anchors:.0?}; median {anchor_rate:.0} items/s");
    if let Some(path) = &json {
        let cells: Vec<serde_json::Value> = results
            .iter()
            .map(
                |(failing, isolation, batch, concurrency, rate, unexpected)| {
                    serde_json::json!({
                        "failing_pct": failing.map_or(0, |k| 100 / k),
                        "isolation": format!("{isolation:?}"),
                        "batch": batch, "concurrency": concurrency,
                        "items_per_s": rate, "unexpected_failures": unexpected,
                    })
                },
            )
            .collect();
        let json = serde_json::json!({
            "items": n, "anchors_items_per_s": measured, "anchor_median_items_per_s": anchor_rate,
            "cells": cells,
        });
        std::fs::write(path, format!("{json:#}\n")).expect("writing --json FILE");
    }
    for (failing, isolation, batch_size, concurrency, rate, _) in results {
        println!(
            "| {} | {} | {batch_size} | {concurrency} | {rate:.0} | {:.2}x |",
            if failing.is_some() { "1 %" } else { "0 %" },
            match (failing, isolation) {
                (None, _) => "(none needed)",
                (Some(_), Isolation::Savepoints) => "savepoints",
                (Some(_), Isolation::Bisect) => "bisect",
            },
            rate / anchor_rate
        );
    }
    db.close(Duration::from_secs(5)).await.unwrap();
    admin.close().await;
    tdb.drop_database().await.unwrap();
}
