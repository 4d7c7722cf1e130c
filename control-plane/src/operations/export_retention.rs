//! `export-retention`: deletes the files of expired exports and marks their rows expired,
//! through the statements of `smartbeak_api::jobs::queue::retention` and the one path check,
//! `smartbeak_api::jobs::paths::resolve_inside`.
//!
//! Per export: the path is checked first (a row naming a path outside `EXPORT_DIR`, or a
//! symlink leading out, fails the item and is left untouched: nothing is deleted); then the
//! row is marked `expiring`, the file deleted, the row marked `expired`. A crash between
//! two steps leaves an `expiring` row that the next run finishes; a file already missing
//! is not an error.

use std::io;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use smartbeak_api::jobs::paths::{self, PathError};
use smartbeak_api::jobs::queue::retention::{self, ExpiredExport};
use smartbeak_database::Database;

use uuid::Uuid;

use super::{
    ItemError, ItemOutcome, Operation, OperationName, Parallelism, Stop, each_item, error_chain,
};

/// The export-retention operation.
#[derive(Debug, Clone)]
pub struct ExportRetention {
    db: Database,
    export_dir: PathBuf,
}

impl ExportRetention {
    /// Over `db`, with files under `export_dir` (`EXPORT_DIR`).
    pub fn new(db: Database, export_dir: PathBuf) -> Self {
        Self { db, export_dir }
    }

    async fn expire(&self, export: ExpiredExport) -> Result<ItemOutcome, ItemError> {
        let file = match paths::resolve_inside(&self.export_dir, &export.storage_path) {
            Ok(file) => Some(file),
            Err(PathError::NotFound(_)) => None,
            Err(e @ PathError::Outside(_)) => {
                return Err(ItemError::once(format!(
                    "refused: {e}; neither the row nor any file was changed"
                )));
            }
            Err(e) => return Err(ItemError::once(error_chain(&e))),
        };
        let db_err = |step: &str, e: smartbeak_database::DbError| {
            ItemError::once(format!("{step}: {}", error_chain(&e)))
        };
        if !retention::mark_expiring(&self.db, export.id, Utc::now())
            .await
            .map_err(|e| db_err("marking the export expiring", e))?
        {
            return Ok(ItemOutcome::Skipped);
        }
        if let Some(file) = file {
            match tokio::fs::remove_file(&file).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ItemError::once(format!(
                        "deleting {}: {e} (the row stays expiring; the next run tries again)",
                        export.storage_path
                    )));
                }
            }
        }
        retention::mark_expired(&self.db, export.id)
            .await
            .map_err(|e| db_err("marking the export expired", e))?;
        Ok(ItemOutcome::Done)
    }
}

impl Operation for ExportRetention {
    type Item = ExpiredExport;
    type Cursor = (DateTime<Utc>, Uuid);

    fn name(&self) -> OperationName {
        OperationName::ExportRetention
    }

    fn parallelism(&self) -> Parallelism {
        Parallelism::ItemsInBatch
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "export_dir": self.export_dir.display().to_string() })
    }

    async fn load_page(
        &self,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> anyhow::Result<Vec<ExpiredExport>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(retention::due(&self.db, Utc::now(), after, limit).await?)
    }

    fn cursor(&self, item: &ExpiredExport) -> (DateTime<Utc>, Uuid) {
        (item.expires_at, item.id)
    }

    fn item_id(&self, item: &ExpiredExport) -> String {
        item.id.to_string()
    }

    async fn process_batch(
        &self,
        batch: Vec<ExpiredExport>,
        concurrency: NonZeroUsize,
        stop: &Stop,
    ) -> Vec<Result<ItemOutcome, ItemError>> {
        each_item(batch, concurrency, stop, |e| self.expire(e)).await
    }
}
