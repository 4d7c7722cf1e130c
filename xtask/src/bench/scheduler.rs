//! Scheduler: 100,000 items beside a single `UPDATE`.

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn scheduler(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
