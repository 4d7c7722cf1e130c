//! Breaker registry memory: RSS growth over 1,000,000 distinct names, bounded registry
//! beside an unbounded `HashMap` of breakers (the original's design), each in its own
//! process of the `registry_memory` example so each growth is clean.

use std::process::Command;

use anyhow::Result;
use serde::Deserialize;

use super::model::{Figure, Row, Section, Table, Target};
use super::{Ctx, read_json, run};

/// What `registry_memory --json` writes.
#[derive(Deserialize)]
struct Growth {
    names: u64,
    entries: u64,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    growth_bytes: u64,
}

const MB: f64 = 1024.0 * 1024.0;

pub(crate) fn registry(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new(
        "registry-memory",
        "Breaker registry memory: 1,000,000 distinct names, bounded beside unbounded",
    );
    let names: u64 = if ctx.quick { 100_000 } else { 1_000_000 };
    let example = ctx.release.join("examples/registry_memory");
    let mut measure = |mode: &str| -> Result<Growth> {
        let json = ctx.out.join(format!("registry-memory-{mode}.json"));
        let mut command = Command::new(&example);
        command
            .args(["--mode", mode, "--names", &names.to_string(), "--json"])
            .arg(&json);
        run(
            ctx,
            &mut section,
            &format!("registry-memory-{mode}"),
            command,
        )?;
        read_json(&json)
    };
    let bounded = measure("bounded")?;
    let unbounded = measure("unbounded")?;
    let row = Row::new(
        "RSS growth, bounded BreakerRegistry",
        "unbounded HashMap<String, CircuitBreaker>",
        Figure::new(bounded.growth_bytes as f64 / MB, "MiB"),
        Figure::new(unbounded.growth_bytes as f64 / MB, "MiB"),
        false,
    )
    .with_target(Target::at_most(0.10));
    let reduction = 100.0 * (1.0 - row.ratio);
    section.rows.push(row);
    section.tables.push(Table {
        caption: "Each mode in its own process (`/proc/self/statm` resident pages before and \
                  after the names):"
            .to_owned(),
        header: [
            "mode",
            "names",
            "entries kept",
            "RSS before (MiB)",
            "RSS after (MiB)",
            "growth (MiB)",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows: [
            ("bounded registry", &bounded),
            ("unbounded HashMap", &unbounded),
        ]
        .into_iter()
        .map(|(mode, g)| {
            vec![
                mode.to_owned(),
                super::report::number(g.names as f64),
                super::report::number(g.entries as f64),
                format!("{:.2}", g.rss_before_bytes as f64 / MB),
                format!("{:.2}", g.rss_after_bytes as f64 / MB),
                format!("{:.3}", g.growth_bytes as f64 / MB),
            ]
        })
        .collect(),
    });
    section.notes.push(format!(
        "Measured reduction: {reduction:.1}% (the original claimed -90%, so the target is a \
         ratio of at most 0.10x). The names are random `attacker-<hex>` strings that \
         AdapterName::parse maps to `unknown`, the same seed in both processes; the bounded \
         registry keys breakers by adapter and policy, the anchor keeps one breaker per \
         distinct name.{}",
        if ctx.quick {
            " --quick: 100,000 names instead of 1,000,000."
        } else {
            ""
        }
    ));
    Ok(section)
}
