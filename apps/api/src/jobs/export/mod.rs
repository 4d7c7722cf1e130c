//! Writes one export: [`run_export`].
//!
//! Everything is read in one read snapshot of the analytics pool
//! ([`Database::read_snapshot`]: repeatable read, the long-read statement bound, a gap
//! timeout instead of a bound on the whole read), so the counts and every section agree:
//! one statement per section (`sections`), streamed. The CSV format's sections are
//! PostgreSQL's own CSV writer (`COPY (SELECT ...) TO STDOUT`), handed on frame by frame;
//! JSON and Markdown stream rows. An async reader hands them, in messages of about 64 KiB
//! of frames or at most 256 rows, to a blocking writer thread that encodes them (`csv`,
//! `json`, `markdown`) into a temp file in the [`ExportDir`], hashing (SHA-256), counting
//! and capping every byte (`file`). At the end the file is fsynced and renamed into place.
//!
//! **Memory is bounded by bytes, not by messages** (`budget`): a message takes as many
//! bytes of a budget (`budget::IN_FLIGHT_BYTES`, 256 KiB) as it holds before it is sent
//! and gives them back once the writer has encoded it, so at most 256 KiB of data are in
//! flight, or one message alone when a single row is larger than that (a 20 MB body is in
//! memory once in flight, not once per message slot). Besides that: the row the reader
//! holds while it waits for the budget, sqlx's receive buffer, and the writer's 128 KiB
//! buffer. `COPY` frames are handed on as the `Bytes` sqlx received (never copied into a
//! batch buffer); the Markdown writer escapes cells straight into its buffered writer.
//!
//! Any error, the cancellation token, or dropping the future removes the temp file: the
//! writer thread owns a guard that deletes it unless it was persisted, checks the token
//! (and whether the future is still there) before it persists, and [`run_export`] waits for
//! that thread before it returns.

mod budget;
mod csv;
mod file;
mod json;
mod markdown;
mod sections;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use smartbeak_database::{Database, DbError, ReadSource, Snapshot};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::budget::{Budget, Held};
use self::file::{Output, TempFile};
use self::sections::{BATCH_BYTES, Batch, DomainRow, RowReader, Section};
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
        let (probe, _file) = TempFile::create(&root, Uuid::nil()).map_err(|err| match err {
            ExportError::Io(source) => dir_error(source),
            other => other,
        })?;
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

/// Default `EXPORT_ZIP_LEVEL`: deflate level 1 (docs/bench/HISTORY.md "Domain export").
pub const DEFAULT_ZIP_LEVEL: u8 = 1;

/// The highest `EXPORT_ZIP_LEVEL` (deflate's best compression).
pub const MAX_ZIP_LEVEL: u8 = 9;

/// Limits and settings of one export.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    /// `EXPORT_MAX_BYTES`: the file may not grow beyond this.
    pub max_bytes: u64,
    /// `EXPORT_ZIP_LEVEL`: the entries of a CSV export's ZIP are stored uncompressed at 0,
    /// deflated at this level from 1 (fastest) to [`MAX_ZIP_LEVEL`]; a higher value is
    /// treated as [`MAX_ZIP_LEVEL`].
    pub zip_level: u8,
}

