//! Export: 1,000,000 rows to CSV, JSON and Markdown beside `COPY`, with peak RSS.

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn export(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
