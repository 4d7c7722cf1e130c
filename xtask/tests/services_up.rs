//! `cargo xtask services up` when Redis cannot start: the PostgreSQL it already started is
//! stopped and its directory removed, instead of staying detached and unrecorded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::process::Command;

#[test]
fn services_up_leaves_no_postgres_behind_when_redis_fails() {
    let root = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["services", "up"])
        .env("SMARTBEAK_SERVICES_DIR", root.path())
        // A "redis-server" that exits at once.
        .env("SMARTBEAK_REDIS_SERVER", "/bin/false")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Whatever is left is stopped before asserting, so a failure leaks nothing either.
    let left: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    for dir in &left {
        if let Ok(pid) = fs::read_to_string(dir.join("data/postmaster.pid"))
            && let Some(pid) = pid.lines().next().and_then(|l| l.trim().parse().ok())
        {
            let _ = smartbeak_test_support::signal(pid, "KILL");
        }
    }

    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot start a throwaway Redis"),
        "{stderr}"
    );
    assert!(left.is_empty(), "left behind: {left:?}\n{stderr}");
}
