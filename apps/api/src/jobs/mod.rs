//! The domain export job, as in the original's `apps/api/src/jobs`.
//!
//! - [`queue`] owns every statement on `domain_exports` and `domain_export_attempts`
//!   (enqueue, list, cancel, claim, heartbeat, complete, fail, release, reclaim). The api's
//!   routes (`routes/exports.rs`) and the worker both call it, so the contract between them
//!   is this module's code. Its child [`queue::retention`] holds the three statements of
//!   the control-plane's `export-retention` operation (due, mark expiring, mark expired).
//! - [`export`] writes one export: rows streamed from the database into a temp file in
//!   `EXPORT_DIR`, hashed as written, size-capped, fsynced and renamed into place.
//! - [`worker`] is the long-running worker: claiming with `FOR UPDATE SKIP LOCKED`,
//!   heartbeats, the reaper, `LISTEN/NOTIFY` wake-ups, bounded concurrency, shutdown.
//!
//! The binary `src/bin/smartbeak-domain-export.rs` is the CLI on top.

pub mod export;
pub mod paths;
pub mod queue;
pub mod worker;
