//! Criterion sections: the breaker (beside failsafe), single-flight (beside moka's
//! `get_with`) and bounded concurrency (beside `buffer_unordered`). Each runs one criterion
//! bench with `CRITERION_HOME` under `target/bench` and reads its estimates.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::model::{Figure, Row, Section, Table, Target};
use super::{Ctx, Estimate, criterion_estimate, median, read_json, run};

/// Runs `cargo bench --profile release --workspace --bench <bench>` (short measurements under `--quick`);
/// returns the criterion home it wrote to (one per bench, emptied before the run).
fn criterion(
    ctx: &Ctx<'_>,
    section: &mut Section,
    bench: &str,
    env: &[(&str, String)],
) -> Result<PathBuf> {
    // A home of this bench's own, emptied first: every estimate read comes from this run
    // (criterion keeps earlier runs' `new/estimates.json`, also of benches since renamed).
    let home = ctx.out.join("criterion").join(bench);
    if home.exists() {
        std::fs::remove_dir_all(&home).with_context(|| format!("emptying {}", home.display()))?;
    }
    let mut command = Command::new("cargo");
    command.env("CRITERION_HOME", &home);
    for (key, value) in env {
        command.env(key, value);
    }
    // `--workspace`, not `-p`: the features (and so the artifacts) of the release build.
    command.args([
        "bench",
        "--profile",
        "release",
        "--workspace",
        "--bench",
        bench,
    ]);
    command.args(["--", "--noplot"]);
    if ctx.quick {
        command.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
    }
    run(ctx, section, bench, command)?;
    Ok(home)
}

fn note_estimates(section: &mut Section, quick: bool) {
    section.notes.push(format!(
        "Figures are criterion's median point estimates (the mean is in the extra table), \
         every benchmark of a group in the same process, one after another{}.",
        if quick {
            "; --quick: 0.5 s warm-up and 1 s measurement per benchmark"
        } else {
            "; criterion's default warm-up (3 s) and measurement (5 s) times"
        }
    ));
}

/// A table of every estimate read: group, benchmark, median and mean.
fn estimates_table(caption: &str, estimates: &[(String, String, Estimate)]) -> Table {
    Table {
        caption: caption.to_owned(),
        header: ["group", "benchmark", "median (ns)", "mean (ns)"]
            .map(str::to_owned)
            .to_vec(),
        rows: estimates
            .iter()
            .map(|(group, bench, e)| {
                vec![
                    group.clone(),
                    bench.clone(),
                    super::report::number(e.median_ns),
                    super::report::number(e.mean_ns),
                ]
            })
            .collect(),
    }
}

/// Reads every `(group, bench)`; keeps them for the extra table.
fn read_all(
    home: &std::path::Path,
    wanted: &[(&str, &str)],
) -> Result<Vec<(String, String, Estimate)>> {
    wanted
        .iter()
        .map(|(group, bench)| {
            criterion_estimate(home, group, bench)
                .map(|e| ((*group).to_owned(), (*bench).to_owned(), e))
        })
        .collect()
}

fn find(estimates: &[(String, String, Estimate)], group: &str, bench: &str) -> Result<Estimate> {
    estimates
        .iter()
        .find(|(g, b, _)| g == group && b == bench)
        .map(|(_, _, e)| *e)
        .with_context(|| format!("no criterion estimate for {group}/{bench}"))
}

