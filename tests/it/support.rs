//! What every black-box test needs: the workspace's binaries, built once per test process.
//!
//! The binaries are built with `cargo build --workspace --bins` (the command `cargo xtask
//! test` runs before the tests, so here it is a no-op: the same command resolves the same
//! features, where `-p <package>` alone could rebuild dependencies with other features) in
//! the target directory and profile this test binary was built into, so `CARGO_TARGET_DIR`
//! and `--release` are respected and a stale binary is never used. Under cargo-nextest every
//! test is its own process; concurrent builds serialize on cargo's lock.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The path of the workspace binary `bin`, built if needed (`package` names it in errors).
pub(crate) fn binary(package: &str, bin: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let profile_dir = BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = profile_dir.join(bin);
    if !path.is_file() {
        bail!(
            "{package} has no binary {bin} (looked for {})",
            path.display()
        );
    }
    Ok(path)
}

/// Builds every binary of the workspace; returns `<target>/<profile>`.
fn build() -> Result<PathBuf> {
    // <target>/<profile>/deps/it-<hash>
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target dir")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("profile dir name")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--quiet", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd
        .status()
        .context("running cargo build --workspace --bins")?;
    if !status.success() {
        bail!("cargo build --workspace --bins failed: {status}");
    }
    Ok(profile_dir.to_path_buf())
}

/// Polls `check` every 50 ms until it returns `Some`, at most `bound`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
