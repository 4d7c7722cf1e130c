//! The export's file: a temp file in `EXPORT_DIR` removed on drop unless persisted, and the
//! writer every byte goes through (SHA-256, byte count, the size cap).
//!
//! The temp file is `.<id>.<random>.tmp`, created by `paths::create_inside` (one plain
//! name, `O_EXCL | O_NOFOLLOW`: a file or a symlink planted under that name is refused,
//! never followed), in the directory itself so the final `rename` is atomic.
//! [`TempFile::persist`] `sync_all`s the file, checks the cancellation token, renames it to
//! its final name, `<id>.<token>.<ext>` (a `rename` replaces a symlink planted there, it does not follow it) and
//! fsyncs the directory so the new name survives a crash.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ExportError;
use crate::jobs::paths::{self, PathError};

/// A temp file that is removed when dropped, unless [`TempFile::persist`] renamed it.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates `.<id>.<random>.tmp` in `dir` (which must exist), returning the guard and
    /// the open file. A symlink planted under that name is [`ExportError::OutsideDir`].
    pub(crate) fn create(dir: &Path, id: Uuid) -> Result<(Self, File), ExportError> {
        let name = temp_name(id);
        // The path `create_inside` opened (under the canonical directory).
        let (file, path) = paths::create_inside(dir, &name).map_err(|err| match err {
            PathError::Io { source, .. } => ExportError::Io(source),
            PathError::Outside(name) => ExportError::OutsideDir(name),
            PathError::NotFound(name) => {
                ExportError::Io(io::Error::new(io::ErrorKind::NotFound, name))
            }
        })?;
        Ok((
            Self {
                path,
                persisted: false,
            },
            file,
        ))
    }

    /// Flushes `file` to disk, renames it to `target` (in the same directory) and fsyncs
    /// the directory. Returns `false`, and removes the temp file, when `cancel` fired before
    /// the rename.
    pub(crate) fn persist(
        mut self,
        file: File,
        target: &Path,
        cancel: &CancellationToken,
    ) -> io::Result<bool> {
        file.sync_all()?;
        drop(file);
        if cancel.is_cancelled() {
            return Ok(false);
        }
        std::fs::rename(&self.path, target)?;
        self.persisted = true;
        if let Some(dir) = target.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(true)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.persisted {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %err,
                    "could not remove an export's temp file");
            }
            _ => {}
        }
    }
}

/// Whether a name in `EXPORT_DIR` is an export's temp file (for sweeping leftovers of a
/// killed process).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn temp_name(id: Uuid) -> String {
    format!(".{}.{}.tmp", id.simple(), Uuid::new_v4().simple())
}

/// The error a write past the size cap gets (also flagged in [`Output::cap_hit`]).
#[derive(Debug, thiserror::Error)]
#[error("the export file would exceed {0} bytes")]
pub(crate) struct CapExceeded(pub(crate) u64);

/// Everything written to the file passes here: hashed, counted, capped. Unbuffered: the
/// encoders buffer above it, so it sees large writes.
pub(crate) struct Output {
    file: File,
    hasher: Sha256,
    written: u64,
    max_bytes: u64,
    cap_hit: Arc<AtomicBool>,
    /// Test hook: fail with ENOSPC once the file would grow past this many bytes.
    fail_after: Option<u64>,
}

impl Output {
    pub(crate) fn new(file: File, max_bytes: u64, fail_after: Option<u64>) -> Self {
        Self {
            file,
            hasher: Sha256::new(),
            written: 0,
            max_bytes,
            cap_hit: Arc::new(AtomicBool::new(false)),
            fail_after,
        }
    }

    /// Set once a write was refused by the cap (the encoders may wrap the io error).
    pub(crate) fn cap_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cap_hit)
    }

    /// The file, its size and its hex SHA-256.
    pub(crate) fn finish(self) -> (File, u64, String) {
        (self.file, self.written, hex::encode(self.hasher.finalize()))
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        let after = self.written.saturating_add(len);
        if after > self.max_bytes {
            self.cap_hit.store(true, Ordering::Relaxed);
            return Err(io::Error::other(CapExceeded(self.max_bytes)));
        }
        if self.fail_after.is_some_and(|limit| after > limit) {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// `ENOSPC` (28 on Linux and the BSDs).
const ENOSPC: i32 = 28;
