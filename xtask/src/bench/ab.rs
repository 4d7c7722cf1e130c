//! The api against a baseline commit (issue 13's A/B): `apps/api/bench/ab.sh`, which builds
//! the api at [`BASELINE`] from a git worktree beside this tree's, runs both interleaved
//! with the limiter on and off and the two ceilings (`/healthz`, `pgbench`), and profiles
//! one more round with `perf`. This section runs the script against the bench's throwaway
//! servers, reads its `--json` file, and puts the targets and the top symbols of
//! each profile on the page. Full runs only: the baseline's release build is long the first
//! time (its dependencies are kept under `$CARGO_TARGET_DIR/bench/baseline` for the next runs;
//! the workspace crates are built again from the fresh worktree each time).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::model::{Figure, Row, Section, Table, Target};
use super::{Ctx, read_json, require, run};

/// The main issue 13 started from: the baseline of every A/B (named on the page).
pub(crate) const BASELINE: &str = "95474a2";

/// Symbols listed per profile.
const TOP: usize = 15;

#[derive(Deserialize)]
struct Output {
    baseline: String,
    current: String,
    rounds: u32,
    duration: String,
    connections: u32,
    load_start: String,
    load_end: String,
    runs: Vec<AbRun>,
}

#[derive(Deserialize)]
struct AbRun {
    round: u32,
    variant: String,
    per_sec: f64,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    errors: u64,
}

/// The medians of one variant over the rounds, errors summed.
struct Med {
    per_sec: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    errors: u64,
    rounds: usize,
}

