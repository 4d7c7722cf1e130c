//! Rendering: `target/bench/results.json`, `BENCHMARKS.md`, and the charts
//! (`docs/bench/ratios.png`, `docs/bench/api-latency.png`), all from one [`Report`]: the
//! page and the charts read nothing but its figures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use super::model::{Machine, Report, Row, Section, Target};

/// The ratio chart, relative to the workspace root (the page links it).
pub(crate) const RATIOS_PNG: &str = "docs/bench/ratios.png";
/// The api latency chart, relative to the workspace root.
pub(crate) const LATENCY_PNG: &str = "docs/bench/api-latency.png";
/// The hand-recorded runs from before the generated page.
const HISTORY_MD: &str = "docs/bench/HISTORY.md";

/// Cores, memory, load average (as `load_start`; the caller sets `load_end` at the end),
/// kernel and the tools' versions.
pub(crate) fn machine() -> Result<Machine> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    let load = load_average()?;
    let kernel = first_line("uname", &["-sr"]).unwrap_or_else(|| "unknown".to_owned());
    let mut tools = Vec::new();
    let postgres = smartbeak_test_support::postgres_bin_dir()
        .map(|dir| dir.join("postgres").to_string_lossy().into_owned())
        .unwrap_or_else(|_| "postgres".to_owned());
    for (program, args) in [
        ("rustc", &["--version"][..]),
        (postgres.as_str(), &["--version"][..]),
        ("psql", &["--version"][..]),
        ("redis-server", &["--version"][..]),
        ("wrk", &["--version"][..]),
    ] {
        let name = Path::new(program)
            .file_name()
            .map_or(program.into(), |n| n.to_string_lossy());
        tools.push(first_line(program, args).unwrap_or_else(|| format!("{name}: not found")));
    }
    Ok(Machine {
        cores,
        memory_gib: kib / (1024.0 * 1024.0),
        load_start: load,
        load_end: load,
        kernel,
        tools,
    })
}

/// `/proc/loadavg`: 1, 5 and 15 minutes.
pub(crate) fn load_average() -> Result<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let mut load = [0.0; 3];
    for slot in &mut load {
        *slot = fields
            .next()
            .and_then(Result::ok)
            .with_context(|| format!("unexpected /proc/loadavg: {text:?}"))?;
    }
    Ok(load)
}

/// The first non-empty line a program prints (stdout, else stderr: `wrk --version` exits
/// non-zero after printing it).
fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Where the outputs went.
pub(crate) struct Written {
    pub(crate) json: PathBuf,
    /// `BENCHMARKS.md` and the charts, when the page was written.
    pub(crate) page: Option<(PathBuf, Vec<PathBuf>)>,
}

/// Writes `<out>/results.json`; with `page`, also `BENCHMARKS.md` and the charts under
/// `root/docs/bench`.
pub(crate) fn write(out: &Path, root: &Path, report: &Report, page: bool) -> Result<Written> {
    let json = out.join("results.json");
    let text = serde_json::to_string_pretty(report).context("serializing the report")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    if !page {
        return Ok(Written { json, page: None });
    }
    let docs = root.join("docs/bench");
    std::fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    let mut charts = Vec::new();
    let ratios = root.join(RATIOS_PNG);
    // A chart this run does not draw is removed, so the page never links a stale one.
    let keep = |drew: bool, path: PathBuf, charts: &mut Vec<PathBuf>| -> Result<()> {
        if drew {
            charts.push(path);
        } else if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    };
    let drew_ratios = draw_ratios(report, &ratios)?;
    keep(drew_ratios, ratios, &mut charts)?;
    let latency = root.join(LATENCY_PNG);
    let drew_latency = draw_latency(report, &latency)?;
    keep(drew_latency, latency, &mut charts)?;
    let markdown = render_markdown(report, drew_ratios, drew_latency);
    let page_path = root.join("BENCHMARKS.md");
    std::fs::write(&page_path, markdown)
        .with_context(|| format!("writing {}", page_path.display()))?;
    Ok(Written {
        json,
        page: Some((page_path, charts)),
    })
}