pub(crate) fn breaker(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new("breaker", "Circuit breaker: hot paths beside failsafe");
    let home = criterion(ctx, &mut section, "breaker", &[])?;
    let wanted = [
        ("closed_call", "smartbeak"),
        ("closed_call", "failsafe_consecutive"),
        ("closed_call", "failsafe"),
        ("closed_call_2_threads", "smartbeak"),
        ("closed_call_2_threads", "failsafe_consecutive"),
        ("closed_call_2_threads", "failsafe"),
        ("open_rejection", "smartbeak"),
        ("open_rejection", "failsafe_consecutive"),
        ("open_rejection", "failsafe"),
        ("registry_get_hit", "smartbeak"),
        ("registry_get_hit", "rwlock_hashmap"),
        ("clock_read", "system_clock_quanta"),
        ("clock_read", "std_instant_now"),
    ];
    let estimates = read_all(&home, &wanted)?;
    let ns = |group: &str, bench: &str| -> Result<Figure> {
        Ok(Figure::new(find(&estimates, group, bench)?.median_ns, "ns"))
    };
    for (group, what) in [
        ("closed_call", "closed call"),
        (
            "closed_call_2_threads",
            "closed call, 2 threads on one breaker",
        ),
        ("open_rejection", "open: rejection"),
    ] {
        for (anchor, anchor_name) in [
            (
                "failsafe_consecutive",
                "failsafe 1.3, ConsecutiveFailures only",
            ),
            ("failsafe", "failsafe 1.3, default policy"),
        ] {
            section.rows.push(Row::new(
                what,
                anchor_name,
                ns(group, "smartbeak")?,
                ns(group, anchor)?,
                false,
            ));
        }
    }
    section.rows.push(Row::new(
        "registry hit (BreakerRegistry::get)",
        "RwLock<HashMap> of the same keys",
        ns("registry_get_hit", "smartbeak")?,
        ns("registry_get_hit", "rwlock_hashmap")?,
        false,
    ));
    section.tables.push(estimates_table(
        "Every estimate read (nanoseconds per call):",
        &estimates,
    ));
    note_estimates(&mut section, ctx.quick);
    section.notes.push(
        "The futures are ready and polled once with a no-op waker: the figures are the \
         wrapper's own cost. No target was set for these; the ratio says how far from the \
         anchor ours is (below 1: faster)."
            .to_owned(),
    );
    Ok(section)
}

/// What the single-flight bench writes to `SINGLEFLIGHT_COUNTS_JSON`.
#[derive(Deserialize)]
struct Counts {
    callers: u64,
    keys: u64,
    singleflight: Vec<u64>,
    singleflight_with_cache: Vec<u64>,
    moka_get_with: Vec<u64>,
}

