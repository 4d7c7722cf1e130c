//! Writes one export: [`run_export`].
//!
//! The spec's sections are read from the analytics pool in keyset-paginated chunks
//! (`sections`: one bounded statement per 10,000 rows) by an async reader, and handed
//! through a channel of two chunks to a blocking writer thread that encodes them (`csv`,
//! `json`, `markdown`) into a temp file in the [`ExportDir`], hashing (SHA-256), counting
//! and capping every byte (`file`). At the end the file is fsynced and renamed into place.
//! Memory is bounded by a few chunks whatever the domain's size.
//!
//! Any error, the cancellation token, or dropping the future removes the temp file: the
//! writer thread owns a guard that deletes it unless it was persisted, and [`run_export`]
//! waits for that thread before it returns an error.

mod csv;
mod file;
mod json;
mod markdown;
mod sections;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use smartbeak_database::{Database, DbError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::file::{Output, TempFile};
use self::sections::{Batch, ChunkReader, DomainRow, Section};
use super::paths::{self, PathError};
use super::queue::{ExportFormat, ExportSpec, Progress};

pub use self::file::is_temp_name;

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
        let dir_error = |source| ExportError::Dir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(dir_error)?;
        let root = path.canonicalize().map_err(dir_error)?;
        if !root.is_dir() {
            return Err(dir_error(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        // Writable: create (O_EXCL) and remove a probe file.
        let (probe, _file) = TempFile::create(&root, Uuid::nil()).map_err(dir_error)?;
        drop(probe);
        Ok(Self { root })
    }

    /// The directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file a stored `storage_path` names, if it lies inside the directory (no `..`,
    /// no absolute path outside it, no symlink leading out).
    pub fn resolve(&self, storage_path: &str) -> Result<PathBuf, ExportError> {
        paths::resolve_inside(&self.root, storage_path).map_err(|err| match err {
            PathError::Outside(path) => ExportError::OutsideDir(path),
            PathError::NotFound(path) => ExportError::Dir {
                path: self.root.join(&path),
                source: io::Error::new(io::ErrorKind::NotFound, "no such export file"),
            },
            PathError::Io { path, source } => ExportError::Dir { path, source },
        })
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
    /// Whether a later attempt can succeed: a database timeout, a lost connection, a
    /// serialization or resource failure, or an error of the operating system (a full disk
    /// may be freed) yes; the size cap, a missing domain, a path outside the directory, a
    /// query the server refuses for good, or an internal error of the writer (a panic, a
    /// broken invariant: not an OS error) no.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Db(error) => db_error_is_transient(error),
            Self::Io(error) => error.raw_os_error().is_some(),
            Self::Cancelled
            | Self::TooLarge { .. }
            | Self::DomainNotFound(_)
            | Self::OutsideDir(_)
            | Self::Dir { .. } => false,
        }
    }
}

/// Timeouts, connection failures, and SQLSTATE classes 08 (connection), 40 (transaction
/// rollback: serialization, deadlock, a recovery conflict on the replica), 53 (insufficient
/// resources) and 57P (operator intervention: shutdown, terminated backend).
fn db_error_is_transient(error: &DbError) -> bool {
    match error {
        DbError::StatementTimeout(_)
        | DbError::QueryTimeout(_)
        | DbError::AcquireTimeout(_)
        | DbError::Connect { .. }
        | DbError::Discarded
        | DbError::BeginAborted => true,
        DbError::Query(inner) => match inner {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                ["08", "40", "53", "57P"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }),
            _ => false,
        },
        _ => false,
    }
}

/// Writes one export. `progress` receives rows written and percent as it goes (the worker
/// forwards it to the row at a bounded rate, the CLI to its progress bar): at most once a
/// chunk (10,000 rows), and 100 % with the record count at the end.
///
/// The domain must belong to `spec.org_id` ([`ExportError::DomainNotFound`]). When this
/// returns an error no file and no temp file of this call is left in `dir`.
pub async fn run_export(
    db: &Database,
    spec: &ExportSpec,
    dir: &ExportDir,
    limits: ExportLimits,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Result<ExportOutput, ExportError> {
    run_export_with(db, spec, dir, limits, progress, cancel, Hooks::default()).await
}

/// Test hooks of [`run_export_with`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hooks {
    /// The file writer fails with ENOSPC once the file would exceed this many bytes.
    pub(crate) fail_after_bytes: Option<u64>,
    /// Rows per statement instead of [`sections::CHUNK_ROWS`].
    pub(crate) chunk_rows: Option<i64>,
}