/// A figure's value for a table: thousands separated from 1,000, else three significant
/// digits or so.
pub(crate) fn number(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let rounded = value.round() as i64;
        let digits = rounded.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if rounded < 0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 || magnitude == 0.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// `0.42x`, `0.042x`.
pub(crate) fn ratio(value: f64) -> String {
    if !value.is_finite() {
        "n/a".to_owned()
    } else if value.abs() < 0.1 {
        format!("{value:.3}x")
    } else {
        format!("{value:.2}x")
    }
}

fn target_text(target: &Target) -> String {
    format!(
        "{} {}",
        if target.at_most { "≤" } else { "≥" },
        ratio(target.value)
    )
}

fn met_text(row: &Row) -> String {
    match row.met() {
        Some(true) => "yes".to_owned(),
        Some(false) if row.errors > 0 => format!("**no** ({} errors)", row.errors),
        Some(false) => "**no**".to_owned(),
        None if row.errors > 0 => format!("({} errors)", row.errors),
        None => String::new(),
    }
}

/// A table cell: `|` escaped, newlines flattened.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn load_text(load: &[f64; 3]) -> String {
    format!("{:.2} / {:.2} / {:.2}", load[0], load[1], load[2])
}

/// The whole page. `ratios_chart` and `latency_chart` say which charts exist to link.
pub(crate) fn render_markdown(report: &Report, ratios_chart: bool, latency_chart: bool) -> String {
    let mut md = String::new();
    let m = &report.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` on {} at commit `{}` (the run took {:.0} min). \
         Every figure on this page comes from that run, each measured beside its anchor in the \
         same run: on a shared, noisy machine the ratio is the figure to read. Do not edit \
         this page by hand; rerun the command. Earlier hand-recorded runs: \
         [{HISTORY_MD}]({HISTORY_MD}).\n",
        if report.quick { " --quick" } else { "" },
        report.started,
        report.commit,
        report.duration_secs / 60.0
    );
    if report.quick {
        let _ = writeln!(
            md,
            "**A `--quick` run (smaller sizes, shorter measurements): not the figures to quote.**\n"
        );
    }
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(md, "| cores | {} |", m.cores);
    let _ = writeln!(md, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(
        md,
        "| load average (1 / 5 / 15 min) at the start | {} |",
        load_text(&m.load_start)
    );
    let _ = writeln!(
        md,
        "| load average (1 / 5 / 15 min) at the end | {} |",
        load_text(&m.load_end)
    );
    let _ = writeln!(md, "| kernel | {} |", cell(&m.kernel));
    for tool in &m.tools {
        let _ = writeln!(md, "| tool | {} |", cell(tool));
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## How to reproduce\n");
    let _ = writeln!(
        md,
        "```sh\ncargo xtask bench                   # every section; rewrites this page and \
         its charts\ncargo xtask bench --quick           # every section at smaller sizes; \
         target/bench/results.json only\ncargo xtask bench --only export,scheduler\n```\n"
    );
    let _ = writeln!(
        md,
        "It first runs `cargo build --release --workspace --bins --examples` and `cargo bench \
         --profile release --workspace --no-run`, then starts a throwaway \
         PostgreSQL and Redis. Each section below lists the exact commands it ran \
         (`$CARGO_TARGET_DIR` is the cargo target directory); their output is in \
         `target/bench/logs/`. The figures are in `target/bench/results.json`.\n"
    );

    let _ = writeln!(md, "## Summary of targets\n");
    let _ = writeln!(
        md,
        "| section | benchmark | anchor | ratio | target | met |\n| --- | --- | --- | ---: | ---: | --- |"
    );
    let mut targets = 0;
    for section in &report.sections {
        for row in section.rows.iter().filter(|r| r.target.is_some()) {
            targets += 1;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                cell(&section.title),
                cell(&row.benchmark),
                cell(&row.anchor),
                ratio(row.ratio),
                row.target.as_ref().map(target_text).unwrap_or_default(),
                met_text(row)
            );
        }
        if let Some(error) = &section.error {
            let _ = writeln!(
                md,
                "| {} | (section failed: {}) | | | | **no** |",
                cell(&section.title),
                cell(first_line_of(error))
            );
        }
    }
    let met = report
        .sections
        .iter()
        .flat_map(|s| &s.rows)
        .filter(|r| r.met() == Some(true))
        .count();
    let failed: Vec<&str> = report
        .sections
        .iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.id.as_str())
        .collect();
    let _ = if failed.is_empty() {
        writeln!(md, "\n{met} of {targets} targets met.\n")
    } else {
        // A failed section's targets were never measured: they count as not met.
        writeln!(
            md,
            "\n{met} of {targets} targets met; {} section(s) failed ({}), so their targets \
             were not measured and are not counted above.\n",
            failed.len(),
            failed.join(", ")
        )
    };

    if ratios_chart || latency_chart {
        let _ = writeln!(md, "## Charts\n");
        if ratios_chart {
            let _ = writeln!(
                md,
                "Every row's ratio (ours / anchor, log scale; green: target met, red: missed, \
                 grey: no target; the black tick is the target). Most anchors are measured in \
                 the same run; a few are bounds the rows name (the 50 ms p99, the 64 MB RSS \
                 budget, one computation per caller):\n\n![ratios]({RATIOS_PNG})\n"
            );
        }
        if latency_chart {
            let _ = writeln!(
                md,
                "The api's latency distributions (percentile on a \"nines\" scale, ms on a log \
                 scale):\n\n![api latency]({LATENCY_PNG})\n"
            );
        }
    }

    for section in &report.sections {
        render_section(&mut md, section);
    }
    md
}

fn first_line_of(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn render_section(md: &mut String, section: &Section) {
    let _ = writeln!(md, "## {}\n", section.title);
    if !section.commands.is_empty() {
        let _ = writeln!(md, "```sh\n{}\n```\n", section.commands.join("\n"));
    }
    if let Some(error) = &section.error {
        let _ = writeln!(md, "**This section failed:**\n\n```text\n{error}\n```\n");
    }
    if !section.rows.is_empty() {
        let _ = writeln!(
            md,
            "| benchmark | anchor | ours | anchor figure | ratio | target | met |\n\
             | --- | --- | ---: | ---: | ---: | ---: | --- |"
        );
        for row in &section.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} {} | {} {} | {} | {} | {} |",
                cell(&row.benchmark),
                cell(&row.anchor),
                number(row.ours.value),
                row.ours.unit,
                number(row.anchor_figure.value),
                row.anchor_figure.unit,
                ratio(row.ratio),
                row.target.as_ref().map(target_text).unwrap_or_default(),
                met_text(row)
            );
        }
        let _ = writeln!(md);
    }
    for table in &section.tables {
        let _ = writeln!(md, "{}\n", table.caption);
        let header: Vec<String> = table.header.iter().map(|h| cell(h)).collect();
        let _ = writeln!(md, "| {} |", header.join(" | "));
        let _ = writeln!(
            md,
            "|{}",
            table.header.iter().map(|_| " --- |").collect::<String>()
        );
        for row in &table.rows {
            let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
        let _ = writeln!(md);
    }
    for series in &section.latency {
        let points: Vec<String> = series
            .points
            .iter()
            .map(|(p, ms)| format!("p{} {} ms", trim_percentile(*p), number(*ms)))
            .collect();
        let _ = writeln!(md, "- latency, {}: {}", series.label, points.join(", "));
    }
    if !section.latency.is_empty() {
        let _ = writeln!(md);
    }
    for note in &section.notes {
        let _ = writeln!(md, "- {note}");
    }
    if !section.notes.is_empty() {
        let _ = writeln!(md);
    }
}

/// `50`, `99.9`.
fn trim_percentile(p: f64) -> String {
    let text = format!("{p:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The embedded font, registered once as plotters' `sans-serif`.
fn register_font() -> Result<()> {
    static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded font xtask/assets/DejaVuSans.ttf does not load"
        ))
    }
}

/// A ratio chart label of at most 110 characters (the label area's width): longer ones keep
/// their start and end around an ellipsis (the page's tables have the whole text).
fn short_label(label: &str) -> String {
    const MAX: usize = 110;
    let chars: Vec<char> = label.chars().collect();
    if chars.len() <= MAX {
        return label.to_owned();
    }
    let head: String = chars[..MAX - 41].iter().collect();
    let tail: String = chars[chars.len() - 40..].iter().collect();
    format!("{head}…{tail}")
}

fn chart_error(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing {}: {e}", path.display())
}

/// Every row with a finite ratio as a bar from 1 to its ratio (log scale; a ratio of 0 is
/// drawn at the axis' left end), its target as a tick. False (nothing written) when no row
/// has a ratio.
pub(crate) fn draw_ratios(report: &Report, path: &Path) -> Result<bool> {
    let rows: Vec<(String, &Row)> = report
        .sections
        .iter()
        .flat_map(|s| s.rows.iter().map(move |r| (s, r)))
        .filter(|(_, r)| r.ratio.is_finite() && r.ratio >= 0.0)
        .map(|(s, r)| {
            (
                short_label(&format!("{}: {} / {}", s.id, r.benchmark, r.anchor)),
                r,
            )
        })
        .collect();
    if rows.is_empty() {
        return Ok(false);
    }
    register_font()?;
    let values = rows.iter().flat_map(|(_, r)| {
        [Some(r.ratio), r.target.as_ref().map(|t| t.value)]
            .into_iter()
            .flatten()
            .filter(|v| *v > 0.0)
    });
    let (lo, hi) = values.fold((1.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo / 2.0, hi * 2.0);
    let n = rows.len();
    let height = (120 + 28 * n) as u32;
    let root = BitMapBackend::new(path, (1600, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_error(path, e))?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "ours / anchor (measured in the same run, or a named bound; {}, commit {})",
                report.started, report.commit
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(820)
        .build_cartesian_2d((lo..hi).log_scale(), -0.5f64..(n as f64 - 0.5))
        .map_err(|e| chart_error(path, e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 0.01 && i >= 0.0 {
                labels
                    .get(n.saturating_sub(1).saturating_sub(i as usize))
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&|x| ratio(*x))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    for (i, (_, row)) in rows.iter().enumerate() {
        // Top to bottom in page order.
        let y = (n - 1 - i) as f64;
        let colour = match row.met() {
            Some(true) => RGBColor(46, 160, 67),
            Some(false) => RGBColor(214, 39, 40),
            None => RGBColor(140, 140, 140),
        };
        let drawn = row.ratio.max(lo);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(1.0f64.min(drawn), y - 0.35), (1.0f64.max(drawn), y + 0.35)],
                colour.filled(),
            )))
            .map_err(|e| chart_error(path, e))?;
        if let Some(target) = &row.target {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(target.value, y - 0.45), (target.value, y + 0.45)],
                    BLACK.stroke_width(3),
                )))
                .map_err(|e| chart_error(path, e))?;
        }
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, -0.5), (1.0, n as f64 - 0.5)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| chart_error(path, e))?;
    root.present().map_err(|e| chart_error(path, e))?;
    Ok(true)
}

/// "Nines" of a percentile: p90 is 1, p99 is 2, p99.9 is 3.
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).log10()
}

/// Every section's latency series, percentile (nines scale) against ms (log scale). False
/// (nothing written) when the run has no latency series.
pub(crate) fn draw_latency(report: &Report, path: &Path) -> Result<bool> {
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .sections
        .iter()
        .flat_map(|s| &s.latency)
        .map(|l| {
            let points = l
                .points
                .iter()
                .filter(|(p, ms)| *p > 0.0 && *p < 100.0 && *ms > 0.0 && ms.is_finite())
                .map(|(p, ms)| (nines(*p), *ms))
                .collect::<Vec<_>>();
            (l.label.clone(), points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    register_font()?;
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let (x_hi, y_lo, y_hi) = all.fold((1.0f64, f64::MAX, 0.0f64), |(x, lo, hi), (n, ms)| {
        (x.max(*n), lo.min(*ms), hi.max(*ms))
    });
    // Whole nines on the axis (p99.9 is 3.000...01 in floating point).
    let x_max = (x_hi - 1e-6).ceil().max(1.0);
    let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| chart_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "api latency by percentile ({}, commit {})",
                report.started, report.commit
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..x_max, ((y_lo / 1.5)..(y_hi * 1.5)).log_scale())
        .map_err(|e| chart_error(path, e))?;
    chart
        .configure_mesh()
        // One tick per nine: p0, p90, p99, p99.9, ...
        .x_labels(x_max as usize + 1)
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| format!("p{}", trim_percentile(100.0 * (1.0 - 10f64.powf(-x)))))
        .y_label_formatter(&|y| number(*y))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    for (i, (label, points)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| chart_error(path, e))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_error(path, e))?;
    root.present().map_err(|e| chart_error(path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests;
