//! The page and the verdicts on a small hand-built report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::bench::model::{Figure, LatencySeries, Machine, Report, Row, Section, Table, Target};

fn report() -> Report {
    let mut export = Section::new("export", "Export beside COPY");
    export
        .commands
        .push("$CARGO_TARGET_DIR/release/examples/export_bench --rows 10".into());
    export.rows.push(
        Row::new(
            "csv",
            "psql \\copy",
            Figure::new(1.2, "s"),
            Figure::new(1.0, "s"),
            false,
        )
        .with_target(Target::at_most(1.3)),
    );
    export.rows.push(
        Row::new(
            "json",
            "psql \\copy",
            Figure::new(2.5, "s"),
            Figure::new(1.0, "s"),
            false,
        )
        .with_target(Target::at_most(2.0)),
    );
    export.rows.push(Row::new(
        "5 exports | concurrently",
        "one after another",
        Figure::new(1500.0, "ms"),
        Figure::new(3000.0, "ms"),
        false,
    ));
    export.tables.push(Table {
        caption: "Every round:".into(),
        header: vec!["round".into(), "COPY (s)".into()],
        rows: vec![vec!["1".into(), "1.00".into()]],
    });
    export.notes.push("Judged on the default ZIP.".into());
    let mut scheduler = Section::new("scheduler", "Scheduler beside one UPDATE");
    scheduler.rows.push(
        Row::new(
            "0 % failing",
            "one UPDATE",
            Figure::new(30_062.0, "items/s"),
            Figure::new(28_411.0, "items/s"),
            true,
        )
        .with_target(Target::at_least(0.5)),
    );
    let mut api = Section::new("api", "Api");
    api.error = Some("not implemented yet\nsecond line".into());
    api.latency.push(LatencySeries {
        label: "limiter off".into(),
        points: vec![(50.0, 1.5), (99.0, 12.0), (99.9, 40.0)],
    });
    Report {
        started: "2026-12-03T13:00:00Z".into(),
        commit: "abc1234-dirty".into(),
        quick: false,
        machine: Machine {
            cores: 2,
            memory_gib: 23.4,
            load_start: [1.5, 1.25, 1.0],
            load_end: [2.0, 1.5, 1.0],
            kernel: "Linux 6.1.0".into(),
            tools: vec!["psql (PostgreSQL) 16.4".into(), "wrk: not found".into()],
        },
        sections: vec![export, scheduler, api],
        duration_secs: 600.0,
    }
}

#[test]
fn verdicts_follow_the_targets() {
    let r = report();
    let export = &r.sections[0];
    assert_eq!(
        export.rows[0].met(),
        Some(true),
        "1.2x against at most 1.3x"
    );
    assert_eq!(export.rows[1].met(), Some(false), "2.5x against at most 2x");
    assert_eq!(export.rows[2].met(), None, "no target");
    assert_eq!(
        r.sections[1].rows[0].met(),
        Some(true),
        "1.06x against at least 0.5x"
    );
    assert!(Target::at_most(1.3).holds(1.3), "the bound itself holds");
    assert!(!Target::at_least(0.5).holds(0.49));
    assert!(
        !Target::at_most(1.0).holds(f64::NAN),
        "no ratio never meets a target"
    );
    assert!(!Target::at_least(1.0).holds(f64::NAN));
    let zero = Row::new(
        "x",
        "y",
        Figure::new(1.0, "s"),
        Figure::new(0.0, "s"),
        false,
    )
    .with_target(Target::at_most(1.0));
    assert_eq!(zero.met(), Some(false), "a zero anchor gives no ratio");
}

