//! Writes one export (skeleton: the export change fills it).
//!
//! [`run_export`] streams the spec's sections from the analytics pool into a temp file in
//! the [`ExportDir`], hashes it (SHA-256) as it writes, stops at the size cap, fsyncs and
//! renames it into place. Nothing is collected in memory.

use std::path::{Path, PathBuf};

use smartbeak_database::{Database, DbError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::queue::{ExportFormat, ExportSpec, Progress};

/// Default `EXPORT_MAX_BYTES`: 10 MiB, as in the original.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// `EXPORT_DIR`, checked: every path is built from ids inside it.
#[derive(Debug, Clone)]
pub struct ExportDir {
    root: PathBuf,
}

impl ExportDir {
    /// Opens (creating it when missing) and checks the directory: it must be writable.
    pub fn open(path: &Path) -> Result<Self, ExportError> {
        let _ = path;
        unimplemented!("skeleton")
    }

    /// The directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file a stored `storage_path` names, if it lies inside the directory (no `..`,
    /// no absolute path outside it, no symlink leading out).
    pub fn resolve(&self, storage_path: &str) -> Result<PathBuf, ExportError> {
        let _ = storage_path;
        unimplemented!("skeleton")
    }
}

/// Limits of one export.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    /// `EXPORT_MAX_BYTES`: the file may not grow beyond this.
    pub max_bytes: u64,
}

/// A file written and renamed into place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOutput {
    /// Path relative to the [`ExportDir`].
    pub storage_path: String,
    /// Bytes written.
    pub size_bytes: u64,
    /// Records written (all sections).
    pub record_count: u64,
    /// Hex SHA-256 of the file.
    pub checksum_sha256: String,
}

/// Why an export did not produce a file. No temp file is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Cancelled through the token (api cancel, fenced, shutdown).
    #[error("export cancelled")]
    Cancelled,
    /// The file would exceed `EXPORT_MAX_BYTES`.
    #[error("export exceeds EXPORT_MAX_BYTES ({limit} bytes)")]
    TooLarge {
        /// The cap.
        limit: u64,
    },
    /// The domain does not exist (or is not the org's).
    #[error("domain {0} not found")]
    DomainNotFound(Uuid),
    /// A path would leave `EXPORT_DIR`.
    #[error("path {0:?} is outside EXPORT_DIR")]
    OutsideDir(String),
    /// The directory is missing, not a directory, or not writable.
    #[error("export directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the file failed (ENOSPC included).
    #[error("writing the export file failed: {0}")]
    Io(#[source] std::io::Error),
    /// Reading from the database failed.
    #[error("reading the export data failed: {0}")]
    Db(#[source] DbError),
}

impl ExportError {
    /// Whether a later attempt can succeed (a database timeout yes, the size cap no).
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Db(_) | Self::Io(_))
    }
}

/// Writes one export. `progress` receives rows written and percent as it goes (the worker
/// forwards it to the row at a bounded rate, the CLI to its progress bar).
pub async fn run_export(
    db: &Database,
    spec: &ExportSpec,
    dir: &ExportDir,
    limits: ExportLimits,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Result<ExportOutput, ExportError> {
    let _ = (db, spec, dir, limits, progress, cancel, ExportFormat::Json);
    unimplemented!("skeleton")
}
