//! Breaker registry memory: RSS growth over 1,000,000 distinct names, bounded registry beside an unbounded `HashMap` of breakers.

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn registry(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
