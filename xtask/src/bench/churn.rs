//! Connection churn: backend sessions opened for 100,000 api requests through the pool, beside a connection per request.

use anyhow::{Result, bail};

use super::Ctx;
use super::model::Section;

pub(crate) fn churn(_ctx: &Ctx<'_>) -> Result<Section> {
    bail!("not implemented yet")
}
