//! Paths inside `EXPORT_DIR`: the one check, used by the worker (writing) and the api's
//! download (reading).
//!
//! A stored `storage_path` is relative to `EXPORT_DIR` and built from ids only
//! ([`file_name`]: `<id>.<fencing token>.<ext>`, one name per attempt, so no attempt can
//! replace another's file; [`parse_file_name`] reads it back, the legacy `<id>.<ext>` too). [`resolve_inside`] (reading) refuses anything else: `..`, an absolute
//! path, a path whose canonical form (symlinks followed) leaves the directory.
//! [`create_inside`] (writing) creates a new file of one plain name directly in the
//! directory, never through a symlink.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
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

/// The extensions a stored export file may have.
pub const EXTENSIONS: [&str; 4] = ["csv", "zip", "json", "md"];

/// The stored name of one attempt's file: `<id>.<token>.<extension>` (`token` is the
/// claim's fencing token), nothing user-supplied. Each attempt has its own name, so a
/// stale attempt that renames its file late cannot replace the file a newer attempt
/// recorded; the schema's `domain_exports_storage_path_check` accepts this form and the
/// legacy `<id>.<extension>`.
pub fn file_name(id: Uuid, token: i64, extension: &str) -> String {
    format!("{}.{token}.{extension}", id.simple())
}

/// A final file's name as [`file_name`] builds it (or the legacy `<id>.<ext>`): the
/// export's id and the token (`None` for a legacy name); `None` for any other name (temp
/// files included).
pub fn parse_file_name(name: &str) -> Option<(Uuid, Option<i64>)> {
    let mut parts = name.split('.');
    let id = parts.next()?;
    let (token, extension) = match (parts.next()?, parts.next(), parts.next()) {
        (ext, None, None) => (None, ext),
        (token, Some(ext), None) => (Some(token), ext),
        _ => return None,
    };
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let id = Uuid::try_parse(id).ok()?;
    if !EXTENSIONS.contains(&extension) {
        return None;
    }
    let token = match token {
        None => None,
        Some(t) if !t.is_empty() && t.len() <= 19 && t.bytes().all(|b| b.is_ascii_digit()) => {
            Some(t.parse().ok()?)
        }
        Some(_) => return None,
    };
    Some((id, token))
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

/// Creates the new file `name` directly inside `root` (canonical), for writing.
///
/// `name` must be one plain path component (no `/`, `.`, `..`, nothing absolute). The file
/// is opened with `create_new` (`O_CREAT | O_EXCL`) and `O_NOFOLLOW`: an existing file, and
/// a symlink planted under that name (pointing anywhere, even at nothing), are refused,
/// never followed, so nothing is created or truncated outside the directory.
pub fn create_inside(root: &Path, name: &str) -> Result<(File, PathBuf), PathError> {
    let outside = || PathError::Outside(name.to_owned());
    let mut components = Path::new(name).components();
    let plain = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    );
    if !plain || name.contains('/') {
        return Err(outside());
    }
    let canonical_root = root.canonicalize().map_err(|source| PathError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let path = canonical_root.join(name);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(file) => Ok((file, path)),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => Err(outside()),
        Err(err)
            if err.kind() == io::ErrorKind::AlreadyExists
                && path.symlink_metadata().is_ok_and(|m| m.is_symlink()) =>
        {
            Err(outside())
        }
        Err(source) => Err(PathError::Io { path, source }),
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
    fn files_are_created_only_inside_the_directory_and_never_through_a_symlink()
    -> anyhow::Result<()> {
        use std::io::Write as _;
        let base = tempfile::tempdir()?;
        let root = base.path().join("exports");
        std::fs::create_dir(&root)?;
        let target = base.path().join("victim");
        std::fs::write(&target, b"keep me")?;
        std::os::unix::fs::symlink(&target, root.join("planted.csv"))?;
        let dangling = base.path().join("not-yet");
        std::os::unix::fs::symlink(&dangling, root.join("dangling.csv"))?;

        let (mut file, path) = create_inside(&root, "a.csv")?;
        assert_eq!(path, root.canonicalize()?.join("a.csv"));
        file.write_all(b"data")?;
        drop(file);
        assert_eq!(std::fs::read(root.join("a.csv"))?, b"data");
        // Not twice: an existing file is never truncated.
        assert!(matches!(
            create_inside(&root, "a.csv"),
            Err(PathError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists
        ));
        for planted in ["planted.csv", "dangling.csv"] {
            assert!(
                matches!(create_inside(&root, planted), Err(PathError::Outside(_))),
                "{planted} must be refused"
            );
        }
        assert_eq!(
            std::fs::read(&target)?,
            b"keep me",
            "the symlink's target untouched"
        );
        assert!(
            !dangling.exists(),
            "nothing created through a dangling symlink"
        );
        for bad in [
            "",
            ".",
            "..",
            "../x.csv",
            "/tmp/x.csv",
            "a/b.csv",
            "sub/",
            "./a.csv",
        ] {
            assert!(
                matches!(create_inside(&root, bad), Err(PathError::Outside(_))),
                "{bad:?} must be refused"
            );
        }
        assert!(!base.path().join("x.csv").exists());
        Ok(())
    }

    #[test]
    fn file_names_come_from_ids_and_tokens_and_parse_back() {
        let id = Uuid::nil();
        assert_eq!(
            file_name(id, 7, "zip"),
            "00000000000000000000000000000000.7.zip"
        );
        let id = Uuid::new_v4();
        assert_eq!(
            parse_file_name(&file_name(id, 42, "csv")),
            Some((id, Some(42)))
        );
        assert_eq!(
            parse_file_name(&format!("{}.json", id.simple())),
            Some((id, None))
        );
        let simple = id.simple().to_string();
        for bad in [
            format!(".{simple}.abc.tmp"),
            format!("{simple}.7.exe"),
            format!("{simple}.x.csv"),
            format!("{simple}..csv"),
            format!("{simple}.1.2.csv"),
            format!("{}.1.csv", simple.to_uppercase()),
            format!("{}.1.csv", id.hyphenated()),
            "notes.txt".to_owned(),
        ] {
            assert_eq!(parse_file_name(&bad), None, "{bad}");
        }
    }
}