/// What the reader sends the writer thread.
#[derive(Debug)]
pub(crate) enum Msg {
    /// The next section starts.
    Section(Section),
    /// Rows of the current section.
    Batch(Batch),
    /// Every section was sent: finish the file.
    End,
}

/// What a writer needs besides the rows.
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) export_id: Uuid,
    pub(crate) domain: DomainRow,
    pub(crate) date_from: Option<DateTime<Utc>>,
    pub(crate) date_to: Option<DateTime<Utc>>,
    pub(crate) sections: Vec<Section>,
}

/// The writer side of the channel, read in order by the encoders.
pub(crate) struct Feed {
    rx: mpsc::Receiver<Msg>,
    pending: Option<Msg>,
    counts: Vec<(Section, u64)>,
    aborted: bool,
}

impl Feed {
    fn new(rx: mpsc::Receiver<Msg>) -> Self {
        Self {
            rx,
            pending: None,
            counts: Vec::with_capacity(4),
            aborted: false,
        }
    }

    fn recv(&mut self) -> io::Result<Msg> {
        if let Some(msg) = self.pending.take() {
            return Ok(msg);
        }
        match self.rx.blocking_recv() {
            Some(msg) => Ok(msg),
            None => {
                self.aborted = true;
                Err(io::Error::other("export aborted"))
            }
        }
    }

    /// The next section, or `None` once every section was read.
    pub(crate) fn next_section(&mut self) -> io::Result<Option<Section>> {
        loop {
            match self.recv()? {
                Msg::Section(section) => {
                    self.counts.push((section, 0));
                    return Ok(Some(section));
                }
                Msg::End => {
                    self.pending = Some(Msg::End);
                    return Ok(None);
                }
                // A batch nobody asked for (the encoder skipped a section): drop it.
                Msg::Batch(_) => {}
            }
        }
    }

    /// The next chunk of the current section, or `None` at its end.
    pub(crate) fn next_batch(&mut self) -> io::Result<Option<Batch>> {
        match self.recv()? {
            Msg::Batch(batch) => {
                if let Some((_, count)) = self.counts.last_mut() {
                    *count += batch.len() as u64;
                }
                Ok(Some(batch))
            }
            other => {
                self.pending = Some(other);
                Ok(None)
            }
        }
    }

    /// Rows read per section so far, in order.
    pub(crate) fn counts(&self) -> &[(Section, u64)] {
        &self.counts
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

/// [`run_export`] with test hooks.
pub(crate) async fn run_export_with(
    db: &Database,
    spec: &ExportSpec,
    dir: &ExportDir,
    limits: ExportLimits,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
    hooks: Hooks,
) -> Result<ExportOutput, ExportError> {
    let domain = cancellable(cancel, sections::domain(db, spec))
        .await?
        .ok_or(ExportError::DomainNotFound(spec.domain_id))?;
    let total = cancellable(cancel, sections::count(db, spec)).await?;
    let header = Header {
        export_id: spec.id,
        domain,
        date_from: spec.date_from,
        date_to: spec.date_to,
        sections: Section::included(spec),
    };
    let extension = match spec.format {
        ExportFormat::Csv if header.sections.len() == 1 => "csv",
        ExportFormat::Csv => "zip",
        ExportFormat::Json => "json",
        ExportFormat::Markdown => "md",
    };
    let name = paths::file_name(spec.id, spec.token, extension);
    let sections = header.sections.clone();
    let (tx, rx) = mpsc::channel(2);
    let root = dir.root.clone();
    let format = spec.format;
    let writer = tokio::task::spawn_blocking(move || {
        write_file(rx, &root, name, &header, format, limits, hooks)
    });
    let plan = Plan {
        sections,
        total,
        chunk_rows: hooks.chunk_rows.unwrap_or(sections::CHUNK_ROWS),
        copy_csv: spec.format == ExportFormat::Csv,
    };
    let produced = produce(db, spec, &plan, tx, progress, cancel).await;
    let written = match writer.await {
        Ok(result) => result,
        Err(err) => Err(ExportError::Io(io::Error::other(format!(
            "the export writer failed: {err}"
        )))),
    };
    match produced {
        // The reader's own error (cancelled, database) wins over the writer's view of it
        // (the channel closed early).
        Err(Some(err)) => Err(err),
        Err(None) | Ok(()) => {
            let output = written?;
            progress.send_replace(Progress {
                rows_written: i64::try_from(output.record_count).unwrap_or(i64::MAX),
                percent: 100,
            });
            Ok(output)
        }
    }
}

/// What the reader reads.
struct Plan {
    sections: Vec<Section>,
    /// Rows counted beforehand (for the percentage).
    total: u64,
    chunk_rows: i64,
    /// Content through `COPY ... CSV` (the CSV format).
    copy_csv: bool,
}

/// `work`, unless `cancel` fires first.
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = Result<T, DbError>>,
) -> Result<T, ExportError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ExportError::Cancelled),
        result = work => result.map_err(ExportError::Db),
    }
}

