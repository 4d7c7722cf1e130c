//! Rendering: `target/bench/results.json`, `BENCHMARKS.md`, and the charts.

use anyhow::{Result, bail};
use xshell::Shell;

use super::Ctx;
use super::model::{Machine, Report};

pub(crate) fn machine(_sh: &Shell) -> Result<Machine> {
    bail!("not implemented yet")
}

pub(crate) fn write(_ctx: &Ctx<'_>, _report: &Report) -> Result<()> {
    bail!("not implemented yet")
}
