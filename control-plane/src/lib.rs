//! The control-plane batch service as a library: the binary (`src/main.rs`) is the CLI and
//! the process wiring; tests and the benchmark drive the same code.
//!
//! Codemap: [`operations`] (the three operations: `content-scheduler`, `keyword-sync`,
//! `export-retention`, each loading its due items and processing a batch of them),
//! [`runner`] (one run of an operation: advisory lock on a dedicated connection, the
//! `batch_runs` row, heartbeat, abandoned-run detection, batches through
//! `smartbeak_utils::concurrency::map_batches_bounded`, settle-all or strict, failures in
//! `batch_run_items`), [`service`] (the long-running `run`: each operation on its own
//! interval), [`config`] (env and flags), [`metrics`] (names and recording).

#![warn(missing_docs)]

pub mod config;
pub mod metrics;
pub mod operations;
pub mod runner;
pub mod service;