impl ExportLimits {
    /// `max_bytes` with the default [`DEFAULT_ZIP_LEVEL`].
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            zip_level: DEFAULT_ZIP_LEVEL,
        }
    }
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
    /// The replica does not have the domain yet, the primary does: a later attempt can
    /// succeed.
    #[error("domain {0} is not on the analytics replica yet (it lags the primary)")]
    ReplicaBehind(Uuid),
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
            Self::ReplicaBehind(_) => true,
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
///
/// A `StatementTimeout` stays retryable also inside the export's snapshot, where it means a
/// statement ran for `DB_LONG_READ_TIMEOUT_MS` (30 min by default): the cause may pass (a
/// lock, a replica under load), so each of the `max_attempts` may spend that long before
/// the job is dead-lettered. Lower `DB_LONG_READ_TIMEOUT_MS` to bound the total.
fn db_error_is_transient(error: &DbError) -> bool {
    match error {
        DbError::StatementTimeout(_)
        | DbError::QueryTimeout(_)
        | DbError::StreamGap(_)
        | DbError::AcquireTimeout(_)
        | DbError::PoolSaturated(_)
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
/// forwards it to the row at a bounded rate, the CLI to its progress bar): once per message
/// handed to the writer, and 100 % with the record count at the end.
///
/// The domain must belong to `spec.org_id` ([`ExportError::DomainNotFound`]; when the
/// replica lacks it but the primary has it, [`ExportError::ReplicaBehind`], retryable).
/// When this returns an error no file and no temp file of this call is left in `dir`; it
/// returns only after the writer thread has ended.
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
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    /// The file writer fails with ENOSPC once the file would exceed this many bytes.
    pub(crate) fail_after_bytes: Option<u64>,
    /// The writer stops reading after the first data message until the export is
    /// cancelled (or `run_export` dropped): a reader held mid-statement.
    pub(crate) stall_writer: bool,
    /// The writer, once the file is encoded (it read `End`) and before it is persisted,
    /// notifies this and waits until the export is cancelled (or `run_export` dropped).
    pub(crate) before_persist: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The byte budget between the reader and the writer (to observe it, or to make it
    /// small); [`budget::IN_FLIGHT_BYTES`] when `None`.
    pub(crate) budget: Option<std::sync::Arc<Budget>>,
}

/// Messages queued between the reader and the writer thread: a backstop only; the byte
/// budget (`budget`) is the bound that matters.
const CHANNEL_MESSAGES: usize = 64;

/// A message and the bytes of the budget it holds (none for the control messages).
type Sent = (Msg, Option<Held>);

/// What the reader sends the writer thread.
#[derive(Debug)]
pub(crate) enum Msg {
    /// The next section starts.
    Section(Section),
    /// Rows of the current section (JSON, Markdown).
    Batch(Batch),
    /// `COPY ... CSV` output of the current section (the CSV format): whole frames as sqlx
    /// received them, about [`BATCH_BYTES`] together, holding `rows` records (the header
    /// frame counts none).
    Csv { frames: Vec<Bytes>, rows: u64 },
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
    rx: mpsc::Receiver<Sent>,
    pending: Option<Msg>,
    /// The budget held by the message handed out last: given back on the next read (the
    /// encoder is done with that message by then).
    held: Option<Held>,
    counts: Vec<(Section, u64)>,
    aborted: bool,
    /// Test hook ([`Hooks::stall_writer`]): stall once data came, until this fires.
    stall: Option<CancellationToken>,
}

impl Feed {
    fn new(rx: mpsc::Receiver<Sent>, stall: Option<CancellationToken>) -> Self {
        Self {
            rx,
            pending: None,
            held: None,
            counts: Vec::with_capacity(4),
            aborted: false,
            stall,
        }
    }

    fn recv(&mut self) -> io::Result<Msg> {
        self.held = None;
        if let Some(msg) = self.pending.take() {
            return Ok(msg);
        }
        if self.total() > 0
            && let Some(stall) = self.stall.take()
        {
            // Blocks this (blocking-pool) thread until the test cancels: no polling.
            futures::executor::block_on(stall.cancelled());
        }
        match self.rx.blocking_recv() {
            Some((msg, held)) => {
                self.held = held;
                Ok(msg)
            }
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
                // Data nobody asked for (the encoder skipped a section): drop it.
                Msg::Batch(_) | Msg::Csv { .. } => {}
            }
        }
    }

    /// The next rows of the current section, or `None` at its end.
    pub(crate) fn next_batch(&mut self) -> io::Result<Option<Batch>> {
        match self.recv()? {
            Msg::Batch(batch) => {
                self.add(batch.len() as u64);
                Ok(Some(batch))
            }
            Msg::Csv { .. } => Err(io::Error::other("CSV data in a non-CSV export")),
            other => {
                self.pending = Some(other);
                Ok(None)
            }
        }
    }

    /// The next CSV bytes of the current section, or `None` at its end.
    pub(crate) fn next_csv(&mut self) -> io::Result<Option<Vec<Bytes>>> {
        match self.recv()? {
            Msg::Csv { frames, rows } => {
                self.add(rows);
                Ok(Some(frames))
            }
            Msg::Batch(_) => Err(io::Error::other("rows in a CSV export")),
            other => {
                self.pending = Some(other);
                Ok(None)
            }
        }
    }

    fn add(&mut self, rows: u64) {
        if let Some((_, count)) = self.counts.last_mut() {
            *count += rows;
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
    let mut snapshot = cancellable(cancel, db.read_snapshot()).await?;
    let domain = match cancellable(cancel, sections::domain(&mut snapshot, spec)).await? {
        Some(domain) => domain,
        None => {
            // A replica that lags may not have a domain made a moment ago: ask the primary.
            if snapshot.source() == ReadSource::Replica
                && cancellable(cancel, sections::domain_on_primary(db, spec)).await?
            {
                return Err(ExportError::ReplicaBehind(spec.domain_id));
            }
            return Err(ExportError::DomainNotFound(spec.domain_id));
        }
    };
    let total = cancellable(cancel, sections::count(&mut snapshot, spec)).await?;
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
    let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
    let budget = hooks
        .budget
        .clone()
        .unwrap_or_else(|| Budget::new(budget::IN_FLIGHT_BYTES));
    let root = dir.root.clone();
    let format = spec.format;
    // Cancelled with `cancel`, and also when this future is dropped (the guard): a writer
    // that outlives its caller never persists.
    let writer_cancel = cancel.child_token();
    let dropped = writer_cancel.clone().drop_guard();
    let writer = tokio::task::spawn_blocking({
        let cancel = writer_cancel.clone();
        move || write_file(rx, &root, name, &header, format, limits, hooks, &cancel)
    });
    let plan = Plan {
        sections,
        total,
        copy_csv: spec.format == ExportFormat::Csv,
    };
    let pipe = Pipe { tx, budget, cancel };
    let produced = produce(&mut snapshot, spec, &plan, &pipe, progress).await;
    drop(pipe);
    let written = match writer.await {
        Ok(result) => result,
        Err(err) => Err(ExportError::Io(io::Error::other(format!(
            "the export writer failed: {err}"
        )))),
    };
    dropped.disarm();
    match produced {
        // The reader's own error (cancelled, database) wins over the writer's view of it
        // (the channel closed early).
        Err(Some(err)) => Err(err),
        Err(None) | Ok(()) => {
            let output = written?;
            // Every statement was read to its end: `COMMIT`, the connection goes back.
            // The file is in place; a failed `COMMIT` of a read-only snapshot changes
            // nothing (the connection is discarded).
            if let Err(err) = snapshot.finish().await {
                tracing::debug!(error = %err, "ending the export's read snapshot failed");
            }
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
    /// Every section through `COPY ... CSV` (the CSV format).
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

/// The reader's end of the channel: the sender, the byte budget, the cancellation.
struct Pipe<'a> {
    tx: mpsc::Sender<Sent>,
    budget: std::sync::Arc<Budget>,
    cancel: &'a CancellationToken,
}

impl Pipe<'_> {
    /// Sends a control message (no budget), unless `cancel` fires first. `Err(None)`: the
    /// writer stopped reading.
    async fn control(&self, msg: Msg) -> Result<(), Option<ExportError>> {
        self.send(msg, None).await
    }

    /// Waits for `bytes` of the budget, then sends `msg` holding them.
    async fn data(&self, msg: Msg, bytes: usize) -> Result<(), Option<ExportError>> {
        let held = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(Some(ExportError::Cancelled)),
            () = self.tx.closed() => return Err(None),
            held = self.budget.take(bytes) => held.map_err(|_| None)?,
        };
        self.send(msg, Some(held)).await
    }

    async fn send(&self, msg: Msg, held: Option<Held>) -> Result<(), Option<ExportError>> {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(Some(ExportError::Cancelled)),
            sent = self.tx.send((msg, held)) => sent.map_err(|_| None),
        }
    }
}

/// Reads every section into the channel, one statement each. `Err(None)`: the writer
/// stopped reading (its result says why).
async fn produce(
    snapshot: &mut Snapshot,
    spec: &ExportSpec,
    plan: &Plan,
    pipe: &Pipe<'_>,
    progress: &watch::Sender<Progress>,
) -> Result<(), Option<ExportError>> {
    let cancel = pipe.cancel;
    let mut rows: u64 = 0;
    let report = |rows: u64| {
        let percent = rows
            .saturating_mul(100)
            .checked_div(plan.total)
            .map_or(99, |p| p.min(99));
        progress.send_replace(Progress {
            rows_written: i64::try_from(rows).unwrap_or(i64::MAX),
            percent: i32::try_from(percent).unwrap_or(99),
        });
    };
    for &section in &plan.sections {
        pipe.control(Msg::Section(section)).await?;
        if plan.copy_csv {
            let sql = sections::copy_sql(section, spec);
            let mut copy = cancellable(cancel, snapshot.copy_out(&sql))
                .await
                .map_err(Some)?;
            let mut frames = Vec::new();
            let mut bytes = 0;
            let mut in_frames = 0;
            // The first frame is the header; every other frame is one record
            // (PostgreSQL sends one CopyData message per row).
            let mut header = true;
            while let Some(frame) = cancellable(cancel, copy.next()).await.map_err(Some)? {
                bytes += frame.len();
                frames.push(frame);
                if !std::mem::take(&mut header) {
                    in_frames += 1;
                }
                if bytes >= BATCH_BYTES {
                    rows += in_frames;
                    let msg = Msg::Csv {
                        frames: std::mem::take(&mut frames),
                        rows: std::mem::take(&mut in_frames),
                    };
                    pipe.data(msg, std::mem::take(&mut bytes)).await?;
                    report(rows);
                }
            }
            if !frames.is_empty() {
                rows += in_frames;
                let msg = Msg::Csv {
                    frames,
                    rows: in_frames,
                };
                pipe.data(msg, bytes).await?;
                report(rows);
            }
        } else {
            let sql = sections::select_sql(section);
            let mut reader = RowReader::start(snapshot, section, &sql, spec)
                .map_err(|err| Some(ExportError::Db(err)))?;
            while let Some((batch, bytes)) =
                cancellable(cancel, reader.next()).await.map_err(Some)?
            {
                rows += batch.len() as u64;
                pipe.data(Msg::Batch(batch), bytes).await?;
                report(rows);
            }
        }
    }
    pipe.control(Msg::End).await
}

/// The writer thread: encodes the feed into a temp file, then persists it unless
/// `cancel` fired.
#[allow(clippy::too_many_arguments)]
fn write_file(
    rx: mpsc::Receiver<Sent>,
    root: &Path,
    name: String,
    header: &Header,
    format: ExportFormat,
    limits: ExportLimits,
    hooks: Hooks,
    cancel: &CancellationToken,
) -> Result<ExportOutput, ExportError> {
    let (temp, file) = TempFile::create(root, header.export_id)?;
    let out = Output::new(file, limits.max_bytes, hooks.fail_after_bytes);
    let cap_hit = out.cap_flag();
    let mut feed = Feed::new(rx, hooks.stall_writer.then(|| cancel.clone()));
    let encoded = match format {
        ExportFormat::Csv => csv::write(&mut feed, out, header, limits.zip_level),
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
    if let Some(reached) = &hooks.before_persist {
        reached.notify_one();
        // Blocks this (blocking-pool) thread until the test cancels: no polling.
        futures::executor::block_on(cancel.cancelled());
    }
    // Cancelled meanwhile (or `run_export` dropped): the guard removes the temp file.
    if cancel.is_cancelled() {
        return Err(ExportError::Cancelled);
    }
    if !temp
        .persist(file, &root.join(&name), cancel)
        .map_err(ExportError::Io)?
    {
        return Err(ExportError::Cancelled);
    }
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
        // A replica behind the primary catches up; a domain missing on both does not.
        assert!(ExportError::ReplicaBehind(Uuid::nil()).retryable());
        assert!(!ExportError::DomainNotFound(Uuid::nil()).retryable());
        let gap = ExportError::Db(DbError::StreamGap(std::time::Duration::from_secs(1)));
        assert!(gap.retryable());
    }
}