/// Reads every section into the channel. `Err(None)`: the writer stopped reading (its
/// result says why).
async fn produce(
    db: &Database,
    spec: &ExportSpec,
    plan: &Plan,
    tx: mpsc::Sender<Msg>,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Result<(), Option<ExportError>> {
    let send = async |msg: Msg| -> Result<(), Option<ExportError>> {
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(Some(ExportError::Cancelled)),
            sent = tx.send(msg) => sent.map_err(|_| None),
        }
    };
    let mut rows: u64 = 0;
    for &section in &plan.sections {
        send(Msg::Section(section)).await?;
        let mut reader = ChunkReader::new(section, plan.chunk_rows, plan.copy_csv);
        loop {
            if cancel.is_cancelled() {
                return Err(Some(ExportError::Cancelled));
            }
            let Some(batch) = cancellable(cancel, reader.next(db, spec))
                .await
                .map_err(Some)?
            else {
                break;
            };
            rows += batch.len() as u64;
            send(Msg::Batch(batch)).await?;
            let percent = rows
                .saturating_mul(100)
                .checked_div(plan.total)
                .map_or(99, |p| p.min(99));
            progress.send_replace(Progress {
                rows_written: i64::try_from(rows).unwrap_or(i64::MAX),
                percent: i32::try_from(percent).unwrap_or(99),
            });
        }
    }
    send(Msg::End).await
}

/// The writer thread: encodes the feed into a temp file, then persists it.
fn write_file(
    rx: mpsc::Receiver<Msg>,
    root: &Path,
    name: String,
    header: &Header,
    format: ExportFormat,
    limits: ExportLimits,
    hooks: Hooks,
) -> Result<ExportOutput, ExportError> {
    let (temp, file) = TempFile::create(root, header.export_id).map_err(ExportError::Io)?;
    let out = Output::new(file, limits.max_bytes, hooks.fail_after_bytes);
    let cap_hit = out.cap_flag();
    let mut feed = Feed::new(rx);
    let encoded = match format {
        ExportFormat::Csv => csv::write(&mut feed, out, header),
        ExportFormat::Json => json::write(&mut feed, out, header),
        ExportFormat::Markdown => markdown::write(&mut feed, out, header),
    };
    let out = encoded.map_err(|err| {
        if cap_hit.load(Ordering::Relaxed) {
            ExportError::TooLarge {
                limit: limits.max_bytes,
            }
        } else if feed.aborted {
            ExportError::Cancelled
        } else {
            ExportError::Io(err)
        }
    })?;
    let (file, size_bytes, checksum_sha256) = out.finish();
    temp.persist(file, &root.join(&name))
        .map_err(ExportError::Io)?;
    Ok(ExportOutput {
        storage_path: name,
        size_bytes,
        record_count: feed.total(),
        checksum_sha256,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod retryable_tests {
    use super::*;

    #[test]
    fn only_what_a_later_attempt_can_survive_is_retried() {
        use std::io;
        let enospc = ExportError::Io(io::Error::from_raw_os_error(libc::ENOSPC));
        let internal = ExportError::Io(io::Error::other("the writer thread panicked"));
        let timeout = ExportError::Db(DbError::StatementTimeout(sqlx::Error::PoolTimedOut));
        let refused = ExportError::Db(DbError::Query(sqlx::Error::RowNotFound));
        let lost = ExportError::Db(DbError::Query(sqlx::Error::Io(io::Error::from(
            io::ErrorKind::ConnectionReset,
        ))));
        assert!(enospc.retryable());
        assert!(timeout.retryable());
        assert!(lost.retryable());
        assert!(!internal.retryable());
        assert!(!refused.retryable());
        assert!(!ExportError::TooLarge { limit: 1 }.retryable());
        assert!(!ExportError::Cancelled.retryable());
    }
}
