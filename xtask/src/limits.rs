//! The open-files limit the load runs need (`cargo xtask chaos` scenario 10, the bench's api
//! and churn sections): one place that reads and raises it.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// This process's (soft, hard) `RLIMIT_NOFILE`, from `/proc/self/limits` (`unlimited` read as
/// `u64::MAX`).
fn read() -> Result<(u64, u64)> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no `Max open files` in /proc/self/limits")?;
    let mut values = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|v| {
            if v == "unlimited" {
                Ok(u64::MAX)
            } else {
                v.parse()
            }
        });
    match (values.next(), values.next()) {
        (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
        _ => bail!("cannot read the open-files limit from {line:?}"),
    }
}

/// Raises this process's soft open-files limit to its hard limit with `prlimit`
/// (util-linux) when it is lower, so the children started afterwards (the api, wrk) inherit
/// it, and returns the soft limit it ends at. Raising the hard limit needs root
/// (`ulimit -Hn`); this never tries.
pub(crate) fn raise_open_files() -> Result<u64> {
    let (soft, hard) = read()?;
    if soft >= hard {
        return Ok(soft);
    }
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .context("running prlimit (util-linux) to raise the open-files limit")?;
    let (after, _) = read()?;
    if !status.success() {
        bail!("prlimit could not raise the open-files limit from {soft} to {hard} ({status})");
    }
    Ok(after)
}

/// Fails, naming the limits and what to do, when this process cannot open `need` files even
/// after [`raise_open_files`]; `what` says who needs them.
pub(crate) fn require_open_files(need: u64, what: &str) -> Result<u64> {
    let soft = raise_open_files()?;
    if soft < need {
        let (_, hard) = read()?;
        bail!(
            "the open-files limit is {soft} (hard {hard}); {what} needs {need}: raise the hard \
             limit first (`ulimit -Hn {need}` as root)"
        );
    }
    Ok(soft)
}