fn med(output: &Output, variant: &str) -> Med {
    let runs: Vec<&AbRun> = output
        .runs
        .iter()
        .filter(|r| r.variant == variant)
        .collect();
    let of = |f: fn(&AbRun) -> Option<f64>| {
        super::median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    Med {
        per_sec: of(|r| Some(r.per_sec)),
        p50: of(|r| r.p50_ms),
        p90: of(|r| r.p90_ms),
        p99: of(|r| r.p99_ms),
        errors: runs.iter().map(|r| r.errors).sum(),
        rounds: runs.len(),
    }
}

pub(crate) fn ab(ctx: &Ctx<'_>) -> Result<Section> {
    let mut section = Section::new(
        "api-ab",
        format!("Api against the baseline commit {BASELINE} (issue 13's A/B)"),
    );
    if ctx.quick {
        section.notes.push(
            "Skipped in --quick runs: it builds the baseline commit in release mode (long the \
             first time). Run it alone with `cargo xtask bench --only api-ab`."
                .to_owned(),
        );
        return Ok(section);
    }
    // wrk and curl are installed when missing (as root, with apt-get); pgbench and psql come
    // with the PostgreSQL packages; perf only adds the profiles.
    for (tool, package) in [("wrk", "wrk"), ("curl", "curl")] {
        if !super::ensure_tool(tool, package, &mut section.notes) {
            bail!(
                "the api A/B (apps/api/bench/ab.sh) needs {tool}, which is not installed and \
                 could not be installed (apt-get install -y {package})"
            );
        }
    }
    for tool in ["pgbench", "psql"] {
        require(
            tool,
            "the api A/B (apps/api/bench/ab.sh)",
            "it comes with the PostgreSQL packages: apt-get install -y postgresql",
        )?;
    }
    let profile = super::on_path("perf");
    if !profile {
        section.notes.push(
            "perf is not installed (apt-get install -y linux-perf): no profiles this run."
                .to_owned(),
        );
    }
    let present = Command::new("git")
        .args(["cat-file", "-e", &format!("{BASELINE}^{{commit}}")])
        .current_dir(ctx.sh.current_dir())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        bail!(
            "the baseline commit {BASELINE} is not in this clone's history (a shallow clone?): \
             `git fetch --unshallow` first"
        );
    }
    let json = ctx.out.join("ab.json");
    let profiles = ctx.out.join("profiles");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_dir_all(&profiles);
    let mut command = Command::new("apps/api/bench/ab.sh");
    command
        .env("ADMIN_DATABASE_URL", ctx.pg.url())
        .env("BENCH_REDIS_URL", ctx.redis.url())
        .env("CARGO_TARGET_DIR", &ctx.target)
        .arg(BASELINE)
        .args([
            "--rounds",
            "3",
            "--duration",
            "15s",
            "--connections",
            "1000",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--current-bin")
        .arg(ctx.release.join("smartbeak-api"));
    if profile {
        command.arg("--profile").arg(&profiles);
    }
    run(ctx, &mut section, "api-ab", command)?;
    let output: Output = read_json(&json)?;

    let base_on = med(&output, "base-on");
    let base_off = med(&output, "base-off");
    let cur_on = med(&output, "cur-on");
    let cur_off = med(&output, "cur-off");
    let healthz = med(&output, "healthz");
    let pgbench = med(&output, "pgbench");
    let rps = |m: &Med| Figure::new(m.per_sec, "req/s");
    section.rows.push(
        Row::new(
            "current, limiter on",
            format!("baseline {BASELINE}, limiter on"),
            rps(&cur_on),
            rps(&base_on),
            true,
        )
        .with_errors(cur_on.errors)
        .with_target(Target::at_least(2.0)),
    );
    section.rows.push(
        Row::new(
            "current, limiter on",
            "current, limiter off",
            rps(&cur_on),
            rps(&cur_off),
            true,
        )
        .with_errors(cur_on.errors + cur_off.errors)
        .with_target(Target::at_least(0.9)),
    );
    section.rows.push(Row::new(
        "current, limiter off",
        format!("baseline {BASELINE}, limiter off"),
        rps(&cur_off),
        rps(&base_off),
        true,
    ));
    section.rows.push(
        Row::new(
            "p99, current, limiter on",
            "issue 13's bound (50 ms; not a measurement)",
            Figure::new(cur_on.p99, "ms"),
            Figure::new(50.0, "ms"),
            false,
        )
        .with_errors(cur_on.errors)
        .with_target(Target::at_most(1.0)),
    );
    section.rows.push(Row::new(
        "current, limiter on",
        "/healthz ceiling (the HTTP stack alone)",
        rps(&cur_on),
        rps(&healthz),
        true,
    ));
    section.rows.push(Row::new(
        "current, limiter on",
        "pgbench ceiling (the joined key-and-domain query, PostgreSQL alone, tps)",
        rps(&cur_on),
        Figure::new(pgbench.per_sec, "req/s"),
        true,
    ));

    let mut medians = Table {
        caption: format!(
            "Medians over {} rounds of {} each at {} connections (latencies in ms; errors \
             summed: wrk's socket errors and non-2xx answers):",
            output.rounds, output.duration, output.connections
        ),
        header: ["variant", "rounds", "req/s", "p50", "p90", "p99", "errors"]
            .map(str::to_owned)
            .to_vec(),
        rows: Vec::new(),
    };
    for (name, m) in [
        ("baseline, limiter on", &base_on),
        ("baseline, limiter off", &base_off),
        ("current, limiter on", &cur_on),
        ("current, limiter off", &cur_off),
        ("/healthz ceiling", &healthz),
        ("pgbench ceiling", &pgbench),
    ] {
        medians.rows.push(vec![
            name.to_owned(),
            m.rounds.to_string(),
            format!("{:.0}", m.per_sec),
            ms(Some(m.p50)),
            ms(Some(m.p90)),
            ms(Some(m.p99)),
            m.errors.to_string(),
        ]);
    }
    section.tables.push(medians);
    section.tables.push(Table {
        caption: "Every run (interleaved: the order of the variants rotates every round):"
            .to_owned(),
        header: ["round", "variant", "req/s", "p50", "p90", "p99", "errors"]
            .map(str::to_owned)
            .to_vec(),
        rows: output
            .runs
            .iter()
            .map(|r| {
                vec![
                    r.round.to_string(),
                    r.variant.clone(),
                    format!("{:.0}", r.per_sec),
                    ms(r.p50_ms),
                    ms(r.p90_ms),
                    ms(r.p99_ms),
                    r.errors.to_string(),
                ]
            })
            .collect(),
    });
    // Flame graphs (ab.sh draws them when inferno is installed): copied next to the page's
    // charts and linked, so a reader sees the whole call tree, the middleware stack
    // included, not only the top symbols.
    let mut flames = Vec::new();
    for variant in ["cur-on", "cur-off", "base-on"] {
        let svg = profiles.join(format!("{variant}.svg"));
        if profile && svg.is_file() {
            let name = format!("docs/bench/flame-{variant}.svg");
            let dest = ctx.sh.current_dir().join(&name);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::copy(&svg, &dest)
                .with_context(|| format!("copying {} to {}", svg.display(), dest.display()))?;
            flames.push(format!("[{variant}]({name})"));
        }
    }
    section.notes.push(if flames.is_empty() {
        "No flame graphs this run (they need perf and inferno: `cargo install inferno`).".to_owned()
    } else {
        format!(
            "Flame graphs of the profiled round (perf, DWARF call graphs, drawn by inferno): {}.",
            flames.join(", ")
        )
    });
    let variants = if profile {
        &[
            ("cur-on", "current, limiter on"),
            ("cur-off", "current, limiter off"),
            ("base-on", "baseline, limiter on"),
        ][..]
    } else {
        &[][..]
    };
    for &(variant, title) in variants {
        let path = profiles.join(format!("{variant}.top.txt"));
        match top_symbols(&path) {
            Ok((heading, rows)) if !rows.is_empty() => section.tables.push(Table {
                caption: format!(
                    "Top costs per request, {title}: the api's CPU samples by symbol ({heading}; \
                     `{}`; a share of the api's CPU time, so of every request's cost):",
                    path.strip_prefix(&ctx.target)
                        .map(|p| format!("$CARGO_TARGET_DIR/{}", p.display()))
                        .unwrap_or_else(|_| path.display().to_string())
                ),
                header: ["share of samples", "object", "symbol"]
                    .map(str::to_owned)
                    .to_vec(),
                rows,
            }),
            Ok(_) => section.notes.push(format!(
                "The {title} profile recorded no symbol above the limit."
            )),
            Err(e) => section
                .notes
                .push(format!("The {title} profile could not be read: {e:#}.")),
        }
    }
    if profile {
        layer_table(&mut section, &profiles, variants);
    }
    section.notes.push(format!(
        "Baseline {} (the main issue 13 started from) and current {} built in release mode by \
         the script; both run against this bench's throwaway PostgreSQL and Redis, each on a \
         database of its own migrated and seeded by its own binary. Load average {} at the \
         script's start and {} at its end. The profiled round runs after the measured ones and \
         stays out of the medians.",
        output.baseline, output.current, output.load_start, output.load_end
    ));
    if cur_on.errors + cur_off.errors > 0 {
        section.notes.push(format!(
            "ERRORS: the current api had {} errors (limiter on and off, all rounds); the issue's \
             target is 0 other than deliberate 429s (none are deliberate here: the limits are \
             out of reach).",
            cur_on.errors + cur_off.errors
        ));
    }
    Ok(section)
}

/// The per-layer cost table: each profiled variant's `<variant>.layers.txt` (ab.sh's
/// `layer_costs`: every CPU sample charged to the innermost layer of the request path on its
/// stack) side by side, a row per layer, largest first in the first variant. A variant
/// without the file (no inferno) is left out, with a note.
fn layer_table(section: &mut Section, profiles: &Path, variants: &[(&str, &str)]) {
    let mut columns = Vec::new();
    for &(variant, title) in variants {
        let path = profiles.join(format!("{variant}.layers.txt"));
        match std::fs::read_to_string(&path) {
            Ok(text) => columns.push((variant, title, parse_layers(&text))),
            Err(e) => section.notes.push(format!(
                "No per-layer costs for the {title} profile ({}: {e}).",
                path.display()
            )),
        }
    }
    let Some((_, _, first)) = columns.first() else {
        return;
    };
    let mut layers: Vec<String> = first.iter().map(|(layer, _)| layer.clone()).collect();
    for (_, _, rows) in &columns[1..] {
        for (layer, _) in rows {
            if !layers.contains(layer) {
                layers.push(layer.clone());
            }
        }
    }
    let mut header = vec!["layer (its own code, allocations and system calls)".to_owned()];
    header.extend(columns.iter().map(|(variant, _, _)| (*variant).to_owned()));
    let rows = layers
        .iter()
        .map(|layer| {
            let mut row = vec![layer.clone()];
            row.extend(columns.iter().map(|(_, _, rows)| {
                rows.iter()
                    .find(|(l, _)| l == layer)
                    .map_or("-".to_owned(), |(_, share)| share.clone())
            }));
            row
        })
        .collect();
    section.tables.push(Table {
        caption: "Per-request cost by layer of the request path (the same profiles): every \
                  CPU sample of the api is charged to the innermost layer on its stack (the \
                  handler, sqlx, the limiter, each middleware, hyper), so a share is that \
                  layer's own cost, not the layers inside it; `runtime` is the tokio \
                  scheduler, parking and the kernel's task switches (ab.sh `layer_costs`):"
            .to_owned(),
        header,
        rows,
    });
}

/// `12.34%<TAB>layer` lines of a `layers.txt` as (layer, share); `#` lines skipped.
fn parse_layers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (share, layer) = l.split_once('\t')?;
            share
                .ends_with('%')
                .then(|| (layer.trim().to_owned(), share.trim().to_owned()))
        })
        .collect()
}

