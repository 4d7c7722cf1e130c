//! The figures `cargo xtask bench` measures, as one serializable report: written to
//! `target/bench/results.json`, rendered to `BENCHMARKS.md` and drawn as charts. Every
//! figure here comes from a measurement of the same run; nothing is typed in by hand.

use serde::{Deserialize, Serialize};

/// One whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Report {
    /// UTC start of the run, RFC 3339.
    pub(crate) started: String,
    /// `git rev-parse --short HEAD`, with `-dirty` when the tree had changes.
    pub(crate) commit: String,
    /// `--quick` (smaller sizes, shorter runs): not the figures for the page.
    pub(crate) quick: bool,
    pub(crate) machine: Machine,
    pub(crate) sections: Vec<Section>,
    /// Wall time of the whole run, seconds.
    pub(crate) duration_secs: f64,
}

/// What the run ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    /// `/proc/loadavg` at the start: 1, 5 and 15 minutes.
    pub(crate) load_start: [f64; 3],
    /// `/proc/loadavg` at the end.
    pub(crate) load_end: [f64; 3],
    /// `uname -sr`.
    pub(crate) kernel: String,
    /// `postgres --version`, `redis-server --version`, `wrk --version` (first lines).
    pub(crate) tools: Vec<String>,
}

/// One section of the page (breaker, registry memory, single-flight, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Section {
    /// Short stable id: `breaker`, `registry-memory`, `singleflight`, `bounded`, `churn`,
    /// `api`, `export`, `scheduler`. Chart file names and `--only` use it.
    pub(crate) id: String,
    pub(crate) title: String,
    /// The exact commands the section ran, as a reader would type them.
    pub(crate) commands: Vec<String>,
    /// Benchmark beside its anchor: the section's table.
    pub(crate) rows: Vec<Row>,
    /// Further tables (per-round figures, percentiles); rendered after `rows`.
    pub(crate) tables: Vec<Table>,
    /// Latency distributions (the api section): drawn as one chart.
    pub(crate) latency: Vec<LatencySeries>,
    /// Sentences generated from the figures (what was measured how, caveats).
    pub(crate) notes: Vec<String>,
    /// Set when the section failed to run: the error, and no rows.
    pub(crate) error: Option<String>,
}

impl Section {
    pub(crate) fn new(id: &str, title: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            title: title.into(),
            commands: Vec::new(),
            rows: Vec::new(),
            tables: Vec::new(),
            latency: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }
}

/// A measured quantity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Figure {
    pub(crate) value: f64,
    /// `ns`, `µs`, `ms`, `s`, `req/s`, `rows/s`, `items/s`, `MB`, `sessions`, `computations`.
    pub(crate) unit: String,
}

impl Figure {
    pub(crate) fn new(value: f64, unit: &str) -> Self {
        Self {
            value,
            unit: unit.to_owned(),
        }
    }
}

/// Our figure beside its anchor, measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Row {
    /// What ours is (`closed call`, `csv (ZIP, deflate 1)`, `limiter on, 1,000 connections`).
    pub(crate) benchmark: String,
    /// What the anchor is (`failsafe ConsecutiveFailures`, `psql \copy`, `/healthz`).
    pub(crate) anchor: String,
    pub(crate) ours: Figure,
    pub(crate) anchor_figure: Figure,
    /// `ours.value / anchor_figure.value` (same unit).
    pub(crate) ratio: f64,
    /// True when a larger figure is better (throughput); false for time and memory.
    pub(crate) higher_is_better: bool,
    /// The target on `ratio`, when the issue set one.
    pub(crate) target: Option<Target>,
    /// Failed requests or operations behind `ours` (errors, non-2xx answers, failed items):
    /// a row with any has not met its target, whatever its ratio.
    #[serde(default)]
    pub(crate) errors: u64,
}

impl Row {
    /// A row with `ratio` computed; `ours` and `anchor` must share a unit.
    pub(crate) fn new(
        benchmark: impl Into<String>,
        anchor: impl Into<String>,
        ours: Figure,
        anchor_figure: Figure,
        higher_is_better: bool,
    ) -> Self {
        let ratio = if anchor_figure.value == 0.0 {
            f64::NAN
        } else {
            ours.value / anchor_figure.value
        };
        Self {
            benchmark: benchmark.into(),
            anchor: anchor.into(),
            ours,
            anchor_figure,
            ratio,
            higher_is_better,
            target: None,
            errors: 0,
        }
    }

    /// The failures behind `ours` (see [`Row::errors`]).
    pub(crate) fn with_errors(mut self, errors: u64) -> Self {
        self.errors = errors;
        self
    }

    pub(crate) fn with_target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// Whether the target holds (and nothing behind the figure failed); `None` without a
    /// target.
    pub(crate) fn met(&self) -> Option<bool> {
        self.target
            .as_ref()
            .map(|t| self.errors == 0 && t.holds(self.ratio))
    }
}

/// A bound on a ratio: `ratio <= value` (`at_most`) or `ratio >= value`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    pub(crate) at_most: bool,
    pub(crate) value: f64,
}

impl Target {
    pub(crate) fn at_most(value: f64) -> Self {
        Self {
            at_most: true,
            value,
        }
    }

    pub(crate) fn at_least(value: f64) -> Self {
        Self {
            at_most: false,
            value,
        }
    }

    pub(crate) fn holds(&self, ratio: f64) -> bool {
        if self.at_most {
            ratio <= self.value
        } else {
            ratio >= self.value
        }
    }
}

/// A free-form table (per-round figures, percentiles).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Table {
    pub(crate) caption: String,
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

/// A latency distribution: `(percentile in 0..=100, milliseconds)` points.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LatencySeries {
    /// `limiter on, 1,000 connections`, `/healthz ceiling`, ...
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
}