pub(crate) fn singleflight(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new(
        "singleflight",
        "Single-flight: a burst of 10,000 callers over 100 keys beside moka's get_with",
    );
    let counts_path = ctx.out.join("singleflight-counts.json");
    let _ = std::fs::remove_file(&counts_path);
    let home = criterion(
        ctx,
        &mut section,
        "singleflight",
        &[(
            "SINGLEFLIGHT_COUNTS_JSON",
            counts_path.to_string_lossy().into_owned(),
        )],
    )?;
    let counts: Counts = read_json(&counts_path)?;
    let as_f64 = |v: &[u64]| v.iter().map(|&c| c as f64).collect::<Vec<_>>();
    let ours = median(&as_f64(&counts.singleflight));
    let moka = median(&as_f64(&counts.moka_get_with));
    let cached = median(&as_f64(&counts.singleflight_with_cache));
    // Like for like: moka's get_with is coalescing over a cache, so the row with a target
    // is SingleFlight over the same moka cache. SingleFlight alone coalesces only callers
    // that overlap a flight (a caller after the flight ends computes again): shown, no
    // target.
    section.rows.push(
        Row::new(
            "computations per burst, SingleFlight + moka cache",
            "moka get_with",
            Figure::new(cached, "computations"),
            Figure::new(moka, "computations"),
            false,
        )
        .with_target(Target::at_most(1.0)),
    );
    section.rows.push(
        Row::new(
            "computations per burst, SingleFlight + moka cache",
            "one per caller (no coalescing)",
            Figure::new(cached, "computations"),
            Figure::new(counts.callers as f64, "computations"),
            false,
        )
        .with_target(Target::at_most(0.05)),
    );
    section.rows.push(Row::new(
        "computations per burst, SingleFlight alone (no cache)",
        "one per caller (no coalescing)",
        Figure::new(ours, "computations"),
        Figure::new(counts.callers as f64, "computations"),
        false,
    ));
    let group = "burst_10000_callers_100_keys";
    let wanted = [
        (group, "singleflight"),
        (group, "singleflight_with_cache"),
        (group, "moka_get_with"),
    ];
    let estimates = read_all(&home, &wanted)?;
    let ms = |bench: &str| -> Result<Figure> {
        Ok(Figure::new(
            find(&estimates, group, bench)?.median_ns / 1e6,
            "ms",
        ))
    };
    section.rows.push(Row::new(
        "time to serve the burst, SingleFlight",
        "moka get_with",
        ms("singleflight")?,
        ms("moka_get_with")?,
        false,
    ));
    section.rows.push(Row::new(
        "time to serve the burst, SingleFlight + moka cache",
        "moka get_with",
        ms("singleflight_with_cache")?,
        ms("moka_get_with")?,
        false,
    ));
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    section.tables.push(Table {
        caption: format!(
            "Computations per burst of {} callers over {} keys (5 bursts, each on fresh state; \
             the rows use the median):",
            counts.callers, counts.keys
        ),
        header: ["variant", "computations per burst", "median"]
            .map(str::to_owned)
            .to_vec(),
        rows: vec![
            vec![
                "SingleFlight (no cache)".into(),
                list(&counts.singleflight),
                super::report::number(ours),
            ],
            vec![
                "SingleFlight + moka cache".into(),
                list(&counts.singleflight_with_cache),
                super::report::number(cached),
            ],
            vec![
                "moka get_with".into(),
                list(&counts.moka_get_with),
                super::report::number(moka),
            ],
        ],
    });
    section.tables.push(estimates_table(
        "Every estimate read (nanoseconds per burst):",
        &estimates,
    ));
    note_estimates(&mut section, ctx.quick);
    section.notes.push(format!(
        "Each computation sleeps 1 ms (a backend round trip). moka's get_with coalesces \
         callers over a cache, so the like-for-like comparison is SingleFlight over the same \
         moka cache (the first row: no more computations than get_with). The original \
         claimed redundant computations down ~95%: the second row's anchor is one \
         computation per caller (what no coalescing runs, {} here, the bench's caller count \
         rather than a measurement), so its target is at most 0.05x; the ideal is one per key \
         ({}). SingleFlight alone (third row) shares a computation only among callers that \
         arrive while it runs: callers of the same key after it ends start another, which is \
         what the cache in front of it is for.",
        counts.callers, counts.keys
    ));
    Ok(section)
}

pub(crate) fn bounded(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new(
        "bounded",
        "Bounded concurrency: map_bounded beside buffer_unordered",
    );
    let home = criterion(ctx, &mut section, "concurrency", &[])?;
    let group = "bounded_10000_items_limit_64";
    let wanted = [
        (group, "buffer_unordered"),
        (group, "map_bounded"),
        (group, "map_bounded_with_cancel_token"),
    ];
    let estimates = read_all(&home, &wanted)?;
    // ns per 10,000 items -> ns per item.
    let per_item = |bench: &str| -> Result<Figure> {
        Ok(Figure::new(
            find(&estimates, group, bench)?.median_ns / 10_000.0,
            "ns/item",
        ))
    };
    section.rows.push(Row::new(
        "map_bounded, 10,000 items, limit 64",
        "futures buffer_unordered(64)",
        per_item("map_bounded")?,
        per_item("buffer_unordered")?,
        false,
    ));
    section.rows.push(Row::new(
        "map_bounded with a cancellation token",
        "futures buffer_unordered(64)",
        per_item("map_bounded_with_cancel_token")?,
        per_item("buffer_unordered")?,
        false,
    ));
    section.tables.push(estimates_table(
        "Every estimate read (nanoseconds per 10,000 items):",
        &estimates,
    ));
    note_estimates(&mut section, ctx.quick);
    section.notes.push(
        "Each item yields once to the scheduler, then returns (current-thread runtime). \
         map_bounded also settles every item, restores input order and checks the \
         cancellation token; no target was set, the ratio is its overhead."
            .to_owned(),
    );
    Ok(section)
}