/// A latency cell in ms: `-` when missing (none recorded, or the NaN median of nothing).
fn ms(value: Option<f64>) -> String {
    value
        .filter(|v| !v.is_nan())
        .map_or("-".to_owned(), |v| format!("{v:.2}"))
}

/// The first [`TOP`] symbol lines of an `ab.sh` profile (`perf report --sort dso,sym`):
/// its `# variant: ...` heading, and rows of (share, object, symbol).
fn top_symbols(path: &Path) -> Result<(String, Vec<Vec<String>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let heading = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .and_then(|l| l.split_once(": ").map(|(_, rest)| rest.to_owned()))
        .unwrap_or_default();
    Ok((heading, parse_top(&text)))
}

/// `  12.34%  smartbeak-api  [.] tokio::runtime::...` lines as (share, object, symbol).
fn parse_top(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let share = words.next().filter(|w| w.ends_with('%'))?;
            let object = words.next()?;
            let symbol: Vec<&str> = words.skip_while(|w| w.starts_with('[')).collect();
            Some(vec![
                share.to_owned(),
                object.to_owned(),
                symbol.join(" ").replace('`', "'"),
            ])
        })
        .take(TOP)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{parse_layers, parse_top};

    #[test]
    fn layer_lines_become_rows() {
        let text = "60.00%\truntime (scheduler)\n30.50%\tsqlx (queries, pool)\nnot a row\n\
                    # samples 100\n";
        assert_eq!(
            parse_layers(text),
            vec![
                ("runtime (scheduler)".to_owned(), "60.00%".to_owned()),
                ("sqlx (queries, pool)".to_owned(), "30.50%".to_owned()),
            ]
        );
    }

    #[test]
    fn perf_report_lines_become_rows() {
        let text = "# cur-on: perf record ...\n# perf report --no-children\n\
                    \n    12.34%  smartbeak-api      [.] tokio::runtime::park\n\
                    \x20    3.10%  [kernel.kallsyms]  [k] tcp_sendmsg\n  not a row\n";
        assert_eq!(
            parse_top(text),
            vec![
                vec!["12.34%", "smartbeak-api", "tokio::runtime::park"],
                vec!["3.10%", "[kernel.kallsyms]", "tcp_sendmsg"],
            ]
        );
    }
}