#[test]
fn the_page_has_the_header_tables_and_summary() {
    let md = render_markdown(&report(), true, false);
    assert!(md.starts_with("# Benchmarks\n"));
    assert!(md.contains("on 2026-12-03T13:00:00Z at commit `abc1234-dirty` (the run took 10 min)"));
    assert!(md.contains("[docs/bench/HISTORY.md](docs/bench/HISTORY.md)"));
    assert!(md.contains("| cores | 2 |"));
    assert!(md.contains("| memory | 23.4 GiB |"));
    assert!(md.contains("| load average (1 / 5 / 15 min) at the start | 1.50 / 1.25 / 1.00 |"));
    assert!(md.contains("| load average (1 / 5 / 15 min) at the end | 2.00 / 1.50 / 1.00 |"));
    assert!(md.contains("| tool | wrk: not found |"));
    assert!(
        !md.contains("--quick run"),
        "a full run is not flagged as quick"
    );
    // The section's table: every column, the verdicts, a `|` in a name escaped.
    assert!(md.contains("| benchmark | anchor | ours | anchor figure | ratio | target | met |"));
    assert!(md.contains("| csv | psql \\copy | 1.20 s | 1.00 s | 1.20x | ≤ 1.30x | yes |"));
    assert!(md.contains("| json | psql \\copy | 2.50 s | 1.00 s | 2.50x | ≤ 2.00x | **no** |"));
    assert!(md.contains(
        "| 5 exports \\| concurrently | one after another | 1,500 ms | 3,000 ms | 0.50x |  |  |"
    ));
    assert!(md.contains(
        "| 0 % failing | one UPDATE | 30,062 items/s | 28,411 items/s | 1.06x | ≥ 0.50x | yes |"
    ));
    assert!(md.contains("```sh\n$CARGO_TARGET_DIR/release/examples/export_bench --rows 10\n```"));
    assert!(md.contains("Every round:\n\n| round | COPY (s) |\n| --- | --- |\n| 1 | 1.00 |"));
    assert!(md.contains("- Judged on the default ZIP."));
    // Summary: the three targets and the failed section, counted.
    assert!(md.contains("| Export beside COPY | csv | psql \\copy | 1.20x | ≤ 1.30x | yes |"));
    assert!(md.contains("| Api | (section failed: not implemented yet) | | | | **no** |"));
    assert!(md.contains(
        "\n2 of 3 targets met; 1 section(s) failed (api), so their targets were not measured \
         and are not counted above.\n"
    ));
    assert!(
        md.contains("**This section failed:**\n\n```text\nnot implemented yet\nsecond line\n```")
    );
    assert!(md.contains("- latency, limiter off: p50 1.50 ms, p99 12.0 ms, p99.9 40.0 ms"));
    // Only the charts that were drawn are linked.
    assert!(md.contains("![ratios](docs/bench/ratios.png)"));
    assert!(!md.contains("api-latency.png"));
}

#[test]
fn a_summary_without_failed_sections_counts_only_targets() {
    let mut r = report();
    r.sections.retain(|s| s.error.is_none());
    let md = render_markdown(&r, false, false);
    assert!(md.contains("\n2 of 3 targets met.\n"));
    assert!(!md.contains("failed"));
}

#[test]
fn a_quick_run_says_so() {
    let mut r = report();
    r.quick = true;
    let md = render_markdown(&r, false, false);
    assert!(md.contains("Generated by `cargo xtask bench --quick`"));
    assert!(md.contains("not the figures to quote"));
    assert!(!md.contains("## Charts"));
}

#[test]
fn numbers_and_ratios_read_well() {
    assert_eq!(number(1_234_567.4), "1,234,567");
    assert_eq!(number(-1500.0), "-1,500");
    assert_eq!(number(999.6), "1000");
    assert_eq!(number(123.4), "123");
    assert_eq!(number(12.34), "12.3");
    assert_eq!(number(1.234), "1.23");
    assert_eq!(number(0.01234), "0.012");
    assert_eq!(number(0.0), "0.00");
    assert_eq!(number(f64::NAN), "n/a");
    assert_eq!(ratio(1.0 / 3.0), "0.33x");
    assert_eq!(ratio(0.042), "0.042x");
    assert_eq!(ratio(f64::INFINITY), "n/a");
    assert_eq!(trim_percentile(99.9), "99.9");
    assert_eq!(trim_percentile(50.0), "50");
    assert!((nines(99.0) - 2.0).abs() < 1e-9);
}

#[test]
fn the_charts_are_drawn_from_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let r = report();
    let ratios = dir.path().join("ratios.png");
    let latency = dir.path().join("latency.png");
    assert!(draw_ratios(&r, &ratios).unwrap());
    assert!(draw_latency(&r, &latency).unwrap());
    for path in [&ratios, &latency] {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is a PNG",
            path.display()
        );
    }
    // Nothing to draw: no file, and the page links none.
    let mut empty = report();
    for s in &mut empty.sections {
        s.rows.clear();
        s.latency.clear();
    }
    let none = dir.path().join("none.png");
    assert!(!draw_ratios(&empty, &none).unwrap());
    assert!(!draw_latency(&empty, &none).unwrap());
    assert!(!none.exists());
}

#[test]
fn write_skips_the_page_unless_asked() {
    let out = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = report();
    let written = write(out.path(), root.path(), &r, false).unwrap();
    assert!(written.page.is_none());
    assert!(!root.path().join("BENCHMARKS.md").exists());
    let back: Report =
        serde_json::from_str(&std::fs::read_to_string(&written.json).unwrap()).unwrap();
    assert_eq!(back.commit, r.commit);
    assert_eq!(back.sections.len(), 3);
    let written = write(out.path(), root.path(), &r, true).unwrap();
    let (page, charts) = written.page.unwrap();
    assert!(
        std::fs::read_to_string(page)
            .unwrap()
            .contains("abc1234-dirty")
    );
    assert_eq!(charts.len(), 2);
    assert!(root.path().join(RATIOS_PNG).exists());
    assert!(root.path().join(LATENCY_PNG).exists());
}

#[test]
fn long_chart_labels_are_shortened_around_an_ellipsis() {
    assert_eq!(short_label("short"), "short");
    let long = format!("start {} end", "x".repeat(200));
    let short = short_label(&long);
    assert_eq!(short.chars().count(), 110);
    assert!(short.starts_with("start ") && short.ends_with(" end") && short.contains('…'));
}
