//! Paths inside `EXPORT_DIR`: the one check, used by the worker (writing) and the api's
//! download (reading).
//!
//! A stored `storage_path` is relative to `EXPORT_DIR` and built from ids only
//! ([`file_name`]). [`resolve_inside`] refuses anything else: `..`, an absolute path, a
//! path whose canonical form (symlinks followed) leaves the directory.

use std::io;
use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// `..`, an absolute path, a non-UTF-8 or empty name, or a symlink leading out.
    #[error("path {0:?} is outside EXPORT_DIR")]
    Outside(String),
    /// Nothing at that path.
    #[error("export file {0:?} does not exist")]
    NotFound(String),
    /// The directory or the file could not be examined.
    #[error("cannot examine {path}: {source}")]
    Io {
        /// The path examined.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The stored name of an export's file: `<id>.<extension>`, nothing user-supplied.
pub fn file_name(id: Uuid, extension: &str) -> String {
    format!("{}.{extension}", id.simple())
}

/// The existing file `storage_path` names inside `root`, canonical. Refuses `..`, absolute
/// paths and any path whose canonical form is not inside `root`'s canonical form (a symlink
/// planted in the directory that points out of it).
pub fn resolve_inside(root: &Path, storage_path: &str) -> Result<PathBuf, PathError> {
    let outside = || PathError::Outside(storage_path.to_owned());
    let relative = Path::new(storage_path);
    if storage_path.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(outside());
    }
    let canonical_root = root.canonicalize().map_err(|source| PathError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let candidate = canonical_root.join(relative);
    let canonical = match candidate.canonicalize() {
        Ok(path) => path,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(PathError::NotFound(storage_path.to_owned()));
        }
        Err(source) => {
            return Err(PathError::Io {
                path: candidate,
                source,
            });
        }
    };
    if canonical.starts_with(&canonical_root) && canonical != canonical_root {
        Ok(canonical)
    } else {
        Err(outside())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_inside_the_directory_resolve() -> anyhow::Result<()> {
        let base = tempfile::tempdir()?;
        let root = base.path().join("exports");
        std::fs::create_dir(&root)?;
        std::fs::write(root.join("a.csv"), b"x")?;
        std::fs::write(base.path().join("secret"), b"s")?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(base.path().join("secret"), root.join("link.csv"))?;

        assert_eq!(
            resolve_inside(&root, "a.csv")?,
            root.canonicalize()?.join("a.csv")
        );
        for bad in ["../secret", "/etc/passwd", "a/../../secret", "", "."] {
            assert!(
                matches!(resolve_inside(&root, bad), Err(PathError::Outside(_))),
                "{bad:?} must be refused"
            );
        }
        #[cfg(unix)]
        assert!(matches!(
            resolve_inside(&root, "link.csv"),
            Err(PathError::Outside(_))
        ));
        assert!(matches!(
            resolve_inside(&root, "missing.csv"),
            Err(PathError::NotFound(_))
        ));
        Ok(())
    }

    #[test]
    fn file_names_come_from_ids() {
        let id = Uuid::nil();
        assert_eq!(file_name(id, "zip"), "00000000000000000000000000000000.zip");
    }
}
